//! The guidance gate: is this request harmful? A linear test on the last
//! prompt token's activation at one layer, `a . s_hat + b > 0`.

use anyhow::{Context, Result};
use ndarray::{ArrayView1, ArrayView2, Axis};

use crate::vectors::{LayerStats, VectorFile};

#[derive(Clone, Debug)]
pub struct Gate {
    pub layer: usize,
    /// Tokens before the prompt's last that the gate reads (0: the last).
    pub offset: usize,
    /// Unit safety-related direction at `layer`.
    pub direction: Vec<f32>,
    pub bias: f32,
}

impl Gate {
    /// The file's calibrated gate, optionally at another layer (which reads
    /// the last token with that layer's `direction.<k>`) or with another bias.
    pub fn from_file(file: &VectorFile, layer: Option<usize>, bias: Option<f32>) -> Result<Gate> {
        let cal = file.calibration.as_ref();
        let layer = match (layer, cal) {
            (Some(l), _) => l,
            (None, Some(cal)) => cal.gate_layer,
            (None, None) => anyhow::bail!("the vector file has no gate calibration; pass --layer and --bias"),
        };
        let own = cal.filter(|c| c.gate_layer == layer).map(|c| &c.gate);
        let offset = own.map_or(0, |g| g.offset);
        let direction = match own.and_then(|g| g.direction.clone()) {
            Some(d) => d,
            None => file.direction(layer)?.to_vec(),
        };
        let bias = match bias {
            Some(b) => b,
            None => {
                cal.and_then(|c| c.layer(layer)).map(|s| s.bias).with_context(|| {
                    format!("the vector file has no calibrated bias for layer {layer}; pass --bias")
                })?
            }
        };
        anyhow::ensure!(bias.is_finite(), "the gate bias must be a finite number");
        Ok(Gate { layer, offset, direction, bias })
    }

    pub fn score(&self, activation: &[f32]) -> f32 {
        dot(activation, &self.direction) + self.bias
    }

    pub fn is_harmful(score: f32) -> bool {
        score > 0.0
    }
}

pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Rates {
    pub accuracy: f32,
    pub tpr: f32,
    pub fpr: f32,
}

/// Rates of `score > 0` as "harmful" on labelled scores.
pub fn rates(harmful_scores: &[f32], harmless_scores: &[f32]) -> Rates {
    let flagged = |s: &[f32]| s.iter().filter(|&&x| Gate::is_harmful(x)).count() as f32;
    let tp = flagged(harmful_scores);
    let fp = flagged(harmless_scores);
    let (np, nn) = (harmful_scores.len() as f32, harmless_scores.len() as f32);
    Rates {
        accuracy: (tp + nn - fp) / (np + nn).max(1.0),
        tpr: tp / np.max(1.0),
        fpr: fp / nn.max(1.0),
    }
}

/// Each row's projection on `direction`.
pub fn project(acts: ArrayView2<f32>, direction: ArrayView1<f32>) -> Vec<f32> {
    acts.dot(&direction).to_vec()
}

/// Activations of one layer, `[prompt, n_embd]`, by class and split.
pub struct LayerActs<'a> {
    pub harmful_train: ArrayView2<'a, f32>,
    pub harmless_train: ArrayView2<'a, f32>,
    pub harmful_held: ArrayView2<'a, f32>,
    pub harmless_held: ArrayView2<'a, f32>,
}

/// The safety-related vector of a layer (mean difference, harmful minus
/// harmless), normalised, with the gate bias fitted on the training prompts
/// and the gate's rates on the held-out ones.
pub fn fit_layer(layer: usize, acts: &LayerActs) -> (Vec<f32>, LayerStats) {
    let mean = |a: &ArrayView2<f32>| a.mean_axis(Axis(0)).expect("at least one training prompt per class");
    let srv = mean(&acts.harmful_train) - mean(&acts.harmless_train);
    let srv_norm = srv.dot(&srv).sqrt();
    let unit = if srv_norm > 0.0 { &srv / srv_norm } else { srv.clone() };

    let train_proj: Vec<f32> = [&acts.harmful_train, &acts.harmless_train]
        .iter()
        .flat_map(|a| project(a.view(), unit.view()))
        .collect();
    let bias = -train_proj.iter().sum::<f32>() / train_proj.len() as f32;
    let score = |a: &ArrayView2<f32>| project(a.view(), unit.view()).iter().map(|p| p + bias).collect::<Vec<_>>();
    let held = rates(&score(&acts.harmful_held), &score(&acts.harmless_held));

    let norms = |a: &ArrayView2<f32>| a.rows().into_iter().map(|r| r.dot(&r).sqrt()).collect::<Vec<_>>();
    let all_norms: Vec<f32> = [norms(&acts.harmful_train), norms(&acts.harmless_train)].concat();
    let mean_norm = all_norms.iter().sum::<f32>() / all_norms.len() as f32;

    let stats = LayerStats {
        layer,
        bias,
        accuracy: held.accuracy,
        tpr: held.tpr,
        fpr: held.fpr,
        srv_norm,
        mean_norm,
        worst_tpr: f32::NAN,
    };
    (unit.to_vec(), stats)
}

/// Share of labelled prompts whose decision is right and survives any change of
/// the activation of L2 norm up to `rho`. The direction is a unit vector, so a
/// perturbation moves the score by at most its norm: the decision is certified
/// when the score is on the right side by more than `rho`.
pub fn robust_accuracy(harmful_proj: &[f32], harmless_proj: &[f32], bias: f32, rho: f32) -> f32 {
    let right = harmful_proj.iter().filter(|&&p| p + bias > rho).count()
        + harmless_proj.iter().filter(|&&p| p + bias < -rho).count();
    right as f32 / (harmful_proj.len() + harmless_proj.len()).max(1) as f32
}

/// The bias that certifies the most decisions at `rho`, in the middle of the
/// widest interval of such biases (the most slack on both sides).
pub fn robust_bias(harmful_proj: &[f32], harmless_proj: &[f32], rho: f32) -> f32 {
    // Robust accuracy only changes where a harmful prompt's score reaches +rho
    // (b = rho - p) or a harmless one's reaches -rho (b = -rho - p).
    let mut cuts: Vec<f32> = harmful_proj.iter().map(|p| rho - p).chain(harmless_proj.iter().map(|p| -rho - p)).collect();
    cuts.sort_by(f32::total_cmp);
    cuts.dedup();
    let Some((&first, &last)) = cuts.first().zip(cuts.last()) else { return 0.0 };
    let mut best = (robust_accuracy(harmful_proj, harmless_proj, first - 1.0, rho), 0.0, first - 1.0);
    let bounded = cuts.windows(2).map(|w| (w[1] - w[0], 0.5 * (w[0] + w[1])));
    for (width, bias) in bounded.chain([(0.0, last + 1.0)]) {
        let candidate = (robust_accuracy(harmful_proj, harmless_proj, bias, rho), width, bias);
        if candidate.0 > best.0 || (candidate.0 == best.0 && candidate.1 > best.1) {
            best = candidate;
        }
    }
    best.2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn robust_bias_centres_the_widest_certified_gap() {
        let (harmful, harmless) = ([3.0, 4.0], [-1.0, 0.0]);
        // Accuracy is certified at rho = 1 for b in (-2, -1): the middle is -1.5.
        assert_eq!(robust_bias(&harmful, &harmless, 1.0), -1.5);
        assert_eq!(robust_accuracy(&harmful, &harmless, -1.5, 1.0), 1.0);
        assert_eq!(robust_accuracy(&harmful, &harmless, -1.5, 1.6), 0.5);
        assert_eq!(robust_accuracy(&harmful, &harmless, -1.5, 2.6), 0.0);
    }
}
