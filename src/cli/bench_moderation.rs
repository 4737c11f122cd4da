//! `inferalign bench moderation`: the gate-only endpoint's inputs/s on
//! loopback, all inputs in one request and one input per request, against
//! one-token chat requests on the same inputs, which run every layer: what
//! stopping the forward pass at the gate layer saves.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use clap::Args;
use serde::Serialize;
use serde_json::{json, Value};

use inferalign::server::ServerProcess;

use super::bench::median;
use super::bench_serve::bench_prompts;
use super::ModelArgs;

#[derive(Args)]
pub struct ModerationBench {
    #[command(flatten)]
    model: ModelArgs,
    /// Inputs a pass (every fourth harmful, from AdvBench); every way gets the same ones
    #[arg(long, default_value_t = 32)]
    inputs: usize,
    /// Inputs the server gates together (its --parallel)
    #[arg(long, default_value_t = 8)]
    parallel: usize,
    /// Rounds; each figure is the median of the rounds'
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Print one JSON object
    #[arg(long)]
    json: bool,
}

/// How a pass sends its inputs.
#[derive(Clone, Copy)]
enum Way {
    /// One `/v1/moderations` request with every input in its list.
    Batched,
    /// One `/v1/moderations` request an input, one after another.
    OneByOne,
    /// One chat request an input, one token each: every layer runs.
    Chat,
}

impl Way {
    const ALL: [Way; 3] = [Way::Batched, Way::OneByOne, Way::Chat];
    /// Where [`Way::Chat`], the one the others are measured against, sits in [`Way::ALL`].
    const REFERENCE: usize = 2;

    fn name(self) -> &'static str {
        match self {
            Way::Batched => "moderation, one request",
            Way::OneByOne => "moderation, one by one",
            Way::Chat => "chat, 1 token",
        }
    }

    /// The gate's verdict on each input.
    fn verdicts(self, agent: &ureq::Agent, url: &str, inputs: &[String]) -> Result<Vec<bool>> {
        let post = |path: &str, body: Value| -> Result<Value> { Ok(agent.post(&format!("{url}{path}")).send_json(body)?.into_json()?) };
        let flagged = |result: &Value| result["flagged"].as_bool().context("a moderation result has no `flagged`");
        match self {
            Way::Batched => post("/v1/moderations", json!({ "input": inputs }))?["results"].as_array().context("no moderation results")?.iter().map(flagged).collect(),
            Way::OneByOne => inputs.iter().map(|i| flagged(&post("/v1/moderations", json!({ "input": i }))?["results"][0])).collect(),
            Way::Chat => inputs
                .iter()
                .map(|i| {
                    let body = json!({"messages": [{"role": "user", "content": i}], "max_tokens": 1, "temperature": 0});
                    post("/v1/chat/completions", body)?["inferalign"]["gate"]["harmful"].as_bool().context("a chat answer has no gate verdict")
                })
                .collect(),
        }
    }
}

#[derive(Serialize)]
struct Figure {
    way: &'static str,
    inputs_per_second: f64,
    rounds: Vec<f64>,
    flagged: usize,
    /// Inputs whose verdict differs from the one-token chat's gate.
    differ_from_chat: usize,
}

pub fn moderation_bench(args: ModerationBench) -> Result<()> {
    anyhow::ensure!(args.inputs > 0 && args.runs > 0, "--inputs and --runs must be at least 1");
    let inputs = bench_prompts(args.inputs, 1)?.remove(0);
    let mut server_args: Vec<std::ffi::OsString> = vec!["--parallel".into(), args.parallel.to_string().into()];
    server_args.extend(args.model.as_args());
    let server = ServerProcess::start(&std::env::current_exe()?, server_args)?;
    eprintln!("server at {}; {} inputs ({} harmful) three ways, {} round(s)", server.url, args.inputs, args.inputs / 4, args.runs);
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(600)).build();
    let mut rates = vec![Vec::new(); Way::ALL.len()];
    let mut verdicts = vec![Vec::new(); Way::ALL.len()];
    for r in 0..args.runs {
        // Each round starts with another way, so a slow spell of the machine hits all alike.
        for k in (0..Way::ALL.len()).map(|k| (k + r) % Way::ALL.len()) {
            let started = Instant::now();
            verdicts[k] = Way::ALL[k].verdicts(&agent, &server.url, &inputs).with_context(|| format!("{} failed", Way::ALL[k].name()))?;
            rates[k].push(inputs.len() as f64 / started.elapsed().as_secs_f64());
        }
    }
    let chat = &verdicts[Way::REFERENCE];
    let figures: Vec<Figure> = Way::ALL
        .iter()
        .zip(rates.into_iter().zip(&verdicts))
        .map(|(way, (rounds, v))| Figure {
            way: way.name(),
            inputs_per_second: median(rounds.clone()),
            rounds,
            flagged: v.iter().filter(|&&f| f).count(),
            differ_from_chat: v.iter().zip(chat).filter(|(a, b)| a != b).count(),
        })
        .collect();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&json!({"model": args.model.model.display().to_string(), "inputs": args.inputs, "parallel": args.parallel, "runs": args.runs, "ways": figures}))?);
        return Ok(());
    }
    let full = figures[Way::REFERENCE].inputs_per_second;
    println!("{:<24} {:>9} {:>9} {:>8} {:>16}", "way", "inputs/s", "vs chat", "flagged", "differ from chat");
    for f in &figures {
        println!("{:<24} {:>9.2} {:>8.2}x {:>8} {:>16}", f.way, f.inputs_per_second, f.inputs_per_second / full, f.flagged, f.differ_from_chat);
    }
    Ok(())
}
