//! Choosing the gate by validation, never by training accuracy: for each
//! candidate layer and read position, every fold (a wrapper family, with the
//! instructions it holds) is scored by a direction fitted without it. The
//! threshold is the high quantile of the held-out harmless scores, and the
//! candidate whose worst held-out family is flagged most often wins.

use std::collections::{BTreeSet, HashSet};

use ndarray::{Array1, ArrayView1, ArrayView2, Axis};

use crate::trainset::PLAIN;

/// What cross-validation needs to know about each example.
pub struct Labels<'a> {
    pub harmful: &'a [bool],
    pub family: &'a [usize],
    pub fold: &'a [usize],
    pub instruction: &'a [usize],
    /// Family index of multi-turn examples (their harmless FPR is bounded on its own).
    pub multi_turn: usize,
}

/// A mean-difference direction and the harmless projections' mean and spread,
/// which put scores of different fits on one scale.
pub struct Fit {
    pub direction: Array1<f32>,
    centre: f32,
    scale: f32,
}

impl Fit {
    /// Fits on the rows of `x` where `train` holds; needs both classes.
    pub fn new(x: ArrayView2<f32>, harmful: &[bool], train: impl Fn(usize) -> bool) -> Option<Fit> {
        let rows = |class: bool| (0..x.nrows()).filter(|&i| train(i) && harmful[i] == class).collect::<Vec<_>>();
        let (pos, neg) = (rows(true), rows(false));
        if pos.is_empty() || neg.is_empty() {
            return None;
        }
        let mean = |idx: &[usize]| x.select(Axis(0), idx).mean_axis(Axis(0)).expect("rows");
        let diff = mean(&pos) - mean(&neg);
        let norm = diff.dot(&diff).sqrt();
        if !(norm > 0.0 && norm.is_finite()) {
            return None;
        }
        let direction = diff / norm;
        let proj: Vec<f32> = neg.iter().map(|&i| x.row(i).dot(&direction)).collect();
        let centre = proj.iter().sum::<f32>() / proj.len() as f32;
        let var = proj.iter().map(|p| (p - centre).powi(2)).sum::<f32>() / proj.len() as f32;
        Some(Fit { direction, centre, scale: var.sqrt().max(1e-6) })
    }

    /// Score in harmless standard deviations above the harmless mean.
    pub fn z(&self, row: ArrayView1<f32>) -> f32 {
        (row.dot(&self.direction) - self.centre) / self.scale
    }

    /// The gate bias that puts its boundary at `threshold` (in `z` units).
    pub fn bias(&self, threshold: f32) -> f32 {
        -(self.centre + threshold * self.scale)
    }
}

/// Out-of-fold scores: each example scored by a fit that saw neither its fold
/// nor any example asking the same instruction.
pub fn out_of_fold(x: ArrayView2<f32>, labels: &Labels) -> Vec<f32> {
    let mut z = vec![f32::NAN; x.nrows()];
    let folds: BTreeSet<usize> = labels.fold.iter().copied().collect();
    for f in folds {
        let held: Vec<usize> = (0..x.nrows()).filter(|&i| labels.fold[i] == f).collect();
        let asked: HashSet<(bool, usize)> = held.iter().map(|&i| (labels.harmful[i], labels.instruction[i])).collect();
        let train = |i: usize| labels.fold[i] != f && !asked.contains(&(labels.harmful[i], labels.instruction[i]));
        if let Some(fit) = Fit::new(x, labels.harmful, train) {
            for &i in &held {
                z[i] = fit.z(x.row(i));
            }
        }
    }
    z
}

/// Held-out figures of one candidate gate.
#[derive(Clone, Debug, PartialEq)]
pub struct Validation {
    /// Boundary in `z` units: no harmless group exceeds the allowed FPR.
    pub threshold: f32,
    /// TPR per family (index as in the training set); NaN where a family has no harmful example.
    pub family_tpr: Vec<f32>,
    pub worst_tpr: f32,
    pub mean_tpr: f32,
    /// FPR on plain, wrapped and multi-turn harmless examples.
    pub fpr: [f32; 3],
}

/// The threshold that keeps each harmless group (plain, wrapped, multi-turn)
/// at or under `max_fpr`, and the TPR it gives every family.
pub fn validate(z: &[f32], labels: &Labels, n_families: usize, max_fpr: f32) -> Validation {
    let group = |i: usize| match labels.family[i] {
        PLAIN => 0,
        f if f == labels.multi_turn => 2,
        _ => 1,
    };
    // A score that could not be computed counts as the most harmful-looking
    // harmless score and the least harmful-looking harmful one.
    let harmless = |g: usize| {
        let mut s: Vec<f32> = (0..z.len()).filter(|&i| !labels.harmful[i] && group(i) == g).map(|i| nan_to(z[i], f32::INFINITY)).collect();
        s.sort_by(|a, b| b.total_cmp(a));
        s
    };
    let groups = [harmless(0), harmless(1), harmless(2)];
    let threshold = groups
        .iter()
        .filter(|s| !s.is_empty())
        .map(|s| s[((max_fpr * s.len() as f32).floor() as usize).min(s.len() - 1)])
        .fold(f32::NEG_INFINITY, f32::max);
    let rate = |idx: Vec<usize>| {
        if idx.is_empty() {
            f32::NAN
        } else {
            idx.iter().filter(|&&i| nan_to(z[i], f32::NEG_INFINITY) > threshold).count() as f32 / idx.len() as f32
        }
    };
    let family_tpr: Vec<f32> =
        (0..n_families).map(|f| rate((0..z.len()).filter(|&i| labels.harmful[i] && labels.family[i] == f).collect())).collect();
    let present: Vec<f32> = family_tpr.iter().copied().filter(|t| !t.is_nan()).collect();
    let fpr = [0, 1, 2].map(|g| {
        let s = &groups[g];
        if s.is_empty() { 0.0 } else { s.iter().filter(|&&v| v > threshold).count() as f32 / s.len() as f32 }
    });
    Validation {
        threshold,
        worst_tpr: present.iter().copied().fold(1.0, f32::min),
        mean_tpr: present.iter().sum::<f32>() / present.len().max(1) as f32,
        family_tpr,
        fpr,
    }
}

fn nan_to(x: f32, replacement: f32) -> f32 {
    if x.is_nan() { replacement } else { x }
}

/// The best candidate: the highest worst-family TPR, then the highest mean
/// TPR, then the earlier layer (it gates before more layers have run).
pub fn best<'a, K: Ord + Copy>(candidates: impl IntoIterator<Item = (K, &'a Validation)>) -> Option<K> {
    candidates
        .into_iter()
        .max_by(|(ka, a), (kb, b)| a.worst_tpr.total_cmp(&b.worst_tpr).then(a.mean_tpr.total_cmp(&b.mean_tpr)).then(kb.cmp(ka)))
        .map(|(k, _)| k)
}

/// Layers a gate may sit on: not the last fifth, which encodes the answer more
/// than the request (and whose last layer keeps only output rows).
pub fn candidate_layers(n_layer: usize) -> Vec<usize> {
    let top = ((n_layer * 4) / 5).clamp(1, n_layer.saturating_sub(2).max(1));
    (1..=top).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;

    /// Two layers' worth of toy data: on "lexical" the plain prompts separate
    /// perfectly but wrapping flips the sign of the harmful signal; on "deep"
    /// every prompt separates a little less well but the same way.
    fn toy() -> (Array2<f32>, Array2<f32>, Vec<bool>, Vec<usize>, Vec<usize>, Vec<usize>) {
        let (mut lexical, mut deep) = (Vec::new(), Vec::new());
        let (mut harmful, mut family, mut fold, mut instruction) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for i in 0..80 {
            let (h, k) = (i % 2 == 0, i / 2);
            let sign = if h { 1.0 } else { -1.0 };
            // Each instruction is asked plain and in one wrapper family, held out together.
            let wrapped = 1 + k % 2;
            for fam in [0, wrapped] {
                let noise = ((i * 7 + fam * 3) % 5) as f32 * 0.1;
                let lex = if fam == 0 { 3.0 * sign } else { -sign * (fam as f32) + noise };
                lexical.extend([lex, noise]);
                deep.extend([sign + noise - 0.2, noise]);
                harmful.push(h);
                family.push(fam);
                fold.push(wrapped);
                instruction.push(k);
            }
        }
        let n = harmful.len();
        (Array2::from_shape_vec((n, 2), lexical).unwrap(), Array2::from_shape_vec((n, 2), deep).unwrap(), harmful, family, fold, instruction)
    }

    #[test]
    fn a_layer_perfect_on_training_prompts_loses_to_one_that_holds_on_unseen_families() {
        let (lexical, deep, harmful, family, fold, instruction) = toy();
        let labels = Labels { harmful: &harmful, family: &family, fold: &fold, instruction: &instruction, multi_turn: 99 };
        // Training accuracy on plain prompts alone would pick the lexical layer.
        let plain: Vec<usize> = (0..harmful.len()).filter(|&i| family[i] == 0).collect();
        let fit = Fit::new(lexical.view(), &harmful, |i| family[i] == 0).unwrap();
        assert!(plain.iter().all(|&i| (fit.z(lexical.row(i)) > 3.0) == harmful[i]));

        let v_lex = validate(&out_of_fold(lexical.view(), &labels), &labels, 3, 0.02);
        let v_deep = validate(&out_of_fold(deep.view(), &labels), &labels, 3, 0.02);
        assert!(v_deep.worst_tpr > v_lex.worst_tpr, "{v_deep:?} vs {v_lex:?}");
        assert_eq!(best([(1, &v_lex), (2, &v_deep)]), Some(2));
    }

    #[test]
    fn the_threshold_keeps_every_harmless_group_under_the_allowed_rate() {
        let (_, deep, harmful, family, fold, instruction) = toy();
        let labels = Labels { harmful: &harmful, family: &family, fold: &fold, instruction: &instruction, multi_turn: 2 };
        let z = out_of_fold(deep.view(), &labels);
        for max_fpr in [0.0, 0.05, 0.2] {
            let v = validate(&z, &labels, 3, max_fpr);
            assert!(v.fpr.iter().all(|&f| f <= max_fpr + 1e-6), "{max_fpr}: {v:?}");
        }
    }

    #[test]
    fn candidate_layers_drop_the_last_fifth() {
        assert_eq!(candidate_layers(24), (1..=19).collect::<Vec<_>>());
        assert_eq!(candidate_layers(18), (1..=14).collect::<Vec<_>>());
        assert_eq!(candidate_layers(2), vec![1]);
    }
}
