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

/// Per-layer gate table on stdout, the gate layer marked, then its TPR per held-out family.
pub fn print_layer_table(cal: &Calibration) {
    let g = &cal.gate;
    println!("\nlayer  worst family  plain TPR    FPR     |s_l|   mean |a|     bias   (cross-validated; token {} before the last)", g.offset);
    for s in &cal.layers {
        let mark = if s.layer == cal.gate_layer { "  <- l0" } else { "" };
        let pct = |x: f32| if x.is_nan() { "     -".to_string() } else { format!("{:>5.1}%", 100.0 * x) };
        println!(
            "{:>5}  {:>12}  {:>9}  {:>6}  {:>7.3}  {:>8.2}  {:>8.3}{mark}",
            s.layer,
            pct(s.worst_tpr),
            pct(s.tpr),
            pct(s.fpr),
            s.srv_norm,
            s.mean_norm,
            s.bias
        );
    }
    if !g.families.is_empty() {
        println!("\nTPR per family left out of fitting, at l0 = {} and its neighbours:", cal.gate_layer);
        let near: Vec<usize> = cal.layers.iter().map(|s| s.layer).filter(|l| l.abs_diff(cal.gate_layer) <= 2).collect();
        print!("{:<28}", "family");
        near.iter().for_each(|l| print!("{:>8}", format!("L{l}")));
        println!();
        for (name, tpr) in g.families.iter().zip(&g.family_tpr) {
            print!("{name:<28}");
            near.iter().for_each(|&l| print!("{:>8}", tpr.get(l).filter(|x| !x.is_nan()).map_or("-".into(), |x| format!("{:.1}%", 100.0 * x))));
            println!();
        }
    }
    if let Some(s) = cal.layer(cal.gate_layer) {
        println!(
            "gate layer l0 = {}: worst held-out family TPR {:.1}%, plain TPR {:.1}%, FPR {:.1}% (cross-validated)",
            cal.gate_layer,
            100.0 * s.worst_tpr,
            100.0 * s.tpr,
            100.0 * s.fpr
        );
    }
    if let Some((tpr, fpr)) = g.held_out {
        println!("final gate on plain held-out prompts: TPR {:.1}%, FPR {:.1}%", 100.0 * tpr, 100.0 * fpr);
    }
}
