//! Asking the local model every item and saving the graded answers.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use local_model::{ChatMessage, Control, GenerationParams, LocalModel, Prompt};

use super::datasets::Item;
use super::probe::{probe_path, write_probe, SavedProbe};
use super::record::{write_record, EvalRecord, SavedToken};
use super::EvalError;

/// Generates an answer for every item with greedy decoding and no early exit (every rule must
/// see the whole answer), appending each record to `out` as soon as it is graded, so that an
/// interrupted run keeps what it did. The hidden-state features of each answer, where the
/// engine returns them, go beside it ([`probe_path`]).
pub fn generate_run(
    model: &mut LocalModel,
    items: &[Item],
    dataset: &str,
    out: &Path,
    progress: bool,
) -> Result<Vec<EvalRecord>, EvalError> {
    let io = |source| EvalError::Io {
        path: out.to_owned(),
        source,
    };
    let mut writer = BufWriter::new(File::create(out).map_err(io)?);
    let probe_out = probe_path(out);
    let probe_io = |source| EvalError::Io {
        path: probe_out.clone(),
        source,
    };
    let mut probes = BufWriter::new(File::create(&probe_out).map_err(probe_io)?);
    let bar = if progress {
        ProgressBar::new(items.len() as u64)
    } else {
        ProgressBar::hidden()
    };
    if let Ok(style) = ProgressStyle::with_template(
        "{spinner} {prefix} [{bar:30}] {pos}/{len} {elapsed_precise} (eta {eta}) {msg}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(dataset.to_owned());
    let mut records = Vec::with_capacity(items.len());
    let mut correct = 0usize;
    for (i, item) in items.iter().enumerate() {
        let started = Instant::now();
        let prompt = Prompt::Chat(vec![ChatMessage::new("user", item.prompt.clone())]);
        let params = GenerationParams {
            max_tokens: item.max_tokens,
            stop: item.stop.clone(),
            ..GenerationParams::default()
        };
        let generation = model
            .generate(&prompt, &params, &mut |_| Control::Continue)
            .map_err(|e| EvalError::Model(format!("item {}: {e}", item.id)))?;
        let is_correct = item.grader.grade(&generation.text);
        if let Some(probe) = generation.probe.as_deref().cloned() {
            write_probe(
                &mut probes,
                &SavedProbe {
                    id: item.id.clone(),
                    dataset: dataset.to_owned(),
                    probe,
                },
            )?;
            probes.flush().map_err(probe_io)?;
        }
        correct += usize::from(is_correct);
        let record = EvalRecord {
            id: item.id.clone(),
            dataset: dataset.to_owned(),
            prompt: item.prompt.clone(),
            output: generation.text,
            correct: Some(is_correct),
            grader: Some(item.grader.clone()),
            tokens: generation.tokens.iter().map(SavedToken::from).collect(),
            prompt_tokens: generation.usage.prompt_tokens,
            finish_reason: generation.finish_reason.as_str().to_owned(),
            elapsed_ms: started.elapsed().as_secs_f64() * 1000.0,
        };
        write_record(&mut writer, &record)?;
        writer.flush().map_err(io)?;
        records.push(record);
        bar.inc(1);
        bar.set_message(format!(
            "accuracy {:.1}%",
            100.0 * correct as f64 / (i + 1) as f64
        ));
        // Background runs (no terminal, so no bar) still show progress in their log.
        if bar.is_hidden() && (i + 1) % 25 == 0 {
            tracing::info!(
                dataset,
                done = i + 1,
                total = items.len(),
                correct,
                "eval progress"
            );
        }
    }
    bar.finish();
    Ok(records)
}
