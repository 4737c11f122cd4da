//! Options shared by every command that steers: which vectors, how strong,
//! where, and in which mode.

use std::path::PathBuf;

use anyhow::{bail, Context as _, Result};
use clap::{Args, ValueEnum};

use inferalign::gate::Gate;
use inferalign::llama::Model;
use inferalign::prompts::Template;
use inferalign::steer::{format_layers, parse_layers, Mode, SteerHook, Steering};
use inferalign::vectors::{Strength, VectorFile};

use super::ModelArgs;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// No hook at all: plain llama.cpp
    Plain,
    /// Steer only requests the gate flags as harmful (InferAligner)
    Gated,
    /// Steer every request, as llama.cpp's control vectors do
    Always,
}

impl From<ModeArg> for Mode {
    fn from(m: ModeArg) -> Mode {
        match m {
            ModeArg::Plain => Mode::Plain,
            ModeArg::Gated => Mode::Gated,
            ModeArg::Always => Mode::Always,
        }
    }
}

#[derive(Args, Clone, Debug)]
pub struct SteerArgs {
    /// Gate vectors: the target model's own SRV file (from `extract`); default: the shipped file for this model
    #[arg(long)]
    pub gate: Option<PathBuf>,
    /// Steering vectors (SSV), e.g. from an aligned model with the same width and depth; default: the gate file (self-guidance)
    #[arg(long)]
    pub steer: Option<PathBuf>,
    /// Steering strength as an absolute scale: alpha * unit vector added per layer (default: the vector file's)
    #[arg(long, allow_hyphen_values = true, conflicts_with = "strength")]
    pub alpha: Option<f32>,
    /// Steering strength relative to each steered layer's mean activation norm, e.g. 0.15 (default: the vector file's)
    #[arg(long, allow_hyphen_values = true)]
    pub strength: Option<f32>,
    /// Layers to steer: a-b, or a,b,c, or a mix (default: the vector file's)
    #[arg(long)]
    pub layers: Option<String>,
    /// Gate layer (default: the gate file's l0)
    #[arg(long)]
    pub gate_layer: Option<usize>,
    /// Gate bias (default: the gate file's calibrated bias); larger is more cautious
    #[arg(long, allow_hyphen_values = true)]
    pub bias: Option<f32>,
    /// Accept vector files recorded for another architecture when the shapes match
    #[arg(long)]
    pub any_model: bool,
}

/// The resolved vectors for a target model.
pub struct Resolved {
    pub gate_file: VectorFile,
    pub gate_path: PathBuf,
    pub steer_path: PathBuf,
    pub gate: Gate,
    pub steering: Steering,
    pub mode: Mode,
}

impl SteerArgs {
    fn check_fits(&self, file: &VectorFile, model: &Model, path: &std::path::Path) -> Result<()> {
        match self.any_model {
            true => file.check_dims(model.n_embd(), model.n_layer()).with_context(|| format!("vector file {} does not fit this model", path.display())),
            false => file.check_fits(model, path),
        }
    }

    pub fn resolve(&self, model: &Model, mode: Mode) -> Result<Resolved> {
        let gate_path = match &self.gate {
            Some(path) => path.clone(),
            None => inferalign::shipped::vectors_for(model)?,
        };
        let gate_file = VectorFile::read(&gate_path)?;
        self.check_fits(&gate_file, model, &gate_path)?;
        let gate = Gate::from_file(&gate_file, self.gate_layer, self.bias)?;
        let (steer_file, steer_path) = match &self.steer {
            Some(path) => {
                let file = VectorFile::read(path)?;
                self.check_fits(&file, model, path)?;
                (file, path.clone())
            }
            None => (gate_file.clone(), gate_path.clone()),
        };
        let recorded = steer_file.defaults.clone().or_else(|| gate_file.defaults.clone());
        let given = self.alpha.map(Strength::Alpha).or(self.strength.map(Strength::Relative));
        let no_defaults = || {
            format!(
                "{} holds no steering defaults, and a guessed strength could break answers: pass --strength (or --alpha) and --layers, or re-run `inferalign extract`, which chooses them with a generation check",
                steer_path.display()
            )
        };
        let strength = match given.or(recorded.as_ref().map(|d| d.strength)) {
            Some(s) => s,
            None if mode == Mode::Plain => Strength::Alpha(0.0),
            None => bail!(no_defaults()),
        };
        let layers = match (&self.layers, recorded) {
            (Some(spec), _) => parse_layers(spec)?,
            (None, Some(d)) => d.layers,
            (None, None) if mode == Mode::Plain => vec![1],
            (None, None) => bail!(no_defaults()),
        };
        let steering = Steering::new(&steer_file, strength, &layers, model.n_layer())
            .with_context(|| format!("cannot steer with {}", steer_path.display()))?;
        Ok(Resolved { gate_file, gate_path, steer_path, gate, steering, mode })
    }
}

impl Resolved {
    pub fn hook(&self, n_seq: usize) -> Result<SteerHook> {
        self.hook_for(self.mode, n_seq)
    }

    pub fn hook_for(&self, mode: Mode, n_seq: usize) -> Result<SteerHook> {
        SteerHook::new(mode, Some(self.gate.clone()), self.steering.clone(), n_seq)
    }

    /// The template the gate was calibrated with, if recorded.
    pub fn recorded_template(&self) -> Option<&str> {
        self.gate_file.calibration.as_ref().map(|c| c.data.template.as_str())
    }

    pub fn describe(&self) -> String {
        let layers = &self.steering.layers;
        format!(
            "mode {:?}, gate layer {} (token {} before the last) bias {:.3} ({}), steer {} on layers {} ({})",
            self.mode,
            self.gate.layer,
            self.gate.offset,
            self.gate.bias,
            self.gate_path.display(),
            describe_strength(self.steering.strength),
            format_layers(layers),
            self.steer_path.display()
        )
    }
}

/// The model, its vectors and the mode: what every command that answers requests takes.
#[derive(Args)]
pub struct GuardArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub steer: SteerArgs,
    /// plain: no hook; gated: InferAligner; always: shift every request
    #[arg(long, value_enum, default_value_t = ModeArg::Gated)]
    pub mode: ModeArg,
}

impl GuardArgs {
    /// Loads the model and resolves its vectors and chat template, saying which.
    pub fn open(&self) -> Result<(Model, Resolved, Template)> {
        let model = self.model.load()?;
        let resolved = self.steer.resolve(&model, self.mode.into())?;
        eprintln!("{}", resolved.describe());
        let template = self.model.template(&model, resolved.recorded_template())?;
        Ok((model, resolved, template))
    }
}

pub fn describe_strength(strength: Strength) -> String {
    match strength {
        Strength::Alpha(a) => format!("alpha {a}"),
        Strength::Relative(s) => format!("strength {s} x mean |a_l|"),
    }
}

