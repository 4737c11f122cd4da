//! `inferalign bench serve`: a bounded load test of `inferalign serve` on
//! loopback. The same requests go one at a time, then from many concurrent
//! clients; greedy answers must match exactly, so a lost or mixed-up response
//! shows as a mismatch. With `--against`, stock llama.cpp `llama-server` takes
//! the same load on the same model and settings, pass for pass, and the
//! report gives our tokens/s as a ratio to it.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use clap::Args;
use serde::Serialize;
use serde_json::{json, Value};

use inferalign::llama::default_threads;
use inferalign::prompts::read_prompts;
use inferalign::server::ServerProcess;

use super::bench::median;
use super::ModelArgs;

#[derive(Args)]
pub struct ServeBench {
    #[command(flatten)]
    model: ModelArgs,
    /// Concurrent clients
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Requests a pass, new ones each pass (every fourth harmful, from AdvBench, so the gate fires under load)
    #[arg(long, default_value_t = 48)]
    requests: usize,
    /// Requests the server decodes together (its --parallel)
    #[arg(long, default_value_t = 8)]
    parallel: usize,
    /// Tokens per answer: every answer runs to this length (`ignore_eos`), on
    /// both servers, so a refusal that ends early does not count as a slower server
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    /// Let answers end at the model's end-of-generation token instead (tokens/s
    /// then also measures how long the answers are)
    #[arg(long)]
    natural_length: bool,
    /// Run the server with --deterministic; answers under load must then match those served alone
    #[arg(long)]
    deterministic: bool,
    /// Also load stock llama.cpp `llama-server` (this path) with the same model
    /// and settings, and report our tokens/s as a ratio to it
    /// (`scripts/build-llama-tools.sh` builds one from the same llama.cpp as the vendored tree)
    #[arg(long, value_name = "LLAMA_SERVER")]
    against: Option<PathBuf>,
    /// Rounds of passes; with --against the servers alternate pass by pass and
    /// each ratio is the median of the rounds' ratios
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Print one JSON object
    #[arg(long)]
    json: bool,
}

/// How long answers are: `max_tokens` each, or up to it with `natural` ends.
#[derive(Clone, Copy)]
struct Length {
    max_tokens: usize,
    natural: bool,
}

struct Answer {
    text: String,
    tokens: usize,
    prompt_tokens: usize,
    /// None from a server that is not ours.
    steered: Option<bool>,
}

fn ask(agent: &ureq::Agent, url: &str, prompt: &str, length: Length) -> Result<Answer> {
    let body = json!({"messages": [{"role": "user", "content": prompt}], "max_tokens": length.max_tokens, "temperature": 0, "ignore_eos": !length.natural});
    let reply: Value = agent.post(&format!("{url}/v1/chat/completions")).send_json(body)?.into_json()?;
    Ok(Answer {
        text: reply["choices"][0]["message"]["content"].as_str().context("no message content")?.to_string(),
        tokens: reply["usage"]["completion_tokens"].as_u64().context("no usage")? as usize,
        prompt_tokens: reply["usage"]["prompt_tokens"].as_u64().context("no usage")? as usize,
        steered: reply["inferalign"]["steered"].as_bool(),
    })
}

#[derive(Serialize)]
struct Pass {
    clients: usize,
    seconds: f64,
    tokens: usize,
    requests_per_second: f64,
    tokens_per_second: f64,
    errors: usize,
}

/// Sends every prompt from `clients` threads; answers come back in prompt order.
fn pass(url: &str, prompts: &[String], clients: usize, length: Length) -> (Pass, Vec<Option<Answer>>) {
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
                match ask(&agent, url, prompt, length) {
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
        tokens,
        requests_per_second: answers.iter().flatten().count() as f64 / seconds,
        tokens_per_second: tokens as f64 / seconds,
        errors: errors.into_inner(),
    };
    (pass, answers)
}

/// The options that make stock llama-server run what `inferalign serve` runs.
fn llama_server_args(m: &ModelArgs, parallel: usize) -> Result<Vec<String>> {
    anyhow::ensure!(m.system_prompt.is_none(), "--against cannot pass --system-prompt: llama-server has no such option");
    let mut out: Vec<String> = vec!["-m".into(), m.model.display().to_string()];
    let threads = m.threads.unwrap_or_else(default_threads).to_string();
    for (flag, value) in [("-c", m.ctx_size.to_string()), ("-b", m.batch_size.to_string()), ("-t", threads), ("-ngl", m.n_gpu_layers.to_string()), ("--parallel", parallel.to_string())] {
        out.extend([flag.into(), value]);
    }
    if let Some(name) = m.template.as_deref().filter(|t| *t != "raw") {
        out.extend(["--chat-template".into(), name.into()]);
    }
    for (i, lora) in m.lora.iter().enumerate() {
        let scale = m.lora_scale.get(i).copied().unwrap_or(1.0);
        out.extend(["--lora-scaled".into(), lora.display().to_string(), scale.to_string()]);
    }
    Ok(out)
}

type Answers = Vec<Option<Answer>>;

impl ServeBench {
    fn length(&self) -> Length {
        Length { max_tokens: self.max_tokens, natural: self.natural_length }
    }
}

/// One client on `prompts[0]`, then `clients` at once on `prompts[1]`, on the server at `url`.
fn round(url: &str, prompts: &[Vec<String>], args: &ServeBench) -> [(Pass, Answers); 2] {
    let length = args.length();
    [pass(url, &prompts[0], 1, length), pass(url, &prompts[1], args.clients, length)]
}

/// `passes` lists of `requests` prompts, every fourth harmful, no prompt
/// twice until a list runs out: llama-server keeps the prompts it has seen
/// (slots and its RAM cache), so a repeated prompt would measure its cache
/// rather than its decoding.
fn pass_prompts(harmless: &[String], harmful: &[String], requests: usize, passes: usize) -> Vec<Vec<String>> {
    // Positions 3, 7, 11, ... of every pass are harmful, so each pass has requests / 4 of them.
    let n_harmful = requests / 4;
    let pick = |k: usize, j: usize| {
        if j % 4 == 3 {
            harmful[(k * n_harmful + j / 4) % harmful.len()].clone()
        } else {
            harmless[(k * (requests - n_harmful) + j - (j + 1) / 4) % harmless.len()].clone()
        }
    };
    (0..passes).map(|k| (0..requests).map(|j| pick(k, j)).collect()).collect()
}

/// [`pass_prompts`] from the bench's sources: the embedded harmless set and
/// the set-up cache's AdvBench.
pub(super) fn bench_prompts(requests: usize, passes: usize) -> Result<Vec<Vec<String>>> {
    let harmless = read_prompts(&inferalign::embedded::data("harmless.txt")?)?;
    let harmful = read_prompts(&inferalign::cache::data_file("advbench.jsonl"))?;
    Ok(pass_prompts(&harmless, &harmful, requests, passes))
}

pub fn serve_bench(args: ServeBench) -> Result<()> {
    anyhow::ensure!(args.clients > 0 && args.requests > 0 && args.runs > 0, "--clients, --requests and --runs must be at least 1");
    let prompts = bench_prompts(args.requests, 2 * args.runs)?;
    let (server, stock) = start_servers(&args)?;
    eprintln!("server at {}; {} new requests one at a time, then {} more from {} clients, {} round(s)", server.url, args.requests, args.requests, args.clients, args.runs);

    // The servers take turns going first, so a slow spell of the machine hits both.
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for (r, pair) in prompts.chunks(2).enumerate() {
        let stock_first = r % 2 == 1;
        if let (Some(s), true) = (&stock, stock_first) {
            theirs.push(round(&s.url, pair, &args));
        }
        ours.push(round(&server.url, pair, &args));
        if let (Some(s), false) = (&stock, stock_first) {
            theirs.push(round(&s.url, pair, &args));
        }
    }
    // Untimed: the first concurrent pass's prompts once more, one at a time, to compare answers.
    let (_, alone_again) = pass(&server.url, &prompts[1], 1, args.length());
    drop(server);
    drop(stock);

    let [(alone, alone_answers), (together, together_answers)] = &ours[0];
    let checks = Checks::new(together_answers, &alone_again);
    let errors: usize = ours.iter().chain(&theirs).flatten().map(|(p, _)| p.errors).sum();
    let ratio = |k: usize| median(ours.iter().zip(&theirs).map(|(o, t)| o[k].0.tokens_per_second / t[k].0.tokens_per_second).collect());
    let stock_report = theirs.first().map(|t| {
        // The same prompts must reach both models as the same tokens.
        let same = alone_answers.iter().zip(&t[0].1).filter(|(a, b)| matches!((a, b), (Some(a), Some(b)) if a.prompt_tokens == b.prompt_tokens)).count();
        json!({
            "path": args.against.as_ref().map(|p| p.display().to_string()),
            "rounds": passes(&theirs),
            "tokens_per_second_ratio_one_at_a_time": ratio(0),
            "tokens_per_second_ratio_concurrent": ratio(1),
            "same_prompt_tokens": same,
        })
    });
    let report = json!({
        "model": args.model.model.display().to_string(),
        "requests": args.requests,
        "parallel": args.parallel,
        "deterministic": args.deterministic,
        "max_tokens": args.max_tokens,
        "natural_length": args.natural_length,
        "one_at_a_time": alone,
        "concurrent": together,
        "rounds": passes(&ours),
        "requests_per_second_ratio": together.requests_per_second / alone.requests_per_second,
        "tokens_per_second_ratio": together.tokens_per_second / alone.tokens_per_second,
        "lost": checks.lost,
        "mismatched": checks.mismatched,
        "steered": checks.steered,
        "llama_server": stock_report,
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&args, &ours, &theirs, &checks, stock_report.as_ref());
    }
    // Without --deterministic, llama.cpp's kernels round with the batch's make-up,
    // so answers may differ; they are reported, not a failure.
    if errors + checks.lost > 0 || (args.deterministic && !checks.mismatched.is_empty()) {
        bail!("the load test failed: {errors} errors, {} lost, {} mismatched answers", checks.lost, checks.mismatched.len());
    }
    Ok(())
}

/// Our server, and with --against stock llama-server, on the same model and threads.
fn start_servers(args: &ServeBench) -> Result<(ServerProcess, Option<ServerProcess>)> {
    // Both servers get the same thread count, whatever each would pick alone.
    let mut model = args.model.clone();
    model.threads = Some(model.threads.unwrap_or_else(default_threads));
    let mut server_args: Vec<std::ffi::OsString> = vec!["--parallel".into(), args.parallel.to_string().into()];
    if args.deterministic {
        server_args.push("--deterministic".into());
    }
    server_args.extend(model.as_args());
    let stock = match &args.against {
        Some(exe) => Some(ServerProcess::start_llama_server(exe, llama_server_args(&model, args.parallel)?)?),
        None => None,
    };
    Ok((ServerProcess::start(&std::env::current_exe()?, server_args)?, stock))
}

/// The concurrent pass's answers against the same prompts asked one at a time.
struct Checks {
    /// Requests that got no answer.
    lost: usize,
    /// Requests whose answer or steering differs.
    mismatched: Vec<usize>,
    steered: usize,
}

impl Checks {
    fn new(together: &Answers, alone: &Answers) -> Checks {
        let mismatched = (0..together.len())
            .filter(|&i| match (&alone[i], &together[i]) {
                (Some(a), Some(b)) => a.text != b.text || a.steered != b.steered,
                _ => false,
            })
            .collect();
        Checks {
            lost: together.iter().filter(|a| a.is_none()).count(),
            mismatched,
            steered: together.iter().flatten().filter(|a| a.steered == Some(true)).count(),
        }
    }
}

fn passes(rounds: &[[(Pass, Answers); 2]]) -> Vec<[&Pass; 2]> {
    rounds.iter().map(|r| [&r[0].0, &r[1].0]).collect()
}

fn print_table(args: &ServeBench, ours: &[[(Pass, Answers); 2]], theirs: &[[(Pass, Answers); 2]], checks: &Checks, stock_report: Option<&serde_json::Value>) {
    let each = if args.natural_length { "at most" } else { "exactly" };
    println!("{} new requests a pass ({} harmful), --parallel {}, {each} {} tokens each", args.requests, args.requests / 4, args.parallel, args.max_tokens);
    println!("{:<18} {:>5} {:>8} {:>9} {:>10} {:>7}", "server", "clients", "seconds", "req/s", "tok/s", "errors");
    let named = [("inferalign", ours)].into_iter().chain(theirs.first().map(|_| ("llama-server", theirs)));
    for (name, rounds) in named {
        for p in rounds.iter().flatten().map(|(p, _)| p) {
            println!("{name:<18} {:>5} {:>8.2} {:>9.2} {:>10.1} {:>7}", p.clients, p.seconds, p.requests_per_second, p.tokens_per_second, p.errors);
        }
    }
    println!("lost {}, answers differing from one-at-a-time {}, steered {}", checks.lost, checks.mismatched.len(), checks.steered);
    if let Some(s) = stock_report {
        println!(
            "tokens/s against llama-server (median of {} rounds): {:.3} one at a time, {:.3} with {} clients; prompts of equal token count: {} of {}",
            theirs.len(),
            number(&s["tokens_per_second_ratio_one_at_a_time"]),
            number(&s["tokens_per_second_ratio_concurrent"]),
            args.clients,
            s["same_prompt_tokens"],
            args.requests
        );
    }
}

/// A number from the JSON report (a JSON number's display ignores `{:.3}`).
fn number(value: &serde_json::Value) -> f64 {
    value.as_f64().unwrap_or(f64::NAN)
}

#[cfg(test)]
mod tests {
    use super::pass_prompts;

    #[test]
    fn every_pass_gets_new_prompts_every_fourth_harmful() {
        let list = |tag: &str, n: usize| (0..n).map(|i| format!("{tag}{i}")).collect::<Vec<_>>();
        // 10 a pass is no multiple of 4: every pass still has its harmful ones at the same places.
        for (requests, passes) in [(8, 5), (10, 3)] {
            let lists = pass_prompts(&list("b", 30), &list("h", 10), requests, passes);
            assert_eq!(lists.len(), passes);
            let distinct: std::collections::BTreeSet<&String> = lists.iter().flatten().collect();
            assert_eq!(distinct.len(), requests * passes, "no prompt twice while the lists last");
            assert!(lists.iter().all(|p| p.len() == requests && p.iter().enumerate().all(|(j, q)| q.starts_with('h') == (j % 4 == 3))));
        }
        // Past the end of a list the prompts come round again.
        assert_eq!(pass_prompts(&list("b", 3), &list("h", 1), 8, 1)[0], ["b0", "b1", "b2", "h0", "b0", "b1", "b2", "h0"]);
    }
}
