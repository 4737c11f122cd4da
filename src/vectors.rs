//! Vector files: llama.cpp control-vector GGUF (`direction.<k>`, k = layer >= 1)
//! plus our calibration and provenance under the `inferalign.` prefix, which
//! llama.cpp's loader ignores.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::gate::Term;
use crate::guard::ModelShape;
use crate::llama::{GgufFile, GgufValue, GgufWriter, Model};

const PREFIX: &str = "inferalign.";

/// Gate figures for one layer, measured on held-out prompts.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct LayerStats {
    pub layer: usize,
    /// b_l: the negated mean projection of the training prompts on the direction.
    pub bias: f32,
    pub accuracy: f32,
    pub tpr: f32,
    pub fpr: f32,
    /// |s_l|, the length of the mean difference before normalising.
    pub srv_norm: f32,
    /// Mean |a_l| of the training prompts' last-token activations.
    pub mean_norm: f32,
    /// The lowest TPR over prompt families held out of fitting (cross-validation).
    pub worst_tpr: f32,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ModelIdentity {
    pub architecture: String,
    pub name: String,
    pub n_embd: usize,
    pub n_layer: usize,
    pub file_size: u64,
    pub sha256: String,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct DataSet {
    pub file: String,
    pub sha256: String,
    pub count: usize,
    pub train: usize,
    pub held_out: usize,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct DataIdentity {
    pub harmful: DataSet,
    pub harmless: DataSet,
    pub template: String,
    pub system_prompt: Option<String>,
    pub seed: Option<u64>,
}

/// What `extract` measured besides the directions.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Calibration {
    pub kind: String,
    pub tool_version: String,
    pub gate_layer: usize,
    /// Set by `calibrate --robust`: the gate's decisions on its calibration
    /// prompts were chosen to hold under activation changes of this L2 norm.
    pub robust_rho: Option<f32>,
    pub layers: Vec<LayerStats>,
    pub model: ModelIdentity,
    pub data: DataIdentity,
    pub gate: GateFit,
}

/// How the gate at `gate_layer` was fitted and what it scored on prompts it never saw.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct GateFit {
    /// Tokens before the last prompt token that the gate reads (0: the last).
    pub offset: usize,
    /// The gate's own unit direction; None: `direction.<gate_layer>`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub direction: Option<Vec<f32>>,
    /// Prompt families of cross-validation, and the TPR of each at each layer
    /// (`family_tpr[family][layer]`; NaN where not measured).
    pub families: Vec<String>,
    pub family_tpr: Vec<Vec<f32>>,
    /// TPR and FPR of the final gate on plain held-out prompts, when some were held out.
    pub held_out: Option<(f32, f32)>,
    /// The gate's terms (empty: a one-direction gate at `gate_layer`, read at `offset`).
    #[serde(skip)]
    pub terms: Vec<Term>,
    /// The bias of `terms`.
    pub bias: Option<f32>,
    /// [`Gate::context_floor`](crate::gate::Gate::context_floor) of `terms`.
    pub context_floor: Option<f32>,
    /// The chosen gate's cross-validated TPR per family, and FPR on plain,
    /// wrapped and multi-turn harmless prompts.
    pub chosen: Option<(Vec<f32>, Vec<f32>)>,
}

impl Calibration {
    pub fn layer(&self, layer: usize) -> Option<&LayerStats> {
        self.layers.iter().find(|s| s.layer == layer)
    }
}

/// Steering defaults, chosen by `extract`'s generation check or `sweep`.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct SteerDefaults {
    pub strength: Strength,
    pub layers: Vec<usize>,
}

/// How far the shift moves the residual stream.
#[derive(Clone, Copy, Debug, Serialize, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum Strength {
    /// `alpha * theta_l` at every steered layer.
    Alpha(f32),
    /// `s * mean|a_l| * theta_l`: a fraction of the layer's own activation
    /// norm, so one value means the same on models of different scale.
    Relative(f32),
}

#[derive(Clone, Debug, Serialize)]
pub struct VectorFile {
    pub model_hint: String,
    pub layer_count: u32,
    pub n_embd: usize,
    /// Unit directions by llama.cpp layer index (k >= 1).
    #[serde(skip)]
    pub directions: BTreeMap<usize, Vec<f32>>,
    /// Unit directions the shift adds where they differ from `directions`
    /// (extract's refusal-minus-compliance ones), by layer; stored as metadata
    /// so llama.cpp still loads the file. Empty: the shift adds `directions`.
    #[serde(skip)]
    pub steering: BTreeMap<usize, Vec<f32>>,
    pub calibration: Option<Calibration>,
    pub defaults: Option<SteerDefaults>,
}

impl VectorFile {
    pub fn layers(&self) -> Vec<usize> {
        self.directions.keys().copied().collect()
    }

    pub fn direction(&self, layer: usize) -> Result<&[f32]> {
        self.directions.get(&layer).map(Vec::as_slice).with_context(|| {
            let layers = self.layers();
            format!(
                "layer {layer} is not in the vector file (it has layers {}..={})",
                layers.first().unwrap_or(&0),
                layers.last().unwrap_or(&0)
            )
        })
    }

    /// The direction the shift adds at `layer`.
    pub fn steer_direction(&self, layer: usize) -> Result<&[f32]> {
        match self.steering.get(&layer) {
            Some(v) => Ok(v),
            None => self.direction(layer),
        }
    }

    pub fn read(path: &Path) -> Result<VectorFile> {
        read_file(path).with_context(|| format!("invalid vector file {}", path.display()))
    }

    /// Fails unless the vectors fit `model` (see [`check_shape`](Self::check_shape)).
    pub fn check_fits(&self, model: &Model, path: &Path) -> Result<()> {
        self.check_shape(&ModelShape::of(model), false)
            .with_context(|| format!("vector file {} does not fit model {}", path.display(), model.path.display()))
    }

    /// Fails unless the vectors fit a model of this shape: its width, layers
    /// that exist, the same depth when the file records it, and, unless
    /// `any_model`, the architecture recorded in the file (llama.cpp's
    /// `model_hint`), so a file of another model padded to this shape is refused.
    pub fn check_shape(&self, shape: &ModelShape, any_model: bool) -> Result<()> {
        let (n_embd, n_layer, arch) = (shape.n_embd, shape.n_layer, shape.arch.as_str());
        if self.n_embd != n_embd {
            bail!("n_embd is {} in the vectors but {n_embd} in the model", self.n_embd);
        }
        if let Some(&top) = self.directions.keys().last() {
            if top >= n_layer {
                bail!("the vectors reach layer {top} but the model has {n_layer} layers");
            }
        }
        if let Some(cal) = &self.calibration {
            if cal.model.n_layer != n_layer {
                bail!("the vectors were made for a {}-layer model, this one has {n_layer} layers", cal.model.n_layer);
            }
        }
        if !any_model && !self.model_hint.is_empty() && !arch.is_empty() && self.model_hint != arch {
            bail!("the vectors were made for a {} model, this one is {arch} (pass --any-model to use them anyway)", self.model_hint);
        }
        Ok(())
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        let mut w = GgufWriter::new();
        w.set("general.architecture", GgufValue::Str("controlvector".into()));
        w.set("controlvector.model_hint", GgufValue::Str(self.model_hint.clone()));
        w.set("controlvector.layer_count", GgufValue::U32(self.layer_count));
        if let Some(cal) = &self.calibration {
            write_calibration(&mut w, cal);
        }
        if let Some(d) = &self.defaults {
            match d.strength {
                Strength::Alpha(alpha) => w.set(&key("default.alpha"), GgufValue::F32(alpha)),
                Strength::Relative(s) => w.set(&key("default.strength"), GgufValue::F32(s)),
            }
            w.set(&key("default.layers"), GgufValue::U32Array(d.layers.iter().map(|&l| l as u32).collect()));
        }
        for (layer, v) in &self.steering {
            w.set(&key(&format!("steer.{layer}")), GgufValue::F32Array(v.clone()));
        }
        for (layer, v) in &self.directions {
            w.add_tensor(&format!("direction.{layer}"), v.clone());
        }
        w.write(path).with_context(|| format!("cannot write vector file {}", path.display()))
    }
}

/// Largest magnitude a stored value may have: far above any real activation
/// scale, far below what overflows a dot product or a shift to infinity.
const MAX_VALUE: f32 = 1e6;

fn read_file(path: &Path) -> Result<VectorFile> {
    let file = GgufFile::open(path)?;
    let mut directions = BTreeMap::new();
    for name in file.tensor_names() {
        let layer: usize = name
            .strip_prefix("direction.")
            .and_then(|k| k.parse().ok())
            .with_context(|| format!("tensor {name:?} is not named direction.<layer>"))?;
        if name != format!("direction.{layer}") {
            bail!("tensor {name:?} is not named as llama.cpp names layer {layer} (direction.{layer}); one tensor per layer");
        }
        if layer == 0 {
            bail!("it holds direction.0, which llama.cpp rejects (layer 0 never takes a control vector)");
        }
        let v = file.tensor_f32(&name)?;
        if let Some(i) = v.iter().position(|x| !(x.abs() <= MAX_VALUE)) {
            bail!("{name} holds {} at index {i}; values must be finite and within ±{MAX_VALUE:e}", v[i]);
        }
        if directions.insert(layer, v).is_some() {
            bail!("it holds two tensors named {name}; one tensor per layer");
        }
    }
    let n_embd = match directions.values().next() {
        Some(v) => v.len(),
        None => bail!("it holds no direction.<layer> tensors"),
    };
    if let Some((layer, v)) = directions.iter().find(|(_, v)| v.len() != n_embd) {
        bail!("direction.{layer} has {} values, others have {n_embd}", v.len());
    }
    let model_hint = match file.get("controlvector.model_hint") {
        Some(GgufValue::Str(s)) => s,
        _ => String::new(),
    };
    let layer_count = match file.get("controlvector.layer_count") {
        Some(GgufValue::U32(n)) => n,
        _ => directions.len() as u32,
    };
    let calibration = match file.get(&key("kind")) {
        Some(_) => Some(read_calibration(&file, &directions)?),
        None => None,
    };
    let strength = match (file.get(&key("default.alpha")), file.get(&key("default.strength"))) {
        (Some(GgufValue::F32(alpha)), None) if alpha.is_finite() => Some(Strength::Alpha(alpha)),
        (None, Some(GgufValue::F32(s))) if s.is_finite() => Some(Strength::Relative(s)),
        (None, None) => None,
        _ => bail!("metadata {} / {} are malformed", key("default.alpha"), key("default.strength")),
    };
    let defaults = match (strength, file.get(&key("default.layers"))) {
        (Some(strength), Some(GgufValue::U32Array(layers))) => {
            Some(SteerDefaults { strength, layers: layers.into_iter().map(|l| l as usize).collect() })
        }
        (None, None) => None,
        _ => bail!("metadata {} is malformed or lacks its strength", key("default.layers")),
    };
    let mut steering = BTreeMap::new();
    for &layer in directions.keys() {
        if let Some(v) = Reader(&file).vector(&format!("steer.{layer}"), n_embd)? {
            steering.insert(layer, v);
        }
    }
    Ok(VectorFile { model_hint, layer_count, n_embd, directions, steering, calibration, defaults })
}

fn key(name: &str) -> String {
    format!("{PREFIX}{name}")
}

/// Per-layer figures are arrays indexed by layer; index 0 is unused.
fn per_layer(cal: &Calibration, f: impl Fn(&LayerStats) -> f32) -> GgufValue {
    let mut values = vec![0.0; cal.model.n_layer];
    for s in &cal.layers {
        values[s.layer] = f(s);
    }
    GgufValue::F32Array(values)
}

fn write_calibration(w: &mut GgufWriter, cal: &Calibration) {
    let s = |v: &str| GgufValue::Str(v.to_string());
    w.set(&key("kind"), s(&cal.kind));
    w.set(&key("tool_version"), s(&cal.tool_version));
    w.set(&key("gate.layer"), GgufValue::U32(cal.gate_layer as u32));
    if let Some(rho) = cal.robust_rho {
        w.set(&key("gate.robust_rho"), GgufValue::F32(rho));
    }
    w.set(&key("gate.bias"), per_layer(cal, |l| l.bias));
    w.set(&key("gate.accuracy"), per_layer(cal, |l| l.accuracy));
    w.set(&key("gate.tpr"), per_layer(cal, |l| l.tpr));
    w.set(&key("gate.fpr"), per_layer(cal, |l| l.fpr));
    w.set(&key("gate.worst_tpr"), per_layer(cal, |l| l.worst_tpr));
    w.set(&key("srv_norm"), per_layer(cal, |l| l.srv_norm));
    w.set(&key("mean_norm"), per_layer(cal, |l| l.mean_norm));
    let g = &cal.gate;
    w.set(&key("gate.offset"), GgufValue::U32(g.offset as u32));
    if let Some(direction) = &g.direction {
        w.set(&key("gate.direction"), GgufValue::F32Array(direction.clone()));
    }
    if !g.families.is_empty() {
        w.set(&key("gate.families"), s(&g.families.join(",")));
        w.set(&key("gate.family_tpr"), GgufValue::F32Array(g.family_tpr.concat()));
    }
    if let Some((tpr, fpr)) = g.held_out {
        w.set(&key("gate.held_out_tpr"), GgufValue::F32(tpr));
        w.set(&key("gate.held_out_fpr"), GgufValue::F32(fpr));
    }
    if let (false, Some(bias)) = (g.terms.is_empty(), g.bias) {
        w.set(&key("gate.terms"), s(&g.terms.iter().map(Term::describe).collect::<Vec<_>>().join(";")));
        for (i, t) in g.terms.iter().enumerate() {
            w.set(&key(&format!("gate.term.{i}")), GgufValue::F32Array(t.weights.clone()));
        }
        w.set(&key("gate.terms_bias"), GgufValue::F32(bias));
        if let Some(floor) = g.context_floor {
            w.set(&key("gate.context_floor"), GgufValue::F32(floor));
        }
    }
    if let Some((tpr, fpr)) = &g.chosen {
        w.set(&key("gate.chosen_family_tpr"), GgufValue::F32Array(tpr.clone()));
        w.set(&key("gate.chosen_fpr"), GgufValue::F32Array(fpr.clone()));
    }
    let m = &cal.model;
    w.set(&key("model.architecture"), s(&m.architecture));
    w.set(&key("model.name"), s(&m.name));
    w.set(&key("model.n_embd"), GgufValue::U32(m.n_embd as u32));
    w.set(&key("model.n_layer"), GgufValue::U32(m.n_layer as u32));
    w.set(&key("model.file_size"), GgufValue::U64(m.file_size));
    w.set(&key("model.sha256"), s(&m.sha256));
    for (class, set) in [("harmful", &cal.data.harmful), ("harmless", &cal.data.harmless)] {
        w.set(&key(&format!("data.{class}.file")), s(&set.file));
        w.set(&key(&format!("data.{class}.sha256")), s(&set.sha256));
        w.set(&key(&format!("data.{class}.count")), GgufValue::U32(set.count as u32));
        w.set(&key(&format!("data.{class}.train")), GgufValue::U32(set.train as u32));
        w.set(&key(&format!("data.{class}.held_out")), GgufValue::U32(set.held_out as u32));
    }
    w.set(&key("data.template"), s(&cal.data.template));
    if let Some(system) = &cal.data.system_prompt {
        w.set(&key("data.system_prompt"), s(system));
    }
    if let Some(seed) = cal.data.seed {
        w.set(&key("data.seed"), GgufValue::U64(seed));
    }
}

struct Reader<'a>(&'a GgufFile);

impl Reader<'_> {
    fn str(&self, name: &str) -> Result<String> {
        match self.0.get(&key(name)) {
            Some(GgufValue::Str(s)) => Ok(s),
            _ => bail!("metadata {} is missing or not a string", key(name)),
        }
    }

    fn uint(&self, name: &str) -> Result<u64> {
        match self.0.get(&key(name)) {
            Some(GgufValue::U32(v)) => Ok(v as u64),
            Some(GgufValue::U64(v)) => Ok(v),
            _ => bail!("metadata {} is missing or not an unsigned integer", key(name)),
        }
    }

    fn floats(&self, name: &str, n_layer: usize) -> Result<Vec<f32>> {
        match self.0.get(&key(name)) {
            Some(GgufValue::F32Array(v)) if v.len() == n_layer => Ok(v),
            _ => bail!("metadata {} is missing or not {n_layer} floats", key(name)),
        }
    }

    /// An optional vector of `n_embd` values, each finite and within ±[`MAX_VALUE`].
    fn vector(&self, name: &str, n_embd: usize) -> Result<Option<Vec<f32>>> {
        match self.0.get(&key(name)) {
            Some(GgufValue::F32Array(v)) if v.len() == n_embd && v.iter().all(|x| x.abs() <= MAX_VALUE) => Ok(Some(v)),
            Some(_) => bail!("metadata {} is not {n_embd} finite values within ±{MAX_VALUE:e}", key(name)),
            None => Ok(None),
        }
    }

    fn data_set(&self, class: &str) -> Result<DataSet> {
        Ok(DataSet {
            file: self.str(&format!("data.{class}.file"))?,
            sha256: self.str(&format!("data.{class}.sha256"))?,
            count: self.uint(&format!("data.{class}.count"))? as usize,
            train: self.uint(&format!("data.{class}.train"))? as usize,
            held_out: self.uint(&format!("data.{class}.held_out"))? as usize,
        })
    }
}

fn read_calibration(file: &GgufFile, directions: &BTreeMap<usize, Vec<f32>>) -> Result<Calibration> {
    let r = Reader(file);
    let model = ModelIdentity {
        architecture: r.str("model.architecture")?,
        name: r.str("model.name")?,
        n_embd: r.uint("model.n_embd")? as usize,
        n_layer: r.uint("model.n_layer")? as usize,
        file_size: r.uint("model.file_size")?,
        sha256: r.str("model.sha256")?,
    };
    let n = model.n_layer;
    let [bias, accuracy, tpr, fpr, srv_norm, mean_norm] =
        ["gate.bias", "gate.accuracy", "gate.tpr", "gate.fpr", "srv_norm", "mean_norm"].map(|k| r.floats(k, n));
    let (bias, accuracy, tpr, fpr, srv_norm, mean_norm) = (bias?, accuracy?, tpr?, fpr?, srv_norm?, mean_norm?);
    // Files from before cross-validation have no worst-family figure.
    let worst_tpr = r.floats("gate.worst_tpr", n).unwrap_or_else(|_| vec![f32::NAN; n]);
    if let Some(i) = bias.iter().position(|b| !b.is_finite()) {
        bail!("gate bias of layer {i} is not finite");
    }
    let layers = directions
        .keys()
        .filter(|&&l| l < n)
        .map(|&l| LayerStats {
            layer: l,
            bias: bias[l],
            accuracy: accuracy[l],
            tpr: tpr[l],
            fpr: fpr[l],
            srv_norm: srv_norm[l],
            mean_norm: mean_norm[l],
            worst_tpr: worst_tpr[l],
        })
        .collect();
    let gate_layer = r.uint("gate.layer")? as usize;
    if !directions.contains_key(&gate_layer) {
        bail!("its gate layer {gate_layer} has no direction");
    }
    let seed = r.uint("data.seed").ok();
    let robust_rho = match file.get(&key("gate.robust_rho")) {
        Some(GgufValue::F32(rho)) if rho.is_finite() && rho >= 0.0 => Some(rho),
        Some(_) => bail!("metadata {} is not a finite, non-negative float", key("gate.robust_rho")),
        None => None,
    };
    let gate = read_gate_fit(&r, n, directions.values().next().map_or(0, Vec::len))?;
    Ok(Calibration {
        gate,
        kind: r.str("kind")?,
        tool_version: r.str("tool_version")?,
        gate_layer,
        robust_rho,
        layers,
        model,
        data: DataIdentity {
            harmful: r.data_set("harmful")?,
            harmless: r.data_set("harmless")?,
            template: r.str("data.template")?,
            system_prompt: r.str("data.system_prompt").ok(),
            seed,
        },
    })
}

fn read_gate_fit(r: &Reader, n_layer: usize, n_embd: usize) -> Result<GateFit> {
    let offset = r.uint("gate.offset").unwrap_or(0) as usize;
    let direction = r.vector("gate.direction", n_embd)?;
    let families: Vec<String> = match r.str("gate.families") {
        Ok(s) if !s.is_empty() => s.split(',').map(String::from).collect(),
        _ => Vec::new(),
    };
    let family_tpr = if families.is_empty() {
        Vec::new()
    } else {
        r.floats("gate.family_tpr", families.len() * n_layer)?.chunks(n_layer).map(<[f32]>::to_vec).collect()
    };
    let held_out = match (r.0.get(&key("gate.held_out_tpr")), r.0.get(&key("gate.held_out_fpr"))) {
        (Some(GgufValue::F32(t)), Some(GgufValue::F32(f))) => Some((t, f)),
        _ => None,
    };
    let (terms, bias) = match r.str("gate.terms") {
        Ok(list) => {
            let terms = list
                .split(';')
                .enumerate()
                .map(|(i, text)| {
                    let weights = match r.0.get(&key(&format!("gate.term.{i}"))) {
                        Some(GgufValue::F32Array(w)) => w,
                        _ => bail!("metadata {} is missing or not floats", key(&format!("gate.term.{i}"))),
                    };
                    let term = Term::parse(text, weights, n_embd)?;
                    if term.layer == 0 || term.layer + 1 >= n_layer {
                        bail!("gate term {text} reads layer {}, which a gate cannot read in a {n_layer}-layer model", term.layer);
                    }
                    if term.weights.iter().any(|w| !(w.abs() <= MAX_VALUE)) {
                        bail!("gate term {text} holds a weight beyond ±{MAX_VALUE:e}");
                    }
                    Ok(term)
                })
                .collect::<Result<Vec<_>>>()?;
            let bias = match r.0.get(&key("gate.terms_bias")) {
                Some(GgufValue::F32(b)) if b.is_finite() => b,
                _ => bail!("metadata {} is missing or not a finite float", key("gate.terms_bias")),
            };
            (terms, Some(bias))
        }
        Err(_) => (Vec::new(), None),
    };
    let context_floor = match r.0.get(&key("gate.context_floor")) {
        None => None,
        Some(GgufValue::F32(f)) if f.is_finite() && !terms.is_empty() => Some(f),
        Some(_) => bail!("metadata {} is not a finite float beside gate terms", key("gate.context_floor")),
    };
    let chosen = match (r.0.get(&key("gate.chosen_family_tpr")), r.0.get(&key("gate.chosen_fpr"))) {
        (Some(GgufValue::F32Array(t)), Some(GgufValue::F32Array(f))) if t.len() == families.len() => Some((t, f)),
        _ => None,
    };
    Ok(GateFit { offset, direction, families, family_tpr, held_out, terms, bias, context_floor, chosen })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steering_directions_round_trip_and_default_to_the_directions() {
        let dir = tempfile::tempdir().unwrap();
        let directions: BTreeMap<usize, Vec<f32>> = (1..4).map(|l| (l, vec![1.0, 0.0])).collect();
        let steering = BTreeMap::from([(2, vec![0.0, 1.0])]);
        let path = dir.path().join("v.gguf");
        VectorFile { model_hint: "qwen2".into(), layer_count: 3, n_embd: 2, directions, steering, calibration: None, defaults: None }.write(&path).unwrap();
        let back = VectorFile::read(&path).unwrap();
        assert_eq!(back.steer_direction(2).unwrap(), &[0.0, 1.0]);
        assert_eq!(back.steer_direction(3).unwrap(), &[1.0, 0.0], "a layer without its own steering direction shifts along its direction");
        assert_eq!(back.direction(2).unwrap(), &[1.0, 0.0], "what llama.cpp loads is unchanged");
        assert!(back.steer_direction(7).is_err());
    }
}
