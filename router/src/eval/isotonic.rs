//! Isotonic calibration of one rule's scores, checked out of fold: the map `cascade calibrate`
//! saves as a calibrated rule, and the honest calibration error that goes with it (an
//! isotonic map fitted and measured on the same items is calibrated by construction).

use policies::isotonic::{IsotonicError, IsotonicMap};

use super::logistic::stratified_folds;
use super::metrics::calibration;

/// A map fitted on every item, with its cross-validated calibration.
#[derive(Clone, Debug)]
pub struct IsotonicFit {
    /// Fitted on every item.
    pub map: IsotonicMap,
    /// Each item's probability from a map fitted without its fold.
    pub out_of_fold: Vec<f64>,
    /// Expected calibration error (10 bins) of the out-of-fold probabilities.
    pub ece: f64,
    /// The same for the raw score read as a probability where it is one (`exp` of a
    /// log-prob score is the answer's or the mean token's probability), for comparison.
    pub raw_ece: Option<f64>,
}

/// Fits the map to `(score, correct)` pairs and measures it with `folds`-fold
/// cross-validation (folds stratified by correctness). A fold whose training part is empty
/// predicts NaN, which the calibration error skips.
pub fn fit_isotonic(
    scores: &[f64],
    correct: &[bool],
    folds: usize,
    seed: u64,
    raw_probability: Option<fn(f64) -> f64>,
) -> Result<IsotonicFit, IsotonicError> {
    let pairs: Vec<(f64, bool)> = scores
        .iter()
        .copied()
        .zip(correct.iter().copied())
        .collect();
    let map = IsotonicMap::fit(&pairs)?;
    let fold_of = stratified_folds(correct, folds, seed);
    let mut out_of_fold = vec![f64::NAN; scores.len()];
    for fold in 0..folds.max(1) {
        let train: Vec<(f64, bool)> = pairs
            .iter()
            .zip(&fold_of)
            .filter(|(_, f)| **f != fold)
            .map(|(p, _)| *p)
            .collect();
        let Ok(fold_map) = IsotonicMap::fit(&train) else {
            continue;
        };
        for (i, f) in fold_of.iter().enumerate() {
            if *f == fold {
                out_of_fold[i] = fold_map.probability(scores[i]);
            }
        }
    }
    let (ece, _) = calibration(&out_of_fold, correct, 10);
    let raw_ece = raw_probability.map(|to_p| {
        let raw: Vec<f64> = scores.iter().map(|s| to_p(*s)).collect();
        calibration(&raw, correct, 10).0
    });
    Ok(IsotonicFit {
        map,
        out_of_fold,
        ece,
        raw_ece,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_fold_probabilities_come_from_maps_that_never_saw_the_item() {
        // Ten items, perfectly ranked: every wrong one scores below every right one.
        let scores: Vec<f64> = (0..10).map(f64::from).collect();
        let correct: Vec<bool> = (0..10).map(|i| i >= 5).collect();
        let fit = fit_isotonic(&scores, &correct, 5, 1, None).unwrap();
        assert_eq!(fit.map.p, [0.0, 1.0]);
        // Out of fold, a right item whose fold held the lowest right scores falls below the
        // training map's step: held-out probabilities are 0 or 1 but not all equal to the
        // labels, and never outside [0, 1].
        assert!(fit.out_of_fold.iter().all(|p| (0.0..=1.0).contains(p)));
        assert!(fit.out_of_fold[0] == 0.0 && fit.out_of_fold[9] == 1.0);
    }

    #[test]
    fn raw_exp_log_prob_is_measured_beside_the_map() {
        // Log-probs of -0.1 whose answers are right only half the time: exp reads 0.9.
        let scores = vec![-0.1; 20];
        let correct: Vec<bool> = (0..20).map(|i| i % 2 == 0).collect();
        let fit = fit_isotonic(&scores, &correct, 5, 1, Some(f64::exp)).unwrap();
        let raw = fit.raw_ece.unwrap();
        assert!((raw - ((-0.1f64).exp() - 0.5)).abs() < 1e-9, "{raw}");
        assert!(fit.ece < 1e-9, "{}", fit.ece);
        assert_eq!(fit.map.p, [0.5]);
    }
}
