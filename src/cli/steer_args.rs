//! Options shared by every command that steers: which vectors, how strong,
//! where, and in which mode.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, ValueEnum};

use inferalign::guard::{Guard, GuardConfig, ModelShape};
use inferalign::llama::Model;
use inferalign::prompts::Template;
use inferalign::steer::{parse_layers, Mode};
use inferalign::vectors::Strength;

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

impl SteerArgs {
    /// These options as the library's guard configuration, in `mode`.
    pub fn config(&self, mode: Mode) -> Result<GuardConfig> {
        Ok(GuardConfig {
            gate: self.gate.clone(),
            steer: self.steer.clone(),
            strength: self.alpha.map(Strength::Alpha).or(self.strength.map(Strength::Relative)),
            layers: self.layers.as_deref().map(parse_layers).transpose()?,
            gate_layer: self.gate_layer,
            bias: self.bias,
            mode,
            any_model: self.any_model,
        })
    }

    pub fn resolve(&self, model: &Model, mode: Mode) -> Result<Guard> {
        self.config(mode)?.resolve(&ModelShape::of(model))
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
    pub fn open(&self) -> Result<(Model, Guard, Template)> {
        let model = self.model.load()?;
        let mut resolved = self.steer.resolve(&model, self.mode.into())?;
        eprintln!("{}", resolved.describe());
        let template = self.model.template(&model, resolved.recorded_template())?;
        resolved.use_template(&model, &template)?;
        Ok((model, resolved, template))
    }
}
