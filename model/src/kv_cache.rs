//! Per-layer key/value cache, kept outside the weights. `truncate` is what makes speculative decoding
//! and position-addressed cloud messages cheap: rejected drafts are dropped by moving the length back.

use candle_core::Tensor;

use crate::error::Result;

const INITIAL_CAPACITY: usize = 256;

/// Keys and values of one attention layer, stored in a buffer that grows by doubling, up to a
/// limit when one is set.
#[derive(Debug, Clone)]
pub struct LayerCache {
    k: Option<Tensor>,
    v: Option<Tensor>,
    len: usize,
    limit: usize,
}

impl Default for LayerCache {
    fn default() -> Self {
        Self { k: None, v: None, len: 0, limit: usize::MAX }
    }
}

impl LayerCache {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Drops every position at or after `len`.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Appends new keys and values and returns the whole cached sequence.
    ///
    /// # Shapes
    /// k, v: (batch, kv_heads, seq, head_dim) -> (batch, kv_heads, len + seq, head_dim) each
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let seq = k.dim(2)?;
        let needed = self.len + seq;
        let capacity = self.k.as_ref().map(|t| t.dim(2)).transpose()?.unwrap_or(0);
        if needed > capacity {
            let new_cap = needed.max((capacity * 2).max(INITIAL_CAPACITY).min(self.limit));
            self.k = Some(grow(self.k.take(), k, self.len, new_cap)?);
            self.v = Some(grow(self.v.take(), v, self.len, new_cap)?);
        }
        let (kb, vb) = match (&self.k, &self.v) {
            (Some(kb), Some(vb)) => (kb, vb),
            _ => unreachable!("buffers are allocated above"),
        };
        kb.slice_set(&k.contiguous()?, 2, self.len)?;
        vb.slice_set(&v.contiguous()?, 2, self.len)?;
        self.len = needed;
        Ok((kb.narrow(2, 0, needed)?, vb.narrow(2, 0, needed)?))
    }
}

fn grow(old: Option<Tensor>, like: &Tensor, keep: usize, cap: usize) -> Result<Tensor> {
    let (b, h, _, d) = like.dims4()?;
    let buf = Tensor::zeros((b, h, cap, d), like.dtype(), like.device())?;
    if let Some(old) = old {
        if keep > 0 {
            buf.slice_set(&old.narrow(2, 0, keep)?.contiguous()?, 2, 0)?;
        }
    }
    Ok(buf)
}

/// The caches of a contiguous run of decoder layers (one submodel, or the adapter).
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<LayerCache>,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self { layers: vec![LayerCache::default(); num_layers] }
    }

    /// A cache whose buffers never grow past `positions` (unless more are appended): a cloud that
    /// grants a session that many positions then knows its memory bound.
    pub fn with_limit(num_layers: usize, positions: usize) -> Self {
        Self { layers: vec![LayerCache { limit: positions, ..LayerCache::default() }; num_layers] }
    }

    /// Positions the buffers can hold before growing.
    pub fn capacity(&self) -> usize {
        self.layers.first().and_then(|l| l.k.as_ref()).map_or(0, |k| k.dim(2).unwrap_or(0))
    }

    /// Cached sequence length (all layers advance together).
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, LayerCache::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn truncate(&mut self, len: usize) {
        self.layers.iter_mut().for_each(|l| l.truncate(len));
    }

    pub fn layer_mut(&mut self, i: usize) -> &mut LayerCache {
        &mut self.layers[i]
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn append_truncate_and_grow_keep_values() -> Result<()> {
        let dev = Device::Cpu;
        let mut c = LayerCache::default();
        let a = Tensor::arange(0f32, 300.0 * 2.0, &dev)?.reshape((1, 1, 300, 2))?;
        let (k, _) = c.append(&a, &a)?;
        assert_eq!(k.dims(), &[1, 1, 300, 2]);
        c.truncate(10);
        let b = Tensor::full(-1f32, (1, 1, 300, 2), &dev)?;
        let (k, _) = c.append(&b, &b)?;
        assert_eq!(c.len(), 310);
        let k = k.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(k[19], 19.0);
        assert_eq!(k[20], -1.0);
        assert_eq!(k[619], -1.0);
        Ok(())
    }

    #[test]
    fn a_limit_caps_growth() -> Result<()> {
        let dev = Device::Cpu;
        let mut c = KvCache::with_limit(1, 300);
        let a = Tensor::zeros((1, 1, 200, 2), DType::F32, &dev)?;
        c.layer_mut(0).append(&a, &a)?;
        assert_eq!(c.capacity(), 256);
        c.layer_mut(0).append(&a.narrow(2, 0, 90)?, &a.narrow(2, 0, 90)?)?;
        assert_eq!(c.capacity(), 300, "doubling stops at the limit");
        Ok(())
    }
}
