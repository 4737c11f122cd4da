//! Every `unsafe` call into llama.cpp lives here, behind a safe interface.
//!
//! llama-cpp-2 loads the model, tokenizes and applies chat templates. It cannot
//! install an eval callback nor apply control vectors, so contexts, batches,
//! decoding and GGUF I/O go through llama-cpp-sys-2 directly.

use std::ffi::{c_void, CStr, CString};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context as _, Result};
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_sys_2 as sys;

static BACKEND: OnceLock<LlamaBackend> = OnceLock::new();

// `Model::load` hands llama-cpp-2 a raw model pointer as a `LlamaModel`; a
// release that changes its layout must fail to build, not at run time.
const _: () =
    assert!(std::mem::size_of::<LlamaModel>() == std::mem::size_of::<NonNull<sys::llama_model>>());

/// The process-wide llama.cpp backend. llama.cpp's own logging is silenced
/// unless `INFERALIGN_LLAMA_LOG` is set, so our errors stay readable.
pub fn backend() -> &'static LlamaBackend {
    BACKEND.get_or_init(|| match LlamaBackend::init() {
        Ok(mut backend) => {
            if std::env::var_os("INFERALIGN_LLAMA_LOG").is_none() {
                backend.void_logs();
            }
            backend
        }
        // A host in this process already initialised llama.cpp through
        // llama-cpp-2: it stays the host's. This token only proves it, and as
        // a static it is never dropped, so it never frees the host's backend.
        Err(_) => LlamaBackend {},
    })
}

/// A loaded GGUF model, with the LoRA adapters every context of it applies.
pub struct Model {
    inner: LlamaModel,
    pub path: PathBuf,
    /// LoRA adapters and their scales, in the order given.
    adapters: Vec<(NonNull<sys::llama_adapter_lora>, f32)>,
}

// SAFETY: llama.cpp models and adapters are read-only once loaded; contexts on
// several threads may share them.
unsafe impl Send for Model {}
unsafe impl Sync for Model {}

/// How to load a model.
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    pub n_gpu_layers: u32,
    /// Let the CPU backend repack weights for faster matmuls (llama.cpp's
    /// default). Its kernels then round differently with the number of rows in
    /// a batch, so activations depend slightly on what else is in the batch.
    pub weight_repack: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { n_gpu_layers: 0, weight_repack: true }
    }
}

impl Model {
    pub fn load(path: &Path, n_gpu_layers: u32) -> Result<Model> {
        Model::load_with(path, LoadOptions { n_gpu_layers, ..LoadOptions::default() })
    }

    pub fn load_with(path: &Path, options: LoadOptions) -> Result<Model> {
        if !path.is_file() {
            bail!("model file {} does not exist", path.display());
        }
        backend();
        let cpath = CString::new(path.as_os_str().as_encoded_bytes()).context("model path contains a NUL byte")?;
        // SAFETY: plain struct of defaults; llama-cpp-2 has no setter for use_extra_bufts.
        let mut params = unsafe { sys::llama_model_default_params() };
        params.n_gpu_layers = options.n_gpu_layers.min(i32::MAX as u32) as i32;
        params.use_extra_bufts = options.weight_repack;
        let raw = unsafe { sys::llama_model_load_from_file(cpath.as_ptr(), params) };
        let raw = NonNull::new(raw).ok_or_else(|| {
            anyhow!("cannot load model {} (is it a complete, valid GGUF model?)", path.display())
        })?;
        // SAFETY: `LlamaModel` is `#[repr(transparent)]` over a non-null
        // `llama_model` pointer that it frees on drop; we hand it ownership.
        let inner: LlamaModel = unsafe { std::mem::transmute::<NonNull<sys::llama_model>, LlamaModel>(raw) };
        Ok(Model { inner, path: path.to_path_buf(), adapters: Vec::new() })
    }

    /// Adds a LoRA adapter (llama.cpp's LoRA GGUF), applied with `scale` by
    /// every context made from now on.
    pub fn add_lora(&mut self, path: &Path, scale: f32) -> Result<()> {
        if !path.is_file() {
            bail!("LoRA adapter {} does not exist", path.display());
        }
        let cpath = CString::new(path.as_os_str().as_encoded_bytes()).context("adapter path contains a NUL byte")?;
        // SAFETY: the model is loaded; llama.cpp frees its adapters with it.
        let adapter = unsafe { sys::llama_adapter_lora_init(self.raw(), cpath.as_ptr()) };
        let adapter = NonNull::new(adapter).ok_or_else(|| {
            anyhow!(
                "cannot load LoRA adapter {} for {} (is it a llama.cpp LoRA GGUF made for this model's architecture and shapes?)",
                path.display(),
                self.path.display()
            )
        })?;
        self.adapters.push((adapter, scale));
        Ok(())
    }

    /// The safe llama-cpp-2 handle, for tokenizing and chat templates.
    pub fn llama(&self) -> &LlamaModel {
        &self.inner
    }

    pub fn n_embd(&self) -> usize {
        self.inner.n_embd() as usize
    }

    pub fn n_layer(&self) -> usize {
        self.inner.n_layer() as usize
    }

    pub fn n_vocab(&self) -> usize {
        self.inner.n_vocab() as usize
    }

    pub fn meta(&self, key: &str) -> Option<String> {
        self.inner.meta_val_str(key).ok()
    }

    fn raw(&self) -> *mut sys::llama_model {
        // SAFETY: `LlamaModel` is `#[repr(transparent)]` over a non-null
        // `llama_model` pointer, so its first (and only) word is that pointer.
        unsafe { *(&self.inner as *const LlamaModel as *const *mut sys::llama_model) }
    }
}

/// One graph node that a [`LayerHook`] asked to see: the output of a
/// transformer block (`l_out-<layer>`), `[n_embd, rows]`, F32.
pub struct LayerOutput<'a> {
    tensor: *mut sys::ggml_tensor,
    n_embd: usize,
    rows: usize,
    scratch: &'a mut Vec<f32>,
    /// The rows, when they are in host memory.
    host: Option<*mut f32>,
}

impl<'a> LayerOutput<'a> {
    /// Rows already in host memory, as a graph callback would see them (for hook tests).
    pub fn from_host_rows(data: &'a mut [f32], n_embd: usize, scratch: &'a mut Vec<f32>) -> LayerOutput<'a> {
        LayerOutput { tensor: std::ptr::null_mut(), n_embd, rows: data.len() / n_embd.max(1), scratch, host: Some(data.as_mut_ptr()) }
    }

    pub fn n_embd(&self) -> usize {
        self.n_embd
    }

    /// Rows in this ubatch: every token, except in the last layer where
    /// llama.cpp keeps only the rows of tokens that requested output.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Reads the rows (row-major, `rows * n_embd`).
    pub fn read<R>(&mut self, f: impl FnOnce(&[f32]) -> R) -> R {
        let len = self.rows * self.n_embd;
        if let Some(data) = self.host {
            // SAFETY: host buffer, contiguous F32 checked by the trampoline.
            f(unsafe { std::slice::from_raw_parts(data, len) })
        } else {
            self.scratch.resize(len, 0.0);
            // SAFETY: synchronous copy of exactly the tensor's bytes.
            unsafe {
                sys::ggml_backend_tensor_get(self.tensor, self.scratch.as_mut_ptr() as *mut c_void, 0, len * 4)
            };
            f(self.scratch)
        }
    }

    /// Edits the rows in place; what is written flows into every later node.
    pub fn modify<R>(&mut self, f: impl FnOnce(&mut [f32]) -> R) -> R {
        let len = self.rows * self.n_embd;
        if let Some(data) = self.host {
            // SAFETY: as in `read`; nothing else touches the tensor while the
            // scheduler waits for this callback.
            f(unsafe { std::slice::from_raw_parts_mut(data, len) })
        } else {
            self.scratch.resize(len, 0.0);
            unsafe {
                sys::ggml_backend_tensor_get(self.tensor, self.scratch.as_mut_ptr() as *mut c_void, 0, len * 4)
            };
            let result = f(self.scratch);
            unsafe {
                sys::ggml_backend_tensor_set(self.tensor, self.scratch.as_ptr() as *const c_void, 0, len * 4)
            };
            result
        }
    }
}

/// Observes and edits block outputs while llama.cpp computes a graph.
pub trait LayerHook {
    /// Asked once per graph node named `l_out-<layer>`; each `true` costs a sync point.
    fn wants(&mut self, layer: usize) -> bool;
    /// Called with the computed block output, before any later node runs. An
    /// error (a batch that does not match the plan) fails the decode.
    fn on_layer(&mut self, layer: usize, out: &mut LayerOutput) -> Result<()>;
    /// Whether llama.cpp may skip the rest of the graph after `layer` (its
    /// scheduler stops a split when the callback says no): for passes whose
    /// logits and deeper cache are never used.
    fn stop_after(&self, _layer: usize) -> bool {
        false
    }
}

/// Two hooks on one graph: the first edits, the second sees its edits.
impl<A: LayerHook, B: LayerHook> LayerHook for (A, B) {
    fn wants(&mut self, layer: usize) -> bool {
        let first = self.0.wants(layer);
        self.1.wants(layer) || first
    }

    fn on_layer(&mut self, layer: usize, out: &mut LayerOutput) -> Result<()> {
        self.0.on_layer(layer, out)?;
        self.1.on_layer(layer, out)
    }

    fn stop_after(&self, layer: usize) -> bool {
        self.0.stop_after(layer) && self.1.stop_after(layer)
    }
}

/// A context with no eval callback at all: plain llama.cpp.
pub struct NoHook;

impl LayerHook for NoHook {
    fn wants(&mut self, _: usize) -> bool {
        false
    }
    fn on_layer(&mut self, _: usize, _: &mut LayerOutput) -> Result<()> {
        Ok(())
    }
}

struct HookCell<H> {
    hook: H,
    scratch: Vec<f32>,
    force_device_copy: bool,
    /// Why the hook could not do its work in the current decode; the decode
    /// reports it instead of returning unguarded results.
    failure: Option<String>,
    /// Block outputs (`l_out-<layer>`) this model's graph has shown the hook.
    seen: Vec<bool>,
}

/// The hook's heap cell, owned through a raw pointer: llama.cpp holds the same
/// pointer as callback user data, and a `Box` reborrowed after handing it out
/// would alias it.
struct CellPtr<H>(NonNull<HookCell<H>>);

impl<H> CellPtr<H> {
    fn new(hook: H, force_device_copy: bool) -> Self {
        let cell = HookCell {
            hook,
            scratch: Vec::new(),
            force_device_copy,
            failure: None,
            seen: Vec::new(),
        };
        CellPtr(NonNull::from(Box::leak(Box::new(cell))))
    }

    fn user_data(&self) -> *mut c_void {
        self.0.as_ptr() as *mut c_void
    }

    fn get(&self) -> &HookCell<H> {
        // SAFETY: owned by self; llama.cpp only uses it during a decode, which
        // takes `&mut` of the owner, so no other borrow is live then.
        unsafe { self.0.as_ref() }
    }

    fn get_mut(&mut self) -> &mut HookCell<H> {
        unsafe { self.0.as_mut() }
    }
}

impl<H> Drop for CellPtr<H> {
    fn drop(&mut self) {
        // SAFETY: made by Box::leak in `new`, freed once.
        drop(unsafe { Box::from_raw(self.0.as_ptr()) })
    }
}

impl<H> HookCell<H> {
    fn fail(&mut self, why: String) {
        self.failure.get_or_insert(why);
    }

    fn mark_seen(&mut self, layer: usize) {
        if layer >= self.seen.len() {
            self.seen.resize(layer + 1, false);
        }
        self.seen[layer] = true;
    }

    /// The first of `layers` the graph never showed the hook, if any.
    fn unseen(&self, layers: &[usize]) -> Option<usize> {
        layers
            .iter()
            .copied()
            .find(|&l| !self.seen.get(l).copied().unwrap_or(false))
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

fn layer_of(name: &[std::os::raw::c_char; 64]) -> Option<usize> {
    const PREFIX: &[u8] = b"l_out-";
    // SAFETY: ggml names are NUL-terminated within their 64 bytes.
    let name = unsafe { CStr::from_ptr(name.as_ptr()) }.to_bytes();
    let digits = name.strip_prefix(PREFIX)?;
    std::str::from_utf8(digits).ok()?.parse().ok()
}

// A panic must not unwind into llama.cpp: it is caught, recorded as the
// decode's failure, and the hook asks for nothing more in this graph.
unsafe extern "C" fn trampoline<H: LayerHook>(
    t: *mut sys::ggml_tensor,
    ask: bool,
    user_data: *mut c_void,
) -> bool {
    let cell = &mut *(user_data as *mut HookCell<H>);
    let tensor = &*t;
    let Some(layer) = layer_of(&tensor.name) else {
        return !ask;
    };
    if ask {
        cell.mark_seen(layer);
        if cell.failure.is_some() {
            return false;
        }
        let wants =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cell.hook.wants(layer)));
        return wants.unwrap_or_else(|p| {
            cell.fail(format!(
                "the hook panicked at layer {layer}: {}",
                panic_message(&*p)
            ));
            false
        });
    }
    let contiguous_f32 = tensor.type_ == sys::GGML_TYPE_F32 && tensor.nb[0] == 4 && tensor.nb[1] == 4 * tensor.ne[0] as usize;
    if !contiguous_f32 {
        cell.fail(format!(
            "layer {layer}'s output is not a contiguous f32 tensor, so the hook cannot read it"
        ));
        return true;
    }
    let host = !cell.force_device_copy
        && !tensor.buffer.is_null()
        && sys::ggml_backend_buffer_is_host(tensor.buffer);
    let HookCell { hook, scratch, .. } = &mut *cell;
    let mut out = LayerOutput {
        tensor: t,
        n_embd: tensor.ne[0] as usize,
        rows: tensor.ne[1] as usize,
        scratch,
        host: host.then_some(tensor.data as *mut f32),
    };
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| hook.on_layer(layer, &mut out).map(|()| hook.stop_after(layer)))) {
        Ok(Ok(stop)) => return !stop,
        Ok(Err(e)) => cell.fail(format!("layer {layer}: {e:#}")),
        Err(p) => cell.fail(format!(
            "the hook panicked at layer {layer}: {}",
            panic_message(&*p)
        )),
    }
    true
}

/// A hook owned outside any [`Context`], for applications that create their
/// llama.cpp context themselves (the C ABI).
pub struct ForeignHook<H: LayerHook> {
    cell: CellPtr<H>,
}

impl<H: LayerHook> ForeignHook<H> {
    pub fn new(hook: H) -> Self {
        ForeignHook {
            cell: CellPtr::new(hook, false),
        }
    }

    /// Why the last decode could not be hooked as planned, clearing it.
    pub fn take_failure(&mut self) -> Option<String> {
        self.cell.get_mut().failure.take()
    }

    /// The first of `layers` the model's graph has not shown the hook.
    pub fn unseen(&self, layers: &[usize]) -> Option<usize> {
        self.cell.get().unseen(layers)
    }

    pub fn hook(&self) -> &H {
        &self.cell.get().hook
    }

    pub fn hook_mut(&mut self) -> &mut H {
        &mut self.cell.get_mut().hook
    }

    /// Points the context parameters' eval callback at this hook.
    ///
    /// # Safety
    /// `params` must be valid; the hook must outlive every context created
    /// from them, and must not be touched while such a context decodes.
    pub unsafe fn install(&mut self, params: *mut sys::llama_context_params) {
        (*params).cb_eval = Some(trampoline::<H>);
        (*params).cb_eval_user_data = self.cell.user_data();
    }
}

/// Width and depth of a model owned by an application (C ABI).
///
/// # Safety
/// `model` must be a valid, loaded `llama_model`.
pub unsafe fn foreign_model_dims(model: *const sys::llama_model) -> (usize, usize) {
    (sys::llama_model_n_embd(model) as usize, sys::llama_model_n_layer(model) as usize)
}

/// `general.architecture` of a model owned by an application (C ABI).
///
/// # Safety
/// `model` must be a valid, loaded `llama_model`.
pub unsafe fn foreign_model_arch(model: *const sys::llama_model) -> String {
    let mut buf = [0u8; 128];
    let n = sys::llama_model_meta_val_str(model, c"general.architecture".as_ptr(), buf.as_mut_ptr() as *mut std::os::raw::c_char, buf.len());
    usize::try_from(n).ok().filter(|&n| n < buf.len()).map_or_else(String::new, |n| String::from_utf8_lossy(&buf[..n]).into_owned())
}

#[derive(Clone, Debug)]
pub struct ContextParams {
    pub n_ctx: u32,
    pub n_batch: u32,
    pub n_seq_max: u32,
    pub n_threads: i32,
    /// Flash attention on or off; None lets llama.cpp decide.
    pub flash_attn: Option<bool>,
    /// Read and write hooked tensors through the backend copy functions even
    /// when they live in host memory, to exercise the GPU path on CPU.
    pub force_device_copy: bool,
    /// One KV cache for all sequences, so they can share a decoded prefix; off
    /// gives each sequence its own KV stream, so a request's attention sums run
    /// over the same cells whatever else is in the batch.
    pub kv_unified: bool,
}

impl Default for ContextParams {
    fn default() -> Self {
        ContextParams {
            n_ctx: 4096,
            n_batch: 512,
            n_seq_max: 64,
            n_threads: default_threads(),
            flash_attn: None,
            force_device_copy: false,
            kv_unified: true,
        }
    }
}

pub fn default_threads() -> i32 {
    std::thread::available_parallelism().map(|n| n.get() as i32).unwrap_or(4)
}

/// A llama.cpp context whose graph callback is `H`.
pub struct Context<'m, H: LayerHook> {
    raw: NonNull<sys::llama_context>,
    cell: CellPtr<H>,
    n_batch: usize,
    n_seq_max: usize,
    kv_unified: bool,
    control_vector: bool,
    decodes: usize,
    _model: PhantomData<&'m Model>,
}

#[derive(Debug)]
pub enum DecodeError {
    /// No room left in the KV cache for this batch.
    NoKvSlot,
    Failed(i32),
    /// The hook could not gate or steer this batch as planned.
    Hook(String),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::NoKvSlot => write!(f, "no room left in the context (KV cache) for this batch"),
            DecodeError::Failed(code) => write!(
                f,
                "llama_decode failed with code {code} ({}); set INFERALIGN_LLAMA_LOG=1 to see llama.cpp's log",
                match code {
                    -1 => "invalid batch",
                    2 => "aborted",
                    -2 | -3 => "could not allocate or compute the graph",
                    _ => "see llama.h",
                }
            ),
            DecodeError::Hook(why) => write!(f, "the guard could not run on this batch: {why}"),
        }
    }
}

impl std::error::Error for DecodeError {}

impl<'m, H: LayerHook> Context<'m, H> {
    /// `with_callback = false` creates a context with no eval callback, as
    /// plain llama.cpp does (the hook then never runs).
    pub fn new(
        model: &'m Model,
        params: &ContextParams,
        hook: H,
        with_callback: bool,
    ) -> Result<Self> {
        let cell = CellPtr::new(hook, params.force_device_copy);
        // SAFETY: plain struct of defaults.
        let mut raw_params = unsafe { sys::llama_context_default_params() };
        raw_params.n_ctx = params.n_ctx;
        raw_params.n_batch = params.n_batch;
        // One ubatch per batch keeps row order simple; split_simple preserves
        // order anyway when a batch is larger.
        raw_params.n_ubatch = params.n_batch;
        raw_params.n_seq_max = params.n_seq_max;
        raw_params.n_threads = params.n_threads;
        raw_params.n_threads_batch = params.n_threads;
        raw_params.kv_unified = params.kv_unified;
        raw_params.no_perf = true;
        raw_params.flash_attn_type = match params.flash_attn {
            None => sys::LLAMA_FLASH_ATTN_TYPE_AUTO,
            Some(false) => sys::LLAMA_FLASH_ATTN_TYPE_DISABLED,
            Some(true) => sys::LLAMA_FLASH_ATTN_TYPE_ENABLED,
        };
        if with_callback {
            raw_params.cb_eval = Some(trampoline::<H>);
            raw_params.cb_eval_user_data = cell.user_data();
        }
        // SAFETY: the model outlives the context ('m); the callback's user data
        // is boxed, so it does not move while the context lives.
        let raw = unsafe { sys::llama_init_from_model(model.raw(), raw_params) };
        let raw = NonNull::new(raw).ok_or_else(|| {
            anyhow!("llama.cpp could not create a context (n_ctx {}, n_batch {}); try a smaller --ctx-size", params.n_ctx, params.n_batch)
        })?;
        if !model.adapters.is_empty() {
            let (mut adapters, mut scales): (Vec<*mut sys::llama_adapter_lora>, Vec<f32>) =
                model.adapters.iter().map(|(a, s)| (a.as_ptr(), *s)).unzip();
            // SAFETY: the adapters belong to this context's model; llama.cpp copies both arrays.
            let rc = unsafe { sys::llama_set_adapters_lora(raw.as_ptr(), adapters.as_mut_ptr(), adapters.len(), scales.as_mut_ptr()) };
            if rc != 0 {
                unsafe { sys::llama_free(raw.as_ptr()) };
                bail!("llama.cpp could not apply the LoRA adapters (code {rc})");
            }
        }
        Ok(Context {
            raw,
            cell,
            n_batch: params.n_batch as usize,
            n_seq_max: params.n_seq_max as usize,
            kv_unified: params.kv_unified,
            control_vector: false,
            decodes: 0,
            _model: PhantomData,
        })
    }

    pub fn hook(&self) -> &H {
        &self.cell.get().hook
    }

    pub fn hook_mut(&mut self) -> &mut H {
        &mut self.cell.get_mut().hook
    }

    /// The first of `layers` whose block output this context's graph has not
    /// shown the hook (all of them without a callback).
    pub fn unseen(&self, layers: &[usize]) -> Option<usize> {
        self.cell.get().unseen(layers)
    }

    pub fn n_ctx(&self) -> usize {
        unsafe { sys::llama_n_ctx(self.raw.as_ptr()) as usize }
    }

    pub fn n_batch(&self) -> usize {
        self.n_batch
    }

    pub fn kv_unified(&self) -> bool {
        self.kv_unified
    }

    pub fn n_seq_max(&self) -> usize {
        self.n_seq_max
    }

    pub fn decode(&mut self, batch: &mut Batch) -> std::result::Result<(), DecodeError> {
        // SAFETY: the batch is valid for its n_tokens; the hook cell is only
        // touched by the callback on this thread during the call.
        let rc = unsafe { sys::llama_decode(self.raw.as_ptr(), batch.raw) };
        self.decodes += 1;
        if let Some(why) = self.cell.get_mut().failure.take() {
            return Err(DecodeError::Hook(why));
        }
        match rc {
            0 => Ok(()),
            1 => Err(DecodeError::NoKvSlot),
            code => Err(DecodeError::Failed(code)),
        }
    }

    /// `llama_decode` calls made so far.
    pub fn decodes(&self) -> usize {
        self.decodes
    }

    fn memory(&self) -> sys::llama_memory_t {
        unsafe { sys::llama_get_memory(self.raw.as_ptr()) }
    }

    pub fn clear_memory(&mut self) {
        unsafe { sys::llama_memory_clear(self.memory(), true) }
    }

    /// Removes positions `[p0, p1)` of `seq` (`-1` = to the end).
    pub fn seq_rm(&mut self, seq: i32, p0: i32, p1: i32) {
        unsafe { sys::llama_memory_seq_rm(self.memory(), seq, p0, p1) };
    }

    /// Shares positions `[p0, p1)` of `src` with `dst` (no copy in a unified cache).
    pub fn seq_cp(&mut self, src: i32, dst: i32, p0: i32, p1: i32) {
        unsafe { sys::llama_memory_seq_cp(self.memory(), src, dst, p0, p1) }
    }

    /// Logits of the `i`-th token of the last batch (must have requested output).
    pub fn logits(&self, i: i32) -> &[f32] {
        let (ptr, n_vocab) = self.logits_raw(i);
        // SAFETY: llama.cpp keeps n_vocab logits for that output until the next decode.
        unsafe { std::slice::from_raw_parts(ptr, n_vocab) }
    }

    /// The same logits, to change before sampling (they are this context's until the next decode).
    pub fn logits_mut(&mut self, i: i32) -> &mut [f32] {
        let (ptr, n_vocab) = self.logits_raw(i);
        // SAFETY: as `logits`; `&mut self` keeps every other view away.
        unsafe { std::slice::from_raw_parts_mut(ptr, n_vocab) }
    }

    fn logits_raw(&self, i: i32) -> (*mut f32, usize) {
        let n_vocab = unsafe { sys::llama_vocab_n_tokens(sys::llama_model_get_vocab(sys::llama_get_model(self.raw.as_ptr()))) };
        let ptr = unsafe { sys::llama_get_logits_ith(self.raw.as_ptr(), i) };
        assert!(!ptr.is_null(), "token {i} of the last batch did not request logits");
        (ptr, n_vocab as usize)
    }

    /// llama.cpp's own control vector: `data` holds layers 1..n_layer, n_embd each;
    /// applied to layers `il_start..=il_end`. `None` clears it.
    pub fn set_control_vector(&mut self, data: Option<(&[f32], usize, i32, i32)>) -> Result<()> {
        let rc = match data {
            Some((data, n_embd, il_start, il_end)) => unsafe {
                sys::llama_set_adapter_cvec(self.raw.as_ptr(), data.as_ptr(), data.len(), n_embd as i32, il_start, il_end)
            },
            None => unsafe { sys::llama_set_adapter_cvec(self.raw.as_ptr(), std::ptr::null(), 0, 0, -1, -1) },
        };
        if rc != 0 {
            bail!("llama.cpp rejected the control vector (code {rc})");
        }
        self.control_vector = data.is_some();
        Ok(())
    }

    pub fn has_control_vector(&self) -> bool {
        self.control_vector
    }
}

impl<H: LayerHook> Drop for Context<'_, H> {
    fn drop(&mut self) {
        unsafe { sys::llama_free(self.raw.as_ptr()) }
    }
}

/// Which sequence each token of a batch belongs to, and which request output.
pub trait BatchLayout {
    fn len(&self) -> usize;
    fn seq(&self, i: usize) -> i32;
    /// Position of token `i` in its sequence.
    fn pos(&self, i: usize) -> i32;
    /// Whether token `i` requested output (logits, and a row in the last layer).
    fn is_output(&self, i: usize) -> bool;
}

/// A `llama_batch` owned by an application (C ABI).
pub struct ForeignBatch<'a>(&'a sys::llama_batch);

impl<'a> ForeignBatch<'a> {
    /// # Safety
    /// `batch` must be a valid `llama_batch` whose arrays hold `n_tokens` entries.
    pub unsafe fn new(batch: &'a sys::llama_batch) -> Self {
        ForeignBatch(batch)
    }
}

impl BatchLayout for ForeignBatch<'_> {
    fn len(&self) -> usize {
        self.0.n_tokens.max(0) as usize
    }

    fn seq(&self, i: usize) -> i32 {
        // llama.cpp's rule: no seq_id array means sequence 0.
        if self.0.seq_id.is_null() || self.0.n_seq_id.is_null() {
            return 0;
        }
        unsafe { if *self.0.n_seq_id.add(i) > 0 { **self.0.seq_id.add(i) } else { 0 } }
    }

    fn pos(&self, i: usize) -> i32 {
        // No pos array: the guard cannot tell where a request starts, so it reads every token.
        if self.0.pos.is_null() {
            return i32::MAX;
        }
        unsafe { *self.0.pos.add(i) }
    }

    fn is_output(&self, i: usize) -> bool {
        // llama.cpp's rule: no logits array means only the last token outputs.
        if self.0.logits.is_null() {
            return i + 1 == self.len();
        }
        unsafe { *self.0.logits.add(i) != 0 }
    }
}

/// Tokens for one `llama_decode`, one sequence id per token.
pub struct Batch {
    raw: sys::llama_batch,
    capacity: usize,
}

impl Batch {
    pub fn new(capacity: usize) -> Batch {
        let raw = unsafe { sys::llama_batch_init(capacity as i32, 0, 1) };
        Batch { raw, capacity }
    }

    pub fn is_empty(&self) -> bool {
        self.raw.n_tokens == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn clear(&mut self) {
        self.raw.n_tokens = 0;
    }

    pub fn add(&mut self, token: i32, pos: i32, seq: i32, output: bool) {
        let i = self.raw.n_tokens as usize;
        assert!(i < self.capacity, "batch capacity {} exceeded", self.capacity);
        // SAFETY: llama_batch_init allocated `capacity` entries, one seq id each.
        unsafe {
            *self.raw.token.add(i) = token;
            *self.raw.pos.add(i) = pos;
            *self.raw.n_seq_id.add(i) = 1;
            **self.raw.seq_id.add(i) = seq;
            *self.raw.logits.add(i) = output as i8;
        }
        self.raw.n_tokens += 1;
    }
}

impl BatchLayout for Batch {
    fn len(&self) -> usize {
        self.raw.n_tokens as usize
    }

    fn seq(&self, i: usize) -> i32 {
        assert!(i < self.len());
        // SAFETY: within n_tokens, each with one seq id.
        unsafe { **self.raw.seq_id.add(i) }
    }

    fn is_output(&self, i: usize) -> bool {
        assert!(i < self.len());
        unsafe { *self.raw.logits.add(i) != 0 }
    }

    fn pos(&self, i: usize) -> i32 {
        assert!(i < self.len());
        unsafe { *self.raw.pos.add(i) }
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        unsafe { sys::llama_batch_free(self.raw) }
    }
}

/// A metadata value in a GGUF file, for the types we read and write.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    Str(String),
    U32(u32),
    U64(u64),
    F32(f32),
    F32Array(Vec<f32>),
    U32Array(Vec<u32>),
    Other,
}

/// A GGUF file read whole through llama.cpp's gguf API.
pub struct GgufFile {
    gguf: NonNull<sys::gguf_context>,
    tensors: *mut sys::ggml_context,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<GgufFile> {
        if !path.is_file() {
            bail!("{} does not exist", path.display());
        }
        let cpath = CString::new(path.as_os_str().as_encoded_bytes()).context("path contains a NUL byte")?;
        let mut tensors: *mut sys::ggml_context = std::ptr::null_mut();
        let params = sys::gguf_init_params { no_alloc: false, ctx: &mut tensors };
        let gguf = unsafe { sys::gguf_init_from_file(cpath.as_ptr(), params) };
        let gguf = NonNull::new(gguf)
            .ok_or_else(|| anyhow!("{} is not a readable GGUF file (corrupt or truncated)", path.display()))?;
        Ok(GgufFile { gguf, tensors })
    }

    pub fn keys(&self) -> Vec<String> {
        let n = unsafe { sys::gguf_get_n_kv(self.gguf.as_ptr()) };
        (0..n).map(|i| unsafe { cstr(sys::gguf_get_key(self.gguf.as_ptr(), i)) }).collect()
    }

    pub fn get(&self, key: &str) -> Option<GgufValue> {
        let ckey = CString::new(key).ok()?;
        let ctx = self.gguf.as_ptr();
        let id = unsafe { sys::gguf_find_key(ctx, ckey.as_ptr()) };
        if id < 0 {
            return None;
        }
        // Type checks first: the gguf getters abort on a type mismatch.
        let value = unsafe {
            match sys::gguf_get_kv_type(ctx, id) {
                sys::GGUF_TYPE_STRING => GgufValue::Str(cstr(sys::gguf_get_val_str(ctx, id))),
                sys::GGUF_TYPE_UINT32 => GgufValue::U32(sys::gguf_get_val_u32(ctx, id)),
                sys::GGUF_TYPE_UINT64 => GgufValue::U64(sys::gguf_get_val_u64(ctx, id)),
                sys::GGUF_TYPE_FLOAT32 => GgufValue::F32(sys::gguf_get_val_f32(ctx, id)),
                sys::GGUF_TYPE_ARRAY => {
                    let n = sys::gguf_get_arr_n(ctx, id);
                    let data = sys::gguf_get_arr_data(ctx, id);
                    match sys::gguf_get_arr_type(ctx, id) {
                        sys::GGUF_TYPE_FLOAT32 => GgufValue::F32Array(std::slice::from_raw_parts(data as *const f32, n).to_vec()),
                        sys::GGUF_TYPE_UINT32 => GgufValue::U32Array(std::slice::from_raw_parts(data as *const u32, n).to_vec()),
                        _ => GgufValue::Other,
                    }
                }
                _ => GgufValue::Other,
            }
        };
        Some(value)
    }

    pub fn tensor_names(&self) -> Vec<String> {
        let n = unsafe { sys::gguf_get_n_tensors(self.gguf.as_ptr()) };
        (0..n).map(|i| unsafe { cstr(sys::gguf_get_tensor_name(self.gguf.as_ptr(), i)) }).collect()
    }

    fn tensor(&self, name: &str) -> Result<&sys::ggml_tensor> {
        let cname = CString::new(name)?;
        let t = unsafe { sys::ggml_get_tensor(self.tensors, cname.as_ptr()) };
        if t.is_null() {
            bail!("tensor {name} is missing");
        }
        // SAFETY: owned by the ggml context, which lives as long as `self`.
        Ok(unsafe { &*t })
    }

    /// Any tensor's values as F32 (dequantized), with its shape `ne`.
    pub fn tensor_dequantized(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let tensor = self.tensor(name)?;
        let dims = unsafe { sys::ggml_n_dims(tensor) } as usize;
        let shape: Vec<usize> = tensor.ne[..dims].iter().map(|&n| n as usize).collect();
        let (row_len, rows) = (shape[0], shape[1..].iter().product::<usize>());
        let mut out = vec![0f32; row_len * rows];
        // SAFETY: no_alloc = false loaded the data; rows are contiguous, nb[1] bytes apart.
        unsafe {
            let traits = &*sys::ggml_get_type_traits(tensor.type_);
            for r in 0..rows {
                let src = (tensor.data as *const u8).add(r * tensor.nb[1]);
                let dst = out.as_mut_ptr().add(r * row_len);
                match traits.to_float {
                    Some(to_float) => to_float(src as *const c_void, dst, row_len as i64),
                    None if tensor.type_ == sys::GGML_TYPE_F32 => std::ptr::copy_nonoverlapping(src as *const f32, dst, row_len),
                    None => bail!("tensor {name} has a type ggml cannot dequantize"),
                }
            }
        }
        Ok((out, shape))
    }

    /// A 1-D F32 tensor's values.
    pub fn tensor_f32(&self, name: &str) -> Result<Vec<f32>> {
        let tensor = self.tensor(name)?;
        if tensor.type_ != sys::GGML_TYPE_F32 {
            bail!("tensor {name} is not F32");
        }
        if unsafe { sys::ggml_n_dims(tensor) } != 1 {
            bail!("tensor {name} is not one-dimensional");
        }
        let n = tensor.ne[0] as usize;
        // SAFETY: no_alloc = false loaded the data into the ggml context.
        Ok(unsafe { std::slice::from_raw_parts(tensor.data as *const f32, n) }.to_vec())
    }
}

impl Drop for GgufFile {
    fn drop(&mut self) {
        unsafe {
            sys::gguf_free(self.gguf.as_ptr());
            if !self.tensors.is_null() {
                sys::ggml_free(self.tensors);
            }
        }
    }
}

unsafe fn cstr(p: *const std::os::raw::c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    CStr::from_ptr(p).to_string_lossy().into_owned()
}

/// Builds a GGUF file of metadata and F32 tensors.
pub struct GgufWriter {
    kv: Vec<(String, GgufValue)>,
    /// Name, data, shape (`ne`, innermost first).
    tensors: Vec<(String, Vec<f32>, Vec<i64>)>,
}

impl Default for GgufWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl GgufWriter {
    pub fn new() -> GgufWriter {
        GgufWriter { kv: Vec::new(), tensors: Vec::new() }
    }

    pub fn set(&mut self, key: &str, value: GgufValue) {
        self.kv.push((key.to_string(), value));
    }

    pub fn add_tensor(&mut self, name: &str, data: Vec<f32>) {
        let len = data.len() as i64;
        self.tensors.push((name.to_string(), data, vec![len]));
    }

    /// A matrix of `rows` rows of `row_len` values (`ne = [row_len, rows]`).
    pub fn add_matrix(&mut self, name: &str, data: Vec<f32>, row_len: usize, rows: usize) {
        assert_eq!(data.len(), row_len * rows, "matrix {name}: data does not match its shape");
        self.tensors.push((name.to_string(), data, vec![row_len as i64, rows as i64]));
    }

    /// Writes to a temporary file beside `path`, then renames, so a failure
    /// never leaves a half-written file in place of a good one.
    pub fn write(&self, path: &Path) -> Result<()> {
        let bytes: usize = self.tensors.iter().map(|(_, d, _)| d.len() * 4).sum();
        let mem_size = bytes + (self.tensors.len() + 1) * unsafe { sys::ggml_tensor_overhead() } + 1024;
        let ggml = unsafe {
            sys::ggml_init(sys::ggml_init_params { mem_size, mem_buffer: std::ptr::null_mut(), no_alloc: false })
        };
        if ggml.is_null() {
            bail!("ggml_init failed ({mem_size} bytes)");
        }
        let gguf = unsafe { sys::gguf_init_empty() };
        let result = (|| -> Result<()> {
            for (key, value) in &self.kv {
                let ckey = CString::new(key.as_str())?;
                unsafe {
                    match value {
                        GgufValue::Str(s) => sys::gguf_set_val_str(gguf, ckey.as_ptr(), CString::new(s.as_str())?.as_ptr()),
                        GgufValue::U32(v) => sys::gguf_set_val_u32(gguf, ckey.as_ptr(), *v),
                        GgufValue::U64(v) => sys::gguf_set_val_u64(gguf, ckey.as_ptr(), *v),
                        GgufValue::F32(v) => sys::gguf_set_val_f32(gguf, ckey.as_ptr(), *v),
                        GgufValue::F32Array(v) => sys::gguf_set_arr_data(
                            gguf,
                            ckey.as_ptr(),
                            sys::GGUF_TYPE_FLOAT32,
                            v.as_ptr() as *const c_void,
                            v.len(),
                        ),
                        GgufValue::U32Array(v) => sys::gguf_set_arr_data(
                            gguf,
                            ckey.as_ptr(),
                            sys::GGUF_TYPE_UINT32,
                            v.as_ptr() as *const c_void,
                            v.len(),
                        ),
                        GgufValue::Other => bail!("cannot write an untyped value for {key}"),
                    }
                }
            }
            for (name, data, shape) in &self.tensors {
                let cname = CString::new(name.as_str())?;
                unsafe {
                    let t = sys::ggml_new_tensor(ggml, sys::GGML_TYPE_F32, shape.len() as i32, shape.as_ptr());
                    sys::ggml_set_name(t, cname.as_ptr());
                    std::ptr::copy_nonoverlapping(data.as_ptr(), (*t).data as *mut f32, data.len());
                    sys::gguf_add_tensor(gguf, t);
                }
            }
            crate::output::write_with(path, |tmp| {
                let ctmp = CString::new(tmp.as_os_str().as_encoded_bytes())?;
                if !unsafe { sys::gguf_write_to_file(gguf, ctmp.as_ptr(), false) } {
                    bail!("cannot write {}", tmp.display());
                }
                Ok(())
            })
        })();
        unsafe {
            sys::gguf_free(gguf);
            sys::ggml_free(ggml);
        }
        result
    }
}
