//! Extraction: last-token activations of harmful and harmless prompts →
//! per-layer safety-related vectors, gate biases and the gate layer.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use anyhow::{Context as _, Result};
use indicatif::ProgressBar;
use ndarray::{s, Axis};
use sha2::{Digest, Sha256};

use crate::capture::{capture_prompts, DecodeStats};
use crate::gate::{choose_gate_layer, fit_layer, LayerActs};
use crate::llama::{ContextParams, Model};
use crate::prompts::{prepare, Template};
use crate::vectors::{Calibration, DataIdentity, DataSet, LayerStats, ModelIdentity, VectorFile};

/// Prompts of one class, split into training and held-out calibration sets.
pub struct Labelled {
    pub train: Vec<String>,
    pub held_out: Vec<String>,
}

pub struct Extraction {
    pub directions: BTreeMap<usize, Vec<f32>>,
    pub layers: Vec<LayerStats>,
    pub gate_layer: usize,
    pub stats: DecodeStats,
    /// True when a class had no held-out prompts and the rates are on training prompts.
    pub rates_on_training: bool,
}

/// Layers that can carry a control vector: llama.cpp never applies one at layer 0.
pub fn steerable_layers(model: &Model) -> Vec<usize> {
    (1..model.n_layer()).collect()
}

pub fn extract(
    model: &Model,
    template: &Template,
    harmful: &Labelled,
    harmless: &Labelled,
    params: &ContextParams,
    progress: &ProgressBar,
) -> Result<Extraction> {
    let rates_on_training = harmful.held_out.is_empty() || harmless.held_out.is_empty();
    let (harmful_held, harmless_held) =
        if rates_on_training { (&harmful.train, &harmless.train) } else { (&harmful.held_out, &harmless.held_out) };
    let groups = [&harmful.train, &harmless.train, harmful_held, harmless_held];
    let all: Vec<String> = groups.iter().flat_map(|g| g.iter().cloned()).collect();
    let tokens = prepare(model, template, &all, params.n_ctx as usize)?;

    let layers = steerable_layers(model);
    let (acts, stats) = capture_prompts(model, params, &tokens, &layers, progress)?;

    let mut bounds = Vec::new();
    let mut start = 0;
    for g in groups {
        bounds.push(start..start + g.len());
        start += g.len();
    }
    let mut directions = BTreeMap::new();
    let mut fitted = Vec::new();
    for &layer in &layers {
        let at = acts.index_axis(Axis(1), layer);
        let view = |i: usize| at.slice(s![bounds[i].clone(), ..]);
        let split = LayerActs { harmful_train: view(0), harmless_train: view(1), harmful_held: view(2), harmless_held: view(3) };
        let (direction, layer_stats) = fit_layer(layer, &split);
        directions.insert(layer, direction);
        fitted.push(layer_stats);
    }
    let gate_layer = choose_gate_layer(&fitted);
    Ok(Extraction { directions, layers: fitted, gate_layer, stats, rates_on_training })
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
        }),
        defaults: None,
    })
}
