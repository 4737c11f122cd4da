//! `inferalign finetune`: train a LoRA adapter on chat pairs, plainly or with
//! Vaccine's perturbation-aware alignment, and write it as llama.cpp's LoRA GGUF.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use clap::Args;

use inferalign::finetune::lora::Lora;
use inferalign::finetune::model::{Transformer, ARCHITECTURE};
use inferalign::finetune::{best_device, examples, train, TrainOptions};
use inferalign::llama::{GgufFile, Model};
use inferalign::prompts::{read_pairs, Template};

use super::non_negative;

#[derive(Args)]
pub struct FinetuneArgs {
    /// GGUF model to adapt (qwen2 architecture); its weights are dequantized to f32 for training
    #[arg(short, long)]
    model: PathBuf,
    /// Training pairs: JSONL, one {"prompt": ..., "answer": ...} per line; the loss reads answer tokens only
    #[arg(long)]
    data: PathBuf,
    /// Adapter to start from (a llama.cpp LoRA GGUF), merged into the weights first; repeatable.
    /// The output holds only the new adapter: load both, `--lora START --lora OUT`
    #[arg(long)]
    lora: Vec<PathBuf>,
    /// LoRA rank
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=256))]
    lora_rank: u32,
    /// LoRA alpha (the adapter adds alpha / rank * B A x); default: twice the rank
    #[arg(long, value_parser = non_negative)]
    lora_alpha: Option<f32>,
    /// Optimizer steps (AdamW)
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    steps: u32,
    /// Learning rate
    #[arg(long, default_value_t = 5e-4, value_parser = non_negative)]
    lr: f32,
    /// Pairs per step
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
    batch_size: u32,
    /// Longest pair in tokens (prompt, answer and end of turn); longer answers are cut
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(8..))]
    max_tokens: u32,
    /// Seed of the adapter's initialisation and the order of pairs
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Vaccine alignment with perturbation radius RHO: each step trains against
    /// the layer-output perturbation that raises the loss most (the lab uses 2)
    #[arg(long, value_name = "RHO", value_parser = non_negative)]
    vaccine: Option<f32>,
    /// Chat template: a llama.cpp built-in name or `raw`; default: the model's own
    #[arg(long)]
    template: Option<String>,
    /// System prompt placed before each user turn
    #[arg(long)]
    system_prompt: Option<String>,
    /// Print a JSON summary on stdout
    #[arg(long)]
    json: bool,
    /// Where to write the adapter (llama.cpp LoRA GGUF)
    #[arg(short, long)]
    out: PathBuf,
}

pub fn run(args: FinetuneArgs) -> Result<()> {
    if args.lr == 0.0 {
        bail!("--lr 0 would not train; give a positive learning rate such as 5e-4");
    }
    let pairs = read_pairs(&args.data)?;
    let mut model = Transformer::load(&GgufFile::open(&args.model)?, &best_device()?)?;
    let tokenizer = Model::load(&args.model, 0)?;
    let template = Template::resolve(&tokenizer, args.template.as_deref(), args.system_prompt.clone())?;
    let examples = examples(&tokenizer, &template, &pairs, args.max_tokens as usize)?;
    drop(tokenizer);
    for path in &args.lora {
        model.merge(&Lora::read(path, &model)?)?;
    }
    let opts = TrainOptions {
        rank: args.lora_rank as usize,
        alpha: args.lora_alpha.unwrap_or(2.0 * args.lora_rank as f32),
        steps: args.steps as usize,
        lr: args.lr as f64,
        batch_size: args.batch_size as usize,
        seed: args.seed,
        vaccine: args.vaccine,
    };
    eprintln!("{} pairs, {} steps of {}, LoRA rank {} on {} projections{}", examples.len(), opts.steps, opts.batch_size, opts.rank, model.projections().count(), args.vaccine.map_or(String::new(), |r| format!(", Vaccine rho {r}")));
    let bar = super::progress_of(opts.steps as u64, "finetune", "steps");
    let start = Instant::now();
    let (mut tokens, mut losses) = (0usize, Vec::new());
    let lora = train(&model, &examples, &opts, |step| {
        tokens += step.tokens;
        losses.push(step.loss);
        bar.set_message(format!(", loss {:.3}, {:.0} tok/s", step.loss, tokens as f64 / start.elapsed().as_secs_f64()));
        bar.inc(1);
    })?;
    bar.finish_and_clear();
    let seconds = start.elapsed().as_secs_f64();
    lora.write(&args.out, ARCHITECTURE)?;
    let (first, last) = (losses[0], losses[losses.len() - 1]);
    eprintln!("wrote {}: loss {first:.3} -> {last:.3}, {tokens} tokens in {seconds:.0} s ({:.1} tok/s)", args.out.display(), tokens as f64 / seconds);
    if args.json {
        let summary = serde_json::json!({
            "adapter": args.out, "pairs": examples.len(), "steps": opts.steps, "batch_size": opts.batch_size,
            "lora_rank": opts.rank, "lora_alpha": opts.alpha, "lr": opts.lr, "seed": opts.seed, "vaccine_rho": opts.vaccine,
            "losses": losses, "tokens": tokens, "seconds": seconds, "tokens_per_second": tokens as f64 / seconds,
        });
        println!("{summary}");
    }
    Ok(())
}
