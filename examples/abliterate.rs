//! Test fixture: an "abliterated" fine-tune of a model, as a rank-1 LoRA.
//!
//! Every attention-output and MLP-down projection W writes into the residual
//! stream; `W' = (I - r r^T) W` can no longer write along the refusal
//! direction r (the model's own safety-related vector at one layer, from its
//! SRV file). The change is `-r (W^T r)^T`, rank 1, so it is a LoRA adapter
//! with `lora_b = -r`, `lora_a = W^T r`, alpha = rank = 1.
//!
//! cargo run --release --example abliterate -- MODEL.gguf SRV.gguf OUT.gguf [LAYER]

use std::path::PathBuf;

use anyhow::{bail, Context as _, Result};

use inferalign::llama::{GgufFile, GgufValue, GgufWriter};
use inferalign::vectors::VectorFile;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 {
        bail!("usage: abliterate MODEL.gguf SRV.gguf OUT.gguf [LAYER of the direction, default: the middle layer]");
    }
    let (model_path, srv_path, out) = (PathBuf::from(&args[0]), PathBuf::from(&args[1]), PathBuf::from(&args[2]));
    let model = GgufFile::open(&model_path)?;
    let srv = VectorFile::read(&srv_path)?;
    let arch = match model.get("general.architecture") {
        Some(GgufValue::Str(a)) => a,
        _ => bail!("{} has no general.architecture", model_path.display()),
    };
    let layer = match args.get(3) {
        Some(l) => l.parse().context("LAYER must be a number")?,
        None => srv.layer_count as usize / 2,
    };
    let r = srv.direction(layer)?;
    let norm = r.iter().map(|x| x * x).sum::<f32>().sqrt();
    let r: Vec<f32> = r.iter().map(|x| x / norm).collect();

    let mut writer = GgufWriter::new();
    writer.set("general.architecture", GgufValue::Str(arch));
    writer.set("general.type", GgufValue::Str("adapter".into()));
    writer.set("adapter.type", GgufValue::Str("lora".into()));
    writer.set("adapter.lora.alpha", GgufValue::F32(1.0));
    writer.set("inferalign.abliterated.direction_layer", GgufValue::U32(layer as u32));
    let mut n = 0;
    for name in model.tensor_names() {
        if !(name.ends_with(".attn_output.weight") || name.ends_with(".ffn_down.weight")) {
            continue;
        }
        let (w, shape) = model.tensor_dequantized(&name)?;
        let (n_in, n_out) = (shape[0], shape[1]);
        if n_out != r.len() {
            bail!("{name} writes {n_out} values, but the direction has {}: the SRV is for another model", r.len());
        }
        // W^T r: the rows of W are its outputs, so sum them weighted by r.
        let mut a = vec![0f32; n_in];
        for (row, &weight) in w.chunks_exact(n_in).zip(&r) {
            for (acc, x) in a.iter_mut().zip(row) {
                *acc += weight * x;
            }
        }
        let b: Vec<f32> = r.iter().map(|x| -x).collect();
        let base = name.trim_end_matches(".weight");
        writer.add_matrix(&format!("{base}.weight.lora_a"), a, n_in, 1);
        writer.add_matrix(&format!("{base}.weight.lora_b"), b, 1, n_out);
        n += 1;
    }
    if n == 0 {
        bail!("{} has no attn_output or ffn_down tensors", model_path.display());
    }
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    writer.write(&out)?;
    eprintln!("wrote {} ({n} projections, direction from layer {layer})", out.display());
    Ok(())
}
