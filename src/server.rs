//! An OpenAI-compatible HTTP server. One engine thread owns the llama.cpp
//! context and decodes every live request together (continuous batching); the
//! steering hook gates each request on its own. The HTTP side (axum on tokio)
//! only parses, queues and streams.

use std::collections::HashMap;
use std::convert::Infallible;
use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _, Result};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamExt;

use crate::generate::{Engine, Event, Sampling};
use crate::llama::{Context, Model};
use crate::prompts::{tokenize, Template};
use crate::steer::{GateDecision, SteerHook};

/// What a request asks the engine to do.
pub struct Job {
    input: Input,
    sampling: Sampling,
    stop: Vec<String>,
    replies: mpsc::UnboundedSender<Reply>,
}

enum Input {
    Chat(Vec<(String, String)>),
    Text(String),
}

/// What the engine tells a request's handler, in this order: `Started`, any
/// number of `Text`, `Done`; or only `Rejected`.
#[derive(Debug)]
enum Reply {
    Started { gate: Option<GateDecision>, steered: bool, prompt_tokens: usize },
    Text(String),
    Done { finish_reason: &'static str, completion_tokens: usize },
    Rejected(ApiError),
}

/// A request in the engine: its replies and the text held back while it
/// could still be the start of a stop string.
struct Live {
    replies: mpsc::UnboundedSender<Reply>,
    stop: Vec<String>,
    text: String,
    sent: usize,
    stopped: bool,
    prompt_tokens: usize,
}

impl Live {
    /// Takes new text; sends what can no longer become part of a stop string.
    fn push(&mut self, text: &str) {
        if self.stopped {
            return;
        }
        self.text.push_str(text);
        // Text before `sent` held no stop string, nor the start of one.
        let unsent = &self.text[self.sent..];
        let end = match self.stop.iter().filter_map(|s| unsent.find(s.as_str())).min() {
            Some(at) => {
                self.stopped = true;
                self.sent + at
            }
            None => self.text.len() - self.held_back(),
        };
        if end > self.sent {
            let _ = self.replies.send(Reply::Text(self.text[self.sent..end].to_string()));
            self.sent = end;
        }
    }

    /// Length of the longest unsent tail of the text that begins some stop string.
    fn held_back(&self) -> usize {
        (self.sent..self.text.len())
            .filter(|&i| self.text.is_char_boundary(i))
            .find(|&i| self.stop.iter().any(|s| s.starts_with(&self.text[i..])))
            .map_or(0, |i| self.text.len() - i)
    }

    fn finish(mut self, finish_reason: &'static str, completion_tokens: usize) {
        if !self.stopped && self.sent < self.text.len() {
            let rest = self.text.split_off(self.sent);
            let _ = self.replies.send(Reply::Text(rest));
        }
        let _ = self.replies.send(Reply::Done { finish_reason, completion_tokens });
    }
}

/// llama.cpp's CPU matmuls round differently once a decode call has 8 rows
/// (measured: with 7, 16 greedy answers matched those served alone; with 8,
/// one or two changed). Decoding at most 4 requests per call keeps every
/// answer what it would be alone.
pub const BATCH_INVARIANT_ROWS: usize = 4;

/// Runs one short request before serving: proves that this model's graph shows
/// the guard its gate layer and every steered layer, or says why not.
pub fn warm_up<'m>(model: &'m Model, template: &Template, ctx: &mut Context<'m, SteerHook>) -> Result<()> {
    let tokens = prompt_tokens(model, template, &Input::Chat(vec![("user".into(), "Hello".into())]))?;
    let sampling = Sampling { max_tokens: 1, temperature: 0.0, ..Sampling::default() };
    Engine::new(model, ctx, 1).run(&[tokens], &sampling, |_| {}).context("the warm-up request failed, so the guard cannot be trusted on this model")?;
    Ok(())
}

/// Serves jobs until every sender is gone and the last request is done.
pub fn run_engine<'m>(model: &'m Model, template: &Template, ctx: &mut Context<'m, SteerHook>, parallel: usize, jobs: std_mpsc::Receiver<Job>) -> Result<()> {
    let mut engine = Engine::new(model, ctx, parallel);
    engine.limit_rows(BATCH_INVARIANT_ROWS);
    let mut live: HashMap<usize, Live> = HashMap::new();
    let mut next_id = 0;
    loop {
        while engine.has_free_slot() {
            let job = if engine.is_idle() {
                match jobs.recv() {
                    Ok(job) => job,
                    Err(_) => return Ok(()),
                }
            } else {
                match jobs.try_recv() {
                    Ok(job) => job,
                    Err(_) => break,
                }
            };
            if job.replies.is_closed() {
                continue;
            }
            let tokens = match prompt_tokens(model, template, &job.input) {
                Ok(tokens) => tokens,
                Err(e) => {
                    let _ = job.replies.send(Reply::Rejected(ApiError::bad_request(format!("{e:#}")).with_code("invalid_prompt")));
                    continue;
                }
            };
            if let Err(e) = engine.check_fits(tokens.len()) {
                let _ = job.replies.send(Reply::Rejected(ApiError::bad_request(format!("{e:#}")).with_code("context_length_exceeded")));
                continue;
            }
            let id = next_id;
            next_id += 1;
            live.insert(id, Live { replies: job.replies, stop: job.stop, text: String::new(), sent: 0, stopped: false, prompt_tokens: tokens.len() });
            if let Err(e) = engine.admit(id, &tokens, &job.sampling, &mut |event| on_event(&mut live, event)) {
                // A request the guard could not gate is answered with an error, never unguarded.
                engine.finish(id);
                if let Some(l) = live.remove(&id) {
                    let _ = l.replies.send(Reply::Rejected(ApiError::server(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e:#}")).with_code("guard_failed")));
                }
            }
        }
        if engine.is_idle() {
            continue;
        }
        engine.step(&mut |event| on_event(&mut live, event))?;
        // Requests that hit a stop string, or whose client went away, end now.
        let ended: Vec<usize> = live.iter().filter(|(_, l)| l.stopped || l.replies.is_closed()).map(|(&id, _)| id).collect();
        for id in ended {
            let generation = engine.finish(id);
            if let (Some(l), Some(g)) = (live.remove(&id), generation) {
                l.finish("stop", g.tokens.len());
            }
        }
    }
}

fn on_event(live: &mut HashMap<usize, Live>, event: Event) {
    match event {
        Event::Started { request, gate, steered } => {
            if let Some(l) = live.get(&request) {
                let _ = l.replies.send(Reply::Started { gate, steered, prompt_tokens: l.prompt_tokens });
            }
        }
        Event::Text { request, text } => {
            if let Some(l) = live.get_mut(&request) {
                l.push(text);
            }
        }
        Event::Done { request, generation } => {
            if let Some(l) = live.remove(&request) {
                l.finish(if generation.truncated { "length" } else { "stop" }, generation.tokens.len());
            }
        }
    }
}

fn prompt_tokens(model: &Model, template: &Template, input: &Input) -> Result<Vec<i32>> {
    match input {
        Input::Text(text) => tokenize(model, text),
        Input::Chat(messages) => {
            let turns: Vec<(&str, &str)> = messages.iter().map(|(r, c)| (r.as_str(), c.as_str())).collect();
            // The request's own system message replaces --system-prompt.
            let own_system = messages.iter().any(|(role, _)| role == "system");
            let text = if own_system {
                let mut without_default = template.clone();
                without_default.system_prompt = None;
                without_default.apply_chat(model, &turns)?
            } else {
                template.apply_chat(model, &turns)?
            };
            tokenize(model, &text)
        }
    }
}

/// An OpenAI-style error: status code and `{"error": {...}}` body.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    code: Option<&'static str>,
}

impl ApiError {
    /// The client's fault.
    fn invalid(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError { status, message: message.into(), kind: "invalid_request_error", code: None }
    }

    /// The server's fault.
    fn server(status: StatusCode, message: &str) -> ApiError {
        ApiError { status, message: message.into(), kind: "server_error", code: None }
    }

    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::invalid(StatusCode::BAD_REQUEST, message)
    }

    fn with_code(mut self, code: &'static str) -> ApiError {
        self.code = Some(code);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"message": self.message, "type": self.kind, "param": null, "code": self.code}});
        (self.status, Json(body)).into_response()
    }
}

/// Server settings the HTTP side needs.
pub struct ServeOptions {
    pub model_id: String,
    pub api_key: Option<String>,
    /// Mode name reported with each answer.
    pub mode: String,
}

#[derive(Clone)]
struct AppState {
    jobs: std_mpsc::SyncSender<Job>,
    model_id: String,
    mode: String,
    created: u64,
}

/// The HTTP routes, sending jobs to the engine through `jobs`.
pub fn router(jobs: std_mpsc::SyncSender<Job>, options: ServeOptions) -> Router {
    let state = AppState { jobs, model_id: options.model_id, mode: options.mode, created: unix_time() };
    let api = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/models", get(models))
        .route_layer(middleware::from_fn_with_state(options.api_key, check_api_key));
    api.route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .fallback(|| async { ApiError::invalid(StatusCode::NOT_FOUND, "no such endpoint") })
        .with_state(state)
}

async fn check_api_key(State(key): State<Option<String>>, request: Request, next: Next) -> Response {
    if let Some(key) = key {
        let given = request.headers().get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        // Constant time: how much of a guess matched must not show in the timing.
        let matches = given.is_some_and(|g| bool::from(subtle::ConstantTimeEq::ct_eq(g.as_bytes(), key.as_bytes())));
        if !matches {
            return ApiError::invalid(StatusCode::UNAUTHORIZED, "invalid or missing API key: send Authorization: Bearer <key>")
                .with_code("invalid_api_key")
                .into_response();
        }
    }
    next.run(request).await
}

async fn models(State(state): State<AppState>) -> Json<Value> {
    Json(json!({"object": "list", "data": [{"id": state.model_id, "object": "model", "created": state.created, "owned_by": "inferalign"}]}))
}

#[derive(Deserialize)]
struct ChatRequest {
    messages: Vec<Message>,
    #[serde(flatten)]
    options: Options,
}

#[derive(Deserialize)]
struct CompletionRequest {
    prompt: PromptField,
    #[serde(flatten)]
    options: Options,
}

#[derive(Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum PromptField {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum StopField {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct Options {
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i32>,
    seed: Option<i64>,
    stop: Option<StopField>,
    n: Option<u32>,
    // Accepted only to refuse them clearly: silently ignoring them would
    // answer something other than what the client asked for.
    tools: Option<Value>,
    tool_choice: Option<Value>,
    functions: Option<Value>,
    response_format: Option<Value>,
    logprobs: Option<Value>,
    top_logprobs: Option<Value>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

impl Options {
    /// An error for every request field this server does not implement.
    fn check_supported(&self) -> Result<(), ApiError> {
        let unsupported = |field: &str| Err(ApiError::bad_request(format!("{field} is not supported by this server")).with_code("unsupported_parameter"));
        if self.n.is_some_and(|n| n != 1) {
            return unsupported("n other than 1");
        }
        let set = |v: &Option<Value>| v.as_ref().is_some_and(|v| !v.is_null() && *v != json!(false));
        for (field, value) in [("tools", &self.tools), ("tool_choice", &self.tool_choice), ("functions", &self.functions), ("logprobs", &self.logprobs), ("top_logprobs", &self.top_logprobs)] {
            if set(value) {
                return unsupported(field);
            }
        }
        if self.response_format.as_ref().is_some_and(|f| f.get("type").and_then(Value::as_str).is_some_and(|t| t != "text")) {
            return unsupported("response_format other than text");
        }
        Ok(())
    }

    fn sampling(&self) -> Result<Sampling, ApiError> {
        self.check_supported()?;
        let temperature = self.temperature.unwrap_or(0.8);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::bad_request("temperature must be between 0 and 2").with_code("invalid_value"));
        }
        let top_p = self.top_p.unwrap_or(0.95);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::bad_request("top_p must be in (0, 1]").with_code("invalid_value"));
        }
        let max_tokens = self.max_completion_tokens.or(self.max_tokens).unwrap_or(u32::MAX);
        if max_tokens == 0 {
            return Err(ApiError::bad_request("max_tokens must be at least 1").with_code("invalid_value"));
        }
        Ok(Sampling {
            max_tokens: max_tokens as usize,
            temperature,
            top_k: self.top_k.unwrap_or(40),
            top_p,
            seed: self.seed.map_or_else(rand::random, |s| s as u32),
            ..Sampling::default()
        })
    }

    fn stop(&self) -> Vec<String> {
        let stop = match &self.stop {
            None => vec![],
            Some(StopField::One(s)) => vec![s.clone()],
            Some(StopField::Many(v)) => v.clone(),
        };
        stop.into_iter().filter(|s| !s.is_empty()).collect()
    }
}

fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        let what = if e.is_syntax() || e.is_eof() { "the body is not valid JSON" } else { "the request does not match the API" };
        ApiError::bad_request(format!("{what}: {e}"))
    })
}

/// Most messages in one chat request: templating cost grows with the square
/// of their number, and it runs on the engine thread every request waits for.
pub const MAX_MESSAGES: usize = 512;

fn chat_messages(messages: Vec<Message>) -> Result<Vec<(String, String)>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::bad_request("messages must not be empty").with_code("invalid_value"));
    }
    if messages.len() > MAX_MESSAGES {
        return Err(ApiError::bad_request(format!("{} messages is more than the {MAX_MESSAGES} this server takes", messages.len())).with_code("invalid_value"));
    }
    messages
        .into_iter()
        .map(|m| {
            if !matches!(m.role.as_str(), "system" | "developer" | "user" | "assistant") {
                return Err(ApiError::bad_request(format!("unsupported message role {:?}: use system, user or assistant", m.role)));
            }
            let text = match m.content {
                None => String::new(),
                Some(Content::Text(t)) => t,
                Some(Content::Parts(parts)) => {
                    if let Some(p) = parts.iter().find(|p| p.kind != "text") {
                        return Err(ApiError::bad_request(format!("unsupported content part type {:?}: only text", p.kind)));
                    }
                    parts.into_iter().filter_map(|p| p.text).collect::<Vec<_>>().join("")
                }
            };
            let role = if m.role == "developer" { "system".to_string() } else { m.role };
            Ok((role, text))
        })
        .collect()
}

/// The body, or axum's refusal of it (too large, unreadable) as an OpenAI-style error.
fn body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|e| ApiError::invalid(e.status(), e.body_text()))
}

async fn chat_completions(State(state): State<AppState>, raw: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let request: ChatRequest = parse(&body(raw)?)?;
    let input = Input::Chat(chat_messages(request.messages)?);
    respond(state, input, request.options, Kind::Chat).await
}

async fn completions(State(state): State<AppState>, raw: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let request: CompletionRequest = parse(&body(raw)?)?;
    let prompt = match request.prompt {
        PromptField::One(p) => p,
        PromptField::Many(mut v) if v.len() == 1 => v.remove(0),
        PromptField::Many(_) => return Err(ApiError::bad_request("prompt must be one string (batches of prompts are not supported)")),
    };
    if prompt.is_empty() {
        return Err(ApiError::bad_request("prompt must not be empty").with_code("invalid_value"));
    }
    respond(state, Input::Text(prompt), request.options, Kind::Completion).await
}

#[derive(Clone, Copy)]
enum Kind {
    Chat,
    Completion,
}

impl Kind {
    fn object(self, stream: bool) -> &'static str {
        match (self, stream) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Completion, _) => "text_completion",
        }
    }

    fn choice(self, text: &str, finish_reason: Option<&str>, stream: bool, first: bool) -> Value {
        match (self, stream) {
            (Kind::Chat, false) => json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}),
            (Kind::Chat, true) if first => json!({"index": 0, "delta": {"role": "assistant", "content": text}, "finish_reason": finish_reason}),
            (Kind::Chat, true) if finish_reason.is_some() => json!({"index": 0, "delta": {}, "finish_reason": finish_reason}),
            (Kind::Chat, true) => json!({"index": 0, "delta": {"content": text}, "finish_reason": finish_reason}),
            (Kind::Completion, _) => json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish_reason}),
        }
    }
}

async fn respond(state: AppState, input: Input, options: Options, kind: Kind) -> Result<Response, ApiError> {
    let sampling = options.sampling()?;
    let (replies, mut rx) = mpsc::unbounded_channel();
    let job = Job { input, sampling, stop: options.stop(), replies };
    state.jobs.try_send(job).map_err(|_| ApiError::server(StatusCode::SERVICE_UNAVAILABLE, "the server is busy or shutting down; retry later"))?;
    let engine_gone = || ApiError::server(StatusCode::INTERNAL_SERVER_ERROR, "the engine stopped");
    let (gate, steered, prompt_tokens) = match rx.recv().await.ok_or_else(engine_gone)? {
        Reply::Started { gate, steered, prompt_tokens } => (gate, steered, prompt_tokens),
        Reply::Rejected(e) => return Err(e),
        other => unreachable!("a request starts with Started or Rejected, not {other:?}"),
    };
    let id = format!("{}-{}", if matches!(kind, Kind::Chat) { "chatcmpl" } else { "cmpl" }, rand::random::<u64>());
    let info = json!({"gate": gate, "steered": steered, "mode": state.mode});
    let mut headers = HeaderMap::new();
    headers.insert("x-inferalign-steered", HeaderValue::from_static(if steered { "true" } else { "false" }));
    if let Some(gate) = gate {
        headers.insert("x-inferalign-gate-score", HeaderValue::from_str(&format!("{:.4}", gate.score)).expect("ascii"));
        headers.insert("x-inferalign-gate", HeaderValue::from_static(if gate.harmful { "fired" } else { "closed" }));
    }
    let envelope = move |object: &str, choice: Value| {
        json!({"id": id, "object": object, "created": unix_time(), "model": state.model_id, "choices": [choice], "inferalign": info})
    };
    let usage = move |completion_tokens: usize| {
        json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens})
    };

    if !options.stream {
        let mut text = String::new();
        while let Some(reply) = rx.recv().await {
            match reply {
                Reply::Text(t) => text.push_str(&t),
                Reply::Done { finish_reason, completion_tokens } => {
                    let mut body = envelope(kind.object(false), kind.choice(&text, Some(finish_reason), false, true));
                    body["usage"] = usage(completion_tokens);
                    return Ok((headers, Json(body)).into_response());
                }
                other => unreachable!("unexpected {other:?} after Started"),
            }
        }
        return Err(engine_gone());
    }

    let include_usage = options.stream_options.is_some_and(|o| o.include_usage);
    let (events, stream) = mpsc::unbounded_channel::<Value>();
    tokio::spawn(async move {
        // A failed send means the client is gone: returning drops `rx`, which frees its slot.
        if events.send(envelope(kind.object(true), kind.choice("", None, true, true))).is_err() {
            return;
        }
        while let Some(reply) = rx.recv().await {
            let chunk = match reply {
                Reply::Text(t) => {
                    // The gate's verdict rides on the first and the last chunk only.
                    let mut chunk = envelope(kind.object(true), kind.choice(&t, None, true, false));
                    chunk.as_object_mut().expect("object").remove("inferalign");
                    chunk
                }
                Reply::Done { finish_reason, completion_tokens } => {
                    let _ = events.send(envelope(kind.object(true), kind.choice("", Some(finish_reason), true, false)));
                    if include_usage {
                        let mut last = envelope(kind.object(true), Value::Null);
                        last["choices"] = json!([]);
                        last["usage"] = usage(completion_tokens);
                        let _ = events.send(last);
                    }
                    let _ = events.send(Value::String("[DONE]".into()));
                    return;
                }
                other => unreachable!("unexpected {other:?} after Started"),
            };
            if events.send(chunk).is_err() {
                return;
            }
        }
    });
    let stream = UnboundedReceiverStream::new(stream).map(|v| {
        let data = match v {
            Value::String(done) => done,
            chunk => chunk.to_string(),
        };
        Ok::<_, Infallible>(SseEvent::default().data(data))
    });
    Ok((headers, Sse::new(stream).keep_alive(KeepAlive::default())).into_response())
}

fn unix_time() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Resolves on SIGINT or SIGTERM.
/// What one client can hold of the server.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Open connections at once; beyond it a new one is closed at once.
    pub max_connections: usize,
    /// Time a connection has to send a request's headers, also when it sits
    /// idle between requests; then it is closed.
    pub header_timeout: Duration,
}

/// Serves `app` on `listener` until `stop`, within `limits`, then lets
/// requests in flight finish. axum's own `serve` has neither bound.
pub async fn serve_http(listener: tokio::net::TcpListener, app: Router, limits: Limits, stop: impl std::future::Future<Output = ()>) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(stop);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut stop => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(_) => {
                // Out of file descriptors, say: wait for some to close.
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else { continue };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            let _slot = slot;
            let _ = conn.await;
        });
    }
    graceful.shutdown().await;
}

pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// An `inferalign serve` process on a free loopback port, killed when
/// dropped: what load tests and integration tests talk to.
pub struct ServerProcess {
    pub child: Child,
    pub url: String,
}

impl ServerProcess {
    /// Runs `exe serve --port 0 ARGS` and waits for its "serving ... on http://ADDR" line.
    pub fn start<S: AsRef<OsStr>>(exe: &Path, args: impl IntoIterator<Item = S>) -> Result<ServerProcess> {
        let mut child = Command::new(exe)
            .args(["serve", "--port", "0"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {} serve", exe.display()))?;
        let mut lines = BufReader::new(child.stderr.take().expect("piped")).lines();
        let mut log = Vec::new();
        for line in lines.by_ref() {
            let line = line?;
            if let Some((_, rest)) = line.split_once(" on http://") {
                let url = format!("http://{}", rest.split_whitespace().next().unwrap_or_default());
                // Keep draining stderr so the server never blocks on a full pipe.
                std::thread::spawn(move || lines.for_each(drop));
                return Ok(ServerProcess { child, url });
            }
            log.push(line);
        }
        let _ = child.wait();
        bail!("inferalign serve did not start:\n{}", log.join("\n"))
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(stop: &[&str]) -> (Live, mpsc::UnboundedReceiver<Reply>) {
        let (replies, rx) = mpsc::unbounded_channel();
        let stop = stop.iter().map(|s| s.to_string()).collect();
        (Live { replies, stop, text: String::new(), sent: 0, stopped: false, prompt_tokens: 0 }, rx)
    }

    fn sent(rx: &mut mpsc::UnboundedReceiver<Reply>) -> String {
        let mut text = String::new();
        while let Ok(reply) = rx.try_recv() {
            if let Reply::Text(t) = reply {
                text.push_str(&t);
            }
        }
        text
    }

    #[test]
    fn stop_strings_split_across_tokens_are_held_back_and_cut() {
        let (mut l, mut rx) = live(&["END", "\n\n"]);
        l.push("Hello E");
        assert_eq!(sent(&mut rx), "Hello ", "a possible stop start is held back");
        l.push("N");
        assert_eq!(sent(&mut rx), "");
        l.push("Dless");
        assert_eq!(sent(&mut rx), "");
        assert!(l.stopped, "the stop string ends the answer and is not sent");
        let (mut l, mut rx) = live(&["END"]);
        l.push("Ein");
        l.push("stein é");
        l.finish("length", 3);
        assert_eq!(sent(&mut rx), "Einstein é", "held-back text that was no stop string is sent at the end");
    }
}
