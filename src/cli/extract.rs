//! `inferalign extract`: prompts → calibrated vector file.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use inferalign::extract::{data_set, extract, vector_file, Labelled};
use inferalign::prompts::{read_prompts, split};
use inferalign::vectors::DataIdentity;

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
    /// Training prompts per class; the rest of each file calibrates the gate
    #[arg(long, default_value_t = 64)]
    train: usize,
    /// Shuffle each file with this seed before splitting (default: file order)
    #[arg(long)]
    seed: Option<u64>,
}

pub fn run(args: ExtractArgs) -> Result<()> {
    anyhow::ensure!(args.train > 0, "--train must be at least 1");
    let harmful_all = read_prompts(&args.harmful)?;
    let harmless_all = read_prompts(&args.harmless)?;
    let model = args.model.load()?;
    let template = args.model.template(&model, None)?;

    let (train, held_out) = split(harmful_all, args.train, args.seed);
    let harmful = Labelled { train, held_out };
    let (train, held_out) = split(harmless_all, args.train, args.seed);
    let harmless = Labelled { train, held_out };
    eprintln!(
        "prompts: {} harmful ({} train, {} held out), {} harmless ({} train, {} held out)",
        harmful.train.len() + harmful.held_out.len(),
        harmful.train.len(),
        harmful.held_out.len(),
        harmless.train.len() + harmless.held_out.len(),
        harmless.train.len(),
        harmless.held_out.len()
    );

    let bar = progress(0, "extract");
    let extraction = extract(&model, &template, &harmful, &harmless, &args.model.context_params(), &bar)?;
    bar.finish_and_clear();
    let stats = extraction.stats;
    eprintln!(
        "decoded {} prompts, {} tokens in {:.1}s ({:.0} tok/s)",
        stats.prompts,
        stats.tokens,
        stats.seconds,
        stats.tokens_per_second()
    );
    if extraction.rates_on_training {
        eprintln!("warning: no held-out prompts in one class; gate rates below are on the training prompts");
    }

    let data = DataIdentity {
        harmful: data_set(&args.harmful, &harmful)?,
        harmless: data_set(&args.harmless, &harmless)?,
        template: template.name.clone(),
        system_prompt: template.system_prompt.clone(),
        seed: args.seed,
    };
    let file = vector_file(&model, &extraction, data)?;
    file.write(&args.out)?;
    print_layer_table(file.calibration.as_ref().expect("extract calibrates"));
    println!("wrote {}", args.out.display());
    Ok(())
}
