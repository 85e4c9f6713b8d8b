//! RMSNorm, rotary embeddings and the gated MLP's `silu(gate) * up` on f32 CPU tensors, run on the
//! calling thread with candle's arithmetic (so with its bits: tests hold them to that).
//!
//! candle-nn splits both over rayon's pool as soon as a call has more than one row (RMSNorm: more
//! than 32), and a thread outside that pool, as every hat thread is, then hands the call to a pool
//! worker and sleeps until it is done: two context switches for a few microseconds of arithmetic.
//! A verification round of 5 rows paid 52 of them in the cloud's middle, a batch of 16 sessions'
//! rounds 884 (a fifth of its time in the kernel's scheduler). These operations are cheap next to
//! the matmuls around them, so one thread does them.

use candle_core::{DType, Storage, Tensor};

use crate::error::{ModelError, Result};

mod silu;

/// Sets glibc's allocator to reuse freed memory: call once, at the start of a process that runs
/// models. A forward allocates and frees tensors of a hundred kilobytes to a few megabytes, layer
/// after layer. glibc maps each one above its mmap threshold afresh (a page fault per 4 KiB touched)
/// until frees have raised the threshold, and hands the heap's free top back to the kernel; which of
/// the two a process is in depended on what it had allocated before. A batch of 16 sessions' 5-row
/// rounds took 65 ms in one state and 45 in the other (`middle_batch`). These settings are glibc's
/// own dynamic ceiling for the threshold (32 MiB on 64-bit), from the start, and a trim threshold
/// above it; a no-op elsewhere.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const MMAP_THRESHOLD: i32 = 32 << 20;
        const TRIM_THRESHOLD: i32 = 128 << 20;
        // SAFETY: mallopt only sets the allocator's parameters, under its own lock.
        #[allow(unsafe_code)]
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
            libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
        }
    }
}

/// Whether `t` takes these kernels: f32 on the CPU.
pub fn runs(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

/// `f` on the values of a contiguous f32 CPU tensor, in place (no copy).
fn read<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let (Storage::Cpu(s), Some((from, to))) = (&*storage, layout.contiguous_offsets()) else {
        return Err(ModelError::InvalidConfig("a CPU kernel got a tensor that is not a contiguous CPU one".into()));
    };
    Ok(f(&s.as_slice::<f32>()?[from..to]))
}

/// RMSNorm over the last axis: `x / sqrt(mean(x^2) + eps) * weight`, as candle-nn's `rms_norm`.
///
/// # Shapes
/// x: (..., n), weight: (n) -> (..., n)
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    let x = x.contiguous()?;
    let n = weight.dims1()?;
    if x.dims().last() != Some(&n) {
        return Err(ModelError::InvalidConfig(format!("RMSNorm of {n} over {:?}", x.dims())));
    }
    let out = read(&x, |src| {
        read(weight, |alpha| {
            let mut dst = vec![0f32; src.len()];
            for (src, dst) in src.chunks_exact(n).zip(dst.chunks_exact_mut(n)) {
                let sum2 = src.iter().map(|&v| v * v).sum::<f32>();
                let m = (sum2 / n as f32 + eps).sqrt();
                for ((d, s), a) in dst.iter_mut().zip(src).zip(alpha) {
                    *d = *s / m * *a;
                }
            }
            dst
        })
    })??;
    Ok(Tensor::from_vec(out, x.shape(), x.device())?)
}

/// `silu(gate) * up`, as candle's `silu` and product (see `silu`).
///
/// # Shapes
/// gate, up: (...) -> as gate
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.dims() != up.dims() {
        return Err(ModelError::InvalidConfig(format!("silu of {:?} times {:?}", gate.dims(), up.dims())));
    }
    let (gate, up) = (gate.contiguous()?, up.contiguous()?);
    let out = read(&gate, |g| {
        read(&up, |u| {
            let mut dst = vec![0f32; g.len()];
            silu::silu_mul(g, u, &mut dst);
            dst
        })
    })??;
    Ok(Tensor::from_vec(out, gate.shape(), gate.device())?)
}

/// Rotary embedding of the two halves of each head, as candle-nn's `rope`: row t of every head
/// turns by the angles in row `at[t]` of the `cos` and `sin` tables.
///
/// # Shapes
/// x: (batch, heads, seq, head_dim), cos and sin: (positions, head_dim / 2), at: seq -> as x
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, at: impl Fn(usize) -> usize) -> Result<Tensor> {
    let x = x.contiguous()?;
    let (_, _, seq, d) = x.dims4()?;
    let (positions, half) = cos.dims2()?;
    if half * 2 != d || sin.dims2()? != (positions, half) {
        return Err(ModelError::InvalidConfig(format!("rotary tables of {positions}x{half} for rows of {d}")));
    }
    if let Some(p) = (0..seq).map(&at).find(|&p| p >= positions) {
        return Err(ModelError::InvalidConfig(format!("position {p} is past the rotary table's {positions}")));
    }
    let out = read(&x, |src| {
        read(cos, |cos| {
            read(sin, |sin| {
                let mut dst = vec![0f32; src.len()];
                for (i, (src, dst)) in src.chunks_exact(d).zip(dst.chunks_exact_mut(d)).enumerate() {
                    let row = at(i % seq) * half;
                    let (cos, sin) = (&cos[row..row + half], &sin[row..row + half]);
                    let (x1, x2) = src.split_at(half);
                    let (d1, d2) = dst.split_at_mut(half);
                    for i in 0..half {
                        d1[i] = x1[i] * cos[i] - x2[i] * sin[i];
                        d2[i] = x1[i] * sin[i] + x2[i] * cos[i];
                    }
                }
                dst
            })
        })
    })???;
    Ok(Tensor::from_vec(out, x.shape(), x.device())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn bits(t: &Tensor) -> Result<Vec<u32>> {
        Ok(t.flatten_all()?.to_vec1::<f32>()?.iter().map(|v| v.to_bits()).collect())
    }

    /// Candle-nn's bits, at one row, a few rows, and past the 32 rows where it goes parallel; with
    /// a few huge dimensions like SmolLM2's hidden states.
    #[test]
    fn rms_norm_has_candles_bits() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, 576, &dev)?;
        for rows in [1, 5, 40] {
            let mut x = Tensor::randn(0f32, 2.0, (1, rows, 576), &dev)?.to_vec3::<f32>()?;
            x[0][0][7] = 300.0;
            let x = Tensor::new(x, &dev)?;
            assert_eq!(bits(&rms_norm(&x, &w, 1e-5)?)?, bits(&candle_nn::ops::rms_norm(&x, &w, 1e-5)?)?, "{rows} rows");
        }
        Ok(())
    }

    /// Candle's bits for `silu(gate) * up` on tensors, contiguous and not.
    #[test]
    fn silu_mul_has_candles_bits() -> Result<()> {
        let dev = Device::Cpu;
        let gate = (Tensor::randn(0f32, 3.0, (1, 5, 1536), &dev)? * 4.0)?;
        let up = Tensor::randn(0f32, 1.0, (1, 5, 1536), &dev)?;
        assert_eq!(bits(&silu_mul(&gate, &up)?)?, bits(&(candle_nn::ops::silu(&gate)? * &up)?)?);
        let (g, u) = (gate.transpose(1, 2)?, up.transpose(1, 2)?);
        assert_eq!(bits(&silu_mul(&g, &u)?)?, bits(&(candle_nn::ops::silu(&g)? * &u)?)?);
        assert!(silu_mul(&gate, &up.narrow(2, 0, 7)?).is_err());
        Ok(())
    }

    /// Candle-nn's bits for one row (its serial path) and several (its parallel one), from a
    /// position in the table and for rows at chosen positions.
    #[test]
    fn rope_has_candles_bits() -> Result<()> {
        let dev = Device::Cpu;
        let (cos, sin) = (Tensor::randn(0f32, 1.0, (50, 32), &dev)?, Tensor::randn(0f32, 1.0, (50, 32), &dev)?);
        for seq in [1, 5] {
            let x = Tensor::randn(0f32, 1.0, (2, 3, seq, 64), &dev)?;
            let want = candle_nn::rotary_emb::rope(&x, &cos.narrow(0, 9, seq)?, &sin.narrow(0, 9, seq)?)?;
            assert_eq!(bits(&rope(&x, &cos, &sin, |t| 9 + t)?)?, bits(&want)?, "{seq} rows");
        }
        let x = Tensor::randn(0f32, 1.0, (1, 3, 4, 64), &dev)?;
        let at = [3u32, 4, 5, 4];
        let idx = Tensor::new(&at[..], &dev)?;
        let want = candle_nn::rotary_emb::rope(&x, &cos.index_select(&idx, 0)?, &sin.index_select(&idx, 0)?)?;
        assert_eq!(bits(&rope(&x, &cos, &sin, |t| at[t] as usize)?)?, bits(&want)?, "rows at chosen positions");
        assert!(rope(&x, &cos, &sin, |t| 48 + t).is_err(), "a position past the table is refused");
        Ok(())
    }
}
