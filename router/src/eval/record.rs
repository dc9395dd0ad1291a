//! The saved form of an eval run: one JSON object a line per item, with the answer, its
//! grade and every token's signals, so that runs can be re-scored without the model.

use std::io::{BufRead, Write};
use std::path::Path;

use policies::TokenSignal;
use serde::{Deserialize, Deserializer, Serialize};

use super::grading::Grader;
use super::EvalError;

/// One generated token as saved.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SavedToken {
    /// Vocabulary id.
    pub id: u32,
    /// The token's text piece.
    pub text: String,
    /// Log-probability; JSON has no infinity, so `-inf` is written as `null` and read back.
    #[serde(deserialize_with = "null_is_neg_infinity")]
    pub logprob: f32,
    /// Entropy in nats.
    #[serde(deserialize_with = "null_is_nan")]
    pub entropy: f32,
    /// Top-1 minus top-2 probability.
    #[serde(deserialize_with = "null_is_nan")]
    pub margin: f32,
}

impl SavedToken {
    /// The signals the confidence aggregates read.
    pub fn signal(&self) -> TokenSignal {
        TokenSignal {
            logprob: self.logprob,
            entropy: self.entropy,
            margin: self.margin,
        }
    }
}

impl From<&local_model::TokenRecord> for SavedToken {
    fn from(t: &local_model::TokenRecord) -> Self {
        Self {
            id: t.id,
            text: t.text.clone(),
            logprob: t.logprob,
            entropy: t.entropy,
            margin: t.margin,
        }
    }
}

fn null_is_neg_infinity<'de, D: Deserializer<'de>>(d: D) -> Result<f32, D::Error> {
    Ok(Option::<f32>::deserialize(d)?.unwrap_or(f32::NEG_INFINITY))
}

fn null_is_nan<'de, D: Deserializer<'de>>(d: D) -> Result<f32, D::Error> {
    Ok(Option::<f32>::deserialize(d)?.unwrap_or(f32::NAN))
}

/// One evaluated item.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    /// The item's id.
    pub id: String,
    /// The dataset it came from.
    pub dataset: String,
    /// The user message sent to the model.
    pub prompt: String,
    /// The local model's answer.
    pub output: String,
    /// Whether the answer is correct; `None` for unlabeled traffic (rate targets only).
    pub correct: Option<bool>,
    /// How `correct` was decided, so a run can be re-graded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grader: Option<Grader>,
    /// Every generated token with its signals.
    pub tokens: Vec<SavedToken>,
    /// Prompt length in the local model's tokens (for the remote cost estimate).
    #[serde(default)]
    pub prompt_tokens: usize,
    /// `stop`, `length` or `aborted`.
    #[serde(default)]
    pub finish_reason: String,
    /// Wall time of the generation.
    #[serde(default)]
    pub elapsed_ms: f64,
}

impl EvalRecord {
    /// The per-token signals, in order.
    pub fn signals(&self) -> Vec<TokenSignal> {
        self.tokens.iter().map(SavedToken::signal).collect()
    }
}

/// Appends one record as a JSON line.
pub fn write_record(out: &mut impl Write, record: &EvalRecord) -> Result<(), EvalError> {
    let line = serde_json::to_string(record).map_err(|e| EvalError::Json(e.to_string()))?;
    writeln!(out, "{line}").map_err(|source| EvalError::Io {
        path: "<run>".into(),
        source,
    })
}

/// Reads a saved run (blank lines skipped).
pub fn read_records(path: &Path) -> Result<Vec<EvalRecord>, EvalError> {
    let io = |source| EvalError::Io {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut records = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(io)?;
        if line.trim().is_empty() {
            continue;
        }
        records.push(serde_json::from_str(&line).map_err(|e| EvalError::Parse {
            path: path.to_owned(),
            line: i + 1,
            message: e.to_string(),
        })?);
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn infinite_logprob_survives_a_round_trip() {
        let record = EvalRecord {
            id: "1".into(),
            dataset: "d".into(),
            prompt: "p".into(),
            output: "o".into(),
            correct: Some(true),
            grader: None,
            tokens: vec![SavedToken {
                id: 5,
                text: "o".into(),
                logprob: f32::NEG_INFINITY,
                entropy: 0.5,
                margin: 0.25,
            }],
            prompt_tokens: 3,
            finish_reason: "stop".into(),
            elapsed_ms: 1.0,
        };
        let mut buf = Vec::new();
        write_record(&mut buf, &record).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.jsonl");
        std::fs::write(&path, &buf).unwrap();
        assert_eq!(read_records(&path).unwrap(), vec![record]);
    }
}
