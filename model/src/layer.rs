//! One decoder block for every family: RMSNorm, grouped-query attention with rotary positions, a
//! gated MLP. The family's options come from [`Config`]: Q/K/V biases, per-head Q/K norms, Gemma's
//! sandwich norms, the activation, the attention scale, and a sliding window on some layers (with
//! their own rope base). Blocks are loaded under their Hugging Face names, so
//! `vb.pp("model.layers").pp(i)` finds layer i.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{RmsNorm, VarBuilder};

use crate::attention::Span;
use crate::config::{Activation, Config};
use crate::error::{ModelError, Result};
use crate::kv_cache::LayerCache;
use crate::rope::{Rope, Ropes};
use crate::weights::{Proj, Weights};

/// One session's rows in a ragged batch (see `DecoderLayer::forward_ragged`): `seq` rows from
/// position `pos`, shaped by `depths` as in `attention::attend_tree` (`None`: a chain).
#[derive(Debug, Clone, Copy)]
pub struct Segment<'a> {
    pub pos: usize,
    pub seq: usize,
    pub depths: Option<&'a [usize]>,
}

#[derive(Debug, Clone)]
struct Attention {
    q_proj: Proj,
    k_proj: Proj,
    v_proj: Proj,
    o_proj: Proj,
    /// Per-head RMSNorm of queries and keys before rope (Qwen3, Gemma 3).
    qk_norm: Option<(Norm, Norm)>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    scale: f32,
    window: Option<usize>,
}

impl Attention {
    fn load(w: &Weights, cfg: &Config, layer: usize) -> Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let qk_norm = if cfg.qk_norm {
            let norm = |name: &str| Norm::load_offset(d, cfg.rms_norm_eps, cfg.norm_weight_offset, w.vb().pp(name));
            Some((norm("q_norm")?, norm("k_norm")?))
        } else {
            None
        };
        Ok(Self {
            q_proj: w.proj(h, cfg.num_heads * d, cfg.attention_bias, "q_proj")?,
            k_proj: w.proj(h, cfg.num_kv_heads * d, cfg.attention_bias, "k_proj")?,
            v_proj: w.proj(h, cfg.num_kv_heads * d, cfg.attention_bias, "v_proj")?,
            o_proj: w.proj(cfg.num_heads * d, h, false, "o_proj")?,
            qk_norm,
            num_heads: cfg.num_heads,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: d,
            scale: cfg.attn_scale as f32,
            window: cfg.window(layer),
        })
    }

    fn span(&self, key_start: usize) -> Span {
        Span { key_start, window: self.window, scale: self.scale }
    }

    /// # Shapes
    /// x: (batch, seq, hidden) -> q: (batch, heads, seq, head_dim), k and v: (batch, kv_heads, seq, head_dim)
    fn project(&self, x: &Tensor, differentiable: bool) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, seq, _) = x.dims3()?;
        let heads = |t: Tensor, n: usize| -> Result<Tensor> { Ok(t.reshape((b, seq, n, self.head_dim))?.transpose(1, 2)?.contiguous()?) };
        let [q, k, v] = Proj::forward_shared([&self.q_proj, &self.k_proj, &self.v_proj], x)?;
        let (mut q, mut k) = (heads(q, self.num_heads)?, heads(k, self.num_kv_heads)?);
        if let Some((qn, kn)) = &self.qk_norm {
            (q, k) = if differentiable {
                (qn.forward_differentiable(&q)?, kn.forward_differentiable(&k)?)
            } else {
                (qn.forward(&q)?, kn.forward(&k)?)
            };
        }
        Ok((q, k, heads(v, self.num_kv_heads)?))
    }

    /// # Shapes
    /// x: (batch, seq, hidden) -> (batch, seq, hidden)
    /// `depths`: the round's shape (see `attention::attend_tree`); `None` for a chain.
    ///
    /// # Shapes
    /// x: (batch, seq, hidden) -> (batch, seq, hidden)
    fn forward(&self, x: &Tensor, rope: &Rope, pos: usize, depths: Option<&[usize]>, cache: &mut LayerCache) -> Result<Tensor> {
        let (q, k, v) = self.project(x, false)?;
        let q = rope.apply_rows(&q, pos, depths)?;
        let k = rope.apply_rows(&k, pos, depths)?;
        let (k, v) = cache.append(&k, &v)?;
        let span = self.span(cache.start());
        if q.device().is_cpu() && q.dtype() == DType::F32 {
            // Batch-invariant: see `crate::attention`.
            let (b, _, seq, _) = q.dims4()?;
            let out = crate::attention::attend_tree(&q, &k, &v, pos, span, depths)?;
            let out = out.transpose(1, 2)?.reshape((b, seq, self.num_heads * self.head_dim))?;
            return self.o_proj.forward(&out);
        }
        self.attend(&q, &k, &v, pos, span, depths, false)
    }

    /// Several sessions' new rows in one pass: `x` holds their rows back to back, `segments[i]` is
    /// session i's (first position, row count) and `caches[i]` its cache. Projections run once over
    /// all rows; rotary positions, the cache and attention are each session's own. Every operation is
    /// row by row (quantized matmuls quantize each row alone; attention is `attend_rows`), so a row
    /// gets the bits it would get in its session alone.
    ///
    /// # Shapes
    /// x: (1, rows, hidden) -> (1, rows, hidden)
    fn forward_ragged(&self, x: &Tensor, rope: &Rope, segments: &[Segment], caches: &mut [&mut LayerCache]) -> Result<Tensor> {
        let (q, k, v) = self.project(x, false)?;
        // Every session's rows turn at their own positions, all in one pass.
        let at: Vec<usize> = segments.iter().flat_map(|s| (0..s.seq).map(move |i| s.pos + s.depths.map_or(i, |d| d[i]))).collect();
        let (q, k) = (rope.apply_at(&q, &at)?, rope.apply_at(&k, &at)?);
        let mut outs = Vec::with_capacity(segments.len());
        let mut offset = 0;
        for (&Segment { pos, seq, depths }, cache) in segments.iter().zip(caches.iter_mut()) {
            let q = q.narrow(2, offset, seq)?;
            let (k, v) = cache.append(&k.narrow(2, offset, seq)?, &v.narrow(2, offset, seq)?)?;
            let out = crate::attention::attend_tree(&q, &k, &v, pos, self.span(cache.start()), depths)?;
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
        let (q, k, v) = self.project(x, true)?;
        let q = rope.apply_differentiable(&q, 0)?;
        let k = rope.apply_differentiable(&k, 0)?;
        self.attend(&q, &k, &v, 0, self.span(0), None, true)
    }

    /// One unrolled draft step in training (EAGLE-3's training-time test), differentiable. Step
    /// `s = past.len()` of a chain that started from true features `s` positions earlier: the query at
    /// position q sees step 0's keys at positions `..=q - s` (the true context, within the window on
    /// a sliding layer) and step j's key at `q - s + j` (the chain's own earlier drafts), exactly what
    /// the draft cache holds at inference. This step's keys and values are pushed onto `past`.
    ///
    /// # Shapes
    /// x: (batch, seq, hidden) -> (batch, seq, hidden); past: per step (batch, kv_heads, seq, head_dim) keys and values
    fn forward_unrolled(&self, x: &Tensor, rope: &Rope, past: &mut Vec<(Tensor, Tensor)>) -> Result<Tensor> {
        let (q, k, v) = self.project(x, true)?;
        let q = rope.apply_differentiable(&q, 0)?;
        let k = rope.apply_differentiable(&k, 0)?;
        past.push((k, v));
        let (b, _, seq, _) = q.dims4()?;
        let step = past.len() - 1;
        if self.window.is_some_and(|w| step >= w) {
            return Err(ModelError::InvalidConfig(format!("{} unrolled steps reach past the sliding window", step + 1)));
        }
        let keys: Vec<&Tensor> = past.iter().map(|(k, _)| k).collect();
        let values: Vec<&Tensor> = past.iter().map(|(_, v)| v).collect();
        let (k, v) = (Tensor::cat(&keys, 2)?, Tensor::cat(&values, 2)?);
        let rep = self.num_heads / self.num_kv_heads;
        let q = q.reshape((b, self.num_kv_heads, rep * seq, self.head_dim))?;
        let scores = (q.matmul(&k.transpose(2, 3)?)? * self.scale as f64)?;
        let mask = unrolled_mask(seq, step, rep, self.window, scores.dtype(), scores.device())?;
        let probs = candle_nn::ops::softmax(&scores.broadcast_add(&mask)?, candle_core::D::Minus1)?;
        let out = probs.matmul(&v)?;
        let out =
            out.reshape((b, self.num_heads, seq, self.head_dim))?.transpose(1, 2)?.reshape((b, seq, self.num_heads * self.head_dim))?;
        self.o_proj.forward(&out)
    }

    /// # Shapes
    /// q: (batch, heads, seq, head_dim), k and v: (batch, kv_heads, pos + seq - span.key_start, head_dim) -> (batch, seq, hidden)
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        pos: usize,
        span: Span,
        depths: Option<&[usize]>,
        differentiable: bool,
    ) -> Result<Tensor> {
        let (b, _, seq, _) = q.dims4()?;
        // Grouped-query attention without copying K/V per head: fold the query heads that share a KV
        // head into the sequence axis. (b, kv, rep*seq, d) x (b, kv, d, total)
        let rep = self.num_heads / self.num_kv_heads;
        let q = q.reshape((b, self.num_kv_heads, rep * seq, self.head_dim))?;
        let k_t = k.transpose(2, 3)?;
        let mut scores = (q.matmul(&k_t)? * span.scale as f64)?;
        if seq > 1 || span.window.is_some() {
            let mask = causal_mask(seq, pos, rep, span, depths, scores.dtype(), scores.device())?;
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

/// Additive mask for `seq` new positions starting at `pos` over the keys from `span.key_start`,
/// repeated for `rep` query heads folded into the sequence axis. With `depths`, row i sees the keys
/// before its position `pos + depths[i]` and its own key at slot `pos + i` (as
/// `attention::attend_tree`).
///
/// # Shapes
/// -> (rep * seq, pos + seq - span.key_start)
fn causal_mask(seq: usize, pos: usize, rep: usize, span: Span, depths: Option<&[usize]>, dtype: DType, device: &Device) -> Result<Tensor> {
    if let Some(t) = depths {
        crate::attention::check_depths(t, seq)?;
    }
    let total = pos + seq - span.key_start;
    let mut data = Vec::with_capacity(rep * seq * total);
    for _ in 0..rep {
        for i in 0..seq {
            let seen = span.keys(pos + depths.map_or(i, |t| t[i]));
            let sees = |slot: usize| slot == pos + i || (seen.start <= slot && slot + 1 < seen.end);
            data.extend((0..total).map(|j| if sees(j + span.key_start) { 0.0 } else { f32::NEG_INFINITY }));
        }
    }
    Ok(Tensor::from_vec(data, (rep * seq, total), device)?.to_dtype(dtype)?)
}

/// The additive mask of unrolled step `step` over the keys of steps `0..=step`, each `seq` long (see
/// `Attention::forward_unrolled`), true keys limited to `window` on a sliding layer. Every query sees
/// at least its own key, so no row is all masked.
///
/// # Shapes
/// -> (rep * seq, (step + 1) * seq)
fn unrolled_mask(seq: usize, step: usize, rep: usize, window: Option<usize>, dtype: DType, device: &Device) -> Result<Tensor> {
    let total = (step + 1) * seq;
    let mut row = vec![0f32; total];
    let mut data = Vec::with_capacity(rep * seq * total);
    for q in 0..seq {
        for (j, r) in row.iter_mut().enumerate() {
            let (s, key) = (j / seq, j % seq);
            let in_window = window.is_none_or(|w| q < key + w);
            let visible = if s == 0 { key + step <= q && in_window } else { key + step == q + s };
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
    activation: Activation,
}

impl Mlp {
    fn load(w: &Weights, cfg: &Config) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_proj: w.proj(h, i, cfg.mlp_bias, "gate_proj")?,
            up_proj: w.proj(h, i, cfg.mlp_bias, "up_proj")?,
            down_proj: w.proj(i, h, cfg.mlp_bias, "down_proj")?,
            activation: cfg.activation,
        })
    }

    /// `differentiable`: candle's ops throughout (training), else hat's one-pass `silu(gate) * up`
    /// on the CPU, with the same bits.
    ///
    /// # Shapes
    /// x: (batch, seq, hidden) -> (batch, seq, hidden)
    fn forward(&self, x: &Tensor, differentiable: bool) -> Result<Tensor> {
        let [gate, up] = Proj::forward_shared([&self.gate_proj, &self.up_proj], x)?;
        let gated = match self.activation {
            Activation::Silu if !differentiable && crate::cpu::runs(&gate) && crate::cpu::runs(&up) => crate::cpu::silu_mul(&gate, &up)?,
            Activation::Silu => (candle_nn::ops::silu(&gate)? * up)?,
            Activation::GeluTanh => (gate.gelu()? * up)?,
        };
        self.down_proj.forward(&gated)
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
        Self::load_offset(size, eps, 0.0, vb)
    }

    /// A norm that multiplies by `offset + w` (Gemma's `1 + w`); [`Norm::weight`] is that sum.
    pub fn load_offset(size: usize, eps: f64, offset: f64, vb: VarBuilder) -> Result<Self> {
        let mut weight = vb.get(size, "weight")?;
        if offset != 0.0 {
            weight = (weight + offset)?;
        }
        Ok(Self { fused: RmsNorm::new(weight.clone(), eps), weight, eps: eps as f32 })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if crate::cpu::runs(x) && crate::cpu::runs(&self.weight) {
            return crate::cpu::rms_norm(x, &self.weight, self.eps);
        }
        Ok(self.fused.forward(x)?)
    }

    pub fn forward_differentiable(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm_slow(x, &self.weight, self.eps)?)
    }

    /// The weight the input is multiplied by (with the family's offset added).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

/// Gemma's extra norms: after the attention, the MLP's input is normalised by `pre_feedforward`
/// and its output by `post_feedforward` (and `post_attention_layernorm` normalises the attention's
/// output instead of the MLP's input).
#[derive(Debug, Clone)]
struct SandwichNorms {
    pre_feedforward: Norm,
    post_feedforward: Norm,
}

#[derive(Debug, Clone)]
pub struct DecoderLayer {
    input_layernorm: Norm,
    self_attn: Attention,
    post_attention_layernorm: Norm,
    sandwich: Option<SandwichNorms>,
    mlp: Mlp,
}

impl DecoderLayer {
    /// Layer `layer` (its original index: it decides a sliding window) from `w`.
    pub fn load(w: &Weights, cfg: &Config, layer: usize) -> Result<Self> {
        let norm = |name: &str| Norm::load_offset(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_weight_offset, w.vb().pp(name));
        let sandwich = if cfg.sandwich_norms {
            Some(SandwichNorms {
                pre_feedforward: norm("pre_feedforward_layernorm")?,
                post_feedforward: norm("post_feedforward_layernorm")?,
            })
        } else {
            None
        };
        Ok(Self {
            input_layernorm: norm("input_layernorm")?,
            self_attn: Attention::load(&w.pp("self_attn"), cfg, layer)?,
            post_attention_layernorm: norm("post_attention_layernorm")?,
            sandwich,
            mlp: Mlp::load(&w.pp("mlp"), cfg)?,
        })
    }

    /// Every projection of the block.
    pub fn projs(&self) -> impl Iterator<Item = &Proj> {
        let (a, m) = (&self.self_attn, &self.mlp);
        [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &m.gate_proj, &m.up_proj, &m.down_proj].into_iter()
    }

    /// The attention span of this layer: `Some(window)` on a sliding-window layer.
    pub fn window(&self) -> Option<usize> {
        self.self_attn.window
    }

    /// The residual block around `attend` (the attention, however it runs), with the fused norms or
    /// the differentiable ones.
    fn block(&self, x: &Tensor, differentiable: bool, attend: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let norm = |n: &Norm, t: &Tensor| if differentiable { n.forward_differentiable(t) } else { n.forward(t) };
        let mut h = attend(&norm(&self.input_layernorm, x)?)?;
        let (pre_mlp, post_mlp) = match &self.sandwich {
            Some(s) => {
                h = norm(&self.post_attention_layernorm, &h)?;
                (&s.pre_feedforward, Some(&s.post_feedforward))
            }
            None => (&self.post_attention_layernorm, None),
        };
        let x = (x + h)?;
        let mut h = self.mlp.forward(&norm(pre_mlp, &x)?, differentiable)?;
        if let Some(n) = post_mlp {
            h = norm(n, &h)?;
        }
        Ok((x + h)?)
    }

    fn rope<'r>(&self, ropes: &'r Ropes) -> &'r Rope {
        ropes.get(self.self_attn.window.is_some())
    }

    /// Runs the block on `seq` new positions starting at `pos`, appending their keys and values to `cache`.
    ///
    /// # Shapes
    /// x: (batch, seq, hidden) -> (batch, seq, hidden)
    pub fn forward(&self, x: &Tensor, ropes: &Ropes, pos: usize, cache: &mut LayerCache) -> Result<Tensor> {
        self.forward_tree(x, ropes, pos, None, cache)
    }

    /// [`DecoderLayer::forward`] for a round shaped as a chain with leaves (see
    /// `attention::attend_tree`); `None` is a chain.
    ///
    /// # Shapes
    /// x: (batch, seq, hidden) -> (batch, seq, hidden)
    pub fn forward_tree(&self, x: &Tensor, ropes: &Ropes, pos: usize, depths: Option<&[usize]>, cache: &mut LayerCache) -> Result<Tensor> {
        self.block(x, false, |h| self.self_attn.forward(h, self.rope(ropes), pos, depths, cache))
    }

    /// Several sessions' rows in one pass (see `Attention::forward_ragged`); CPU and f32 only.
    ///
    /// # Shapes
    /// x: (1, rows, hidden) -> (1, rows, hidden)
    pub fn forward_ragged(&self, x: &Tensor, ropes: &Ropes, segments: &[Segment], caches: &mut [&mut LayerCache]) -> Result<Tensor> {
        self.block(x, false, |h| self.self_attn.forward_ragged(h, self.rope(ropes), segments, caches))
    }

    /// One unrolled draft step of training (see `Attention::forward_unrolled`), differentiable.
    ///
    /// # Shapes
    /// x: (batch, seq, hidden) -> (batch, seq, hidden)
    pub fn forward_unrolled(&self, x: &Tensor, ropes: &Ropes, past: &mut Vec<(Tensor, Tensor)>) -> Result<Tensor> {
        self.block(x, true, |h| self.self_attn.forward_unrolled(h, self.rope(ropes), past))
    }

    /// The block on positions `0..seq` without a cache, differentiable end to end (training).
    ///
    /// # Shapes
    /// x: (batch, seq, hidden) -> (batch, seq, hidden)
    pub fn forward_differentiable(&self, x: &Tensor, ropes: &Ropes) -> Result<Tensor> {
        self.block(x, true, |h| self.self_attn.forward_differentiable(h, self.rope(ropes)))
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
        let step0 = visible(&unrolled_mask(seq, 0, 1, None, DType::F32, &Device::Cpu)?);
        let span = Span { key_start: 0, window: None, scale: 1.0 };
        let causal = visible(&causal_mask(seq, 0, 1, span, None, DType::F32, &Device::Cpu)?);
        assert_eq!(step0, causal);
        let step2 = visible(&unrolled_mask(seq, 2, 2, None, DType::F32, &Device::Cpu)?);
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

    /// With a window, the true context of every step is the last `window` positions, and the masks
    /// of the dense path match the row path's spans.
    #[test]
    fn windows_limit_the_true_context() -> Result<()> {
        let (seq, w) = (6, 3);
        let step0 = visible(&unrolled_mask(seq, 0, 1, Some(w), DType::F32, &Device::Cpu)?);
        let span = Span { key_start: 0, window: Some(w), scale: 1.0 };
        assert_eq!(step0, visible(&causal_mask(seq, 0, 1, span, None, DType::F32, &Device::Cpu)?));
        assert_eq!((0..seq).filter(|&j| step0[5][j]).collect::<Vec<_>>(), vec![3, 4, 5]);
        let step1 = visible(&unrolled_mask(seq, 1, 1, Some(w), DType::F32, &Device::Cpu)?);
        // Query 5 at step 1: true keys 3 and 4 (the window of position 5 minus its own), its draft at 5.
        assert_eq!((0..2 * seq).filter(|&j| step1[5][j]).collect::<Vec<_>>(), vec![3, 4, seq + 5]);
        // Keys from 4 on, rows at 7 and 8: each sees its last 3.
        let cut = visible(&causal_mask(2, 7, 1, Span { key_start: 4, window: Some(w), scale: 1.0 }, None, DType::F32, &Device::Cpu)?);
        assert_eq!(cut, vec![vec![false, true, true, true, false], vec![false, false, true, true, true]]);
        Ok(())
    }
}
