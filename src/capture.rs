//! Reads the residual stream at each prompt's last token, many prompts per
//! `llama_decode`, with the shared templated prefix decoded once.

use std::ops::Range;

use anyhow::{bail, Result};
use half::bf16;
use indicatif::ProgressBar;
use ndarray::{Array2, Array3};

use crate::llama::{Batch, BatchLayout, Context, ContextParams, LayerHook, LayerOutput, Model, NoHook};
use crate::prompts::common_prefix;

/// Where a token to read sits in the batch being decoded.
#[derive(Clone, Copy, Debug)]
pub struct LastToken {
    /// Row among all tokens of the batch (every layer but the last).
    pub token_row: usize,
    /// Row among the tokens that requested output (the last layer keeps only these).
    pub output_row: usize,
    /// Row of the capture it fills: `prompt * offsets.len() + offset index`.
    pub slot: usize,
}

/// The rows a capture reads in one batch.
#[derive(Clone, Copy, Debug, Default)]
pub struct Reads<'a> {
    /// Tokens a fixed distance before each prompt's last.
    pub last: &'a [LastToken],
    /// Token rows of every prompt's request (from where its request starts),
    /// in prompt order.
    pub request: &'a [usize],
}

impl Reads<'_> {
    pub const NONE: Reads<'static> = Reads { last: &[], request: &[] };
}

/// A hook that is told, before each decode, where the prompts' tokens to read are.
pub trait BatchAware: LayerHook {
    /// An error when the batch is one the hook cannot gate or steer correctly.
    fn plan(&mut self, batch: &dyn BatchLayout, reads: &Reads) -> Result<()>;
}

impl BatchAware for NoHook {
    fn plan(&mut self, _: &dyn BatchLayout, _: &Reads) -> Result<()> {
        Ok(())
    }
}

impl<A: BatchAware, B: BatchAware> BatchAware for (A, B) {
    fn plan(&mut self, batch: &dyn BatchLayout, reads: &Reads) -> Result<()> {
        self.0.plan(batch, reads)?;
        self.1.plan(batch, reads)
    }
}

/// Copies the last-token rows of the chosen layers into `[prompt, layer, n_embd]`,
/// and every request token's row of the request layers into one matrix each.
pub struct CaptureHook {
    layers: Vec<bool>,
    n_embd: usize,
    n_tokens: usize,
    plan: Vec<LastToken>,
    acts: Array3<f32>,
    request_layers: Vec<usize>,
    request_plan: Vec<usize>,
    /// Half precision: every request token of every prompt adds up to most
    /// of an extraction's memory. bfloat16, not f16: some models' residual
    /// streams (Gemma's) hold values past f16's range; its 0.4% steps are
    /// finer than the batch-to-batch rounding of the activations themselves.
    request_acts: Vec<Vec<bf16>>,
}

impl CaptureHook {
    /// Captures `layers` (llama.cpp layer indices) of a model with `n_layer` blocks.
    pub fn new(model: &Model, layers: &[usize]) -> Result<CaptureHook> {
        let mut wanted = vec![false; model.n_layer()];
        for &l in layers {
            let Some(w) = wanted.get_mut(l) else {
                bail!(
                    "layer {l} does not exist: the model has layers 0..{}",
                    model.n_layer() - 1
                )
            };
            *w = true;
        }
        Ok(CaptureHook {
            layers: wanted,
            n_embd: model.n_embd(),
            n_tokens: 0,
            plan: Vec::new(),
            acts: Array3::zeros((0, model.n_layer(), model.n_embd())),
            request_layers: Vec::new(),
            request_plan: Vec::new(),
            request_acts: Vec::new(),
        })
    }

    /// Also captures every request token's row at these layers (which must be
    /// captured layers, and not the last: it keeps only output rows).
    pub fn with_request_layers(mut self, layers: &[usize]) -> Result<CaptureHook> {
        if let Some(&l) = layers.iter().find(|&&l| !self.layers.get(l).copied().unwrap_or(false) || l + 1 >= self.layers.len()) {
            bail!("request layer {l} is not a captured layer below the last");
        }
        self.request_layers = layers.to_vec();
        self.request_acts = vec![Vec::new(); layers.len()];
        Ok(self)
    }

    /// Starts a capture of `n_slots` rows (prompts times read positions).
    pub fn begin(&mut self, n_slots: usize) {
        self.acts = Array3::zeros((n_slots, self.layers.len(), self.n_embd));
    }

    /// The activations captured since `begin`, `[slot, layer, n_embd]`.
    pub fn take(&mut self) -> Array3<f32> {
        self.plan.clear();
        std::mem::replace(&mut self.acts, Array3::zeros((0, 0, 0)))
    }

    /// The request tokens' rows captured since `begin`, `[token, n_embd]` for
    /// each request layer, prompts one after another.
    pub fn take_request(&mut self) -> Vec<Array2<bf16>> {
        self.request_plan.clear();
        let n_embd = self.n_embd;
        self.request_acts
            .iter_mut()
            .map(|rows| {
                let rows = std::mem::take(rows);
                Array2::from_shape_vec((rows.len() / n_embd, n_embd), rows).expect("whole rows")
            })
            .collect()
    }
}

impl LayerHook for CaptureHook {
    fn wants(&mut self, layer: usize) -> bool {
        let request = !self.request_plan.is_empty() && self.request_layers.contains(&layer);
        (!self.plan.is_empty() || request) && self.layers.get(layer).copied().unwrap_or(false)
    }

    fn on_layer(&mut self, layer: usize, out: &mut LayerOutput) -> Result<()> {
        let n_embd = self.n_embd;
        if out.n_embd() != n_embd {
            bail!("rows are {} wide, the model is {n_embd}", out.n_embd());
        }
        let all_rows = out.rows() == self.n_tokens;
        if let Some(k) = self.request_layers.iter().position(|&l| l == layer) {
            if !all_rows {
                bail!("layer {layer} has {} rows, the batch {} tokens", out.rows(), self.n_tokens);
            }
            let (plan, store) = (&self.request_plan, &mut self.request_acts[k]);
            out.read(|data| {
                for &row in plan {
                    store.extend(data[row * n_embd..(row + 1) * n_embd].iter().map(|&x| bf16::from_f32(x)));
                }
            });
        }
        let (plan, acts) = (&self.plan, &mut self.acts);
        out.read(|data| {
            for t in plan {
                let row = if all_rows { t.token_row } else { t.output_row };
                let src = data.get(row * n_embd..(row + 1) * n_embd);
                let (Some(src), true) = (src, t.slot < acts.dim().0 && layer < acts.dim().1) else {
                    bail!(
                        "row {row} (capture slot {}) is outside this batch's {} rows",
                        t.slot,
                        data.len() / n_embd
                    );
                };
                acts.slice_mut(ndarray::s![t.slot, layer, ..])
                    .assign(&ndarray::ArrayView1::from(src));
            }
            Ok(())
        })
    }
}

impl BatchAware for CaptureHook {
    fn plan(&mut self, batch: &dyn BatchLayout, reads: &Reads) -> Result<()> {
        self.n_tokens = batch.len();
        if let Some(&row) = reads.request.iter().find(|&&r| r >= batch.len()) {
            bail!("request row {row} is outside the batch's {} tokens", batch.len());
        }
        self.plan.clear();
        self.plan.extend_from_slice(reads.last);
        self.request_plan.clear();
        self.request_plan.extend_from_slice(reads.request);
        Ok(())
    }
}

/// Length of the token prefix all prompts share, leaving each at least one own token.
pub fn shared_prefix_len(prompts: &[Vec<i32>]) -> usize {
    let Some(first) = prompts.first() else { return 0 };
    let mut len = prompts.iter().map(|p| p.len()).min().unwrap_or(0).saturating_sub(1);
    for p in &prompts[1..] {
        len = len.min(common_prefix(first, p));
    }
    len
}

#[derive(Clone, Copy, Debug, Default)]
pub struct DecodeStats {
    pub prompts: usize,
    /// Tokens actually decoded (the shared prefix counts once).
    pub tokens: usize,
    pub seconds: f64,
}

impl DecodeStats {
    pub fn tokens_per_second(&self) -> f64 {
        self.tokens as f64 / self.seconds.max(1e-9)
    }
}

/// Decodes every prompt up to its last token, one sequence per prompt, as many
/// per batch as fit, and plans reads of the tokens `offsets` before each
/// prompt's last (0 is the last token), and, when `requests` gives where each
/// prompt's request starts, of every token from there on. With
/// `reuse_prefix`, the shared prefix is decoded once in sequence 0 and shared
/// with the others through the KV cache.
pub fn decode_prompts<H: BatchAware>(
    ctx: &mut Context<'_, H>,
    prompts: &[Vec<i32>],
    offsets: &[usize],
    requests: &[usize],
    reuse_prefix: bool,
    progress: &ProgressBar,
) -> Result<DecodeStats> {
    let start = std::time::Instant::now();
    let prefix = checked_prefix(prompts, offsets, requests, reuse_prefix, ctx.n_ctx())?;
    let budget = ctx.n_batch().min(ctx.n_ctx() - prefix);
    let max_seqs = ctx.n_seq_max() - 1;
    let mut filling = Filling { batch: Batch::new(ctx.n_batch()), last: Vec::new(), request: Vec::new(), outputs: 0, decoded: 0 };
    ctx.clear_memory();
    if prefix > 0 {
        for (pos, &token) in prompts[0][..prefix].iter().enumerate() {
            filling.make_room(ctx)?;
            filling.batch.add(token, pos as i32, 0, false);
        }
        filling.flush(ctx)?;
    }
    let mut next = 0;
    while next < prompts.len() {
        let chunk = next_chunk(prompts, next, prefix, max_seqs, budget);
        next = chunk.end;
        for seq in 1..=chunk.len() as i32 {
            if prefix > 0 {
                ctx.seq_cp(0, seq, -1, -1);
            }
        }
        for (j, p) in chunk.clone().enumerate() {
            let reads = PromptReads { prompt: p, offsets, request_start: requests.get(p).copied() };
            filling.add_prompt(ctx, &prompts[p], prefix, j as i32 + 1, &reads)?;
        }
        filling.flush(ctx)?;
        for seq in 1..=chunk.len() as i32 {
            ctx.seq_rm(seq, -1, -1);
        }
        progress.inc(chunk.len() as u64);
    }
    Ok(DecodeStats { prompts: prompts.len(), tokens: filling.decoded, seconds: start.elapsed().as_secs_f64() })
}

/// The prefix every prompt shares that is decoded once (0 without
/// `reuse_prefix`), after checking that each prompt has the tokens to read
/// and a request start.
fn checked_prefix(prompts: &[Vec<i32>], offsets: &[usize], requests: &[usize], reuse_prefix: bool, n_ctx: usize) -> Result<usize> {
    let deepest = offsets.iter().copied().max().unwrap_or(0);
    if let Some(p) = prompts.iter().position(|p| p.len() <= deepest) {
        bail!("prompt {} is {} tokens long, too short to read {deepest} tokens before its last", p + 1, prompts[p].len());
    }
    if !requests.is_empty() && requests.len() != prompts.len() {
        bail!("{} request starts for {} prompts", requests.len(), prompts.len());
    }
    let shortest = prompts.iter().map(Vec::len).min().unwrap_or(0);
    // Request tokens are read in the prompt's own decode, so the shared prefix stops before them.
    let first_request = requests.iter().copied().min().unwrap_or(usize::MAX);
    let prefix = if reuse_prefix { shared_prefix_len(prompts).min(shortest - 1 - deepest).min(first_request) } else { 0 };
    if prefix + 1 > n_ctx {
        bail!("the shared prompt prefix ({prefix} tokens) does not fit the context ({n_ctx})");
    }
    Ok(prefix)
}

/// The prompts from `next` on that share one round of sequences: at most
/// `max_seqs`, and (but for the first) no more than `budget` tokens after the prefix.
fn next_chunk(prompts: &[Vec<i32>], next: usize, prefix: usize, max_seqs: usize, budget: usize) -> Range<usize> {
    let mut end = next;
    let mut tokens = 0;
    while end < prompts.len() && end - next < max_seqs {
        let own = prompts[end].len() - prefix;
        if end > next && tokens + own > budget {
            break;
        }
        tokens += own;
        end += 1;
    }
    next..end
}

/// What the hook reads of one prompt: the tokens `offsets` before its last,
/// into the capture rows of `prompt`, and every token from `request_start` on.
struct PromptReads<'a> {
    prompt: usize,
    offsets: &'a [usize],
    request_start: Option<usize>,
}

/// A batch being filled, with the reads planned in it.
struct Filling {
    batch: Batch,
    last: Vec<LastToken>,
    request: Vec<usize>,
    /// Rows so far that request output.
    outputs: usize,
    decoded: usize,
}

impl Filling {
    /// Decodes what the batch holds, the hook reading what was planned.
    fn flush<H: BatchAware>(&mut self, ctx: &mut Context<'_, H>) -> Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        ctx.hook_mut().plan(&self.batch, &Reads { last: &self.last, request: &self.request })?;
        ctx.decode(&mut self.batch)?;
        self.decoded += self.batch.len();
        self.batch.clear();
        self.last.clear();
        self.request.clear();
        self.outputs = 0;
        Ok(())
    }

    fn make_room<H: BatchAware>(&mut self, ctx: &mut Context<'_, H>) -> Result<()> {
        if self.batch.len() == self.batch.capacity() {
            self.flush(ctx)?;
        }
        Ok(())
    }

    /// Adds `prompt` after its first `prefix` tokens to sequence `seq`.
    fn add_prompt<H: BatchAware>(&mut self, ctx: &mut Context<'_, H>, prompt: &[i32], prefix: usize, seq: i32, reads: &PromptReads) -> Result<()> {
        let own = &prompt[prefix..];
        for (k, &token) in own.iter().enumerate() {
            self.make_room(ctx)?;
            if reads.request_start.is_some_and(|start| prefix + k >= start) {
                self.request.push(self.batch.len());
            }
            let from_end = own.len() - 1 - k;
            let read = reads.offsets.iter().position(|&o| o == from_end);
            if let Some(r) = read {
                self.last.push(LastToken { token_row: self.batch.len(), output_row: self.outputs, slot: reads.prompt * reads.offsets.len() + r });
            }
            let output = read.is_some() || from_end == 0;
            self.outputs += usize::from(output);
            self.batch.add(token, (prefix + k) as i32, seq, output);
        }
        Ok(())
    }
}

/// Activations `[prompt * offsets.len() + i, layer, n_embd]` of the given
/// layers at the token `offsets[i]` before each prompt's last (other layers
/// stay zero).
pub fn capture(
    ctx: &mut Context<'_, CaptureHook>,
    prompts: &[Vec<i32>],
    offsets: &[usize],
    reuse_prefix: bool,
    progress: &ProgressBar,
) -> Result<(Array3<f32>, DecodeStats)> {
    ctx.hook_mut().begin(prompts.len() * offsets.len());
    let stats = decode_prompts(ctx, prompts, offsets, &[], reuse_prefix, progress)?;
    Ok((ctx.hook_mut().take(), stats))
}

/// Every request token's rows at some layers: where each prompt's request
/// starts, and the layers.
pub struct RequestCapture<'a> {
    pub starts: &'a [usize],
    pub layers: &'a [usize],
}

/// What [`capture_prompts`] read.
pub struct Captured {
    /// `[prompt * offsets.len() + i, layer, n_embd]`.
    pub acts: Array3<f32>,
    /// Per request layer, `[token, n_embd]`: each prompt's request tokens, prompt after prompt.
    pub request: Vec<Array2<bf16>>,
    pub stats: DecodeStats,
}

/// As [`capture`], in a context of its own (what commands that only read
/// activations need), and, with `request`, every request token's rows.
pub fn capture_prompts(
    model: &Model,
    params: &ContextParams,
    prompts: &[Vec<i32>],
    offsets: &[usize],
    layers: &[usize],
    request: Option<RequestCapture>,
    progress: &ProgressBar,
) -> Result<Captured> {
    let (starts, request_layers) = request.map_or((&[][..], &[][..]), |r| (r.starts, r.layers));
    let hook = CaptureHook::new(model, layers)?.with_request_layers(request_layers)?;
    let mut ctx = Context::new(model, params, hook, true)?;
    progress.set_length(prompts.len() as u64);
    ctx.hook_mut().begin(prompts.len() * offsets.len());
    let stats = decode_prompts(&mut ctx, prompts, offsets, starts, true, progress)?;
    Ok(Captured { acts: ctx.hook_mut().take(), request: ctx.hook_mut().take_request(), stats })
}
