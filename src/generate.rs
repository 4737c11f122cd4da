//! Text generation with the steering hook in the graph: prefill (gate and,
//! if it fires, shift), then sample token by token.

use anyhow::{bail, Context as _, Result};
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::data::LlamaTokenData;
use llama_cpp_2::token::data_array::LlamaTokenDataArray;
use llama_cpp_2::token::LlamaToken;
use serde::Serialize;

use crate::capture::BatchAware;
use crate::llama::{Batch, Context, Model};
use crate::steer::{GateDecision, SteerHook};

#[derive(Clone, Debug)]
pub struct Sampling {
    pub max_tokens: usize,
    /// 0 = greedy.
    pub temperature: f32,
    pub top_k: i32,
    pub top_p: f32,
    pub seed: u32,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling { max_tokens: 128, temperature: 0.0, top_k: 40, top_p: 0.95, seed: 42 }
    }
}

impl Sampling {
    fn sampler(&self) -> LlamaSampler {
        if self.temperature <= 0.0 {
            return LlamaSampler::greedy();
        }
        LlamaSampler::chain_simple([
            LlamaSampler::top_k(self.top_k),
            LlamaSampler::top_p(self.top_p, 1),
            LlamaSampler::temp(self.temperature),
            LlamaSampler::dist(self.seed),
        ])
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Generation {
    pub gate: Option<GateDecision>,
    pub steered: bool,
    pub output: String,
    pub tokens: Vec<i32>,
    pub prompt_tokens: usize,
    /// Prompt decodes (2 when the gate fired after a steered layer).
    pub prefill_passes: usize,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
}

/// Decodes `tokens` of sequence `seq` from position `start`, in batches of
/// `n_batch`, requesting output only for the last token.
pub fn prefill<H: BatchAware>(ctx: &mut Context<'_, H>, batch: &mut Batch, tokens: &[i32], start: usize, seq: i32) -> Result<()> {
    for (chunk_index, chunk) in tokens.chunks(batch.capacity()).enumerate() {
        batch.clear();
        let offset = start + chunk_index * batch.capacity();
        for (i, &token) in chunk.iter().enumerate() {
            let last = offset + i + 1 == start + tokens.len();
            batch.add(token, (offset + i) as i32, seq, last);
        }
        ctx.hook_mut().plan(batch, &[]);
        ctx.decode(batch).context("prompt decode failed")?;
    }
    Ok(())
}

/// Generates for one prompt on sequence 0 of a fresh cache.
pub fn generate(
    model: &Model,
    ctx: &mut Context<'_, SteerHook>,
    prompt: &[i32],
    sampling: &Sampling,
    mut on_text: impl FnMut(&str),
) -> Result<Generation> {
    if prompt.len() + 1 > ctx.n_ctx() {
        bail!("the prompt is {} tokens long and leaves no room in the context ({})", prompt.len(), ctx.n_ctx());
    }
    let mut batch = Batch::new(ctx.n_batch());
    let started = std::time::Instant::now();
    ctx.clear_memory();
    ctx.hook_mut().begin_request(0);
    let single_pass = ctx.hook().single_pass(prompt.len(), ctx.n_batch());
    ctx.hook_mut().set_shift_enabled(single_pass);
    prefill(ctx, &mut batch, prompt, 0, 0)?;
    let mut prefill_passes = 1;
    if !single_pass {
        ctx.hook_mut().set_shift_enabled(true);
        if ctx.hook().is_steered(0) {
            // The gate fired after some steered layers had run: decode again, shifted throughout.
            ctx.seq_rm(0, -1, -1);
            prefill(ctx, &mut batch, prompt, 0, 0)?;
            prefill_passes = 2;
        }
    }
    let prefill_seconds = started.elapsed().as_secs_f64();
    let decode_started = std::time::Instant::now();

    let vocab = model.llama().vocab();
    let mut sampler = sampling.sampler();
    let mut tokens = Vec::new();
    let mut bytes = Vec::new();
    let mut emitted = 0;
    let mut logits_row = (batch.len() - 1) as i32;
    let budget = sampling.max_tokens.min(ctx.n_ctx() - prompt.len());
    while tokens.len() < budget {
        let logits = ctx.logits(logits_row);
        let mut candidates = LlamaTokenDataArray::from_iter(
            logits.iter().enumerate().map(|(id, &logit)| LlamaTokenData::new(LlamaToken(id as i32), logit, 0.0)),
            false,
        );
        candidates.apply_sampler(&mut sampler);
        let token = candidates.selected_token().context("the sampler selected no token")?;
        sampler.accept(token);
        if vocab.is_eog(token) {
            break;
        }
        tokens.push(token.0);
        bytes.extend(vocab.token_to_piece(token, false, None));
        // Stream only whole UTF-8 characters.
        let valid = match std::str::from_utf8(&bytes[emitted..]) {
            Ok(s) => s.len(),
            Err(e) => e.valid_up_to(),
        };
        if valid > 0 {
            on_text(std::str::from_utf8(&bytes[emitted..emitted + valid]).expect("checked"));
            emitted += valid;
        }
        if tokens.len() == budget {
            break;
        }
        batch.clear();
        batch.add(token.0, (prompt.len() + tokens.len() - 1) as i32, 0, true);
        ctx.hook_mut().plan(&batch, &[]);
        ctx.decode(&mut batch).context("decode failed")?;
        logits_row = 0;
    }
    let hook = ctx.hook();
    Ok(Generation {
        gate: hook.decision(0),
        steered: hook.is_steered(0),
        output: String::from_utf8_lossy(&bytes).into_owned(),
        tokens,
        prompt_tokens: prompt.len(),
        prefill_passes,
        prefill_seconds,
        decode_seconds: decode_started.elapsed().as_secs_f64(),
    })
}
