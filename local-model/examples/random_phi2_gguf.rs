//! Writes a randomly initialised full-size Phi-1.5 in llama.cpp's `phi2`
//! GGUF layout, for speed comparisons on a file both engines read (speed
//! does not depend on the weights' values).
//!
//!   cargo run --release -p local-model --example random_phi2_gguf -- \
//!       OUT.gguf FORMAT VOCAB.gguf
//!
//! FORMAT: q4_0, q4k, q5k, q6k or q8_0 (every matrix; norms and biases F32).
//! VOCAB.gguf: a GGUF whose byte-level BPE vocabulary is embedded (SmolLM2's),
//! padded to Phi-1.5's 51 200 rows.

use std::path::PathBuf;
use std::process::ExitCode;

use candle_core::quantized::GgmlDType;
use local_model::synthetic::{vocabulary_of, write_random_phi2, Phi2Dims, QkvLayout};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [out, format, vocab] = args.as_slice() else {
        eprintln!("usage: random_phi2_gguf OUT.gguf FORMAT VOCAB.gguf (FORMAT: q4_0, q4k, q5k, q6k, q8_0)");
        return ExitCode::from(2);
    };
    let dtype = match format.as_str() {
        "q4_0" => GgmlDType::Q4_0,
        "q4k" => GgmlDType::Q4K,
        "q5k" => GgmlDType::Q5K,
        "q6k" => GgmlDType::Q6K,
        "q8_0" => GgmlDType::Q8_0,
        other => {
            eprintln!("error: unknown format `{other}` (q4_0, q4k, q5k, q6k, q8_0)");
            return ExitCode::from(2);
        }
    };
    let written = vocabulary_of(&PathBuf::from(vocab)).and_then(|vocabulary| {
        write_random_phi2(
            &PathBuf::from(out),
            Phi2Dims::phi_1_5(),
            dtype,
            QkvLayout::Separate,
            Some(vocabulary),
            1,
        )
    });
    match written {
        Ok(()) => {
            println!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
