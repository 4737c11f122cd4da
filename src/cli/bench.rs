//! `inferalign bench`: our work against plain llama.cpp work on the same
//! model, prompts and threads, in one run; medians of several runs.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};
use indicatif::ProgressBar;
use serde::Serialize;

use inferalign::capture::{capture, decode_prompts, CaptureHook, DecodeStats};
use inferalign::extract::steerable_layers;
use inferalign::llama::{Context, NoHook};
use inferalign::prompts::{prepare, read_prompts};

use super::ModelArgs;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Extraction (capture of every layer, shared prefix decoded once) vs plain batched prefill
    Extract(ExtractBench),
}

#[derive(Args)]
pub struct ExtractBench {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt files; prompts are taken from each in turn
    #[arg(long, required = true, num_args = 1..)]
    prompts: Vec<PathBuf>,
    /// Number of prompts
    #[arg(short = 'n', long, default_value_t = 128)]
    count: usize,
    /// Runs per mode (the median is reported)
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Print one JSON object
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Extract(args) => extract_bench(args),
    }
}

#[derive(Serialize)]
struct Mode {
    name: &'static str,
    tokens: usize,
    median_seconds: f64,
    median_tokens_per_second: f64,
    runs_seconds: Vec<f64>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn mode(name: &'static str, runs: &[DecodeStats]) -> Mode {
    Mode {
        name,
        tokens: runs[0].tokens,
        median_seconds: median(runs.iter().map(|r| r.seconds).collect()),
        median_tokens_per_second: median(runs.iter().map(|r| r.tokens_per_second()).collect()),
        runs_seconds: runs.iter().map(|r| r.seconds).collect(),
    }
}

fn extract_bench(args: ExtractBench) -> Result<()> {
    anyhow::ensure!(args.runs > 0 && args.count > 0, "--runs and --count must be at least 1");
    let files = args.prompts.iter().map(|p| read_prompts(p)).collect::<Result<Vec<_>>>()?;
    let mut prompts = Vec::new();
    for i in 0.. {
        if prompts.len() == args.count || files.iter().all(|f| i >= f.len()) {
            break;
        }
        prompts.extend(files.iter().filter_map(|f| f.get(i).cloned()).take(args.count - prompts.len()));
    }
    let model = args.model.load()?;
    let template = args.model.template(&model, None)?;
    let tokens = prepare(&model, &template, &prompts, args.model.ctx_size as usize)?;
    let params = args.model.context_params();
    let mut plain = Context::new(&model, &params, NoHook, false)?;
    let mut hooked = Context::new(&model, &params, CaptureHook::new(&model, &steerable_layers(&model)), true)?;
    let hidden = ProgressBar::hidden();

    let (mut plain_runs, mut capture_runs, mut extract_runs) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..args.runs {
        eprintln!("run {}/{}", run + 1, args.runs);
        plain_runs.push(decode_prompts(&mut plain, &tokens, false, &hidden)?);
        capture_runs.push(capture(&mut hooked, &tokens, false, &hidden)?.1);
        extract_runs.push(capture(&mut hooked, &tokens, true, &hidden)?.1);
    }
    let modes = [
        mode("plain prefill (no callback)", &plain_runs),
        mode("capture, no prefix reuse", &capture_runs),
        mode("extract (capture + prefix reuse)", &extract_runs),
    ];
    let base = &modes[0];
    let report = serde_json::json!({
        "model": model.path.display().to_string(),
        "prompts": prompts.len(),
        "threads": params.n_threads,
        "batch_size": params.n_batch,
        "runs": args.runs,
        "modes": modes,
        "capture_throughput_ratio": modes[1].median_tokens_per_second / base.median_tokens_per_second,
        "extract_throughput_ratio": modes[2].median_tokens_per_second / base.median_tokens_per_second,
        "extract_wall_time_ratio": modes[2].median_seconds / base.median_seconds,
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("{} prompts, {} threads, medians of {} runs", prompts.len(), params.n_threads, args.runs);
    println!("{:<34} {:>8} {:>10} {:>10} {:>8} {:>8}", "mode", "tokens", "seconds", "tok/s", "tok/s x", "time x");
    for m in &modes {
        println!(
            "{:<34} {:>8} {:>10.2} {:>10.1} {:>8.3} {:>8.3}",
            m.name,
            m.tokens,
            m.median_seconds,
            m.median_tokens_per_second,
            m.median_tokens_per_second / base.median_tokens_per_second,
            m.median_seconds / base.median_seconds
        );
    }
    Ok(())
}
