//! Attention on the CPU one query row at a time, over exactly the keys that row may see, in a fixed
//! order. A row's result is then the same whatever batch it arrives in: a decode step (one row), a
//! verification round (the last token and its drafts) or a prefill chunk of any size. candle's batched
//! kernels sum a masked row of another length in another order, which differs in the last bits; on a
//! quantized package those bits can flip the 8-bit rounding of an activation and change a token, so
//! `hat` and chunked prefill would stop matching `--mode local`.

use candle_core::{DType, Storage, Tensor};
use rayon::prelude::*;

use crate::error::{ModelError, Result};

fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ar.iter().zip(br) {
        s += x * y;
    }
    s
}

/// Which keys a query row sees, and how its scores are scaled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Span {
    /// Absolute position of the first key passed in (a sliding-window cache drops old keys).
    pub key_start: usize,
    /// A row at position p sees keys `p - window + 1..=p` (Hugging Face's and llama.cpp's convention);
    /// `None`: every earlier key.
    pub window: Option<usize>,
    /// Scores are `q . k * scale`.
    pub scale: f32,
}

impl Span {
    /// The absolute positions row `p` attends to.
    pub fn keys(&self, p: usize) -> std::ops::Range<usize> {
        let first = match self.window {
            Some(w) => (p + 1).saturating_sub(w),
            None => 0,
        };
        first..p + 1
    }
}

/// Causal attention of `seq` new positions starting at `pos`: query row i sees the keys
/// `span.keys(pos + i)`. Query head h reads key/value head `h / (heads / kv_heads)`.
///
/// # Shapes
/// q: (batch, heads, seq, head_dim), k and v: (batch, kv_heads, pos + seq - key_start, head_dim) -> (batch, heads, seq, head_dim)
pub fn attend_rows(q: &Tensor, k: &Tensor, v: &Tensor, pos: usize, span: Span) -> Result<Tensor> {
    if q.dtype() != DType::F32 || !q.device().is_cpu() {
        return Err(ModelError::InvalidConfig("row attention needs f32 on the CPU".into()));
    }
    let (b, heads, seq, d) = q.dims4()?;
    let (_, kv_heads, total, _) = k.dims4()?;
    if span.key_start + total != pos + seq || heads % kv_heads != 0 {
        return Err(ModelError::InvalidConfig(format!("attention over {total} keys from {} for {seq} rows at {pos}", span.key_start)));
    }
    if let Some(first) = (0..seq).map(|i| span.keys(pos + i).start).find(|&f| f < span.key_start) {
        return Err(ModelError::InvalidConfig(format!("a row needs key {first}, but the cache starts at {}", span.key_start)));
    }
    let rep = heads / kv_heads;
    let q = q.contiguous()?;
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let (Storage::Cpu(qs), Storage::Cpu(kst), Storage::Cpu(vst)) = (&*qs, &*ks, &*vs) else {
        return Err(ModelError::InvalidConfig("row attention runs on the CPU only".into()));
    };
    // The cache's keys and values are read in place, through their strides (a narrowed view of the
    // cache buffer); only the last axis must be contiguous.
    let (kd, vd) = (&kst.as_slice::<f32>()?[kl.start_offset()..], &vst.as_slice::<f32>()?[vl.start_offset()..]);
    let qd = &qs.as_slice::<f32>()?[ql.start_offset()..];
    let (ks, vs) = (kl.stride(), vl.stride());
    if ks[3] != 1 || vs[3] != 1 {
        return Err(ModelError::InvalidConfig("keys and values must be contiguous along head_dim".into()));
    }
    let (scale, ks0) = (span.scale, span.key_start);
    let mut out = vec![0f32; b * heads * seq * d];
    out.par_chunks_mut(seq * d).enumerate().for_each(|(bh, dst)| {
        let (bi, h) = (bh / heads, bh % heads);
        let kv = h / rep;
        let key = |j: usize| &kd[bi * ks[0] + kv * ks[1] + j * ks[2]..][..d];
        let value = |j: usize| &vd[bi * vs[0] + kv * vs[1] + j * vs[2]..][..d];
        let mut scores = Vec::with_capacity(total);
        for i in 0..seq {
            let row = &qd[(bh * seq + i) * d..][..d];
            let seen = span.keys(pos + i);
            scores.clear();
            scores.extend(seen.clone().map(|j| dot(row, key(j - ks0)) * scale));
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            let o = &mut dst[i * d..(i + 1) * d];
            for (j, p) in seen.zip(scores.iter()) {
                for (x, y) in o.iter_mut().zip(value(j - ks0)) {
                    *x += p * y;
                }
            }
            let inv = 1.0 / sum;
            o.iter_mut().for_each(|x| *x *= inv);
        }
    });
    Ok(Tensor::from_vec(out, (b, heads, seq, d), q.device())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The same row gives the same bits alone and inside a batch, and matches plain masked softmax
    /// attention to rounding.
    #[test]
    fn a_row_is_the_same_alone_and_in_a_batch() -> Result<()> {
        let dev = Device::Cpu;
        let (heads, kv, d, pos, seq) = (6, 2, 16, 11, 5);
        let q = Tensor::randn(0f32, 1.0, (1, heads, seq, d), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (1, kv, pos + seq, d), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (1, kv, pos + seq, d), &dev)?;
        let span = Span { key_start: 0, window: None, scale: 1.0 / (d as f32).sqrt() };
        let batch = attend_rows(&q, &k, &v, pos, span)?;
        for i in 0..seq {
            let n = pos + i + 1;
            let alone = attend_rows(&q.narrow(2, i, 1)?, &k.narrow(2, 0, n)?, &v.narrow(2, 0, n)?, pos + i, span)?;
            let diff = (alone - batch.narrow(2, i, 1)?)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert_eq!(diff, 0.0, "row {i}");
        }
        // Reference: per head, softmax(q k^T / sqrt(d) + causal mask) v.
        let rep = heads / kv;
        for h in 0..heads {
            let qh = q.narrow(1, h, 1)?.squeeze(0)?.squeeze(0)?;
            let kh = k.narrow(1, h / rep, 1)?.squeeze(0)?.squeeze(0)?;
            let vh = v.narrow(1, h / rep, 1)?.squeeze(0)?.squeeze(0)?;
            let scores = (qh.matmul(&kh.t()?)? / (d as f64).sqrt())?;
            let mask: Vec<f32> =
                (0..seq).flat_map(|i| (0..pos + seq).map(move |j| if j > pos + i { f32::NEG_INFINITY } else { 0.0 })).collect();
            let scores = scores.broadcast_add(&Tensor::from_vec(mask, (seq, pos + seq), &dev)?)?;
            let want = candle_nn::ops::softmax_last_dim(&scores)?.matmul(&vh)?;
            let got = batch.narrow(1, h, 1)?.squeeze(0)?.squeeze(0)?;
            let diff = (want - got)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "head {h}: {diff}");
        }
        Ok(())
    }

    /// A sliding window sees the last `window` keys, and a cache that dropped the keys before the
    /// window gives the same bits as one that kept them.
    #[test]
    fn a_window_sees_the_last_keys_only() -> Result<()> {
        let dev = Device::Cpu;
        let (heads, kv, d, pos, seq, window) = (4, 2, 8, 9, 4, 5);
        let q = Tensor::randn(0f32, 1.0, (1, heads, seq, d), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (1, kv, pos + seq, d), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (1, kv, pos + seq, d), &dev)?;
        let full = Span { key_start: 0, window: Some(window), scale: 0.3 };
        let all = attend_rows(&q, &k, &v, pos, full)?;
        // Keys before pos - window + 1 are never seen: drop them.
        let start = pos + 1 - window;
        let kept = (k.narrow(2, start, pos + seq - start)?, v.narrow(2, start, pos + seq - start)?);
        let dropped = attend_rows(&q, &kept.0, &kept.1, pos, Span { key_start: start, ..full })?;
        let diff = (&all - &dropped)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        // Row i equals plain attention over exactly its window.
        for i in 0..seq {
            let (p, first) = (pos + i, pos + i + 1 - window);
            let alone = attend_rows(
                &q.narrow(2, i, 1)?,
                &k.narrow(2, first, window)?,
                &v.narrow(2, first, window)?,
                p,
                Span { key_start: first, ..full },
            )?;
            let diff = (alone - all.narrow(2, i, 1)?)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert_eq!(diff, 0.0, "row {i}");
        }
        // A row whose window reaches before the cache is refused.
        assert!(attend_rows(
            &q,
            &kept.0.narrow(2, 1, pos + seq - start - 1)?,
            &kept.1.narrow(2, 1, pos + seq - start - 1)?,
            pos,
            Span { key_start: start + 1, ..full }
        )
        .is_err());
        Ok(())
    }
}
