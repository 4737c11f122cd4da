//! Extraction: last-token activations of harmful and harmless prompts →
//! per-layer safety-related vectors, gate biases and the gate layer.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use anyhow::{Context as _, Result};
use indicatif::ProgressBar;
use ndarray::{Array2, Axis};
use sha2::{Digest, Sha256};

use crate::capture::{capture_prompts, DecodeStats, RequestCapture};
use crate::crossval::{self, candidate_layers, ranked, request_layers, validate, Fit, Labels, Part, RequestTokens, Rows, Validation};
use crate::gate::{fit_layer, mean_difference, rates, LayerActs, Read as GateRead, Term};
use crate::llama::{ContextParams, Model};
use crate::openers;
use crate::prompts::{prepare, request_start, Template};
use crate::trainset::{Recipe, TrainSet, PLAIN};
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
    let n_ctx = params.n_ctx as usize;
    let set = TrainSet::build(&harmful.train, &harmless.train, wrappers, options.recipe);
    let templated = set.tokens(model, template, n_ctx)?;
    let n_train = templated.len();
    let mut tokens: Vec<Vec<i32>> = templated.iter().map(|t| t.tokens.clone()).collect();
    tokens.extend(prepare(model, template, &harmful.held_out, n_ctx)?);
    tokens.extend(prepare(model, template, &harmless.held_out, n_ctx)?);
    // The steering contrast rides in the same capture, after every prompt the gate sees.
    let n_prompts = tokens.len();
    let instructions = [&harmful.train[..], &harmless.train[..]].concat();
    let (refusing, complying) = openers::continued(model, template, &instructions, n_ctx)?;
    tokens.extend(refusing);
    tokens.extend(complying);
    let header = template.user_header(model)?;
    // The answered instructions feed only the steering direction, so no request token of theirs is kept.
    let starts: Vec<usize> = tokens.iter().enumerate().map(|(i, t)| if i < n_prompts { request_start(t, &header) } else { t.len() }).collect();
    // The last token, and the last token of the user's own text (before the
    // end of turn and the assistant header), side by side.
    let offsets: Vec<usize> = std::iter::once(0).chain(template.post_instruction_len(model)?.filter(|&n| n > 0)).collect();
    let layers = steerable_layers(model);
    let request_layers = request_layers(model.n_layer());
    let request = RequestCapture { starts: &starts, layers: &request_layers };
    let captured = capture_prompts(model, params, &tokens, &offsets, &layers, Some(request), progress)?;
    let acts = &captured.acts;

    // Steering directions: mean differences of the plain training prompts' last tokens.
    let slot = |p: usize, k: usize| p * offsets.len() + k;
    let plain = |class: bool| (0..n_train).filter(|&i| set.examples[i].harmful == class && set.examples[i].family == PLAIN).map(|i| slot(i, 0)).collect::<Vec<_>>();
    let n_held = harmful.held_out.len();
    let span = |r: std::ops::Range<usize>| r.map(|i| slot(i, 0)).collect::<Vec<_>>();
    let n_answered = instructions.len();
    let groups = [plain(true), plain(false), span(n_train..n_train + n_held), span(n_train + n_held..n_prompts)];
    let answered = [span(n_prompts..n_prompts + n_answered), span(n_prompts + n_answered..tokens.len())];
    let mut directions = BTreeMap::new();
    let mut steering = BTreeMap::new();
    let mut fitted = Vec::new();
    for &layer in &layers {
        let at = acts.index_axis(Axis(1), layer);
        let [ht, bt, hh, bh] = groups.each_ref().map(|g: &Vec<usize>| at.select(Axis(0), g));
        let (direction, stats) = fit_layer(layer, &LayerActs { harmful_train: ht.view(), harmless_train: bt.view(), harmful_held: hh.view(), harmless_held: bh.view() });
        directions.insert(layer, direction);
        fitted.push(stats);
        let [refusing, complying] = answered.each_ref().map(|g| at.select(Axis(0), g));
        steering.insert(layer, mean_difference(&refusing.view(), &complying.view()).0.to_vec());
    }

    // Every prompt's features for each part; cross-validation uses the training prompts' only.
    let rows_at = |layer: usize| -> Array2<f32> {
        Array2::from_shape_fn((n_prompts, offsets.len() * model.n_embd()), |(p, j)| acts[[slot(p, j / model.n_embd()), layer, j % model.n_embd()]])
    };
    let mut ranges = Vec::with_capacity(tokens.len());
    for (t, &start) in tokens.iter().zip(&starts) {
        let at = ranges.last().map_or(0, |r: &std::ops::Range<usize>| r.end);
        ranges.push(at..at + t.len() - start);
    }
    let instruction: Vec<std::ops::Range<usize>> = (0..n_prompts)
        .map(|p| match templated.get(p) {
            Some(t) => ranges[p].start + t.instruction.start.saturating_sub(starts[p])..ranges[p].start + t.instruction.end.saturating_sub(starts[p]),
            None => ranges[p].clone(),
        })
        .collect();
    let labels_harmful: Vec<bool> = set.examples.iter().map(|e| e.harmful).chain((0..n_prompts - n_train).map(|i| i < n_held)).collect();
    let labels = Labels {
        harmful: &labels_harmful[..n_train],
        family: &set.examples.iter().map(|e| e.family).collect::<Vec<_>>(),
        fold: &set.folds(),
        instruction: &set.examples.iter().map(|e| e.instruction).collect::<Vec<_>>(),
        multi_turn: set.families.len() - 1,
        question: set.question_family(),
    };
    let row_layers = candidate_layers(model.n_layer());
    let part = |key: PartKey| -> Box<dyn Part + '_> {
        match key {
            PartKey::Rows(l) => Box::new(Rows(rows_at(l))),
            PartKey::Request(l) => {
                let k = request_layers.iter().position(|&r| r == l).expect("a request layer");
                Box::new(RequestTokens { acts: captured.request[k].view(), rows: &ranges, instruction: &instruction })
            }
        }
    };
    let keys: Vec<PartKey> = row_layers.iter().map(|&l| PartKey::Rows(l)).chain(request_layers.iter().map(|&l| PartKey::Request(l))).collect();
    progress.set_prefix("validate");
    let out_of_fold: BTreeMap<PartKey, Vec<f32>> = keys.iter().map(|&k| (k, crossval::out_of_fold(&*part(k), &labels))).collect();

    // Candidates: every part alone, and every last-token part with every request part.
    let mut candidates: Vec<Vec<PartKey>> = keys.iter().map(|&k| vec![k]).collect();
    for &r in &request_layers {
        candidates.extend(row_layers.iter().map(|&l| vec![PartKey::Rows(l), PartKey::Request(r)]));
    }
    let n_families = set.families.len();
    let validated: Vec<(Vec<PartKey>, Validation)> = candidates
        .into_iter()
        .map(|parts| {
            let z: Vec<f32> = (0..n_train).map(|i| parts.iter().map(|k| out_of_fold[k][i]).sum()).collect();
            let v = validate(&z, &labels, n_families, options.max_fpr);
            (parts, v)
        })
        .collect();
    // Ties go to the gate that decides earliest, then the one with fewer parts.
    let rank = |i: usize| (validated[i].0.iter().map(|&k| part_layer(k)).max().unwrap_or(0), validated[i].0.len(), i);
    let order = ranked((0..validated.len()).map(|i| (rank(i), &validated[i].1)));
    let runners_up = order.iter().take(RANKED).map(|((_, _, i), v)| Candidate { terms: describe_parts(&validated[*i].0), validation: (*v).clone() }).collect();
    let &((_, _, chosen), _) = order.first().context("no candidate gate")?;
    let (parts, validation) = &validated[chosen];

    // The final gate: each chosen part fitted on every training prompt, on the cross-validated scale.
    let train = |i: usize| i < n_train;
    let mut terms = Vec::new();
    let mut bias = -validation.threshold;
    let mut fits = Vec::new();
    for &key in parts {
        let p = part(key);
        let fit = Fit::new(&*p, &labels_harmful, train).context("cannot fit the gate: a class has no prompts")?;
        terms.push(Term { layer: part_layer(key), read: key.read(&offsets), weights: (&fit.direction / fit.scale).to_vec() });
        bias -= fit.centre / fit.scale;
        fits.push((p, fit));
    }
    let score = |i: usize| fits.iter().map(|(p, f)| f.z(&**p, i)).sum::<f32>() - validation.threshold;

    for s in &mut fitted {
        let Some((_, v)) = validated.iter().find(|(p, _)| p == &vec![PartKey::Rows(s.layer)]) else { continue };
        (s.tpr, s.fpr, s.worst_tpr) = (v.plain_tpr(), v.fpr.iter().copied().fold(0.0, f32::max), v.worst_tpr);
        s.accuracy = 0.5 * (v.mean_tpr + 1.0 - s.fpr);
    }
    let held_out = (n_held > 0 && n_prompts > n_train + n_held).then(|| {
        let r = rates(&(n_train..n_train + n_held).map(score).collect::<Vec<_>>(), &(n_train + n_held..n_prompts).map(score).collect::<Vec<_>>());
        (r.tpr, r.fpr)
    });
    let family_tpr = (0..n_families)
        .map(|f| (0..model.n_layer()).map(|l| validated.iter().find(|(p, _)| p == &vec![PartKey::Rows(l)]).map_or(f32::NAN, |(_, v)| v.family_tpr[f])).collect())
        .collect();
    let gate = GateFit {
        offset: 0,
        direction: None,
        families: set.families.clone(),
        family_tpr,
        held_out,
        terms,
        bias: Some(bias),
        chosen: Some((validation.family_tpr.clone(), validation.fpr.to_vec())),
    };
    let gate_layer = gate.terms.iter().map(|t| t.layer).max().unwrap_or(1);
    Ok(Extraction { directions, steering, layers: fitted, gate_layer, gate, ranked: runners_up, stats: captured.stats })
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
