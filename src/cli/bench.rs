//! `inferalign bench`: our work against plain llama.cpp work on the same
//! model, prompts and threads, in one run; medians of several runs.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};
use indicatif::ProgressBar;
use serde::Serialize;

use inferalign::capture::{capture, decode_prompts, CaptureHook, DecodeStats};
use inferalign::extract::steerable_layers;
use inferalign::generate::{Engine, RunStats, Sampling};
use inferalign::llama::{Context, NoHook};
use inferalign::steer::{Mode, SteerHook};
use inferalign::prompts::{prepare, read_prompts};

use super::steer_args::SteerArgs;
use super::ModelArgs;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Extraction (capture of every layer, shared prefix decoded once) vs plain batched prefill
    Extract(ExtractBench),
    /// Generation with the hook (gate closed, gate open) vs without, prefill and decode separately
    Generate(GenerateBench),
    /// Load test of `serve` on loopback: concurrent clients vs the same requests one at a time
    Serve(super::bench_serve::ServeBench),
    /// The moderation endpoint's inputs/s (one request of many inputs, one by one) against one-token chat requests, which run every layer
    Moderation(super::bench_moderation::ModerationBench),
}

#[derive(Args)]
pub struct GenerateBench {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    steer: SteerArgs,
    /// Prompt file
    #[arg(long)]
    prompts: PathBuf,
    /// Number of prompts
    #[arg(short = 'n', long, default_value_t = 8)]
    count: usize,
    /// Most tokens generated per prompt (an answer may end sooner; rates are per token)
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Runs per mode (the median is reported)
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Print one JSON object
    #[arg(long)]
    json: bool,
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
    /// Also time stock llama.cpp `llama-cvector-generator --method mean` (the whole process) on the same templated prompts, taken alternately as positive and negative
    #[arg(long, value_name = "PATH")]
    cvector_generator: Option<PathBuf>,
    /// Print one JSON object
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Extract(args) => extract_bench(args),
        BenchCommand::Generate(args) => generate_bench(args),
        BenchCommand::Serve(args) => super::bench_serve::serve_bench(args),
        BenchCommand::Moderation(args) => super::bench_moderation::moderation_bench(args),
    }
}

#[derive(Serialize)]
struct DecodeMode {
    name: &'static str,
    tokens: usize,
    median_seconds: f64,
    median_tokens_per_second: f64,
    runs_seconds: Vec<f64>,
}

/// The median; of an even count, the mean of the middle two (the upper one
/// alone would report the best of two runs).
pub(super) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n.is_multiple_of(2) { (v[n / 2 - 1] + v[n / 2]) / 2.0 } else { v[n / 2] }
}

fn mode(name: &'static str, runs: &[DecodeStats]) -> DecodeMode {
    DecodeMode {
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
    let prompts = in_turn(&files, args.count);
    let model = args.model.load()?;
    let template = args.model.template(&model, None)?;
    let tokens = prepare(&model, &template, &prompts, args.model.ctx_size as usize)?;
    let params = args.model.context_params();
    let mut plain = Context::new(&model, &params, NoHook, false)?;
    let mut hooked = Context::new(
        &model,
        &params,
        CaptureHook::new(&model, &steerable_layers(&model))?,
        true,
    )?;
    let hidden = ProgressBar::hidden();
    let stock = match &args.cvector_generator {
        Some(tool) => Some(StockRun::new(tool, &model, &template, &prompts, &params)?),
        None => None,
    };

    let (mut plain_runs, mut capture_runs, mut extract_runs, mut stock_runs) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for run in 0..args.runs {
        eprintln!("run {}/{}", run + 1, args.runs);
        plain_runs.push(decode_prompts(&mut plain, &tokens, &[0], &[], false, &hidden)?);
        capture_runs.push(capture(&mut hooked, &tokens, &[0], false, &hidden)?.1);
        extract_runs.push(capture(&mut hooked, &tokens, &[0], true, &hidden)?.1);
        if let Some(stock) = &stock {
            stock_runs.push(stock.seconds()?);
        }
    }
    let modes = [
        mode("plain prefill (no callback)", &plain_runs),
        mode("capture, no prefix reuse", &capture_runs),
        mode("extract (capture + prefix reuse)", &extract_runs),
    ];
    let base = &modes[0];
    let mut report = serde_json::json!({
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
    let stock_seconds = (!stock_runs.is_empty()).then(|| median(stock_runs.clone()));
    if let Some(seconds) = stock_seconds {
        report["stock_cvector_generator"] = serde_json::json!({"median_seconds": seconds, "runs_seconds": stock_runs});
        report["extract_vs_stock_wall_time_ratio"] = (modes[2].median_seconds / seconds).into();
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{} prompts, {} threads, medians of {} runs", prompts.len(), params.n_threads, args.runs);
        print_extract_table(&modes, stock_seconds);
    }
    Ok(())
}

/// Up to `count` prompts, one from each file in turn.
fn in_turn(files: &[Vec<String>], count: usize) -> Vec<String> {
    let longest = files.iter().map(Vec::len).max().unwrap_or(0);
    (0..longest).flat_map(|i| files.iter().filter_map(move |f| f.get(i).cloned())).take(count).collect()
}

/// Each mode against the first (plain prefill), and stock llama.cpp's wall time.
fn print_extract_table(modes: &[DecodeMode], stock_seconds: Option<f64>) {
    let base = &modes[0];
    println!("{:<34} {:>8} {:>10} {:>10} {:>8} {:>8}", "mode", "tokens", "seconds", "tok/s", "tok/s x", "time x");
    for m in modes {
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
    if let Some(seconds) = stock_seconds {
        println!("{:<34} {:>8} {:>10.2} {:>10} {:>8} {:>8.3}", "stock llama-cvector-generator", "-", seconds, "-", "-", seconds / base.median_seconds);
        println!("extract / stock wall time: {:.3}", modes[2].median_seconds / seconds);
    }
}

/// Stock `llama-cvector-generator --method mean` over the benchmark's
/// templated prompts, written as the positive and negative files it reads.
struct StockRun {
    tool: PathBuf,
    dir: tempfile::TempDir,
    args: Vec<String>,
}

impl StockRun {
    fn new(tool: &std::path::Path, model: &inferalign::llama::Model, template: &inferalign::prompts::Template, prompts: &[String], params: &inferalign::llama::ContextParams) -> Result<StockRun> {
        anyhow::ensure!(prompts.len().is_multiple_of(2), "--cvector-generator pairs the prompts: give an even --count");
        let dir = tempfile::tempdir()?;
        // The tool reads one prompt a line, with `\n` standing for a newline.
        let texts = prompts.iter().map(|p| Ok(template.apply_chat(model, &[("user", p)])?.replace('\n', "\\n"))).collect::<Result<Vec<_>>>()?;
        for (name, parity) in [("positive.txt", 0), ("negative.txt", 1)] {
            let lines: Vec<&str> = texts.iter().skip(parity).step_by(2).map(String::as_str).collect();
            std::fs::write(dir.path().join(name), lines.join("\n") + "\n")?;
        }
        let path = |name: &str| dir.path().join(name).display().to_string();
        let args = vec![
            "-m".into(), model.path.display().to_string(),
            "--positive-file".into(), path("positive.txt"),
            "--negative-file".into(), path("negative.txt"),
            "--method".into(), "mean".into(),
            "-t".into(), params.n_threads.to_string(),
            "-c".into(), params.n_ctx.to_string(),
            "-o".into(), path("out.gguf"),
        ];
        Ok(StockRun { tool: tool.to_path_buf(), dir, args })
    }

    /// Wall time of one whole run of the tool, model load included.
    fn seconds(&self) -> Result<f64> {
        let started = std::time::Instant::now();
        let out = std::process::Command::new(&self.tool)
            .args(&self.args)
            .current_dir(self.dir.path())
            .output()
            .map_err(|e| anyhow::anyhow!("could not run {}: {e}; pass the path of a built llama-cvector-generator", self.tool.display()))?;
        let seconds = started.elapsed().as_secs_f64();
        let stderr = String::from_utf8_lossy(&out.stderr);
        anyhow::ensure!(out.status.success(), "{} failed ({}): {}", self.tool.display(), out.status, stderr.lines().last().unwrap_or(""));
        Ok(seconds)
    }
}

#[derive(Serialize)]
struct GenMode {
    name: &'static str,
    median_prefill_tokens_per_second: f64,
    median_decode_tokens_per_second: f64,
    prefill_ratio: f64,
    decode_ratio: f64,
}

fn generate_bench(args: GenerateBench) -> Result<()> {
    anyhow::ensure!(args.runs > 0 && args.count > 0, "--runs and --count must be at least 1");
    let prompts: Vec<String> = read_prompts(&args.prompts)?.into_iter().take(args.count).collect();
    let model = args.model.load()?;
    let mut resolved = args.steer.resolve(&model, Mode::Gated)?;
    let template = args.model.template(&model, resolved.recorded_template())?;
    resolved.use_template(&model, &template)?;
    let tokens = prepare(&model, &template, &prompts, args.model.ctx_size as usize)?;
    let params = args.model.context_params();
    // Rates are per token, so modes whose answers differ in length stay comparable.
    let sampling = Sampling { max_tokens: args.max_tokens, ..Sampling::default() };
    // Bias far below/above every score: the gate stays closed/opens for every prompt.
    let forced = |bias: f32| -> Result<SteerHook> {
        let mut gate = resolved.gate.clone();
        gate.bias = bias;
        resolved.hook_with(Mode::Gated, gate, resolved.steering.clone(), 1)
    };
    let modes: [(&'static str, SteerHook, bool); 3] = [
        ("plain (no callback)", resolved.hook_for(Mode::Plain, 1)?, false),
        ("hook, gate closed", forced(-1e9)?, true),
        ("hook, gate open (steering)", forced(1e9)?, true),
    ];
    let mut contexts = Vec::new();
    let mut names = Vec::new();
    for (name, hook, callback) in modes {
        contexts.push(Context::new(&model, &params, hook, callback)?);
        names.push(name);
    }
    let mut engines: Vec<Engine> = contexts.iter_mut().map(|ctx| Engine::new(&model, ctx, 1)).collect();
    let runs = time_in_turns(&mut engines, &tokens, &sampling, args.runs)?;
    let rate = |s: &RunStats, prefill: bool| {
        if prefill { s.prompt_tokens as f64 / s.prefill_seconds.max(1e-9) } else { s.generated_tokens as f64 / s.decode_seconds.max(1e-9) }
    };
    // Each run measures every mode back to back, so a ratio within one run
    // cancels the machine's drift; the median of those ratios is reported.
    let median_of = |mode: usize, f: &dyn Fn(&RunStats, &RunStats) -> f64| median(runs[mode].iter().zip(&runs[0]).map(|(s, p)| f(s, p)).collect());
    let results: Vec<GenMode> = names
        .iter()
        .enumerate()
        .map(|(i, name)| GenMode {
            name,
            median_prefill_tokens_per_second: median_of(i, &|s, _| rate(s, true)),
            median_decode_tokens_per_second: median_of(i, &|s, _| rate(s, false)),
            prefill_ratio: median_of(i, &|s, p| rate(s, true) / rate(p, true)),
            decode_ratio: median_of(i, &|s, p| rate(s, false) / rate(p, false)),
        })
        .collect();
    if args.json {
        let report = serde_json::json!({
            "model": model.path.display().to_string(),
            "prompts": prompts.len(),
            "max_tokens": args.max_tokens,
            "threads": params.n_threads,
            "runs": args.runs,
            "gate_layer": resolved.gate.layer(),
            "steer_layers": resolved.steering.layers,
            "modes": results,
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("{} prompts, {} threads, medians of {} runs (ratios: median of per-run ratios)", prompts.len(), params.n_threads, args.runs);
    println!("{:<28} {:>12} {:>9} {:>12} {:>9}", "mode", "prefill t/s", "ratio", "decode t/s", "ratio");
    for m in &results {
        println!(
            "{:<28} {:>12.1} {:>9.3} {:>12.1} {:>9.3}",
            m.name, m.median_prefill_tokens_per_second, m.prefill_ratio, m.median_decode_tokens_per_second, m.decode_ratio
        );
    }
    Ok(())
}

/// `runs` runs of every prompt on every engine: `[engine][run]`. The engines
/// take turns on each prompt, in rotating order, so the machine's warm-up and
/// drift fall on all of them alike.
fn time_in_turns(engines: &mut [Engine], tokens: &[Vec<i32>], sampling: &Sampling, runs: usize) -> Result<Vec<Vec<RunStats>>> {
    let n = engines.len();
    let mut stats = vec![vec![RunStats::default(); runs]; n];
    for run in 0..runs {
        eprintln!("run {}/{runs}", run + 1);
        for (p, prompt) in tokens.iter().enumerate() {
            for i in (0..n).map(|k| (k + run + p) % n) {
                stats[i][run] += engines[i].run(std::slice::from_ref(prompt), sampling, |_| {})?;
            }
        }
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::{in_turn, median};

    #[test]
    fn prompts_come_from_each_file_in_turn_until_the_count() {
        let files = [vec!["a1".to_string(), "a2".into(), "a3".into()], vec!["b1".to_string()]];
        assert_eq!(in_turn(&files, 3), ["a1", "b1", "a2"]);
        assert_eq!(in_turn(&files, 10), ["a1", "b1", "a2", "a3"]);
        assert!(in_turn(&[], 5).is_empty());
    }

    #[test]
    fn median_of_an_even_count_is_the_mean_of_the_middle_two() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![0.918, 0.966]), 0.942);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
    }
}
