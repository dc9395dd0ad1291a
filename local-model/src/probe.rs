//! Hidden-state features for a confidence probe: what the model's own residual stream says
//! about an answer, beside the log-probs of its tokens.
//!
//! Every forward pass of the tuned engine already computes, for the position whose logits pick
//! the next token, the final hidden state (after the final norm, what the output projection
//! reads) and the residual stream after the middle block. A request keeps their mean over the
//! positions that picked its tokens and the end, and the last of them: a copy of
//! `2 × width` floats per step (1,152 for SmolLM2, against the 49,152 logits copied per step
//! already) and one addition each, so they are always collected, with no extra pass.

use serde::{Deserialize, Serialize};

/// A request's probe features (tuned engine only). Each vector has the model's width.
///
/// "The positions that picked the answer" are those whose logits chose each generated token
/// and, when the model ended the answer itself, the end-of-sequence token: the last prompt
/// position, then every answer token but (when `max_tokens` cut the answer) the last.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeFeatures {
    /// Mean final hidden state (after the final norm) over the positions that picked the answer.
    pub final_mean: Vec<f32>,
    /// Final hidden state of the last of them (the last answer token when the model ended it).
    pub final_last: Vec<f32>,
    /// Mean residual stream after the first half of the blocks, over the same positions.
    pub middle_mean: Vec<f32>,
    /// Residual stream after the first half of the blocks, at the last of them.
    pub middle_last: Vec<f32>,
}

/// Running sums of the hidden features of the positions a request has read so far.
#[derive(Debug, Clone, Default)]
pub(crate) struct ProbeAccumulator {
    sum: Vec<f64>,
    count: usize,
    last: Vec<f32>,
}

impl ProbeAccumulator {
    /// Adds the features (`[final, middle]`) of one position that picked a token. Features of
    /// another length than the first (never from one model) are ignored.
    pub(crate) fn push(&mut self, hidden: &[f32]) {
        if self.count == 0 {
            self.sum = vec![0.0; hidden.len()];
        } else if hidden.len() != self.sum.len() {
            return;
        }
        for (s, &h) in self.sum.iter_mut().zip(hidden) {
            *s += f64::from(h);
        }
        self.last.clear();
        self.last.extend_from_slice(hidden);
        self.count += 1;
    }

    /// The features, or `None` when no position was read (no hidden state on this backend,
    /// or nothing was generated).
    pub(crate) fn finish(self) -> Option<ProbeFeatures> {
        if self.count == 0 || !self.sum.len().is_multiple_of(2) {
            return None;
        }
        let width = self.sum.len() / 2;
        let n = self.count as f64;
        let mean: Vec<f32> = self.sum.iter().map(|s| (s / n) as f32).collect();
        Some(ProbeFeatures {
            final_mean: mean[..width].to_vec(),
            final_last: self.last[..width].to_vec(),
            middle_mean: mean[width..].to_vec(),
            middle_last: self.last[width..].to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{ProbeAccumulator, ProbeFeatures};

    #[test]
    fn the_mean_and_last_split_into_final_and_middle_halves() {
        let mut acc = ProbeAccumulator::default();
        acc.push(&[1.0, 2.0, 10.0, 20.0]);
        acc.push(&[3.0, 6.0, 30.0, 60.0]);
        assert_eq!(
            acc.finish(),
            Some(ProbeFeatures {
                final_mean: vec![2.0, 4.0],
                final_last: vec![3.0, 6.0],
                middle_mean: vec![20.0, 40.0],
                middle_last: vec![30.0, 60.0],
            })
        );
    }

    #[test]
    fn nothing_read_gives_no_features() {
        assert_eq!(ProbeAccumulator::default().finish(), None);
    }
}
