//! Choosing the gate by validation, never by training accuracy: for each
//! candidate part (a layer and what it reads there), every fold (a wrapper
//! family, with the instructions it holds) is scored by a probe fitted
//! without it. Parts are summed on one scale; the threshold is the high
//! quantile of the held-out harmless scores, and the candidate whose worst
//! held-out family is flagged most often wins.

use std::collections::{BTreeSet, HashSet};

use half::bf16;
use half::slice::HalfFloatSliceExt;
use ndarray::{Array1, Array2, ArrayView1, ArrayView2, Axis};

use crate::probe::logistic_direction;
use crate::trainset::{asked_plain, PLAIN};

/// What cross-validation needs to know about each example.
pub struct Labels<'a> {
    pub harmful: &'a [bool],
    pub family: &'a [usize],
    pub fold: &'a [usize],
    pub instruction: &'a [usize],
    /// Family index of multi-turn examples (their harmless FPR is bounded on its own).
    pub multi_turn: usize,
    /// Family index of the built-in questions: plain requests, bounded with the plain group.
    pub question: Option<usize>,
}

/// What one part of a gate reads from each example, and how a probe on it is
/// fitted and scored.
pub trait Part {
    /// A unit direction from the examples where `train` holds.
    fn fit(&self, harmful: &[bool], train: &dyn Fn(usize) -> bool) -> Option<Array1<f32>>;
    /// Example `i`'s score on `direction`.
    fn score(&self, direction: ArrayView1<f32>, i: usize) -> f32;
}

/// One activation row per example (several read tokens side by side).
pub struct Rows(pub Array2<f32>);

impl Part for Rows {
    fn fit(&self, harmful: &[bool], train: &dyn Fn(usize) -> bool) -> Option<Array1<f32>> {
        let idx: Vec<usize> = (0..self.0.nrows()).filter(|&i| train(i)).collect();
        let labels: Vec<bool> = idx.iter().map(|&i| harmful[i]).collect();
        logistic_direction(self.0.select(Axis(0), &idx), &labels)
    }

    fn score(&self, direction: ArrayView1<f32>, i: usize) -> f32 {
        self.0.row(i).dot(&direction)
    }
}

/// Every token of each example's request, scored by its largest projection.
/// The probe learns from tokens: the last [`REQUEST_END_TOKENS`] of a harmful
/// instruction are harmful; every token of a harmless example, and the
/// wrapper's tokens before a harmful instruction, are not (tokens after it
/// are left out: they may still carry it).
pub struct RequestTokens<'a> {
    /// `[token, n_embd]` of every example, consecutive (as captured, in bfloat16).
    pub acts: ArrayView2<'a, bf16>,
    /// Each example's rows in `acts`.
    pub rows: &'a [std::ops::Range<usize>],
    /// Each example's instruction, as rows of `acts`.
    pub instruction: &'a [std::ops::Range<usize>],
}

/// Tokens at the end of a harmful instruction that the token probe takes as harmful.
pub const REQUEST_END_TOKENS: usize = 2;

impl Part for RequestTokens<'_> {
    fn fit(&self, harmful: &[bool], train: &dyn Fn(usize) -> bool) -> Option<Array1<f32>> {
        let (mut idx, mut labels) = (Vec::new(), Vec::new());
        for i in (0..self.rows.len()).filter(|&i| train(i)) {
            let (rows, ins) = (&self.rows[i], &self.instruction[i]);
            if harmful[i] {
                let end = ins.end.clamp(rows.start, rows.end);
                let positive = end.saturating_sub(REQUEST_END_TOKENS).max(rows.start)..end;
                let before = rows.start..ins.start.clamp(rows.start, end);
                labels.extend(std::iter::repeat_n(true, positive.len()).chain(std::iter::repeat_n(false, before.len())));
                idx.extend(positive.chain(before));
            } else {
                labels.extend(std::iter::repeat_n(false, rows.len()));
                idx.extend(rows.clone());
            }
        }
        let mut x = Array2::zeros((idx.len(), self.acts.ncols()));
        for (mut to, &i) in x.rows_mut().into_iter().zip(&idx) {
            self.row(i, to.as_slice_mut().expect("a fresh array's rows are contiguous"));
        }
        logistic_direction(x, &labels)
    }

    fn score(&self, direction: ArrayView1<f32>, i: usize) -> f32 {
        let mut row = vec![0.0; self.acts.ncols()];
        self.rows[i].clone().fold(f32::NAN, |best, t| {
            self.row(t, &mut row);
            best.max(ArrayView1::from(&row[..]).dot(&direction))
        })
    }
}

impl RequestTokens<'_> {
    /// Token row `t` of `acts`, in single precision.
    fn row(&self, t: usize, out: &mut [f32]) {
        let row = self.acts.row(t);
        match row.as_slice() {
            Some(half) => half.convert_to_f32_slice(out),
            None => out.iter_mut().zip(row).for_each(|(o, h)| *o = h.to_f32()),
        }
    }
}

/// A probe's direction and the harmless training scores' mean and spread,
/// which put scores of different fits (and parts) on one scale.
pub struct Fit {
    pub direction: Array1<f32>,
    pub centre: f32,
    pub scale: f32,
}

impl Fit {
    /// Fits `part` on the examples where `train` holds; needs both classes.
    pub fn new(part: &dyn Part, harmful: &[bool], train: impl Fn(usize) -> bool) -> Option<Fit> {
        let direction = part.fit(harmful, &train)?;
        let neg: Vec<f32> = (0..harmful.len()).filter(|&i| train(i) && !harmful[i]).map(|i| part.score(direction.view(), i)).collect();
        let centre = neg.iter().sum::<f32>() / neg.len() as f32;
        let var = neg.iter().map(|p| (p - centre).powi(2)).sum::<f32>() / neg.len() as f32;
        Some(Fit { direction, centre, scale: var.sqrt().max(1e-6) })
    }

    /// Example `i`'s score in harmless standard deviations above the harmless mean.
    pub fn z(&self, part: &dyn Part, i: usize) -> f32 {
        (part.score(self.direction.view(), i) - self.centre) / self.scale
    }
}

/// Out-of-fold scores: each example scored by a fit that saw neither its fold
/// nor any example asking the same instruction.
pub fn out_of_fold(part: &dyn Part, labels: &Labels) -> Vec<f32> {
    let n = labels.harmful.len();
    let mut z = vec![f32::NAN; n];
    let folds: BTreeSet<usize> = labels.fold.iter().copied().collect();
    for f in folds {
        let held: Vec<usize> = (0..n).filter(|&i| labels.fold[i] == f).collect();
        let asked: HashSet<(bool, usize)> = held.iter().map(|&i| (labels.harmful[i], labels.instruction[i])).collect();
        // Parts may hold more examples than are labelled (held-out prompts): never train on those.
        let train = |i: usize| i < n && labels.fold[i] != f && !asked.contains(&(labels.harmful[i], labels.instruction[i]));
        if let Some(fit) = Fit::new(part, labels.harmful, train) {
            for &i in &held {
                z[i] = fit.z(part, i);
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

impl Validation {
    /// TPR on plain requests; NaN where there are none.
    pub fn plain_tpr(&self) -> f32 {
        self.family_tpr.get(PLAIN).copied().unwrap_or(f32::NAN)
    }
}

/// The threshold that keeps each harmless group (plain, wrapped, multi-turn)
/// at or under `max_fpr`, and the TPR it gives every family.
pub fn validate(z: &[f32], labels: &Labels, n_families: usize, max_fpr: f32) -> Validation {
    let group = |i: usize| match labels.family[i] {
        f if asked_plain(f, labels.question) => 0,
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
    let threshold = groups.iter().filter(|s| !s.is_empty()).map(|s| allowed_top(s, max_fpr)).fold(f32::NEG_INFINITY, f32::max);
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

/// The score that at most `max_fpr` of `descending` (sorted highest first,
/// not empty) exceed.
pub fn allowed_top(descending: &[f32], max_fpr: f32) -> f32 {
    descending[((max_fpr * descending.len() as f32).floor() as usize).min(descending.len() - 1)]
}

fn nan_to(x: f32, replacement: f32) -> f32 {
    if x.is_nan() { replacement } else { x }
}

/// Cross-validated TPR on plain requests a gate must keep before its worst
/// family counts. With about 11 prompts per family the worst family is
/// noisy: a 64 + 64 extraction from AdvBench 64-127 chose a request-only
/// gate whose worst family led the next candidate's by 26 points and that missed 1 plain
/// order in 16. Plain orders are what a gate sees most and its target is
/// 99%; 97% leaves one miss of 64 for fold noise.
pub const PLAIN_TPR_FLOOR: f32 = 0.97;

/// Candidates best first: those that keep [`PLAIN_TPR_FLOOR`], then the
/// highest worst-family TPR, then the highest mean TPR, then the smaller key
/// (a gate that decides at an earlier layer, before more layers have run).
pub fn ranked<'a, K: Ord + Copy>(candidates: impl IntoIterator<Item = (K, &'a Validation)>) -> Vec<(K, &'a Validation)> {
    let keeps_plain = |v: &Validation| v.plain_tpr() >= PLAIN_TPR_FLOOR;
    let mut all: Vec<(K, &Validation)> = candidates.into_iter().collect();
    all.sort_by(|(ka, a), (kb, b)| {
        keeps_plain(b).cmp(&keeps_plain(a)).then(b.worst_tpr.total_cmp(&a.worst_tpr)).then(b.mean_tpr.total_cmp(&a.mean_tpr)).then(ka.cmp(kb))
    });
    all
}

/// Layers a gate may sit on: not the last fifth, which encodes the answer more
/// than the request (and whose last layer keeps only output rows).
pub fn candidate_layers(n_layer: usize) -> Vec<usize> {
    let top = ((n_layer * 4) / 5).clamp(1, n_layer.saturating_sub(2).max(1));
    (1..=top).collect()
}

/// Layers the request part may read: 40%, 50% and 60% of the depth, where
/// harmfulness (not yet the answer) is encoded; per-token captures are large,
/// so only these few.
pub fn request_layers(n_layer: usize) -> Vec<usize> {
    let mut layers: Vec<usize> = [4, 5, 6].iter().map(|t| ((n_layer * t + 5) / 10).clamp(1, n_layer.saturating_sub(2).max(1))).collect();
    layers.dedup();
    layers
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
        let labels = Labels { harmful: &harmful, family: &family, fold: &fold, instruction: &instruction, multi_turn: 99, question: None };
        // Training accuracy on plain prompts alone would pick the lexical layer.
        let plain: Vec<usize> = (0..harmful.len()).filter(|&i| family[i] == 0).collect();
        let fit = Fit::new(&Rows(lexical.clone()), &harmful, |i| family[i] == 0).unwrap();
        assert!(plain.iter().all(|&i| (fit.z(&Rows(lexical.clone()), i) > 3.0) == harmful[i]));

        let v_lex = validate(&out_of_fold(&Rows(lexical.clone()), &labels), &labels, 3, 0.02);
        let v_deep = validate(&out_of_fold(&Rows(deep.clone()), &labels), &labels, 3, 0.02);
        assert!(v_deep.worst_tpr > v_lex.worst_tpr, "{v_deep:?} vs {v_lex:?}");
        assert_eq!(ranked([(1, &v_lex), (2, &v_deep)]).first().map(|c| c.0), Some(2));
    }

    #[test]
    fn a_gate_that_loses_plain_orders_ranks_after_one_that_keeps_them_whatever_its_worst_family() {
        let validation = |plain: f32, worst: f32| Validation {
            threshold: 0.0,
            family_tpr: vec![plain, worst, 1.0],
            worst_tpr: plain.min(worst),
            mean_tpr: (plain + worst + 1.0) / 3.0,
            fpr: [0.02; 3],
        };
        let (request_only, two_part, weaker) = (validation(0.938, 0.636), validation(1.0, 0.364), validation(0.99, 0.30));
        let order: Vec<u8> = ranked([(1, &request_only), (2, &two_part), (3, &weaker)]).iter().map(|c| c.0).collect();
        assert_eq!(order, [2, 3, 1]);
        // Among gates under the floor alike, the worst family still decides.
        let lower = validation(0.9, 0.2);
        assert_eq!(ranked([(1, &lower), (2, &request_only)]).first().map(|c| c.0), Some(2));
    }

    #[test]
    fn the_threshold_keeps_every_harmless_group_under_the_allowed_rate() {
        let (_, deep, harmful, family, fold, instruction) = toy();
        let labels = Labels { harmful: &harmful, family: &family, fold: &fold, instruction: &instruction, multi_turn: 2, question: None };
        let z = out_of_fold(&Rows(deep.clone()), &labels);
        for max_fpr in [0.0, 0.05, 0.2] {
            let v = validate(&z, &labels, 3, max_fpr);
            assert!(v.fpr.iter().all(|&f| f <= max_fpr + 1e-6), "{max_fpr}: {v:?}");
        }
    }

    #[test]
    fn the_request_part_finds_an_instruction_a_template_goes_on_after() {
        // Each example: 6 tokens in 2-D. A harmful instruction ends at token 2
        // with a spike on dimension 0; the template then goes on, so its last
        // token looks like any harmless one.
        let (mut acts, mut rows, mut instruction, mut harmful) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for i in 0..60 {
            let h = i % 2 == 0;
            let start = rows.len() * 6;
            for t in 0..6 {
                let jitter = ((i * 5 + t * 3) % 7) as f32 * 0.05;
                let spike = if h && t == 2 { 2.0 } else { 0.0 };
                acts.extend([spike + jitter, 1.0 - jitter]);
            }
            rows.push(start..start + 6);
            instruction.push(start + 1..start + 3);
            harmful.push(h);
        }
        let acts = Array2::from_shape_vec((360, 2), acts).unwrap().mapv(bf16::from_f32);
        let part = RequestTokens { acts: acts.view(), rows: &rows, instruction: &instruction };
        let fit = Fit::new(&part, &harmful, |_| true).unwrap();
        assert!(fit.direction[0] > 0.9, "{:?}", fit.direction);
        assert!((0..60).all(|i| (fit.z(&part, i) > 3.0) == harmful[i]));
        let last_tokens = Array2::from_shape_fn((60, 2), |(i, d)| acts[[rows[i].end - 1, d]].to_f32());
        let last = Fit::new(&Rows(last_tokens.clone()), &harmful, |_| true);
        assert!(last.is_none_or(|f| (0..60).any(|i| (f.z(&Rows(last_tokens.clone()), i) > 3.0) != harmful[i])));
    }

    #[test]
    fn candidate_layers_drop_the_last_fifth() {
        assert_eq!(candidate_layers(24), (1..=19).collect::<Vec<_>>());
        assert_eq!(candidate_layers(18), (1..=14).collect::<Vec<_>>());
        assert_eq!(candidate_layers(2), vec![1]);
        assert_eq!(request_layers(24), vec![10, 12, 14]);
        assert_eq!(request_layers(18), vec![7, 9, 11]);
    }
}
