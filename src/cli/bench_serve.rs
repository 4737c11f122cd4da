//! `inferalign bench serve`: a bounded load test of `inferalign serve` on
//! loopback. The same requests go one at a time, then from many concurrent
//! clients; greedy answers must match exactly, so a lost or mixed-up response
//! shows as a mismatch.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use clap::Args;
use serde::Serialize;
use serde_json::{json, Value};

use inferalign::prompts::read_prompts;
use inferalign::server::ServerProcess;

use super::ModelArgs;

#[derive(Args)]
pub struct ServeBench {
    #[command(flatten)]
    model: ModelArgs,
    /// Concurrent clients
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Requests in all (every fourth harmful, from AdvBench, so the gate fires under load)
    #[arg(long, default_value_t = 48)]
    requests: usize,
    /// Requests the server decodes together (its --parallel)
    #[arg(long, default_value_t = 8)]
    parallel: usize,
    /// Tokens per answer
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    /// Run the server with --deterministic; answers under load must then match those served alone
    #[arg(long)]
    deterministic: bool,
    /// Print one JSON object
    #[arg(long)]
    json: bool,
}

struct Answer {
    text: String,
    tokens: usize,
    steered: bool,
}

fn ask(agent: &ureq::Agent, url: &str, prompt: &str, max_tokens: usize) -> Result<Answer> {
    let body = json!({"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0});
    let reply: Value = agent.post(&format!("{url}/v1/chat/completions")).send_json(body)?.into_json()?;
    Ok(Answer {
        text: reply["choices"][0]["message"]["content"].as_str().context("no message content")?.to_string(),
        tokens: reply["usage"]["completion_tokens"].as_u64().context("no usage")? as usize,
        steered: reply["inferalign"]["steered"].as_bool().context("no inferalign.steered")?,
    })
}

#[derive(Serialize)]
struct Pass {
    clients: usize,
    seconds: f64,
    requests_per_second: f64,
    tokens_per_second: f64,
    errors: usize,
}

/// Sends every prompt from `clients` threads; answers come back in prompt order.
fn pass(url: &str, prompts: &[String], clients: usize, max_tokens: usize) -> (Pass, Vec<Option<Answer>>) {
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(600)).build();
    let next = AtomicUsize::new(0);
    let answers: Mutex<Vec<Option<Answer>>> = Mutex::new((0..prompts.len()).map(|_| None).collect());
    let errors = AtomicUsize::new(0);
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..clients {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(prompt) = prompts.get(i) else { return };
                match ask(&agent, url, prompt, max_tokens) {
                    Ok(answer) => answers.lock().expect("no panics")[i] = Some(answer),
                    Err(e) => {
                        eprintln!("request {i} failed: {e:#}");
                        errors.fetch_add(1, Ordering::SeqCst);
                    }
                }
            });
        }
    });
    let seconds = started.elapsed().as_secs_f64();
    let answers = answers.into_inner().expect("no panics");
    let tokens: usize = answers.iter().flatten().map(|a| a.tokens).sum();
    let pass = Pass {
        clients,
        seconds,
        requests_per_second: answers.iter().flatten().count() as f64 / seconds,
        tokens_per_second: tokens as f64 / seconds,
        errors: errors.into_inner(),
    };
    (pass, answers)
}

pub fn serve_bench(args: ServeBench) -> Result<()> {
    anyhow::ensure!(args.clients > 0 && args.requests > 0, "--clients and --requests must be at least 1");
    let harmless = read_prompts(&inferalign::embedded::data("harmless.txt")?)?;
    let harmful = read_prompts(&inferalign::cache::data_file("advbench.jsonl"))?;
    let prompts: Vec<String> =
        (0..args.requests).map(|i| if i % 4 == 3 { harmful[i % harmful.len()].clone() } else { harmless[i % harmless.len()].clone() }).collect();
    let mut server_args: Vec<std::ffi::OsString> = vec!["--parallel".into(), args.parallel.to_string().into()];
    if args.deterministic {
        server_args.push("--deterministic".into());
    }
    server_args.extend(args.model.as_args());
    let server = ServerProcess::start(&std::env::current_exe()?, server_args)?;
    eprintln!("server at {}; {} requests one at a time, then from {} clients", server.url, prompts.len(), args.clients);
    let (alone, alone_answers) = pass(&server.url, &prompts, 1, args.max_tokens);
    let (together, together_answers) = pass(&server.url, &prompts, args.clients, args.max_tokens);
    drop(server);

    let lost = together_answers.iter().filter(|a| a.is_none()).count();
    let mismatched: Vec<usize> = (0..prompts.len())
        .filter(|&i| match (&alone_answers[i], &together_answers[i]) {
            (Some(a), Some(b)) => a.text != b.text || a.steered != b.steered,
            _ => false,
        })
        .collect();
    let steered = together_answers.iter().flatten().filter(|a| a.steered).count();
    let report = json!({
        "model": args.model.model.display().to_string(),
        "requests": prompts.len(),
        "parallel": args.parallel,
        "deterministic": args.deterministic,
        "max_tokens": args.max_tokens,
        "one_at_a_time": alone,
        "concurrent": together,
        "requests_per_second_ratio": together.requests_per_second / alone.requests_per_second,
        "tokens_per_second_ratio": together.tokens_per_second / alone.tokens_per_second,
        "lost": lost,
        "mismatched": mismatched,
        "steered": steered,
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{} requests ({} harmful), server --parallel {}, {} tokens each", prompts.len(), prompts.len() / 4, args.parallel, args.max_tokens);
        println!("{:<16} {:>8} {:>9} {:>10} {:>10} {:>7}", "clients", "seconds", "req/s", "tok/s", "tok/s x", "errors");
        for p in [&alone, &together] {
            println!(
                "{:<16} {:>8.2} {:>9.2} {:>10.1} {:>10.2} {:>7}",
                p.clients,
                p.seconds,
                p.requests_per_second,
                p.tokens_per_second,
                p.tokens_per_second / alone.tokens_per_second,
                p.errors
            );
        }
        println!("lost {lost}, answers differing from one-at-a-time {}, steered {steered}", mismatched.len());
    }
    // Without --deterministic, llama.cpp's kernels round with the batch's make-up,
    // so answers may differ; they are reported, not a failure.
    if alone.errors + together.errors + lost > 0 || (args.deterministic && !mismatched.is_empty()) {
        bail!("the load test failed: {} errors, {lost} lost, {} mismatched answers", alone.errors + together.errors, mismatched.len());
    }
    Ok(())
}
