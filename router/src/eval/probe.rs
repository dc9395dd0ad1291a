//! The hidden-state probe's data: the features the engine returns per answer, saved beside a
//! run (`run.jsonl` → `run.probe.jsonl`, one line per item that has them) so that `run.jsonl`
//! stays small and quick to re-score, and the probe fit (`cascade calibrate --probe`):
//! L2-regularised logistic regression on the standardised hidden values, projected to a few
//! dozen dimensions by a fixed random matrix, beside standardised log-prob features.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use local_model::ProbeFeatures;
use policies::probe::{HiddenInput, HiddenState, ProbeRule};
use policies::{Aggregate, Feature};
use serde::{Deserialize, Serialize};

use super::datasets::SplitMix64;
use super::logistic::{cross_validated_probabilities, fit, log_loss, stratified_folds};
use super::record::EvalRecord;
use super::transfer::{figures, Figures};
use super::EvalError;

/// Standardized log-prob features are clipped like a learned rule's (see `policies::probe`).
const Z_CLIP: f64 = 8.0;

/// One item's probe features as saved.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SavedProbe {
    /// The item's id, as in `run.jsonl`.
    pub id: String,
    /// Its dataset, as in `run.jsonl`.
    pub dataset: String,
    /// The features.
    pub probe: ProbeFeatures,
}

/// Where the probe features of the run saved at `run` live: `run.jsonl` → `run.probe.jsonl`.
pub fn probe_path(run: &Path) -> PathBuf {
    let stem = run
        .file_stem()
        .map_or_else(|| "run".into(), |s| s.to_string_lossy().into_owned());
    run.with_file_name(format!("{stem}.probe.jsonl"))
}

/// Appends one item's features as a JSON line.
pub fn write_probe(out: &mut impl Write, saved: &SavedProbe) -> Result<(), EvalError> {
    let line = serde_json::to_string(saved).map_err(|e| EvalError::Json(e.to_string()))?;
    writeln!(out, "{line}").map_err(|source| EvalError::Io {
        path: "<probe>".into(),
        source,
    })
}

/// Reads the probe features saved beside the run at `run`, keyed by (dataset, id); empty when
/// the run has none (another backend, or a run from before probes).
pub fn read_probes(run: &Path) -> Result<HashMap<(String, String), ProbeFeatures>, EvalError> {
    let path = probe_path(run);
    let mut out = HashMap::new();
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(source) => return Err(EvalError::Io { path, source }),
    };
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|source| EvalError::Io {
            path: path.clone(),
            source,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let saved: SavedProbe = serde_json::from_str(&line).map_err(|e| EvalError::Parse {
            path: path.clone(),
            line: i + 1,
            message: e.to_string(),
        })?;
        out.insert((saved.dataset, saved.id), saved.probe);
    }
    Ok(out)
}

/// How a probe is fitted: which hidden vectors, how far they are projected, and which log-prob
/// features join them.
#[derive(Clone, Debug)]
pub struct ProbeSettings {
    /// The hidden vectors read, in order.
    pub hidden: Vec<HiddenInput>,
    /// Dimensions of the fixed random projection of the standardised hidden values (0: none,
    /// every value is its own input; slow beyond a few hundred).
    pub dims: usize,
    /// Log-prob features beside them.
    pub features: Vec<Feature>,
    /// Folds of the cross-validation that chooses the penalty.
    pub folds: usize,
    /// Seed of the folds and of the projection.
    pub seed: u64,
}

/// Penalties the probe's cross-validation chooses from (on the summed log-likelihood, so a
/// larger set needs a larger one for the same effect).
pub const PROBE_L2_GRID: [f64; 6] = [0.1, 1.0, 10.0, 100.0, 1_000.0, 10_000.0];

/// The labeled items a probe is fitted and judged on: the concatenated hidden vectors, the
/// log-prob feature values and the grade of each.
#[derive(Clone, Debug, Default)]
pub struct ProbeData {
    /// Per item, the `hidden` inputs side by side.
    pub hidden: Vec<Vec<f32>>,
    /// Per item, the log-prob features in order.
    pub features: Vec<Vec<f64>>,
    /// Per item, whether the local answer was right.
    pub correct: Vec<bool>,
    /// Per item, its dataset.
    pub dataset: Vec<String>,
    /// Per item, its `sum_logprob` and `mean_logprob` scores (the baselines).
    pub baselines: Vec<[f64; 2]>,
    /// The width of one hidden vector.
    pub width: usize,
}

impl ProbeData {
    /// The labeled records with tokens and probe features, each with the `settings`' inputs.
    /// Records without features (another backend) are left out and counted in the second value.
    pub fn collect(
        records: &[EvalRecord],
        probes: &HashMap<(String, String), ProbeFeatures>,
        settings: &ProbeSettings,
    ) -> (Self, usize) {
        let mut data = ProbeData::default();
        let mut missing = 0;
        for r in records {
            let Some(correct) = r.correct else { continue };
            let signals = r.signals();
            let (Some(sum), Some(mean)) = (
                Aggregate::SumLogprob.score(&signals),
                Aggregate::MeanLogprob.score(&signals),
            ) else {
                continue;
            };
            let Some(features) = settings
                .features
                .iter()
                .map(|f| f.value(&signals))
                .collect::<Option<Vec<f64>>>()
            else {
                continue;
            };
            let Some(p) = probes.get(&(r.dataset.clone(), r.id.clone())) else {
                missing += 1;
                continue;
            };
            let state = hidden_state(p);
            let width = state.final_mean.len();
            if data.width != 0 && width != data.width {
                missing += 1;
                continue;
            }
            data.width = width;
            let mut row = Vec::with_capacity(settings.hidden.len() * width);
            for input in &settings.hidden {
                row.extend_from_slice(state.get(*input));
            }
            data.hidden.push(row);
            data.features.push(features);
            data.correct.push(correct);
            data.dataset.push(r.dataset.clone());
            data.baselines.push([sum, mean]);
        }
        (data, missing)
    }

    /// Items.
    pub fn len(&self) -> usize {
        self.correct.len()
    }

    /// Whether there are no items.
    pub fn is_empty(&self) -> bool {
        self.correct.is_empty()
    }
}

/// The engine's features as the borrowed view a probe rule scores.
pub fn hidden_state(p: &ProbeFeatures) -> HiddenState<'_> {
    HiddenState {
        final_mean: &p.final_mean,
        final_last: &p.final_last,
        middle_mean: &p.middle_mean,
        middle_last: &p.middle_last,
    }
}

/// A probe fitted on some items: the rule, with the penalty cross-validation chose.
#[derive(Clone, Debug)]
pub struct ProbeFit {
    /// The rule, every transformation folded into its weights.
    pub rule: ProbeRule,
    /// The chosen penalty.
    pub l2: f64,
    /// Cross-validated log-loss at that penalty, on the training items.
    pub log_loss: f64,
}

/// Standardisation of the columns of a matrix: mean and standard deviation (floored, so a
/// constant column is harmless) over the rows.
fn column_scaling(
    rows: impl Iterator<Item = impl AsRef<[f64]>> + Clone,
    d: usize,
) -> (Vec<f64>, Vec<f64>) {
    let mut mean = vec![0.0; d];
    let mut n = 0usize;
    for row in rows.clone() {
        for (m, v) in mean.iter_mut().zip(row.as_ref()) {
            *m += v;
        }
        n += 1;
    }
    let n = n.max(1) as f64;
    mean.iter_mut().for_each(|m| *m /= n);
    let mut var = vec![0.0; d];
    for row in rows {
        for ((s, v), m) in var.iter_mut().zip(row.as_ref()).zip(&mean) {
            *s += (v - m) * (v - m);
        }
    }
    let scale = var.iter().map(|s| (s / n).sqrt().max(1e-6)).collect();
    (mean, scale)
}

/// A fixed random projection of `from` values to `to`: entries ±1/√to, from `seed`.
fn projection(to: usize, from: usize, seed: u64) -> Vec<Vec<f64>> {
    let mut rng = SplitMix64(seed ^ 0x5052_4F42_4500_0000);
    let unit = 1.0 / (to as f64).sqrt();
    (0..to)
        .map(|_| {
            (0..from)
                .map(|_| {
                    if rng.next_u64() >> 63 == 1 {
                        unit
                    } else {
                        -unit
                    }
                })
                .collect()
        })
        .collect()
}

/// Fits a probe on the items `train` of `data`: hidden values standardised, projected to
/// `settings.dims` and standardised again, log-prob features standardised and clipped, the
/// penalty chosen by cross-validated log-loss, then one fit on every training item, folded
/// into a [`ProbeRule`]. `None` when a class is missing.
pub fn fit_probe(
    name: &str,
    data: &ProbeData,
    train: &[usize],
    settings: &ProbeSettings,
) -> Option<ProbeFit> {
    let y: Vec<bool> = train.iter().map(|&i| data.correct[i]).collect();
    if !y.iter().any(|c| *c) || y.iter().all(|c| *c) || train.len() < settings.folds.max(2) {
        return None;
    }
    let d = data.hidden.first().map_or(0, Vec::len);
    let as_f64 = |i: usize| -> Vec<f64> { data.hidden[i].iter().map(|&v| f64::from(v)).collect() };
    let raw: Vec<Vec<f64>> = train.iter().map(|&i| as_f64(i)).collect();
    let (mu, sd) = column_scaling(raw.iter(), d);
    let standardised: Vec<Vec<f64>> = raw
        .iter()
        .map(|r| {
            r.iter()
                .zip(&mu)
                .zip(&sd)
                .map(|((v, m), s)| (v - m) / s)
                .collect()
        })
        .collect();
    // `map` turns a standardised hidden row into the fit's hidden inputs.
    let map: Option<Vec<Vec<f64>>> = (settings.dims > 0 && settings.dims < d)
        .then(|| projection(settings.dims, d, settings.seed));
    let projected: Vec<Vec<f64>> = match &map {
        Some(m) => standardised
            .iter()
            .map(|z| {
                m.iter()
                    .map(|row| row.iter().zip(z).map(|(a, b)| a * b).sum())
                    .collect()
            })
            .collect(),
        None => standardised,
    };
    let k = projected.first().map_or(0, Vec::len);
    let (pm, ps) = column_scaling(projected.iter(), k);
    let lp: Vec<&Vec<f64>> = train.iter().map(|&i| &data.features[i]).collect();
    let f = settings.features.len();
    let (fc, fs) = column_scaling(lp.iter().map(|v| v.as_slice()), f);
    let rows: Vec<Vec<f64>> = projected
        .iter()
        .zip(&lp)
        .map(|(p, v)| {
            let mut row: Vec<f64> = p
                .iter()
                .zip(&pm)
                .zip(&ps)
                .map(|((x, m), s)| (x - m) / s)
                .collect();
            row.extend(
                v.iter()
                    .zip(&fc)
                    .zip(&fs)
                    .map(|((x, c), s)| ((x - c) / s).clamp(-Z_CLIP, Z_CLIP)),
            );
            row
        })
        .collect();
    let folds = stratified_folds(&y, settings.folds, settings.seed);
    let (l2, loss) = PROBE_L2_GRID
        .iter()
        .map(|&l2| {
            (
                l2,
                log_loss(&cross_validated_probabilities(&rows, &y, &folds, l2), &y),
            )
        })
        .min_by(|a, b| a.1.total_cmp(&b.1))?;
    let model = fit(&rows, &y, l2);
    // Fold the transformations into one weight per hidden value:
    // log-odds = b + Σ_k v_k (p_k - pm_k) / ps_k + ..., p_k = Σ_j M_kj (x_j - mu_j) / sd_j.
    let v: Vec<f64> = model.weights[..k]
        .iter()
        .zip(&ps)
        .map(|(w, s)| w / s)
        .collect();
    let mut intercept = model.intercept - v.iter().zip(&pm).map(|(a, m)| a * m).sum::<f64>();
    let per_standardised: Vec<f64> = match &map {
        Some(m) => (0..d)
            .map(|j| m.iter().zip(&v).map(|(row, vk)| row[j] * vk).sum())
            .collect(),
        None => v,
    };
    let hidden_weights: Vec<f64> = per_standardised
        .iter()
        .zip(&sd)
        .map(|(w, s)| w / s)
        .collect();
    intercept -= hidden_weights
        .iter()
        .zip(&mu)
        .map(|(w, m)| w * m)
        .sum::<f64>();
    let rule = ProbeRule {
        format: policies::probe::FORMAT.to_owned(),
        name: name.to_owned(),
        hidden: settings.hidden.clone(),
        width: data.width,
        hidden_weights,
        features: settings.features.clone(),
        center: fc,
        scale: fs,
        weights: model.weights[k..].to_vec(),
        intercept,
        fitted_on: serde_json::json!({
            "items": train.len(),
            "correct": y.iter().filter(|c| **c).count(),
            "projection_dims": map.as_ref().map_or(0, Vec::len),
            "projection_seed": settings.seed,
            "l2": l2,
            "cv_log_loss": loss,
        }),
    };
    Some(ProbeFit {
        rule,
        l2,
        log_loss: loss,
    })
}

/// The probe's log-odds for item `i` of `data` (the same arithmetic the gateway runs, on the
/// saved vectors).
pub fn score_item(rule: &ProbeRule, data: &ProbeData, i: usize) -> f64 {
    let mut sum = rule.intercept;
    for ((v, w), (c, s)) in data.features[i]
        .iter()
        .zip(&rule.weights)
        .zip(rule.center.iter().zip(&rule.scale))
    {
        sum += w * ((v - c) / s).clamp(-Z_CLIP, Z_CLIP);
    }
    sum + rule
        .hidden_weights
        .iter()
        .zip(&data.hidden[i])
        .map(|(w, &h)| w * f64::from(h))
        .sum::<f64>()
}

/// Out-of-fold probe scores of the items `members` (k folds, stratified): each scored by a
/// probe fitted on the other folds. `NaN` where a fold could not be fitted.
pub fn cross_validated(data: &ProbeData, members: &[usize], settings: &ProbeSettings) -> Vec<f64> {
    let y: Vec<bool> = members.iter().map(|&i| data.correct[i]).collect();
    let folds = stratified_folds(&y, settings.folds, settings.seed.wrapping_add(1));
    let mut out = vec![f64::NAN; members.len()];
    for fold in 0..settings.folds.max(1) {
        let train: Vec<usize> = members
            .iter()
            .zip(&folds)
            .filter(|(_, f)| **f != fold)
            .map(|(&i, _)| i)
            .collect();
        if let Some(fitted) = fit_probe("cv", data, &train, settings) {
            for (slot, (&i, f)) in out.iter_mut().zip(members.iter().zip(&folds)) {
                if *f == fold {
                    *slot = score_item(&fitted.rule, data, i);
                }
            }
        }
    }
    out
}

/// The probe's figures on one dataset, beside the plain log-prob rules on the same items.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ProbeSetReport {
    /// The dataset.
    pub dataset: String,
    /// Its labeled items with probe features.
    pub items: usize,
    /// Its local accuracy.
    pub local_accuracy: f64,
    /// `sum_logprob` (the default rule).
    pub sum_logprob: Figures,
    /// `mean_logprob`.
    pub mean_logprob: Figures,
    /// The probe, k-fold cross-validated within the set (fitted on the other folds).
    pub probe_in_set: Figures,
    /// The probe fitted on the other datasets only (`None` with a single dataset).
    pub probe_cross_set: Option<Figures>,
}

/// In-set and cross-set figures of the probe, per dataset, and pooled.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ProbeReport {
    /// The hidden inputs.
    pub hidden: Vec<String>,
    /// The projection's dimensions (0: none).
    pub dims: usize,
    /// The log-prob features beside them.
    pub features: Vec<String>,
    /// One entry per dataset.
    pub sets: Vec<ProbeSetReport>,
    /// Every item pooled, k-fold cross-validated.
    pub pooled: ProbeSetReport,
}

/// Judges the probe on `data`: within each dataset (k-fold), across datasets (fitted on the
/// others), and pooled, next to `sum_logprob` and `mean_logprob` on the same items.
pub fn probe_report(
    data: &ProbeData,
    settings: &ProbeSettings,
    remote_accuracy: f64,
) -> ProbeReport {
    let mut datasets: Vec<String> = data.dataset.clone();
    datasets.sort();
    datasets.dedup();
    let set_report = |name: &str, members: &[usize], cross: Option<Figures>| {
        let pick = |k: usize| {
            members
                .iter()
                .map(|&i| data.baselines[i][k])
                .collect::<Vec<f64>>()
        };
        let correct: Vec<bool> = members.iter().map(|&i| data.correct[i]).collect();
        let in_set = cross_validated(data, members, settings);
        ProbeSetReport {
            dataset: name.to_owned(),
            items: members.len(),
            local_accuracy: correct.iter().filter(|c| **c).count() as f64
                / members.len().max(1) as f64,
            sum_logprob: figures(&pick(0), &correct, remote_accuracy),
            mean_logprob: figures(&pick(1), &correct, remote_accuracy),
            probe_in_set: figures(&in_set, &correct, remote_accuracy),
            probe_cross_set: cross,
        }
    };
    let sets = datasets
        .iter()
        .map(|name| {
            let members: Vec<usize> = (0..data.len())
                .filter(|&i| &data.dataset[i] == name)
                .collect();
            let cross = (datasets.len() > 1).then(|| {
                let train: Vec<usize> = (0..data.len())
                    .filter(|&i| &data.dataset[i] != name)
                    .collect();
                let correct: Vec<bool> = members.iter().map(|&i| data.correct[i]).collect();
                let scores: Vec<f64> = match fit_probe("cross", data, &train, settings) {
                    Some(fitted) => members
                        .iter()
                        .map(|&i| score_item(&fitted.rule, data, i))
                        .collect(),
                    None => vec![f64::NAN; members.len()],
                };
                figures(&scores, &correct, remote_accuracy)
            });
            set_report(name, &members, cross)
        })
        .collect();
    let all: Vec<usize> = (0..data.len()).collect();
    ProbeReport {
        hidden: settings
            .hidden
            .iter()
            .map(|h| h.name().to_owned())
            .collect(),
        dims: settings.dims,
        features: settings.features.iter().map(|f| f.name()).collect(),
        sets,
        pooled: set_report("pooled", &all, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use local_model::ProbeFeatures;

    fn features(v: f32, width: usize) -> ProbeFeatures {
        ProbeFeatures {
            final_mean: vec![v; width],
            final_last: (0..width).map(|j| v * j as f32).collect(),
            middle_mean: vec![-v; width],
            middle_last: vec![0.5; width],
        }
    }

    #[test]
    fn saved_features_are_read_back_by_dataset_and_id() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run.jsonl");
        assert_eq!(probe_path(&run), dir.path().join("run.probe.jsonl"));
        assert!(read_probes(&run).unwrap().is_empty());
        let mut buf = Vec::new();
        for (id, v) in [("a", 1.0), ("b", 2.5)] {
            let saved = SavedProbe {
                id: id.into(),
                dataset: "d".into(),
                probe: features(v, 3),
            };
            write_probe(&mut buf, &saved).unwrap();
        }
        std::fs::write(probe_path(&run), buf).unwrap();
        let read = read_probes(&run).unwrap();
        assert_eq!(read.len(), 2);
        assert_eq!(read[&("d".to_owned(), "b".to_owned())], features(2.5, 3));
    }

    /// A one-dimensional hidden state, right exactly where it is positive: the hand-checkable
    /// case.
    fn one_dimensional(xs: &[f32]) -> ProbeData {
        ProbeData {
            hidden: xs.iter().map(|&x| vec![x]).collect(),
            features: xs.iter().map(|_| Vec::new()).collect(),
            correct: xs.iter().map(|&x| x > 0.0).collect(),
            dataset: xs.iter().map(|_| "d".to_owned()).collect(),
            baselines: xs.iter().map(|_| [0.0, 0.0]).collect(),
            width: 1,
        }
    }

    fn settings(dims: usize) -> ProbeSettings {
        ProbeSettings {
            hidden: vec![HiddenInput::FinalMean],
            dims,
            features: Vec::new(),
            folds: 2,
            seed: 1,
        }
    }

    #[test]
    fn a_one_dimensional_probe_is_the_logistic_fit_on_the_standardised_value() {
        // x = -3, -1, 1, 3: mean 0, standard deviation sqrt(5). The fit on z = x / sqrt(5)
        // with the chosen penalty, folded back, must weigh x by w / sqrt(5) with the same
        // intercept, and score each item as the fit does.
        let xs = [-3.0, -1.0, 1.0, 3.0, -2.0, 2.0];
        let data = one_dimensional(&xs);
        let all: Vec<usize> = (0..xs.len()).collect();
        let fitted = fit_probe("t", &data, &all, &settings(0)).unwrap();
        let sd = (xs.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>() / 6.0).sqrt();
        let z: Vec<Vec<f64>> = xs.iter().map(|&x| vec![f64::from(x) / sd]).collect();
        let y: Vec<bool> = xs.iter().map(|&x| x > 0.0).collect();
        let direct = fit(&z, &y, fitted.l2);
        let w = fitted.rule.hidden_weights[0];
        assert!(
            (w - direct.weights[0] / sd).abs() < 1e-9,
            "{w} against {}",
            direct.weights[0] / sd
        );
        assert!((fitted.rule.intercept - direct.intercept).abs() < 1e-9);
        for (i, zi) in z.iter().enumerate() {
            let want = direct.log_odds(zi);
            assert!((score_item(&fitted.rule, &data, i) - want).abs() < 1e-9);
        }
        // Symmetric data: no bias, and the positive side scores higher.
        assert!(fitted.rule.intercept.abs() < 1e-9);
        assert!(w > 0.0);
    }

    #[test]
    fn a_saved_probe_scores_through_the_policy_as_in_the_fit() {
        // Eight dimensions, a projection to three, a log-prob feature: the gateway's arithmetic
        // (ProbeRule::log_odds on the engine's vectors) equals the fit's on every item.
        let mut rng = SplitMix64(9);
        let mut uniform = || (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
        let mut data = ProbeData {
            width: 4,
            ..ProbeData::default()
        };
        let mut saved = Vec::new();
        let mut tokens = Vec::new();
        for i in 0..40 {
            let f = ProbeFeatures {
                final_mean: (0..4).map(|_| uniform()).collect(),
                final_last: (0..4).map(|_| uniform()).collect(),
                middle_mean: vec![0.0; 4],
                middle_last: vec![0.0; 4],
            };
            let logprob = -uniform().abs() * 4.0;
            let t = vec![policies::TokenSignal {
                logprob,
                entropy: 1.0,
                margin: 0.5,
            }];
            let mut row = f.final_mean.clone();
            row.extend_from_slice(&f.final_last);
            data.hidden.push(row);
            data.features
                .push(vec![Feature::MeanLogprob.value(&t).unwrap()]);
            data.correct
                .push(f.final_mean[0] + f.final_last[3] > 0.0 || i % 7 == 0);
            data.dataset.push("d".into());
            saved.push(f);
            tokens.push(t);
        }
        let s = ProbeSettings {
            hidden: vec![HiddenInput::FinalMean, HiddenInput::FinalLast],
            dims: 3,
            features: vec![Feature::MeanLogprob],
            folds: 4,
            seed: 5,
        };
        let all: Vec<usize> = (0..40).collect();
        let fitted = fit_probe("p", &data, &all, &s).unwrap();
        let back = ProbeRule::from_json(&fitted.rule.to_json()).unwrap();
        // serde_json reads a float back to within one unit in the last place, not always to
        // the same bits (its `float_roundtrip` feature is off): same rule otherwise.
        assert_eq!(
            (&back.hidden, back.width, &back.features),
            (
                &fitted.rule.hidden,
                fitted.rule.width,
                &fitted.rule.features
            )
        );
        let close = |a: &[f64], b: &[f64]| {
            a.len() == b.len()
                && a.iter()
                    .zip(b)
                    .all(|(x, y)| (x - y).abs() <= 1e-15 * y.abs().max(1.0))
        };
        assert!(close(&back.hidden_weights, &fitted.rule.hidden_weights));
        assert!(close(&back.weights, &fitted.rule.weights));
        assert!(close(&[back.intercept], &[fitted.rule.intercept]));
        for (i, (t, f)) in tokens.iter().zip(&saved).enumerate() {
            let gateway = back.log_odds(t, &hidden_state(f)).unwrap();
            let fit = score_item(&fitted.rule, &data, i);
            assert!(
                (gateway - fit).abs() < 1e-9,
                "item {i}: {gateway} against {fit}"
            );
        }
    }
}
