//! The guard's configuration, one for the CLI, the server, the C ABI and the
//! tests: which vector files, how strong, which layers, which mode. What is
//! not given comes from the vector files, and nothing is guessed.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};

use crate::gate::Gate;
use crate::llama::Model;
use crate::prompts::Template;
use crate::steer::{format_layers, Mode, SteerHook, Steering};
use crate::vectors::{Strength, VectorFile};

/// What a caller asks for; `None` means "what the vector file says".
#[derive(Clone, Debug)]
pub struct GuardConfig {
    /// The target model's own SRV file (from `extract`); None: the shipped file for the model.
    pub gate: Option<PathBuf>,
    /// Steering vectors, e.g. of an aligned model of the same shape; None: the gate file.
    pub steer: Option<PathBuf>,
    pub strength: Option<Strength>,
    pub layers: Option<Vec<usize>>,
    pub gate_layer: Option<usize>,
    pub bias: Option<f32>,
    pub mode: Mode,
    /// Accept files recorded for another architecture when the shapes match.
    pub any_model: bool,
}

impl Default for GuardConfig {
    fn default() -> GuardConfig {
        GuardConfig { gate: None, steer: None, strength: None, layers: None, gate_layer: None, bias: None, mode: Mode::Gated, any_model: false }
    }
}

/// The model as the guard sees it.
pub struct ModelShape<'a> {
    pub n_embd: usize,
    pub n_layer: usize,
    /// `general.architecture`; empty when unknown.
    pub arch: String,
    /// The model file, to find shipped vectors by; None for a model an application loaded.
    pub path: Option<&'a Path>,
}

impl<'a> ModelShape<'a> {
    pub fn of(model: &'a Model) -> ModelShape<'a> {
        ModelShape { n_embd: model.n_embd(), n_layer: model.n_layer(), arch: model.meta("general.architecture").unwrap_or_default(), path: Some(&model.path) }
    }
}

/// A resolved guard: its files, gate, steering and mode.
#[derive(Clone)]
pub struct Guard {
    pub gate_file: VectorFile,
    pub gate_path: PathBuf,
    pub steer_path: PathBuf,
    pub gate: Gate,
    pub steering: Steering,
    pub mode: Mode,
    /// The chat template's opening; requests start where they leave it (see [`Guard::use_template`]).
    pub opening: Vec<i32>,
    /// The template's user header: the gate reads the last user turn apart too.
    user_header: Vec<i32>,
}

impl GuardConfig {
    pub fn resolve(&self, shape: &ModelShape) -> Result<Guard> {
        let gate_path = match (&self.gate, shape.path) {
            (Some(path), _) => path.clone(),
            (None, Some(model)) => crate::shipped::vectors_for(model)?,
            (None, None) => bail!("no gate vector file given"),
        };
        let gate_file = self.read(&gate_path, shape)?;
        let gate = Gate::from_file(&gate_file, self.gate_layer, self.bias)?;
        let (steer_file, steer_path) = match &self.steer {
            Some(path) => (self.read(path, shape)?, path.clone()),
            None => (gate_file.clone(), gate_path.clone()),
        };
        let recorded = steer_file.defaults.clone().or_else(|| gate_file.defaults.clone());
        let no_defaults = || {
            format!(
                "{} holds no steering defaults, and a guessed strength could break answers: pass --strength (or --alpha) and --layers, or re-run `inferalign extract`, which chooses them with a generation check",
                steer_path.display()
            )
        };
        let plain = self.mode == Mode::Plain;
        let strength = match self.strength.or(recorded.as_ref().map(|d| d.strength)) {
            Some(s) => s,
            None if plain => Strength::Alpha(0.0),
            None => bail!(no_defaults()),
        };
        let layers = match (&self.layers, recorded) {
            (Some(layers), _) => layers.clone(),
            (None, Some(d)) => d.layers,
            (None, None) if plain => vec![1],
            (None, None) => bail!(no_defaults()),
        };
        let steering = Steering::new(&steer_file, strength, &layers, shape.n_layer).with_context(|| format!("cannot steer with {}", steer_path.display()))?;
        Ok(Guard { gate_file, gate_path, steer_path, gate, steering, mode: self.mode, opening: Vec::new(), user_header: Vec::new() })
    }

    /// A vector file that fits the model: its shape, and its architecture unless `any_model`.
    fn read(&self, path: &Path, shape: &ModelShape) -> Result<VectorFile> {
        let file = VectorFile::read(path)?;
        file.check_shape(shape, self.any_model)
            .with_context(|| format!("vector file {} does not fit this model", path.display()))?;
        Ok(file)
    }
}

impl Guard {
    pub fn hook(&self, n_seq: usize) -> Result<SteerHook> {
        self.hook_for(self.mode, n_seq)
    }

    pub fn hook_for(&self, mode: Mode, n_seq: usize) -> Result<SteerHook> {
        self.hook_with(mode, self.gate.clone(), self.steering.clone(), n_seq)
    }

    /// A hook with this guard's template opening and another gate or steering.
    pub fn hook_with(&self, mode: Mode, gate: Gate, steering: Steering, n_seq: usize) -> Result<SteerHook> {
        let mut hook = SteerHook::new(mode, Some(gate), steering, n_seq)?;
        hook.set_opening(self.opening.clone());
        hook.set_user_header(self.user_header.clone());
        Ok(hook)
    }

    /// Requests are templated with `template`: the gate reads each from its first turn on.
    pub fn use_template(&mut self, model: &Model, template: &Template) -> Result<()> {
        self.opening = template.opening(model)?;
        self.user_header = template.user_header(model)?;
        Ok(())
    }

    /// The template the gate was calibrated with, if recorded.
    pub fn recorded_template(&self) -> Option<&str> {
        self.gate_file.calibration.as_ref().map(|c| c.data.template.as_str())
    }

    pub fn describe(&self) -> String {
        format!(
            "mode {:?}, gate {} bias {:.3} ({}), steer {} on layers {} ({})",
            self.mode,
            self.gate.describe(),
            self.gate.bias,
            self.gate_path.display(),
            describe_strength(self.steering.strength),
            format_layers(&self.steering.layers),
            self.steer_path.display()
        )
    }
}

pub fn describe_strength(strength: Strength) -> String {
    match strength {
        Strength::Alpha(a) => format!("alpha {a}"),
        Strength::Relative(s) => format!("strength {s} x mean |a_l|"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vectors::SteerDefaults;

    fn file(dir: &Path, name: &str, hint: &str, defaults: Option<SteerDefaults>) -> PathBuf {
        let directions = (1..4).map(|l| (l, vec![0.5, 0.5])).collect();
        let path = dir.join(name);
        VectorFile { model_hint: hint.into(), layer_count: 3, n_embd: 2, directions, steering: Default::default(), calibration: None, defaults }.write(&path).unwrap();
        path
    }

    #[test]
    fn options_resolve_from_flags_then_the_file_and_never_a_guess() {
        let dir = tempfile::tempdir().unwrap();
        let shape = ModelShape { n_embd: 2, n_layer: 4, arch: "qwen2".into(), path: None };
        let bare = file(dir.path(), "bare.gguf", "qwen2", None);
        let with = file(dir.path(), "with.gguf", "qwen2", Some(SteerDefaults { strength: Strength::Relative(0.2), layers: vec![2, 3] }));
        let config = |gate: &Path, mode: Mode| GuardConfig { gate: Some(gate.into()), gate_layer: Some(1), bias: Some(0.0), mode, ..GuardConfig::default() };

        let err = config(&bare, Mode::Gated).resolve(&shape).err().unwrap().to_string();
        assert!(err.contains("holds no steering defaults"), "{err}");
        assert!(config(&bare, Mode::Plain).resolve(&shape).is_ok(), "plain decoding needs no strength");
        let given = GuardConfig { strength: Some(Strength::Alpha(2.0)), layers: Some(vec![3]), ..config(&bare, Mode::Always) };
        let g = given.resolve(&shape).unwrap();
        assert_eq!((g.steering.strength, g.steering.layers.clone()), (Strength::Alpha(2.0), vec![3]));
        // A relative strength from the file needs the file's activation norms, which this one lacks.
        assert!(config(&with, Mode::Gated).resolve(&shape).err().unwrap().to_string().contains("cannot steer"));
        let flags_win = GuardConfig { strength: Some(Strength::Alpha(1.0)), ..config(&with, Mode::Gated) };
        assert_eq!(flags_win.resolve(&shape).unwrap().steering.layers, vec![2, 3], "layers from the file, strength from the flag");

        let other = file(dir.path(), "other.gguf", "gemma3", None);
        let plain = config(&other, Mode::Plain);
        assert!(format!("{:#}", plain.resolve(&shape).err().unwrap()).contains("made for a gemma3 model"));
        assert!(GuardConfig { any_model: true, ..plain }.resolve(&shape).is_ok());
        let no_gate = GuardConfig { mode: Mode::Plain, ..GuardConfig::default() };
        assert!(no_gate.resolve(&shape).err().unwrap().to_string().contains("no gate vector file"));
    }
}
