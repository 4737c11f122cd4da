//! `inferalign generate`: answer prompts with the gate and the shift in the graph.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use inferalign::generate::{Engine, Event, Sampling};
use inferalign::llama::Context;
use inferalign::prompts::{prepare, read_prompts};
use inferalign::steer::Mode;

use super::non_negative;
use super::steer_args::GuardArgs;

/// What `generate` and `chat` share: the model, the vectors, the mode and sampling.
#[derive(Args)]
pub struct SessionArgs {
    #[command(flatten)]
    pub guard: GuardArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    session: SessionArgs,
    /// One prompt
    #[arg(short, long, conflicts_with = "prompts", required_unless_present = "prompts")]
    prompt: Option<String>,
    /// A file of prompts (text, JSONL or CSV)
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// One JSON object per prompt on stdout
    #[arg(long)]
    json: bool,
}

#[derive(Args, Clone, Debug)]
pub struct SamplingArgs {
    /// Most tokens to generate per prompt
    #[arg(short = 'n', long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 = greedy
    #[arg(long, default_value_t = 0.0)]
    pub temp: f32,
    #[arg(long, default_value_t = 40)]
    pub top_k: i32,
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    #[arg(long, default_value_t = 42)]
    pub seed: u32,
    /// DRY repetition penalty on steered answers only (multiplier, 0 = off); unsteered answers are never touched
    #[arg(long, default_value_t = inferalign::generate::DEFAULT_STEERED_DRY, value_parser = non_negative)]
    pub steered_dry: f32,
}

impl SamplingArgs {
    pub fn sampling(&self) -> Sampling {
        Sampling {
            max_tokens: self.max_tokens,
            temperature: self.temp,
            top_k: self.top_k,
            top_p: self.top_p,
            seed: self.seed,
            steered_dry: self.steered_dry,
            ignore_eos: false,
        }
    }
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let prompts = match (&args.prompt, &args.prompts) {
        (Some(p), _) => vec![p.clone()],
        (None, Some(path)) => read_prompts(path)?,
        (None, None) => unreachable!("clap requires one"),
    };
    let session = &args.session;
    let (model, resolved, template) = session.guard.open()?;
    let tokens = prepare(&model, &template, &prompts, session.guard.model.ctx_size as usize)?;
    let params = session.guard.model.context_params();
    let with_callback = resolved.mode != Mode::Plain;
    let mut ctx = Context::new(&model, &params, resolved.hook(1)?, with_callback)?;
    let mut engine = Engine::new(&model, &mut ctx, 1);
    let sampling = session.sampling.sampling();

    for (prompt, tokens) in prompts.iter().zip(&tokens) {
        if !args.json {
            println!("> {prompt}");
        }
        let mut done = None;
        engine.run(std::slice::from_ref(tokens), &sampling, |event| match event {
            Event::Text { text, .. } if !args.json => {
                print!("{text}");
                let _ = std::io::stdout().flush();
            }
            Event::Done { generation, .. } => done = Some(generation),
            _ => {}
        })?;
        let generation = done.expect("every request finishes");
        if args.json {
            let line = serde_json::json!({
                "prompt": prompt,
                "gate": generation.gate,
                "steered": generation.steered,
                "output": generation.output,
                "verdict": inferalign::judge::judge(&generation.output),
                "n_tokens": generation.tokens.len(),
            });
            println!("{line}");
        } else {
            let gate = match generation.gate {
                Some(g) => format!("gate {} (score {:.3} at layer {})", if g.harmful { "fired" } else { "closed" }, g.score, g.layer),
                None => "no gate".into(),
            };
            println!("\n[{gate}; {}; {} tokens]\n", if generation.steered { "steered" } else { "not steered" }, generation.tokens.len());
        }
    }
    Ok(())
}
