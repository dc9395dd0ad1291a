//! Model specs: where a model's files are, resolved to local paths.
//!
//! A spec is either a local path (a `.gguf` file, or a directory in the
//! Hugging Face layout) or a hub id `org/name[:file.gguf]`, fetched with
//! `hf-hub` when the machine is online.

use std::path::{Path, PathBuf};

use crate::error::LoadError;

/// Where a model comes from, as the user wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSpec {
    /// A single GGUF file on disk.
    GgufFile(PathBuf),
    /// A directory with `config.json`, `model.safetensors` or `*.gguf`, and `tokenizer.json`.
    Directory(PathBuf),
    /// A hub repository id, optionally with the file to take from it.
    Hub { repo: String, file: Option<String> },
}

impl ModelSpec {
    /// Parses a spec: anything that exists on disk, or looks like a path, is
    /// a path; `org/name` or `org/name:file` is a hub id.
    pub fn parse(spec: &str) -> Result<Self, LoadError> {
        let trimmed = spec.trim();
        if trimmed.is_empty() {
            return Err(LoadError::InvalidSpec {
                spec: spec.to_string(),
                reason: "empty".into(),
            });
        }
        let path = Path::new(trimmed);
        if path.is_dir() {
            return Ok(ModelSpec::Directory(path.to_path_buf()));
        }
        if path.is_file() {
            return Ok(ModelSpec::GgufFile(path.to_path_buf()));
        }
        if !is_hub_id(trimmed) {
            if trimmed.ends_with(".gguf") {
                return Ok(ModelSpec::GgufFile(path.to_path_buf()));
            }
            return Err(LoadError::NotFound(path.to_path_buf()));
        }
        let (repo, file) = match trimmed.split_once(':') {
            Some((repo, file)) if !file.is_empty() => (repo.to_string(), Some(file.to_string())),
            Some(_) => {
                return Err(LoadError::InvalidSpec {
                    spec: spec.to_string(),
                    reason: "empty file name after `:`".into(),
                })
            }
            None => (trimmed.to_string(), None),
        };
        Ok(ModelSpec::Hub { repo, file })
    }

    /// Resolves the spec to local files, downloading from the hub if needed.
    pub fn resolve(&self) -> Result<ResolvedModel, LoadError> {
        match self {
            ModelSpec::GgufFile(path) => {
                if !path.is_file() {
                    return Err(LoadError::NotFound(path.clone()));
                }
                let dir = path.parent().map(Path::to_path_buf);
                Ok(ResolvedModel {
                    gguf: Some(path.clone()),
                    safetensors: None,
                    config: dir
                        .as_ref()
                        .map(|d| d.join("config.json"))
                        .filter(|p| p.is_file()),
                    tokenizer: dir
                        .as_ref()
                        .map(|d| d.join("tokenizer.json"))
                        .filter(|p| p.is_file()),
                    tokenizer_config: dir
                        .as_ref()
                        .map(|d| d.join("tokenizer_config.json"))
                        .filter(|p| p.is_file()),
                    origin: path.clone(),
                })
            }
            ModelSpec::Directory(dir) => resolve_directory(dir),
            ModelSpec::Hub { repo, file } => resolve_hub(repo, file.as_deref()),
        }
    }
}

/// `org/name` or `org/name:file`, with no leading `.`, `/` or `~`.
fn is_hub_id(spec: &str) -> bool {
    let repo = spec.split_once(':').map_or(spec, |(repo, _)| repo);
    let mut parts = repo.split('/');
    let valid = |p: &str| {
        !p.is_empty()
            && !p.starts_with('.')
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    matches!((parts.next(), parts.next(), parts.next()), (Some(org), Some(name), None) if valid(org) && valid(name))
}

/// The local files a model is loaded from.
#[derive(Debug, Clone, Default)]
pub struct ResolvedModel {
    pub gguf: Option<PathBuf>,
    pub safetensors: Option<Vec<PathBuf>>,
    pub config: Option<PathBuf>,
    pub tokenizer: Option<PathBuf>,
    pub tokenizer_config: Option<PathBuf>,
    /// The path named in errors: the file or directory the user pointed at.
    pub origin: PathBuf,
}

fn resolve_directory(dir: &Path) -> Result<ResolvedModel, LoadError> {
    let entries = std::fs::read_dir(dir).map_err(|source| LoadError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut ggufs = Vec::new();
    let mut safetensors = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        match path.extension().and_then(|e| e.to_str()) {
            Some("gguf") => ggufs.push(path),
            Some("safetensors") => safetensors.push(path),
            _ => {}
        }
    }
    ggufs.sort();
    safetensors.sort();
    let existing = |name: &str| Some(dir.join(name)).filter(|p| p.is_file());
    if safetensors.is_empty() && ggufs.is_empty() {
        return Err(LoadError::MissingFile {
            path: dir.to_path_buf(),
            what: "weights (model.safetensors or a .gguf file)".into(),
        });
    }
    if ggufs.len() > 1 && safetensors.is_empty() {
        return Err(LoadError::InvalidSpec {
            spec: dir.display().to_string(),
            reason: format!(
                "{} GGUF files in the directory; name the one to load",
                ggufs.len()
            ),
        });
    }
    Ok(ResolvedModel {
        gguf: if safetensors.is_empty() {
            ggufs.pop()
        } else {
            None
        },
        safetensors: if safetensors.is_empty() {
            None
        } else {
            Some(safetensors)
        },
        config: existing("config.json"),
        tokenizer: existing("tokenizer.json"),
        tokenizer_config: existing("tokenizer_config.json"),
        origin: dir.to_path_buf(),
    })
}

fn resolve_hub(repo: &str, file: Option<&str>) -> Result<ResolvedModel, LoadError> {
    let spec = match file {
        Some(f) => format!("{repo}:{f}"),
        None => repo.to_string(),
    };
    let unavailable = |reason: String| LoadError::HubUnavailable {
        spec: spec.clone(),
        reason,
    };
    let api = hf_hub::api::sync::Api::new().map_err(|e| unavailable(e.to_string()))?;
    let repo_api = api.model(repo.to_string());
    let fetch_optional = |name: &str| repo_api.get(name).ok();
    match file {
        Some(gguf) if gguf.ends_with(".gguf") => {
            let path = repo_api.get(gguf).map_err(|e| unavailable(e.to_string()))?;
            Ok(ResolvedModel {
                gguf: Some(path.clone()),
                safetensors: None,
                config: fetch_optional("config.json"),
                tokenizer: fetch_optional("tokenizer.json"),
                tokenizer_config: fetch_optional("tokenizer_config.json"),
                origin: path,
            })
        }
        Some(other) => Err(LoadError::InvalidSpec {
            spec: spec.clone(),
            reason: format!("`{other}` is not a .gguf file; omit the file to load safetensors"),
        }),
        None => {
            let weights = repo_api
                .get("model.safetensors")
                .map_err(|e| unavailable(e.to_string()))?;
            let config = repo_api
                .get("config.json")
                .map_err(|e| unavailable(e.to_string()))?;
            let tokenizer = repo_api
                .get("tokenizer.json")
                .map_err(|e| unavailable(e.to_string()))?;
            Ok(ResolvedModel {
                gguf: None,
                safetensors: Some(vec![weights.clone()]),
                config: Some(config),
                tokenizer: Some(tokenizer),
                tokenizer_config: fetch_optional("tokenizer_config.json"),
                origin: weights,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn hub_ids_and_paths_are_told_apart() {
        assert_eq!(
            ModelSpec::parse("microsoft/phi-1_5").unwrap(),
            ModelSpec::Hub {
                repo: "microsoft/phi-1_5".into(),
                file: None
            }
        );
        assert_eq!(
            ModelSpec::parse("org/repo:model-q4k.gguf").unwrap(),
            ModelSpec::Hub {
                repo: "org/repo".into(),
                file: Some("model-q4k.gguf".into())
            }
        );
        assert!(matches!(
            ModelSpec::parse("/nope/missing.gguf").unwrap(),
            ModelSpec::GgufFile(_)
        ));
        assert!(matches!(
            ModelSpec::parse("/nope/missing-dir"),
            Err(LoadError::NotFound(_))
        ));
        assert!(ModelSpec::parse("  ").is_err());
    }

    #[test]
    fn missing_gguf_file_is_reported_by_path() {
        let err = ModelSpec::parse("/nope/missing.gguf")
            .unwrap()
            .resolve()
            .unwrap_err();
        assert!(err.to_string().contains("/nope/missing.gguf"), "{err}");
    }
}
