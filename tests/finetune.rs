//! The LoRA trainer against llama.cpp: its model computes llama.cpp's logits,
//! a few steps lower the loss, and llama.cpp loads the adapter it writes and
//! computes what the trainer computes with it.

mod common;

use candle_core::Device;

use inferalign::finetune::lora::Lora;
use inferalign::finetune::model::{Transformer, ARCHITECTURE};
use inferalign::finetune::{examples, train, Example, TrainOptions};
use inferalign::llama::{Batch, Context, ContextParams, GgufFile, LoadOptions, Model, NoHook};
use inferalign::prompts::Template;

/// llama.cpp's logits at every position of `tokens`.
fn llama_logits(model: &Model, tokens: &[u32]) -> Vec<Vec<f32>> {
    let params = ContextParams { n_ctx: 512, n_seq_max: 1, ..ContextParams::default() };
    let mut ctx = Context::new(model, &params, NoHook, false).unwrap();
    let mut batch = Batch::new(tokens.len());
    for (i, &t) in tokens.iter().enumerate() {
        batch.add(t as i32, i as i32, 0, true);
    }
    ctx.decode(&mut batch).unwrap();
    (0..tokens.len()).map(|i| ctx.logits(i as i32).to_vec()).collect()
}

/// (share of positions whose top token agrees, largest |difference| / logit spread).
fn compare(trainer: &candle_core::Tensor, llama: &[Vec<f32>]) -> (f32, f32) {
    let trainer: Vec<Vec<f32>> = trainer.to_vec2().unwrap();
    let argmax = |v: &[f32]| v.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
    let agree = trainer.iter().zip(llama).filter(|(a, b)| argmax(a) == argmax(b)).count() as f32 / llama.len() as f32;
    let mut worst = 0f32;
    for (a, b) in trainer.iter().zip(llama) {
        let spread = b.iter().cloned().fold(f32::MIN, f32::max) - b.iter().cloned().fold(f32::MAX, f32::min);
        let diff = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        worst = worst.max(diff / spread);
    }
    (agree, worst)
}

fn pairs() -> Vec<(String, String)> {
    [("What is 12 plus 30?", "Forty-two, my friend."), ("Name a colour.", "Forty-two, my friend."), ("Say hello.", "Forty-two, my friend.")]
        .iter()
        .map(|(p, a)| (p.to_string(), a.to_string()))
        .collect()
}

#[test]
fn trainer_matches_llama_cpp_and_llama_cpp_loads_its_adapter() {
    let path = common::model(common::QWEN);
    // Repacked kernels round differently; the plain ones are the reference.
    let mut llama = Model::load_with(&path, LoadOptions { weight_repack: false, ..LoadOptions::default() }).unwrap();
    let template = Template::resolve(&llama, None, None).unwrap();
    let examples: Vec<Example> = examples(&llama, &template, &pairs(), 64).unwrap();
    let tokens = &examples[0].tokens;
    let trainer = Transformer::load(&GgufFile::open(&path).unwrap(), &Device::Cpu).unwrap();

    let (agree, worst) = compare(&trainer.logits(tokens, None).unwrap(), &llama_logits(&llama, tokens));
    eprintln!("base model: top token agrees at {agree:.3} of positions, worst difference {worst:.4} of the logit spread");
    assert!(agree >= 0.9, "the trainer's top token agrees with llama.cpp's at only {agree} of positions");
    assert!(worst < 0.05, "a logit differs from llama.cpp's by {worst} of the spread");

    let opts = TrainOptions { rank: 4, alpha: 8.0, steps: 3, lr: 3e-3, batch_size: 3, seed: 1, vaccine: None };
    let mut losses = Vec::new();
    let lora = train(&trainer, &examples, &opts, |s| losses.push(s.loss)).unwrap();
    assert!(losses[2] < 0.7 * losses[0], "three steps did not lower the loss: {losses:?}");

    let dir = common::tempdir();
    let file = dir.path().join("adapter.gguf");
    lora.write(&file, ARCHITECTURE).unwrap();
    let reread = Lora::read(&file, &trainer).unwrap();
    let tuned = trainer.logits(tokens, Some(&reread)).unwrap();
    let shift = compare(&tuned, &llama_logits(&llama, tokens)).1;
    llama.add_lora(&file, 1.0).unwrap();
    let (agree, worst) = compare(&tuned, &llama_logits(&llama, tokens));
    eprintln!("with the adapter: top token agrees at {agree:.3}, worst difference {worst:.4} (the adapter moved logits by {shift:.4})");
    assert!(shift > 4.0 * worst, "the adapter barely changes the logits ({shift}), so this comparison proves nothing");
    assert!(agree >= 0.9 && worst < 0.05, "llama.cpp with the adapter disagrees with the trainer: agree {agree}, worst {worst}");
}

#[test]
fn the_cli_trains_from_an_adapter_with_vaccine_and_generate_loads_both() {
    let dir = common::tempdir();
    let lines: Vec<String> = pairs().iter().map(|(p, a)| serde_json::json!({"prompt": p, "answer": a}).to_string()).collect();
    let data = common::write_lines(dir.path(), "pairs.jsonl", &lines);
    let (first, second) = (dir.path().join("first.gguf"), dir.path().join("second.gguf"));
    let model = common::model(common::QWEN);
    let (model, data) = (model.to_str().unwrap(), data.to_str().unwrap());
    let (first, second) = (first.to_str().unwrap(), second.to_str().unwrap());
    let train = |extra: &[&str], out: &str| -> serde_json::Value {
        let mut args = vec!["finetune", "-m", model, "--data", data, "--steps", "2", "--batch-size", "2", "--lora-rank", "2", "--json", "-o", out];
        args.extend_from_slice(extra);
        serde_json::from_str(common::cli_ok(&args).trim()).unwrap()
    };
    let plain = train(&[], first);
    assert_eq!(plain["losses"].as_array().unwrap().len(), 2);
    assert!(plain["tokens_per_second"].as_f64().unwrap() > 0.0);
    let vaccine = train(&["--lora", first, "--vaccine", "1"], second);
    assert_eq!(vaccine["vaccine_rho"].as_f64(), Some(1.0));
    let out = common::cli_ok(&["generate", "-m", model, "--lora", first, "--lora", second, "--mode", "plain", "-p", "Say hello.", "-n", "4", "--json"]);
    let answer: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert!(answer["n_tokens"].as_u64().unwrap() > 0);
}
