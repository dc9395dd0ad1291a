//! The bridge between the local model's output and the `policies` crate, which holds the
//! routing verdict (`policies::decision`): generated tokens as the confidence signals the
//! policies score.

use local_model::{Generation, TokenRecord};

pub use policies::Aggregate;
use policies::{HiddenState, TokenSignal};

/// The confidence signals of generated tokens, as the `policies` crate scores them.
pub fn signals(tokens: &[TokenRecord]) -> Vec<TokenSignal> {
    tokens
        .iter()
        .map(|t| TokenSignal {
            logprob: t.logprob,
            entropy: t.entropy,
            margin: t.margin,
        })
        .collect()
}

/// The score of a generation's tokens under `aggregate`, or `None` when it has no tokens.
pub fn score(aggregate: &Aggregate, tokens: &[TokenRecord]) -> Option<f64> {
    aggregate.score(&signals(tokens))
}

/// The score of a whole generation under `aggregate`: its tokens' `signals`, and for a
/// `probe` the hidden states the engine returned with it (a dot product over them; NaN
/// without them, so the request escalates).
pub fn score_generation(
    aggregate: &Aggregate,
    signals: &[TokenSignal],
    generation: &Generation,
) -> Option<f64> {
    let hidden = generation.probe.as_ref().map(|p| HiddenState {
        final_mean: &p.final_mean,
        final_last: &p.final_last,
        middle_mean: &p.middle_mean,
        middle_last: &p.middle_last,
    });
    aggregate.score_with(signals, hidden.as_ref())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use policies::decision::Reason;

    fn tokens(logprobs: &[f32]) -> Vec<TokenRecord> {
        logprobs
            .iter()
            .map(|&logprob| TokenRecord {
                id: 0,
                text: "x".into(),
                logprob,
                entropy: 0.0,
                margin: 0.0,
            })
            .collect()
    }

    #[test]
    fn scores_come_from_the_policies_aggregates() {
        let t = tokens(&[-0.5, -1.0, -0.1, -2.0]);
        let close = |a: Option<f64>, b: f64| (a.unwrap() - b).abs() < 1e-6;
        assert!(close(score(&Aggregate::MeanLogprob, &t), -0.9));
        assert!(close(score(&Aggregate::SumLogprob, &t), -3.6));
        assert!(close(score(&Aggregate::MinLogprob, &t), -2.0));
        assert!(close(
            score(&Aggregate::FractionAbove { bound: -0.75 }, &t),
            0.5
        ));
        assert_eq!(score(&Aggregate::MeanLogprob, &[]), None);
    }

    #[test]
    fn the_openapi_description_and_docs_list_every_reason() {
        let spec: serde_json::Value = serde_json::from_str(crate::http::OPENAPI).unwrap();
        let path = "/paths/~1v1~1chat~1completions/post/responses/200/headers/x-cascade-reason/schema/enum";
        let listed: Vec<&str> = spec
            .pointer(path)
            .and_then(|v| v.as_array())
            .unwrap()
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        let mut names: Vec<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        names.push("none");
        assert_eq!(listed, names);
        let api = include_str!("../../../docs/api.md");
        for reason in Reason::ALL {
            assert!(
                api.contains(&format!("| `{}` |", reason.as_str())),
                "docs/api.md does not list `{reason}`"
            );
        }
    }
}
