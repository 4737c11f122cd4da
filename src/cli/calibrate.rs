//! `inferalign calibrate`: re-fit a gate's bias and layer for a target model,
//! optionally so that its decisions survive a given activation drift.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use clap::Args;
use ndarray::{s, Axis};
use serde::Serialize;
use serde_json::json;

use inferalign::capture::capture_prompts;
use inferalign::drift::Drift;
use inferalign::extract::{data_set, model_identity, Labelled};
use inferalign::gate::{project, rates, robust_accuracy, robust_bias};
use inferalign::plot;
use inferalign::prompts::{prepare, read_prompts};
use inferalign::vectors::{GateFit, Calibration, DataIdentity, LayerStats, VectorFile};

use super::{non_negative, progress, ModelArgs};

#[derive(Args)]
pub struct CalibrateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Vector file whose directions the gate projects on (its bias and layer are re-fitted)
    #[arg(long)]
    gate: PathBuf,
    /// Harmful calibration prompts (text, JSONL or CSV)
    #[arg(long)]
    harmful: PathBuf,
    /// Harmless calibration prompts
    #[arg(long)]
    harmless: PathBuf,
    /// Choose bias and layer so that each calibration decision holds for any change of the
    /// gate layer's activation up to this L2 norm (a margin); 0 picks the most accurate gate
    #[arg(long, default_value_t = 0.0, value_parser = non_negative)]
    robust: f32,
    /// drift.json written by `inferalign drift --out` for this target: marks the measured drift
    #[arg(long)]
    drift: Option<PathBuf>,
    /// Keep this gate layer instead of choosing one
    #[arg(long)]
    layer: Option<usize>,
    /// The new vector file
    #[arg(short, long)]
    out: PathBuf,
    /// Folder for calibrate.json and robust.svg (certified accuracy against rho)
    #[arg(long)]
    report: Option<PathBuf>,
    /// Print the report as one JSON object on stdout
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct LayerFit {
    layer: usize,
    bias: f32,
    accuracy: f32,
    tpr: f32,
    fpr: f32,
    /// Share of calibration decisions certified at --robust.
    robust_accuracy: f32,
    /// Mean drift at this layer from drift.json, and the share certified at it.
    drift_l2: Option<f64>,
    robust_at_drift: Option<f32>,
}

pub fn run(args: CalibrateArgs) -> Result<()> {
    let harmful = read_prompts(&args.harmful)?;
    let harmless = read_prompts(&args.harmless)?;
    let drift = args.drift.as_deref().map(read_drift).transpose()?;
    let model = args.model.load()?;
    let mut vectors = VectorFile::read(&args.gate)?;
    vectors.check_fits(&model, &args.gate)?;
    if let Some(l) = args.layer {
        vectors.direction(l)?;
    }
    let recorded = vectors.calibration.as_ref().map(|c| c.data.template.clone());
    let template = args.model.template(&model, recorded.as_deref())?;
    let all: Vec<String> = harmful.iter().chain(&harmless).cloned().collect();
    let tokens = prepare(&model, &template, &all, args.model.ctx_size as usize)?;

    let layers = vectors.layers();
    let bar = progress(0, "calibrate");
    let acts = capture_prompts(&model, &args.model.context_params(), &tokens, &[0], &layers, None, &bar)?.acts;
    bar.finish_and_clear();

    let rho = args.robust;
    let drift_at = |layer: usize| drift.as_ref().and_then(|d| d.layer(layer)).map(|d| d.mean_l2);
    let mut fits = Vec::new();
    let mut projections = Vec::new();
    for &layer in &layers {
        let proj = project(acts.index_axis(Axis(1), layer), vectors.direction(layer)?.into());
        fits.push(fit_layer(layer, proj.split_at(harmful.len()), rho, drift_at(layer)));
        projections.push(proj);
    }
    let chosen = match args.layer {
        Some(l) => layers.iter().position(|&x| x == l).expect("checked above"),
        None => most_robust(&fits),
    };
    let gate = &fits[chosen];
    let drift_rho = drift_at(gate.layer);
    let curve = certified_curve(&projections[chosen], harmful.len(), gate.bias, drift_rho);

    let old = vectors.calibration.take();
    let data = match &old {
        Some(c) => c.data.clone(),
        None => DataIdentity {
            harmful: data_set(&args.harmful, &Labelled { train: Vec::new(), held_out: harmful.clone() })?,
            harmless: data_set(&args.harmless, &Labelled { train: Vec::new(), held_out: harmless.clone() })?,
            template: template.name.clone(),
            system_prompt: template.system_prompt.clone(),
            seed: None,
        },
    };
    let mean_norm = |layer: usize| {
        let at = acts.slice(s![.., layer, ..]);
        at.rows().into_iter().map(|r| r.dot(&r).sqrt()).sum::<f32>() / at.nrows() as f32
    };
    let srv_norm = |layer: usize| old.as_ref().and_then(|c| c.layer(layer)).map_or(0.0, |s| s.srv_norm);
    let stats = |f: &LayerFit| LayerStats {
        layer: f.layer,
        bias: f.bias,
        accuracy: f.accuracy,
        tpr: f.tpr,
        fpr: f.fpr,
        srv_norm: srv_norm(f.layer),
        mean_norm: mean_norm(f.layer),
        worst_tpr: f32::NAN,
    };
    vectors.calibration = Some(Calibration {
        kind: old.as_ref().map_or("srv".into(), |c| c.kind.clone()),
        tool_version: env!("CARGO_PKG_VERSION").into(),
        gate_layer: gate.layer,
        robust_rho: (rho > 0.0).then_some(rho),
        layers: fits.iter().map(stats).collect(),
        model: model_identity(&model)?,
        data,
        // Re-fitted on `direction.<layer>` at the last token.
        gate: GateFit::default(),
    });
    vectors.write(&args.out)?;

    let report = json!({
        "prompts": {"harmful": harmful.len(), "harmless": harmless.len()},
        "robust": rho,
        "gate_layer": gate.layer,
        "bias": gate.bias,
        "layers": fits,
        "curve": curve.iter().map(|&(r, a)| json!({"rho": r, "certified_accuracy": a})).collect::<Vec<_>>(),
        "drift_rho": drift_rho,
        "out": args.out.display().to_string(),
    });
    if args.json {
        println!("{report}");
    } else {
        print_report(&fits, chosen, rho, &curve, drift_rho);
        println!("wrote {}", args.out.display());
    }
    if let Some(dir) = &args.report {
        write_report(dir, &report, gate.layer, &curve, drift_rho)?;
    }
    Ok(())
}

fn read_drift(path: &Path) -> Result<Drift> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not a drift.json from `inferalign drift --out`", path.display()))
}

/// The bias that keeps the most calibration decisions `rho` from flipping at
/// one layer, given its (harmful, harmless) projections, and how it fares.
fn fit_layer(layer: usize, (hp, bp): (&[f32], &[f32]), rho: f32, drift_l2: Option<f64>) -> LayerFit {
    let bias = robust_bias(hp, bp, rho);
    let scores = |p: &[f32]| p.iter().map(|x| x + bias).collect::<Vec<_>>();
    let r = rates(&scores(hp), &scores(bp));
    LayerFit {
        layer,
        bias,
        accuracy: r.accuracy,
        tpr: r.tpr,
        fpr: r.fpr,
        robust_accuracy: robust_accuracy(hp, bp, bias, rho),
        drift_l2,
        robust_at_drift: drift_l2.map(|d| robust_accuracy(hp, bp, bias, d as f32)),
    }
}

/// The layer with the most certified decisions; then the most accurate, the
/// fewest false positives, the earliest.
fn most_robust(fits: &[LayerFit]) -> usize {
    (0..fits.len())
        .max_by(|&a, &b| {
            let (a, b) = (&fits[a], &fits[b]);
            a.robust_accuracy.total_cmp(&b.robust_accuracy).then(a.accuracy.total_cmp(&b.accuracy)).then(b.fpr.total_cmp(&a.fpr)).then(b.layer.cmp(&a.layer))
        })
        .expect("vector files hold at least one layer")
}

/// Certified accuracy at 41 margins from 0 to past the largest margin (and the measured drift).
fn certified_curve(projections: &[f32], n_harmful: usize, bias: f32, drift_rho: Option<f64>) -> Vec<(f32, f32)> {
    let (hp, bp) = projections.split_at(n_harmful);
    let max_margin = projections.iter().map(|p| (p + bias).abs()).fold(0.0f32, f32::max);
    let top = max_margin.max(drift_rho.unwrap_or(0.0) as f32 * 1.1);
    (0..=40).map(|i| top * i as f32 / 40.0).map(|r| (r, robust_accuracy(hp, bp, bias, r))).collect()
}

/// calibrate.json and robust.svg in `dir`.
fn write_report(dir: &Path, report: &serde_json::Value, layer: usize, curve: &[(f32, f32)], drift_rho: Option<f64>) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    inferalign::output::write_bytes(&dir.join("calibrate.json"), serde_json::to_string_pretty(report)?.as_bytes())?;
    plot::lines(
        &dir.join("robust.svg"),
        &format!("certified gate accuracy at layer {layer} against drift rho (line: measured drift)"),
        "rho (L2 norm of the activation change)",
        &[("certified accuracy", curve.iter().map(|&(r, a)| (r as f64, a as f64)).collect())],
        drift_rho,
    )?;
    eprintln!("wrote {}", dir.display());
    Ok(())
}

fn print_report(fits: &[LayerFit], chosen: usize, rho: f32, curve: &[(f32, f32)], drift_rho: Option<f64>) {
    let pct = |x: Option<f32>| x.map_or("-".to_string(), |v| format!("{:.1}%", 100.0 * v));
    println!("layer     bias  accuracy     TPR     FPR  certified@{rho:<6}  drift L2  certified@drift");
    for (i, f) in fits.iter().enumerate() {
        let mark = if i == chosen { "  <- gate" } else { "" };
        println!(
            "{:>5} {:>8.3} {:>8.1}% {:>6.1}% {:>6.1}% {:>17} {:>9} {:>16}{mark}",
            f.layer,
            f.bias,
            100.0 * f.accuracy,
            100.0 * f.tpr,
            100.0 * f.fpr,
            pct(Some(f.robust_accuracy)),
            f.drift_l2.map_or("-".to_string(), |d| format!("{d:.3}")),
            pct(f.robust_at_drift)
        );
    }
    println!("\ncertified accuracy of the chosen gate (layer {}) against rho:", fits[chosen].layer);
    println!("{:>9}  {:>9}", "rho", "certified");
    for &(r, a) in curve.iter().step_by(4) {
        let mark = match drift_rho {
            Some(d) if (r as f64) <= d && d < (r + curve[1].0 * 4.0) as f64 => format!("  <- measured drift {d:.3}"),
            _ => String::new(),
        };
        println!("{r:>9.3}  {:>8.1}%{mark}", 100.0 * a);
    }
}
