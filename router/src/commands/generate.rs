//! `cascade generate`: one answer from the local model.

use std::io::Write;

use local_model::{ChatMessage, Control, GenerationParams, Prompt, Sampling};
use serde_json::json;

use crate::cli::GenerateArgs;

/// Runs the command, printing the answer (streamed) or one JSON object.
pub fn run(args: &GenerateArgs) -> anyhow::Result<()> {
    let mut model = super::load_model(&args.model)?;
    let prompt = if args.raw {
        Prompt::Text(args.prompt.clone())
    } else {
        Prompt::Chat(vec![ChatMessage::new("user", args.prompt.clone())])
    };
    let params = GenerationParams {
        max_tokens: args.max_tokens,
        sampling: if args.temperature > 0.0 {
            Sampling::Sample {
                temperature: args.temperature,
                top_p: args.top_p,
            }
        } else {
            Sampling::Greedy
        },
        seed: args.seed,
        stop: args.stop.clone(),
        ignore_eos: false,
    };
    let stream = !args.json;
    let mut stdout = std::io::stdout();
    let mut streamed = 0usize;
    let generation = model.generate(&prompt, &params, &mut |event| {
        if stream {
            // A closed stdout (e.g. `| head`) ends generation early.
            if stdout
                .write_all(event.text_delta.as_bytes())
                .and_then(|_| stdout.flush())
                .is_err()
            {
                return Control::Stop;
            }
            streamed += event.text_delta.len();
        }
        Control::Continue
    })?;
    if args.json {
        let info = model.info();
        let out = json!({
            "model": info.name,
            "architecture": info.architecture,
            "template": info.template,
            "text": generation.text,
            "finish_reason": generation.finish_reason,
            "usage": generation.usage,
            "timings": generation.timings,
            "tokens": generation.tokens,
        });
        writeln!(stdout, "{}", serde_json::to_string_pretty(&out)?)?;
    } else {
        // Text held back while it could have been the start of a stop
        // sequence is released at the end.
        let rest = generation.text.get(streamed..).unwrap_or_default();
        writeln!(stdout, "{rest}")?;
    }
    Ok(())
}
