//! Choosing the next token: greedy, or temperature + top-p with a seed.

use rand::{rngs::StdRng, Rng, SeedableRng};

/// How the next token is picked.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    /// Always the most likely token.
    Greedy,
    /// Sample from the distribution scaled by `temperature`, restricted to
    /// the smallest set of tokens whose probability reaches `top_p`.
    Sample { temperature: f64, top_p: f64 },
}

/// Picks tokens; owns the random generator so a seed reproduces a run.
pub struct Sampler {
    sampling: Sampling,
    rng: StdRng,
}

impl Sampler {
    /// Creates a sampler; `seed` makes sampled decoding reproducible.
    pub fn new(sampling: Sampling, seed: u64) -> Self {
        Self {
            sampling,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// Picks the next token id from raw logits.
    pub fn pick(&mut self, logits: &[f32]) -> usize {
        match self.sampling {
            Sampling::Greedy => argmax(logits),
            Sampling::Sample { temperature, top_p } => {
                self.sample(logits, temperature.max(1e-6), top_p)
            }
        }
    }

    fn sample(&mut self, logits: &[f32], temperature: f64, top_p: f64) -> usize {
        let max = logits
            .iter()
            .copied()
            .filter(|v| v.is_finite())
            .fold(f32::NEG_INFINITY, f32::max) as f64;
        let mut probs: Vec<(usize, f64)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i, ((l as f64 - max) / temperature).exp()))
            .collect();
        if probs.is_empty() {
            return 0;
        }
        let total: f64 = probs.iter().map(|(_, p)| p).sum();
        let mut kept = probs.len();
        if top_p < 1.0 {
            probs.sort_by(|a, b| b.1.total_cmp(&a.1));
            let mut cumulative = 0.0;
            for (n, (_, p)) in probs.iter().enumerate() {
                cumulative += p / total;
                if cumulative >= top_p {
                    kept = n + 1;
                    break;
                }
            }
        }
        let kept = &probs[..kept];
        let kept_total: f64 = kept.iter().map(|(_, p)| p).sum();
        let mut target = self.rng.random::<f64>() * kept_total;
        for &(i, p) in kept {
            if target < p {
                return i;
            }
            target -= p;
        }
        kept.last().map(|(i, _)| *i).unwrap_or(0)
    }
}

/// Index of the largest finite logit (the first one on ties).
pub fn argmax(logits: &[f32]) -> usize {
    let mut best = 0;
    let mut best_value = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_value {
            best = i;
            best_value = v;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_the_largest_logit() {
        let mut s = Sampler::new(Sampling::Greedy, 0);
        assert_eq!(s.pick(&[0.1, 3.0, 2.0]), 1);
    }

    #[test]
    fn same_seed_gives_same_samples_and_top_p_excludes_the_tail() {
        let logits = [2.0, 1.9, 1.8, -5.0, -6.0];
        let sampling = Sampling::Sample {
            temperature: 1.0,
            top_p: 0.9,
        };
        let mut a = Sampler::new(sampling, 42);
        let mut b = Sampler::new(sampling, 42);
        let xs: Vec<usize> = (0..200).map(|_| a.pick(&logits)).collect();
        let ys: Vec<usize> = (0..200).map(|_| b.pick(&logits)).collect();
        assert_eq!(xs, ys);
        assert!(xs.iter().all(|&i| i < 3), "top-p kept a tail token");
        assert!((0..3).all(|i| xs.contains(&i)), "sampling is not greedy");
    }
}
