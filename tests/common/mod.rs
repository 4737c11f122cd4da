//! Shared set-up for the integration tests: the real models and data that
//! `scripts/setup.sh` caches, and a way to run the CLI.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const QWEN: &str = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf";
pub const GEMMA: &str = "gemma-3-270m-q4_k_m.gguf";

pub fn cache() -> PathBuf {
    std::env::var_os("INFERALIGN_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").expect("HOME is set")).join(".cache/inferalign"))
}

fn cached(rel: &str) -> PathBuf {
    let path = cache().join(rel);
    assert!(path.is_file(), "missing {}: run scripts/setup.sh first (it fetches models and data)", path.display());
    path
}

pub fn model(name: &str) -> PathBuf {
    cached(&format!("models/{name}"))
}

/// Qwen with its refusal direction projected out (`examples/abliterate.rs`),
/// made by `scripts/test.sh` at set-up.
pub fn abliterated_lora() -> PathBuf {
    let path = cache().join("fixtures/qwen-abliterated.lora.gguf");
    assert!(path.is_file(), "missing {}: scripts/test.sh generates it with examples/abliterate.rs", path.display());
    path
}

pub fn advbench() -> PathBuf {
    cached("data/advbench.jsonl")
}

pub fn harmless() -> PathBuf {
    repo_data("harmless.txt")
}

/// A file of the repository's `data/`.
pub fn repo_data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data").join(name)
}

/// Template flags each test model needs (Gemma 270M carries no chat template).
pub fn template_args(name: &str) -> Vec<&'static str> {
    if name == GEMMA {
        vec!["--template", "gemma"]
    } else {
        vec![]
    }
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

pub fn write_lines(dir: &Path, name: &str, lines: &[String]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, lines.join("\n") + "\n").expect("write prompts");
    path
}

/// Runs `inferalign` with arguments.
pub fn cli(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_inferalign")).args(args).output().expect("run inferalign")
}

/// Runs `inferalign`, asserting it succeeded; returns stdout.
pub fn cli_ok(args: &[&str]) -> String {
    let out = cli(args);
    assert!(
        out.status.success(),
        "inferalign {:?} failed:\n{}",
        args,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 stdout")
}

/// Runs `inferalign`, asserting it failed with a one-line error containing `needle`.
pub fn cli_err(args: &[&str], needle: &str) -> String {
    let out = cli(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "inferalign {args:?} should have failed; stderr:\n{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "expected one error line, got:\n{stderr}");
    assert!(errors[0].contains(needle), "error {:?} does not mention {needle:?}", errors[0]);
    errors[0].to_string()
}

/// A gate file for `name`, extracted once per test process from the first
/// 40 AdvBench and 40 own harmless prompts (32 train each), quick to make.
pub fn quick_gate(name: &str) -> PathBuf {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static MADE: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let mut made = MADE.get_or_init(Default::default).lock().unwrap();
    if let Some(path) = made.get(name) {
        return path.clone();
    }
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("gate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let harmful: Vec<String> = inferalign::prompts::read_prompts(&advbench()).unwrap().into_iter().take(40).collect();
    let harmless: Vec<String> = inferalign::prompts::read_prompts(&harmless()).unwrap().into_iter().take(40).collect();
    let (harmful, harmless) = (write_lines(&dir, "harmful.txt", &harmful), write_lines(&dir, "harmless.txt", &harmless));
    let out = dir.join(format!("{name}.srv.gguf"));
    let model = model(name);
    let mut args = quick_extract_args(&model, &harmful, &harmless, &out, "32");
    args.extend(template_args(name));
    cli_ok(&args);
    made.insert(name.to_string(), out.clone());
    out
}

/// `extract` with `train` prompts per class, one wrapper family each and no
/// generation check: the quickest extraction that still fits a gate.
pub fn quick_extract_args<'a>(model: &'a Path, harmful: &'a Path, harmless: &'a Path, out: &'a Path, train: &'a str) -> Vec<&'a str> {
    let path = |p: &'a Path| p.to_str().expect("test paths are UTF-8");
    let flags = ["--harmful", path(harmful), "--harmless", path(harmless), "--out", path(out), "--train", train];
    ["extract", "--model", path(model)].into_iter().chain(flags).chain(["--wraps", "1", "--no-check"]).collect()
}

/// `inferalign serve` on `model_name` with extra arguments, listening on a free loopback port.
pub fn start_server(model_name: &str, args: &[&str]) -> inferalign::server::ServerProcess {
    let mut all = vec!["-m".to_string(), model(model_name).display().to_string()];
    all.extend(template_args(model_name).iter().chain(args).map(|a| a.to_string()));
    inferalign::server::ServerProcess::start(Path::new(env!("CARGO_BIN_EXE_inferalign")), all).expect("start inferalign serve")
}
