//! Bad input gets one clear error line, a non-zero exit, and loses nothing.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use inferalign::llama::{GgufValue, GgufWriter};
use inferalign::vectors::VectorFile;

fn plain_vectors(path: &Path, n_embd: usize, layers: std::ops::Range<usize>) -> PathBuf {
    let directions: BTreeMap<usize, Vec<f32>> = layers.map(|l| (l, vec![0.01; n_embd])).collect();
    let file = VectorFile { model_hint: "qwen2".into(), layer_count: directions.len() as u32, n_embd, directions, steering: Default::default(), calibration: None, defaults: None };
    file.write(path).unwrap();
    path.to_path_buf()
}

fn raw_vectors(path: &Path, tensors: &[(&str, Vec<f32>)]) -> PathBuf {
    let mut w = GgufWriter::new();
    w.set("general.architecture", GgufValue::Str("controlvector".into()));
    for (name, data) in tensors {
        w.add_tensor(name, data.clone());
    }
    w.write(path).unwrap();
    path.to_path_buf()
}

/// `classify` on Qwen with a vector file and explicit gate settings.
fn classify(dir: &Path, vectors: &Path, extra: &[&str], needle: &str) {
    classify_prompts(&common::write_lines(dir, "p.txt", &["Hello there".into()]), vectors, extra, needle);
}

fn classify_prompts(prompts: &Path, vectors: &Path, extra: &[&str], needle: &str) {
    let model = common::model(common::QWEN);
    let mut args = vec![
        "classify",
        "--model",
        model.to_str().unwrap(),
        "--gate",
        vectors.to_str().unwrap(),
        "--prompts",
        prompts.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    common::cli_err(&args, needle);
}

const GATE: [&str; 4] = ["--layer", "5", "--bias", "0"];

#[test]
fn vectors_of_another_width_are_rejected() {
    let dir = common::tempdir();
    let v = plain_vectors(&dir.path().join("gemma-like.gguf"), 640, 1..18);
    classify(dir.path(), &v, &GATE, "n_embd is 640 in the vectors but 896 in the model");
}

#[test]
fn vectors_of_a_deeper_model_are_rejected() {
    let dir = common::tempdir();
    let v = plain_vectors(&dir.path().join("deep.gguf"), 896, 1..32);
    classify(dir.path(), &v, &GATE, "reach layer 31 but the model has 24 layers");
}

#[test]
fn truncated_and_corrupt_files_are_rejected() {
    let dir = common::tempdir();
    let good = plain_vectors(&dir.path().join("good.gguf"), 896, 1..24);
    let bytes = std::fs::read(&good).unwrap();
    let truncated = dir.path().join("truncated.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    classify(dir.path(), &truncated, &GATE, "corrupt or truncated");
    let corrupt = dir.path().join("corrupt.gguf");
    std::fs::write(&corrupt, b"GGUF this is not a gguf file at all, just some bytes").unwrap();
    classify(dir.path(), &corrupt, &GATE, "corrupt or truncated");
    common::cli_err(&["inspect", truncated.to_str().unwrap()], "corrupt or truncated");
}

#[test]
fn direction_zero_is_rejected_like_llama_cpp_does() {
    let dir = common::tempdir();
    let v = raw_vectors(&dir.path().join("zero.gguf"), &[("direction.0", vec![0.1; 896]), ("direction.1", vec![0.1; 896])]);
    common::cli_err(&["inspect", v.to_str().unwrap()], "direction.0");
}

#[test]
fn non_finite_values_are_rejected() {
    let dir = common::tempdir();
    let mut bad = vec![0.1; 896];
    bad[7] = f32::NAN;
    let v = raw_vectors(&dir.path().join("nan.gguf"), &[("direction.3", bad)]);
    common::cli_err(&["inspect", v.to_str().unwrap()], "direction.3 holds NaN at index 7; values must be finite");
    let mut inf = vec![0.1; 896];
    inf[0] = f32::INFINITY;
    let v = raw_vectors(&dir.path().join("inf.gguf"), &[("direction.3", inf)]);
    classify(dir.path(), &v, &["--layer", "3", "--bias", "0"], "values must be finite");
    // Finite but huge values would overflow the gate's score to NaN.
    let v = raw_vectors(&dir.path().join("huge.gguf"), &[("direction.3", vec![3e38; 896])]);
    common::cli_err(&["inspect", v.to_str().unwrap()], "within ±1e6");
}

#[test]
fn an_unknown_layer_is_rejected() {
    let dir = common::tempdir();
    let v = plain_vectors(&dir.path().join("v.gguf"), 896, 1..24);
    classify(dir.path(), &v, &["--layer", "40", "--bias", "0"], "layer 40 is not in the vector file");
    classify(dir.path(), &v, &[], "no gate calibration");
}

#[test]
fn empty_and_malformed_prompt_files_are_rejected() {
    let dir = common::tempdir();
    let v = plain_vectors(&dir.path().join("v.gguf"), 896, 1..24);
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "\n  \n").unwrap();
    let malformed = dir.path().join("bad.jsonl");
    std::fs::write(&malformed, "{\"prompt\": \"fine\"}\n{\"prompt\": oops}\n").unwrap();
    let no_field = dir.path().join("nofield.jsonl");
    std::fs::write(&no_field, "{\"question\": \"what?\"}\n").unwrap();
    let no_column = dir.path().join("nocol.csv");
    std::fs::write(&no_column, "question,answer\nwhat,that\n").unwrap();
    for (file, needle) in [
        (&empty, "holds no prompts"),
        (&malformed, "line 2: not valid JSON"),
        (&no_field, "no string field among prompt, goal, text, instruction"),
        (&no_column, "no column named goal or prompt"),
    ] {
        classify_prompts(file, &v, &GATE, needle);
    }
}

#[test]
fn a_prompt_longer_than_the_context_is_named() {
    let dir = common::tempdir();
    let v = plain_vectors(&dir.path().join("v.gguf"), 896, 1..24);
    let prompts = common::write_lines(dir.path(), "long.txt", &["short one".into(), "word ".repeat(200)]);
    classify_prompts(&prompts, &v, &[&GATE[..], &["--ctx-size", "128"]].concat(), "prompt 2 (\"word word");
    // It fits the context but not one request's share of it.
    let share = [&GATE[..], &["--ctx-size", "512", "--parallel", "4"]].concat();
    classify_prompts(&prompts, &v, &share, "shorten it, raise --ctx-size or lower --parallel");
}

#[test]
fn a_model_that_is_not_gguf_is_rejected() {
    let dir = common::tempdir();
    let fake = dir.path().join("model.gguf");
    std::fs::write(&fake, b"not a model").unwrap();
    let v = plain_vectors(&dir.path().join("v.gguf"), 896, 1..24);
    let prompts = common::write_lines(dir.path(), "p.txt", &["hi".into()]);
    common::cli_err(
        &[
            "classify",
            "--model",
            fake.to_str().unwrap(),
            "--gate",
            v.to_str().unwrap(),
            "--prompts",
            prompts.to_str().unwrap(),
            "--layer",
            "5",
            "--bias",
            "0",
        ],
        "cannot load model",
    );
}

#[test]
fn a_failed_extraction_leaves_the_old_output_intact() {
    let dir = common::tempdir();
    let out = plain_vectors(&dir.path().join("out.gguf"), 896, 1..24);
    let before = std::fs::read(&out).unwrap();
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let model = common::model(common::QWEN);
    common::cli_err(
        &[
            "extract",
            "--model",
            model.to_str().unwrap(),
            "--harmful",
            common::advbench().to_str().unwrap(),
            "--harmless",
            empty.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        "holds no prompts",
    );
    assert_eq!(std::fs::read(&out).unwrap(), before);
}

#[test]
fn bad_lora_adapters_are_rejected() {
    let dir = common::tempdir();
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("gguf-vectors/qwen2.5-coder-0.5b-instruct-q4_k_m.srv.gguf");
    let missing = dir.path().join("missing.gguf");
    classify(dir.path(), &shipped, &["--lora", missing.to_str().unwrap()], "does not exist");
    // A control-vector file is GGUF but no adapter.
    classify(dir.path(), &shipped, &["--lora", shipped.to_str().unwrap()], "cannot load LoRA adapter");
    let lora = common::abliterated_lora();
    classify(dir.path(), &shipped, &["--lora", lora.to_str().unwrap(), "--lora-scale", "1", "--lora-scale", "2"], "one scale per adapter");
}

#[test]
fn a_file_without_steering_defaults_never_steers_with_a_guessed_strength() {
    let dir = common::tempdir();
    let vectors = plain_vectors(&dir.path().join("plain.gguf"), 896, 1..24);
    let model = common::model(common::QWEN);
    let gate = ["--gate", vectors.to_str().unwrap(), "--gate-layer", "12", "--bias", "0"];
    for mode in ["gated", "always"] {
        let mut args = vec!["generate", "--model", model.to_str().unwrap(), "-p", "Hello", "-n", "2", "--mode", mode];
        args.extend(gate);
        common::cli_err(&args, "holds no steering defaults");
    }
    // Plain decoding steers nothing, so it needs no strength.
    let mut args = vec!["generate", "--model", model.to_str().unwrap(), "-p", "Hello", "-n", "2", "--mode", "plain"];
    args.extend(gate);
    common::cli_ok(&args);
}

#[test]
fn aliased_tensor_names_are_rejected() {
    let dir = common::tempdir();
    let v = raw_vectors(&dir.path().join("alias.gguf"), &[("direction.2", vec![0.1; 896]), ("direction.02", vec![-0.1; 896])]);
    common::cli_err(&["inspect", v.to_str().unwrap()], "not named as llama.cpp names layer 2");
}

/// Steering arguments a typo can make absurd: each is one error line, never an
/// abort or a huge allocation.
#[test]
fn absurd_sizes_strengths_and_other_models_vectors_are_errors() {
    let dir = common::tempdir();
    let model = common::model(common::QWEN);
    let generate = |extra: &[&str], vectors: &Path| {
        let mut args = vec!["generate", "--model", model.to_str().unwrap(), "-p", "Hello", "-n", "2", "--gate", vectors.to_str().unwrap()];
        args.extend_from_slice(&["--gate-layer", "12", "--bias", "0"]);
        args.extend_from_slice(extra);
        args.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let qwen = plain_vectors(&dir.path().join("qwen.gguf"), 896, 1..24);
    let run_err = |args: Vec<String>, needle: &str| common::cli_err(&args.iter().map(String::as_str).collect::<Vec<_>>(), needle);
    run_err(generate(&["--alpha", "3e38", "--layers", "14"], &qwen), "is not a finite value within");
    run_err(generate(&["--alpha", "1", "--layers", "1-2000000000"], &qwen), "no model has");
    run_err(generate(&["--alpha", "1", "--layers", "1-18446744073709551615"], &qwen), "no model has");
    run_err(generate(&["--alpha", "1", "--layers", "14", "-b", "1"], &qwen), "--batch-size");
    run_err(generate(&["--alpha", "1", "--layers", "14", "-c", "10"], &qwen), "--ctx-size");
    // A file recorded for another architecture, padded to this shape.
    let directions: BTreeMap<usize, Vec<f32>> = (1..24).map(|l| (l, vec![0.01; 896])).collect();
    let other = VectorFile { model_hint: "gemma3".into(), layer_count: 23, n_embd: 896, directions, steering: Default::default(), calibration: None, defaults: None };
    let other_path = dir.path().join("gemma-padded.gguf");
    other.write(&other_path).unwrap();
    run_err(generate(&["--alpha", "1", "--layers", "14"], &other_path), "made for a gemma3 model, this one is qwen2");
    let forced = generate(&["--alpha", "1", "--layers", "14", "--any-model"], &other_path);
    common::cli_ok(&forced.iter().map(String::as_str).collect::<Vec<_>>());
}

#[test]
fn an_output_path_that_cannot_be_written_is_named_before_any_work() {
    let dir = common::tempdir();
    let model = common::model(common::QWEN);
    let prompts = common::write_lines(dir.path(), "p.txt", &["Hello".into(), "Hi".into()]);
    for (out, needle) in [(dir.path().to_path_buf(), "is a directory"), (dir.path().join("missing/out.gguf"), "cannot write into")] {
        let started = std::time::Instant::now();
        common::cli_err(
            &["extract", "--model", model.to_str().unwrap(), "--harmful", prompts.to_str().unwrap(), "--harmless", prompts.to_str().unwrap(), "--out", out.to_str().unwrap()],
            needle,
        );
        eprintln!("refused in {:.1} s", started.elapsed().as_secs_f64());
    }
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left.len(), 1, "nothing but the prompts is left: {left:?}");
}

#[test]
fn a_closed_pipe_ends_quietly() {
    let dir = common::tempdir();
    let v = plain_vectors(&dir.path().join("v.gguf"), 896, 1..24);
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("'{}' inspect '{}' | true", env!("CARGO_BIN_EXE_inferalign"), v.display()))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn finetune_rejects_bad_pairs_and_other_architectures_and_writes_nothing() {
    let dir = common::tempdir();
    let out = dir.path().join("adapter.gguf");
    let out_arg = out.to_str().unwrap();
    let qwen = common::model(common::QWEN);
    let gemma = common::model(common::GEMMA);
    let bad = common::write_lines(dir.path(), "bad.jsonl", &[r#"{"prompt": "Say hi"}"#.into()]);
    let good = common::write_lines(dir.path(), "good.jsonl", &[r#"{"prompt": "Say hi", "answer": "Hi!"}"#.into()]);
    let (qwen, gemma, bad, good) = (qwen.to_str().unwrap(), gemma.to_str().unwrap(), bad.to_str().unwrap(), good.to_str().unwrap());
    common::cli_err(&["finetune", "-m", qwen, "--data", bad, "-o", out_arg], "line 1: expected a JSON object with string fields");
    common::cli_err(&["finetune", "-m", gemma, "--data", good, "-o", out_arg], "finetune supports qwen2 models; this one is gemma3");
    common::cli_err(&["finetune", "-m", qwen, "--data", good, "--max-tokens", "8", "-o", out_arg], "leaving no room for its answer");
    assert!(!out.exists(), "a failed finetune left {}", out.display());
}
