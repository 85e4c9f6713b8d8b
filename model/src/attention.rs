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

/// Causal attention of `seq` new positions starting at `pos`: query row i sees keys `0..=pos + i`.
/// Query head h reads key/value head `h / (heads / kv_heads)`.
///
/// # Shapes
/// q: (batch, heads, seq, head_dim), k and v: (batch, kv_heads, pos + seq, head_dim) -> (batch, heads, seq, head_dim)
pub fn attend_rows(q: &Tensor, k: &Tensor, v: &Tensor, pos: usize) -> Result<Tensor> {
    if q.dtype() != DType::F32 || !q.device().is_cpu() {
        return Err(ModelError::InvalidConfig("row attention needs f32 on the CPU".into()));
    }
    let (b, heads, seq, d) = q.dims4()?;
    let (_, kv_heads, total, _) = k.dims4()?;
    if total != pos + seq || heads % kv_heads != 0 {
        return Err(ModelError::InvalidConfig(format!("attention over {total} keys for {seq} rows at {pos}")));
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
    let scale = 1.0 / (d as f32).sqrt();
    let mut out = vec![0f32; b * heads * seq * d];
    out.par_chunks_mut(seq * d).enumerate().for_each(|(bh, dst)| {
        let (bi, h) = (bh / heads, bh % heads);
        let kv = h / rep;
        let key = |j: usize| &kd[bi * ks[0] + kv * ks[1] + j * ks[2]..][..d];
        let value = |j: usize| &vd[bi * vs[0] + kv * vs[1] + j * vs[2]..][..d];
        let mut scores = Vec::with_capacity(total);
        for i in 0..seq {
            let row = &qd[(bh * seq + i) * d..][..d];
            let seen = pos + i + 1;
            scores.clear();
            scores.extend((0..seen).map(|j| dot(row, key(j)) * scale));
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            let o = &mut dst[i * d..(i + 1) * d];
            for (j, p) in scores.iter().enumerate() {
                for (x, y) in o.iter_mut().zip(value(j)) {
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
        let batch = attend_rows(&q, &k, &v, pos)?;
        for i in 0..seq {
            let n = pos + i + 1;
            let alone = attend_rows(&q.narrow(2, i, 1)?, &k.narrow(2, 0, n)?, &v.narrow(2, 0, n)?, pos + i)?;
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
}
