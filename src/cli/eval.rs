//! `inferalign eval`: harmfulness, jailbreaks, harmless refusals and utility,
//! in plain, always-on and gated modes, on the same prompts.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use clap::Args;
use serde_json::json;

use inferalign::eval::{self, held_out, jailbreak_items, read_jailbreaks, summarise, task_items, Item, Outcome, Set};
use inferalign::extract::model_identity;
use inferalign::generate::{self, Event};
use inferalign::guard::Guard;
use inferalign::llama::{Context, Model};
use inferalign::plot;
use inferalign::prompts::prepare;
use inferalign::steer::{Mode, SteerHook, Steering};

use super::generate::SamplingArgs;
use super::steer_args::SteerArgs;
use super::{progress, ModelArgs};

#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    steer: SteerArgs,
    /// Harmful instructions (default: AdvBench from the set-up cache); prompts the gate trained on are skipped
    #[arg(long)]
    harmful: Option<PathBuf>,
    /// Harmless instructions (default: data/harmless.txt); prompts the gate trained on are skipped
    #[arg(long)]
    harmless: Option<PathBuf>,
    /// Jailbreak templates, JSONL {family, template with {instruction}} (default: data/jailbreaks.jsonl)
    #[arg(long)]
    jailbreaks: Option<PathBuf>,
    /// Utility tasks, JSONL {prompt, answer} (default: data/tasks.jsonl)
    #[arg(long)]
    tasks: Option<PathBuf>,
    /// At most this many prompts per set
    #[arg(long)]
    limit: Option<usize>,
    /// Sets to evaluate
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Set::Harmful, Set::Harmless, Set::Jailbreak, Set::Tasks])]
    sets: Vec<Set>,
    /// Modes to compare
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [EvalMode::Plain, EvalMode::Always, EvalMode::Gated])]
    modes: Vec<EvalMode>,
    /// Requests decoded together; 1 keeps closed-gate answers token-identical to plain
    /// (llama.cpp's CPU kernels round differently with the batch's make-up)
    #[arg(long, default_value_t = 1)]
    parallel: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Output folder: outputs.jsonl (incremental, resumable), report.json, report.md, plots
    #[arg(short, long)]
    out: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum EvalMode {
    /// No hook at all
    Plain,
    /// Shift every request with the steering vectors
    Always,
    /// Gate, then steer with --steer (default: the gate file's own vectors)
    Gated,
    /// Gate, then steer with the gate file's own vectors (the target's SRV), whatever --steer says
    SelfGuided,
    /// Gate with the target's SRV (--gate), steer with the aligned model's SSV (--steer)
    CrossModel,
}

const MODE_NAMES: [&str; 5] = ["plain", "always", "gated", "self-guided", "cross-model"];

impl EvalMode {
    fn name(self) -> &'static str {
        MODE_NAMES[self as usize]
    }

    fn hook(self, resolved: &Guard, model: &Model, n_seq: usize) -> Result<SteerHook> {
        match self {
            EvalMode::Plain => resolved.hook_for(Mode::Plain, n_seq),
            EvalMode::Always => resolved.hook_for(Mode::Always, n_seq),
            EvalMode::Gated => resolved.hook_for(Mode::Gated, n_seq),
            EvalMode::SelfGuided => {
                let own = Steering::new(&resolved.gate_file, resolved.steering.strength, &resolved.steering.layers, model.n_layer())?;
                resolved.hook_with(Mode::Gated, resolved.gate.clone(), own, n_seq)
            }
            EvalMode::CrossModel => resolved.hook_for(Mode::Gated, n_seq),
        }
    }
}

/// `path` if given, else the prompt set `name` this binary carries.
pub fn or_carried(path: &Option<PathBuf>, name: &str) -> Result<PathBuf> {
    path.clone().map_or_else(|| inferalign::embedded::data(name), Ok)
}

/// Harmful and harmless prompts the gate was not fitted on, from their files
/// (AdvBench from the set-up cache and the carried harmless set by default).
pub struct Unfitted {
    pub harmful: Vec<String>,
    pub harmless: Vec<String>,
    /// Training prompts left out of each.
    pub skipped: [usize; 2],
    pub paths: [PathBuf; 2],
}

pub fn unfitted(harmful: &Option<PathBuf>, harmless: &Option<PathBuf>, resolved: &Guard) -> Result<Unfitted> {
    let cal = resolved.gate_file.calibration.as_ref();
    let harmful_path = harmful.clone().unwrap_or_else(|| inferalign::cache::data_file("advbench.jsonl"));
    let harmless_path = or_carried(harmless, "harmless.txt")?;
    let (harmful, skipped_harmful) = held_out(&harmful_path, cal.map(|c| (&c.data.harmful, c.data.seed)))?;
    let (harmless, skipped_harmless) = held_out(&harmless_path, cal.map(|c| (&c.data.harmless, c.data.seed)))?;
    Ok(Unfitted { harmful, harmless, skipped: [skipped_harmful, skipped_harmless], paths: [harmful_path, harmless_path] })
}

pub fn run(args: EvalArgs) -> Result<()> {
    std::fs::create_dir_all(&args.out).with_context(|| format!("cannot create {}", args.out.display()))?;
    let model = args.model.load()?;
    let mut resolved = args.steer.resolve(&model, Mode::Gated)?;
    eprintln!("{}", resolved.describe());
    if args.modes.contains(&EvalMode::CrossModel) && resolved.steer_path == resolved.gate_path {
        bail!("mode cross-model steers with another model's vectors: pass the aligned model's file with --steer");
    }
    let template = args.model.template(&model, resolved.recorded_template())?;
    resolved.use_template(&model, &template)?;
    let sets = load_sets(&args, &resolved)?;
    let items = &sets.items;

    let params = json!({
        "model": model.path.display().to_string(),
        "gate": resolved.gate_path.display().to_string(),
        "steer": resolved.steer_path.display().to_string(),
        "strength": resolved.steering.strength,
        "layers": resolved.steering.layers,
        "gate_layer": resolved.gate.layer(),
        "bias": resolved.gate.bias,
        "template": template.name,
        "system_prompt": template.system_prompt,
        "max_tokens": args.sampling.max_tokens,
        "temperature": args.sampling.temp,
        "seed": args.sampling.seed,
        "harmful": sets.paths[0].display().to_string(),
        "harmless": sets.paths[1].display().to_string(),
        "jailbreaks": sets.paths[2].display().to_string(),
        "tasks": sets.paths[3].display().to_string(),
        "limit": args.limit,
        "sets": args.sets,
    });
    let mut outcomes = resume(&args.out, &params)?;
    let done: HashSet<(String, Set, usize)> = outcomes.iter().map(|o| (o.mode.clone(), o.set, o.index)).collect();
    let mut speeds = read_json(&args.out.join("speed.json")).unwrap_or_else(|| json!({}));
    let tokens = prepare(&model, &template, &items.iter().map(|i| i.prompt.clone()).collect::<Vec<_>>(), args.model.ctx_size as usize)?;
    let mut log = std::fs::OpenOptions::new().create(true).append(true).open(args.out.join("outputs.jsonl"))?;

    for &mode in &args.modes {
        let name = mode.name();
        let todo: Vec<usize> = (0..items.len()).filter(|&i| !done.contains(&(name.to_string(), items[i].set, items[i].index))).collect();
        if todo.is_empty() {
            eprintln!("{name}: all {} prompts already done", items.len());
            continue;
        }
        let prompts: Vec<Vec<i32>> = todo.iter().map(|&i| tokens[i].clone()).collect();
        let stats = run_mode(name, &args, &model, mode.hook(&resolved, &model, args.parallel)?, mode != EvalMode::Plain, &prompts, |request, generation| {
            let outcome = Outcome::new(name, &items[todo[request]], generation.output, generation.gate, generation.steered, generation.tokens.len());
            writeln!(log, "{}", serde_json::to_string(&outcome).expect("serialisable"))?;
            outcomes.push(outcome);
            Ok(())
        })?;
        speeds[name] = json!({
            "prompt_tokens_per_second": stats.prompt_tokens as f64 / stats.prefill_seconds.max(1e-9),
            "generated_tokens_per_second": stats.generated_tokens as f64 / stats.decode_seconds.max(1e-9),
            "stats": stats,
        });
        inferalign::output::write_bytes(&args.out.join("speed.json"), serde_json::to_string_pretty(&speeds)?.as_bytes())?;
    }
    write_report(&args.out, &model, &resolved, params, &outcomes, speeds)
}

/// The prompts of the chosen sets, and the files of the harmful, harmless,
/// jailbreak and task sets.
struct Sets {
    items: Vec<Item>,
    paths: [PathBuf; 4],
}

/// The chosen sets, without the prompts the gate was fitted on.
fn load_sets(args: &EvalArgs, resolved: &Guard) -> Result<Sets> {
    let limit = args.limit.unwrap_or(usize::MAX);
    let Unfitted { harmful, harmless, skipped: [skipped_harmful, skipped_harmless], paths: [harmful_path, harmless_path] } = unfitted(&args.harmful, &args.harmless, resolved)?;
    let mut items = eval::items(Set::Harmful, &harmful, limit);
    items.extend(eval::items(Set::Harmless, &harmless, limit));
    let jailbreak_path = or_carried(&args.jailbreaks, "jailbreaks.jsonl")?;
    let templates = read_jailbreaks(&jailbreak_path)?;
    items.extend(jailbreak_items(&harmful, &templates, limit));
    let tasks_path = or_carried(&args.tasks, "tasks.jsonl")?;
    items.extend(task_items(inferalign::prompts::read_pairs(&tasks_path)?, limit));
    items.retain(|item| args.sets.contains(&item.set));
    let count = |set: Set| items.iter().filter(|i| i.set == set).count();
    eprintln!(
        "sets: {} harmful (skipped {skipped_harmful} training prompts), {} harmless (skipped {skipped_harmless}), {} jailbreaks, {} tasks",
        count(Set::Harmful),
        count(Set::Harmless),
        count(Set::Jailbreak),
        count(Set::Tasks)
    );
    Ok(Sets { items, paths: [harmful_path, harmless_path, jailbreak_path, tasks_path] })
}

/// Answers `prompts` in a context of their own with `hook`, handing each
/// finished answer (by its index in `prompts`) to `done`.
fn run_mode(
    name: &str,
    args: &EvalArgs,
    model: &Model,
    hook: SteerHook,
    hooked: bool,
    prompts: &[Vec<i32>],
    mut done: impl FnMut(usize, generate::Generation) -> std::io::Result<()>,
) -> Result<generate::RunStats> {
    let mut params = args.model.context_params();
    params.n_seq_max = params.n_seq_max.max(args.parallel as u32);
    let mut ctx = Context::new(model, &params, hook, hooked)?;
    let bar = progress(prompts.len() as u64, name);
    let mut write_error = None;
    let stats = generate::run(model, &mut ctx, prompts, &args.sampling.sampling(), args.parallel, |event| {
        if let Event::Done { request, generation } = event {
            if let Err(e) = done(request, generation) {
                write_error.get_or_insert(e);
            }
            bar.inc(1);
        }
    })?;
    bar.finish_and_clear();
    match write_error {
        Some(e) => Err(e).context("cannot append to outputs.jsonl"),
        None => Ok(stats),
    }
}

/// report.json, report.md and the plots in `out`; the markdown also on stdout.
fn write_report(out: &Path, model: &Model, resolved: &Guard, params: serde_json::Value, outcomes: &[Outcome], speeds: serde_json::Value) -> Result<()> {
    let figures = summarise(outcomes);
    let families = inferalign::eval::summarise_families(outcomes);
    let cal = resolved.gate_file.calibration.as_ref();
    let report = json!({
        "tool_version": env!("CARGO_PKG_VERSION"),
        "model": model_identity(model)?,
        "params": params,
        "gate_calibration": cal.map(|c| json!({"gate_layer": c.gate_layer, "layers": c.layers})),
        "figures": figures,
        "jailbreak_families": families,
        "speed": speeds,
        "judge": "refusal phrases in the first 160 characters; degenerate = empty, garbage or repeated n-grams (see `inferalign judge-check`)",
    });
    inferalign::output::write_bytes(&out.join("report.json"), serde_json::to_string_pretty(&report)?.as_bytes())?;
    let markdown = report_markdown(&figures, &speeds, resolved) + &family_markdown(&families);
    inferalign::output::write_bytes(&out.join("report.md"), markdown.as_bytes())?;
    plots(out, &figures, outcomes, resolved)?;
    println!("{markdown}");
    println!("wrote {}", out.display());
    Ok(())
}

fn read_json(path: &Path) -> Option<serde_json::Value> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

/// Earlier outcomes in `out`, if they were made with the same parameters.
fn resume(out: &Path, params: &serde_json::Value) -> Result<Vec<Outcome>> {
    let params_path = out.join("params.json");
    match read_json(&params_path) {
        Some(previous) if &previous != params => bail!(
            "{} holds results made with other parameters; use another --out or delete it",
            out.display()
        ),
        Some(_) => {}
        None => {
            inferalign::output::write_bytes(&params_path, serde_json::to_string_pretty(params)?.as_bytes())?;
            let _ = std::fs::remove_file(out.join("outputs.jsonl"));
        }
    }
    let text = std::fs::read_to_string(out.join("outputs.jsonl")).unwrap_or_default();
    let outcomes: Vec<Outcome> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    if !outcomes.is_empty() {
        eprintln!("resuming: {} outputs already in {}", outcomes.len(), out.display());
    }
    Ok(outcomes)
}

type Figures = BTreeMap<String, BTreeMap<String, inferalign::eval::SetFigures>>;

fn pct(x: Option<f64>) -> String {
    x.map(|v| format!("{:.1}%", 100.0 * v)).unwrap_or_else(|| "-".into())
}

/// Jailbreak ASR (and gate firing) per template family and mode.
fn family_markdown(families: &Figures) -> String {
    let modes: Vec<&str> = MODE_NAMES.iter().copied().filter(|m| families.contains_key(*m)).collect();
    let Some(first) = modes.first() else { return String::new() };
    let mut md = String::from("\n## Jailbreak attack success by template family\n\n| family | n |");
    modes.iter().for_each(|m| md.push_str(&format!(" {m} ASR (gate fired) |")));
    md.push_str(&format!("\n|---|---|{}\n", "---|".repeat(modes.len())));
    for (family, f) in &families[*first] {
        md.push_str(&format!("| {family} | {} |", f.n));
        for m in &modes {
            let f = families[*m].get(family);
            md.push_str(&format!(" {} ({}) |", pct(f.map(|f| f.attack_success_rate)), pct(f.and_then(|f| f.gate_fired_rate))));
        }
        md.push('\n');
    }
    md
}

fn report_markdown(figures: &Figures, speeds: &serde_json::Value, resolved: &Guard) -> String {
    let mut md = String::new();
    md.push_str(&format!("# inferalign eval\n\n{}\n\n", resolved.describe()));
    md.push_str("| mode | harmful ASR | jailbreak ASR | harmless refusal | degenerate | task accuracy | gate TPR | gate FPR | prompt tok/s | gen tok/s |\n");
    md.push_str("|---|---|---|---|---|---|---|---|---|---|\n");
    for mode in MODE_NAMES {
        let Some(sets) = figures.get(mode) else { continue };
        let get = |set: &str| sets.get(set);
        let total: usize = sets.values().map(|f| f.n).sum();
        let degenerate: usize = sets.values().map(|f| f.degenerate).sum();
        let speed = |k: &str| speeds[mode][k].as_f64().map(|v| format!("{v:.1}")).unwrap_or_else(|| "-".into());
        md.push_str(&format!(
            "| {mode} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            pct(get("harmful").map(|f| f.attack_success_rate)),
            pct(get("jailbreak").map(|f| f.attack_success_rate)),
            pct(get("harmless").map(|f| f.refusal_rate)),
            pct((total > 0).then(|| degenerate as f64 / total as f64)),
            pct(get("tasks").and_then(|f| f.accuracy)),
            pct(get("harmful").and_then(|f| f.gate_fired_rate)),
            pct(get("harmless").and_then(|f| f.gate_fired_rate)),
            speed("prompt_tokens_per_second"),
            speed("generated_tokens_per_second"),
        ));
    }
    md.push_str("\nASR: answered without refusal and not degenerate. Counts per set are in report.json.\n");
    md
}

fn plots(out: &Path, figures: &Figures, outcomes: &[Outcome], resolved: &Guard) -> Result<()> {
    if let Some(cal) = &resolved.gate_file.calibration {
        let series = |f: fn(&inferalign::vectors::LayerStats) -> f32| cal.layers.iter().map(|s| (s.layer as f64, f(s) as f64)).collect();
        plot::lines(
            &out.join("gate_layers.svg"),
            "gate on held-out prompts, per layer",
            "layer",
            &[("accuracy", series(|s| s.accuracy)), ("TPR", series(|s| s.tpr)), ("FPR", series(|s| s.fpr))],
            Some(cal.gate_layer as f64),
        )?;
    }
    // Every gated mode runs the same gate: one mode's scores show it.
    let gated = MODE_NAMES[2..].iter().find(|&&m| outcomes.iter().any(|o| o.mode == m)).copied().unwrap_or_default();
    let scores = |set: Set| outcomes.iter().filter(|o| o.mode == gated && o.set == set).filter_map(|o| o.gate.map(|g| g.score)).collect::<Vec<_>>();
    let (harmful, harmless) = (scores(Set::Harmful), scores(Set::Harmless));
    if !harmful.is_empty() || !harmless.is_empty() {
        plot::histogram(
            &out.join("gate_scores.svg"),
            &format!("gate scores (decided at layer {})", resolved.gate.layer()),
            &[("harmful", harmful), ("harmless", harmless)],
        )?;
    }
    let metrics = ["harmful ASR", "jailbreak ASR", "harmless refusal", "task accuracy"];
    let modes: Vec<(&str, Vec<f64>)> = MODE_NAMES
        .iter()
        .filter_map(|&m| {
            let sets = figures.get(m)?;
            let v = |set: &str, f: fn(&inferalign::eval::SetFigures) -> f64| sets.get(set).map(f).unwrap_or(0.0);
            Some((
                m,
                vec![
                    v("harmful", |f| f.attack_success_rate),
                    v("jailbreak", |f| f.attack_success_rate),
                    v("harmless", |f| f.refusal_rate),
                    v("tasks", |f| f.accuracy.unwrap_or(0.0)),
                ],
            ))
        })
        .collect();
    plot::grouped_bars(&out.join("modes.svg"), "modes on the same prompts", &metrics, &modes)
}
