//! L2-regularised logistic regression by Newton's method, with k-fold cross-validation.
//!
//! Small and exact rather than general: a handful of standardized features and at most tens
//! of thousands of rows, where Newton converges in a few steps and needs no learning rate.

use policies::learned::sigmoid;

/// Fitted coefficients on standardized inputs.
#[derive(Clone, Debug, PartialEq)]
pub struct Fit {
    /// One weight per feature.
    pub weights: Vec<f64>,
    /// The intercept (not penalised).
    pub intercept: f64,
}

impl Fit {
    /// Log-odds for one row.
    pub fn log_odds(&self, x: &[f64]) -> f64 {
        self.intercept + self.weights.iter().zip(x).map(|(w, v)| w * v).sum::<f64>()
    }

    /// Probability for one row.
    pub fn probability(&self, x: &[f64]) -> f64 {
        sigmoid(self.log_odds(x))
    }
}

/// Maximises `sum log-likelihood - l2 / 2 * |w|^2` over `rows` (each of the same length).
pub fn fit(rows: &[Vec<f64>], y: &[bool], l2: f64) -> Fit {
    let d = rows.first().map_or(0, Vec::len);
    // Parameters: d weights, then the intercept.
    let mut beta = vec![0.0; d + 1];
    for _ in 0..100 {
        let mut grad = vec![0.0; d + 1];
        let mut hess = vec![vec![0.0; d + 1]; d + 1];
        for (x, &label) in rows.iter().zip(y) {
            let eta = beta[d] + x.iter().zip(&beta).map(|(v, b)| v * b).sum::<f64>();
            let p = sigmoid(eta);
            let r = p - f64::from(u8::from(label));
            let w = (p * (1.0 - p)).max(1e-12);
            for i in 0..=d {
                let xi = if i == d { 1.0 } else { x[i] };
                grad[i] += r * xi;
                for j in 0..=i {
                    let xj = if j == d { 1.0 } else { x[j] };
                    hess[i][j] += w * xi * xj;
                }
            }
        }
        for i in 0..=d {
            // Mirror the lower triangle accumulated above.
            let row: Vec<f64> = hess[i][..i].to_vec();
            for (j, v) in row.into_iter().enumerate() {
                hess[j][i] = v;
            }
            // The intercept gets a tiny ridge only so that a one-class fold still solves.
            let ridge = if i == d { 1e-9 } else { l2 };
            hess[i][i] += ridge;
            grad[i] += ridge * beta[i];
        }
        let Some(step) = solve(hess, grad) else { break };
        let mut largest: f64 = 0.0;
        for (b, s) in beta.iter_mut().zip(&step) {
            *b -= s;
            largest = largest.max(s.abs());
        }
        if largest < 1e-10 {
            break;
        }
    }
    let intercept = beta.pop().unwrap_or(0.0);
    Fit {
        weights: beta,
        intercept,
    }
}

/// Solves `a x = b` by Gaussian elimination with partial pivoting; `None` when singular.
fn solve(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> Option<Vec<f64>> {
    let n = b.len();
    for col in 0..n {
        let pivot = (col..n).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        if a[pivot][col].abs() < 1e-300 {
            return None;
        }
        a.swap(col, pivot);
        b.swap(col, pivot);
        let pivot_row = a[col].clone();
        for row in col + 1..n {
            let factor = a[row][col] / pivot_row[col];
            for (x, p) in a[row][col..].iter_mut().zip(&pivot_row[col..]) {
                *x -= factor * p;
            }
            b[row] -= factor * b[col];
        }
    }
    let mut x = vec![0.0; n];
    for row in (0..n).rev() {
        let tail: f64 = (row + 1..n).map(|k| a[row][k] * x[k]).sum();
        x[row] = (b[row] - tail) / a[row][row];
    }
    x.iter().all(|v| v.is_finite()).then_some(x)
}

/// Assigns each item to one of `k` folds, stratified by label (each fold gets its share of
/// correct and wrong answers) and shuffled with `seed`.
pub fn stratified_folds(y: &[bool], k: usize, seed: u64) -> Vec<usize> {
    let k = k.max(1);
    let mut rng = super::datasets::SplitMix64(seed);
    let mut folds = vec![0; y.len()];
    for class in [false, true] {
        let mut members: Vec<usize> = (0..y.len()).filter(|&i| y[i] == class).collect();
        for i in (1..members.len()).rev() {
            let j = (rng.next_u64() % (i as u64 + 1)) as usize;
            members.swap(i, j);
        }
        for (position, &i) in members.iter().enumerate() {
            folds[i] = position % k;
        }
    }
    folds
}

/// Out-of-fold probabilities: each item predicted by a model fitted without its fold.
pub fn cross_validated_probabilities(
    rows: &[Vec<f64>],
    y: &[bool],
    folds: &[usize],
    l2: f64,
) -> Vec<f64> {
    let k = folds.iter().copied().max().map_or(1, |m| m + 1);
    let mut out = vec![f64::NAN; rows.len()];
    for fold in 0..k {
        let (train_x, train_y): (Vec<Vec<f64>>, Vec<bool>) = rows
            .iter()
            .zip(y)
            .zip(folds)
            .filter(|(_, f)| **f != fold)
            .map(|((x, &label), _)| (x.clone(), label))
            .unzip();
        let model = fit(&train_x, &train_y, l2);
        for (i, x) in rows.iter().enumerate() {
            if folds[i] == fold {
                out[i] = model.probability(x);
            }
        }
    }
    out
}

/// Mean negative log-likelihood of probabilities (clamped away from 0 and 1).
pub fn log_loss(p: &[f64], y: &[bool]) -> f64 {
    let total: f64 = p
        .iter()
        .zip(y)
        .map(|(&p, &label)| {
            let p = p.clamp(1e-12, 1.0 - 1e-12);
            if label {
                -p.ln()
            } else {
                -(1.0 - p).ln()
            }
        })
        .sum();
    total / p.len().max(1) as f64
}

/// Penalties tried by [`choose_l2`].
pub const L2_GRID: [f64; 5] = [0.01, 0.1, 1.0, 10.0, 100.0];

/// The penalty with the lowest cross-validated log-loss, and that loss.
pub fn choose_l2(rows: &[Vec<f64>], y: &[bool], folds: &[usize]) -> (f64, f64) {
    L2_GRID
        .iter()
        .map(|&l2| {
            (
                l2,
                log_loss(&cross_validated_probabilities(rows, y, folds, l2), y),
            )
        })
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap_or((1.0, f64::NAN))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::datasets::SplitMix64;

    fn normal(rng: &mut SplitMix64) -> f64 {
        // Box-Muller from two uniforms in (0, 1].
        let u1 = ((rng.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        let u2 = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    #[test]
    fn fit_recovers_known_coefficients_on_synthetic_data() {
        let (w, b) = ([1.5, -0.75, 0.0], -0.5);
        let mut rng = SplitMix64(42);
        let mut rows = Vec::new();
        let mut y = Vec::new();
        for _ in 0..40_000 {
            let x: Vec<f64> = (0..3).map(|_| normal(&mut rng)).collect();
            let p = sigmoid(b + x.iter().zip(&w).map(|(a, c)| a * c).sum::<f64>());
            let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
            rows.push(x);
            y.push(u < p);
        }
        let model = fit(&rows, &y, 1e-6);
        for (got, want) in model.weights.iter().zip(w) {
            assert!((got - want).abs() < 0.06, "weight {got} vs {want}");
        }
        assert!(
            (model.intercept - b).abs() < 0.06,
            "intercept {}",
            model.intercept
        );
    }

    #[test]
    fn penalty_shrinks_and_separable_data_stays_finite() {
        let rows = vec![vec![-1.0], vec![-0.5], vec![0.5], vec![1.0]];
        let y = [false, false, true, true];
        let loose = fit(&rows, &y, 0.01);
        let tight = fit(&rows, &y, 10.0);
        assert!(loose.weights[0].is_finite() && loose.weights[0] > tight.weights[0]);
        assert!(tight.weights[0] > 0.0);
    }

    #[test]
    fn folds_are_stratified_and_reproducible() {
        let y: Vec<bool> = (0..20).map(|i| i % 4 == 0).collect();
        let folds = stratified_folds(&y, 5, 3);
        assert_eq!(folds, stratified_folds(&y, 5, 3));
        for fold in 0..5 {
            let positives = (0..20).filter(|&i| folds[i] == fold && y[i]).count();
            assert_eq!(positives, 1);
        }
    }
}
