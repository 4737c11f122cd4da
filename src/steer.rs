//! Where the gate decides and the shift happens.
//!
//! [`SteerHook`] runs inside llama.cpp's graph. At each layer the gate reads
//! it adds up what the gate's terms see of each request (its last tokens,
//! every token of its request) and at the gate's deepest layer it decides; for
//! requests it flags it adds `alpha * theta_l` at every steered layer `l` to
//! each row of that request from where its conversation leaves the chat
//! template's opening; in `always` mode, to every row, as llama.cpp's control vectors do.
//! Rows of other requests are never touched, so requests sharing a batch are
//! steered independently.

use anyhow::{bail, Context as _, Result};

use crate::capture::{BatchAware, Reads};
use crate::gate::{Gate, Read};
use crate::llama::{BatchLayout, Context, LayerHook, LayerOutput};
use crate::prompts::{common_prefix, request_start};
use crate::vectors::{Strength, VectorFile};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// No hook at all: plain llama.cpp.
    Plain,
    /// Shift only requests the gate flags (InferAligner).
    Gated,
    /// Shift every request, as llama.cpp's control vectors do.
    Always,
}

/// Bound on layer indices a list may name, so a typo cannot allocate gigabytes.
const MAX_LAYERS: usize = 1 << 16;

/// Parses a layer list: `10-16`, `3,5,7` or `3,10-12`.
pub fn parse_layers(spec: &str) -> Result<Vec<usize>> {
    let mut layers = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || format!("bad layer list {spec:?}: use a-b, a,b,c or a mix");
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.trim().parse().with_context(bad)?, b.trim().parse().with_context(bad)?);
                if a > b {
                    bail!("bad layer range {part:?}: start after end");
                }
                if b >= MAX_LAYERS {
                    bail!("bad layer range {part:?}: no model has {b} layers");
                }
                layers.extend(a..=b);
            }
            None => layers.push(part.parse().with_context(bad)?),
        }
    }
    if layers.is_empty() {
        bail!("empty layer list {spec:?}");
    }
    Ok(layers)
}

/// `3,5,7` or `14-18`: a layer list as `--layers` takes it.
pub fn format_layers(layers: &[usize]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < layers.len() {
        let mut j = i;
        while j + 1 < layers.len() && layers[j + 1] == layers[j] + 1 {
            j += 1;
        }
        parts.push(if j > i { format!("{}-{}", layers[i], layers[j]) } else { layers[i].to_string() });
        i = j + 1;
    }
    parts.join(",")
}

/// Largest shift added to one activation value: beyond it answers are noise
/// and sums overflow.
const MAX_SHIFT: f32 = 1e4;

/// The safety steering vectors, scaled: `alpha_l * theta_l` for each `l` in `L_G`.
#[derive(Clone, Debug)]
pub struct Steering {
    pub strength: Strength,
    pub layers: Vec<usize>,
    shifts: Vec<Option<Vec<f32>>>,
}

impl Steering {
    /// `n_layer` is the target model's depth; the file must hold every layer
    /// asked for, and, for a relative strength, its mean activation norms.
    pub fn new(ssv: &VectorFile, strength: Strength, layers: &[usize], n_layer: usize) -> Result<Steering> {
        let (Strength::Alpha(x) | Strength::Relative(x)) = strength;
        if !x.is_finite() {
            bail!("the steering strength must be a finite number");
        }
        if layers.is_empty() {
            bail!("no layers to steer");
        }
        let mut shifts = vec![None; n_layer];
        for &layer in layers {
            if layer >= n_layer {
                bail!("layer {layer} does not exist: the model has layers 0..{}", n_layer - 1);
            }
            let theta = ssv.steer_direction(layer)?;
            let norm = theta.iter().map(|x| x * x).sum::<f32>().sqrt();
            if norm == 0.0 {
                bail!("the steering vector of layer {layer} is zero");
            }
            let alpha = alpha_at(ssv, strength, layer)?;
            let shift: Vec<f32> = theta.iter().map(|x| alpha * x / norm).collect();
            if !(norm.is_finite() && shift.iter().all(|x| x.abs() <= MAX_SHIFT)) {
                bail!("the shift at layer {layer} (strength {alpha} times its vector) is not a finite value within ±{MAX_SHIFT:e}; use a smaller --alpha or --strength");
            }
            shifts[layer] = Some(shift);
        }
        let mut layers = layers.to_vec();
        layers.sort_unstable();
        layers.dedup();
        Ok(Steering { strength, layers, shifts })
    }

    pub fn first_layer(&self) -> usize {
        self.layers[0]
    }

    /// `alpha * theta_l`, if `layer` is steered.
    pub fn shift(&self, layer: usize) -> Option<&[f32]> {
        self.shifts.get(layer).and_then(|s| s.as_deref())
    }

    /// The data llama.cpp's `llama_set_adapter_cvec` takes: layers 1..n_layer, zero where unsteered.
    pub fn as_control_vector(&self, n_embd: usize) -> Vec<f32> {
        let mut data = vec![0.0; n_embd * (self.shifts.len() - 1)];
        for (layer, shift) in self.shifts.iter().enumerate().skip(1) {
            if let Some(shift) = shift {
                data[(layer - 1) * n_embd..layer * n_embd].copy_from_slice(shift);
            }
        }
        data
    }
}

/// The absolute strength at `layer`: a relative one scales the layer's mean activation norm.
pub fn alpha_at(file: &VectorFile, strength: Strength, layer: usize) -> Result<f32> {
    match strength {
        Strength::Alpha(alpha) => Ok(alpha),
        Strength::Relative(s) => {
            let norm = file.calibration.as_ref().and_then(|c| c.layer(layer)).map(|l| l.mean_norm).filter(|n| n.is_finite() && *n > 0.0);
            let norm = norm.with_context(|| {
                format!("a relative --strength needs the mean activation norm of layer {layer}, which the steering file lacks (files from `inferalign extract` have it); pass --alpha instead")
            })?;
            Ok(s * norm)
        }
    }
}

/// Fewest tokens left to a steered answer for llama.cpp's control vector to
/// take over the shift. Switching it on and off makes llama.cpp reserve its
/// compute graph again (~30 ms for both on Qwen 0.5B, 2 CPU cores), while the
/// hook's shift costs ~0.75 ms a token: the switch pays for itself from ~40 tokens.
pub const HANDOFF_MIN_TOKENS: usize = 48;

/// Moves the shift into llama.cpp's own control vector (`on`) or back to the
/// hook. With the vector, the hook asks for no tensor and a step runs without
/// the graph splits a callback costs. The context may come with the vector set
/// by an earlier engine; in plain mode it belongs to the caller and stays.
pub fn use_control_vector(ctx: &mut Context<'_, SteerHook>, n_embd: usize, on: bool) -> Result<()> {
    if ctx.hook().mode() == Mode::Plain || on == ctx.has_control_vector() {
        return Ok(());
    }
    if on {
        let steering = ctx.hook().steering();
        let data = steering.as_control_vector(n_embd);
        let (first, last) = (steering.first_layer() as i32, *steering.layers.last().expect("steered layers") as i32);
        ctx.set_control_vector(Some((&data, n_embd, first, last)))?;
    } else {
        ctx.set_control_vector(None)?;
    }
    ctx.hook_mut().set_shifter(if on { Shifter::ControlVector } else { Shifter::Hook });
    Ok(())
}

/// Who adds the shift to the rows of steered requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shifter {
    /// The hook, row by row, inside the graph.
    Hook,
    /// Nobody: the gate-only first pass over a prompt whose gate layer comes
    /// after a steered layer (a flagged prompt is then decoded again, shifted).
    GateOnly,
    /// llama.cpp's own control vector, when every row of the batch is steered.
    ControlVector,
}

/// What the gate said about one request.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GateDecision {
    pub score: f32,
    pub harmful: bool,
    pub layer: usize,
}

/// Where a request's conversation leaves the template's opening, and where
/// its last user turn starts (the same for one turn).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequestStart {
    pub conversation: usize,
    pub last_turn: usize,
}

impl RequestStart {
    /// A request read as one turn from `start`.
    pub fn at(start: usize) -> RequestStart {
        RequestStart { conversation: start, last_turn: start }
    }
}

/// Per-sequence state of a request.
#[derive(Clone, Debug, Default)]
struct Request {
    /// Its last prompt token is in a coming batch and must be gated.
    awaiting_gate: bool,
    /// Where its request starts: request terms read from there on.
    start: RequestStart,
    /// Each gate term's value so far: the sum of its token projections, or
    /// the largest projection of a request token (-inf: not read yet; NaN: a
    /// read that failed).
    partial: Vec<f32>,
    /// Each request term's largest projection in the last user turn alone.
    last_turn: Vec<f32>,
    decision: Option<GateDecision>,
}

pub struct SteerHook {
    mode: Mode,
    gate: Option<Gate>,
    steering: Steering,
    shifter: Shifter,
    /// Stop the graph once the gate has read its layer (moderation).
    stop_at_gate: bool,
    /// Leave the rows before each request's start unshifted. Gated mode does:
    /// the templated prefix before it is the same for every request, so it
    /// comes from the prefix cache, decoded once, and a flagged request is not
    /// decoded again.
    from_request: bool,
    /// The chat template's opening: a request starts where its prompt leaves it.
    opening: Vec<i32>,
    /// The template's user header: the last user turn starts after its last occurrence.
    user_header: Vec<i32>,
    requests: Vec<Request>,
    /// Sequence of each token row, and of each output row, in the current batch.
    row_seq: Vec<usize>,
    output_seq: Vec<usize>,
    /// Whether each token row, and each output row, lies in its request (at or after its start).
    row_in_request: Vec<bool>,
    output_in_request: Vec<bool>,
    /// (token row, output row, sequence) of the last prompt tokens this batch
    /// gates, whose decision is taken in it.
    deciding: Vec<(usize, Option<usize>, usize)>,
    /// (token row, sequence, in the last user turn) of the request tokens of
    /// sequences awaiting the gate.
    request_rows: Vec<(usize, usize, bool)>,
}

impl SteerHook {
    /// `gate` is required in gated mode; `n_seq` bounds the sequence ids used.
    pub fn new(mode: Mode, gate: Option<Gate>, steering: Steering, n_seq: usize) -> Result<SteerHook> {
        if mode == Mode::Gated && gate.is_none() {
            bail!("gated mode needs a gate");
        }
        Ok(SteerHook {
            mode,
            gate,
            steering,
            shifter: Shifter::Hook,
            stop_at_gate: false,
            from_request: mode == Mode::Gated,
            opening: Vec::new(),
            user_header: Vec::new(),
            requests: vec![Request::default(); n_seq],
            row_seq: Vec::new(),
            output_seq: Vec::new(),
            row_in_request: Vec::new(),
            output_in_request: Vec::new(),
            deciding: Vec::new(),
            request_rows: Vec::new(),
        })
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    pub fn gate(&self) -> Option<&Gate> {
        self.gate.as_ref()
    }

    pub fn steering(&self) -> &Steering {
        &self.steering
    }

    /// Tokens every prompt of this guard's chat template opens with
    /// ([`Template::opening`](crate::prompts::Template::opening)); without
    /// them a request is its whole prompt.
    pub fn set_opening(&mut self, opening: Vec<i32>) {
        self.opening = opening;
    }

    pub fn opening(&self) -> &[i32] {
        &self.opening
    }

    /// The template's user header ([`Template::user_header`](crate::prompts::Template::user_header)):
    /// without it the last user turn is the whole request.
    pub fn set_user_header(&mut self, header: Vec<i32>) {
        self.user_header = header;
    }

    /// Where the request starts in `prompt`: where it leaves the template's
    /// opening. Every turn after it is read, so a request cannot hide in an
    /// earlier turn, a system message or text that spells the template's turn
    /// markers; the last user turn is read apart too (see [`Gate::context_floor`]).
    pub fn request_start(&self, prompt: &[i32]) -> RequestStart {
        let conversation = common_prefix(prompt, &self.opening);
        RequestStart { conversation, last_turn: request_start(prompt, &self.user_header).max(conversation) }
    }

    /// A new request starts on `seq` at `start`: its next output token is its
    /// last prompt token, where the gate decides.
    pub fn begin_request(&mut self, seq: usize, start: RequestStart) -> Result<()> {
        let gated = self.mode == Mode::Gated;
        self.begin(seq, start, gated)
    }

    /// `seq` is gated and never shifted, whatever the mode (moderation).
    pub fn begin_gate_only(&mut self, seq: usize, start: RequestStart) -> Result<()> {
        let gated = self.gate.is_some();
        self.begin(seq, start, gated)
    }

    fn begin(&mut self, seq: usize, start: RequestStart, gated: bool) -> Result<()> {
        let partial = self.gate.as_ref().map_or(Vec::new(), |g| vec![f32::NEG_INFINITY; g.terms.len()]);
        let last_turn = partial.clone();
        *self.request_mut(seq)? = Request { awaiting_gate: gated, start, partial, last_turn, decision: None };
        Ok(())
    }

    pub fn decision(&self, seq: usize) -> Option<GateDecision> {
        self.requests.get(seq).and_then(|r| r.decision)
    }

    /// The gate's decision on `seq` if it could score it (no failed read).
    pub fn scored_decision(&self, seq: usize) -> Option<GateDecision> {
        self.decision(seq).filter(|d| d.score.is_finite())
    }

    /// In gated mode, whether the gate has not (yet) decided on `seq`, or
    /// could not score it (a failed read): such a request must not be answered.
    pub fn undecided(&self, seq: usize) -> bool {
        self.mode == Mode::Gated && self.scored_decision(seq).is_none()
    }

    /// Layers the model's graph must show the hook: the gate layer, then every steered layer.
    pub fn needed_layers(&self) -> Vec<usize> {
        match (self.mode, &self.gate) {
            (Mode::Plain, _) => Vec::new(),
            (Mode::Gated, Some(gate)) => gate.layers().into_iter().chain(self.steering.layers.iter().copied()).collect(),
            _ => self.steering.layers.clone(),
        }
    }

    fn request_mut(&mut self, seq: usize) -> Result<&mut Request> {
        let n_seq = self.requests.len();
        self.requests
            .get_mut(seq)
            .with_context(|| format!("sequence id {seq} is outside the guard's 0..{n_seq}"))
    }

    /// Whether rows of `seq` are shifted from now on.
    pub fn is_steered(&self, seq: usize) -> bool {
        match self.mode {
            Mode::Plain => false,
            Mode::Always => true,
            Mode::Gated => self.decision(seq).is_some_and(|d| d.harmful),
        }
    }

    /// Whether one pass can gate and steer a prompt of `n_tokens`: the gate
    /// must decide at or before the first steered layer (at a layer it both
    /// reads and shifts, the hook reads first), and the prompt must fit one
    /// batch, so the decision precedes every shift.
    fn single_pass(&self, n_tokens: usize, n_batch: usize) -> bool {
        match (&self.gate, self.mode) {
            (Some(gate), Mode::Gated) => gate.layer() <= self.steering.first_layer() && n_tokens <= n_batch,
            _ => true,
        }
    }

    /// Who shifts a prompt pass whose longest new prompt has `n_tokens`: the
    /// hook when one pass can gate before it steers; otherwise nobody, and
    /// the flagged prompts are decoded again ([`SteerHook::decode_again`]).
    pub fn prompt_shifter(&self, n_tokens: usize, n_batch: usize) -> Shifter {
        if self.single_pass(n_tokens, n_batch) { Shifter::Hook } else { Shifter::GateOnly }
    }

    /// Whether request `seq` is decoded again, shifted throughout, after a
    /// prompt pass by `shifter` that reused `cached` rows: its gate fired after
    /// some steered layers had run, or over cached rows that needed a shift.
    pub fn decode_again(&self, seq: usize, shifter: Shifter, cached: usize) -> bool {
        (shifter == Shifter::GateOnly || cached > self.unshifted(seq)) && self.is_steered(seq)
    }

    /// Rows of request `seq` a second, shifted pass keeps: the `cached` ones
    /// (whole, from the prefix cache) when none of them takes the shift.
    pub fn kept_again(&self, seq: usize, cached: usize) -> usize {
        if cached > self.unshifted(seq) { 0 } else { cached }
    }

    /// Leading rows of request `seq` that are never shifted.
    fn unshifted(&self, seq: usize) -> usize {
        if self.from_request { self.requests.get(seq).map_or(0, |r| r.start.conversation) } else { 0 }
    }

    /// Whether rows before each request's start stay unshifted (gated mode's
    /// default; the steering check sets it to steer as gated mode does).
    pub fn set_shift_from_request(&mut self, on: bool) {
        self.from_request = on;
    }

    /// Whether a decode step of `seqs` hands the shift to llama.cpp's control
    /// vector: every row is steered, and the vector is already set (`holding`)
    /// or every answer has [`HANDOFF_MIN_TOKENS`] left (`left`).
    pub fn hands_off(&self, seqs: &[usize], holding: bool, left: impl Fn(usize) -> usize) -> bool {
        seqs.iter().all(|&s| self.is_steered(s)) && (holding || seqs.iter().all(|&s| left(s) >= HANDOFF_MIN_TOKENS))
    }

    /// Replaces the steering vectors and strength (between runs).
    pub fn set_steering(&mut self, steering: Steering) {
        self.steering = steering;
    }

    pub fn set_shifter(&mut self, shifter: Shifter) {
        self.shifter = shifter;
    }

    /// For passes that only gate: llama.cpp may skip every layer after the gate's.
    pub fn set_stop_at_gate(&mut self, stop: bool) {
        self.stop_at_gate = stop;
    }

    fn steers_any_row(&self) -> bool {
        self.row_seq.iter().any(|&s| self.is_steered(s))
    }

    /// Whether the gate reads anything at `layer` in this batch.
    fn gates_here(&self, layer: usize) -> bool {
        let Some(gate) = &self.gate else { return false };
        let decides = layer == gate.layer() && !self.deciding.is_empty();
        decides
            || gate.terms.iter().any(|t| {
                t.layer == layer && if t.read == Read::RequestMax { !self.request_rows.is_empty() } else { !self.deciding.is_empty() }
            })
    }

    /// Adds what the gate's terms at `layer` read in this batch to each
    /// request's partial values; at the gate's own layer, decides.
    fn run_gate(&mut self, layer: usize, out: &mut LayerOutput) -> Result<()> {
        let Some(gate) = self.gate.take() else { return Ok(()) };
        let result = self.read_terms(&gate, layer, out);
        if result.is_ok() && layer == gate.layer() {
            for &(_, _, seq) in &self.deciding {
                let request = &mut self.requests[seq];
                // A term that read nothing (no request token, a missing row) is NaN: harmful.
                let score = gate.score(&request.partial, &request.last_turn);
                request.awaiting_gate = false;
                request.decision = Some(GateDecision { score, harmful: Gate::is_harmful(score), layer });
            }
            self.deciding.clear();
        }
        self.gate = Some(gate);
        result
    }

    fn read_terms(&mut self, gate: &Gate, layer: usize, out: &mut LayerOutput) -> Result<()> {
        let n_embd = out.n_embd();
        let all_rows = self.holds_all_rows(out)?;
        let (deciding, request_rows, row_seq, requests) = (&self.deciding, &self.request_rows, &self.row_seq, &mut self.requests);
        out.read(|data| {
            let n_rows = data.len() / n_embd.max(1);
            let row = |r: usize| (r < n_rows).then(|| &data[r * n_embd..(r + 1) * n_embd]);
            for (t, term) in gate.terms.iter().enumerate().filter(|(_, t)| t.layer == layer) {
                match &term.read {
                    Read::Tokens(offsets) => {
                        for &(token_row, output_row, seq) in deciding {
                            for (k, &o) in offsets.iter().enumerate() {
                                // The last layer keeps only output rows: there only the last token is there.
                                let r = if all_rows { token_row.checked_sub(o) } else { output_row.filter(|_| o == 0) };
                                let same_seq = r.is_some_and(|r| !all_rows || row_seq.get(r) == Some(&seq));
                                let v = r.filter(|_| same_seq).and_then(row).map_or(f32::NAN, |a| term.project(k, a));
                                let p = &mut requests[seq].partial[t];
                                *p = if *p == f32::NEG_INFINITY { v } else { *p + v };
                            }
                        }
                    }
                    Read::RequestMax => {
                        for &(r, seq, in_last_turn) in request_rows {
                            let v = all_rows.then(|| row(r)).flatten().map_or(f32::NAN, |a| term.project(0, a));
                            let request = &mut requests[seq];
                            let most = |p: &mut f32| *p = if v.is_nan() || p.is_nan() { f32::NAN } else { p.max(v) };
                            most(&mut request.partial[t]);
                            if in_last_turn {
                                most(&mut request.last_turn[t]);
                            }
                        }
                    }
                }
            }
        });
        Ok(())
    }

    /// Whether `out` holds every token row of the planned batch (true) or its
    /// output rows only (false). llama.cpp's own cvector-generator checks the
    /// same: any other shape is an error, or a read or a shift could land on
    /// another request.
    fn holds_all_rows(&self, out: &LayerOutput) -> Result<bool> {
        match out.rows() {
            n if n == self.row_seq.len() => Ok(true),
            n if n == self.output_seq.len() => Ok(false),
            n => bail!("the tensor has {n} rows, but the planned batch has {} tokens and {} outputs", self.row_seq.len(), self.output_seq.len()),
        }
    }

    fn apply_shift(&self, shift: &[f32], out: &mut LayerOutput) -> Result<()> {
        let n_embd = out.n_embd();
        let (seqs, in_request) = if self.holds_all_rows(out)? {
            (&self.row_seq, &self.row_in_request)
        } else {
            (&self.output_seq, &self.output_in_request)
        };
        if shift.len() != n_embd {
            bail!("the shift has {} values for rows of {n_embd}", shift.len());
        }
        out.modify(|data| {
            for (row, (&seq, &inside)) in seqs.iter().zip(in_request).enumerate() {
                if self.is_steered(seq) && (inside || !self.from_request) {
                    for (x, s) in data[row * n_embd..(row + 1) * n_embd].iter_mut().zip(shift) {
                        *x += s;
                    }
                }
            }
        });
        Ok(())
    }
}

impl LayerHook for SteerHook {
    // The scheduler asks about each node only after computing (and calling
    // back on) every node before it, so a gate that fired at an earlier layer
    // of this same graph is already visible here.
    fn wants(&mut self, layer: usize) -> bool {
        let shift_here = self.shifter == Shifter::Hook && self.steering.shift(layer).is_some() && self.steers_any_row();
        self.gates_here(layer) || shift_here
    }

    // A gate-only prompt pass whose every row is flagged uses nothing past the
    // gate: each of its requests is decoded again, shifted.
    fn stop_after(&self, layer: usize) -> bool {
        let all_again = self.shifter == Shifter::GateOnly && self.row_seq.iter().all(|&s| self.is_steered(s));
        (self.stop_at_gate || all_again) && self.gate.as_ref().is_some_and(|g| g.layer() == layer)
    }

    fn on_layer(&mut self, layer: usize, out: &mut LayerOutput) -> Result<()> {
        if self.gates_here(layer) {
            self.run_gate(layer, out)?;
        }
        match (self.shifter == Shifter::Hook, self.steering.shift(layer)) {
            (true, Some(shift)) => self.apply_shift(shift, out),
            _ => Ok(()),
        }
    }
}

impl BatchAware for SteerHook {
    fn plan(&mut self, batch: &dyn BatchLayout, _: &Reads) -> Result<()> {
        self.row_seq.clear();
        self.output_seq.clear();
        self.row_in_request.clear();
        self.output_in_request.clear();
        self.deciding.clear();
        self.request_rows.clear();
        let reads_request = self.gate.as_ref().is_some_and(Gate::reads_request);
        for row in 0..batch.len() {
            let seq = usize::try_from(batch.seq(row))
                .ok()
                .filter(|&s| s < self.requests.len());
            let seq = seq.with_context(|| {
                format!(
                    "token {row} is in sequence {}, outside the guard's 0..{}",
                    batch.seq(row),
                    self.requests.len()
                )
            })?;
            self.row_seq.push(seq);
            let request = &self.requests[seq];
            let pos = usize::try_from(batch.pos(row)).ok();
            let inside = pos.is_some_and(|p| p >= request.start.conversation);
            self.row_in_request.push(inside);
            if request.awaiting_gate && reads_request && inside {
                self.request_rows.push((row, seq, pos.is_some_and(|p| p >= request.start.last_turn)));
            }
            if batch.is_output(row) {
                if request.awaiting_gate {
                    // The gate decides at the last prompt token; rows it reads
                    // that are not in this batch are NaN (harmful).
                    self.deciding.push((row, Some(self.output_seq.len()), seq));
                }
                self.output_seq.push(seq);
                self.output_in_request.push(inside);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gate::Term;
    use std::collections::BTreeMap;

    /// A batch described by (sequence, output) per token.
    struct Rows(Vec<(i32, bool)>);

    impl BatchLayout for Rows {
        fn len(&self) -> usize {
            self.0.len()
        }
        fn seq(&self, i: usize) -> i32 {
            self.0[i].0
        }
        fn is_output(&self, i: usize) -> bool {
            self.0[i].1
        }
        fn pos(&self, i: usize) -> i32 {
            // Positions count within each sequence.
            self.0[..i].iter().filter(|r| r.0 == self.0[i].0).count() as i32
        }
    }

    fn hook(offset: usize, n_seq: usize) -> SteerHook {
        let directions: BTreeMap<usize, Vec<f32>> = (1..4).map(|l| (l, vec![1.0, 0.0])).collect();
        let file = VectorFile { model_hint: String::new(), layer_count: 3, n_embd: 2, directions, steering: BTreeMap::new(), calibration: None, defaults: None };
        let steering = Steering::new(&file, Strength::Alpha(1.0), &[2, 3], 4).unwrap();
        let gate = Gate::single(1, offset, vec![1.0, 0.0], 0.0);
        SteerHook::new(Mode::Gated, Some(gate), steering, n_seq).unwrap()
    }

    #[test]
    fn the_shift_policy_decodes_again_and_hands_off_only_when_it_should() {
        let mut h = hook(0, 3);
        let flagged = Request { decision: Some(GateDecision { score: 1.0, harmful: true, layer: 1 }), ..Request::default() };
        h.requests[0] = flagged.clone();
        // The gate (layer 1) comes before the steered layers (2, 3): one pass, if the prompt fits a batch.
        assert_eq!(h.prompt_shifter(64, 64), Shifter::Hook);
        assert_eq!(h.prompt_shifter(65, 64), Shifter::GateOnly);
        // At a layer it both reads and shifts, the hook reads first.
        for (gate_layer, shifter) in [(2, Shifter::Hook), (3, Shifter::GateOnly)] {
            let mut at = hook(0, 1);
            at.gate = Some(Gate::single(gate_layer, 0, vec![1.0, 0.0], 0.0));
            assert_eq!(at.prompt_shifter(64, 64), shifter, "gate at layer {gate_layer}, steered layers 2 and 3");
        }
        assert!(!h.decode_again(0, Shifter::Hook, 0));
        assert!(h.decode_again(0, Shifter::GateOnly, 0));
        assert!(h.decode_again(0, Shifter::Hook, 5), "cached rows of the request were never shifted");
        h.requests[0].start = RequestStart::at(5);
        assert!(!h.decode_again(0, Shifter::Hook, 5), "the rows before the request are never shifted");
        assert!(h.decode_again(0, Shifter::Hook, 6));
        assert!(!h.decode_again(1, Shifter::GateOnly, 5), "an unflagged request stands");
        assert_eq!(h.kept_again(0, 5), 5, "the cached rows before the request stand");
        assert_eq!(h.kept_again(0, 6), 0, "a cached request row must be shifted");
        h.set_shift_from_request(false);
        assert_eq!(h.kept_again(0, 5), 0, "every row is shifted");
        h.set_shift_from_request(true);
        let left = |seq: usize| if seq == 0 { HANDOFF_MIN_TOKENS } else { 10 };
        assert!(h.hands_off(&[0], false, left));
        assert!(!h.hands_off(&[0, 1], true, left), "an unsteered row keeps the shift in the hook");
        h.requests[2] = flagged;
        assert!(!h.hands_off(&[0, 2], false, left), "a short answer does not pay for the switch");
        assert!(h.hands_off(&[0, 2], true, left), "a vector already set stays");
    }

    #[test]
    fn a_gate_only_pass_stops_at_the_gate_only_when_every_row_is_decoded_again() {
        let mut h = hook(0, 3);
        let flagged = Request { decision: Some(GateDecision { score: 1.0, harmful: true, layer: 1 }), ..Request::default() };
        h.requests[0] = flagged.clone();
        h.requests[2] = flagged;
        h.set_shifter(Shifter::GateOnly);
        h.plan(&Rows(vec![(0, false), (0, true), (2, true)]), &Reads::NONE).unwrap();
        assert!(h.stop_after(1), "every row is decoded again: nothing past the gate (layer 1) is used");
        assert!(!h.stop_after(2), "only at the gate's layer");
        h.plan(&Rows(vec![(0, true), (1, true)]), &Reads::NONE).unwrap();
        assert!(!h.stop_after(1), "an unflagged request's answer needs every layer");
        h.set_shifter(Shifter::Hook);
        h.plan(&Rows(vec![(0, true)]), &Reads::NONE).unwrap();
        assert!(!h.stop_after(1), "a shifted pass is the answer's own");
    }

    #[test]
    fn each_request_is_gated_on_its_own_row_of_a_shared_batch() {
        let mut h = hook(1, 3);
        h.gate.as_mut().unwrap().terms.push(Term { layer: 1, read: Read::RequestMax, weights: vec![0.0, 1.0] });
        h.begin_request(0, RequestStart::at(1)).unwrap();
        // Sequence 2's last user turn is its second token.
        h.begin_request(2, RequestStart { conversation: 0, last_turn: 1 }).unwrap();
        // Sequence 0: three prompt tokens; sequence 1: a decoding step; sequence 2: two prompt tokens.
        let batch = Rows(vec![(0, false), (0, false), (0, true), (1, true), (2, false), (2, true)]);
        h.plan(&batch, &Reads::NONE).unwrap();
        assert_eq!(h.row_seq, vec![0, 0, 0, 1, 2, 2]);
        assert_eq!(h.output_seq, vec![0, 1, 2]);
        // Each last prompt token decides; sequence 1 is not awaiting a gate.
        assert_eq!(h.deciding, vec![(2, Some(0), 0), (5, Some(2), 2)]);
        // Request tokens from each request's start (sequence 0's starts at its second token).
        assert_eq!(h.request_rows, vec![(1, 0, true), (2, 0, true), (4, 2, false), (5, 2, true)]);
        // Offset 1 reads the token before the last; a token outside the
        // batch (sequence 1's only token has none before it) reads NaN.
        let mut data = [0.0, 0.0, 3.0, -1.0, 2.0, 5.0, 9.0, 9.0, -4.0, 0.5, 1.0, 0.25];
        let mut scratch = Vec::new();
        h.read_terms(&h.gate.clone().unwrap(), 1, &mut LayerOutput::from_host_rows(&mut data, 2, &mut scratch)).unwrap();
        assert_eq!(h.requests[0].partial, vec![3.0, 5.0], "token 1 projects 3; the request's largest is token 2's 5");
        assert_eq!(h.requests[2].partial, vec![-4.0, 0.5]);
        assert_eq!(h.requests[2].last_turn[1], 0.25, "its last turn alone reads only token 1");
        h.begin_request(1, RequestStart::at(0)).unwrap();
        h.plan(&Rows(vec![(1, true)]), &Reads::NONE).unwrap();
        h.run_gate(1, &mut LayerOutput::from_host_rows(&mut [1.0, 1.0], 2, &mut scratch)).unwrap();
        assert!(h.requests[1].partial[0].is_nan(), "a gated token outside the batch is harmful");
        assert!(h.decision(1).is_some_and(|d| d.harmful) && h.undecided(1), "and no score to answer on");
    }

    #[test]
    fn gated_mode_shifts_a_flagged_request_from_its_start_and_always_mode_everywhere() {
        for (mode, expected) in [(Mode::Gated, [0.0, 0.0, 1.0, 1.0, 0.0]), (Mode::Always, [1.0; 5])] {
            let mut h = hook(0, 2);
            h.mode = mode;
            h.from_request = mode == Mode::Gated;
            h.begin_request(0, RequestStart::at(2)).unwrap();
            h.requests[0].decision = Some(GateDecision { score: 1.0, harmful: true, layer: 1 });
            h.begin_request(1, RequestStart::at(0)).unwrap();
            h.requests[1].decision = Some(GateDecision { score: -1.0, harmful: false, layer: 1 });
            // Four rows of the flagged sequence 0 (its request starts at position 2), then one of sequence 1.
            h.plan(&Rows(vec![(0, false), (0, false), (0, false), (0, true), (1, true)]), &Reads::NONE).unwrap();
            let mut data = [0.0; 10];
            let mut scratch = Vec::new();
            h.apply_shift(&[1.0, 0.0], &mut LayerOutput::from_host_rows(&mut data, 2, &mut scratch)).unwrap();
            let shifted: Vec<f32> = data.chunks(2).map(|r| r[0]).collect();
            assert_eq!(shifted, expected, "{mode:?}");
        }
    }

    #[test]
    fn sequence_ids_outside_the_guard_are_errors() {
        let mut h = hook(0, 2);
        assert!(h.begin_request(2, RequestStart::at(0)).is_err());
        assert!(h.plan(&Rows(vec![(0, true), (7, true)]), &Reads::NONE).unwrap_err().to_string().contains("sequence 7"));
        assert!(h.plan(&Rows(vec![(-1, true)]), &Reads::NONE).is_err());
        assert!(h.undecided(0) && !h.is_steered(0), "a gated request with no decision is never served as harmless");
        assert_eq!(h.needed_layers(), vec![1, 2, 3]);
    }

    #[test]
    fn layer_lists_print_as_they_parse() {
        for spec in ["3,5,7", "14-18", "1,3-5,9", "2"] {
            assert_eq!(format_layers(&parse_layers(spec).unwrap()), spec);
        }
        assert!(parse_layers("5-3").is_err());
        assert!(parse_layers("1-18446744073709551615").is_err());
        assert!(parse_layers("1-2000000000").unwrap_err().to_string().contains("no model has"));
        assert!(parse_layers("").is_err());
    }
}
