//! Vaccine's perturbation-aware alignment (Huang et al., 2024): train so that
//! the loss stays low even when every layer's output embedding is pushed in
//! the direction that raises it most, which keeps a later harmful fine-tune
//! from drifting those embeddings far.

use anyhow::Result;
use candle_core::{DType, Tensor, Var};

use super::lora::Lora;
use super::model::{Batch, Transformer};

/// The gradient of the loss with respect to every layer's output, (tokens, n_embd) each.
pub fn layer_gradients(model: &Transformer, batch: &Batch, lora: Option<&Lora>) -> Result<Vec<Tensor>> {
    let shape = (batch.tokens.len(), model.cfg.n_embd);
    // A zero added to each layer's output has the output's gradient: candle
    // keeps gradients of variables only.
    let probes = (0..model.cfg.n_layer).map(|_| Var::zeros(shape, DType::F32, model.device())).collect::<candle_core::Result<Vec<_>>>()?;
    let tensors: Vec<Tensor> = probes.iter().map(|v| v.as_tensor().clone()).collect();
    let grads = model.loss(batch, lora, Some(&tensors))?.backward()?;
    let mut out = Vec::with_capacity(probes.len());
    for probe in &probes {
        // A layer the loss does not depend on has no gradient entry: zero.
        out.push(match grads.get(probe) {
            Some(g) => g.clone(),
            None => probe.zeros_like()?,
        });
    }
    Ok(out)
}

/// `rho * g_l / ||g||`, the norm taken over all layers together.
pub fn perturbation(model: &Transformer, batch: &Batch, lora: Option<&Lora>, rho: f32) -> Result<Vec<Tensor>> {
    let grads = layer_gradients(model, batch, lora)?;
    let mut total = 0f64;
    for g in &grads {
        total += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    let scale = rho as f64 / total.sqrt().max(1e-12);
    Ok(grads.iter().map(|g| g * scale).collect::<candle_core::Result<Vec<_>>>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::finetune::model::Config;

    fn tiny() -> (Transformer, Batch) {
        let cfg = Config { n_layer: 2, n_embd: 8, n_head: 2, n_head_kv: 1, n_vocab: 11, rope_base: 10_000.0, eps: 1e-6 };
        let model = Transformer::random(cfg, 7).unwrap();
        let batch = Batch { tokens: vec![1, 4, 2, 9, 3, 5], rows: 1, positions: vec![2, 3, 4], targets: vec![9, 3, 5] };
        (model, batch)
    }

    fn loss_with(model: &Transformer, batch: &Batch, dirs: &[Tensor], step: f64) -> f64 {
        let shifted: Vec<Tensor> = dirs.iter().map(|d| (d * step).unwrap()).collect();
        model.loss(batch, None, Some(&shifted)).unwrap().to_scalar::<f32>().unwrap() as f64
    }

    #[test]
    fn layer_gradients_match_finite_differences() {
        let (model, batch) = tiny();
        let grads = layer_gradients(&model, &batch, None).unwrap();
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for _ in 0..3 {
            let random = |g: &Tensor, rng: &mut rand::rngs::StdRng| {
                let data: Vec<f32> = (0..g.elem_count()).map(|_| rng.gen_range(-1.0..1.0)).collect();
                Tensor::from_vec(data, g.shape(), g.device()).unwrap()
            };
            let dirs: Vec<Tensor> = grads.iter().map(|g| random(g, &mut rng)).collect();
            let analytic: f64 = grads.iter().zip(&dirs).map(|(g, d)| (g * d).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64).sum();
            let h = 2e-3;
            let numeric = (loss_with(&model, &batch, &dirs, h) - loss_with(&model, &batch, &dirs, -h)) / (2.0 * h);
            assert!((analytic - numeric).abs() <= 2e-3 * analytic.abs().max(0.1), "analytic {analytic} vs finite difference {numeric}");
        }
    }

    #[test]
    fn perturbation_has_norm_rho_and_raises_the_loss() {
        let (model, batch) = tiny();
        let eps = perturbation(&model, &batch, None, 0.5).unwrap();
        let norm: f32 = eps.iter().map(|e| e.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap()).sum::<f32>().sqrt();
        assert!((norm - 0.5).abs() < 1e-4, "norm {norm}");
        assert!(loss_with(&model, &batch, &eps, 1.0) > loss_with(&model, &batch, &eps, 0.0));
    }
}
