//! `inferalign classify`: the gate alone, no generation.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use inferalign::gate::Gate;
use inferalign::generate::Engine;
use inferalign::llama::Context;
use inferalign::prompts::{prepare, preview, read_prompts};
use inferalign::steer::{Mode, SteerHook, Steering};
use inferalign::vectors::{Strength, VectorFile};

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
    /// Gate layer: a one-direction gate on the last token there (default: the file's gate)
    #[arg(long)]
    layer: Option<usize>,
    /// Gate bias (default: the file's calibrated bias for that layer); larger is more cautious
    #[arg(long, allow_hyphen_values = true)]
    bias: Option<f32>,
    /// Prompts gated together
    #[arg(long, default_value_t = 4)]
    parallel: usize,
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

    // The gate as generation runs it, through a gate-only pass that stops at its layer.
    let parallel = args.parallel.clamp(1, 64);
    let mut params = args.model.context_params();
    params.n_seq_max = parallel as u32;
    let unused = Steering::new(&vectors, Strength::Alpha(0.0), &[gate.layer()], model.n_layer())?;
    let mut hook = SteerHook::new(Mode::Gated, Some(gate.clone()), unused, parallel)?;
    hook.set_opening(template.opening(&model)?);
    hook.set_user_header(template.user_header(&model)?);
    let mut ctx = Context::new(&model, &params, hook, true)?;
    let mut engine = Engine::new(&model, &mut ctx, parallel);
    let bar = progress(prompts.len() as u64, "classify");
    let mut flagged = 0;
    for (chunk, texts) in tokens.chunks(parallel).zip(prompts.chunks(parallel)) {
        let refs: Vec<&[i32]> = chunk.iter().map(Vec::as_slice).collect();
        for (decision, prompt) in engine.moderate_all(&refs).into_iter().zip(texts) {
            let d = decision?;
            flagged += d.harmful as usize;
            if args.json {
                println!("{}", serde_json::json!({"prompt": prompt, "score": d.score, "harmful": d.harmful, "layer": d.layer}));
            } else {
                bar.suspend(|| println!("{:>8.3}  {:<8}  {}", d.score, if d.harmful { "harmful" } else { "ok" }, preview(prompt)));
            }
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    eprintln!("{flagged} of {} prompts flagged harmful (gate {}, bias {:.3})", prompts.len(), gate.describe(), gate.bias);
    Ok(())
}
