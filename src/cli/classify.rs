//! `inferalign classify`: the gate alone, no generation.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use inferalign::capture::capture_prompts;
use inferalign::gate::Gate;
use inferalign::prompts::{prepare, preview, read_prompts};
use inferalign::vectors::VectorFile;

use super::{progress, ModelArgs};

#[derive(Args)]
pub struct ClassifyArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Vector file with a calibrated gate (from `inferalign extract`); default: the shipped file for this model
    #[arg(long)]
    gate: Option<PathBuf>,
    /// Prompts to classify (text, JSONL or CSV)
    #[arg(long)]
    prompts: PathBuf,
    /// Gate layer (default: the file's l0)
    #[arg(long)]
    layer: Option<usize>,
    /// Gate bias (default: the file's calibrated bias for that layer); larger is more cautious
    #[arg(long, allow_hyphen_values = true)]
    bias: Option<f32>,
    /// One JSON object per prompt on stdout
    #[arg(long)]
    json: bool,
}

pub fn run(args: ClassifyArgs) -> Result<()> {
    let prompts = read_prompts(&args.prompts)?;
    let model = args.model.load()?;
    let gate_path = match &args.gate {
        Some(path) => path.clone(),
        None => inferalign::shipped::vectors_for(&model.path)?,
    };
    let vectors = VectorFile::read(&gate_path)?;
    let gate = Gate::from_file(&vectors, args.layer, args.bias)?;
    vectors.check_fits(&model, &gate_path)?;
    let recorded = vectors.calibration.as_ref().map(|c| c.data.template.as_str());
    let template = args.model.template(&model, recorded)?;
    let tokens = prepare(&model, &template, &prompts, args.model.ctx_size as usize)?;

    let bar = progress(prompts.len() as u64, "classify");
    let (acts, _) = capture_prompts(&model, &args.model.context_params(), &tokens, &[gate.offset], &[gate.layer], &bar)?;
    bar.finish_and_clear();

    let mut flagged = 0;
    for (i, prompt) in prompts.iter().enumerate() {
        let activation = acts.slice(ndarray::s![i, gate.layer, ..]);
        let score = gate.score(activation.as_slice().expect("contiguous"));
        let harmful = Gate::is_harmful(score);
        flagged += harmful as usize;
        if args.json {
            let line = serde_json::json!({"prompt": prompt, "score": score, "harmful": harmful, "layer": gate.layer});
            println!("{line}");
        } else {
            println!("{:>8.3}  {:<8}  {}", score, if harmful { "harmful" } else { "ok" }, preview(prompt));
        }
    }
    eprintln!("{flagged} of {} prompts flagged harmful (layer {}, bias {:.3})", prompts.len(), gate.layer, gate.bias);
    Ok(())
}
