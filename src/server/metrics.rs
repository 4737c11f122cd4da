//! Prometheus metrics for operators: requests, tokens, what the gate did, and
//! how many requests wait for the engine.

use anyhow::Result;
use prometheus::{Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

use crate::steer::GateDecision;

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    prompt_tokens: IntCounter,
    generated_tokens: IntCounter,
    gate: IntCounterVec,
    gate_scores: Histogram,
    pub queue_depth: IntGauge,
}

impl Metrics {
    pub fn new() -> Result<Metrics> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(Opts::new("inferalign_requests_total", "Requests the engine took, by kind"), &["kind"])?;
        let prompt_tokens = IntCounter::new("inferalign_prompt_tokens_total", "Prompt tokens decoded")?;
        let generated_tokens = IntCounter::new("inferalign_generated_tokens_total", "Answer tokens generated")?;
        let gate = IntCounterVec::new(Opts::new("inferalign_gate_decisions_total", "Gate decisions: fired (harmful) or closed"), &["decision"])?;
        // Scores are margins around 0, the boundary.
        let buckets = vec![-20.0, -10.0, -5.0, -2.0, -1.0, 0.0, 1.0, 2.0, 5.0, 10.0, 20.0];
        let gate_scores = Histogram::with_opts(HistogramOpts::new("inferalign_gate_score", "Gate scores (> 0 fires)").buckets(buckets))?;
        let queue_depth = IntGauge::new("inferalign_queue_depth", "Requests waiting for the engine")?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(prompt_tokens.clone()))?;
        registry.register(Box::new(generated_tokens.clone()))?;
        registry.register(Box::new(gate.clone()))?;
        registry.register(Box::new(gate_scores.clone()))?;
        registry.register(Box::new(queue_depth.clone()))?;
        Ok(Metrics { registry, requests, prompt_tokens, generated_tokens, gate, gate_scores, queue_depth })
    }

    /// A request of `kind` (chat, completion, moderation) taken by the engine.
    pub fn request(&self, kind: &str, prompt_tokens: usize) {
        self.requests.with_label_values(&[kind]).inc();
        self.prompt_tokens.inc_by(prompt_tokens as u64);
    }

    pub fn gated(&self, decision: Option<GateDecision>) {
        if let Some(d) = decision {
            self.gate.with_label_values(&[if d.harmful { "fired" } else { "closed" }]).inc();
            self.gate_scores.observe(d.score as f64);
        }
    }

    pub fn generated(&self, tokens: usize) {
        self.generated_tokens.inc_by(tokens as u64);
    }

    /// The Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding our own registry into memory cannot fail.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }
}
