//! Subcommands and the options they share.

mod bench;
mod bench_serve;
mod chat;
mod classify;
mod eval;
mod extract;
mod generate;
mod inspect;
mod judge_check;
mod serve;
mod steer_args;
mod sweep;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use inferalign::llama::{default_threads, ContextParams, Model};
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
    /// Interactive chat with the gate and the shift; each user turn is gated on its own
    Chat(chat::ChatArgs),
    /// Evaluate plain, always-on and gated modes: attack success, jailbreaks, harmless refusals, utility
    Eval(eval::EvalArgs),
    /// Sweep steering strength and layers in gated mode; pick and optionally store the best point
    Sweep(sweep::SweepArgs),
    /// Check the refusal judge against human-labelled responses
    JudgeCheck(judge_check::JudgeCheckArgs),
    /// OpenAI-compatible HTTP server; each request is gated on its own, even in a shared batch
    Serve(serve::ServeArgs),
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
    #[arg(short = 'c', long, default_value_t = 4096)]
    pub ctx_size: u32,
    /// Tokens per llama_decode call
    #[arg(short = 'b', long, default_value_t = 512)]
    pub batch_size: u32,
    /// CPU threads (default: all cores)
    #[arg(short = 't', long)]
    pub threads: Option<i32>,
    /// Layers to offload to the GPU (CUDA/Metal/Vulkan builds)
    #[arg(long, short = 'g', default_value_t = 0)]
    pub n_gpu_layers: u32,
}

impl ModelArgs {
    pub fn load(&self) -> Result<Model> {
        Model::load(&self.model, self.n_gpu_layers)
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

/// A progress bar on stderr (hidden when stderr is not a terminal).
pub fn progress(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{msg:>10} [{bar:30}] {pos}/{len} prompts, {elapsed} (eta {eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}
