//! `inferalign serve`: an OpenAI-compatible server that gates every request on
//! its own, even when requests share a batch.

use std::sync::mpsc;

use anyhow::{Context as _, Result};
use clap::Args;
use serde_json::{json, Value};

use inferalign::llama::{Context, ContextParams, Model};
use inferalign::guard::{describe_strength, Guard};
use inferalign::generate::share;
use inferalign::server::{caches_prefix, router, run_engine, serve_http, shutdown_signal, warm_up, Limits, Metrics, ServeOptions};
use inferalign::prompts::Template;
use inferalign::steer::Mode;

use super::steer_args::GuardArgs;

/// Requests waiting for a free slot before the server answers 503.
const QUEUE: usize = 256;

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub guard: GuardArgs,
    /// Address to listen on
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port)
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Requests decoded together; each gets an equal share of --ctx-size (less the cached template opening)
    #[arg(long, default_value_t = 4)]
    pub parallel: usize,
    /// Require `Authorization: Bearer KEY` on /v1 endpoints
    #[arg(long, env = "INFERALIGN_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Model name reported to clients (default: the model file's name)
    #[arg(long)]
    pub alias: Option<String>,
    /// Most open connections; more are closed at once
    #[arg(long, default_value_t = 256)]
    pub max_connections: usize,
    /// Seconds a connection may take to send a request's headers, or sit idle between requests
    #[arg(long, default_value_t = 10)]
    pub header_timeout: u64,
    /// Answers that do not depend on the batch: a harmless greedy answer is
    /// token-identical to the same request served alone. Costs speed: weight
    /// repacking off, a KV stream per request, each prompt prefilled alone, at
    /// most 4 requests per decode, no prompt-prefix cache (Qwen 0.5B, 2 cores:
    /// 0.76x the default's tokens/s one client at a time, 0.65x under 16
    /// clients; see the README)
    #[arg(long)]
    pub deterministic: bool,
    /// Serve Prometheus metrics at /metrics (requests, tokens, gate decisions and scores, queue depth)
    #[arg(long)]
    pub metrics: bool,
}

/// A context in which each request's answer does not depend on what else is
/// in the batch. With one KV cache for all, a request's cells sit at offsets
/// that depend on the other requests, and llama.cpp's SIMD attention sums then
/// round differently (greedy answers diverged in 2 of 4 pairs); a KV stream per
/// sequence puts them where they would be alone. Flash attention stays off as
/// in the capture test, where invariance was proven without it.
pub fn batch_invariant(params: ContextParams, parallel: usize) -> ContextParams {
    ContextParams { n_seq_max: parallel as u32, kv_unified: false, flash_attn: Some(false), ..params }
}

pub fn run(mut args: ServeArgs) -> Result<()> {
    check(&args)?;
    // Repacked weights go through multi-row matmul kernels that round
    // differently from the one-row kernel a request alone gets: with them on,
    // 11 of 48 greedy answers changed under load even at 4 requests per call.
    args.guard.model.weight_repack = !args.deterministic;
    let (model, resolved, template) = args.guard.open()?;
    let mode = resolved.mode;
    // The fast setting keeps the chat template's prefix decoded in one more sequence.
    let params = ContextParams { n_seq_max: args.parallel as u32 + 1, ..args.guard.model.context_params() };
    let params = if args.deterministic { batch_invariant(params, args.parallel) } else { params };
    let deterministic = args.deterministic;
    let model_id = args.alias.clone().unwrap_or_else(|| model_name(&model));
    let metrics = Metrics::new()?;
    let props = props(&args, &model_id, &model, &resolved, &template, &params);

    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind((args.host.as_str(), args.port)))
        .with_context(|| format!("cannot listen on {}:{}; is another server using the port? try --port", args.host, args.port))?;
    let (jobs, queue) = mpsc::sync_channel(QUEUE);
    let (engine_ended, engine_end) = tokio::sync::oneshot::channel::<()>();

    std::thread::scope(|scope| {
        let (ready, engine_ready) = mpsc::channel();
        let (model, params, template, parallel, engine_metrics) = (&model, &params, &template, args.parallel, metrics.clone());
        let hook = resolved.hook(parallel + 1)?;
        let engine = scope.spawn(move || {
            let _ended = engine_ended;
            let mut ctx = Context::new(model, params, hook, mode != Mode::Plain)?;
            warm_up(model, template, &mut ctx)?;
            let _ = ready.send(());
            run_engine(model, template, &mut ctx, parallel, deterministic, &engine_metrics, queue)
        });
        if engine_ready.recv().is_err() {
            return engine.join().expect("the engine thread panicked");
        }
        let options = ServeOptions {
            model_id: model_id.clone(),
            api_key: args.api_key.clone(),
            mode: format!("{mode:?}").to_lowercase(),
            metrics,
            expose_metrics: args.metrics,
            props,
        };
        let app = router(jobs, options);
        let addr = listener.local_addr()?;
        eprintln!(
            "serving {model_id} on http://{addr} ({} parallel requests sharing {} context tokens); Ctrl-C stops",
            args.parallel,
            params.n_ctx
        );
        let served = runtime.block_on(async {
            let stop = async {
                tokio::select! {
                    _ = shutdown_signal() => eprintln!("shutting down: finishing requests in flight"),
                    _ = engine_end => {}
                }
            };
            let limits = Limits { max_connections: args.max_connections, header_timeout: std::time::Duration::from_secs(args.header_timeout) };
            serve_http(listener, app, limits, stop).await;
            Ok::<(), anyhow::Error>(())
        });
        let engine = engine.join().expect("the engine thread panicked");
        served.context("the HTTP server failed")?;
        engine.context("the engine stopped")
    })
}

/// Flags that cannot work together, said before the model loads.
fn check(args: &ServeArgs) -> Result<()> {
    anyhow::ensure!(args.parallel >= 1, "--parallel must be at least 1");
    anyhow::ensure!(
        args.parallel as u32 <= args.guard.model.batch_size,
        "--parallel {} is more than the batch size -b {}: every request needs a row in each decode",
        args.parallel,
        args.guard.model.batch_size
    );
    anyhow::ensure!(args.max_connections >= 1 && args.header_timeout >= 1, "--max-connections and --header-timeout must be at least 1");
    Ok(())
}

/// What `/props` says: the model, the context each request gets, the template and the guard.
fn props(args: &ServeArgs, model_id: &str, model: &Model, resolved: &Guard, template: &Template, params: &ContextParams) -> Value {
    let cached = if caches_prefix(resolved.mode, args.deterministic) { resolved.opening.len() } else { 0 };
    json!({
        "model": model_id,
        "model_path": model.path.display().to_string(),
        "n_ctx": params.n_ctx,
        "n_ctx_per_request": share(params.n_ctx as usize, cached, args.parallel),
        "total_slots": args.parallel,
        "chat_template": template.name,
        "deterministic": args.deterministic,
        "inferalign": {
            "mode": format!("{:?}", resolved.mode).to_lowercase(),
            "gate_file": resolved.gate_path.display().to_string(),
            "gate_layer": resolved.gate.layer(),
            "gate_terms": resolved.gate.describe(),
            "gate_bias": resolved.gate.bias,
            "steer_file": resolved.steer_path.display().to_string(),
            "steering": describe_strength(resolved.steering.strength),
            "steered_layers": resolved.steering.layers,
        },
    })
}

fn model_name(model: &Model) -> String {
    model.path.file_name().map_or_else(|| model.path.display().to_string(), |n| n.to_string_lossy().into_owned())
}
