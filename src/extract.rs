//! Extraction: last-token activations of harmful and harmless prompts →
//! per-layer safety-related vectors, gate biases and the gate layer.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use anyhow::{Context as _, Result};
use indicatif::ProgressBar;
use ndarray::Axis;
use sha2::{Digest, Sha256};

use crate::capture::{capture_prompts, DecodeStats};
use crate::crossval::{best, candidate_layers, out_of_fold, validate, Fit, Labels};
use crate::gate::{fit_layer, rates, LayerActs};
use crate::llama::{ContextParams, Model};
use crate::prompts::{prepare, Template};
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
    pub layers: Vec<LayerStats>,
    pub gate_layer: usize,
    pub gate: GateFit,
    pub stats: DecodeStats,
}

/// Layers that can carry a control vector: llama.cpp never applies one at layer 0.
pub fn steerable_layers(model: &Model) -> Vec<usize> {
    (1..model.n_layer()).collect()
}

/// Decodes every prompt once (training prompts plain, wrapped and in
/// conversations; held-out prompts plain), fits a steering direction per layer
/// on the plain training prompts, and chooses the gate's layer, read position
/// and threshold by cross-validation over held-out families.
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
    let mut tokens = set.tokens(model, template, n_ctx)?;
    let n_train = tokens.len();
    tokens.extend(prepare(model, template, &harmful.held_out, n_ctx)?);
    tokens.extend(prepare(model, template, &harmless.held_out, n_ctx)?);
    // The last token of the user's own text, before the end of turn and the
    // assistant header, is a second place the gate may read.
    let offsets: Vec<usize> = std::iter::once(0).chain(template.post_instruction_len(model)?.filter(|&n| n > 0)).collect();
    let layers = steerable_layers(model);
    let (acts, stats) = capture_prompts(model, params, &tokens, &offsets, &layers, progress)?;
    let rows = |prompts: &mut dyn Iterator<Item = usize>, offset: usize| -> Vec<usize> { prompts.map(|p| p * offsets.len() + offset).collect() };

    let plain = |class: bool| rows(&mut (0..n_train).filter(|&i| set.examples[i].harmful == class && set.examples[i].family == PLAIN), 0);
    let n_held = harmful.held_out.len();
    let groups = [plain(true), plain(false), rows(&mut (n_train..n_train + n_held), 0), rows(&mut (n_train + n_held..tokens.len()), 0)];
    let mut directions = BTreeMap::new();
    let mut fitted = Vec::new();
    for &layer in &layers {
        let at = acts.index_axis(Axis(1), layer);
        let [ht, bt, hh, bh] = groups.each_ref().map(|g| at.select(Axis(0), g));
        let (direction, stats) = fit_layer(layer, &LayerActs { harmful_train: ht.view(), harmless_train: bt.view(), harmful_held: hh.view(), harmless_held: bh.view() });
        directions.insert(layer, direction);
        fitted.push(stats);
    }

    let labels = Labels {
        harmful: &set.examples.iter().map(|e| e.harmful).collect::<Vec<_>>(),
        family: &set.examples.iter().map(|e| e.family).collect::<Vec<_>>(),
        fold: &set.folds(),
        instruction: &set.examples.iter().map(|e| e.instruction).collect::<Vec<_>>(),
        multi_turn: set.families.len() - 1,
    };
    let train_at = |layer: usize, offset: usize| acts.index_axis(Axis(1), layer).select(Axis(0), &rows(&mut (0..n_train), offset));
    let mut validated = BTreeMap::new();
    for layer in candidate_layers(model.n_layer()) {
        for offset in 0..offsets.len() {
            let z = out_of_fold(train_at(layer, offset).view(), &labels);
            validated.insert((layer, offset), validate(&z, &labels, set.families.len(), options.max_fpr));
        }
    }
    let (gate_layer, offset) = best(validated.iter().map(|(k, v)| (*k, v))).context("no candidate gate layer")?;
    let chosen = &validated[&(gate_layer, offset)];
    let fit = Fit::new(train_at(gate_layer, offset).view(), labels.harmful, |_| true).context("cannot fit the gate: a class has no prompts")?;
    let bias = fit.bias(chosen.threshold);

    for s in &mut fitted {
        let Some(v) = validated.get(&(s.layer, offset)) else { continue };
        (s.tpr, s.fpr, s.worst_tpr) = (v.family_tpr[PLAIN], v.fpr.iter().copied().fold(0.0, f32::max), v.worst_tpr);
        s.accuracy = 0.5 * (v.mean_tpr + 1.0 - s.fpr);
        if s.layer == gate_layer {
            s.bias = bias;
        }
    }
    let held_out = (n_held > 0 && tokens.len() > n_train + n_held).then(|| {
        let at = acts.index_axis(Axis(1), gate_layer);
        let score = |r: std::ops::Range<usize>| rows(&mut r.into_iter(), offset).iter().map(|&i| at.row(i).dot(&fit.direction) + bias).collect::<Vec<_>>();
        let r = rates(&score(n_train..n_train + n_held), &score(n_train + n_held..tokens.len()));
        (r.tpr, r.fpr)
    });
    let family_tpr = (0..set.families.len())
        .map(|f| (0..model.n_layer()).map(|l| validated.get(&(l, offset)).map_or(f32::NAN, |v| v.family_tpr[f])).collect())
        .collect();
    let gate = GateFit { offset: offsets[offset], direction: Some(fit.direction.to_vec()), families: set.families.clone(), family_tpr, held_out };
    Ok(Extraction { directions, layers: fitted, gate_layer, gate, stats })
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
