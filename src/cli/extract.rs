//! `inferalign extract`: prompts → calibrated vector file.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use rand::rngs::StdRng;
use rand::SeedableRng;

use inferalign::extract::{data_set, extract, vector_file, Candidate, FitOptions, Labelled};
use inferalign::llama::Model;
use inferalign::prompts::{prepare, read_prompts, split, Template};
use inferalign::steer::format_layers;
use inferalign::strength::{check, CheckOptions};
use inferalign::trainset::Recipe;
use inferalign::vectors::{DataIdentity, SteerDefaults, VectorFile};
use inferalign::wrappers::Wrappers;

use inferalign::guard::describe_strength;
use super::{inspect::print_layer_table, progress, ModelArgs};

#[derive(Args)]
pub struct ExtractArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Harmful instructions: text (one per line), JSONL (prompt/goal/text/instruction) or CSV (goal/prompt column)
    #[arg(long)]
    harmful: PathBuf,
    /// Harmless instructions, same formats
    #[arg(long)]
    harmless: PathBuf,
    /// Output vector file (GGUF, loads in llama.cpp with --control-vector)
    #[arg(short, long)]
    out: PathBuf,
    /// Training prompts per class; the rest of each file (up to --held-out) only measures the gate
    #[arg(long, default_value_t = 64)]
    train: usize,
    /// Most held-out prompts per class to measure the final gate on (0: none; the gate is chosen by cross-validation either way)
    #[arg(long, default_value_t = 128)]
    held_out: usize,
    /// Shuffle each file with this seed before splitting (default: file order)
    #[arg(long)]
    seed: Option<u64>,
    /// Jailbreak-style wrapper families, JSON (default: the built-in data/wrappers.json)
    #[arg(long)]
    wrappers: Option<PathBuf>,
    /// Leave this wrapper family out of fitting entirely (repeatable), e.g. to test how the gate does on a family it never saw
    #[arg(long, value_name = "FAMILY")]
    without_family: Vec<String>,
    /// Wrapper families each training instruction is dressed in
    #[arg(long, default_value_t = Recipe::default().wraps)]
    wraps: usize,
    /// Fit on your prompts only, without the built-in harmful and harmless questions (data/train-questions-*.txt)
    #[arg(long)]
    no_questions: bool,
    /// Highest false-positive rate allowed on held-out harmless prompts (plain, wrapped and multi-turn, each)
    #[arg(long, default_value_t = FitOptions::default().max_fpr, value_parser = super::non_negative)]
    max_fpr: f32,
    /// Harmful prompts (half plain, half wrapped) in the generation check that chooses the steering defaults;
    /// 24 could not tell apart strengths that 30 held-out jailbreaks did
    #[arg(long, default_value_t = 48)]
    check_prompts: usize,
    /// Skip the generation check: the file then has no steering defaults, and commands that steer need --strength and --layers
    #[arg(long)]
    no_check: bool,
}

pub fn run(args: ExtractArgs) -> Result<()> {
    anyhow::ensure!(args.train > 0, "--train must be at least 1");
    // Before minutes of decoding, not after.
    inferalign::output::check(&args.out)?;
    let wrappers = match &args.wrappers {
        Some(path) => Wrappers::read(path)?,
        None => Wrappers::builtin(),
    }
    .without(&args.without_family)?;
    let harmful_all = read_prompts(&args.harmful)?;
    let harmless_all = read_prompts(&args.harmless)?;
    let model = args.model.load()?;
    let template = args.model.template(&model, None)?;

    let labelled = |all: Vec<String>| {
        let (train, mut held_out) = split(all, args.train, args.seed);
        held_out.truncate(args.held_out);
        Labelled { train, held_out }
    };
    let in_files = [harmful_all.len(), harmless_all.len()];
    let (harmful, harmless) = (labelled(harmful_all), labelled(harmless_all));
    eprintln!(
        "prompts: {} harmful and {} harmless to train (each plain, in {} wrapper families and some in conversations){}, {} and {} held out to measure",
        harmful.train.len(),
        harmless.train.len(),
        args.wraps,
        if args.no_questions { "" } else { ", with the built-in questions of both classes" },
        harmful.held_out.len(),
        harmless.held_out.len()
    );

    if let Some(note) = few_prompts_note([harmful.train.len(), harmless.train.len()], in_files) {
        eprintln!("{note}");
    }

    let bar = progress(0, "extract");
    let options = FitOptions { recipe: Recipe { wraps: args.wraps, questions: !args.no_questions, ..Recipe::default() }, max_fpr: args.max_fpr };
    let extraction = extract(&model, &template, &harmful, &harmless, &wrappers, options, &args.model.context_params(), &bar)?;
    bar.finish_and_clear();
    let stats = extraction.stats;
    eprintln!(
        "decoded {} prompts, {} tokens in {:.1}s ({:.0} tok/s)",
        stats.prompts,
        stats.tokens,
        stats.seconds,
        stats.tokens_per_second()
    );

    let data = DataIdentity {
        harmful: data_set(&args.harmful, &harmful)?,
        harmless: data_set(&args.harmless, &harmless)?,
        template: template.name.clone(),
        system_prompt: template.system_prompt.clone(),
        seed: args.seed,
    };
    let mut file = vector_file(&model, &extraction, data)?;
    print_layer_table(file.calibration.as_ref().expect("extract calibrates"));
    print_ranked(&extraction.ranked);
    if !args.no_check {
        file.defaults = steering_check(&args, &model, &template, &file, &harmful, &wrappers)?;
    }
    file.write(&args.out)?;
    println!("wrote {}", args.out.display());
    Ok(())
}

/// The best candidate gates, the chosen one first: a near tie says the
/// choice between them is within the noise of a few prompts per family.
/// Candidates under the plain-TPR floor rank after all others.
fn print_ranked(ranked: &[Candidate]) {
    println!("\ncandidate gates, best first (cross-validated; the first is the gate):");
    println!("{:<44}  {:>9}  {:>12}  {:>8}  FPR plain / wrapped / multi-turn*", "terms", "plain TPR", "worst family", "mean TPR");
    for c in ranked {
        let v = &c.validation;
        let [plain, wrapped, multi] = v.fpr.map(|f| 100.0 * f);
        let plain_tpr = 100.0 * v.plain_tpr();
        println!(
            "{:<44}  {plain_tpr:>8.1}%  {:>11.1}%  {:>7.1}%  {plain:.1}% / {wrapped:.1}% / {multi:.1}%",
            c.terms,
            100.0 * v.worst_tpr,
            100.0 * v.mean_tpr
        );
    }
    println!("{MULTI_TURN_NOTE}");
}

/// What the multi-turn FPR measures, and what it leaves out.
pub const MULTI_TURN_NOTE: &str = "* multi-turn: harmless requests after a harmful turn, their last turn read alone, as served where the last-token terms stay at or under the context floor (README, Conversations)";

/// Training instructions per class of the shipped Qwen file; with 64 the
/// gate flagged 93-97% of wrapped harmful prompts on three sets against
/// 97.4% (README, "A user's 64 + 64 file depends on which 64").
const FULL_TRAIN: usize = 192;

/// A note when a class has fewer than [`FULL_TRAIN`] training instructions:
/// pass `--train` where the files hold more, else write more.
fn few_prompts_note(trained: [usize; 2], in_files: [usize; 2]) -> Option<String> {
    let least = trained.into_iter().min()?;
    if least >= FULL_TRAIN {
        return None;
    }
    let can = in_files.into_iter().min()?.min(FULL_TRAIN);
    let next = if can > least {
        format!("pass --train {can} (the files hold {} and {} prompts)", in_files[0], in_files[1])
    } else {
        format!("add prompts to reach {FULL_TRAIN} of each class")
    };
    Some(format!(
        "note: fitting on {} + {} instructions; at 64 + 64 the gate caught 93-97% of wrapped harmful prompts against 97.4% at {FULL_TRAIN} + {FULL_TRAIN} (README, known limits): {next}",
        trained[0], trained[1]
    ))
}

/// The check's harmful prompts: the last `n` held out where there are enough
/// (`eval` reads held-out prompts from the start, so a short eval misses
/// them), else the last `n` trained on.
fn check_pool(harmful: &Labelled, n: usize) -> &[String] {
    let pool = if harmful.held_out.len() >= n { &harmful.held_out } else { &harmful.train };
    &pool[pool.len().saturating_sub(n)..]
}

/// Chooses the steering defaults with short generations on harmful prompts,
/// half of them wrapped.
fn steering_check(
    args: &ExtractArgs,
    model: &Model,
    template: &Template,
    file: &VectorFile,
    harmful: &Labelled,
    wrappers: &Wrappers,
) -> Result<Option<SteerDefaults>> {
    let mut rng = StdRng::seed_from_u64(args.seed.unwrap_or(0));
    let n_families = wrappers.families().len();
    let prompts: Vec<String> = check_pool(harmful, args.check_prompts)
        .iter()
        .enumerate()
        .map(|(i, p)| if i % 2 == 0 { p.clone() } else { wrappers.wrap(i / 2 % n_families, p, &mut rng).0 })
        .collect();
    let tokens = prepare(model, template, &prompts, args.model.ctx_size as usize)?;
    let options = CheckOptions::for_depth(model.n_layer());
    let bar = progress(0, "check");
    let (chosen, points) = check(model, file, &tokens, &template.opening(model)?, &args.model.context_params(), &options, &bar)?;
    bar.finish_and_clear();
    println!("\nsteering check ({} harmful prompts, {} tokens, each shifted from its request on, as a flagged request is):", prompts.len(), options.max_tokens);
    println!("layers      strength  refused  degenerate");
    for p in &points {
        println!("{:<10}  {:>8.2}  {:>6.1}%  {:>9.1}%", format_layers(&p.layers), p.strength, 100.0 * p.refused, 100.0 * p.degenerate);
    }
    match &chosen {
        Some(d) => println!("steering defaults: {} on layers {}", describe_strength(d.strength), format_layers(&d.layers)),
        None => eprintln!(
            "warning: no strength refused {:.0}% of the check prompts with at most {:.0}% degenerate answers; the file has no steering defaults (pass --strength and --layers when steering)",
            100.0 * options.min_refusal,
            100.0 * options.max_degenerate
        ),
    }
    Ok(chosen)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labelled(train: usize, held_out: usize) -> Labelled {
        let names = |prefix: &str, n: usize| (0..n).map(|i| format!("{prefix}{i}")).collect::<Vec<_>>();
        Labelled { train: names("t", train), held_out: names("h", held_out) }
    }

    #[test]
    fn check_prompts_come_from_the_end_of_the_held_out_prompts_that_eval_reads_from_the_start() {
        let harmful = labelled(64, 128);
        let pool = check_pool(&harmful, 48);
        assert_eq!((pool.len(), pool[0].as_str(), pool[47].as_str()), (48, "h80", "h127"));
    }

    #[test]
    fn few_training_prompts_get_a_note_naming_train_when_the_files_hold_more() {
        let note = few_prompts_note([64, 64], [520, 320]).expect("64 is few");
        assert!(note.contains("pass --train 192 ") && note.contains("520 and 320"), "{note}");
        let note = few_prompts_note([64, 40], [64, 40]).expect("40 is few");
        assert!(note.starts_with("note: fitting on 64 + 40 ") && note.contains("add prompts"), "{note}");
        assert_eq!(few_prompts_note([150, 150], [150, 400]).map(|n| n.contains("add prompts")), Some(true));
        assert_eq!(few_prompts_note([192, 200], [520, 320]), None);
    }

    #[test]
    fn check_prompts_fall_back_to_training_prompts_when_too_few_are_held_out() {
        assert_eq!(check_pool(&labelled(64, 10), 48)[0], "t16");
        assert_eq!(check_pool(&labelled(20, 0), 48).len(), 20);
    }
}
