//! Measuring and calibrating token-level confidence: `cascade eval` and `cascade calibrate`.
//!
//! An eval run asks the local model every item of a labeled set, grades the answers and saves
//! every token's signals ([`record`]). Scoring a saved run needs no model: every confidence
//! rule is scored ([`scoring`]), measured as a predictor of correctness (AUROC) and as a
//! deferral policy (quality against escalation rate, with random and oracle baselines;
//! [`metrics`]), and reported as a table, a JSON summary and plots ([`report`]).
//! [`calibrate`] turns a run into thresholds and a learned rule ([`logistic`]).

// Tests state expectations with unwrap; the lints stay on for everything else.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod calibrate;
pub mod datasets;
pub mod feedback;
pub mod generate;
pub mod grading;
pub mod isotonic;
pub mod logistic;
pub mod metrics;
pub mod plot;
pub mod probe;
pub mod record;
pub mod report;
pub mod scoring;
pub mod transfer;

use std::path::PathBuf;

/// Why an evaluation or calibration failed.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A line of a data or run file is malformed.
    #[error("{path}:{line}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line (row for CSV).
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// Neither a built-in set nor a `.jsonl` file.
    #[error("unknown dataset `{0}`: use capitals, arc, gsm8k, mmlu, nq_open, webquestions, mawps or a .jsonl file")]
    UnknownDataset(String),
    /// JSON serialisation failed.
    #[error("JSON: {0}")]
    Json(String),
    /// The local model failed.
    #[error("local model: {0}")]
    Model(String),
    /// A plot could not be drawn.
    #[error("plot {path}: {message}")]
    Plot {
        /// The output file.
        path: PathBuf,
        /// What failed.
        message: String,
    },
    /// The request cannot be answered from this data.
    #[error("{0}")]
    Invalid(String),
}
