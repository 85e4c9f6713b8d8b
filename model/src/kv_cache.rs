//! Per-layer key/value cache, kept outside the weights. `truncate` is what makes speculative decoding
//! and position-addressed cloud messages cheap: rejected drafts are dropped by moving the length back.
//!
//! A sliding-window layer keeps only the keys a future row can still see, plus [`REWIND`] more, so a
//! long session's memory stays bounded there. A rollback deeper than `REWIND` positions on such a
//! layer is refused (hat rolls back at most the drafts of one round; a reconnecting device replays
//! into a fresh cache).

use candle_core::Tensor;

use crate::error::Result;

const INITIAL_CAPACITY: usize = 256;

/// Positions a sliding-window layer keeps beyond its window, so a rollback of up to this many
/// positions still finds every key it needs.
pub const REWIND: usize = 64;

/// Keys and values of one attention layer, stored in a buffer that grows by doubling, up to a
/// limit when one is set. The buffer holds positions `start..len`; `start` stays 0 except on a
/// sliding-window layer.
#[derive(Debug, Clone)]
pub struct LayerCache {
    k: Option<Tensor>,
    v: Option<Tensor>,
    start: usize,
    len: usize,
    limit: usize,
    window: Option<usize>,
}

impl Default for LayerCache {
    fn default() -> Self {
        Self { k: None, v: None, start: 0, len: 0, limit: usize::MAX, window: None }
    }
}

impl LayerCache {
    /// A cache for a layer that attends to the last `window` positions (`None`: to all).
    pub fn windowed(window: Option<usize>) -> Self {
        Self { window, ..Self::default() }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The first position the buffer still holds (the keys `append` returns start there).
    pub fn start(&self) -> usize {
        self.start
    }

    /// Drops every position at or after `len`. Going back to 0 empties the cache (a new prompt);
    /// otherwise the length never drops below what the buffer holds: a rollback past a sliding
    /// window's kept keys leaves the length above the target, and the caller refuses it.
    pub fn truncate(&mut self, len: usize) {
        if len == 0 {
            (self.start, self.len) = (0, 0);
        } else {
            self.len = self.len.min(len).max(self.start);
        }
    }

    /// Keeps the keys and values at slot `from` as position `to` and drops everything after it: a
    /// round with leaves left an accepted leaf at slot `from`, after the chain rows it replaced.
    /// Needs `start <= to <= from < len` (a leaf right after the chain is already in place).
    pub fn promote(&mut self, from: usize, to: usize) -> Result<()> {
        self.check_promote(from, to)?;
        if let (Some(k), Some(v), true) = (&self.k, &self.v, from != to) {
            let (f, t) = (from - self.start, to - self.start);
            // A copy: the source must not share the buffer it is written into.
            k.slice_set(&k.narrow(2, f, 1)?.copy()?.contiguous()?, 2, t)?;
            v.slice_set(&v.narrow(2, f, 1)?.copy()?.contiguous()?, 2, t)?;
        }
        self.len = to + 1;
        Ok(())
    }

    fn check_promote(&self, from: usize, to: usize) -> Result<()> {
        if self.start <= to && to <= from && from < self.len {
            return Ok(());
        }
        Err(crate::error::ModelError::InvalidConfig(format!(
            "cannot keep slot {from} as position {to}: the cache holds {}..{}",
            self.start, self.len
        )))
    }

    /// Appends new keys and values and returns the cached sequence from [`LayerCache::start`].
    ///
    /// # Shapes
    /// k, v: (batch, kv_heads, seq, head_dim) -> (batch, kv_heads, len + seq - start, head_dim) each
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let seq = k.dim(2)?;
        let capacity = self.k.as_ref().map(|t| t.dim(2)).transpose()?.unwrap_or(0);
        if self.len - self.start + seq > capacity {
            // Out of room: a sliding layer first drops the keys no row will see again.
            let (from, new_cap) = match self.window {
                Some(w) => {
                    let keep = w + REWIND;
                    let from = self.len.saturating_sub(keep).max(self.start);
                    (from, (self.len - from + seq).max(keep + INITIAL_CAPACITY))
                }
                None => (self.start, (self.len + seq).max((capacity * 2).max(INITIAL_CAPACITY).min(self.limit))),
            };
            let (held_from, held) = (from - self.start, self.len - from);
            self.k = Some(rebuild(self.k.take(), k, held_from, held, new_cap)?);
            self.v = Some(rebuild(self.v.take(), v, held_from, held, new_cap)?);
            self.start = from;
        }
        let (kb, vb) = match (&self.k, &self.v) {
            (Some(kb), Some(vb)) => (kb, vb),
            _ => unreachable!("buffers are allocated above"),
        };
        let at = self.len - self.start;
        kb.slice_set(&k.contiguous()?, 2, at)?;
        vb.slice_set(&v.contiguous()?, 2, at)?;
        self.len += seq;
        Ok((kb.narrow(2, 0, at + seq)?, vb.narrow(2, 0, at + seq)?))
    }
}

/// A buffer of `cap` positions holding rows `from..from + count` of `old` at its front.
fn rebuild(old: Option<Tensor>, like: &Tensor, from: usize, count: usize, cap: usize) -> Result<Tensor> {
    let (b, h, _, d) = like.dims4()?;
    let buf = Tensor::zeros((b, h, cap, d), like.dtype(), like.device())?;
    if let Some(old) = old {
        if count > 0 {
            buf.slice_set(&old.narrow(2, from, count)?.contiguous()?, 2, 0)?;
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

    /// One layer cache per entry of `windows` (see [`LayerCache::windowed`]), whose buffers never
    /// grow past `limit` positions (unless more are appended): a cloud that grants a session that
    /// many positions then knows its memory bound.
    pub fn with_windows(windows: &[Option<usize>], limit: usize) -> Self {
        Self { layers: windows.iter().map(|&window| LayerCache { limit, window, ..LayerCache::default() }).collect() }
    }

    /// A cache whose buffers never grow past `positions` (unless more are appended).
    pub fn with_limit(num_layers: usize, positions: usize) -> Self {
        Self::with_windows(&vec![None; num_layers], positions)
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

    /// The first position every layer still holds (0 unless a sliding-window layer dropped keys).
    pub fn start(&self) -> usize {
        self.layers.iter().map(LayerCache::start).max().unwrap_or(0)
    }

    /// [`LayerCache::promote`] on every layer; on a refusal no layer has changed.
    pub fn promote(&mut self, from: usize, to: usize) -> Result<()> {
        self.layers.iter().try_for_each(|l| l.check_promote(from, to))?;
        self.layers.iter_mut().try_for_each(|l| l.promote(from, to))
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

    /// An accepted leaf's keys and values move to its position and everything after goes; a
    /// refused move changes no layer.
    #[test]
    fn promote_keeps_a_leaf_at_its_position() -> Result<()> {
        let dev = Device::Cpu;
        let mut c = KvCache::new(2);
        let a = Tensor::arange(0f32, 24.0, &dev)?.reshape((1, 2, 6, 2))?;
        for i in 0..2 {
            c.layer_mut(i).append(&a, &(&a + 100.0)?)?;
        }
        assert!(c.promote(6, 3).is_err() && c.promote(2, 3).is_err());
        assert_eq!(c.len(), 6);
        c.promote(5, 3)?;
        assert_eq!(c.len(), 4);
        let (k, v) = c.layer_mut(1).append(&a.narrow(2, 0, 1)?, &a.narrow(2, 0, 1)?)?;
        // Head 1's slot 3 now holds what slot 5 held; slots 0..3 are unchanged.
        let k = k.squeeze(0)?.to_vec3::<f32>()?;
        assert_eq!(k[1][3], vec![22.0, 23.0]);
        assert_eq!(k[1][2], vec![16.0, 17.0]);
        assert_eq!(v.dims(), &[1, 2, 5, 2]);
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

    /// A sliding layer keeps its window plus `REWIND` positions, returns them with their start,
    /// and refuses (by keeping its length) a rollback past them.
    #[test]
    fn a_window_bounds_the_buffer() -> Result<()> {
        let dev = Device::Cpu;
        let mut c = LayerCache::windowed(Some(100));
        let row = |p: usize| Tensor::full(p as f32, (1, 1, 1, 2), &dev);
        for p in 0..2000 {
            let (k, _) = c.append(&row(p)?, &row(p)?)?;
            assert_eq!(c.start() + k.dim(2)?, p + 1);
            let first = k.narrow(2, 0, 1)?.flatten_all()?.to_vec1::<f32>()?[0];
            assert_eq!(first as usize, c.start(), "the buffer starts at `start`");
            assert!(p < 100 + REWIND || c.start() + 100 + REWIND <= p + 1, "position {p}: the window and the rewind are kept");
        }
        let cap = c.k.as_ref().map(|k| k.dim(2)).transpose()?.unwrap_or(0);
        assert!(cap <= 100 + REWIND + INITIAL_CAPACITY, "capacity {cap} stays bounded");
        c.truncate(2000 - REWIND);
        assert_eq!(c.len(), 2000 - REWIND);
        let (k, _) = c.append(&row(7)?, &row(7)?)?;
        assert_eq!(k.narrow(2, k.dim(2)? - 1, 1)?.flatten_all()?.to_vec1::<f32>()?, vec![7.0, 7.0]);
        c.truncate(100);
        assert_eq!(c.len(), c.start(), "a rollback past the kept keys stops at them");
        c.truncate(0);
        assert_eq!((c.len(), c.start()), (0, 0), "a new prompt starts from an empty cache");
        let (k, _) = c.append(&row(3)?, &row(3)?)?;
        assert_eq!(k.flatten_all()?.to_vec1::<f32>()?, vec![3.0, 3.0]);
        Ok(())
    }
}
