//! `inferalign inspect`: what a vector file holds.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use inferalign::gate::{Read, Term};
use inferalign::vectors::{Calibration, VectorFile};

use super::extract::MULTI_TURN_NOTE;

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
        if let Some(cal) = &file.calibration {
            value["calibration"]["gate"]["terms"] = cal.gate.terms.iter().map(Term::describe).collect::<Vec<_>>().into();
        }
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

/// Per-layer gate table on stdout (one-direction probes on the last tokens),
/// then the chosen gate: its terms and its TPR per held-out family.
pub fn print_layer_table(cal: &Calibration) {
    let g = &cal.gate;
    let pct = |x: f32| if x.is_nan() { "     -".to_string() } else { format!("{:>5.1}%", 100.0 * x) };
    println!("\nlayer  worst family  plain TPR    FPR     |s_l|   mean |a|     bias   (last-token probe at each layer, cross-validated)");
    for s in &cal.layers {
        let mark = if g.terms.iter().any(|t| t.layer == s.layer) || (g.terms.is_empty() && s.layer == cal.gate_layer) { "  <- gate" } else { "" };
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
    if g.terms.is_empty() {
        println!("\ngate: one direction at layer {}, token {} before the last", cal.gate_layer, g.offset);
    } else {
        println!("\ngate: {} (decides at layer {}), bias {:.3}", g.terms.iter().map(describe_term).collect::<Vec<_>>().join(" + "), cal.gate_layer, g.bias.unwrap_or(f32::NAN));
        match g.context_floor {
            Some(floor) => println!("earlier turns: read when the last-token terms sum above {floor:.3}, else the last user turn alone (harmless requests after a harmful turn, out of fold)"),
            None => println!("earlier turns: always read"),
        }
    }
    let chosen = g.chosen.as_ref().map(|(tpr, _)| tpr.clone());
    let tprs = chosen.or_else(|| (!g.families.is_empty()).then(|| g.family_tpr.iter().map(|t| t.get(cal.gate_layer).copied().unwrap_or(f32::NAN)).collect()));
    if let Some(tprs) = tprs {
        println!("TPR per family left out of fitting (cross-validated, threshold at --max-fpr on held-out harmless prompts):");
        for (name, tpr) in g.families.iter().zip(&tprs) {
            println!("  {name:<28}{:>8}", pct(*tpr));
        }
        let present: Vec<f32> = tprs.iter().copied().filter(|t| !t.is_nan()).collect();
        println!("  {:<28}{:>8}", "worst family", pct(present.iter().copied().fold(1.0, f32::min)));
    }
    if let Some((_, fpr)) = &g.chosen {
        let names = ["plain", "wrapped", "multi-turn*"];
        println!("FPR on harmless prompts left out: {}", fpr.iter().zip(names).map(|(f, n)| format!("{n} {}", pct(*f).trim())).collect::<Vec<_>>().join(", "));
        println!("{MULTI_TURN_NOTE}");
    }
    if let Some((tpr, fpr)) = g.held_out {
        println!("final gate on plain held-out prompts: TPR {:.1}%, FPR {:.1}%", 100.0 * tpr, 100.0 * fpr);
    }
}

fn describe_term(t: &Term) -> String {
    match &t.read {
        Read::Tokens(offsets) => format!(
            "layer {} at {}",
            t.layer,
            offsets.iter().map(|&o| if o == 0 { "the last token".to_string() } else { format!("{o} tokens before it") }).collect::<Vec<_>>().join(" and ")
        ),
        Read::RequestMax => format!("layer {} at every request token (largest)", t.layer),
    }
}
