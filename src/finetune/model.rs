//! The trainer's model: a qwen2 transformer in candle, from a GGUF's
//! dequantized weights, with LoRA on every attention and MLP projection. It
//! follows llama.cpp's qwen2 graph (RMS norm, NEOX RoPE, grouped-query
//! attention, SwiGLU) so that an adapter trained here does the same thing when
//! llama.cpp loads it.

use anyhow::{bail, ensure, Context as _, Result};
use candle_core::{Device, Tensor, D};

use super::frozen::matmul_t;
use super::lora::Lora;
use crate::llama::{GgufFile, GgufValue};

/// The one architecture the trainer builds.
pub const ARCHITECTURE: &str = "qwen2";

/// The projections a LoRA adapter can change, by llama.cpp's tensor names.
pub const PROJECTIONS: [&str; 7] = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"];

#[derive(Clone, Debug)]
pub struct Config {
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub n_vocab: usize,
    pub rope_base: f32,
    pub eps: f32,
}

impl Config {
    fn from_gguf(gguf: &GgufFile) -> Result<Config> {
        match gguf.get("general.architecture") {
            Some(GgufValue::Str(arch)) if arch == ARCHITECTURE => {}
            Some(GgufValue::Str(arch)) => bail!("finetune supports qwen2 models; this one is {arch}"),
            _ => bail!("the model has no general.architecture; is it a llama.cpp GGUF model?"),
        }
        let int = |key: &str| match gguf.get(&format!("qwen2.{key}")) {
            Some(GgufValue::U32(v)) => Ok(v as usize),
            Some(GgufValue::U64(v)) => Ok(v as usize),
            _ => bail!("the model has no integer qwen2.{key}"),
        };
        let float = |key: &str, default: f32| match gguf.get(&format!("qwen2.{key}")) {
            Some(GgufValue::F32(v)) => v,
            _ => default,
        };
        Ok(Config {
            n_layer: int("block_count")?,
            n_embd: int("embedding_length")?,
            n_head: int("attention.head_count")?,
            n_head_kv: int("attention.head_count_kv")?,
            n_vocab: 0,
            rope_base: float("rope.freq_base", 10_000.0),
            eps: float("attention.layer_norm_rms_epsilon", 1e-6),
        })
    }

    fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }
}

/// One frozen linear map, named as llama.cpp names its weight (`blk.3.attn_q`).
pub struct Projection {
    pub name: String,
    /// (n_out, n_in): GGUF's row-major layout.
    pub weight: Tensor,
    bias: Option<Tensor>,
}

impl Projection {
    fn forward(&self, x: &Tensor, lora: Option<&Lora>) -> Result<Tensor> {
        let mut y = matmul_t(x, &self.weight)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        if let Some(delta) = lora.map(|l| l.forward(&self.name, x)).transpose()?.flatten() {
            y = (y + delta)?;
        }
        Ok(y)
    }
}

struct Block {
    attn_norm: Tensor,
    ffn_norm: Tensor,
    /// In [`PROJECTIONS`] order.
    proj: Vec<Projection>,
}

pub struct Transformer {
    pub cfg: Config,
    embd: Tensor,
    blocks: Vec<Block>,
    out_norm: Tensor,
    output: Tensor,
    device: Device,
}

/// A right-padded batch of token rows and where the loss reads them.
pub struct Batch {
    pub tokens: Vec<u32>,
    pub rows: usize,
    /// Flat indices (row * len + t) whose next token is an answer token.
    pub positions: Vec<u32>,
    /// The answer token each position must predict.
    pub targets: Vec<u32>,
}

impl Batch {
    /// Tokens per row, padding included.
    pub fn row_len(&self) -> usize {
        self.tokens.len() / self.rows
    }
}

impl Transformer {
    pub fn load(gguf: &GgufFile, device: &Device) -> Result<Transformer> {
        let mut cfg = Config::from_gguf(gguf)?;
        let names = gguf.tensor_names();
        let matrix = |name: &str| -> Result<Tensor> {
            let (data, shape) = gguf.tensor_dequantized(name)?;
            let rows = shape[1..].iter().product::<usize>();
            Ok(Tensor::from_vec(data, (rows, shape[0]), device)?)
        };
        let vector = |name: &str| -> Result<Tensor> {
            let (data, _) = gguf.tensor_dequantized(name)?;
            Ok(Tensor::new(data, device)?)
        };
        let embd = matrix("token_embd.weight")?;
        cfg.n_vocab = embd.dim(0)?;
        let output = if names.iter().any(|n| n == "output.weight") { matrix("output.weight")? } else { embd.clone() };
        let mut blocks = Vec::with_capacity(cfg.n_layer);
        for l in 0..cfg.n_layer {
            let proj = PROJECTIONS
                .iter()
                .map(|p| {
                    let name = format!("blk.{l}.{p}");
                    let bias = format!("{name}.bias");
                    let bias = names.contains(&bias).then(|| vector(&bias)).transpose()?;
                    Ok(Projection { weight: matrix(&format!("{name}.weight"))?, bias, name })
                })
                .collect::<Result<Vec<_>>>()?;
            blocks.push(Block {
                attn_norm: vector(&format!("blk.{l}.attn_norm.weight"))?,
                ffn_norm: vector(&format!("blk.{l}.ffn_norm.weight"))?,
                proj,
            });
        }
        ensure!(cfg.n_embd % cfg.n_head == 0 && cfg.n_head % cfg.n_head_kv == 0, "the model's head counts do not divide its width");
        Ok(Transformer { embd, blocks, out_norm: vector("output_norm.weight")?, output, device: device.clone(), cfg })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn projections(&self) -> impl Iterator<Item = &Projection> {
        self.blocks.iter().flat_map(|b| &b.proj)
    }

    /// Adds a LoRA adapter into the frozen weights (`W += scale * B A`), so
    /// training goes on from the adapted model.
    pub fn merge(&mut self, lora: &Lora) -> Result<()> {
        for p in self.blocks.iter_mut().flat_map(|b| &mut b.proj) {
            if let Some(delta) = lora.delta(&p.name)? {
                p.weight = (&p.weight + delta)?;
            }
        }
        Ok(())
    }

    /// Every layer's output for `batch`'s tokens, as (rows * len, n_embd);
    /// `perturb[l]` (same shape) is added to layer `l`'s output.
    pub fn hidden(&self, batch: &Batch, lora: Option<&Lora>, perturb: Option<&[Tensor]>) -> Result<Tensor> {
        let len = batch.row_len();
        let ids = Tensor::new(batch.tokens.as_slice(), &self.device)?;
        let mut x = self.embd.index_select(&ids, 0)?;
        let (cos, sin) = self.rope_tables(len)?;
        let mask = causal_mask(len, &self.device)?;
        for (l, block) in self.blocks.iter().enumerate() {
            x = self.block(block, &x, batch.rows, (&cos, &sin, &mask), lora)?;
            if let Some(p) = perturb {
                x = (x + &p[l])?;
            }
        }
        Ok(x)
    }

    /// Next-token logits at flat `positions` of the hidden states.
    fn logits_at(&self, hidden: &Tensor, positions: &[u32]) -> Result<Tensor> {
        let idx = Tensor::new(positions, &self.device)?;
        let h = rms_norm(&hidden.index_select(&idx, 0)?, &self.out_norm, self.cfg.eps)?;
        matmul_t(&h, &self.output)
    }

    /// Logits for every position of one token row, (len, n_vocab).
    pub fn logits(&self, tokens: &[u32], lora: Option<&Lora>) -> Result<Tensor> {
        let batch = Batch { tokens: tokens.to_vec(), rows: 1, positions: Vec::new(), targets: Vec::new() };
        let hidden = self.hidden(&batch, lora, None)?;
        self.logits_at(&hidden, &(0..tokens.len() as u32).collect::<Vec<_>>())
    }

    /// Mean cross-entropy of the answer tokens.
    pub fn loss(&self, batch: &Batch, lora: Option<&Lora>, perturb: Option<&[Tensor]>) -> Result<Tensor> {
        ensure!(!batch.positions.is_empty(), "the batch has no answer tokens to learn");
        let hidden = self.hidden(batch, lora, perturb)?;
        let logits = self.logits_at(&hidden, &batch.positions)?;
        let targets = Tensor::new(batch.targets.as_slice(), &self.device)?;
        Ok(candle_nn::loss::cross_entropy(&logits, &targets)?)
    }

    fn block(&self, b: &Block, x: &Tensor, rows: usize, (cos, sin, mask): (&Tensor, &Tensor, &Tensor), lora: Option<&Lora>) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (len, hd) = (x.dim(0)? / rows, cfg.head_dim());
        let h = rms_norm(x, &b.attn_norm, cfg.eps)?;
        let heads = |t: Tensor, n: usize| -> Result<Tensor> { Ok(t.reshape((rows, len, n, hd))?.transpose(1, 2)?.contiguous()?) };
        let q = rope(&heads(b.proj[0].forward(&h, lora)?, cfg.n_head)?, cos, sin)?;
        let k = rope(&heads(b.proj[1].forward(&h, lora)?, cfg.n_head_kv)?, cos, sin)?;
        let v = heads(b.proj[2].forward(&h, lora)?, cfg.n_head_kv)?;
        let n_rep = cfg.n_head / cfg.n_head_kv;
        let (k, v) = (repeat_kv(&k, n_rep)?, repeat_kv(&v, n_rep)?);
        let scores = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?.broadcast_add(mask)?;
        let att = candle_nn::ops::softmax(&scores, D::Minus1)?.matmul(&v)?;
        let att = att.transpose(1, 2)?.reshape((rows * len, cfg.n_embd))?;
        let x = (x + b.proj[3].forward(&att, lora)?)?;
        let h = rms_norm(&x, &b.ffn_norm, cfg.eps)?;
        let gate = b.proj[4].forward(&h, lora)?.silu()?;
        let up = b.proj[5].forward(&h, lora)?;
        Ok((&x + b.proj[6].forward(&(gate * up)?, lora)?)?)
    }

    /// NEOX RoPE tables (len, head_dim): dimension i pairs with i + head_dim/2.
    fn rope_tables(&self, len: usize) -> Result<(Tensor, Tensor)> {
        let half = self.cfg.head_dim() / 2;
        let freqs: Vec<f32> = (0..half).map(|i| self.cfg.rope_base.powf(-2.0 * i as f32 / (2 * half) as f32)).collect();
        let angles: Vec<f32> = (0..len).flat_map(|p| freqs.iter().map(move |f| p as f32 * f)).collect();
        let angles = Tensor::from_vec(angles, (len, half), &self.device)?;
        let angles = Tensor::cat(&[&angles, &angles], 1)?;
        Ok((angles.cos()?, angles.sin()?))
    }

    #[cfg(test)]
    pub fn random(cfg: Config, seed: u64) -> Result<Transformer> {
        use candle_core::DType;
        use rand::{Rng, SeedableRng};
        let device = Device::Cpu;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut matrix = |rows: usize, cols: usize| -> Result<Tensor> {
            let data: Vec<f32> = (0..rows * cols).map(|_| rng.gen_range(-0.3..0.3)).collect();
            Ok(Tensor::from_vec(data, (rows, cols), &device)?)
        };
        let (e, kv) = (cfg.n_embd, cfg.n_head_kv * cfg.head_dim());
        let shapes = [(e, e), (kv, e), (kv, e), (e, e), (2 * e, e), (2 * e, e), (e, 2 * e)];
        let mut blocks = Vec::new();
        for l in 0..cfg.n_layer {
            let proj = PROJECTIONS
                .iter()
                .zip(shapes)
                .map(|(p, (o, i))| Ok(Projection { name: format!("blk.{l}.{p}"), weight: matrix(o, i)?, bias: None }))
                .collect::<Result<Vec<_>>>()?;
            blocks.push(Block { attn_norm: Tensor::ones(e, DType::F32, &device)?, ffn_norm: Tensor::ones(e, DType::F32, &device)?, proj });
        }
        let embd = matrix(cfg.n_vocab, e)?;
        Ok(Transformer { output: embd.clone(), embd, blocks, out_norm: Tensor::ones(e, DType::F32, &device)?, device, cfg })
    }
}

fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    Ok(candle_nn::ops::rms_norm_slow(x, weight, eps)?)
}

fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let (a, b) = (x.narrow(D::Minus1, 0, half)?, x.narrow(D::Minus1, half, half)?);
    let rotated = Tensor::cat(&[&b.neg()?, &a], D::Minus1)?;
    Ok((x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?)?)
}

/// (rows, n_kv, len, d) -> (rows, n_kv * n_rep, len, d), each KV head serving n_rep query heads.
fn repeat_kv(x: &Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x.clone());
    }
    let (rows, n_kv, len, d) = x.dims4()?;
    Ok(x.unsqueeze(2)?.broadcast_as((rows, n_kv, n_rep, len, d))?.reshape((rows, n_kv * n_rep, len, d))?)
}

fn causal_mask(len: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..len * len).map(|i| if i % len > i / len { -1e9 } else { 0.0 }).collect();
    Tensor::from_vec(mask, (len, len), device).context("causal mask")
}
