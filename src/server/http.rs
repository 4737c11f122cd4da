//! The HTTP side: OpenAI-style routes that parse, queue and stream, and the
//! connection loop with its abuse bounds.

use std::convert::Infallible;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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

use super::{Input, Job, Metrics, Reply, Task};
use crate::generate::Sampling;
use crate::steer::GateDecision;

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
    pub(super) fn server(status: StatusCode, message: &str) -> ApiError {
        ApiError { status, message: message.into(), kind: "server_error", code: None }
    }

    /// The engine thread ended before answering.
    fn engine_gone() -> ApiError {
        ApiError::server(StatusCode::INTERNAL_SERVER_ERROR, "the engine stopped")
    }

    pub(super) fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::invalid(StatusCode::BAD_REQUEST, message)
    }

    pub(super) fn with_code(mut self, code: &'static str) -> ApiError {
        self.code = Some(code);
        self
    }

    /// The `{"error": {...}}` object, also sent as the last event of a stream that fails.
    fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": null, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = self.body();
        (self.status, Json(body)).into_response()
    }
}

/// Server settings the HTTP side needs.
pub struct ServeOptions {
    pub model_id: String,
    pub api_key: Option<String>,
    /// Mode name reported with each answer.
    pub mode: String,
    /// Shared with the engine; served at `/metrics` when `expose_metrics`.
    pub metrics: Metrics,
    pub expose_metrics: bool,
    /// What `/props` reports: the server's settings and the guard's.
    pub props: Value,
}

#[derive(Clone)]
struct AppState {
    jobs: std_mpsc::SyncSender<Job>,
    model_id: String,
    mode: String,
    created: u64,
    metrics: Metrics,
    props: Arc<Value>,
}

impl AppState {
    /// Queues `job` for the engine, or says the server is full.
    fn submit(&self, job: Job) -> Result<(), ApiError> {
        self.jobs.try_send(job).map_err(|_| ApiError::server(StatusCode::SERVICE_UNAVAILABLE, "the server is busy or shutting down; retry later"))?;
        self.metrics.queue_depth.inc();
        Ok(())
    }
}

/// The HTTP routes, sending jobs to the engine through `jobs`.
pub fn router(jobs: std_mpsc::SyncSender<Job>, options: ServeOptions) -> Router {
    let state = AppState {
        jobs,
        model_id: options.model_id,
        mode: options.mode,
        created: unix_time(),
        metrics: options.metrics,
        props: Arc::new(options.props),
    };
    let mut api = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/completions", post(completions))
        .route("/v1/moderations", post(moderations))
        .route("/moderations", post(moderations))
        .route("/v1/models", get(models))
        .route("/models", get(models))
        .route("/tokenize", post(tokenize))
        .route("/apply-template", post(apply_template))
        .route("/props", get(|State(state): State<AppState>| async move { Json((*state.props).clone()) }));
    if options.expose_metrics {
        api = api.route("/metrics", get(metrics));
    }
    let api = api.route_layer(middleware::from_fn_with_state(options.api_key, check_api_key));
    api.route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .fallback(|| async { ApiError::invalid(StatusCode::NOT_FOUND, "no such endpoint") })
        .layer(middleware::from_fn(read_body))
        .with_state(state)
}

/// Request bodies above this get a 413 (axum's own default limit).
const BODY_LIMIT: usize = 2 << 20;
/// How much of a too-large body is read and dropped before the 413: a client
/// still sending when the server closes gets a reset, not the error.
const DRAIN_LIMIT: usize = 64 << 20;
/// Time a client has to send its body.
const BODY_TIMEOUT: Duration = Duration::from_secs(60);

/// Buffers the body within `BODY_LIMIT` before anything else answers, so
/// every early answer (401, 413) reaches a client that is still sending.
async fn read_body(request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    let declared = parts.headers.get("content-length").and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    if declared.is_some_and(|n| n > DRAIN_LIMIT) {
        return too_large().into_response();
    }
    match tokio::time::timeout(BODY_TIMEOUT, collect_within(body, BODY_LIMIT, DRAIN_LIMIT)).await {
        Err(_) => ApiError::invalid(StatusCode::REQUEST_TIMEOUT, format!("the request body took longer than {}s to arrive", BODY_TIMEOUT.as_secs())).into_response(),
        Ok(Err(e)) => e.into_response(),
        Ok(Ok(bytes)) => next.run(Request::from_parts(parts, axum::body::Body::from(bytes))).await,
    }
}

/// The body if it fits in `limit`; past that it is read and dropped up to `drain`.
async fn collect_within(body: axum::body::Body, limit: usize, drain: usize) -> Result<Vec<u8>, ApiError> {
    let mut stream = body.into_data_stream();
    let (mut kept, mut seen) = (Vec::new(), 0usize);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::invalid(StatusCode::BAD_REQUEST, format!("could not read the request body: {e}")))?;
        seen += chunk.len();
        if seen <= limit {
            kept.extend_from_slice(&chunk);
        } else if seen > drain {
            break;
        }
    }
    if seen > limit {
        return Err(too_large());
    }
    Ok(kept)
}

fn too_large() -> ApiError {
    ApiError::invalid(StatusCode::PAYLOAD_TOO_LARGE, format!("the request body is over the length limit of {} MiB: send a shorter one", BODY_LIMIT >> 20))
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

async fn metrics(State(state): State<AppState>) -> Response {
    ([("content-type", "text/plain; version=0.0.4")], state.metrics.render()).into_response()
}

/// The templated text and tokens of `input`, from the engine thread, which owns the model.
async fn rendered(state: &AppState, input: Input) -> Result<(String, Vec<i32>), ApiError> {
    let (replies, mut rx) = mpsc::unbounded_channel();
    state.submit(Job { input, task: Task::Render, replies })?;
    match rx.recv().await {
        Some(Reply::Rendered { text, tokens }) => Ok((text, tokens)),
        Some(Reply::Rejected(e)) => Err(e),
        _ => Err(ApiError::engine_gone()),
    }
}

#[derive(Deserialize)]
struct TokenizeRequest {
    content: String,
}

/// `POST /tokenize`, as llama-server has it: the tokens of raw text.
async fn tokenize(State(state): State<AppState>, raw: Result<Bytes, BytesRejection>) -> Result<Json<Value>, ApiError> {
    let request: TokenizeRequest = parse(&body(raw)?)?;
    let (_, tokens) = rendered(&state, Input::Text(request.content)).await?;
    Ok(Json(json!({"tokens": tokens})))
}

/// `POST /apply-template`, as llama-server has it: the chat-templated prompt,
/// exactly the text the gate reads, and its tokens.
async fn apply_template(State(state): State<AppState>, raw: Result<Bytes, BytesRejection>) -> Result<Json<Value>, ApiError> {
    let request: ChatRequest = parse(&body(raw)?)?;
    let (prompt, tokens) = rendered(&state, Input::Chat(chat_messages(request.messages)?)).await?;
    Ok(Json(json!({"prompt": prompt, "tokens": tokens})))
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
    /// llama-server's extension: answer exactly max_tokens tokens.
    #[serde(default)]
    ignore_eos: bool,
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
            ignore_eos: self.ignore_eos,
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
            if !matches!(m.role.as_str(), "system" | "developer" | "user" | "assistant" | "tool") {
                return Err(ApiError::bad_request(format!("unsupported message role {:?}: use system, user, assistant or tool", m.role)));
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

#[derive(Deserialize)]
struct ModerationRequest {
    input: PromptField,
}

/// OpenAI's moderation categories. The gate tells harmful from harmless, not
/// one category from another: these stay false, and `flagged` and
/// `categories.harmful` carry the verdict.
const OPENAI_CATEGORIES: [&str; 13] = [
    "harassment", "harassment/threatening", "hate", "hate/threatening", "illicit", "illicit/violent", "self-harm",
    "self-harm/instructions", "self-harm/intent", "sexual", "sexual/minors", "violence", "violence/graphic",
];

fn moderation_result(d: GateDecision) -> Value {
    let mut categories: serde_json::Map<String, Value> = OPENAI_CATEGORIES.iter().map(|c| (c.to_string(), json!(false))).collect();
    let mut scores: serde_json::Map<String, Value> = OPENAI_CATEGORIES.iter().map(|c| (c.to_string(), json!(0.0))).collect();
    categories.insert("harmful".into(), json!(d.harmful));
    // The gate's margin squashed to (0, 1); 0.5 is its boundary.
    scores.insert("harmful".into(), json!(1.0 / (1.0 + (-d.score).exp())));
    json!({"flagged": d.harmful, "categories": categories, "category_scores": scores, "inferalign": {"score": d.score, "layer": d.layer, "harmful": d.harmful}})
}

/// `POST /v1/moderations`: the gate alone, on each input as a user message.
async fn moderations(State(state): State<AppState>, raw: Result<Bytes, BytesRejection>) -> Result<Json<Value>, ApiError> {
    let request: ModerationRequest = parse(&body(raw)?)?;
    let inputs = match request.input {
        PromptField::One(s) => vec![s],
        PromptField::Many(v) => v,
    };
    if inputs.is_empty() || inputs.len() > MAX_MESSAGES {
        return Err(ApiError::bad_request(format!("input must hold 1 to {MAX_MESSAGES} strings")).with_code("invalid_value"));
    }
    // Queue every input first, so the engine runs them back to back.
    let mut pending = Vec::new();
    for text in inputs {
        let (replies, rx) = mpsc::unbounded_channel();
        let job = Job { input: Input::Chat(vec![("user".into(), text)]), task: Task::Moderate, replies };
        state.submit(job)?;
        pending.push(rx);
    }
    let mut results = Vec::new();
    for mut rx in pending {
        match rx.recv().await {
            Some(Reply::Moderated(d)) => results.push(moderation_result(d)),
            Some(Reply::Rejected(e)) => return Err(e),
            _ => return Err(ApiError::engine_gone()),
        }
    }
    Ok(Json(json!({"id": format!("modr-{}", rand::random::<u64>()), "model": state.model_id, "results": results})))
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
    let job = Job { input, task: Task::Generate { sampling, stop: options.stop() }, replies };
    state.submit(job)?;
    let (gate, steered, prompt_tokens) = match rx.recv().await.ok_or_else(ApiError::engine_gone)? {
        Reply::Started { gate, steered, prompt_tokens } => (gate, steered, prompt_tokens),
        Reply::Rejected(e) => return Err(e),
        other => unreachable!("a request starts with Started or Rejected, not {other:?}"),
    };
    let envelope = Envelope {
        kind,
        id: format!("{}-{}", if matches!(kind, Kind::Chat) { "chatcmpl" } else { "cmpl" }, rand::random::<u64>()),
        model: state.model_id.clone(),
        info: json!({"gate": gate, "steered": steered, "mode": state.mode}),
        prompt_tokens,
    };
    let headers = gate_headers(gate, steered);
    if !options.stream {
        return Ok((headers, Json(whole_answer(rx, &envelope).await?)).into_response());
    }
    let include_usage = options.stream_options.is_some_and(|o| o.include_usage);
    let (events, stream) = mpsc::unbounded_channel::<Value>();
    tokio::spawn(stream_answer(rx, envelope, include_usage, events));
    let stream = UnboundedReceiverStream::new(stream).map(|v| {
        let data = match v {
            Value::String(done) => done,
            chunk => chunk.to_string(),
        };
        Ok::<_, Infallible>(SseEvent::default().data(data))
    });
    Ok((headers, Sse::new(stream).keep_alive(KeepAlive::default())).into_response())
}

/// What every object of one answer carries.
struct Envelope {
    kind: Kind,
    id: String,
    model: String,
    /// The gate's verdict.
    info: Value,
    prompt_tokens: usize,
}

impl Envelope {
    fn wrap(&self, stream: bool, choice: Value) -> Value {
        json!({"id": self.id, "object": self.kind.object(stream), "created": unix_time(), "model": self.model, "choices": [choice], "inferalign": self.info})
    }

    fn usage(&self, completion_tokens: usize) -> Value {
        json!({"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": self.prompt_tokens + completion_tokens})
    }
}

/// `x-inferalign-*` headers: whether the answer is steered, and the gate's verdict and score.
fn gate_headers(gate: Option<GateDecision>, steered: bool) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert("x-inferalign-steered", HeaderValue::from_static(if steered { "true" } else { "false" }));
    if let Some(gate) = gate {
        headers.insert("x-inferalign-gate-score", HeaderValue::from_str(&format!("{:.4}", gate.score)).expect("ascii"));
        headers.insert("x-inferalign-gate", HeaderValue::from_static(if gate.harmful { "fired" } else { "closed" }));
    }
    headers
}

/// The whole answer as one object, once the engine is done with it.
async fn whole_answer(mut rx: mpsc::UnboundedReceiver<Reply>, envelope: &Envelope) -> Result<Value, ApiError> {
    let mut text = String::new();
    while let Some(reply) = rx.recv().await {
        match reply {
            Reply::Text(t) => text.push_str(&t),
            Reply::Done { finish_reason, completion_tokens } => {
                let mut body = envelope.wrap(false, envelope.kind.choice(&text, Some(finish_reason), false, true));
                body["usage"] = envelope.usage(completion_tokens);
                return Ok(body);
            }
            Reply::Rejected(e) => return Err(e),
            other => unreachable!("unexpected {other:?} after Started"),
        }
    }
    Err(ApiError::engine_gone())
}

/// Sends the answer to `events` chunk by chunk as the engine makes it, then
/// `[DONE]` (or the error that ended it).
async fn stream_answer(mut rx: mpsc::UnboundedReceiver<Reply>, envelope: Envelope, include_usage: bool, events: mpsc::UnboundedSender<Value>) {
    let kind = envelope.kind;
    // A failed send means the client is gone: returning drops `rx`, which frees its slot.
    if events.send(envelope.wrap(true, kind.choice("", None, true, true))).is_err() {
        return;
    }
    while let Some(reply) = rx.recv().await {
        let chunk = match reply {
            Reply::Text(t) => {
                // The gate's verdict rides on the first and the last chunk only.
                let mut chunk = envelope.wrap(true, kind.choice(&t, None, true, false));
                chunk.as_object_mut().expect("object").remove("inferalign");
                chunk
            }
            Reply::Done { finish_reason, completion_tokens } => {
                let _ = events.send(envelope.wrap(true, kind.choice("", Some(finish_reason), true, false)));
                if include_usage {
                    let mut last = envelope.wrap(true, Value::Null);
                    last["choices"] = json!([]);
                    last["usage"] = envelope.usage(completion_tokens);
                    let _ = events.send(last);
                }
                let _ = events.send(Value::String("[DONE]".into()));
                return;
            }
            Reply::Rejected(e) => {
                let _ = events.send(e.body());
                return;
            }
            other => unreachable!("unexpected {other:?} after Started"),
        };
        if events.send(chunk).is_err() {
            return;
        }
    }
}

fn unix_time() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

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

/// Resolves on SIGINT or SIGTERM.
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
