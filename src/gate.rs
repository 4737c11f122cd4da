//! The guidance gate: is this request harmful? A sum of linear terms on the
//! residual stream, each read at one layer, plus a bias; harmful when positive.
//! A term reads either tokens a fixed distance before the prompt's last (the
//! last token, the user's own last token) or every token of the request, of
//! which it takes the largest projection: a harmful request buried inside a
//! jailbreak template peaks where it is said, wherever that is. In a
//! conversation it also keeps the last user turn's largest projection apart,
//! for a harmless question asked after a harmful turn (see [`Gate::context_floor`]).

use anyhow::{bail, Context, Result};
use ndarray::{Array1, ArrayView1, ArrayView2, Axis};

use crate::vectors::{LayerStats, VectorFile};

/// Which tokens a gate term reads.
#[derive(Clone, Debug, PartialEq)]
pub enum Read {
    /// The tokens this many before the prompt's last (0: the last), each with
    /// its own slice of the weights, in this order.
    Tokens(Vec<usize>),
    /// Every token from the start of the request (where the conversation
    /// leaves the template's opening) to the end of the prompt: the largest
    /// projection counts.
    RequestMax,
}

impl Read {
    /// `tokens` or `request_max`, as files and reports name the read.
    pub fn kind(&self) -> &'static str {
        match self {
            Read::Tokens(_) => "tokens",
            Read::RequestMax => "request_max",
        }
    }
}

/// One linear read of the residual stream at `layer` (`l_out-<layer>`).
#[derive(Clone, Debug, PartialEq)]
pub struct Term {
    pub layer: usize,
    pub read: Read,
    /// `n_embd` weights per token read (one slice for [`Read::RequestMax`]).
    pub weights: Vec<f32>,
}

impl Term {
    /// Weights times the activation `row` of the `k`-th token read.
    pub fn project(&self, k: usize, row: &[f32]) -> f32 {
        let n = row.len();
        self.weights.get(k * n..(k + 1) * n).map_or(f32::NAN, |w| dot(row, w))
    }

    /// Tokens of [`Read::Tokens`] (none for [`Read::RequestMax`]).
    pub fn offsets(&self) -> &[usize] {
        match &self.read {
            Read::Tokens(offsets) => offsets,
            Read::RequestMax => &[],
        }
    }

    /// `12:tokens:5,0` or `12:request_max`, as files and reports write it.
    pub fn describe(&self) -> String {
        match &self.read {
            Read::Tokens(o) => format!("{}:{}", self.part(), o.iter().map(usize::to_string).collect::<Vec<_>>().join(",")),
            Read::RequestMax => self.part(),
        }
    }

    /// `12:tokens` or `12:request_max`: the layer and read, without the tokens.
    pub fn part(&self) -> String {
        format!("{}:{}", self.layer, self.read.kind())
    }

    /// The term [`describe`](Self::describe) wrote, with its weights.
    pub fn parse(text: &str, weights: Vec<f32>, n_embd: usize) -> Result<Term> {
        let bad = || format!("gate term {text:?} is not LAYER:tokens:A,B or LAYER:request_max");
        let mut parts = text.splitn(3, ':');
        let layer: usize = parts.next().and_then(|l| l.parse().ok()).with_context(bad)?;
        let read = match (parts.next(), parts.next()) {
            (Some("request_max"), None) => Read::RequestMax,
            (Some("tokens"), Some(list)) => Read::Tokens(list.split(',').map(|o| o.parse().ok()).collect::<Option<Vec<usize>>>().with_context(bad)?),
            _ => bail!(bad()),
        };
        let reads = match &read {
            Read::Tokens(o) if !o.is_empty() => o.len(),
            Read::Tokens(_) => bail!(bad()),
            Read::RequestMax => 1,
        };
        if weights.len() != reads * n_embd || !weights.iter().all(|w| w.is_finite()) {
            bail!("gate term {text} needs {} finite weights, the file has {}", reads * n_embd, weights.len());
        }
        Ok(Term { layer, read, weights })
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Gate {
    pub terms: Vec<Term>,
    pub bias: f32,
    /// Where a request term finds more in the earlier turns than in the last
    /// user turn, the earlier turns count only when the token terms (the
    /// model at the point of answering) sum above this: "Continue." after a
    /// harmful request does, a new harmless question does not. None: they
    /// always count.
    pub context_floor: Option<f32>,
}

impl Gate {
    /// A gate of one direction read at one token: `a . direction + bias`.
    pub fn single(layer: usize, offset: usize, direction: Vec<f32>, bias: f32) -> Gate {
        Gate { terms: vec![Term { layer, read: Read::Tokens(vec![offset]), weights: direction }], bias, context_floor: None }
    }

    /// The file's calibrated gate; with `layer`, the one-direction gate that
    /// reads the last token at that layer with its `direction.<k>`; `bias`
    /// replaces the calibrated bias.
    pub fn from_file(file: &VectorFile, layer: Option<usize>, bias: Option<f32>) -> Result<Gate> {
        let cal = file.calibration.as_ref();
        let fit = cal.map(|c| &c.gate);
        let mut gate = match (layer, cal) {
            (None, Some(c)) if !c.gate.terms.is_empty() => {
                let bias = c.gate.bias.context("the vector file's gate terms have no bias")?;
                Gate { terms: c.gate.terms.clone(), bias, context_floor: c.gate.context_floor }
            }
            (layer, cal) => {
                let layer = match (layer, cal) {
                    (Some(l), _) => l,
                    (None, Some(c)) => c.gate_layer,
                    (None, None) => bail!("the vector file has no gate calibration; pass --layer and --bias"),
                };
                // The file's own single-direction gate keeps its read position and direction.
                let own = fit.filter(|_| cal.is_some_and(|c| c.gate_layer == layer && c.gate.terms.is_empty()));
                let direction = match own.and_then(|g| g.direction.clone()) {
                    Some(d) => d,
                    None => file.direction(layer)?.to_vec(),
                };
                let layer_bias = cal.and_then(|c| c.layer(layer)).map(|s| s.bias);
                let b = bias.or(layer_bias).with_context(|| format!("the vector file has no calibrated bias for layer {layer}; pass --bias"))?;
                Gate::single(layer, own.map_or(0, |g| g.offset), direction, b)
            }
        };
        if let Some(b) = bias {
            gate.bias = b;
        }
        anyhow::ensure!(gate.bias.is_finite(), "the gate bias must be a finite number");
        Ok(gate)
    }

    /// The layer where the gate decides: its deepest term's.
    pub fn layer(&self) -> usize {
        self.terms.iter().map(|t| t.layer).max().unwrap_or(0)
    }

    /// Layers the gate reads, each once.
    pub fn layers(&self) -> Vec<usize> {
        let mut layers: Vec<usize> = self.terms.iter().map(|t| t.layer).collect();
        layers.sort_unstable();
        layers.dedup();
        layers
    }

    /// Prompt tokens that must be decoded together with the last one: those
    /// the gate reads at a fixed distance before it, and the last.
    pub fn tail(&self) -> usize {
        self.terms.iter().flat_map(|t| t.offsets().iter()).max().map_or(1, |&o| o + 1)
    }

    /// Whether a term reads every token of the request.
    pub fn reads_request(&self) -> bool {
        self.terms.iter().any(|t| t.read == Read::RequestMax)
    }

    /// `terms` in the form [`Term::describe`] gives, `;`-separated.
    pub fn describe(&self) -> String {
        self.terms.iter().map(Term::describe).collect::<Vec<_>>().join(";")
    }

    /// The score from each term's value over the whole conversation
    /// (`whole`) and, for request terms, over the last user turn alone
    /// (`last_turn`); a value never read (-inf) or failed (NaN) makes it NaN.
    pub fn score(&self, whole: &[f32], last_turn: &[f32]) -> f32 {
        if self.terms.len() != whole.len() || self.terms.len() != last_turn.len() {
            return f32::NAN;
        }
        let read = |v: f32| if v == f32::NEG_INFINITY { f32::NAN } else { v };
        // The values of the request terms (`request`) or of the token terms.
        let sum = |values: &[f32], request: bool| -> f32 {
            self.terms.iter().zip(values).filter(|(t, _)| (t.read == Read::RequestMax) == request).map(|(_, &v)| read(v)).sum()
        };
        let tokens = sum(whole, false);
        let reads_context = self.context_floor.is_none_or(|floor| tokens.is_nan() || tokens > floor);
        let request = sum(whole, true);
        let request = if reads_context || request.is_nan() { request } else { sum(last_turn, true) };
        tokens + request + self.bias
    }

    /// The score of a one-direction gate ([`Gate::single`]) on the activation
    /// it reads; NaN (harmful) for a gate of more terms.
    pub fn score_single(&self, activation: &[f32]) -> f32 {
        match self.terms.as_slice() {
            [t] if t.offsets().len() == 1 => t.project(0, activation) + self.bias,
            _ => f32::NAN,
        }
    }

    /// A score the gate could not compute (NaN, an overflow to either
    /// infinity) is harmful, never harmless.
    pub fn is_harmful(score: f32) -> bool {
        !(score.is_finite() && score <= 0.0)
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

/// The unit mean difference of two sets of rows, and its length before normalising.
pub fn mean_difference(a: &ArrayView2<f32>, b: &ArrayView2<f32>) -> (Array1<f32>, f32) {
    let mean = |a: &ArrayView2<f32>| a.mean_axis(Axis(0)).expect("at least one row per set");
    let d = mean(a) - mean(b);
    let norm = d.dot(&d).sqrt();
    (if norm > 0.0 { &d / norm } else { d }, norm)
}

/// The safety-related vector of a layer (mean difference, harmful minus
/// harmless), normalised, with the gate bias fitted on the training prompts
/// and the gate's rates on the held-out ones.
pub fn fit_layer(layer: usize, acts: &LayerActs) -> (Vec<f32>, LayerStats) {
    let (unit, srv_norm) = mean_difference(&acts.harmful_train, &acts.harmless_train);

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
    fn earlier_turns_count_only_when_the_token_terms_clear_the_floor() {
        let tokens = Term { layer: 1, read: Read::Tokens(vec![0]), weights: vec![1.0] };
        let request = Term { layer: 2, read: Read::RequestMax, weights: vec![1.0] };
        let mut gate = Gate { terms: vec![tokens, request], bias: -5.0, context_floor: Some(-1.0) };
        // Harm in an earlier turn (6 over the whole conversation, 1 in the last turn).
        assert_eq!(gate.score(&[0.5, 6.0], &[0.5, 1.0]), 1.5, "the model answers it: the whole conversation counts");
        assert_eq!(gate.score(&[-2.0, 6.0], &[-2.0, 1.0]), -6.0, "a new question: the last turn alone counts");
        assert!(Gate::is_harmful(gate.score(&[f32::NAN, 6.0], &[f32::NAN, 1.0])), "a failed read is harmful");
        assert!(gate.score(&[-2.0, f32::NEG_INFINITY], &[-2.0, 1.0]).is_nan(), "a term never read is NaN");
        assert!(gate.score(&[-2.0, 6.0], &[-2.0]).is_nan());
        gate.context_floor = None;
        assert_eq!(gate.score(&[-2.0, 6.0], &[-2.0, 1.0]), -1.0, "without a floor every turn counts");
    }

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
