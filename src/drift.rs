//! Harmful embedding drift (the Vaccine paper's measure): how far a fine-tune's
//! hidden states moved from its aligned parent's on the same tokens, layer by
//! layer, and how much of that move lies along the parent's safety direction.

use ndarray::{ArrayView2, ArrayView3, Axis};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::gate::Gate;
use crate::vectors::VectorFile;

/// Random unit directions each layer's drift is also projected on, as a baseline
/// for the share along the safety direction.
const RANDOM_DIRECTIONS: usize = 64;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LayerDrift {
    pub layer: usize,
    /// Mean over prompts of |target - aligned|.
    pub mean_l2: f64,
    /// The largest |target - aligned| over prompts.
    pub max_l2: f64,
    /// mean_l2 over the mean |aligned|.
    pub relative: f64,
    /// Mean cosine similarity of the aligned and target activations.
    pub cosine: f64,
    /// Mean of (target - aligned) . theta_l: negative is a move towards "harmless".
    pub along_safety: f64,
    /// Share of the drift's length along theta_l: sqrt(sum (d . theta)^2 / sum |d|^2).
    pub safety_share: f64,
    /// The same share along the most-drifted of 64 seeded random unit directions.
    pub random_share_max: f64,
}

/// How the aligned model's one-direction gate (its safety direction on the
/// last token at the gate layer) scores move on the target.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GateShift {
    pub layer: usize,
    pub mean_score_aligned: f64,
    pub mean_score_target: f64,
    /// Prompts flagged on the aligned model and not on the target.
    pub flipped_to_harmless: usize,
    /// Prompts flagged on the target and not on the aligned model.
    pub flipped_to_harmful: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Drift {
    pub prompts: usize,
    pub layers: Vec<LayerDrift>,
    /// None when the vector file has no calibrated gate.
    pub gate: Option<GateShift>,
    /// Vaccine's summary: the sum over layers and prompts of |target - aligned|^2.
    pub sum_squared: f64,
}

impl Drift {
    pub fn layer(&self, layer: usize) -> Option<&LayerDrift> {
        self.layers.iter().find(|d| d.layer == layer)
    }
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

fn row<'a>(acts: &'a ArrayView2<f32>, i: usize) -> &'a [f32] {
    acts.row(i).to_slice().expect("activation rows are contiguous")
}

fn random_unit(rng: &mut impl Rng, n: usize) -> Vec<f32> {
    let v: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.into_iter().map(|x| x / norm).collect()
}

/// Drift between last-token activations `[prompt, layer, n_embd]` of the
/// aligned model and the target on the same tokens, at `layers` (each must
/// have a direction in `vectors`), with `gate` (from `vectors`) scored on both.
pub fn measure(aligned: ArrayView3<f32>, target: ArrayView3<f32>, layers: &[usize], vectors: &VectorFile, gate: Option<&Gate>) -> anyhow::Result<Drift> {
    anyhow::ensure!(aligned.shape() == target.shape(), "activation shapes differ: {:?} vs {:?}", aligned.shape(), target.shape());
    let n_prompts = aligned.len_of(Axis(0));
    anyhow::ensure!(n_prompts > 0, "no prompts to measure drift on");
    let n_embd = aligned.len_of(Axis(2));
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let randoms: Vec<Vec<f32>> = (0..RANDOM_DIRECTIONS).map(|_| random_unit(&mut rng, n_embd)).collect();
    let mut sum_squared = 0.0;
    let mut out = Vec::new();
    for &layer in layers {
        let theta = vectors.direction(layer)?;
        let (a, t) = (aligned.index_axis(Axis(1), layer), target.index_axis(Axis(1), layer));
        let drift = &t - &a;
        let drift = drift.view();
        let (mut l2, mut max_l2, mut norm_a, mut cosine, mut along, mut along_sq, mut squared) = (0.0, 0.0f64, 0.0, 0.0, 0.0, 0.0, 0.0);
        let mut random_sq = vec![0.0; randoms.len()];
        for i in 0..n_prompts {
            let (ai, ti, di) = (row(&a, i), row(&t, i), row(&drift, i));
            let d2 = dot(di, di);
            let (na, nt) = (dot(ai, ai).sqrt(), dot(ti, ti).sqrt());
            l2 += d2.sqrt();
            max_l2 = max_l2.max(d2.sqrt());
            squared += d2;
            norm_a += na;
            cosine += if na > 0.0 && nt > 0.0 { dot(ai, ti) / (na * nt) } else { 1.0 };
            let p = dot(di, theta);
            along += p;
            along_sq += p * p;
            for (acc, r) in random_sq.iter_mut().zip(&randoms) {
                *acc += dot(di, r).powi(2);
            }
        }
        let n = n_prompts as f64;
        let share = |sq: f64| if squared > 0.0 { (sq / squared).sqrt() } else { 0.0 };
        sum_squared += squared;
        out.push(LayerDrift {
            layer,
            mean_l2: l2 / n,
            max_l2,
            relative: if norm_a > 0.0 { l2 / norm_a } else { 0.0 },
            cosine: cosine / n,
            along_safety: along / n,
            safety_share: share(along_sq),
            random_share_max: random_sq.iter().copied().map(share).fold(0.0, f64::max),
        });
    }
    let gate = gate.map(|gate| {
        let scores = |acts: &ArrayView3<f32>| -> Vec<f32> {
            let at = acts.index_axis(Axis(1), gate.layer());
            (0..n_prompts).map(|i| gate.score_single(row(&at, i))).collect()
        };
        let (sa, st) = (scores(&aligned), scores(&target));
        let mean = |s: &[f32]| s.iter().map(|&x| x as f64).sum::<f64>() / n_prompts as f64;
        let flips = |from: &[f32], to: &[f32]| from.iter().zip(to).filter(|(&f, &t)| Gate::is_harmful(f) && !Gate::is_harmful(t)).count();
        GateShift {
            layer: gate.layer(),
            mean_score_aligned: mean(&sa),
            mean_score_target: mean(&st),
            flipped_to_harmless: flips(&sa, &st),
            flipped_to_harmful: flips(&st, &sa),
        }
    });
    Ok(Drift { prompts: n_prompts, layers: out, gate, sum_squared })
}
