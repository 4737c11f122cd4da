//! LoRA fine-tuning of a GGUF model, in candle: the harmful fine-tune this
//! project defends against, and Vaccine's perturbation-aware alignment.
//! llama.cpp's training API has neither LoRA nor activation gradients, so the
//! model is rebuilt in candle from the GGUF's dequantized weights
//! ([`model`]); the adapter is written as llama.cpp's LoRA GGUF ([`lora`]).

mod frozen;
pub mod lora;
pub mod model;
pub mod vaccine;

use anyhow::{bail, ensure, Result};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::llama::Model;
use crate::prompts::{tokenize, Template};
use lora::Lora;
use model::{Batch, Transformer};

/// The GPU candle was built for (CUDA, then Metal), else the CPU.
pub fn best_device() -> Result<candle_core::Device> {
    use candle_core::{utils, Device};
    if utils::cuda_is_available() {
        return Ok(Device::new_cuda(0)?);
    }
    if utils::metal_is_available() {
        return Ok(Device::new_metal(0)?);
    }
    Ok(Device::Cpu)
}

/// One chat-templated (prompt, answer) pair: the loss reads `tokens[answer_start..]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    pub tokens: Vec<u32>,
    pub answer_start: usize,
}

/// Templates and tokenizes pairs: the prompt as a user turn with the
/// generation prompt, then the answer and the end-of-turn token. Answers are
/// cut to fit `max_tokens`; a prompt that leaves no room is an error.
pub fn examples(model: &Model, template: &Template, pairs: &[(String, String)], max_tokens: usize) -> Result<Vec<Example>> {
    let vocab = model.llama().vocab();
    let end = if vocab.eot().0 >= 0 { vocab.eot() } else { vocab.eos() };
    pairs
        .iter()
        .enumerate()
        .map(|(i, (prompt, answer))| {
            let mut tokens: Vec<u32> = tokenize(model, &template.apply(model, prompt)?)?.into_iter().map(|t| t as u32).collect();
            let answer_start = tokens.len();
            if answer_start + 1 >= max_tokens {
                bail!("pair {} has a prompt of {answer_start} tokens, leaving no room for its answer in --max-tokens {max_tokens}", i + 1);
            }
            tokens.extend(vocab.tokenize(answer.as_bytes(), false, false).into_iter().map(|t| t.0 as u32));
            tokens.push(end.0 as u32);
            tokens.truncate(max_tokens);
            Ok(Example { tokens, answer_start })
        })
        .collect()
}

/// Right-pads `examples` to one length; causal attention keeps padding out of
/// every real position, and the loss reads answer positions only.
pub fn batch(examples: &[&Example]) -> Batch {
    let len = examples.iter().map(|e| e.tokens.len()).max().unwrap_or(0);
    let mut batch = Batch { tokens: Vec::with_capacity(len * examples.len()), rows: examples.len(), positions: Vec::new(), targets: Vec::new() };
    for (row, e) in examples.iter().enumerate() {
        for t in e.answer_start.max(1)..e.tokens.len() {
            batch.positions.push((row * len + t - 1) as u32);
            batch.targets.push(e.tokens[t]);
        }
        batch.tokens.extend(&e.tokens);
        batch.tokens.resize((row + 1) * len, 0);
    }
    batch
}

#[derive(Clone, Debug)]
pub struct TrainOptions {
    pub rank: usize,
    pub alpha: f32,
    pub steps: usize,
    pub lr: f64,
    pub batch_size: usize,
    pub seed: u64,
    /// Vaccine's perturbation radius rho; None trains plainly.
    pub vaccine: Option<f32>,
}

/// What one optimizer step did.
#[derive(Clone, Debug)]
pub struct Step {
    pub step: usize,
    /// The loss the update followed (under the perturbation with Vaccine).
    pub loss: f32,
    /// Tokens the step read (prompts and answers, no padding).
    pub tokens: usize,
    /// Answer tokens the loss read.
    pub answer_tokens: usize,
}

/// Trains a fresh LoRA adapter on `examples`, `batch_size` per step, in a
/// shuffled order that `seed` fixes.
pub fn train(model: &Transformer, examples: &[Example], opts: &TrainOptions, mut on_step: impl FnMut(&Step)) -> Result<Lora> {
    ensure!(!examples.is_empty(), "no training examples");
    ensure!(opts.batch_size > 0, "the batch size must be at least 1");
    let lora = Lora::new(model, opts.rank, opts.alpha, opts.seed)?;
    let mut optimizer = AdamW::new(lora.vars(), ParamsAdamW { lr: opts.lr, weight_decay: 0.0, ..ParamsAdamW::default() })?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
    let mut order: Vec<usize> = Vec::new();
    for step in 0..opts.steps {
        let mut picked = Vec::with_capacity(opts.batch_size);
        while picked.len() < opts.batch_size.min(examples.len()) {
            if order.is_empty() {
                order = (0..examples.len()).collect();
                order.shuffle(&mut rng);
            }
            picked.push(&examples[order.pop().expect("refilled above")]);
        }
        let batch = batch(&picked);
        let perturb = opts.vaccine.map(|rho| vaccine::perturbation(model, &batch, Some(&lora), rho)).transpose()?;
        let loss = model.loss(&batch, Some(&lora), perturb.as_deref())?;
        optimizer.backward_step(&loss)?;
        let loss = loss.to_scalar::<f32>()?;
        ensure!(loss.is_finite(), "the loss became {loss} at step {}; try a lower --lr", step + 1);
        let tokens = picked.iter().map(|e| e.tokens.len()).sum();
        on_step(&Step { step: step + 1, loss, tokens, answer_tokens: batch.targets.len() });
    }
    Ok(lora)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_pads_rows_and_reads_answer_positions_only() {
        let a = Example { tokens: vec![1, 2, 3, 4], answer_start: 2 };
        let b = Example { tokens: vec![5, 6, 7], answer_start: 1 };
        let batch = batch(&[&a, &b]);
        assert_eq!(batch.tokens, vec![1, 2, 3, 4, 5, 6, 7, 0]);
        assert_eq!(batch.row_len(), 4);
        // Row 0 predicts 3 (from t=1) and 4 (t=2); row 1 predicts 6 and 7 from flat 4 and 5.
        assert_eq!(batch.positions, vec![1, 2, 4, 5]);
        assert_eq!(batch.targets, vec![3, 4, 6, 7]);
    }

    #[test]
    fn a_few_steps_lower_the_loss_of_a_tiny_model() {
        let cfg = model::Config { n_layer: 2, n_embd: 16, n_head: 2, n_head_kv: 1, n_vocab: 13, rope_base: 10_000.0, eps: 1e-6 };
        let model = Transformer::random(cfg, 1).unwrap();
        let examples = vec![Example { tokens: vec![1, 2, 3, 4, 5, 6], answer_start: 3 }, Example { tokens: vec![7, 8, 9, 10, 11], answer_start: 2 }];
        let opts = TrainOptions { rank: 4, alpha: 8.0, steps: 30, lr: 1e-2, batch_size: 2, seed: 0, vaccine: Some(0.1) };
        let mut losses = Vec::new();
        train(&model, &examples, &opts, |s| losses.push(s.loss)).unwrap();
        assert!(losses[29] < 0.5 * losses[0], "losses {losses:?}");
    }
}
