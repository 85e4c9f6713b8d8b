//! Rotary position embedding in the Hugging Face (half-rotation) layout. GGUF checkpoints store Q/K
//! permuted for the interleaved layout; the splitter un-permutes them, so this is the only convention.

use candle_core::{DType, Device, Tensor};

use crate::config::Config;
use crate::error::{ModelError, Result};

#[derive(Debug, Clone)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

/// The rope of each kind of layer: global layers use `rope_theta` (and `rope_scaling`), Gemma 3's
/// sliding-window layers their own base without scaling.
#[derive(Debug, Clone)]
pub struct Ropes {
    global: Rope,
    local: Option<Rope>,
}

impl Ropes {
    pub fn new(cfg: &Config, dtype: DType, device: &Device) -> Result<Self> {
        let local = match cfg.rope_local_theta {
            Some(theta) if cfg.sliding_layers.iter().any(|&s| s) => Some(Rope::with_base(cfg, theta, false, dtype, device)?),
            _ => None,
        };
        Ok(Self { global: Rope::new(cfg, dtype, device)?, local })
    }

    /// The rope of a layer that slides (`true`) or attends globally.
    pub fn get(&self, sliding: bool) -> &Rope {
        match (&self.local, sliding) {
            (Some(local), true) => local,
            _ => &self.global,
        }
    }

    pub fn max_positions(&self) -> usize {
        self.global.max_positions()
    }
}

impl Rope {
    pub fn new(cfg: &Config, dtype: DType, device: &Device) -> Result<Self> {
        Self::with_base(cfg, cfg.rope_theta, true, dtype, device)
    }

    fn with_base(cfg: &Config, theta: f64, scaled: bool, dtype: DType, device: &Device) -> Result<Self> {
        let half = cfg.head_dim / 2;
        let mut inv_freq: Vec<f64> = (0..half).map(|i| 1.0 / theta.powf(2.0 * i as f64 / cfg.head_dim as f64)).collect();
        let scaling = cfg.rope_scaling.as_ref().filter(|_| scaled);
        if let Some(s) = scaling.filter(|s| s.rope_type == "linear") {
            // Positions divided by the factor.
            let factor = s.factor.unwrap_or(1.0);
            inv_freq.iter_mut().for_each(|f| *f /= factor);
        } else if let Some(s) = scaling {
            // Llama 3.x frequency-dependent scaling (as in the reference implementation).
            let factor = s.factor.unwrap_or(8.0);
            let low = s.low_freq_factor.unwrap_or(1.0);
            let high = s.high_freq_factor.unwrap_or(4.0);
            let orig = s.original_max_position_embeddings.unwrap_or(8192) as f64;
            let low_wavelen = orig / low;
            let high_wavelen = orig / high;
            for f in inv_freq.iter_mut() {
                let wavelen = 2.0 * std::f64::consts::PI / *f;
                if wavelen > low_wavelen {
                    *f /= factor;
                } else if wavelen >= high_wavelen {
                    let smooth = (orig / wavelen - low) / (high - low);
                    *f = (1.0 - smooth) * *f / factor + smooth * *f;
                }
            }
        }
        let max = cfg.max_position_embeddings;
        let mut angles = Vec::with_capacity(max * half);
        for p in 0..max {
            angles.extend(inv_freq.iter().map(|f| (p as f64 * f) as f32));
        }
        let angles = Tensor::from_vec(angles, (max, half), device)?;
        Ok(Self { cos: angles.cos()?.to_dtype(dtype)?, sin: angles.sin()?.to_dtype(dtype)? })
    }

    /// Rotates `x` for positions `pos..pos + seq`.
    ///
    /// # Shapes
    /// x: (batch, heads, seq, head_dim) -> same
    pub fn apply(&self, x: &Tensor, pos: usize) -> Result<Tensor> {
        if crate::cpu::runs(x) && crate::cpu::runs(&self.cos) {
            return crate::cpu::rope(x, &self.cos, &self.sin, |t| pos + t);
        }
        let seq = x.dim(2)?;
        let cos = self.cos.narrow(0, pos, seq)?;
        let sin = self.sin.narrow(0, pos, seq)?;
        Ok(candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin)?)
    }

    /// Rotates row i of `x` for position `pos + depths[i]` (a round with leaves, see
    /// `attention::attend_tree`); `None`: positions `pos..pos + seq`, as [`Rope::apply`]. The angles
    /// are the same table entries either way, so a row's bits do not depend on the round's shape.
    ///
    /// # Shapes
    /// x: (batch, heads, seq, head_dim) -> same
    pub fn apply_rows(&self, x: &Tensor, pos: usize, depths: Option<&[usize]>) -> Result<Tensor> {
        let Some(depths) = depths else { return self.apply(x, pos) };
        let at: Vec<usize> = depths.iter().map(|d| pos + d).collect();
        self.apply_at(x, &at)
    }

    /// Rotates row i of `x` for position `at[i]`: the same table entries, so the same bits, as
    /// rotating each row where it came from (a batch of sessions' rows turns in one pass).
    ///
    /// # Shapes
    /// x: (batch, heads, seq, head_dim), at: seq -> as x
    pub fn apply_at(&self, x: &Tensor, at: &[usize]) -> Result<Tensor> {
        if at.len() != x.dim(2)? {
            return Err(ModelError::InvalidConfig(format!("{} positions for {} rows", at.len(), x.dim(2)?)));
        }
        if crate::cpu::runs(x) && crate::cpu::runs(&self.cos) {
            return crate::cpu::rope(x, &self.cos, &self.sin, |t| at[t]);
        }
        let at: Vec<u32> = at.iter().map(|&p| p as u32).collect();
        let at = Tensor::new(at.as_slice(), self.cos.device())?;
        let (cos, sin) = (self.cos.index_select(&at, 0)?, self.sin.index_select(&at, 0)?);
        Ok(candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin)?)
    }

    /// [`Rope::apply`] through plain tensor ops, which have a backward pass (training).
    ///
    /// # Shapes
    /// x: (batch, heads, seq, head_dim) -> same
    pub fn apply_differentiable(&self, x: &Tensor, pos: usize) -> Result<Tensor> {
        let seq = x.dim(2)?;
        let cos = self.cos.narrow(0, pos, seq)?;
        let sin = self.sin.narrow(0, pos, seq)?;
        Ok(candle_nn::rotary_emb::rope_slow(&x.contiguous()?, &cos, &sin)?)
    }

    pub fn max_positions(&self) -> usize {
        self.cos.dims()[0]
    }
}
