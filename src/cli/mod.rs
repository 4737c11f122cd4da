//! Subcommands and the options they share.

mod bench;
mod bench_moderation;
mod bench_serve;
mod calibrate;
mod chat;
mod classify;
mod drift;
mod eval;
mod extract;
mod finetune;
mod generate;
mod inspect;
mod judge_check;
mod serve;
mod steer_args;
mod sweep;

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use inferalign::llama::{default_threads, ContextParams, LoadOptions, Model};
use inferalign::prompts::Template;

#[derive(Parser)]
#[command(name = "inferalign", version, about = "Inference-time alignment for GGUF models: gate harmful requests and steer them with safety vectors inside llama.cpp")]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Extract safety-related vectors and calibrate the gate from harmful and harmless prompts
    Extract(extract::ExtractArgs),
    /// Show what a vector file holds (ours or llama.cpp's cvector-generator's)
    Inspect(inspect::InspectArgs),
    /// Run the gate alone on prompts: harmful or not, with scores
    Classify(classify::ClassifyArgs),
    /// Answer prompts with the gate and the safety shift inside llama.cpp's graph
    Generate(generate::GenerateArgs),
    /// Interactive chat with the gate and the shift; each user turn is gated with the conversation before it
    Chat(chat::ChatArgs),
    /// Evaluate plain, always-on and gated modes: attack success, jailbreaks, harmless refusals, utility
    Eval(eval::EvalArgs),
    /// Sweep steering strength and layers in gated mode; pick and optionally store the best point
    Sweep(sweep::SweepArgs),
    /// Check the refusal judge against human-labelled responses
    JudgeCheck(judge_check::JudgeCheckArgs),
    /// OpenAI-compatible HTTP server; each request is gated on its own, even in a shared batch
    Serve(serve::ServeArgs),
    /// Re-fit a gate's bias and layer for a target model, optionally certified against activation drift
    Calibrate(calibrate::CalibrateArgs),
    /// Harmful embedding drift: how far a fine-tune's hidden states moved from its aligned parent's, per layer
    #[command(mut_arg("model", |a| a.long("target").value_name("TARGET").help("The target GGUF: a fine-tune of the aligned model, or the aligned model itself with --lora")))]
    Drift(drift::DriftArgs),
    /// Train a LoRA adapter on chat pairs (plainly or with Vaccine alignment), written as llama.cpp's LoRA GGUF
    Finetune(finetune::FinetuneArgs),
    /// Measure speed against plain llama.cpp work on the same model, in one run
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Extract(args) => extract::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Classify(args) => classify::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Chat(args) => chat::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Sweep(args) => sweep::run(args),
        Command::JudgeCheck(args) => judge_check::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Calibrate(args) => calibrate::run(args),
        Command::Drift(args) => drift::run(args),
        Command::Finetune(args) => finetune::run(args),
        Command::Bench(cmd) => bench::run(cmd),
    }
}

/// Options of every command that runs a model.
#[derive(Args, Clone, Debug)]
pub struct ModelArgs {
    /// GGUF model file
    #[arg(short, long)]
    pub model: PathBuf,
    /// Chat template: a llama.cpp built-in name (chatml, gemma, llama3, ...) or `raw`; default: the model's own
    #[arg(long)]
    pub template: Option<String>,
    /// System prompt placed before each user turn
    #[arg(long)]
    pub system_prompt: Option<String>,
    /// Context size in tokens; longer prompts are an error
    #[arg(short = 'c', long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(64..))]
    pub ctx_size: u32,
    /// Tokens per llama_decode call (at least 64, as llama.cpp needs)
    #[arg(short = 'b', long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(64..))]
    pub batch_size: u32,
    /// CPU threads (default: all cores)
    #[arg(short = 't', long)]
    pub threads: Option<i32>,
    /// Layers to offload to the GPU (CUDA/Metal/Vulkan builds)
    #[arg(long, short = 'g', default_value_t = 0)]
    pub n_gpu_layers: u32,
    /// LoRA adapter (llama.cpp LoRA GGUF) applied to the model; repeatable
    #[arg(long)]
    pub lora: Vec<PathBuf>,
    /// Scale of the LoRA adapter given in the same position (default 1); repeatable
    #[arg(long, allow_hyphen_values = true)]
    pub lora_scale: Vec<f32>,
    /// Let llama.cpp repack weights for faster CPU matmuls; commands that need
    /// answers independent of the batch turn it off.
    #[arg(skip = true)]
    pub weight_repack: bool,
}

impl ModelArgs {
    pub fn load(&self) -> Result<Model> {
        if self.lora_scale.len() > self.lora.len() {
            bail!("{} --lora-scale values for {} --lora adapters: give one scale per adapter, in the same order", self.lora_scale.len(), self.lora.len());
        }
        let options = LoadOptions { n_gpu_layers: self.n_gpu_layers, weight_repack: self.weight_repack };
        let mut model = Model::load_with(&self.model, options)?;
        for (i, path) in self.lora.iter().enumerate() {
            let scale = self.lora_scale.get(i).copied().unwrap_or(1.0);
            if !scale.is_finite() {
                bail!("--lora-scale must be a finite number");
            }
            model.add_lora(path, scale)?;
        }
        Ok(model)
    }

    /// The same options as arguments, for a child `inferalign` process.
    pub fn as_args(&self) -> Vec<std::ffi::OsString> {
        let mut args: Vec<std::ffi::OsString> = vec!["-m".into(), self.model.clone().into()];
        let mut push = |flag: &str, value: String| args.extend([flag.into(), value.into()]);
        push("-c", self.ctx_size.to_string());
        push("-b", self.batch_size.to_string());
        push("-g", self.n_gpu_layers.to_string());
        self.threads.inspect(|t| push("-t", t.to_string()));
        self.template.iter().for_each(|t| push("--template", t.clone()));
        self.system_prompt.iter().for_each(|p| push("--system-prompt", p.clone()));
        self.lora.iter().for_each(|l| push("--lora", l.display().to_string()));
        self.lora_scale.iter().for_each(|s| push("--lora-scale", s.to_string()));
        args
    }

    pub fn context_params(&self) -> ContextParams {
        ContextParams {
            n_ctx: self.ctx_size,
            n_batch: self.batch_size.min(self.ctx_size),
            n_threads: self.threads.unwrap_or_else(default_threads),
            ..ContextParams::default()
        }
    }

    /// The template to use; `recorded` is the one a vector file was made with.
    pub fn template(&self, model: &Model, recorded: Option<&str>) -> Result<Template> {
        let requested = self.template.as_deref().or(recorded.filter(|t| *t != "model"));
        let template = Template::resolve(model, requested, self.system_prompt.clone())?;
        eprintln!("chat template: {}", describe_template(&template));
        Ok(template)
    }
}

fn describe_template(t: &Template) -> String {
    match t.name.as_str() {
        "model" => "the model's own".into(),
        "raw" => "none (raw prompts)".into(),
        name => format!("llama.cpp built-in '{name}'"),
    }
}

/// Clap parser for options that must be a finite number >= 0.
pub fn non_negative(text: &str) -> std::result::Result<f32, String> {
    match text.parse::<f32>() {
        Ok(x) if x.is_finite() && x >= 0.0 => Ok(x),
        _ => Err(format!("{text:?} is not a finite number >= 0")),
    }
}

/// A progress bar over prompts on stderr (hidden when stderr is not a terminal).
pub fn progress(len: u64, what: &str) -> ProgressBar {
    progress_of(len, what, "prompts")
}

/// A progress bar over `unit`s labelled `what`; its message, when set, follows the count.
pub fn progress_of(len: u64, what: &str, unit: &str) -> ProgressBar {
    let template = format!("{{prefix:>10}} [{{bar:30}}] {{pos}}/{{len}} {unit}{{msg}}, {{elapsed}} (eta {{eta}})");
    let bar = ProgressBar::new(len);
    bar.set_style(ProgressStyle::with_template(&template).expect("valid template").progress_chars("=> "));
    bar.set_prefix(what.to_string());
    bar
}
