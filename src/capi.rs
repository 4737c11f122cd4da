//! C ABI: drop the gate and the shift into any llama.cpp application.
//! See `include/inferalign.h` for the contract; `examples/c/guard.c` uses it.

use std::ffi::{c_char, c_float, c_int, CStr};
use std::path::Path;

use anyhow::{bail, Context as _, Result};

use crate::gate::Gate;
use crate::llama::{foreign_model_dims, BatchLayout, ForeignBatch, ForeignHook};
use crate::steer::{parse_layers, Mode, SteerHook, Steering};
use crate::capture::BatchAware;
use crate::vectors::{Strength, VectorFile};

/// Opaque to C.
pub struct InferalignGuard {
    hook: ForeignHook<SteerHook>,
}

unsafe fn opt_str<'a>(p: *const c_char) -> Result<Option<&'a str>> {
    if p.is_null() {
        return Ok(None);
    }
    Ok(Some(CStr::from_ptr(p).to_str().context("a string argument is not UTF-8")?))
}

fn write_error(err: &anyhow::Error, buf: *mut c_char, len: usize) {
    if buf.is_null() || len == 0 {
        return;
    }
    let msg = format!("{err:#}");
    let n = msg.len().min(len - 1);
    // SAFETY: the caller gave `len` writable bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(msg.as_ptr(), buf as *mut u8, n);
        *buf.add(n) = 0;
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
    let (n_embd, n_layer) = foreign_model_dims(model);
    let gate_path = opt_str(gate_path)?.context("gate_path is NULL")?;
    let gate_file = VectorFile::read(Path::new(gate_path))?;
    gate_file.check_dims(n_embd, n_layer).with_context(|| format!("{gate_path} does not fit the model"))?;
    let steer_file = match opt_str(steer_path)? {
        Some(p) => {
            let f = VectorFile::read(Path::new(p))?;
            f.check_dims(n_embd, n_layer).with_context(|| format!("{p} does not fit the model"))?;
            f
        }
        None => gate_file.clone(),
    };
    let defaults = steer_file.defaults.clone().or_else(|| gate_file.defaults.clone());
    let strength = if alpha.is_nan() {
        defaults.as_ref().map(|d| d.strength).context("no alpha given and no steering defaults in the vector file")?
    } else {
        Strength::Alpha(alpha)
    };
    let layers = match opt_str(layers)? {
        Some(spec) => parse_layers(spec)?,
        None => defaults.map(|d| d.layers).context("no layers given and none in the vector file")?,
    };
    let mode = match mode {
        0 => Mode::Plain,
        1 => Mode::Gated,
        2 => Mode::Always,
        m => bail!("unknown mode {m} (0 plain, 1 gated, 2 always)"),
    };
    let gate = Gate::from_file(&gate_file, None, None)?;
    let steering = Steering::new(&steer_file, strength, &layers, n_layer)?;
    let hook = SteerHook::new(mode, Some(gate), steering, n_seq.max(1) as usize)?;
    Ok(Box::new(InferalignGuard { hook: ForeignHook::new(hook) }))
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
    match new_guard(model, gate_path, steer_path, alpha, layers, mode, n_seq) {
        Ok(guard) => Box::into_raw(guard),
        Err(e) => {
            write_error(&e, err, err_len);
            std::ptr::null_mut()
        }
    }
}

/// # Safety
/// See `include/inferalign.h`.
#[no_mangle]
pub unsafe extern "C" fn inferalign_guard_install(guard: *mut InferalignGuard, params: *mut llama_cpp_sys_2::llama_context_params) {
    if let (Some(guard), false) = (guard.as_mut(), params.is_null()) {
        guard.hook.install(params);
    }
}

/// # Safety
/// See `include/inferalign.h`.
#[no_mangle]
pub unsafe extern "C" fn inferalign_guard_begin_request(guard: *mut InferalignGuard, seq: i32) {
    if let Some(guard) = guard.as_mut() {
        guard.hook.hook_mut().begin_request(seq.max(0) as usize);
    }
}

/// # Safety
/// See `include/inferalign.h`.
#[no_mangle]
pub unsafe extern "C" fn inferalign_guard_before_decode(guard: *mut InferalignGuard, batch: *const llama_cpp_sys_2::llama_batch) {
    if let (Some(guard), Some(batch)) = (guard.as_mut(), batch.as_ref()) {
        let layout = ForeignBatch::new(batch);
        let layout: &dyn BatchLayout = &layout;
        guard.hook.hook_mut().plan(layout, &[]);
    }
}

/// # Safety
/// See `include/inferalign.h`.
#[no_mangle]
pub unsafe extern "C" fn inferalign_guard_decision(guard: *const InferalignGuard, seq: i32, score: *mut c_float) -> c_int {
    let Some(guard) = guard.as_ref() else { return -1 };
    match guard.hook.hook().decision(seq.max(0) as usize) {
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
