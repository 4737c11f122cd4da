//! inferalign: inference-time alignment (InferAligner) for GGUF models,
//! inside llama.cpp's graph.
//!
//! extract → vector file → gate (and, later, steer):
//! - [`capture`] reads last-token activations through the eval callback,
//! - [`extract`] turns them into safety-related vectors, fitting the gate on
//!   [`trainset`] (plain, [`wrappers`]-dressed and multi-turn prompts) and
//!   choosing it by [`crossval`] over held-out families,
//! - [`openers`] give the refusal-against-compliance contrast the steering direction is fitted on,
//! - [`gate`] decides from one layer whether a request is harmful,
//! - [`steer`] is the hook where the gate decides and the shift happens,
//! - [`markers`] keeps turn-marker text inside a message from opening turns,
//! - [`generate`] batches requests (continuous batching), [`server`] serves them over HTTP,
//! - [`drift`] measures how far a fine-tune moved from its aligned parent,
//! - [`finetune`] trains LoRA adapters (plain or Vaccine) for the fine-tuning lab,
//! - [`vectors`] reads and writes llama.cpp control-vector GGUF files,
//! - [`llama`] is the only place that calls llama.cpp unsafely.

pub mod cache;
pub mod capi;
pub mod capture;
pub mod crossval;
pub mod drift;
pub mod embedded;
pub mod eval;
pub mod extract;
pub mod finetune;
pub mod gate;
pub mod generate;
pub mod guard;
pub mod judge;
pub mod llama;
pub mod markers;
pub mod openers;
pub mod output;
pub mod plot;
pub mod probe;
pub mod prompts;
pub mod server;
pub mod shipped;
pub mod steer;
pub mod strength;
pub mod trainset;
pub mod vectors;
pub mod wrappers;
