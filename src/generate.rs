//! Text generation with the steering hook in the graph. Many requests decode
//! together, one sequence each; the hook gates each on its own last prompt
//! token and shifts only the rows of the requests it flags.

use std::time::Instant;

use anyhow::{anyhow, bail, Context as _, Result};
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::data::LlamaTokenData;
use llama_cpp_2::token::data_array::LlamaTokenDataArray;
use llama_cpp_2::token::LlamaToken;
use serde::Serialize;

use crate::capture::{BatchAware, Reads};
use crate::gate::Gate;
use crate::llama::{Batch, BatchLayout, Context, Model};
use crate::prompts::common_prefix;
use crate::steer::{GateDecision, Mode, RequestStart, Shifter, SteerHook};

#[derive(Clone, Debug)]
pub struct Sampling {
    pub max_tokens: usize,
    /// 0 = greedy.
    pub temperature: f32,
    pub top_k: i32,
    pub top_p: f32,
    pub seed: u32,
    /// DRY repetition penalty (multiplier; 0 is off) on steered answers only:
    /// the shift can trap a small model in a refusal that repeats itself.
    pub steered_dry: f32,
    /// Never end on an end-of-generation token: every answer runs to
    /// `max_tokens` (llama-server's `ignore_eos`), so load tests compare
    /// servers on the same number of tokens whatever each answer says.
    pub ignore_eos: bool,
}

/// The DRY multiplier llama.cpp's documentation suggests.
pub const DEFAULT_STEERED_DRY: f32 = 0.8;
/// Tokens DRY looks back over (llama.cpp clamps -1, "whole context", to off).
const DRY_WINDOW: i32 = 1024;
/// Logits a greedy steered step hands to the sampler first. DRY looks up every
/// candidate in a hash map, which over a 150k vocabulary costs more per token
/// than the shift itself; DRY only lowers logits, so a short list decides
/// unless it pushes every listed token down to the level of those left out.
const GREEDY_SHORTLIST: usize = 64;
impl Default for Sampling {
    fn default() -> Self {
        Sampling { max_tokens: 128, temperature: 0.0, top_k: 40, top_p: 0.95, seed: 42, steered_dry: DEFAULT_STEERED_DRY, ignore_eos: false }
    }
}

impl Sampling {
    /// None for greedy decoding of an unsteered request, a plain argmax over the logits.
    /// `dry` makes DRY samplers for a multiplier.
    fn sampler(&self, steered: bool, dry: impl FnOnce(f32) -> LlamaSampler) -> Option<LlamaSampler> {
        let dry = (steered && self.steered_dry > 0.0).then(|| dry(self.steered_dry));
        let pick = if self.temperature <= 0.0 {
            dry.as_ref()?;
            vec![LlamaSampler::greedy()]
        } else {
            vec![
                LlamaSampler::top_k(self.top_k),
                LlamaSampler::top_p(self.top_p, 1),
                LlamaSampler::temp(self.temperature),
                LlamaSampler::dist(self.seed),
            ]
        };
        Some(LlamaSampler::chain_simple(dry.into_iter().chain(pick)))
    }
}

/// Making a DRY sampler scans the whole vocabulary for tokens that hold a
/// sequence breaker (tens of milliseconds); cloning one copies what it found.
struct DrySamplers {
    made: Vec<(f32, LlamaSampler)>,
}

impl DrySamplers {
    fn get(&mut self, model: &Model, multiplier: f32) -> LlamaSampler {
        if let Some((_, sampler)) = self.made.iter().find(|(m, _)| *m == multiplier) {
            return sampler.clone();
        }
        let sampler = LlamaSampler::dry(model.llama(), multiplier, 1.75, 2, DRY_WINDOW, ["\n", ":", "\"", "*"]);
        self.made.push((multiplier, sampler.clone()));
        sampler
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
    /// Stopped by its token budget rather than an end-of-generation token.
    pub truncated: bool,
}

/// What the engine reports while it works.
pub enum Event<'a> {
    /// A request's prompt is decoded and gated; its tokens follow.
    Started { request: usize, gate: Option<GateDecision>, steered: bool },
    /// New text of a request (whole UTF-8 characters).
    Text { request: usize, text: &'a str },
    Done { request: usize, generation: Generation },
}

struct Slot {
    id: usize,
    prompt_len: usize,
    prefill_passes: usize,
    tokens: Vec<i32>,
    bytes: Vec<u8>,
    emitted: usize,
    sampler: Option<LlamaSampler>,
    greedy: bool,
    ignore_eos: bool,
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

impl std::ops::AddAssign for RunStats {
    fn add_assign(&mut self, other: RunStats) {
        self.prompt_tokens += other.prompt_tokens;
        self.generated_tokens += other.generated_tokens;
        self.prefill_seconds += other.prefill_seconds;
        self.decode_seconds += other.decode_seconds;
    }
}

/// Decodes the prompt `tokens` of sequence `seq` from position `start` (the
/// cache holds those before), in batches of the batch's capacity, requesting
/// output only for the last token. The last batch keeps at least `tail`
/// tokens, so the token the gate reads (that many before the last) is decoded
/// with the last one.
fn prefill<H: BatchAware>(ctx: &mut Context<'_, H>, batch: &mut Batch, tokens: &[i32], start: usize, seq: i32, tail: usize) -> Result<()> {
    for range in chunk_ranges(tokens.len() - start, batch.capacity(), tail) {
        batch.clear();
        for i in range.start + start..range.end + start {
            batch.add(tokens[i], i as i32, seq, i + 1 == tokens.len());
        }
        ctx.hook_mut().plan(&*batch, &Reads::NONE)?;
        ctx.decode(batch).context("prompt decode failed")?;
    }
    Ok(())
}

/// Consecutive ranges of at most `capacity` covering `0..len`, the last one at
/// least `tail` long (when `tail <= capacity`).
fn chunk_ranges(len: usize, capacity: usize, tail: usize) -> Vec<std::ops::Range<usize>> {
    let capacity = capacity.max(1);
    let last_start = len.saturating_sub(1) / capacity * capacity;
    let last_start = last_start.min(len.saturating_sub(tail.min(capacity)));
    let mut ranges: Vec<_> = (0..last_start).step_by(capacity).map(|s| s..(s + capacity).min(last_start)).collect();
    ranges.push(last_start..len);
    ranges
}

/// Fails closed: a graph that never showed the hook a layer it must gate or
/// steer, or a gated request the gate did not decide on, is an error, never an
/// unguarded answer.
fn check_guarded(ctx: &Context<'_, SteerHook>, seq: usize) -> Result<()> {
    let hook = ctx.hook();
    if let Some(layer) = ctx.unseen(&hook.needed_layers()) {
        bail!("layer {layer}'s output (l_out-{layer}) never reached the guard in this model's graph, so it cannot gate or steer there; refusing to answer unguarded");
    }
    if hook.undecided(seq) {
        bail!("the gate did not decide on this request or could not score it; refusing to answer unguarded");
    }
    Ok(())
}

/// The context each of `parallel` requests gets beside `cached` prefix tokens.
pub fn share(n_ctx: usize, cached: usize, parallel: usize) -> usize {
    n_ctx.saturating_sub(cached) / parallel
}

/// Continuous batching: each request owns one sequence; new requests join
/// between decode steps, and every live request advances one token per step.
pub struct Engine<'c, 'm> {
    model: &'m Model,
    ctx: &'c mut Context<'m, SteerHook>,
    batch: Batch,
    slots: Vec<Option<Slot>>,
    room: usize,
    /// Most rows in one decode call.
    max_rows: usize,
    dry: DrySamplers,
    stats: RunStats,
    prefix: Option<PrefixCache>,
    /// End-of-generation token ids, listed when a request first ignores them.
    eog: Option<Vec<usize>>,
}

/// A request to admit: its id, prompt tokens and sampling.
pub struct NewRequest<'a> {
    pub id: usize,
    pub prompt: &'a [i32],
    pub sampling: &'a Sampling,
}

/// Where an admitted request sits while its prompt is decoded.
struct Admission {
    /// Index among the requests given.
    index: usize,
    seq: usize,
    /// Prompt tokens the prefix cache supplies.
    cached: usize,
    logits_row: i32,
}

/// A templated prefix kept decoded in the sequence after the request slots;
/// prompts that start with it share its cache cells instead of decoding it.
struct PrefixCache {
    seq: usize,
    tokens: Vec<i32>,
}

impl PrefixCache {
    /// Tokens of `prompt` the cache can supply: its shared prefix, before
    /// `keep` (the first token the gate reads) and leaving the last `tail`
    /// tokens (the gate's rows and the last) to be decoded.
    fn shared_with(&self, prompt: &[i32], tail: usize, keep: usize) -> usize {
        let common = common_prefix(&self.tokens, prompt);
        common.min(prompt.len().saturating_sub(tail)).min(keep)
    }
}

impl<'c, 'm> Engine<'c, 'm> {
    /// Up to `parallel` requests at a time, each with an equal share of the context.
    pub fn new(model: &'m Model, ctx: &'c mut Context<'m, SteerHook>, parallel: usize) -> Engine<'c, 'm> {
        let parallel = parallel.clamp(1, ctx.n_seq_max());
        let room = share(ctx.n_ctx(), 0, parallel);
        let batch = Batch::new(ctx.n_batch().max(parallel));
        ctx.clear_memory();
        Engine {
            model,
            ctx,
            batch,
            slots: (0..parallel).map(|_| None).collect(),
            room,
            max_rows: parallel,
            dry: DrySamplers { made: Vec::new() },
            stats: RunStats::default(),
            prefix: None,
            eog: None,
        }
    }

    /// Decodes `tokens` once into the sequence after the request slots, so new
    /// prompts that start with them (a chat template's system prompt and user
    /// header) skip decoding them. Needs one KV cache for all sequences, a
    /// hook that tracks that extra sequence, and a mode that never shifts the
    /// rows before a request starts (gated or plain), so a flagged request
    /// keeps the cached rows as they would have been without the cache.
    pub fn cache_prefix(&mut self, tokens: &[i32]) -> Result<()> {
        let seq = self.slots.len();
        if !(self.ctx.kv_unified() && seq < self.ctx.n_seq_max() && self.ctx.hook().mode() != Mode::Always) {
            bail!("a prefix cache needs gated or plain mode, one KV cache for all sequences and a spare sequence");
        }
        if tokens.is_empty() {
            return Ok(());
        }
        self.ctx.seq_rm(seq as i32, -1, -1);
        prefill(self.ctx, &mut self.batch, tokens, 0, seq as i32, 1)?;
        // The cached cells stay taken while requests that do not share them
        // (a system message of their own) fill their whole share.
        self.room = share(self.ctx.n_ctx(), tokens.len(), self.slots.len());
        self.prefix = Some(PrefixCache { seq, tokens: tokens.to_vec() });
        Ok(())
    }

    pub fn mode(&self) -> Mode {
        self.ctx.hook().mode()
    }

    /// Decodes at most `rows` requests per `llama_decode` call.
    pub fn limit_rows(&mut self, rows: usize) {
        self.max_rows = rows.max(1);
    }

    pub fn hook_mut(&mut self) -> &mut SteerHook {
        self.ctx.hook_mut()
    }

    /// `llama_decode` calls made on this engine's context so far.
    pub fn decodes(&self) -> usize {
        self.ctx.decodes()
    }

    pub fn stats(&self) -> RunStats {
        self.stats
    }

    pub fn free_slots(&self) -> usize {
        self.slots.iter().filter(|s| s.is_none()).count()
    }

    pub fn has_free_slot(&self) -> bool {
        self.slots.iter().any(Option::is_none)
    }

    pub fn is_idle(&self) -> bool {
        self.slots.iter().all(Option::is_none)
    }

    /// An error unless a prompt of `n_tokens` leaves room for at least one answer token.
    pub fn check_fits(&self, n_tokens: usize) -> Result<()> {
        if n_tokens + 1 > self.room {
            let fix = if self.slots.len() > 1 { "shorten it, raise --ctx-size or lower --parallel" } else { "shorten it or raise --ctx-size" };
            bail!(
                "the prompt is {n_tokens} tokens long and leaves no room to answer in its share of the context ({} of {} tokens for {} parallel requests): {fix}",
                self.room,
                self.ctx.n_ctx(),
                self.slots.len()
            );
        }
        Ok(())
    }

    /// Gates and prefills a new request `id` in the lowest free sequence and
    /// samples its first token. Needs a free slot.
    pub fn admit(&mut self, id: usize, prompt: &[i32], sampling: &Sampling, on_event: &mut impl FnMut(Event)) -> Result<()> {
        self.admit_all(&[NewRequest { id, prompt, sampling }], on_event).pop().expect("one result per request")
    }

    /// Admits several new requests at once, each in a free sequence: with one
    /// KV cache for all, the prompts that fit share `llama_decode` calls (the
    /// hook gates each on its own rows). One result per request, in order.
    pub fn admit_all(&mut self, requests: &[NewRequest], on_event: &mut impl FnMut(Event)) -> Vec<Result<()>> {
        let started = Instant::now();
        let (mut admitted, mut results) = self.allocate(requests);
        let prefilled = self.prefill_all(requests, &mut admitted, &mut results, on_event);
        self.fail_unstarted(&admitted, &mut results, prefilled);
        self.stats.prefill_seconds += started.elapsed().as_secs_f64();
        results
    }

    /// After an error, every admitted request that has not started fails with it.
    fn fail_unstarted(&self, admitted: &[Admission], results: &mut [Result<()>], outcome: Result<()>) {
        if let Err(e) = outcome {
            let why = format!("{e:#}");
            for a in admitted {
                if results[a.index].is_ok() && self.slots[a.seq].is_none() {
                    results[a.index] = Err(anyhow!("{why}"));
                }
            }
        }
    }

    /// A free sequence for each request that fits, or why not; one result per request.
    fn allocate(&self, requests: &[NewRequest]) -> (Vec<Admission>, Vec<Result<()>>) {
        let mut results: Vec<Result<()>> = Vec::new();
        let mut admitted = Vec::new();
        for r in requests {
            let free = (0..self.slots.len()).find(|&s| self.slots[s].is_none() && !admitted.iter().any(|a: &Admission| a.seq == s));
            match (self.check_fits(r.prompt.len()), free) {
                (Err(e), _) => results.push(Err(e)),
                (Ok(()), None) => results.push(Err(anyhow!("no free slot"))),
                (Ok(()), Some(seq)) => {
                    admitted.push(Admission { index: results.len(), seq, cached: 0, logits_row: 0 });
                    results.push(Ok(()));
                }
            }
        }
        (admitted, results)
    }

    /// Admits `requests` and advances every live request one token. When
    /// requests are live and everything fits one batch, the new prompts ride
    /// in the live requests' decode call, as llama-server's continuous
    /// batching has them: one pass over the weights instead of two. Not with
    /// a row limit or a KV stream per sequence (`--deterministic`).
    pub fn advance(&mut self, requests: &[NewRequest], on_event: &mut impl FnMut(Event)) -> Result<Vec<Result<()>>> {
        let live: Vec<usize> = (0..self.slots.len()).filter(|&s| self.slots[s].is_some()).collect();
        let tail = self.gate_tail();
        let rows = live.len() + requests.iter().map(|r| r.prompt.len() - self.cached_for(r.prompt, tail)).sum::<usize>();
        let mixes = !requests.is_empty() && !live.is_empty() && self.ctx.kv_unified() && self.max_rows >= self.slots.len() && rows <= self.batch.capacity();
        if !mixes {
            let results = self.admit_all(requests, on_event);
            if !self.is_idle() {
                self.step(on_event)?;
            }
            return Ok(results);
        }
        let started = Instant::now();
        let (mut admitted, mut results) = self.allocate(requests);
        self.use_control_vector(false)?;
        self.begin_all(requests, &mut admitted, tail, SteerHook::begin_request)?;
        let longest = admitted.iter().map(|a| requests[a.index].prompt.len() - a.cached).max().unwrap_or(0);
        // The hook shifts the live flagged requests' rows; a new request is
        // undecided before its gate layer, so steered layers before it leave
        // its rows as a gate-only pass would, and it is decoded again if flagged.
        let shifter = self.ctx.hook().prompt_shifter(longest, self.batch.capacity());
        self.batch.clear();
        self.add_next_tokens(&live);
        let all: Vec<usize> = (0..admitted.len()).collect();
        self.add_prompts(requests, &mut admitted, &all);
        self.ctx.hook_mut().plan(&self.batch, &Reads::NONE)?;
        self.ctx.decode(&mut self.batch).context("decode failed")?;
        self.sample_all(&live, on_event)?;
        let again: Vec<usize> = all.iter().copied().filter(|&k| self.ctx.hook().decode_again(admitted[k].seq, shifter, admitted[k].cached)).collect();
        for &k in all.iter().filter(|k| !again.contains(k)) {
            let a = &admitted[k];
            results[a.index] = self.start(&requests[a.index], a.seq, 1, a.logits_row, on_event);
        }
        let redecoded = self.redecode_shifted(requests, &admitted, &again, &mut results, on_event);
        self.fail_unstarted(&admitted, &mut results, redecoded);
        self.stats.decode_seconds += started.elapsed().as_secs_f64();
        Ok(results)
    }

    /// Decodes the admitted prompts in groups that fit one batch (a prompt
    /// longer than a batch goes alone, in chunks), then starts each request.
    fn prefill_all(&mut self, requests: &[NewRequest], admitted: &mut [Admission], results: &mut [Result<()>], on_event: &mut impl FnMut(Event)) -> Result<()> {
        // The prompt pass gates first, so the hook must hold the shift.
        self.use_control_vector(false)?;
        let tail = self.gate_tail();
        self.begin_all(requests, admitted, tail, SteerHook::begin_request)?;
        let capacity = self.batch.capacity();
        for group in self.groups(requests, admitted) {
            let longest = group.iter().map(|&k| requests[admitted[k].index].prompt.len() - admitted[k].cached).max().unwrap_or(0);
            let shifter = self.ctx.hook().prompt_shifter(longest, capacity);
            self.ctx.hook_mut().set_shifter(shifter);
            let decoded = self.decode_group(requests, admitted, &group, tail);
            self.ctx.hook_mut().set_shifter(Shifter::Hook);
            decoded?;
            // Start every request whose first pass stands before another
            // decode overwrites the logits; then decode the others again.
            let again: Vec<usize> = group.iter().copied().filter(|&k| self.ctx.hook().decode_again(admitted[k].seq, shifter, admitted[k].cached)).collect();
            for &k in group.iter().filter(|k| !again.contains(k)) {
                let a = &admitted[k];
                results[a.index] = self.start(&requests[a.index], a.seq, 1, a.logits_row, on_event);
            }
            self.redecode_shifted(requests, admitted, &again, results, on_event)?;
        }
        Ok(())
    }

    /// Decodes the flagged requests `again` once more, shifted, sharing
    /// decode calls as a first pass does, and starts each.
    fn redecode_shifted(&mut self, requests: &[NewRequest], admitted: &[Admission], again: &[usize], results: &mut [Result<()>], on_event: &mut impl FnMut(Event)) -> Result<()> {
        let mut second: Vec<Admission> = again
            .iter()
            .map(|&k| {
                let a = &admitted[k];
                let kept = self.ctx.hook().kept_again(a.seq, a.cached);
                self.ctx.seq_rm(a.seq as i32, kept as i32, -1);
                Admission { index: a.index, seq: a.seq, cached: kept, logits_row: 0 }
            })
            .collect();
        let tail = self.gate_tail();
        for group in self.groups(requests, &second) {
            self.decode_group(requests, &mut second, &group, tail)?;
            for &k in &group {
                let a = &second[k];
                results[a.index] = self.start(&requests[a.index], a.seq, 2, a.logits_row, on_event);
            }
        }
        Ok(())
    }

    /// Prompt tokens that must share the last decode call: the one the gate
    /// reads (its offset before the last) through the last.
    /// The admitted prompts in groups whose remaining tokens fit one decode
    /// call; a prompt longer than a batch is a group alone. With a KV stream
    /// per sequence llama.cpp regroups a batch's rows by sequence, so there
    /// each prompt is a group.
    fn groups(&self, requests: &[NewRequest], admitted: &[Admission]) -> Vec<Vec<usize>> {
        let (capacity, shared) = (self.batch.capacity(), self.ctx.kv_unified());
        let mut groups: Vec<Vec<usize>> = Vec::new();
        let mut filled = capacity;
        for (k, a) in admitted.iter().enumerate() {
            let rest = requests[a.index].prompt.len() - a.cached;
            if !shared || rest > capacity || filled + rest > capacity {
                groups.push(Vec::new());
                filled = 0;
            }
            groups.last_mut().expect("a group").push(k);
            filled += rest;
        }
        groups
    }

    fn gate_tail(&self) -> usize {
        self.ctx.hook().gate().map_or(1, Gate::tail)
    }

    /// The first prompt position the gate reads, for a request starting at
    /// `start`: the cache must not supply it.
    fn first_read(&self, start: usize) -> usize {
        if self.ctx.hook().gate().is_some_and(Gate::reads_request) { start } else { usize::MAX }
    }

    /// Gives each admitted request its cached prefix cells and tells the hook
    /// (with `begin`: as a request, or gate-only) where its request starts.
    fn begin_all(&mut self, requests: &[NewRequest], admitted: &mut [Admission], tail: usize, begin: fn(&mut SteerHook, usize, RequestStart) -> Result<()>) -> Result<()> {
        for a in admitted.iter_mut() {
            let prompt = requests[a.index].prompt;
            let start = self.ctx.hook().request_start(prompt);
            a.cached = self.share_prefix(a.seq, prompt, tail);
            begin(self.ctx.hook_mut(), a.seq, start)?;
        }
        Ok(())
    }

    /// Prompt tokens of `prompt` the prefix cache supplies: never the first token the gate reads.
    fn cached_for(&self, prompt: &[i32], tail: usize) -> usize {
        let keep = self.first_read(self.ctx.hook().request_start(prompt).conversation);
        self.prefix.as_ref().map_or(0, |p| p.shared_with(prompt, tail, keep))
    }

    /// Empties `seq` for a new prompt and shares into it the cached prefix
    /// cells `prompt` starts with; returns how many tokens the cache supplies.
    fn share_prefix(&mut self, seq: usize, prompt: &[i32], tail: usize) -> usize {
        self.ctx.seq_rm(seq as i32, -1, -1);
        let cached = self.cached_for(prompt, tail);
        if let (Some(p), true) = (&self.prefix, cached > 0) {
            self.ctx.seq_cp(p.seq as i32, seq as i32, 0, cached as i32);
        }
        cached
    }

    /// One decode of the group's remaining prompt tokens (in chunks for a
    /// single prompt longer than a batch); records where each one's logits are.
    fn decode_group(&mut self, requests: &[NewRequest], admitted: &mut [Admission], group: &[usize], tail: usize) -> Result<()> {
        if let [k] = group {
            let a = &mut admitted[*k];
            let prompt = requests[a.index].prompt;
            prefill(self.ctx, &mut self.batch, prompt, a.cached, a.seq as i32, tail)?;
            self.stats.prompt_tokens += prompt.len() - a.cached;
            a.logits_row = (self.batch.len() - 1) as i32;
            return Ok(());
        }
        self.batch.clear();
        self.add_prompts(requests, admitted, group);
        self.ctx.hook_mut().plan(&self.batch, &Reads::NONE)?;
        self.ctx.decode(&mut self.batch).context("prompt decode failed")?;
        Ok(())
    }

    /// Adds the uncached prompt tokens of the `group`'s requests to the batch,
    /// the last of each with its logits; records where those are.
    fn add_prompts(&mut self, requests: &[NewRequest], admitted: &mut [Admission], group: &[usize]) {
        for &k in group {
            let a = &mut admitted[k];
            let prompt = requests[a.index].prompt;
            for i in a.cached..prompt.len() {
                self.batch.add(prompt[i], i as i32, a.seq as i32, i + 1 == prompt.len());
            }
            a.logits_row = (self.batch.len() - 1) as i32;
            self.stats.prompt_tokens += prompt.len() - a.cached;
        }
    }

    /// Checks that the gate ran, fills the request's slot, reports it started
    /// and samples its first token (the next decode overwrites its logits).
    fn start(&mut self, request: &NewRequest, seq: usize, passes: usize, logits_row: i32, on_event: &mut impl FnMut(Event)) -> Result<()> {
        if let Err(e) = check_guarded(self.ctx, seq) {
            self.ctx.seq_rm(seq as i32, -1, -1);
            return Err(e);
        }
        let steered = self.ctx.hook().is_steered(seq);
        if (request.sampling.ignore_eos || steered) && self.eog.is_none() {
            let vocab = self.model.llama().vocab();
            self.eog = Some((0..self.model.n_vocab()).filter(|&id| vocab.is_eog(LlamaToken(id as i32))).collect());
        }
        let hook = self.ctx.hook();
        on_event(Event::Started { request: request.id, gate: hook.decision(seq), steered });
        self.slots[seq] = Some(Slot {
            id: request.id,
            prompt_len: request.prompt.len(),
            prefill_passes: passes,
            tokens: Vec::new(),
            bytes: Vec::new(),
            emitted: 0,
            sampler: request.sampling.sampler(steered, |multiplier| self.dry.get(self.model, multiplier)),
            greedy: request.sampling.temperature <= 0.0,
            ignore_eos: request.sampling.ignore_eos,
            logits_row,
            budget: request.sampling.max_tokens.min(self.room - request.prompt.len()),
        });
        let sampled = self.sample(seq, on_event)?;
        self.stats.generated_tokens += sampled as usize;
        Ok(())
    }

    /// Runs the gate alone on each prompt, with no shift and no answer: as
    /// many at once as there are free slots, sharing decode calls, each slot
    /// freed again after. Needs a free slot.
    pub fn moderate_all(&mut self, prompts: &[&[i32]]) -> Vec<Result<GateDecision>> {
        let free: Vec<usize> = (0..self.slots.len()).filter(|&s| self.slots[s].is_none()).collect();
        if free.is_empty() {
            return prompts.iter().map(|_| Err(anyhow!("no free slot"))).collect();
        }
        let sampling = Sampling::default();
        let requests: Vec<NewRequest> = prompts.iter().map(|&prompt| NewRequest { id: 0, prompt, sampling: &sampling }).collect();
        let mut results = Vec::new();
        for (chunk, first) in requests.chunks(free.len()).zip((0..).step_by(free.len())) {
            let mut admitted: Vec<Admission> = free.iter().zip(first..first + chunk.len()).map(|(&seq, index)| Admission { index, seq, cached: 0, logits_row: 0 }).collect();
            let decoded = self.gate_only(&requests, &mut admitted);
            for a in &admitted {
                self.ctx.seq_rm(a.seq as i32, -1, -1);
                results.push(match &decoded {
                    Err(e) => Err(anyhow!("{e:#}")),
                    Ok(()) => self.moderation(a.seq),
                });
            }
        }
        results
    }

    /// Decodes the admitted prompts up to the gate layer and no further.
    fn gate_only(&mut self, requests: &[NewRequest], admitted: &mut [Admission]) -> Result<()> {
        for a in admitted.iter() {
            self.check_fits(requests[a.index].prompt.len())?;
        }
        self.use_control_vector(false)?;
        let tail = self.gate_tail();
        // Cached rows are unshifted, which is all a gate-only pass needs.
        self.begin_all(requests, admitted, tail, SteerHook::begin_gate_only)?;
        self.ctx.hook_mut().set_shifter(Shifter::GateOnly);
        // Nothing past the gate layer is used: not the logits, not the deeper
        // cache (the sequences are removed right after).
        self.ctx.hook_mut().set_stop_at_gate(true);
        let mut decoded = Ok(());
        for group in self.groups(requests, admitted) {
            decoded = self.decode_group(requests, admitted, &group, tail);
            if decoded.is_err() {
                break;
            }
        }
        self.ctx.hook_mut().set_stop_at_gate(false);
        self.ctx.hook_mut().set_shifter(Shifter::Hook);
        decoded
    }

    /// The gate's decision on sequence `seq` after a gate-only pass.
    fn moderation(&self, seq: usize) -> Result<GateDecision> {
        let gate_layers = self.ctx.hook().gate().map(Gate::layers).context("this guard has no gate")?;
        if let Some(layer) = self.ctx.unseen(&gate_layers) {
            bail!("the gate layer's output (l_out-{layer}) never reached the guard: start the server in gated mode");
        }
        self.ctx.hook().scored_decision(seq).context("the gate did not decide on this input or could not score it")
    }

    /// One decode step for every live request.
    pub fn step(&mut self, on_event: &mut impl FnMut(Event)) -> Result<()> {
        let started = Instant::now();
        let live: Vec<usize> = (0..self.slots.len()).filter(|&s| self.slots[s].is_some()).collect();
        // With a KV stream per sequence, llama.cpp puts only consecutive sequence
        // ids in one ubatch; decoding each run on its own keeps batch rows and
        // ubatch rows the same, which the hook relies on.
        let runs: Vec<&[usize]> =
            if self.ctx.kv_unified() { vec![&live[..]] } else { live.chunk_by(|a, b| b == &(a + 1)).collect() };
        let max_rows = self.max_rows;
        for run in runs.into_iter().flat_map(|r| r.chunks(max_rows)) {
            let left = |seq: usize| self.slots[seq].as_ref().map_or(0, |s| s.budget.saturating_sub(s.tokens.len()));
            let hand_off = self.ctx.hook().hands_off(run, self.ctx.has_control_vector(), left);
            self.use_control_vector(hand_off)?;
            self.batch.clear();
            self.add_next_tokens(run);
            self.ctx.hook_mut().plan(&self.batch, &Reads::NONE)?;
            self.ctx.decode(&mut self.batch).context("decode failed")?;
            self.sample_all(run, on_event)?;
        }
        self.stats.decode_seconds += started.elapsed().as_secs_f64();
        Ok(())
    }

    /// Adds each live request's last sampled token to the batch, with its logits.
    fn add_next_tokens(&mut self, seqs: &[usize]) {
        for &seq in seqs {
            let slot = self.slots[seq].as_mut().expect("live");
            let last = *slot.tokens.last().expect("a live slot has sampled a token");
            slot.logits_row = self.batch.len() as i32;
            self.batch.add(last, (slot.prompt_len + slot.tokens.len() - 1) as i32, seq as i32, true);
        }
    }

    /// Samples the next token of each live request from the last decode.
    fn sample_all(&mut self, seqs: &[usize], on_event: &mut impl FnMut(Event)) -> Result<()> {
        for &seq in seqs {
            let sampled = self.sample(seq, on_event)?;
            self.stats.generated_tokens += sampled as usize;
        }
        Ok(())
    }

    fn use_control_vector(&mut self, on: bool) -> Result<()> {
        crate::steer::use_control_vector(self.ctx, self.model.n_embd(), on)
    }

    /// Runs every prompt to completion, reporting through `on_event`.
    /// Requests are numbered by their index in `prompts`. Callers that run one
    /// prompt at a time keep one engine, which keeps what it made for samplers.
    pub fn run(&mut self, prompts: &[Vec<i32>], sampling: &Sampling, mut on_event: impl FnMut(Event)) -> Result<RunStats> {
        for (i, prompt) in prompts.iter().enumerate() {
            self.check_fits(prompt.len()).with_context(|| format!("prompt {} does not fit", i + 1))?;
        }
        // A run that failed leaves its requests behind.
        for seq in 0..self.slots.len() {
            if self.slots[seq].is_some() {
                self.release(seq);
            }
        }
        self.stats = RunStats::default();
        let mut next = 0;
        loop {
            while next < prompts.len() && self.has_free_slot() {
                self.admit(next, &prompts[next], sampling, &mut on_event)?;
                next += 1;
            }
            if self.is_idle() {
                if next == prompts.len() {
                    return Ok(self.stats);
                }
                continue;
            }
            self.step(&mut on_event)?;
        }
    }

    /// Ends request `id` now (a stop string, a client gone) and frees its sequence.
    pub fn finish(&mut self, id: usize) -> Option<Generation> {
        let seq = self.slots.iter().position(|s| s.as_ref().is_some_and(|s| s.id == id))?;
        Some(self.release(seq))
    }

    fn release(&mut self, seq: usize) -> Generation {
        let slot = self.slots[seq].take().expect("releasing a live slot");
        let truncated = slot.tokens.len() >= slot.budget;
        let hook = self.ctx.hook();
        let generation = Generation {
            gate: hook.decision(seq),
            steered: hook.is_steered(seq),
            output: String::from_utf8_lossy(&slot.bytes).into_owned(),
            tokens: slot.tokens,
            prompt_tokens: slot.prompt_len,
            prefill_passes: slot.prefill_passes,
            truncated,
        };
        self.ctx.seq_rm(seq as i32, -1, -1);
        generation
    }

    /// Samples the next token of the request in `seq`; finishes it on end of
    /// generation or when its budget is spent. True if a token was added.
    fn sample(&mut self, seq: usize, on_event: &mut impl FnMut(Event)) -> Result<bool> {
        let vocab = self.model.llama().vocab();
        let slot = self.slots[seq].as_mut().expect("sampling a live slot");
        // A steered answer's first token may not end it: the shift can make end
        // of turn the likeliest first token, and an empty reply tells the user nothing.
        let no_end = slot.ignore_eos || (self.ctx.hook().is_steered(seq) && slot.tokens.is_empty());
        if let (Some(eog), true) = (&self.eog, no_end) {
            let logits = self.ctx.logits_mut(slot.logits_row);
            eog.iter().for_each(|&id| logits[id] = f32::NEG_INFINITY);
        }
        let logits = self.ctx.logits(slot.logits_row);
        let token = match &mut slot.sampler {
            // Greedy: the first highest logit, as llama.cpp's greedy sampler picks.
            None => LlamaToken(logits.iter().enumerate().fold(0, |best, (i, &l)| if l > logits[best] { i } else { best }) as i32),
            Some(sampler) => {
                let token = if slot.greedy { pick_greedy(sampler, logits)? } else { pick(sampler, logits, 0..logits.len())?.0 };
                sampler.accept(token);
                token
            }
        };
        let end = vocab.is_eog(token);
        if !end {
            slot.tokens.push(token.0);
            slot.bytes.extend(vocab.token_to_piece(token, false, None));
            let complete = complete_utf8(&slot.bytes[slot.emitted..]);
            if complete > 0 {
                let text = String::from_utf8_lossy(&slot.bytes[slot.emitted..slot.emitted + complete]);
                on_event(Event::Text { request: slot.id, text: &text });
                slot.emitted += complete;
            }
        }
        if end || slot.tokens.len() >= slot.budget {
            let id = slot.id;
            let generation = self.release(seq);
            on_event(Event::Done { request: id, generation });
        }
        Ok(!end)
    }
}

/// How many leading bytes of an answer can be shown now: all but an
/// unfinished character at the end. Bytes that can never be UTF-8 count (they
/// show as U+FFFD), so one bad token cannot hold back the rest of the answer.
fn complete_utf8(bytes: &[u8]) -> usize {
    let mut at = 0;
    loop {
        match std::str::from_utf8(&bytes[at..]) {
            Ok(_) => return bytes.len(),
            Err(e) => match e.error_len() {
                Some(bad) => at += e.valid_up_to() + bad,
                None => return at + e.valid_up_to(),
            },
        }
    }
}

/// The token `sampler` picks among `ids`, and its logit after the sampler.
fn pick(sampler: &mut LlamaSampler, logits: &[f32], ids: impl Iterator<Item = usize>) -> Result<(LlamaToken, f32)> {
    let mut candidates =
        LlamaTokenDataArray::from_iter(ids.map(|id| LlamaTokenData::new(LlamaToken(id as i32), logits[id], 0.0)), false);
    candidates.apply_sampler(sampler);
    let selected = candidates.selected.context("the sampler selected no token")?;
    Ok((candidates.data[selected].id(), candidates.data[selected].logit()))
}

/// What a greedy `sampler` (logit penalties, then greedy) picks over the
/// whole vocabulary, looking at the highest logits first.
fn pick_greedy(sampler: &mut LlamaSampler, logits: &[f32]) -> Result<LlamaToken> {
    let mut shortlist = highest(logits, GREEDY_SHORTLIST);
    let floor = shortlist.iter().map(|&id| logits[id]).fold(f32::INFINITY, f32::min);
    // In vocabulary order, so ties go to the lowest id as over the whole vocabulary.
    shortlist.sort_unstable();
    let (token, logit) = pick(sampler, logits, shortlist.into_iter())?;
    // Every token left out has a logit of at most `floor`, and penalties only lower logits.
    if logit > floor {
        return Ok(token);
    }
    Ok(pick(sampler, logits, 0..logits.len())?.0)
}

/// Ids of the `k` highest logits.
fn highest(logits: &[f32], k: usize) -> Vec<usize> {
    let mut top: Vec<(f32, usize)> = Vec::with_capacity(k + 1);
    for (id, &logit) in logits.iter().enumerate() {
        if top.len() == k && logit <= top[k - 1].0 {
            continue;
        }
        let at = top.partition_point(|&(l, _)| l >= logit);
        top.insert(at, (logit, id));
        top.truncate(k);
    }
    top.into_iter().map(|(_, id)| id).collect()
}

/// Runs every prompt to completion, up to `parallel` at a time, reporting
/// through `on_event`. Requests are numbered by their index in `prompts`.
pub fn run<'m>(
    model: &'m Model,
    ctx: &mut Context<'m, SteerHook>,
    prompts: &[Vec<i32>],
    sampling: &Sampling,
    parallel: usize,
    on_event: impl FnMut(Event),
) -> Result<RunStats> {
    Engine::new(model, ctx, parallel).run(prompts, sampling, on_event)
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_unfinished_character_waits_and_a_bad_byte_does_not_hold_back_the_rest() {
        let e_acute = "é".as_bytes();
        assert_eq!(super::complete_utf8(b"ab"), 2);
        assert_eq!(super::complete_utf8(&[b'a', e_acute[0]]), 1, "the second byte of é is still to come");
        assert_eq!(super::complete_utf8(&[b'a', 0xff, b'b']), 3);
        assert_eq!(super::complete_utf8(&[0xff, b'b', e_acute[0]]), 2);
    }

    #[test]
    fn prompt_chunks_keep_the_gated_token_with_the_last() {
        assert_eq!(super::chunk_ranges(10, 4, 1), vec![0..4, 4..8, 8..10]);
        assert_eq!(super::chunk_ranges(9, 4, 3), vec![0..4, 4..6, 6..9]);
        assert_eq!(super::chunk_ranges(8, 4, 5), vec![0..4, 4..8]);
        assert_eq!(super::chunk_ranges(3, 8, 5), vec![0..3]);
        for (len, cap, tail) in [(1, 1, 1), (7, 3, 2), (100, 16, 6), (5, 5, 5)] {
            let r = super::chunk_ranges(len, cap, tail);
            assert_eq!(r.first().unwrap().start, 0);
            assert_eq!(r.last().unwrap().end, len);
            assert!(r.windows(2).all(|w| w[0].end == w[1].start));
            assert!(r.iter().all(|c| c.len() <= cap && !c.is_empty()));
            assert!(r.last().unwrap().len() >= tail.min(cap).min(len));
        }
    }

    use rand::{Rng, SeedableRng};

    use super::*;

    #[test]
    fn greedy_shortlist_picks_what_the_whole_vocabulary_picks() {
        let path = crate::cache::cache_dir().join("models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf");
        assert!(path.is_file(), "missing {}: run scripts/setup.sh first", path.display());
        let model = Model::load(&path, 0).expect("load model");
        let mut sampler = Sampling::default().sampler(true, |m| DrySamplers { made: Vec::new() }.get(&model, m)).expect("steered greedy sampler");
        // "x y t0 x y t1 ... x y t69 x y": each t would repeat "x y t", so DRY
        // penalises all 70, more than the short list holds.
        let (x, y) = (1000, 1001);
        // Tokens holding a sequence breaker ("\n", ":", quotes, "*") are never penalised.
        let plain_word = |t: &i32| model.llama().vocab().token_to_piece(LlamaToken(*t), false, None).iter().all(u8::is_ascii_alphanumeric);
        let penalised: Vec<i32> = (2000..3000).filter(plain_word).take(70).collect();
        assert!(penalised.len() > GREEDY_SHORTLIST);
        // DRY does not count a repeat that starts at the first token.
        sampler.accept(LlamaToken(999));
        for &t in &penalised {
            for token in [x, y, t] {
                sampler.accept(LlamaToken(token));
            }
        }
        sampler.accept(LlamaToken(x));
        sampler.accept(LlamaToken(y));
        let n_vocab = model.n_vocab();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut overruled = 0;
        for case in 0..60 {
            let mut logits: Vec<f32> = (0..n_vocab).map(|_| rng.gen_range(-10.0..10.0)).collect();
            match case % 3 {
                0 => {}
                // One penalised token on top: DRY must overrule the argmax.
                1 => logits[penalised[case % 70] as usize] = 10.3,
                // Every listed token penalised below those left out: only the whole vocabulary decides.
                _ => {
                    logits.fill(1.5);
                    penalised.iter().for_each(|&t| logits[t as usize] = 2.0);
                }
            }
            let whole = pick(&mut sampler, &logits, 0..n_vocab).unwrap().0;
            assert_eq!(pick_greedy(&mut sampler, &logits).unwrap(), whole, "case {case}");
            overruled += (case % 3 != 0 && !penalised.contains(&whole.0)) as usize;
        }
        assert_eq!(overruled, 40, "DRY should have overruled the argmax in every rigged case");
    }
}
