//! One Llama decoder block: RMSNorm, grouped-query attention with rotary positions, SwiGLU MLP.
//! Blocks are loaded under their Hugging Face names, so `vb.pp("model.layers").pp(i)` finds layer i.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{RmsNorm, VarBuilder};

use crate::config::Config;
use crate::error::Result;
use crate::kv_cache::LayerCache;
use crate::rope::Rope;
use crate::weights::{Proj, Weights};

#[derive(Debug, Clone)]
struct Attention {
    q_proj: Proj,
    k_proj: Proj,
    v_proj: Proj,
    o_proj: Proj,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn load(w: &Weights, cfg: &Config) -> Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        Ok(Self {
            q_proj: w.proj(h, cfg.num_heads * d, cfg.attention_bias, "q_proj")?,
            k_proj: w.proj(h, cfg.num_kv_heads * d, cfg.attention_bias, "k_proj")?,
            v_proj: w.proj(h, cfg.num_kv_heads * d, cfg.attention_bias, "v_proj")?,
            o_proj: w.proj(cfg.num_heads * d, h, false, "o_proj")?,
            num_heads: cfg.num_heads,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: d,
        })
    }

    /// # Shapes
    /// x: (batch, seq, hidden) -> q: (batch, heads, seq, head_dim), k and v: (batch, kv_heads, seq, head_dim)
    fn project(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, seq, _) = x.dims3()?;
        let heads = |t: Tensor, n: usize| -> Result<Tensor> { Ok(t.reshape((b, seq, n, self.head_dim))?.transpose(1, 2)?.contiguous()?) };
        Ok((
            heads(self.q_proj.forward(x)?, self.num_heads)?,
            heads(self.k_proj.forward(x)?, self.num_kv_heads)?,
            heads(self.v_proj.forward(x)?, self.num_kv_heads)?,
        ))
    }

    /// # Shapes
    /// x: (batch, seq, hidden) -> (batch, seq, hidden)
    fn forward(&self, x: &Tensor, rope: &Rope, pos: usize, cache: &mut LayerCache) -> Result<Tensor> {
        let (q, k, v) = self.project(x)?;
        let q = rope.apply(&q, pos)?;
        let k = rope.apply(&k, pos)?;
        let (k, v) = cache.append(&k, &v)?;
        if q.device().is_cpu() && q.dtype() == DType::F32 {
            // Batch-invariant: see `crate::attention`.
            let (b, _, seq, _) = q.dims4()?;
            let out = crate::attention::attend_rows(&q, &k, &v, pos)?;
            let out = out.transpose(1, 2)?.reshape((b, seq, self.num_heads * self.head_dim))?;
            return self.o_proj.forward(&out);
        }
        self.attend(&q, &k, &v, pos, false)
    }

    /// Several sessions' new rows in one pass: `x` holds their rows back to back, `segments[i]` is
    /// session i's (first position, row count) and `caches[i]` its cache. Projections run once over
    /// all rows; rotary positions, the cache and attention are each session's own. Every operation is
    /// row by row (quantized matmuls quantize each row alone; attention is `attend_rows`), so a row
    /// gets the bits it would get in its session alone.
    ///
    /// # Shapes
    /// x: (1, rows, hidden) -> (1, rows, hidden)
    fn forward_ragged(&self, x: &Tensor, rope: &Rope, segments: &[(usize, usize)], caches: &mut [&mut LayerCache]) -> Result<Tensor> {
        let (q, k, v) = self.project(x)?;
        let mut outs = Vec::with_capacity(segments.len());
        let mut offset = 0;
        for (&(pos, seq), cache) in segments.iter().zip(caches.iter_mut()) {
            let q = rope.apply(&q.narrow(2, offset, seq)?.contiguous()?, pos)?;
            let k = rope.apply(&k.narrow(2, offset, seq)?.contiguous()?, pos)?;
            let (k, v) = cache.append(&k, &v.narrow(2, offset, seq)?)?;
            let out = crate::attention::attend_rows(&q, &k, &v, pos)?;
            outs.push(out.transpose(1, 2)?.reshape((1, seq, self.num_heads * self.head_dim))?);
            offset += seq;
        }
        self.o_proj.forward(&Tensor::cat(&outs, 1)?)
    }

    /// Positions `0..seq` without a cache, through ops that all have a backward pass.
    ///
    /// # Shapes
    /// x: (batch, seq, hidden) -> (batch, seq, hidden)
    fn forward_differentiable(&self, x: &Tensor, rope: &Rope) -> Result<Tensor> {
        let (q, k, v) = self.project(x)?;
        let q = rope.apply_differentiable(&q, 0)?;
        let k = rope.apply_differentiable(&k, 0)?;
        self.attend(&q, &k, &v, 0, true)
    }

    /// One unrolled draft step in training (EAGLE-3's training-time test), differentiable. Step
    /// `s = past.len()` of a chain that started from true features `s` positions earlier: the query at
    /// position q sees step 0's keys at positions `..=q - s` (the true context) and step j's key at
    /// `q - s + j` (the chain's own earlier drafts), exactly what the draft cache holds at inference.
    /// This step's keys and values are pushed onto `past`.
    ///
    /// # Shapes
    /// x: (batch, seq, hidden) -> (batch, seq, hidden); past: per step (batch, kv_heads, seq, head_dim) keys and values
    fn forward_unrolled(&self, x: &Tensor, rope: &Rope, past: &mut Vec<(Tensor, Tensor)>) -> Result<Tensor> {
        let (q, k, v) = self.project(x)?;
        let q = rope.apply_differentiable(&q, 0)?;
        let k = rope.apply_differentiable(&k, 0)?;
        past.push((k, v));
        let (b, _, seq, _) = q.dims4()?;
        let step = past.len() - 1;
        let keys: Vec<&Tensor> = past.iter().map(|(k, _)| k).collect();
        let values: Vec<&Tensor> = past.iter().map(|(_, v)| v).collect();
        let (k, v) = (Tensor::cat(&keys, 2)?, Tensor::cat(&values, 2)?);
        let rep = self.num_heads / self.num_kv_heads;
        let q = q.reshape((b, self.num_kv_heads, rep * seq, self.head_dim))?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let scores = (q.matmul(&k.transpose(2, 3)?)? * scale)?;
        let mask = unrolled_mask(seq, step, rep, scores.dtype(), scores.device())?;
        let probs = candle_nn::ops::softmax(&scores.broadcast_add(&mask)?, candle_core::D::Minus1)?;
        let out = probs.matmul(&v)?;
        let out =
            out.reshape((b, self.num_heads, seq, self.head_dim))?.transpose(1, 2)?.reshape((b, seq, self.num_heads * self.head_dim))?;
        self.o_proj.forward(&out)
    }

    /// # Shapes
    /// q: (batch, heads, seq, head_dim), k and v: (batch, kv_heads, pos + seq, head_dim) -> (batch, seq, hidden)
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, pos: usize, differentiable: bool) -> Result<Tensor> {
        let (b, _, seq, _) = q.dims4()?;
        // Grouped-query attention without copying K/V per head: fold the query heads that share a KV
        // head into the sequence axis. (b, kv, rep*seq, d) x (b, kv, d, total)
        let rep = self.num_heads / self.num_kv_heads;
        let q = q.reshape((b, self.num_kv_heads, rep * seq, self.head_dim))?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let k_t = k.transpose(2, 3)?;
        let mut scores = (q.matmul(&k_t)? * scale)?;
        if seq > 1 {
            let mask = causal_mask(seq, pos, rep, scores.dtype(), scores.device())?;
            scores = scores.broadcast_add(&mask)?;
        }
        // candle's fused softmax kernel has no backward pass.
        let probs = if differentiable {
            candle_nn::ops::softmax(&scores, candle_core::D::Minus1)?
        } else {
            candle_nn::ops::softmax_last_dim(&scores)?
        };
        let out = probs.matmul(v)?; // (b, kv, rep*seq, d)
        let out =
            out.reshape((b, self.num_heads, seq, self.head_dim))?.transpose(1, 2)?.reshape((b, seq, self.num_heads * self.head_dim))?;
        self.o_proj.forward(&out)
    }
}

/// Additive mask for `seq` new positions starting at `pos`, repeated for `rep` query heads folded into
/// the sequence axis.
///
/// # Shapes
/// -> (rep * seq, pos + seq)
fn causal_mask(seq: usize, pos: usize, rep: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let total = pos + seq;
    let mut data = Vec::with_capacity(rep * seq * total);
    for _ in 0..rep {
        for i in 0..seq {
            data.extend((0..total).map(|j| if j > pos + i { f32::NEG_INFINITY } else { 0.0 }));
        }
    }
    Ok(Tensor::from_vec(data, (rep * seq, total), device)?.to_dtype(dtype)?)
}

/// The additive mask of unrolled step `step` over the keys of steps `0..=step`, each `seq` long (see
/// `Attention::forward_unrolled`). Every query sees at least its own key, so no row is all masked.
///
/// # Shapes
/// -> (rep * seq, (step + 1) * seq)
fn unrolled_mask(seq: usize, step: usize, rep: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let total = (step + 1) * seq;
    let mut row = vec![0f32; total];
    let mut data = Vec::with_capacity(rep * seq * total);
    for q in 0..seq {
        for (j, r) in row.iter_mut().enumerate() {
            let (s, key) = (j / seq, j % seq);
            let visible = if s == 0 { key + step <= q } else { key + step == q + s };
            *r = if visible || (s == step && key == q) { 0.0 } else { f32::NEG_INFINITY };
        }
        data.extend_from_slice(&row);
    }
    let one = Tensor::from_vec(data, (seq, total), device)?;
    Ok(Tensor::cat(&vec![&one; rep], 0)?.to_dtype(dtype)?)
}

#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: Proj,
    up_proj: Proj,
    down_proj: Proj,
}

impl Mlp {
    fn load(w: &Weights, cfg: &Config) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_proj: w.proj(h, i, cfg.mlp_bias, "gate_proj")?,
            up_proj: w.proj(h, i, cfg.mlp_bias, "up_proj")?,
            down_proj: w.proj(i, h, cfg.mlp_bias, "down_proj")?,
        })
    }

    /// # Shapes
    /// x: (batch, seq, hidden) -> (batch, seq, hidden)
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = candle_nn::ops::silu(&self.gate_proj.forward(x)?)?;
        self.down_proj.forward(&(gate * self.up_proj.forward(x)?)?)
    }
}

/// RMSNorm with its weight at hand: inference uses candle's fused kernel, training the plain ops
/// (the fused kernel has no backward pass).
#[derive(Debug, Clone)]
pub struct Norm {
    fused: RmsNorm,
    weight: Tensor,
    eps: f32,
}

impl Norm {
    pub fn load(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get(size, "weight")?;
        Ok(Self { fused: RmsNorm::new(weight.clone(), eps), weight, eps: eps as f32 })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.fused.forward(x)?)
    }

    pub fn forward_differentiable(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm_slow(x, &self.weight, self.eps)?)
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

#[derive(Debug, Clone)]
pub struct DecoderLayer {
    input_layernorm: Norm,
    self_attn: Attention,
    post_attention_layernorm: Norm,
    mlp: Mlp,
}

impl DecoderLayer {
    pub fn load(w: &Weights, cfg: &Config) -> Result<Self> {
        Ok(Self {
            input_layernorm: Norm::load(cfg.hidden_size, cfg.rms_norm_eps, w.vb().pp("input_layernorm"))?,
            self_attn: Attention::load(&w.pp("self_attn"), cfg)?,
            post_attention_layernorm: Norm::load(cfg.hidden_size, cfg.rms_norm_eps, w.vb().pp("post_attention_layernorm"))?,
            mlp: Mlp::load(&w.pp("mlp"), cfg)?,
        })
    }

    /// Every projection of the block.
    pub fn projs(&self) -> impl Iterator<Item = &Proj> {
        let (a, m) = (&self.self_attn, &self.mlp);
        [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &m.gate_proj, &m.up_proj, &m.down_proj].into_iter()
    }

    /// Runs the block on `seq` new positions starting at `pos`, appending their keys and values to `cache`.
    ///
    /// # Shapes
    /// x: (batch, seq, hidden) -> (batch, seq, hidden)
    pub fn forward(&self, x: &Tensor, rope: &Rope, pos: usize, cache: &mut LayerCache) -> Result<Tensor> {
        let h = self.self_attn.forward(&self.input_layernorm.forward(x)?, rope, pos, cache)?;
        let x = (x + h)?;
        let h = self.mlp.forward(&self.post_attention_layernorm.forward(&x)?)?;
        Ok((x + h)?)
    }

    /// Several sessions' rows in one pass (see `Attention::forward_ragged`); CPU and f32 only.
    ///
    /// # Shapes
    /// x: (1, rows, hidden) -> (1, rows, hidden)
    pub fn forward_ragged(&self, x: &Tensor, rope: &Rope, segments: &[(usize, usize)], caches: &mut [&mut LayerCache]) -> Result<Tensor> {
        let h = self.self_attn.forward_ragged(&self.input_layernorm.forward(x)?, rope, segments, caches)?;
        let x = (x + h)?;
        let h = self.mlp.forward(&self.post_attention_layernorm.forward(&x)?)?;
        Ok((x + h)?)
    }

    /// One unrolled draft step of training (see `Attention::forward_unrolled`), differentiable.
    ///
    /// # Shapes
    /// x: (batch, seq, hidden) -> (batch, seq, hidden)
    pub fn forward_unrolled(&self, x: &Tensor, rope: &Rope, past: &mut Vec<(Tensor, Tensor)>) -> Result<Tensor> {
        let h = self.self_attn.forward_unrolled(&self.input_layernorm.forward_differentiable(x)?, rope, past)?;
        let x = (x + h)?;
        let h = self.mlp.forward(&self.post_attention_layernorm.forward_differentiable(&x)?)?;
        Ok((x + h)?)
    }

    /// The block on positions `0..seq` without a cache, differentiable end to end (training).
    ///
    /// # Shapes
    /// x: (batch, seq, hidden) -> (batch, seq, hidden)
    pub fn forward_differentiable(&self, x: &Tensor, rope: &Rope) -> Result<Tensor> {
        let h = self.self_attn.forward_differentiable(&self.input_layernorm.forward_differentiable(x)?, rope)?;
        let x = (x + h)?;
        let h = self.mlp.forward(&self.post_attention_layernorm.forward_differentiable(&x)?)?;
        Ok((x + h)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn visible(mask: &Tensor) -> Vec<Vec<bool>> {
        let m = mask.to_vec2::<f32>().expect("mask");
        m.iter().map(|r| r.iter().map(|v| v.is_finite()).collect()).collect()
    }

    /// Step 0 is plain causal attention; at step s the query at q sees the true keys up to q - s and
    /// one key of each later step, on its own chain.
    #[test]
    fn unrolled_mask_follows_the_draft_chain() -> Result<()> {
        let seq = 5;
        let step0 = visible(&unrolled_mask(seq, 0, 1, DType::F32, &Device::Cpu)?);
        let causal = visible(&causal_mask(seq, 0, 1, DType::F32, &Device::Cpu)?);
        assert_eq!(step0, causal);
        let step2 = visible(&unrolled_mask(seq, 2, 2, DType::F32, &Device::Cpu)?);
        assert_eq!(step2.len(), 2 * seq, "one block per folded query head");
        let q = 4;
        let seen: Vec<usize> = (0..3 * seq).filter(|&j| step2[q][j]).collect();
        // Step 0 keys 0..=2, step 1 key at 3, step 2 key at 4.
        assert_eq!(seen, vec![0, 1, 2, seq + 3, 2 * seq + 4]);
        assert_eq!(step2[q], step2[seq + q], "the second folded head sees the same");
        // A query whose chain starts before the window still sees itself.
        assert_eq!((0..3 * seq).filter(|&j| step2[0][j]).collect::<Vec<_>>(), vec![2 * seq]);
        Ok(())
    }
}
