//! Extraction: last-token activations of harmful and harmless prompts →
//! per-layer safety-related vectors, gate biases and the gate layer.

use std::collections::BTreeMap;
use std::io::Read;
use std::ops::Range;
use std::path::Path;

use anyhow::{Context as _, Result};
use indicatif::ProgressBar;
use ndarray::{Array2, Array3, Axis};
use sha2::{Digest, Sha256};

use crate::capture::{capture_prompts, Captured, DecodeStats, RequestCapture};
use crate::crossval::{self, candidate_layers, ranked, request_layers, validate, Fit, Labels, Part, RequestTokens, Rows, Validation};
use crate::gate::{fit_layer, mean_difference, rates, LayerActs, Read as GateRead, Term};
use crate::llama::{ContextParams, Model};
use crate::openers;
use crate::prompts::{prepare, request_start, Template};
use crate::trainset::{Recipe, Templated, TrainSet, PLAIN};
use crate::vectors::{Calibration, DataIdentity, DataSet, GateFit, LayerStats, ModelIdentity, VectorFile};
use crate::wrappers::Wrappers;

/// Prompts of one class, split into training and held-out calibration sets.
pub struct Labelled {
    pub train: Vec<String>,
    pub held_out: Vec<String>,
}

/// How the gate is fitted.
#[derive(Clone, Copy, Debug)]
pub struct FitOptions {
    pub recipe: Recipe,
    /// Highest false-positive rate allowed on each group of harmless prompts
    /// held out in cross-validation (plain, wrapped, multi-turn).
    pub max_fpr: f32,
}

impl Default for FitOptions {
    fn default() -> FitOptions {
        FitOptions { recipe: Recipe::default(), max_fpr: 0.02 }
    }
}

pub struct Extraction {
    pub directions: BTreeMap<usize, Vec<f32>>,
    /// Unit refusal-minus-compliance directions, the ones the shift adds.
    pub steering: BTreeMap<usize, Vec<f32>>,
    pub layers: Vec<LayerStats>,
    pub gate_layer: usize,
    pub gate: GateFit,
    /// The best [`RANKED`] candidate gates, the chosen one first: how close the others came.
    pub ranked: Vec<Candidate>,
    pub stats: DecodeStats,
}

/// Candidate gates `extract` reports.
pub const RANKED: usize = 5;

/// A candidate gate and its cross-validated figures.
pub struct Candidate {
    pub terms: String,
    pub validation: Validation,
}

/// Layers that can carry a control vector: llama.cpp never applies one at layer 0.
pub fn steerable_layers(model: &Model) -> Vec<usize> {
    (1..model.n_layer()).collect()
}

/// One part of a candidate gate: the last-token rows at a layer, or the
/// request's tokens at a layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum PartKey {
    Rows(usize),
    Request(usize),
}

impl PartKey {
    /// What the gate term of this part reads: `offsets` before the last token, or the request.
    fn read(self, offsets: &[usize]) -> GateRead {
        match self {
            PartKey::Rows(_) => GateRead::Tokens(offsets.to_vec()),
            PartKey::Request(_) => GateRead::RequestMax,
        }
    }
}

/// Decodes every prompt once (training prompts plain, wrapped and in
/// conversations; held-out prompts plain; each training instruction also
/// answered with a refusal and a compliance opener), fits per layer the
/// harmful-minus-harmless direction on the plain training prompts and the
/// refusal-minus-compliance direction the shift adds, and chooses the gate by cross-validation
/// over held-out families: probes on the last tokens (the last prompt token
/// and the user's own last token, side by side) at each candidate layer, on
/// every request token at a few middle layers, and sums of one of each.
pub fn extract(
    model: &Model,
    template: &Template,
    harmful: &Labelled,
    harmless: &Labelled,
    wrappers: &Wrappers,
    options: FitOptions,
    params: &ContextParams,
    progress: &ProgressBar,
) -> Result<Extraction> {
    let set = TrainSet::build(&harmful.train, &harmless.train, wrappers, options.recipe);
    let templated = set.tokens(model, template, params.n_ctx as usize)?;
    let (tokens, layout) = all_prompts(model, template, &templated, harmful, harmless, params.n_ctx as usize)?;
    let header = template.user_header(model)?;
    // The answered instructions feed only the steering direction, so no request token of theirs is kept.
    let starts: Vec<usize> = tokens.iter().enumerate().map(|(i, t)| if i < layout.n_prompts { request_start(t, &header) } else { t.len() }).collect();
    // The last token, and the last token of the user's own text (before the
    // end of turn and the assistant header), side by side.
    let offsets: Vec<usize> = std::iter::once(0).chain(template.post_instruction_len(model)?.filter(|&n| n > 0)).collect();
    let layers = steerable_layers(model);
    let request_layers = request_layers(model.n_layer());
    let request = RequestCapture { starts: &starts, layers: &request_layers };
    let captured = capture_prompts(model, params, &tokens, &offsets, &layers, Some(request), progress)?;
    let Directions { gate: directions, steering, stats: mut fitted } = fit_directions(&captured.acts, &layers, &layout, &set, offsets.len());

    let features = Features::new(model, &captured, &layout, &tokens, &starts, &templated, &offsets, &request_layers);
    let harmful_labels: Vec<bool> = set.examples.iter().map(|e| e.harmful).chain((layout.n_train..layout.n_prompts).map(|i| layout.is_held_harmful(i))).collect();
    let labels = Labels {
        harmful: &harmful_labels[..layout.n_train],
        family: &set.examples.iter().map(|e| e.family).collect::<Vec<_>>(),
        fold: &set.folds(),
        instruction: &set.examples.iter().map(|e| e.instruction).collect::<Vec<_>>(),
        multi_turn: set.families.len() - 1,
        question: set.question_family(),
    };
    progress.set_prefix("validate");
    let (validated, out_of_fold) = validate_candidates(&features, &labels, set.families.len(), options.max_fpr);
    let (chosen, runners_up) = choose(&validated)?;
    let (parts, validation) = &validated[chosen];
    let FinalGate { terms, bias, held_out, fits } = final_gate(&features, parts, validation, &harmful_labels, &layout)?;
    let follow_ups: Vec<usize> = (0..set.examples.len()).filter(|&i| !labels.harmful[i] && labels.family[i] == labels.multi_turn).collect();
    let context_floor = context_floor(parts, &fits, &out_of_fold, &follow_ups);
    let family_tpr = layer_figures(&mut fitted, &validated, set.families.len(), model.n_layer());
    let gate = GateFit {
        offset: 0,
        direction: None,
        families: set.families.clone(),
        family_tpr,
        held_out,
        terms,
        bias: Some(bias),
        context_floor,
        chosen: Some((validation.family_tpr.clone(), validation.fpr.to_vec())),
    };
    let gate_layer = gate.terms.iter().map(|t| t.layer).max().unwrap_or(1);
    Ok(Extraction { directions, steering, layers: fitted, gate_layer, gate, ranked: runners_up, stats: captured.stats })
}

/// Where each prompt sits in the one capture: the training examples, the
/// held-out harmful then harmless prompts (the gate sees all these), then
/// the instructions answered with a refusal, then with compliance (the
/// steering contrast rides in the same capture).
struct Layout {
    n_train: usize,
    n_held_harmful: usize,
    /// Prompts the gate sees: training and held-out.
    n_prompts: usize,
    /// Instructions answered each way.
    n_answered: usize,
}

impl Layout {
    fn is_held_harmful(&self, i: usize) -> bool {
        (self.n_train..self.n_train + self.n_held_harmful).contains(&i)
    }
}

/// Every prompt's tokens, in [`Layout`] order.
fn all_prompts(model: &Model, template: &Template, templated: &[Templated], harmful: &Labelled, harmless: &Labelled, n_ctx: usize) -> Result<(Vec<Vec<i32>>, Layout)> {
    let mut tokens: Vec<Vec<i32>> = templated.iter().map(|t| t.tokens.clone()).collect();
    tokens.extend(prepare(model, template, &harmful.held_out, n_ctx)?);
    tokens.extend(prepare(model, template, &harmless.held_out, n_ctx)?);
    let n_prompts = tokens.len();
    let instructions = [&harmful.train[..], &harmless.train[..]].concat();
    let (refusing, complying) = openers::continued(model, template, &instructions, n_ctx)?;
    tokens.extend(refusing);
    tokens.extend(complying);
    let layout = Layout { n_train: templated.len(), n_held_harmful: harmful.held_out.len(), n_prompts, n_answered: instructions.len() };
    Ok((tokens, layout))
}

/// Per layer directions, as [`Extraction`] holds them.
struct Directions {
    gate: BTreeMap<usize, Vec<f32>>,
    steering: BTreeMap<usize, Vec<f32>>,
    stats: Vec<LayerStats>,
}

/// Per layer: the unit harmful-minus-harmless direction of the plain training
/// prompts' last tokens (with its statistics) and the refusal-minus-compliance
/// direction the shift adds.
fn fit_directions(acts: &Array3<f32>, layers: &[usize], layout: &Layout, set: &TrainSet, n_offsets: usize) -> Directions {
    let last = |r: Range<usize>| r.map(|i| i * n_offsets).collect::<Vec<_>>();
    let plain = |class: bool| last(0..layout.n_train).into_iter().zip(&set.examples).filter(|(_, e)| e.harmful == class && e.family == PLAIN).map(|(s, _)| s).collect();
    let held = layout.n_train + layout.n_held_harmful;
    let groups: [Vec<usize>; 4] = [plain(true), plain(false), last(layout.n_train..held), last(held..layout.n_prompts)];
    let refusing = layout.n_prompts..layout.n_prompts + layout.n_answered;
    let answered = [last(refusing.clone()), last(refusing.end..refusing.end + layout.n_answered)];
    let (mut directions, mut steering, mut fitted) = (BTreeMap::new(), BTreeMap::new(), Vec::new());
    for &layer in layers {
        let at = acts.index_axis(Axis(1), layer);
        let [ht, bt, hh, bh] = groups.each_ref().map(|g| at.select(Axis(0), g));
        let (direction, stats) = fit_layer(layer, &LayerActs { harmful_train: ht.view(), harmless_train: bt.view(), harmful_held: hh.view(), harmless_held: bh.view() });
        directions.insert(layer, direction);
        fitted.push(stats);
        let [refusing, complying] = answered.each_ref().map(|g| at.select(Axis(0), g));
        steering.insert(layer, mean_difference(&refusing.view(), &complying.view()).0.to_vec());
    }
    Directions { gate: directions, steering, stats: fitted }
}

/// What a candidate gate's parts read, for every prompt the gate sees.
struct Features<'a> {
    captured: &'a Captured,
    n_prompts: usize,
    offsets: &'a [usize],
    n_embd: usize,
    n_layer: usize,
    request_layers: &'a [usize],
    /// Each prompt's request tokens, as rows of the request capture.
    ranges: Vec<Range<usize>>,
    /// Each prompt's instruction, as rows of the request capture.
    instruction: Vec<Range<usize>>,
}

impl<'a> Features<'a> {
    #[allow(clippy::too_many_arguments)]
    fn new(
        model: &Model,
        captured: &'a Captured,
        layout: &Layout,
        tokens: &[Vec<i32>],
        starts: &[usize],
        templated: &[Templated],
        offsets: &'a [usize],
        request_layers: &'a [usize],
    ) -> Features<'a> {
        let mut ranges: Vec<Range<usize>> = Vec::with_capacity(layout.n_prompts);
        for (t, &start) in tokens.iter().zip(starts).take(layout.n_prompts) {
            let at = ranges.last().map_or(0, |r| r.end);
            ranges.push(at..at + t.len() - start);
        }
        let instruction = ranges
            .iter()
            .enumerate()
            .map(|(p, r)| match templated.get(p) {
                Some(t) => r.start + t.instruction.start.saturating_sub(starts[p])..r.start + t.instruction.end.saturating_sub(starts[p]),
                None => r.clone(),
            })
            .collect();
        Features { captured, n_prompts: layout.n_prompts, offsets, n_embd: model.n_embd(), n_layer: model.n_layer(), request_layers, ranges, instruction }
    }

    /// Every part a candidate can use: last-token rows at each candidate
    /// layer, then the request's tokens at each request layer.
    fn keys(&self) -> Vec<PartKey> {
        candidate_layers(self.n_layer).into_iter().map(PartKey::Rows).chain(self.request_layers.iter().map(|&l| PartKey::Request(l))).collect()
    }

    fn part(&self, key: PartKey) -> Box<dyn Part + '_> {
        match key {
            PartKey::Rows(layer) => {
                let (acts, n, n_embd) = (&self.captured.acts, self.offsets.len(), self.n_embd);
                Box::new(Rows(Array2::from_shape_fn((self.n_prompts, n * n_embd), |(p, j)| acts[[p * n + j / n_embd, layer, j % n_embd]])))
            }
            PartKey::Request(layer) => {
                let k = self.request_layers.iter().position(|&r| r == layer).expect("a request layer");
                Box::new(RequestTokens { acts: self.captured.request[k].view(), rows: &self.ranges, instruction: &self.instruction })
            }
        }
    }
}

/// Cross-validates every part alone, and every last-token part with every
/// request part; returns them with each part's out-of-fold scores.
fn validate_candidates(features: &Features, labels: &Labels, n_families: usize, max_fpr: f32) -> (Vec<(Vec<PartKey>, Validation)>, BTreeMap<PartKey, Vec<f32>>) {
    let keys = features.keys();
    let out_of_fold: BTreeMap<PartKey, Vec<f32>> = keys.iter().map(|&k| (k, crossval::out_of_fold(&*features.part(k), labels))).collect();
    let mut candidates: Vec<Vec<PartKey>> = keys.iter().map(|&k| vec![k]).collect();
    for &r in features.request_layers {
        candidates.extend(candidate_layers(features.n_layer).into_iter().map(|l| vec![PartKey::Rows(l), PartKey::Request(r)]));
    }
    let validated = candidates
        .into_iter()
        .map(|parts| {
            let z: Vec<f32> = (0..labels.harmful.len()).map(|i| parts.iter().map(|k| out_of_fold[k][i]).sum()).collect();
            let v = validate(&z, labels, n_families, max_fpr);
            (parts, v)
        })
        .collect();
    (validated, out_of_fold)
}

/// The best candidate's index, and the first [`RANKED`] candidates, it first.
fn choose(validated: &[(Vec<PartKey>, Validation)]) -> Result<(usize, Vec<Candidate>)> {
    // Ties go to the gate that decides earliest, then the one with fewer parts.
    let rank = |i: usize| (validated[i].0.iter().map(|&k| part_layer(k)).max().unwrap_or(0), validated[i].0.len(), i);
    let order = ranked((0..validated.len()).map(|i| (rank(i), &validated[i].1)));
    let runners_up = order.iter().take(RANKED).map(|((_, _, i), v)| Candidate { terms: describe_parts(&validated[*i].0), validation: (*v).clone() }).collect();
    let &((_, _, chosen), _) = order.first().context("no candidate gate")?;
    Ok((chosen, runners_up))
}

/// Each layer's last-token probe as a gate on its own: its cross-validated
/// figures go into `stats`; returns its TPR per family (`[family][layer]`).
fn layer_figures(stats: &mut [LayerStats], validated: &[(Vec<PartKey>, Validation)], n_families: usize, n_layer: usize) -> Vec<Vec<f32>> {
    for s in stats {
        let Some(v) = alone(validated, PartKey::Rows(s.layer)) else { continue };
        (s.tpr, s.fpr, s.worst_tpr) = (v.plain_tpr(), v.fpr.iter().copied().fold(0.0, f32::max), v.worst_tpr);
        s.accuracy = 0.5 * (v.mean_tpr + 1.0 - s.fpr);
    }
    (0..n_families).map(|f| (0..n_layer).map(|l| alone(validated, PartKey::Rows(l)).map_or(f32::NAN, |v| v.family_tpr[f])).collect()).collect()
}

/// The validation of `key` as a gate on its own.
fn alone(validated: &[(Vec<PartKey>, Validation)], key: PartKey) -> Option<&Validation> {
    validated.iter().find(|(p, _)| p == &[key]).map(|(_, v)| v)
}

/// The gate `extract` writes.
struct FinalGate {
    terms: Vec<Term>,
    bias: f32,
    /// (TPR, FPR) on the held-out prompts, when there are both classes.
    held_out: Option<(f32, f32)>,
    /// Each part's fit on every training prompt.
    fits: Vec<Fit>,
}

/// The final gate: each chosen part fitted on every training prompt, on the cross-validated scale.
fn final_gate(features: &Features, parts: &[PartKey], validation: &Validation, harmful: &[bool], layout: &Layout) -> Result<FinalGate> {
    let mut terms = Vec::new();
    let mut bias = -validation.threshold;
    let mut fits = Vec::new();
    for &key in parts {
        let p = features.part(key);
        let fit = Fit::new(&*p, harmful, |i| i < layout.n_train).context("cannot fit the gate: a class has no prompts")?;
        terms.push(Term { layer: part_layer(key), read: key.read(features.offsets), weights: (&fit.direction / fit.scale).to_vec() });
        bias -= fit.centre / fit.scale;
        fits.push((p, fit));
    }
    let score = |i: usize| fits.iter().map(|(p, f)| f.z(&**p, i)).sum::<f32>() - validation.threshold;
    let held = layout.n_train + layout.n_held_harmful;
    let held_out = (layout.n_held_harmful > 0 && layout.n_prompts > held).then(|| {
        let r = rates(&(layout.n_train..held).map(score).collect::<Vec<_>>(), &(held..layout.n_prompts).map(score).collect::<Vec<_>>());
        (r.tpr, r.fpr)
    });
    Ok(FinalGate { terms, bias, held_out, fits: fits.into_iter().map(|(_, f)| f).collect() })
}

/// Share of harmless requests after a harmful turn whose earlier turns the
/// gate still reads. A request that only says "go on" sits near their top
/// (its last token carries the earlier request): with Qwen, a floor that 2%
/// of them clear (0.058) would have passed at least 54 of 60 "go on"
/// conversations; the one 10% clear (-0.725) passes none that reading every
/// turn flagged (README, Conversations).
pub const CONTEXT_SHARE: f32 = 0.1;

/// The gate's [`context_floor`](crate::gate::Gate::context_floor): the sum of
/// its token terms that [`CONTEXT_SHARE`] of the harmless requests after a
/// harmful turn (`follow_ups`, scored out of fold, so by probes that never
/// saw a conversation) exceed. None unless the gate has both kinds of term
/// and every such request was scored: then earlier turns always count.
fn context_floor(parts: &[PartKey], fits: &[Fit], out_of_fold: &BTreeMap<PartKey, Vec<f32>>, follow_ups: &[usize]) -> Option<f32> {
    let tokens: Vec<(PartKey, &Fit)> = parts.iter().copied().zip(fits).filter(|(k, _)| matches!(k, PartKey::Rows(_))).collect();
    if tokens.is_empty() || tokens.len() == parts.len() || follow_ups.is_empty() {
        return None;
    }
    // A term's value at run time is its z score plus its fit's centre over scale.
    let shift: f32 = tokens.iter().map(|(_, f)| f.centre / f.scale).sum();
    let mut sums: Vec<f32> = follow_ups.iter().map(|&i| tokens.iter().map(|(k, _)| out_of_fold[k][i]).sum::<f32>() + shift).collect();
    if !sums.iter().all(|s| s.is_finite()) {
        return None;
    }
    sums.sort_by(|a, b| b.total_cmp(a));
    Some(crossval::allowed_top(&sums, CONTEXT_SHARE))
}

/// `7:tokens + 14:request_max`: a candidate's parts as the gate's terms read.
fn describe_parts(parts: &[PartKey]) -> String {
    parts.iter().map(|&k| format!("{}:{}", part_layer(k), k.read(&[]).kind())).collect::<Vec<_>>().join(" + ")
}

fn part_layer(key: PartKey) -> usize {
    match key {
        PartKey::Rows(l) | PartKey::Request(l) => l,
    }
}

pub fn sha256_file(path: &Path) -> Result<(String, u64)> {
    let mut file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        hasher.update(&buf[..n]);
    }
    Ok((format!("{:x}", hasher.finalize()), size))
}

pub fn model_identity(model: &Model) -> Result<ModelIdentity> {
    let (sha256, file_size) = sha256_file(&model.path)?;
    Ok(ModelIdentity {
        architecture: model.meta("general.architecture").unwrap_or_default(),
        name: model.meta("general.name").unwrap_or_default(),
        n_embd: model.n_embd(),
        n_layer: model.n_layer(),
        file_size,
        sha256,
    })
}

pub fn data_set(path: &Path, set: &Labelled) -> Result<DataSet> {
    Ok(DataSet {
        file: path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        sha256: sha256_file(path)?.0,
        count: set.train.len() + set.held_out.len(),
        train: set.train.len(),
        held_out: set.held_out.len(),
    })
}

/// The vector file for an extraction: unit directions as `direction.<k>`, the
/// rest as calibration metadata.
pub fn vector_file(model: &Model, extraction: &Extraction, data: DataIdentity) -> Result<VectorFile> {
    let identity = model_identity(model)?;
    Ok(VectorFile {
        model_hint: identity.architecture.clone(),
        layer_count: extraction.directions.len() as u32,
        n_embd: model.n_embd(),
        directions: extraction.directions.clone(),
        steering: extraction.steering.clone(),
        calibration: Some(Calibration {
            kind: "srv".into(),
            tool_version: env!("CARGO_PKG_VERSION").into(),
            gate_layer: extraction.gate_layer,
            robust_rho: None,
            layers: extraction.layers.clone(),
            model: identity,
            data,
            gate: extraction.gate.clone(),
        }),
        defaults: None,
    })
}
