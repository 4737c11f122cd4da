//! Fine-tunes: embedding drift against the aligned parent, and gates
//! re-calibrated with a certified margin.

mod common;

use std::path::PathBuf;

use serde_json::Value;

use inferalign::capture::capture_prompts;
use inferalign::gate::Gate;
use inferalign::llama::{ContextParams, Model};
use inferalign::prompts::{prepare, read_prompts, Template};
use inferalign::vectors::VectorFile;

/// Held-out AdvBench and own harmless prompts, `n` of each.
fn prompts(n: usize) -> (Vec<String>, Vec<String>) {
    let harmful = read_prompts(&common::advbench()).unwrap().into_iter().skip(100).take(n).collect();
    let harmless = read_prompts(&common::harmless()).unwrap().into_iter().skip(100).take(n).collect();
    (harmful, harmless)
}

fn shipped_qwen() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("gguf-vectors/qwen2.5-coder-0.5b-instruct-q4_k_m.srv.gguf")
}

fn drift(target_args: &[&str], prompts: &[String]) -> Value {
    let dir = common::tempdir();
    let file = common::write_lines(dir.path(), "p.txt", prompts);
    let qwen = common::model(common::QWEN);
    let mut args = vec!["drift", "--aligned", qwen.to_str().unwrap(), "--prompts", file.to_str().unwrap(), "--json"];
    args.extend_from_slice(target_args);
    serde_json::from_str(&common::cli_ok(&args)).expect("drift --json prints one JSON object")
}

#[test]
fn a_model_against_itself_drifts_exactly_zero() {
    let (harmful, harmless) = prompts(6);
    let qwen = common::model(common::QWEN);
    let report = drift(&["--target", qwen.to_str().unwrap()], &[harmful, harmless].concat());
    assert_eq!(report["sum_squared"].as_f64(), Some(0.0));
    for layer in report["layers"].as_array().unwrap() {
        assert_eq!(layer["mean_l2"].as_f64(), Some(0.0), "layer {layer}");
        assert!((layer["cosine"].as_f64().unwrap() - 1.0).abs() < 1e-6, "layer {layer}");
    }
    assert_eq!(report["gate"]["flipped_to_harmless"].as_u64(), Some(0));
}

#[test]
fn the_abliterated_fine_tune_drifts_along_the_safety_direction() {
    let (harmful, _) = prompts(16);
    let qwen = common::model(common::QWEN);
    let lora = common::abliterated_lora();
    let report = drift(&["--target", qwen.to_str().unwrap(), "--lora", lora.to_str().unwrap()], &harmful);
    assert!(report["sum_squared"].as_f64().unwrap() > 0.0);
    let layers = report["layers"].as_array().unwrap();
    // The fixture removes layer 16's safety direction from what every block writes.
    for layer in layers.iter().filter(|l| l["layer"].as_u64().unwrap() >= 16) {
        let (along, random) = (layer["safety_share"].as_f64().unwrap(), layer["random_share_max"].as_f64().unwrap());
        assert!(layer["mean_l2"].as_f64().unwrap() > 0.0, "layer {layer}");
        assert!(along > 2.0 * random, "drift is not concentrated along the safety direction: {layer}");
        assert!(layer["along_safety"].as_f64().unwrap() < 0.0, "harmful prompts should drift towards harmless: {layer}");
    }
}

#[test]
fn drift_refuses_models_of_another_shape() {
    let dir = common::tempdir();
    let file = common::write_lines(dir.path(), "p.txt", &prompts(2).0);
    let (qwen, gemma) = (common::model(common::QWEN), common::model(common::GEMMA));
    common::cli_err(
        &["drift", "--aligned", qwen.to_str().unwrap(), "--target", gemma.to_str().unwrap(), "--prompts", file.to_str().unwrap(), "--vectors", shipped_qwen().to_str().unwrap()],
        "the models differ in architecture",
    );
}

#[test]
fn a_perturbation_under_the_certified_margin_never_flips_the_gate() {
    let dir = common::tempdir();
    let (harmful, harmless) = prompts(12);
    let harmful_file = common::write_lines(dir.path(), "harmful.txt", &harmful);
    let harmless_file = common::write_lines(dir.path(), "harmless.txt", &harmless);
    let out = dir.path().join("robust.srv.gguf");
    let (qwen, lora) = (common::model(common::QWEN), common::abliterated_lora());
    let rho = 0.05;
    let report: Value = serde_json::from_str(&common::cli_ok(&[
        "calibrate",
        "-m",
        qwen.to_str().unwrap(),
        "--lora",
        lora.to_str().unwrap(),
        "--gate",
        shipped_qwen().to_str().unwrap(),
        "--harmful",
        harmful_file.to_str().unwrap(),
        "--harmless",
        harmless_file.to_str().unwrap(),
        "--robust",
        &rho.to_string(),
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]))
    .unwrap();
    let file = VectorFile::read(&out).unwrap();
    assert_eq!(file.calibration.as_ref().unwrap().robust_rho, Some(rho));
    let gate = Gate::from_file(&file, None, None).unwrap();
    assert_eq!(report["gate_layer"].as_u64(), Some(gate.layer() as u64));

    let mut model = Model::load(&qwen, 0).unwrap();
    model.add_lora(&lora, 1.0).unwrap();
    let template = Template::resolve(&model, None, None).unwrap();
    let all = [harmful.clone(), harmless].concat();
    let tokens = prepare(&model, &template, &all, 4096).unwrap();
    let acts = capture_prompts(&model, &ContextParams::default(), &tokens, &[0], &[gate.layer()], None, &indicatif::ProgressBar::hidden()).unwrap().acts;

    let mut certified = 0;
    for (i, _) in all.iter().enumerate() {
        let a: Vec<f32> = acts.slice(ndarray::s![i, gate.layer(), ..]).to_vec();
        let score = gate.score_single(&a);
        let margin = score.abs();
        let label_harmful = i < harmful.len();
        if Gate::is_harmful(score) == label_harmful && margin > rho {
            certified += 1;
        }
        // The worst direction moves the score by the full norm: against the decision.
        let push = |norm: f32| -> Vec<f32> { a.iter().zip(&gate.terms[0].weights).map(|(x, d)| x - score.signum() * norm * d).collect() };
        let under = gate.score_single(&push(0.99 * margin));
        let over = gate.score_single(&push(1.01 * margin));
        assert_eq!(Gate::is_harmful(under), Gate::is_harmful(score), "prompt {i}: a change of norm 0.99 x margin flipped the gate");
        assert_ne!(Gate::is_harmful(over), Gate::is_harmful(score), "prompt {i}: a change of norm 1.01 x margin did not flip the gate");
    }
    let reported = report["layers"].as_array().unwrap().iter().find(|l| l["layer"].as_u64() == Some(gate.layer() as u64)).unwrap()["robust_accuracy"].as_f64().unwrap();
    assert!((reported - certified as f64 / all.len() as f64).abs() < 1e-6, "reported certified accuracy {reported}, recomputed {certified}/{}", all.len());
    assert!(certified > 0, "no decision certified at rho {rho}");
}

fn outputs(dir: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("outputs.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn cross_model_guidance_steers_the_fine_tune_and_leaves_closed_gates_alone() {
    let dir = common::tempdir();
    let (harmful, harmless) = prompts(24);
    let harmful_file = common::write_lines(dir.path(), "harmful.txt", &harmful);
    let harmless_file = common::write_lines(dir.path(), "harmless.txt", &harmless);
    let (qwen, lora) = (common::model(common::QWEN), common::abliterated_lora());
    let (qwen, lora) = (qwen.to_str().unwrap(), lora.to_str().unwrap());
    // The fine-tune's own gate, from its own activations.
    let target_gate = dir.path().join("target.srv.gguf");
    common::cli_ok(&[
        "extract", "-m", qwen, "--lora", lora, "--harmful", harmful_file.to_str().unwrap(), "--harmless",
        harmless_file.to_str().unwrap(), "--train", "16", "--wraps", "1", "--no-check", "-o", target_gate.to_str().unwrap(),
    ]);
    let out = dir.path().join("eval");
    let mut args = vec![
        "eval", "-m", qwen, "--lora", lora, "--gate", target_gate.to_str().unwrap(), "--alpha", "7", "--layers", "14-18", "--sets", "harmful,harmless",
        "--harmful", harmful_file.to_str().unwrap(), "--harmless", harmless_file.to_str().unwrap(), "--limit", "4", "-n", "12",
        "--modes", "plain,self-guided,cross-model", "-o", out.to_str().unwrap(),
    ];
    common::cli_err(&args, "pass the aligned model's file with --steer");
    assert!(!out.join("params.json").exists(), "a refused eval must leave its output folder as it was");
    let shipped = shipped_qwen();
    args.extend(["--steer", shipped.to_str().unwrap()]);
    common::cli_ok(&args);

    let rows = outputs(&out);
    let find = |mode: &str, set: &str, index: u64| rows.iter().find(|r| r["mode"] == mode && r["set"] == set && r["index"] == index).unwrap();
    let mut closed = 0;
    for r in rows.iter().filter(|r| r["mode"] == "cross-model") {
        let plain = find("plain", r["set"].as_str().unwrap(), r["index"].as_u64().unwrap());
        if r["steered"] == false {
            closed += 1;
            assert_eq!(r["output"], plain["output"], "gate closed, yet the answer changed: {r}");
        }
        if r["set"] == "harmful" {
            assert_eq!(r["steered"], true, "the target's gate missed a harmful prompt: {r}");
        }
    }
    assert!(closed > 0, "no closed gate to compare");
    let differs = rows
        .iter()
        .filter(|r| r["mode"] == "cross-model" && r["set"] == "harmful")
        .any(|r| r["output"] != find("self-guided", "harmful", r["index"].as_u64().unwrap())["output"]);
    assert!(differs, "the aligned model's vectors steered exactly as the target's own");
}
