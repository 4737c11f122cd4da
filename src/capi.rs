//! C ABI: drop the gate and the shift into any llama.cpp application.
//! See `include/inferalign.h` for the contract; `examples/c/guard.c` uses it.
//! Every entry point checks what C hands it and catches panics: an error is a
//! return code and a message from `inferalign_guard_last_error`, never an abort.

use std::ffi::{c_char, c_float, c_int, CStr, CString};

use anyhow::{bail, Context as _, Result};

use crate::capture::{BatchAware, Reads};
use crate::guard::{GuardConfig, ModelShape};
use crate::llama::{foreign_model_arch, foreign_model_dims, BatchLayout, ForeignBatch, ForeignHook};
use crate::steer::{parse_layers, Mode, RequestStart, SteerHook};
use crate::vectors::Strength;

/// Most sequences one guard tracks: llama.cpp's own `LLAMA_MAX_SEQ`.
const MAX_SEQ: usize = 256;

/// Opaque to C.
pub struct InferalignGuard {
    hook: ForeignHook<SteerHook>,
    /// The `n_batch` (= `n_ubatch`) of the one context it is installed in.
    n_batch: Option<usize>,
    last_error: CString,
}

unsafe fn opt_str<'a>(p: *const c_char) -> Result<Option<&'a str>> {
    if p.is_null() {
        return Ok(None);
    }
    Ok(Some(CStr::from_ptr(p).to_str().context("a string argument is not UTF-8")?))
}

fn write_error(msg: &str, buf: *mut c_char, len: usize) {
    if buf.is_null() || len == 0 {
        return;
    }
    let n = msg.len().min(len - 1);
    // SAFETY: the caller gave `len` writable bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(msg.as_ptr(), buf as *mut u8, n);
        *buf.add(n) = 0;
    }
}

/// Runs `f` on the guard: 0 on success; -1 with the message kept for
/// `inferalign_guard_last_error` on an error or a panic.
unsafe fn with_guard(
    guard: *mut InferalignGuard,
    f: impl FnOnce(&mut InferalignGuard) -> Result<()>,
) -> c_int {
    let Some(guard) = guard.as_mut() else {
        return -1;
    };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(guard)))
        .unwrap_or_else(|_| Err(anyhow::anyhow!("inferalign panicked; please report this")));
    match result {
        Ok(()) => 0,
        Err(e) => {
            guard.last_error =
                CString::new(format!("{e:#}").replace('\0', " ")).unwrap_or_default();
            -1
        }
    }
}

#[allow(clippy::too_many_arguments)]
unsafe fn new_guard(
    model: *const llama_cpp_sys_2::llama_model,
    gate_path: *const c_char,
    steer_path: *const c_char,
    alpha: c_float,
    layers: *const c_char,
    mode: c_int,
    n_seq: c_int,
) -> Result<Box<InferalignGuard>> {
    if model.is_null() {
        bail!("model is NULL");
    }
    let n_seq = usize::try_from(n_seq)
        .ok()
        .filter(|n| (1..=MAX_SEQ).contains(n))
        .with_context(|| format!("n_seq is {n_seq}; use 1..={MAX_SEQ}"))?;
    let (n_embd, n_layer) = foreign_model_dims(model);
    let shape = ModelShape { n_embd, n_layer, arch: foreign_model_arch(model), path: None };
    let mode = match mode {
        0 => Mode::Plain,
        1 => Mode::Gated,
        2 => Mode::Always,
        m => bail!("unknown mode {m} (0 plain, 1 gated, 2 always)"),
    };
    let config = GuardConfig {
        gate: Some(opt_str(gate_path)?.context("gate_path is NULL")?.into()),
        steer: opt_str(steer_path)?.map(Into::into),
        strength: (!alpha.is_nan()).then_some(Strength::Alpha(alpha)),
        layers: opt_str(layers)?.map(parse_layers).transpose()?,
        mode,
        ..GuardConfig::default()
    };
    let hook = config.resolve(&shape)?.hook(n_seq)?;
    Ok(Box::new(InferalignGuard {
        hook: ForeignHook::new(hook),
        n_batch: None,
        last_error: CString::default(),
    }))
}

/// # Safety
/// See `include/inferalign.h`.
#[no_mangle]
pub unsafe extern "C" fn inferalign_guard_new(
    model: *const llama_cpp_sys_2::llama_model,
    gate_path: *const c_char,
    steer_path: *const c_char,
    alpha: c_float,
    layers: *const c_char,
    mode: c_int,
    n_seq: c_int,
    err: *mut c_char,
    err_len: usize,
) -> *mut InferalignGuard {
    let made = std::panic::catch_unwind(|| {
        new_guard(model, gate_path, steer_path, alpha, layers, mode, n_seq)
    })
    .unwrap_or_else(|_| Err(anyhow::anyhow!("inferalign panicked; please report this")));
    match made {
        Ok(guard) => Box::into_raw(guard),
        Err(e) => {
            write_error(&format!("{e:#}"), err, err_len);
            std::ptr::null_mut()
        }
    }
}

/// # Safety
/// See `include/inferalign.h`.
#[no_mangle]
pub unsafe extern "C" fn inferalign_guard_install(
    guard: *mut InferalignGuard,
    params: *mut llama_cpp_sys_2::llama_context_params,
) -> c_int {
    with_guard(guard, |g| {
        let Some(p) = params.as_mut() else {
            bail!("params is NULL")
        };
        if g.n_batch.is_some() {
            bail!("this guard is already installed in a context; create one guard per context");
        }
        // One ubatch per batch and one KV stream keep llama.cpp from splitting
        // or regrouping rows, so batch rows are the rows the hook sees.
        p.n_ubatch = p.n_batch;
        p.kv_unified = true;
        g.n_batch = Some(p.n_batch as usize);
        g.hook.install(p);
        Ok(())
    })
}

/// # Safety
/// See `include/inferalign.h`.
#[no_mangle]
pub unsafe extern "C" fn inferalign_guard_begin_request(
    guard: *mut InferalignGuard,
    seq: i32,
) -> c_int {
    inferalign_guard_begin_request_at(guard, seq, 0)
}

/// # Safety
/// See `include/inferalign.h`.
#[no_mangle]
pub unsafe extern "C" fn inferalign_guard_begin_request_at(
    guard: *mut InferalignGuard,
    seq: i32,
    request_pos: i32,
) -> c_int {
    with_guard(guard, |g| {
        let seq = usize::try_from(seq).with_context(|| format!("sequence id {seq} is negative"))?;
        let start = usize::try_from(request_pos).with_context(|| format!("request position {request_pos} is negative"))?;
        g.hook.hook_mut().begin_request(seq, RequestStart::at(start))
    })
}

/// # Safety
/// See `include/inferalign.h`.
#[no_mangle]
pub unsafe extern "C" fn inferalign_guard_before_decode(
    guard: *mut InferalignGuard,
    batch: *const llama_cpp_sys_2::llama_batch,
) -> c_int {
    with_guard(guard, |g| {
        let Some(batch) = batch.as_ref() else {
            bail!("batch is NULL")
        };
        let n_batch = g
            .n_batch
            .context("install the guard in the context's parameters before decoding")?;
        let n_tokens = usize::try_from(batch.n_tokens).unwrap_or(0);
        if n_tokens > n_batch {
            bail!("the batch has {n_tokens} tokens, more than the context's n_batch {n_batch}");
        }
        if !batch.n_seq_id.is_null() && (0..n_tokens).any(|i| *batch.n_seq_id.add(i) > 1) {
            bail!("a token belongs to several sequences; the guard needs one sequence per token");
        }
        g.hook.take_failure();
        g.hook
            .hook_mut()
            .plan(&ForeignBatch::new(batch) as &dyn BatchLayout, &Reads::NONE)
    })
}

/// # Safety
/// See `include/inferalign.h`.
#[no_mangle]
pub unsafe extern "C" fn inferalign_guard_after_decode(guard: *mut InferalignGuard) -> c_int {
    with_guard(guard, |g| {
        if let Some(why) = g.hook.take_failure() {
            bail!("the guard could not run on the last batch: {why}");
        }
        if let Some(layer) = g.hook.unseen(&g.hook.hook().needed_layers()) {
            bail!("layer {layer}'s output (l_out-{layer}) never reached the guard in this model's graph, so it cannot gate or steer there");
        }
        Ok(())
    })
}

/// # Safety
/// See `include/inferalign.h`.
#[no_mangle]
pub unsafe extern "C" fn inferalign_guard_last_error(
    guard: *const InferalignGuard,
) -> *const c_char {
    guard
        .as_ref()
        .map_or(c"guard is NULL".as_ptr(), |g| g.last_error.as_ptr())
}

/// # Safety
/// See `include/inferalign.h`.
#[no_mangle]
pub unsafe extern "C" fn inferalign_guard_decision(
    guard: *const InferalignGuard,
    seq: i32,
    score: *mut c_float,
) -> c_int {
    let Some(guard) = guard.as_ref() else {
        return -1;
    };
    let Ok(seq) = usize::try_from(seq) else {
        return -1;
    };
    match guard.hook.hook().decision(seq) {
        Some(d) => {
            if let Some(score) = score.as_mut() {
                *score = d.score;
            }
            d.harmful as c_int
        }
        None => -1,
    }
}

/// # Safety
/// See `include/inferalign.h`.
#[no_mangle]
pub unsafe extern "C" fn inferalign_guard_free(guard: *mut InferalignGuard) {
    if !guard.is_null() {
        drop(Box::from_raw(guard));
    }
}
