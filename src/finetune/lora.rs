//! LoRA adapters as the trainer holds them and as llama.cpp loads them.
//!
//! llama.cpp's LoRA GGUF: `general.type = adapter`, `adapter.type = lora`,
//! `adapter.lora.alpha`, and per projection `<weight>.lora_a` with
//! ne = [n_in, rank] and `<weight>.lora_b` with ne = [rank, n_out]; it adds
//! `scale * alpha / rank * B A x`. Row-major (rank, n_in) and (n_out, rank)
//! matrices are exactly those layouts.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, ensure, Result};
use candle_core::{Tensor, Var};
use rand::{Rng, SeedableRng};

use super::model::Transformer;
use crate::llama::{GgufFile, GgufValue, GgufWriter};

pub struct Lora {
    pub rank: usize,
    pub alpha: f32,
    /// Projection name -> (A: (rank, n_in), B: (n_out, rank)).
    pairs: BTreeMap<String, (Var, Var)>,
}

impl Lora {
    /// A fresh adapter on every projection: A uniform in +-1/sqrt(n_in)
    /// (PEFT's default), B zero, so training starts from the model itself.
    pub fn new(model: &Transformer, rank: usize, alpha: f32, seed: u64) -> Result<Lora> {
        ensure!(rank > 0, "the LoRA rank must be at least 1");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut pairs = BTreeMap::new();
        for p in model.projections() {
            let (n_out, n_in) = p.weight.dims2()?;
            let bound = 1.0 / (n_in as f32).sqrt();
            let a: Vec<f32> = (0..rank * n_in).map(|_| rng.gen_range(-bound..bound)).collect();
            let a = Var::from_tensor(&Tensor::from_vec(a, (rank, n_in), model.device())?)?;
            let b = Var::zeros((n_out, rank), candle_core::DType::F32, model.device())?;
            pairs.insert(p.name.clone(), (a, b));
        }
        Ok(Lora { rank, alpha, pairs })
    }

    pub fn vars(&self) -> Vec<Var> {
        self.pairs.values().flat_map(|(a, b)| [a.clone(), b.clone()]).collect()
    }

    fn scale(&self) -> f64 {
        self.alpha as f64 / self.rank as f64
    }

    /// `scale * B A x` for projection `name`; None where the adapter does not touch it.
    pub fn forward(&self, name: &str, x: &Tensor) -> Result<Option<Tensor>> {
        let Some((a, b)) = self.pairs.get(name) else { return Ok(None) };
        Ok(Some((x.matmul(&a.t()?)?.matmul(&b.t()?)? * self.scale())?))
    }

    /// `scale * B A`, the change to projection `name`'s weight.
    pub fn delta(&self, name: &str) -> Result<Option<Tensor>> {
        let Some((a, b)) = self.pairs.get(name) else { return Ok(None) };
        Ok(Some((b.matmul(a)? * self.scale())?))
    }

    pub fn write(&self, path: &Path, architecture: &str) -> Result<()> {
        let mut writer = GgufWriter::new();
        writer.set("general.architecture", GgufValue::Str(architecture.into()));
        writer.set("general.type", GgufValue::Str("adapter".into()));
        writer.set("adapter.type", GgufValue::Str("lora".into()));
        writer.set("adapter.lora.alpha", GgufValue::F32(self.alpha));
        for (name, (a, b)) in &self.pairs {
            let (n_out, n_in) = (b.dim(0)?, a.dim(1)?);
            writer.add_matrix(&format!("{name}.weight.lora_a"), a.flatten_all()?.to_vec1()?, n_in, self.rank);
            writer.add_matrix(&format!("{name}.weight.lora_b"), b.flatten_all()?.to_vec1()?, self.rank, n_out);
        }
        writer.write(path)
    }

    /// A llama.cpp LoRA GGUF made for `model`'s shapes.
    pub fn read(path: &Path, model: &Transformer) -> Result<Lora> {
        let gguf = GgufFile::open(path)?;
        if gguf.get("adapter.type") != Some(GgufValue::Str("lora".into())) {
            bail!("{} is not a LoRA adapter (adapter.type is not lora)", path.display());
        }
        let names = gguf.tensor_names();
        let mut pairs = BTreeMap::new();
        let mut rank = 0;
        for p in model.projections() {
            let key = format!("{}.weight.lora_a", p.name);
            if !names.contains(&key) {
                continue;
            }
            let (n_out, n_in) = p.weight.dims2()?;
            let (a, a_shape) = gguf.tensor_dequantized(&key)?;
            let (b, b_shape) = gguf.tensor_dequantized(&format!("{}.weight.lora_b", p.name))?;
            let r = a_shape.get(1).copied().unwrap_or(1);
            if a_shape[0] != n_in || b_shape[0] != r || b_shape.get(1).copied().unwrap_or(1) != n_out {
                bail!("{}: {} has shapes {a_shape:?} and {b_shape:?}, not [{n_in}, r] and [r, {n_out}]: made for another model", path.display(), p.name);
            }
            ensure!(rank == 0 || rank == r, "{} mixes LoRA ranks ({rank} and {r}); the trainer reads adapters of one rank", path.display());
            rank = r;
            let a = Var::from_tensor(&Tensor::from_vec(a, (r, n_in), model.device())?)?;
            let b = Var::from_tensor(&Tensor::from_vec(b, (n_out, r), model.device())?)?;
            pairs.insert(p.name.clone(), (a, b));
        }
        ensure!(!pairs.is_empty(), "{} changes none of the model's projections", path.display());
        let alpha = match gguf.get("adapter.lora.alpha") {
            Some(GgufValue::F32(a)) if a > 0.0 => a,
            _ => rank as f32,
        };
        Ok(Lora { rank, alpha, pairs })
    }
}
