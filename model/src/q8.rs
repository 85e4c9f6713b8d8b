//! q8_0 matrix products for x86 CPUs with AVX512-VNNI: candle's tiled kernel's numbers, faster.
//!
//! candle's tiled q8_0 kernel needs rows of whole 256-value blocks (hat padded SmolLM2's 576 to
//! 768 with zero blocks), quantizes its input in a scalar loop, and reads a matrix's weights again
//! for every 4 input rows. This kernel computes exactly what that kernel computes on the padded
//! matrix, bit for bit (a test holds it to that), so packages, trained draft heads and replies are
//! unchanged, while:
//!
//! - **No padding** is stored or read: a zero block adds nothing to any product.
//! - **The input** is rounded as candle's `BlockQ8K` rounds it (one scale per 256 values), in
//!   AVX-512 instead of a scalar loop.
//! - **One pass over the weights** serves every input row: a tile of 16 outputs runs all rows, 8
//!   at a time, while its weights sit in L1. A verification round of 5 rows or a batch of 16
//!   sessions streams the matrix from memory once, as one row does; the next tile is prefetched
//!   while this one computes (a 5-row middle forward 13-15 % faster, measured by
//!   `cargo bench -p hat-tests --bench middle_batch`).
//! - **Fixed order:** a block's dot product is exact integer arithmetic, and an output sums its
//!   blocks in order, `acc = fma(dot_b, scale_w * scale_x, acc)`, as candle's does. So a row gets
//!   the same bits alone, in a round, in a batch of sessions and on any number of threads, which
//!   keeps `hat`, chunked prefill, the batched cloud and `--mode local` token for token equal.
//!
//! Elsewhere (no AVX512-VNNI, another type, a GPU, `HAT_Q8_KERNEL=candle`) candle's kernels run, as
//! before.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Tensor;

use crate::error::{ModelError, Result};

/// Output rows per tile.
const TILE: usize = 16;
/// Values per q8_0 block.
const BLOCK: usize = 32;
/// Input rows run together against a tile.
const ROWS: usize = 8;

/// 16 output rows by one block of 32 inputs: `qs[(g * 16 + r) * 4 + j]` is row r's value 4g + j plus
/// 128, `d[r]` row r's scale.
#[repr(C, align(64))]
struct Tile {
    qs: [u8; BLOCK * TILE],
    d: [f32; TILE],
}

/// A q8_0 matrix repacked for [`PackedQ8::forward`].
pub struct PackedQ8 {
    /// Output rows.
    n: usize,
    /// Inputs per row.
    k: usize,
    /// `tiles[t * k / 32 + b]`: output rows 16t.. by block b.
    tiles: Vec<Tile>,
}

impl std::fmt::Debug for PackedQ8 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedQ8({}x{})", self.n, self.k)
    }
}

/// Whether this CPU runs the kernel (checked once), and hat was not told to use candle's
/// (`HAT_Q8_KERNEL=candle`, for comparison).
pub fn available() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::env::var("HAT_Q8_KERNEL").as_deref() != Ok("candle")
                && std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vnni")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

impl PackedQ8 {
    /// Repacks `q` when the kernel can run it: q8_0 on the CPU, (n, k) with n a multiple of 16, and
    /// this CPU has AVX512-VNNI. `None` otherwise.
    pub fn pack(q: &QTensor) -> Result<Option<Arc<Self>>> {
        let Ok((n, k)) = q.shape().dims2() else { return Ok(None) };
        if !available() || q.dtype() != GgmlDType::Q8_0 || !q.device().is_cpu() || !n.is_multiple_of(TILE) || !k.is_multiple_of(BLOCK) {
            return Ok(None);
        }
        let data = q.data()?;
        let (kb, bytes) = (k / BLOCK, GgmlDType::Q8_0.type_size());
        if data.len() != n * kb * bytes {
            return Err(ModelError::InvalidConfig(format!("a q8_0 matrix of {n}x{k} holds {} bytes", data.len())));
        }
        let mut tiles = Vec::with_capacity(n / TILE * kb);
        for t in 0..n / TILE {
            for b in 0..kb {
                let mut tile = Tile { qs: [0; BLOCK * TILE], d: [0.0; TILE] };
                for r in 0..TILE {
                    // A block: its f16 scale, then 32 signed bytes.
                    let block = &data[((t * TILE + r) * kb + b) * bytes..][..bytes];
                    tile.d[r] = f16_to_f32(u16::from_le_bytes([block[0], block[1]]));
                    for (v, &x) in block[2..].iter().enumerate() {
                        tile.qs[((v / 4) * TILE + r) * 4 + v % 4] = (x as i8 as i16 + 128) as u8;
                    }
                }
                tiles.push(tile);
            }
        }
        Ok(Some(Arc::new(Self { n, k, tiles })))
    }

    /// `x` times the matrix's transpose.
    ///
    /// # Shapes
    /// x: (..., k) f32 on the CPU -> (..., n)
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(Self::forward_many(&[self], x)?.pop().expect("one product per matrix"))
    }

    /// `x` times each matrix's transpose, the input rounded to 8 bits once for all of them (the
    /// query, key and value projections read the same rows, as do the MLP's gate and up): each
    /// result has the bits [`PackedQ8::forward`] gives it.
    ///
    /// # Shapes
    /// x: (..., k) f32 on the CPU -> one (..., n) per matrix
    pub fn forward_many(mats: &[&PackedQ8], x: &Tensor) -> Result<Vec<Tensor>> {
        let dims = x.dims().to_vec();
        let Some(k) = mats.first().map(|w| w.k) else { return Ok(Vec::new()) };
        if mats.iter().any(|w| w.k != k) {
            let widths: Vec<usize> = mats.iter().map(|w| w.k).collect();
            return Err(ModelError::InvalidConfig(format!("matrices of {widths:?} inputs cannot share one input")));
        }
        if dims.last() != Some(&k) {
            return Err(ModelError::InvalidConfig(format!("a {}-wide input for a matrix of {k} inputs", dims.last().unwrap_or(&0))));
        }
        let m = x.elem_count() / k;
        let xs = x.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?;
        let acts = Acts::quantize(&xs, m, k);
        mats.iter()
            .map(|w| {
                let mut out = vec![0f32; m * w.n];
                w.matmul(&acts, &mut out);
                let mut shape = dims.clone();
                *shape.last_mut().expect("checked above") = w.n;
                Ok(Tensor::from_vec(out, shape, x.device())?)
            })
            .collect()
    }

    /// `out (m x n)`: the rounded input rows `acts` (m x k) times the matrix's transpose.
    fn matmul(&self, acts: &Acts, out: &mut [f32]) {
        let tiles = self.n / TILE;
        let dst = out.as_mut_ptr() as usize;
        let run = |range: std::ops::Range<usize>| {
            for t in range {
                // SAFETY: `available()` held when this matrix was packed (pack checks it), so the
                // CPU has AVX512F/BW/VNNI. Tile t writes only columns 16t..16t + 16 of each of the
                // m rows of `out` (m x n, alive for this call), and no two tasks share a tile.
                #[allow(unsafe_code)]
                unsafe {
                    tile_rows(self, acts, t, dst as *mut f32)
                };
            }
        };
        // candle's pool of spinning workers, as its own kernels use: a one-row product is bound
        // by memory bandwidth, which a second core adds to. With one thread it runs here.
        candle_core::utils::barrier_pool().execute_chunked(tiles, run);
    }
}

/// Input rows rounded to 8 bits as candle's `BlockQ8K` rounds them (one scale per 256 values), so
/// that products have the bits of candle's tiled kernel: per block of 32, its bytes, its
/// superblock's scale and its bytes' sum.
struct Acts {
    qs: Vec<i8>,
    d: Vec<f32>,
    sums: Vec<i32>,
    m: usize,
    kb: usize,
}

/// Values per scale of the input's rounding (candle's `QK_K`).
const SUPER: usize = 256;

impl Acts {
    /// A row whose length is not a multiple of 256 is rounded as if padded with zeros to one
    /// (what hat did for candle's tiled kernel): zeros never hold a superblock's largest value and
    /// add nothing to a product, so the padding itself is never stored or read.
    fn quantize(x: &[f32], m: usize, k: usize) -> Self {
        let kb = k / BLOCK;
        let mut a = Acts { qs: vec![0; m * k], d: vec![0.0; m * kb], sums: vec![0; m * kb], m, kb };
        for (r, row) in x.chunks_exact(k).enumerate() {
            for (sb, vals) in row.chunks(SUPER).enumerate() {
                let first = r * kb + sb * SUPER / BLOCK;
                let blocks = first..first + vals.len() / BLOCK;
                // SAFETY: packs (and so calls) exist only where `available()` found AVX512F and
                // BW; `vals` holds a whole number of blocks of 32, as do `qs` and `sums` here.
                #[allow(unsafe_code)]
                let d = unsafe { quantize_super(vals, &mut a.qs[r * k + sb * SUPER..][..vals.len()], &mut a.sums[blocks.clone()]) };
                a.d[blocks].fill(d);
            }
        }
        a
    }
}

/// candle's `BlockQ8K::from_float` on one superblock (up to 256 values, a whole number of blocks of
/// 32), bit for bit: `max` is the first value of the largest magnitude, `q = round(-127 / max * x)`
/// (halves away from zero), the scale `1 / (-127 / max)`. Writes the bytes and each block's sum;
/// returns the scale.
#[cfg(test)]
fn quantize_super_plain(x: &[f32], q: &mut [i8], sums: &mut [i32]) -> f32 {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    if amax == 0.0 {
        q.fill(0);
        sums.fill(0);
        return 0.0;
    }
    let iscale = -127f32 / max;
    for (q, &v) in q.iter_mut().zip(x) {
        *q = (iscale * v).round().clamp(-128.0, 127.0) as i8;
    }
    for (s, block) in sums.iter_mut().zip(q.chunks_exact(BLOCK)) {
        *s = block.iter().map(|&v| v as i32).sum();
    }
    1.0 / iscale
}

/// [`quantize_super_plain`] in AVX-512, with its bits: the products and the comparison are the
/// same IEEE operations, and rounding halves away from zero is built from truncation exactly
/// (|v| <= 128, so `v - trunc(v)` is exact).
///
/// # Safety
/// The CPU has AVX512F and AVX512BW; `x` and `q` have the same length, a multiple of 32 and at most
/// 256, and `sums` one entry per 32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
#[allow(unsafe_code)]
unsafe fn quantize_super(x: &[f32], q: &mut [i8], sums: &mut [i32]) -> f32 {
    use std::arch::x86_64::*;
    assert!(x.len() == q.len() && x.len().is_multiple_of(BLOCK) && x.len() <= SUPER && sums.len() == x.len() / BLOCK);
    let n = x.len() / 16;
    let mut amax = _mm512_setzero_ps();
    for c in 0..n {
        amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_loadu_ps(x.as_ptr().add(16 * c))));
    }
    let amax = _mm512_reduce_max_ps(amax);
    if amax == 0.0 {
        q.fill(0);
        sums.fill(0);
        return 0.0;
    }
    // The first value of that magnitude, as the plain loop's strict comparison keeps.
    let target = _mm512_set1_ps(amax);
    let mut max = 0f32;
    for c in 0..n {
        let hit = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(_mm512_abs_ps(_mm512_loadu_ps(x.as_ptr().add(16 * c))), target);
        if hit != 0 {
            max = x[16 * c + hit.trailing_zeros() as usize];
            break;
        }
    }
    let iscale = -127f32 / max;
    let (scale, half, one) = (_mm512_set1_ps(iscale), _mm512_set1_ps(0.5), _mm512_set1_ps(1.0));
    let sign = _mm512_set1_epi32(i32::MIN);
    let mut ints = [_mm512_setzero_si512(); 2];
    for c in 0..n {
        let v = _mm512_mul_ps(scale, _mm512_loadu_ps(x.as_ptr().add(16 * c)));
        let t = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(v);
        let up = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(_mm512_abs_ps(_mm512_sub_ps(v, t)), half);
        let step = _mm512_castsi512_ps(_mm512_or_si512(_mm512_and_si512(_mm512_castps_si512(v), sign), _mm512_castps_si512(one)));
        let r = _mm512_min_ps(_mm512_max_ps(_mm512_mask_add_ps(t, up, t, step), _mm512_set1_ps(-128.0)), _mm512_set1_ps(127.0));
        let i = _mm512_cvttps_epi32(r);
        _mm_storeu_si128(q.as_mut_ptr().add(16 * c) as *mut _, _mm512_cvtsepi32_epi8(i));
        ints[c % 2] = i;
        if c % 2 == 1 {
            sums[c / 2] = _mm512_reduce_add_epi32(_mm512_add_epi32(ints[0], ints[1]));
        }
    }
    1.0 / iscale
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(unsafe_code)]
unsafe fn quantize_super(_: &[f32], _: &mut [i8], _: &mut [i32]) -> f32 {
    unreachable!("the kernel is only packed where available() holds")
}

/// Tile t of the matrix against every input row, 8 rows at a time: output columns 16t.. of each row.
///
/// # Safety
/// The CPU has AVX512F, AVX512BW and AVX512VNNI; `out` points to an m x n f32 matrix whose columns
/// 16t..16t + 16 no other thread touches during the call.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[allow(unsafe_code)]
unsafe fn tile_rows(w: &PackedQ8, a: &Acts, t: usize, out: *mut f32) {
    use std::arch::x86_64::*;
    let kb = a.kb;
    let tiles = &w.tiles[t * kb..(t + 1) * kb];
    let next = w.tiles.get((t + 1) * kb..(t + 2) * kb).unwrap_or(&[]);
    for m0 in (0..a.m).step_by(ROWS) {
        let rows = (a.m - m0).min(ROWS);
        let mut acc = [_mm512_setzero_ps(); ROWS];
        for (b, tile) in tiles.iter().enumerate() {
            // While the first rows run, the next tile's block is fetched: a row's arithmetic on
            // one tile then overlaps the memory traffic of the next.
            if m0 == 0 {
                if let Some(next) = next.get(b) {
                    let p = next as *const Tile as *const i8;
                    for line in 0..std::mem::size_of::<Tile>() / 64 {
                        _mm_prefetch::<_MM_HINT_T0>(p.add(64 * line));
                    }
                }
            }
            let qs = tile.qs.as_ptr();
            let mut wq = [_mm512_setzero_si512(); 8];
            for (g, wq) in wq.iter_mut().enumerate() {
                *wq = _mm512_loadu_si512(qs.add(g * 64) as *const _);
            }
            let dw = _mm512_loadu_ps(tile.d.as_ptr());
            for (i, acc) in acc.iter_mut().enumerate().take(rows) {
                let row = (m0 + i) * kb + b;
                let x = a.qs.as_ptr().add(row * BLOCK) as *const i32;
                // Two independent chains; integer sums are exact, so their order does not matter.
                let (mut s0, mut s1) = (_mm512_setzero_si512(), _mm512_setzero_si512());
                for g in (0..8).step_by(2) {
                    s0 = _mm512_dpbusd_epi32(s0, wq[g], _mm512_set1_epi32(std::ptr::read_unaligned(x.add(g))));
                    s1 = _mm512_dpbusd_epi32(s1, wq[g + 1], _mm512_set1_epi32(std::ptr::read_unaligned(x.add(g + 1))));
                }
                // sum (w + 128) x - 128 sum x = sum w x, exactly; |sum w x| < 2^24, exact in f32.
                let dot = _mm512_sub_epi32(_mm512_add_epi32(s0, s1), _mm512_set1_epi32(128 * a.sums[row]));
                *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(dw, _mm512_set1_ps(a.d[row])), *acc);
            }
        }
        for (i, acc) in acc.iter().enumerate().take(rows) {
            _mm512_storeu_ps(out.add((m0 + i) * w.n + t * TILE), *acc);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(unsafe_code)]
unsafe fn tile_rows(_: &PackedQ8, _: &Acts, _: usize, _: *mut f32) {
    unreachable!("the kernel is only packed where available() holds")
}

/// IEEE half to single precision (every half is exact in f32).
fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let frac = (h & 0x3ff) as u32;
    let bits = match (exp, frac) {
        (0, 0) => sign,
        (0, f) => {
            // Subnormal: normalise.
            let shift = f.leading_zeros() - 21;
            sign | ((127 - 15 + 1 - shift) << 23) | ((f << shift) & 0x3ff) << 13
        }
        (0x1f, f) => sign | 0x7f80_0000 | (f << 13),
        (e, f) => sign | ((e + 127 - 15) << 23) | (f << 13),
    };
    f32::from_bits(bits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Whether the kernel runs on this CPU; says so when a test is skipped.
    fn runs_here() -> bool {
        if !available() {
            eprintln!("skipped: this CPU has no AVX512-VNNI, candle's kernels run instead");
        }
        available()
    }

    fn matrix(n: usize, k: usize) -> Result<QTensor> {
        let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)?;
        Ok(QTensor::quantize(&w, GgmlDType::Q8_0)?)
    }

    /// The product is q8_0 x q8_0 to rounding: against the dequantized weights times the input,
    /// within the input's own 8-bit rounding.
    #[test]
    fn the_product_matches_the_dequantized_matrix() -> Result<()> {
        if !runs_here() {
            return Ok(());
        }
        let (n, k) = (48, 576);
        let q = matrix(n, k)?;
        let p = PackedQ8::pack(&q)?.expect("packs");
        let x = Tensor::randn(0f32, 1.0, (3, k), &Device::Cpu)?;
        let got = p.forward(&x)?;
        let want = x.matmul(&q.dequantize(&Device::Cpu)?.t()?)?;
        let err = (&got - &want)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        let scale = want.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(err < 0.02 * scale, "error {err} against outputs up to {scale}");
        Ok(())
    }

    /// The product has the bits of candle's tiled kernel on the matrix padded to 256-value rows
    /// (hat's q8_0 path before this kernel), so packages, drafts and trained heads see the numbers
    /// they saw: rows of 576 (padded there, not here) and of 1536, inputs with a few huge
    /// dimensions like SmolLM2's hidden states, and a row of zeros.
    #[test]
    fn the_product_has_the_bits_of_candles_tiled_kernel() -> Result<()> {
        if !runs_here() {
            return Ok(());
        }
        for (n, k) in [(64, 576), (32, 1536)] {
            let q = Arc::new(matrix(n, k)?);
            let p = PackedQ8::pack(&q)?.expect("packs");
            let (padded, pad) = crate::weights::pad_for_tiles(q)?;
            let tiled =
                crate::weights::Proj::Quant { w: candle_core::quantized::QMatMul::from_arc(padded)?, bias: None, pad, packed: None };
            let mut x = Tensor::randn(0f32, 1.0, (5, k), &Device::Cpu)?.to_vec2::<f32>()?;
            x[1][7] = 300.0;
            x[2][100] = -250.0;
            x[3].fill(0.0);
            let x = Tensor::new(x, &Device::Cpu)?;
            let (got, want) = (p.forward(&x)?.flatten_all()?.to_vec1::<f32>()?, tiled.forward(&x)?.flatten_all()?.to_vec1::<f32>()?);
            // `==` also takes -0 for +0: candle adds the padding's zero products, which can only
            // turn a -0 sum into +0.
            let differ = got.iter().zip(&want).filter(|(g, w)| g != w).count();
            assert_eq!(differ, 0, "{n}x{k}: {differ} outputs differ from candle's");
        }
        Ok(())
    }

    /// Matrices sharing an input (rounded once) give each its own `forward`'s bits, through
    /// `Proj::forward_shared` with a bias too; inputs of different widths are refused.
    #[test]
    fn shared_input_products_have_each_products_bits() -> Result<()> {
        if !runs_here() {
            return Ok(());
        }
        let dev = Device::Cpu;
        let qs: Vec<Arc<QTensor>> = [192, 576, 64].into_iter().map(|n| matrix(n, 576).map(Arc::new)).collect::<Result<_>>()?;
        let bias = Tensor::randn(0f32, 1.0, 64, &dev)?;
        let projs = [
            crate::weights::Proj::quantized(qs[0].clone(), None, true)?,
            crate::weights::Proj::quantized(qs[1].clone(), None, true)?,
            crate::weights::Proj::quantized(qs[2].clone(), Some(bias), true)?,
        ];
        let mut x = Tensor::randn(0f32, 1.0, (1, 7, 576), &dev)?.to_vec3::<f32>()?;
        x[0][2][9] = 280.0;
        let x = Tensor::new(x, &dev)?;
        let bits = |t: &Tensor| -> Result<Vec<u32>> { Ok(t.flatten_all()?.to_vec1::<f32>()?.iter().map(|v| v.to_bits()).collect()) };
        let shared = crate::weights::Proj::forward_shared([&projs[0], &projs[1], &projs[2]], &x)?;
        for (p, got) in projs.iter().zip(&shared) {
            assert_eq!(got.dims(), p.forward(&x)?.dims());
            assert_eq!(bits(got)?, bits(&p.forward(&x)?)?);
        }
        let narrow = PackedQ8::pack(&matrix(16, 256)?)?.expect("packs");
        let wide = PackedQ8::pack(&qs[0])?.expect("packs");
        assert!(PackedQ8::forward_many(&[&wide, &narrow], &x).is_err());
        Ok(())
    }

    /// The vector rounding of a superblock has the bits of the plain one (candle's), with halves,
    /// ties for the largest magnitude of either sign, zeros and short superblocks.
    #[test]
    fn the_vector_rounding_is_the_plain_one() -> Result<()> {
        if !runs_here() {
            return Ok(());
        }
        let mut cases: Vec<Vec<f32>> = Vec::new();
        for len in [256, 64, 32] {
            cases.push(Tensor::randn(0f32, 3.0, len, &Device::Cpu)?.to_vec1::<f32>()?);
            // Values on exact halves of the scale: max 127 makes the scale -1.
            cases.push((0..len).map(|i| if i == 5 { 127.0 } else { (i as f32 - 40.0) * 0.5 }).collect());
            // The same largest magnitude with both signs, the negative first.
            cases.push(
                (0..len)
                    .map(|i| match i {
                        3 => -9.0,
                        20 => 9.0,
                        _ => (i as f32).sin(),
                    })
                    .collect(),
            );
            cases.push(vec![0.0; len]);
        }
        for x in cases {
            let (mut q1, mut q2) = (vec![0i8; x.len()], vec![0i8; x.len()]);
            let (mut s1, mut s2) = (vec![0; x.len() / BLOCK], vec![0; x.len() / BLOCK]);
            let d1 = quantize_super_plain(&x, &mut q1, &mut s1);
            // SAFETY: `available()` holds (checked above); the lengths are as the function asks.
            #[allow(unsafe_code)]
            let d2 = unsafe { quantize_super(&x, &mut q2, &mut s2) };
            assert_eq!((d1.to_bits(), &q1, &s1), (d2.to_bits(), &q2, &s2), "{x:?}");
        }
        Ok(())
    }

    /// A row's output has the same bits alone and among others, at any count of rows (past a group
    /// of 8) and with a parallel split of the tiles.
    #[test]
    fn a_row_is_the_same_alone_and_in_a_batch() -> Result<()> {
        if !runs_here() {
            return Ok(());
        }
        for (n, k, m) in [(32, 64, 3), (1536, 576, 19), (576, 1536, 9)] {
            let p = PackedQ8::pack(&matrix(n, k)?)?.expect("packs");
            let x = (Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)? * 20.0)?;
            let all = p.forward(&x)?;
            for i in 0..m {
                let alone = p.forward(&x.narrow(0, i, 1)?)?;
                let same = (alone - all.narrow(0, i, 1)?)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
                assert_eq!(same, 0.0, "{n}x{k}, row {i} of {m}");
            }
        }
        Ok(())
    }

    #[test]
    fn halves_widen_exactly() {
        for (h, f) in
            [(0x3c00u16, 1.0f32), (0xc000, -2.0), (0x0001, 5.960_464_5e-8), (0x7bff, 65504.0), (0x0000, 0.0), (0x3555, 0.333_251_95)]
        {
            assert_eq!(f16_to_f32(h), f, "{h:#x}");
        }
    }
}
