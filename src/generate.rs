//! Text generation with the steering hook in the graph. Many requests decode
//! together, one sequence each; the hook gates each on its own last prompt
//! token and shifts only the rows of the requests it flags.

use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::data::LlamaTokenData;
use llama_cpp_2::token::data_array::LlamaTokenDataArray;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::vocab::LlamaVocab;
use serde::Serialize;

use crate::capture::BatchAware;
use crate::llama::{Batch, BatchLayout, Context, Model};
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
    /// None for greedy decoding, which is a plain argmax over the logits.
    fn sampler(&self) -> Option<LlamaSampler> {
        if self.temperature <= 0.0 {
            return None;
        }
        Some(LlamaSampler::chain_simple([
            LlamaSampler::top_k(self.top_k),
            LlamaSampler::top_p(self.top_p, 1),
            LlamaSampler::temp(self.temperature),
            LlamaSampler::dist(self.seed),
        ]))
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Generation {
    pub gate: Option<GateDecision>,
    pub steered: bool,
    pub output: String,
    pub tokens: Vec<i32>,
    pub prompt_tokens: usize,
    /// Prompt decodes (2 when the gate fired after a steered layer had run).
    pub prefill_passes: usize,
}

/// What the engine reports while it works.
pub enum Event<'a> {
    /// New text of a request (whole UTF-8 characters).
    Text { request: usize, text: &'a str },
    Done { request: usize, generation: Generation },
}

struct Slot {
    request: usize,
    prompt_len: usize,
    prefill_passes: usize,
    tokens: Vec<i32>,
    bytes: Vec<u8>,
    emitted: usize,
    sampler: Option<LlamaSampler>,
    /// Row of this sequence's logits in the last batch.
    logits_row: i32,
    budget: usize,
}

/// Throughput of one `run`.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct RunStats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
}

/// Decodes the prompt `tokens` of sequence `seq` from position 0, in batches of
/// the batch's capacity, requesting output only for the last token.
fn prefill<H: BatchAware>(ctx: &mut Context<'_, H>, batch: &mut Batch, tokens: &[i32], seq: i32) -> Result<()> {
    for (chunk_index, chunk) in tokens.chunks(batch.capacity()).enumerate() {
        batch.clear();
        let offset = chunk_index * batch.capacity();
        for (i, &token) in chunk.iter().enumerate() {
            let last = offset + i + 1 == tokens.len();
            batch.add(token, (offset + i) as i32, seq, last);
        }
        ctx.hook_mut().plan(&*batch, &[]);
        ctx.decode(batch).context("prompt decode failed")?;
    }
    Ok(())
}

/// Runs every prompt to completion, up to `parallel` at a time, reporting
/// through `on_event`. Requests are numbered by their index in `prompts`.
pub fn run(
    model: &Model,
    ctx: &mut Context<'_, SteerHook>,
    prompts: &[Vec<i32>],
    sampling: &Sampling,
    parallel: usize,
    mut on_event: impl FnMut(Event),
) -> Result<RunStats> {
    let parallel = parallel.clamp(1, ctx.n_seq_max());
    let room = ctx.n_ctx() / parallel;
    if let Some((i, p)) = prompts.iter().enumerate().find(|(_, p)| p.len() + 1 > room) {
        bail!(
            "prompt {} is {} tokens long and leaves no room to answer in its share of the context ({room} of {} tokens for {parallel} parallel requests)",
            i + 1,
            p.len(),
            ctx.n_ctx()
        );
    }
    let mut stats = RunStats::default();
    let mut batch = Batch::new(ctx.n_batch().max(parallel));
    let mut slots: Vec<Option<Slot>> = (0..parallel).map(|_| None).collect();
    let mut next = 0;
    ctx.clear_memory();
    let vocab = model.llama().vocab();

    loop {
        // Admit new requests into free slots, one prompt decode each.
        let started = Instant::now();
        for seq in 0..parallel {
            if slots[seq].is_some() || next == prompts.len() {
                continue;
            }
            let prompt = &prompts[next];
            ctx.seq_rm(seq as i32, -1, -1);
            ctx.hook_mut().begin_request(seq);
            let single_pass = ctx.hook().single_pass(prompt.len(), batch.capacity());
            ctx.hook_mut().set_shift_enabled(single_pass);
            prefill(ctx, &mut batch, prompt, seq as i32)?;
            let mut passes = 1;
            ctx.hook_mut().set_shift_enabled(true);
            if !single_pass && ctx.hook().is_steered(seq) {
                // The gate fired after some steered layers had run: decode again, shifted throughout.
                ctx.seq_rm(seq as i32, -1, -1);
                prefill(ctx, &mut batch, prompt, seq as i32)?;
                passes = 2;
            }
            stats.prompt_tokens += prompt.len() * passes;
            slots[seq] = Some(Slot {
                request: next,
                prompt_len: prompt.len(),
                prefill_passes: passes,
                tokens: Vec::new(),
                bytes: Vec::new(),
                emitted: 0,
                sampler: sampling.sampler(),
                logits_row: (batch.len() - 1) as i32,
                budget: sampling.max_tokens.min(room - prompt.len()),
            });
            next += 1;
            // Sample its first token now: the next prompt decode overwrites these logits.
            if sample_one(ctx, &vocab, &mut slots, seq, &mut on_event)? {
                stats.generated_tokens += 1;
            }
        }
        stats.prefill_seconds += started.elapsed().as_secs_f64();

        if slots.iter().all(Option::is_none) {
            if next == prompts.len() {
                return Ok(stats);
            }
            continue;
        }

        // One decode step for every live request.
        let started = Instant::now();
        batch.clear();
        for (seq, slot) in slots.iter_mut().enumerate() {
            if let Some(slot) = slot {
                let last = *slot.tokens.last().expect("a live slot has sampled a token");
                slot.logits_row = batch.len() as i32;
                batch.add(last, (slot.prompt_len + slot.tokens.len() - 1) as i32, seq as i32, true);
            }
        }
        ctx.hook_mut().plan(&batch, &[]);
        ctx.decode(&mut batch).context("decode failed")?;
        for seq in 0..parallel {
            if slots[seq].is_some() && sample_one(ctx, &vocab, &mut slots, seq, &mut on_event)? {
                stats.generated_tokens += 1;
            }
        }
        stats.decode_seconds += started.elapsed().as_secs_f64();
    }
}

/// Samples the next token of the request in `seq`; finishes it on end of
/// generation or when its budget is spent. True if a token was added.
fn sample_one(
    ctx: &mut Context<'_, SteerHook>,
    vocab: &LlamaVocab<'_>,
    slots: &mut [Option<Slot>],
    seq: usize,
    on_event: &mut impl FnMut(Event),
) -> Result<bool> {
    let slot = slots[seq].as_mut().expect("sampling a live slot");
    let logits = ctx.logits(slot.logits_row);
    let token = match &mut slot.sampler {
        // Greedy: the first highest logit, as llama.cpp's greedy sampler picks.
        None => LlamaToken(logits.iter().enumerate().fold(0, |best, (i, &l)| if l > logits[best] { i } else { best }) as i32),
        Some(sampler) => {
            let mut candidates = LlamaTokenDataArray::from_iter(
                logits.iter().enumerate().map(|(id, &logit)| LlamaTokenData::new(LlamaToken(id as i32), logit, 0.0)),
                false,
            );
            candidates.apply_sampler(sampler);
            let token = candidates.selected_token().context("the sampler selected no token")?;
            sampler.accept(token);
            token
        }
    };
    let end = vocab.is_eog(token);
    if !end {
        slot.tokens.push(token.0);
        slot.bytes.extend(vocab.token_to_piece(token, false, None));
        let valid = match std::str::from_utf8(&slot.bytes[slot.emitted..]) {
            Ok(s) => s.len(),
            Err(e) => e.valid_up_to(),
        };
        if valid > 0 {
            let text = std::str::from_utf8(&slot.bytes[slot.emitted..slot.emitted + valid]).expect("checked");
            on_event(Event::Text { request: slot.request, text });
            slot.emitted += valid;
        }
    }
    if end || slot.tokens.len() >= slot.budget {
        let slot = slots[seq].take().expect("live");
        let hook = ctx.hook();
        let generation = Generation {
            gate: hook.decision(seq),
            steered: hook.is_steered(seq),
            output: String::from_utf8_lossy(&slot.bytes).into_owned(),
            tokens: slot.tokens,
            prompt_tokens: slot.prompt_len,
            prefill_passes: slot.prefill_passes,
        };
        ctx.seq_rm(seq as i32, -1, -1);
        on_event(Event::Done { request: slot.request, generation });
    }
    Ok(!end)
}
