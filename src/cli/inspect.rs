//! `inferalign inspect`: what a vector file holds.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use inferalign::vectors::{Calibration, VectorFile};

#[derive(Args)]
pub struct InspectArgs {
    /// Vector file (GGUF control vector)
    file: PathBuf,
    /// Print one JSON object instead of tables
    #[arg(long)]
    json: bool,
}

pub fn run(args: InspectArgs) -> Result<()> {
    let file = VectorFile::read(&args.file)?;
    if args.json {
        let mut value = serde_json::to_value(&file)?;
        let norms: serde_json::Map<String, serde_json::Value> =
            file.directions.iter().map(|(l, v)| (l.to_string(), norm(v).into())).collect();
        value["direction_norms"] = norms.into();
        value["path"] = args.file.display().to_string().into();
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    println!("file:        {}", args.file.display());
    println!("model hint:  {}", file.model_hint);
    println!("layer count: {}", file.layer_count);
    println!("n_embd:      {}", file.n_embd);
    let layers = file.layers();
    println!("directions:  {} (layers {}..={})", layers.len(), layers[0], layers[layers.len() - 1]);
    let Some(cal) = &file.calibration else {
        println!("calibration: none (a plain control vector, e.g. from llama.cpp's cvector-generator)");
        println!("\nlayer   |direction|");
        for (l, v) in &file.directions {
            println!("{l:>5}   {:>11.4}", norm(v));
        }
        return Ok(());
    };
    println!("kind:        {} (inferalign {})", cal.kind, cal.tool_version);
    let m = &cal.model;
    println!("model:       {} ({}), {} layers, n_embd {}", m.name, m.architecture, m.n_layer, m.n_embd);
    println!("model file:  {} bytes, sha256 {}", m.file_size, m.sha256);
    for (class, set) in [("harmful", &cal.data.harmful), ("harmless", &cal.data.harmless)] {
        println!(
            "{class:<9}    {} prompts ({} train, {} held out) from {} sha256 {}",
            set.count, set.train, set.held_out, set.file, set.sha256
        );
    }
    println!("template:    {}", cal.data.template);
    if let Some(system) = &cal.data.system_prompt {
        println!("system:      {system}");
    }
    if let Some(seed) = cal.data.seed {
        println!("seed:        {seed}");
    }
    if let Some(rho) = cal.robust_rho {
        println!("robust:      bias and layer certified against activation changes up to L2 norm {rho} (calibrate --robust)");
    }
    print_layer_table(cal);
    Ok(())
}

fn norm(v: &[f32]) -> f32 {
    v.iter().map(|x| x * x).sum::<f32>().sqrt()
}

/// Per-layer gate table on stdout, the gate layer marked.
pub fn print_layer_table(cal: &Calibration) {
    println!("\nlayer  accuracy    TPR     FPR     |s_l|   mean |a|     bias");
    for s in &cal.layers {
        let mark = if s.layer == cal.gate_layer { "  <- l0" } else { "" };
        println!(
            "{:>5}  {:>7.1}%  {:>5.1}%  {:>5.1}%  {:>7.3}  {:>8.2}  {:>8.3}{mark}",
            s.layer,
            100.0 * s.accuracy,
            100.0 * s.tpr,
            100.0 * s.fpr,
            s.srv_norm,
            s.mean_norm,
            s.bias
        );
    }
    if let Some(s) = cal.layer(cal.gate_layer) {
        println!(
            "gate layer l0 = {}: accuracy {:.1}%, TPR {:.1}%, FPR {:.1}% on held-out prompts",
            cal.gate_layer,
            100.0 * s.accuracy,
            100.0 * s.tpr,
            100.0 * s.fpr
        );
    }
}
