//! `inferalign drift`: the same token ids through an aligned model and its
//! fine-tune; how far the fine-tune's hidden states moved, per layer.

use std::path::PathBuf;

use anyhow::{bail, Context as _, Result};
use clap::Args;

use inferalign::capture::capture_prompts;
use inferalign::drift::{measure, Drift};
use inferalign::extract::steerable_layers;
use inferalign::gate::Gate;
use inferalign::llama::{LoadOptions, Model};
use inferalign::plot;
use inferalign::prompts::{prepare, read_prompts};
use inferalign::vectors::VectorFile;

use super::{progress, ModelArgs};

#[derive(Args)]
pub struct DriftArgs {
    /// The aligned parent model (GGUF)
    #[arg(long)]
    aligned: PathBuf,
    /// LoRA adapter applied to the aligned model (an alignment adapter, say); repeatable
    #[arg(long)]
    aligned_lora: Vec<PathBuf>,
    /// The target: a fine-tune of the aligned model, or the aligned model with --lora
    #[command(flatten)]
    target: ModelArgs,
    /// Prompts both models read (text, JSONL or CSV), formatted with the chat template
    #[arg(long)]
    prompts: PathBuf,
    /// The aligned model's vector file: safety directions and gate (default: the shipped file for the aligned model)
    #[arg(long)]
    vectors: Option<PathBuf>,
    /// Print the figures as one JSON object on stdout instead of a table
    #[arg(long)]
    json: bool,
    /// Folder for drift.json and drift.svg
    #[arg(short, long)]
    out: Option<PathBuf>,
}

/// Fails unless both models have the same shape (tokenizations are compared
/// per prompt later). Reads metadata only: hashing two model files is not needed here.
fn check_compatible(aligned: &Model, target: &Model) -> Result<()> {
    let architecture = |m: &Model| m.meta("general.architecture").unwrap_or_default();
    let checks: [(&str, String, String); 4] = [
        ("architecture", architecture(aligned), architecture(target)),
        ("n_embd", aligned.n_embd().to_string(), target.n_embd().to_string()),
        ("layer count", aligned.n_layer().to_string(), target.n_layer().to_string()),
        ("vocabulary size", aligned.n_vocab().to_string(), target.n_vocab().to_string()),
    ];
    if let Some((what, a, t)) = checks.iter().find(|(_, a, t)| a != t) {
        bail!("the models differ in {what}: {a} (aligned) vs {t} (target); drift compares a model with its own fine-tune");
    }
    Ok(())
}

pub fn run(args: DriftArgs) -> Result<()> {
    let prompts = read_prompts(&args.prompts)?;
    let target = args.target.load()?;
    let mut aligned = Model::load_with(&args.aligned, LoadOptions { n_gpu_layers: args.target.n_gpu_layers, weight_repack: args.target.weight_repack })?;
    for path in &args.aligned_lora {
        aligned.add_lora(path, 1.0)?;
    }
    check_compatible(&aligned, &target)?;
    let vectors_path = match &args.vectors {
        Some(path) => path.clone(),
        None => inferalign::shipped::vectors_for(&aligned.path).context("pass the aligned model's vector file with --vectors")?,
    };
    let vectors = VectorFile::read(&vectors_path)?;
    vectors.check_fits(&aligned, &vectors_path)?;
    // Drift moves activations along directions: the gate measured is the file's
    // one-direction gate on the last token at its gate layer.
    let gate = vectors.calibration.as_ref().map(|c| Gate::from_file(&vectors, Some(c.gate_layer), None)).transpose()?;
    let recorded = vectors.calibration.as_ref().map(|c| c.data.template.as_str());
    let template = args.target.template(&target, recorded)?;

    let n_ctx = args.target.ctx_size as usize;
    let tokens = prepare(&target, &template, &prompts, n_ctx)?;
    let aligned_tokens = prepare(&aligned, &template, &prompts, n_ctx)?;
    if let Some(i) = (0..prompts.len()).find(|&i| tokens[i] != aligned_tokens[i]) {
        bail!("the models' tokenizers differ: prompt {} reads as {} tokens on the aligned model and {} on the target", i + 1, aligned_tokens[i].len(), tokens[i].len());
    }

    let layers = steerable_layers(&target);
    let params = args.target.context_params();
    let bar = progress(0, "aligned");
    let aligned_acts = capture_prompts(&aligned, &params, &tokens, &[0], &layers, None, &bar)?.acts;
    bar.finish_and_clear();
    let bar = progress(0, "target");
    let target_acts = capture_prompts(&target, &params, &tokens, &[0], &layers, None, &bar)?.acts;
    bar.finish_and_clear();
    let layers: Vec<usize> = layers.into_iter().filter(|l| vectors.directions.contains_key(l)).collect();
    let drift = measure(aligned_acts.view(), target_acts.view(), &layers, &vectors, gate.as_ref())?;

    if args.json {
        println!("{}", serde_json::to_string(&drift)?);
    } else {
        print_table(&drift);
    }
    if let Some(out) = &args.out {
        std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
        inferalign::output::write_bytes(&out.join("drift.json"), serde_json::to_string_pretty(&drift)?.as_bytes())?;
        let series = |f: fn(&inferalign::drift::LayerDrift) -> f64| drift.layers.iter().map(|d| (d.layer as f64, f(d))).collect();
        plot::lines(
            &out.join("drift.svg"),
            "drift of the target from the aligned model, per layer",
            "layer",
            &[
                ("relative L2", series(|d| d.relative)),
                ("cosine", series(|d| d.cosine)),
                ("share along safety direction", series(|d| d.safety_share)),
                ("share along a random direction (max of 64)", series(|d| d.random_share_max)),
            ],
            drift.gate.as_ref().map(|g| g.layer as f64),
        )?;
        eprintln!("wrote {}", out.display());
    }
    Ok(())
}

fn print_table(drift: &Drift) {
    println!("{} prompts, last prompt token; theta = the aligned model's safety direction", drift.prompts);
    println!("layer   mean L2    max L2  relative   cosine  along theta  share theta  share random");
    for d in &drift.layers {
        println!(
            "{:>5} {:>9.3} {:>9.3} {:>8.1}% {:>8.4} {:>12.3} {:>12.3} {:>13.3}",
            d.layer,
            d.mean_l2,
            d.max_l2,
            100.0 * d.relative,
            d.cosine,
            d.along_safety,
            d.safety_share,
            d.random_share_max
        );
    }
    if let Some(g) = &drift.gate {
        println!(
            "gate at layer {}: mean score {:.3} (aligned) -> {:.3} (target); {} prompts no longer flagged, {} newly flagged",
            g.layer, g.mean_score_aligned, g.mean_score_target, g.flipped_to_harmless, g.flipped_to_harmful
        );
    }
    println!("sum of squared distances over layers and prompts (Vaccine's drift): {:.1}", drift.sum_squared);
}
