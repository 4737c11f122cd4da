//! An OpenAI-compatible HTTP server. One engine thread owns the llama.cpp
//! context and decodes every live request together (continuous batching); the
//! steering hook gates each request on its own. The HTTP side (axum on tokio)
//! only parses, queues and streams.
//!
//! `engine` owns the context and the request loop, `http` the routes and the
//! connections, `process` a server child process for tests and benchmarks.

mod engine;
mod http;
mod metrics;
mod process;

use tokio::sync::mpsc;

use crate::generate::Sampling;
use crate::steer::GateDecision;

pub use engine::{caches_prefix, run_engine, warm_up, BATCH_INVARIANT_ROWS};
pub use http::{router, serve_http, shutdown_signal, ApiError, Limits, ServeOptions, MAX_MESSAGES};
pub use metrics::Metrics;
pub use process::ServerProcess;

/// What a request asks the engine to do.
pub struct Job {
    input: Input,
    task: Task,
    replies: mpsc::UnboundedSender<Reply>,
}

impl Task {
    fn kind(&self) -> &'static str {
        match self {
            Task::Generate { .. } => "generate",
            Task::Moderate => "moderation",
            Task::Render => "template",
        }
    }
}

enum Task {
    /// Gate, steer if flagged, and answer.
    Generate { sampling: Sampling, stop: Vec<String> },
    /// Run the gate alone (`/v1/moderations`): no shift, no answer.
    Moderate,
    /// The templated text and its tokens: what the gate would read.
    Render,
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
    /// The only reply to a moderation.
    Moderated(GateDecision),
    /// The only reply to `Render`.
    Rendered { text: String, tokens: Vec<i32> },
    Rejected(ApiError),
}
