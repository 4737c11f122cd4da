//! LoRA targets: a fine-tune given as base model + adapter.

mod common;

use serde_json::Value;

use inferalign::prompts::read_prompts;

/// Greedy plain-mode answers of Qwen (+ `extra` options) to a few AdvBench prompts.
fn answers(extra: &[&str]) -> Vec<String> {
    let dir = common::tempdir();
    let prompts: Vec<String> = read_prompts(&common::advbench()).unwrap().into_iter().skip(200).take(6).collect();
    let file = common::write_lines(dir.path(), "p.txt", &prompts);
    let model = common::model(common::QWEN);
    let mut args = vec!["generate", "-m", model.to_str().unwrap(), "--mode", "plain", "--prompts", file.to_str().unwrap(), "-n", "16", "--json"];
    args.extend_from_slice(extra);
    common::cli_ok(&args).lines().map(|l| serde_json::from_str::<Value>(l).unwrap()["output"].as_str().unwrap().to_string()).collect()
}

#[test]
fn an_adapter_applies_with_its_scale() {
    let lora = common::abliterated_lora();
    let lora = lora.to_str().unwrap();
    let base = answers(&[]);
    assert_eq!(answers(&["--lora", lora, "--lora-scale", "0"]), base, "a LoRA at scale 0 must change nothing");
    let tuned = answers(&["--lora", lora]);
    assert_ne!(tuned, base, "the abliteration adapter changed no answer");
}
