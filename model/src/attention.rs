//! Attention on the CPU one query row at a time, over exactly the keys that row may see, in a fixed
//! order. A row's result is then the same whatever batch it arrives in: a decode step (one row), a
//! verification round (the last token and its drafts) or a prefill chunk of any size. candle's batched
//! kernels sum a masked row of another length in another order, which differs in the last bits; on a
//! quantized package those bits can flip the 8-bit rounding of an activation and change a token, so
//! `hat` and chunked prefill would stop matching `--mode local`.
//!
//! The arithmetic is fixed and fused: a score is a dot product in 16 lanes of fused multiply-adds
//! summed in a fixed tree, the softmax uses hat's own `exp` (Cephes' `expf` in fused multiply-adds)
//! and sums in 16 lanes, and each output value is a chain of fused multiply-adds over the keys in
//! order. On AVX-512 the same operations run in vector registers (eight keys' scores at once, up to
//! four query heads over the same values at once); elsewhere in plain loops; the bits are the same
//! either way. Against the separate multiplies and adds, libm's `expf` and sequential sums of
//! earlier releases, a verification round of 5 rows over 1300 cached positions takes 24 ms of the
//! middle's time instead of 33 (`cargo bench -p hat-tests --bench middle_batch`).

use candle_core::{DType, Storage, Tensor};
use rayon::prelude::*;

use crate::error::{ModelError, Result};

/// Lanes of the fixed arithmetic below: a score's products are summed in 16 lanes, then the lanes
/// in a fixed tree, and so are a row's exponentials; a weighted sum keeps one lane per output value.
const LANES: usize = 16;

/// Whether this CPU runs the AVX-512 forms (checked once). They compute exactly what the plain
/// forms compute (the same fused multiply-adds in the same lanes, sums in the same order), so a
/// row's bits are the same on every x86-64-v3 CPU, with AVX-512 or without.
fn avx512() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx512f")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Lanes `l + 8` onto `l`, then `l + 4`, `l + 2`, `l + 1`: the one order every sum of lanes takes.
fn tree(mut acc: [f32; LANES]) -> f32 {
    let mut width = LANES / 2;
    while width > 0 {
        for l in 0..width {
            acc[l] += acc[l + width];
        }
        width /= 2;
    }
    acc[0]
}

/// `a . b`: lane l sums `a[16c + l] * b[16c + l]` over chunks c in order with fused multiply-adds
/// (a short last chunk reads as zeros), then the lanes meet in [`tree`].
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    for c in (0..a.len()).step_by(LANES) {
        for (l, acc) in acc.iter_mut().enumerate() {
            let (x, y) = (a.get(c + l).copied().unwrap_or(0.0), b.get(c + l).copied().unwrap_or(0.0));
            *acc = x.mul_add(y, *acc);
        }
    }
    tree(acc)
}

/// `sum(x)`: lane l adds `x[16c + l]` over chunks c in order, then the lanes meet in [`tree`].
fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    for c in x.chunks(LANES) {
        for (acc, v) in acc.iter_mut().zip(c) {
            *acc += v;
        }
    }
    tree(acc)
}

/// `e^x` for the shifted scores of a softmax (x <= 0), to about one unit in the last place:
/// Cephes' `expf` (x = n ln 2 + r, a degree-5 polynomial in r, times 2^n) in fused multiply-adds.
/// Below -87 it gives e^-87, about 1.6e-38, against a largest term of 1. libm's `expf` differs
/// between libraries and has no vector form; this one is the same function on every machine and in
/// [`softmax_avx512`]'s lanes.
fn exp(x: f32) -> f32 {
    let x = x.max(EXP_MIN);
    let n = (x * LOG2_E).round_ties_even();
    let r = n.mul_add(-LN2_HI, x);
    let r = n.mul_add(-LN2_LO, r);
    let mut p = EXP_POLY[0];
    for c in &EXP_POLY[1..] {
        p = p.mul_add(r, *c);
    }
    let y = p.mul_add(r * r, r) + 1.0;
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

const EXP_MIN: f32 = -87.0;
const LOG2_E: f32 = std::f32::consts::LOG2_E;
/// ln 2 in two parts: the first exact in few bits, so `n * LN2_HI` is exact.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const EXP_POLY: [f32; 6] = [1.987_569_1e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5];

/// A row's scores become `e^(s - max)` in place; returns their [`sum`].
fn softmax(s: &mut [f32]) -> f32 {
    if avx512() {
        // SAFETY: `avx512()` found AVX512F.
        #[allow(unsafe_code)]
        return unsafe { softmax_avx512(s) };
    }
    let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    s.iter_mut().for_each(|s| *s = exp(*s - max));
    sum(s)
}

/// The cached keys or values of one batch entry and KV head: row j (an absolute position) starts at
/// `(j - first) * stride`.
#[derive(Clone, Copy)]
struct Rows<'a> {
    data: &'a [f32],
    first: usize,
    stride: usize,
    d: usize,
}

impl<'a> Rows<'a> {
    fn row(&self, j: usize) -> &'a [f32] {
        &self.data[(j - self.first) * self.stride..][..self.d]
    }
}

/// `dst[n] = dot(row, keys.row(range.start + n)) * scale`. On AVX-512, eight keys at a time, each
/// in [`dot`]'s bits, so a score does not depend on where its block starts.
fn score_block(dst: &mut [f32], row: &[f32], range: std::ops::Range<usize>, keys: &Rows, scale: f32) {
    assert_eq!(dst.len(), range.len());
    if !avx512() {
        for (s, j) in dst.iter_mut().zip(range) {
            *s = dot(row, keys.row(j)) * scale;
        }
        return;
    }
    if range.is_empty() {
        return;
    }
    // Bounds: the last key is in the cache (rows are ordered), and the row is as long as a key.
    let (_, _) = (keys.row(range.end - 1), &row[..keys.d]);
    for (n, first) in range.clone().step_by(8).enumerate() {
        let count = (range.end - first).min(8);
        // SAFETY: `avx512()` found AVX512F; keys first..first + count are in `keys.data` (checked
        // above), `row` holds `keys.d` values, and `dst` the `count` scores from 8n.
        #[allow(unsafe_code)]
        unsafe {
            dot8_avx512(row.as_ptr(), keys, first, count, scale, dst.as_mut_ptr().add(8 * n))
        };
    }
}

/// `o[x] = fma(p[n], values.row(range.start + n)[x], o[x])` for n in order, for every query of
/// `group` (its output at `out[g * d..]`, its weights `p[i]`): each query's plain loop, so summing a
/// row's values block by block gives the bits of one pass over them all. On AVX-512 up to four
/// queries that read the same values go over them together.
fn weigh_group(out: &mut [f32], group: &[usize], p: &[&[f32]], values: &Rows, range: std::ops::Range<usize>) {
    let d = values.d;
    assert!(p.iter().all(|p| p.len() == range.len()) && group.iter().all(|&g| (g + 1) * d <= out.len()));
    if range.is_empty() {
        return;
    }
    if !avx512() {
        for (&g, p) in group.iter().zip(p) {
            for (j, p) in range.clone().zip(p.iter()) {
                for (x, y) in out[g * d..(g + 1) * d].iter_mut().zip(values.row(j)) {
                    *x = p.mul_add(*y, *x);
                }
            }
        }
        return;
    }
    let v = values.row(range.start).as_ptr();
    let _ = values.row(range.end - 1);
    for (group, p) in group.chunks(4).zip(p.chunks(4)) {
        let at = |i: usize| group[i.min(group.len() - 1)] * d;
        let pp = |i: usize| p[i.min(p.len() - 1)].as_ptr();
        let o = out.as_mut_ptr();
        // SAFETY: `avx512()` found AVX512F; every output is d values inside `out` and every weight
        // list `range.len()` long (asserted above); values range.start..range.end are in the cache
        // (their last row was checked just above), `values.stride` apart.
        #[allow(unsafe_code)]
        unsafe {
            match group.len() {
                1 => weigh_avx512::<1>(o, [at(0)], [pp(0)], range.len(), v, values.stride, d),
                2 => weigh_avx512::<2>(o, [at(0), at(1)], [pp(0), pp(1)], range.len(), v, values.stride, d),
                3 => weigh_avx512::<3>(o, [at(0), at(1), at(2)], [pp(0), pp(1), pp(2)], range.len(), v, values.stride, d),
                _ => weigh_avx512::<4>(o, [at(0), at(1), at(2), at(3)], [pp(0), pp(1), pp(2), pp(3)], range.len(), v, values.stride, d),
            }
        }
    }
}

/// [`dot`] of one row with keys `first..first + count` (up to eight; a short group repeats its last
/// key), in `dot`'s bits, times `scale`, written to `dst[..count]`: the eight lane sums run side by
/// side, and the tree of each key's lanes is done for all eight at once by shuffles that pair
/// exactly the lanes [`tree`] pairs.
///
/// # Safety
/// The CPU has AVX512F; `a` points to `keys.d` values, keys `first..first + count` are in
/// `keys.data`, and `dst` has room for `count` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(unsafe_code)]
unsafe fn dot8_avx512(a: *const f32, keys: &Rows, first: usize, count: usize, scale: f32, dst: *mut f32) {
    use std::arch::x86_64::*;
    let n = keys.d;
    let base = keys.data.as_ptr().add((first - keys.first) * keys.stride);
    let key = |k: usize| base.add(k.min(count - 1) * keys.stride);
    let mut acc = [_mm512_setzero_ps(); 8];
    for c in (0..n).step_by(LANES) {
        // A short last chunk reads zeros past the end, as `dot` does.
        let mask: __mmask16 = if c + LANES <= n { 0xffff } else { (1u16 << (n - c)) - 1 };
        let x = _mm512_maskz_loadu_ps(mask, a.add(c));
        for (k, acc) in acc.iter_mut().enumerate() {
            *acc = _mm512_fmadd_ps(x, _mm512_maskz_loadu_ps(mask, key(k).add(c)), *acc);
        }
    }
    // Lane l + 8 onto l, keys k and k + 1 in one register: [k's 8 | k + 1's 8].
    let half = |k: usize| {
        let lo = _mm512_shuffle_f32x4::<0b01_00_01_00>(acc[k], acc[k + 1]);
        let hi = _mm512_shuffle_f32x4::<0b11_10_11_10>(acc[k], acc[k + 1]);
        _mm512_add_ps(lo, hi)
    };
    let (h01, h23, h45, h67) = (half(0), half(2), half(4), half(6));
    // Lane l + 4 onto l: [k | k + 1 | k + 2 | k + 3], four lanes each.
    let quarter =
        |x: __m512, y: __m512| _mm512_add_ps(_mm512_shuffle_f32x4::<0b10_00_10_00>(x, y), _mm512_shuffle_f32x4::<0b11_01_11_01>(x, y));
    let (q0, q4) = (quarter(h01, h23), quarter(h45, h67));
    // Lane l + 2 onto l: block i holds [key i's 2 | key i + 4's 2].
    let pairs = _mm512_add_ps(_mm512_shuffle_ps::<0b01_00_01_00>(q0, q4), _mm512_shuffle_ps::<0b11_10_11_10>(q0, q4));
    // Lane l + 1 onto l: key i at lane 4i, key i + 4 at lane 4i + 2.
    let sums = _mm512_add_ps(pairs, _mm512_permute_ps::<0b10_11_00_01>(pairs));
    // Keys 0..8 to lanes 0..8, each times the scale as `score_block`'s plain loop does.
    let order = _mm512_setr_epi32(0, 4, 8, 12, 2, 6, 10, 14, 0, 0, 0, 0, 0, 0, 0, 0);
    let scores = _mm512_mul_ps(_mm512_permutexvar_ps(order, sums), _mm512_set1_ps(scale));
    _mm512_mask_storeu_ps(dst, ((1u32 << count) - 1) as __mmask16, scores);
}

/// [`softmax`] in AVX-512: [`exp`]'s operations in 16 lanes, [`sum`]'s lanes, the same bits.
///
/// # Safety
/// The CPU has AVX512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(unsafe_code)]
unsafe fn softmax_avx512(s: &mut [f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = s.len();
    let mask = |c: usize| -> __mmask16 {
        if c + LANES <= n {
            0xffff
        } else {
            (1u16 << (n - c)) - 1
        }
    };
    let mut max = _mm512_set1_ps(f32::NEG_INFINITY);
    for c in (0..n).step_by(LANES) {
        max = _mm512_mask_max_ps(max, mask(c), max, _mm512_maskz_loadu_ps(mask(c), s.as_ptr().add(c)));
    }
    let max = _mm512_set1_ps(_mm512_reduce_max_ps(max));
    let poly = EXP_POLY.map(|c| _mm512_set1_ps(c));
    let mut acc = _mm512_setzero_ps();
    for c in (0..n).step_by(LANES) {
        let m = mask(c);
        let x = _mm512_max_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s.as_ptr().add(c)), max), _mm512_set1_ps(EXP_MIN));
        let k = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(x, _mm512_set1_ps(LOG2_E)));
        let r = _mm512_fmadd_ps(k, _mm512_set1_ps(-LN2_HI), x);
        let r = _mm512_fmadd_ps(k, _mm512_set1_ps(-LN2_LO), r);
        let mut p = poly[0];
        for c in &poly[1..] {
            p = _mm512_fmadd_ps(p, r, *c);
        }
        let y = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0));
        let scale = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(_mm512_cvtps_epi32(k), _mm512_set1_epi32(127))));
        let e = _mm512_maskz_mul_ps(m, y, scale);
        _mm512_mask_storeu_ps(s.as_mut_ptr().add(c), m, e);
        acc = _mm512_add_ps(acc, e);
    }
    let mut lanes = [0f32; LANES];
    _mm512_storeu_ps(lanes.as_mut_ptr(), acc);
    tree(lanes)
}

/// [`weigh_group`] for G queries in AVX-512: a block of 64 outputs of every query stays in
/// registers across all values, each value row loaded once for the G of them; each lane's
/// arithmetic is the plain loop's.
///
/// # Safety
/// The CPU has AVX512F; `out.add(at[g])` holds d values for every g, `p[g]` holds n weights, and
/// `v` n rows of d values `stride` apart.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(unsafe_code)]
unsafe fn weigh_avx512<const G: usize>(
    out: *mut f32,
    at: [usize; G],
    p: [*const f32; G],
    n: usize,
    v: *const f32,
    stride: usize,
    d: usize,
) {
    use std::arch::x86_64::*;
    for block in (0..d).step_by(4 * LANES) {
        let masks: [__mmask16; 4] = std::array::from_fn(|r| {
            let c = block + r * LANES;
            if c + LANES <= d {
                0xffff
            } else if c < d {
                (1u16 << (d - c)) - 1
            } else {
                0
            }
        });
        let mut acc = [[_mm512_setzero_ps(); 4]; G];
        for g in 0..G {
            for r in 0..4 {
                acc[g][r] = _mm512_maskz_loadu_ps(masks[r], out.add(at[g] + block + r * LANES));
            }
        }
        for j in 0..n {
            let row = v.add(j * stride + block);
            let vr: [__m512; 4] = std::array::from_fn(|r| _mm512_maskz_loadu_ps(masks[r], row.add(r * LANES)));
            for g in 0..G {
                let w = _mm512_set1_ps(*p[g].add(j));
                for r in 0..4 {
                    acc[g][r] = _mm512_fmadd_ps(w, vr[r], acc[g][r]);
                }
            }
        }
        for g in 0..G {
            for r in 0..4 {
                _mm512_mask_storeu_ps(out.add(at[g] + block + r * LANES), masks[r], acc[g][r]);
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(unsafe_code)]
unsafe fn dot8_avx512(_: *const f32, _: &Rows, _: usize, _: usize, _: f32, _: *mut f32) {
    unreachable!("only where avx512() holds")
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(unsafe_code)]
unsafe fn softmax_avx512(_: &mut [f32]) -> f32 {
    unreachable!("only where avx512() holds")
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(unsafe_code)]
unsafe fn weigh_avx512<const G: usize>(_: *mut f32, _: [usize; G], _: [*const f32; G], _: usize, _: *const f32, _: usize, _: usize) {
    unreachable!("only where avx512() holds")
}

/// Rows that go over the cache together (a verification round fits in one block; a prefill chunk
/// is split so that its blocks still spread over threads).
const ROW_BLOCK: usize = 8;
/// Scores (rows x heads x keys) below which a call runs on the calling thread.
const PARALLEL_WORK: usize = 1 << 16;
/// Keys (and values) read per pass over a block's queries: 64 keys of 64 floats stay in L1.
const KEY_BLOCK: usize = 64;

/// One query row of one head, and the keys it sees.
struct Query<'a> {
    row: &'a [f32],
    /// The keys before its own.
    before: std::ops::Range<usize>,
    /// Its own key's slot.
    own: usize,
}

impl Query<'_> {
    /// The keys before its own that fall in `keys` (possibly none).
    fn before_in(&self, keys: &std::ops::Range<usize>) -> std::ops::Range<usize> {
        self.before.start.max(keys.start)..self.before.end.min(keys.end)
    }
}

/// Rows of block `r` of a round of `seq` rows.
fn row_block(r: usize, seq: usize) -> std::ops::Range<usize> {
    r * ROW_BLOCK..((r + 1) * ROW_BLOCK).min(seq)
}

/// `keys` in blocks of [`KEY_BLOCK`], in order.
fn key_blocks(keys: std::ops::Range<usize>) -> impl Iterator<Item = std::ops::Range<usize>> {
    keys.clone().step_by(KEY_BLOCK).map(move |b| b..(b + KEY_BLOCK).min(keys.end))
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
    attend_tree(q, k, v, pos, span, None)
}

/// Checks a round's row depths for its `rows` rows (see [`attend_tree`]): one per row, and row i
/// sits at depth `depths[i] <= i` and sees rows `0..depths[i]`, which must be the chain (each at
/// its own depth).
pub fn check_depths(depths: &[usize], rows: usize) -> Result<()> {
    if depths.len() != rows {
        return Err(ModelError::InvalidConfig(format!("{} row depths for {rows} rows", depths.len())));
    }
    for (i, &d) in depths.iter().enumerate() {
        if d > i || depths[..d].iter().enumerate().any(|(j, &e)| e != j) {
            return Err(ModelError::InvalidConfig(format!("row {i} at depth {d} does not extend the chain of rows before it")));
        }
    }
    Ok(())
}

/// Whether row depths describe a plain chain (every row at its own depth).
pub fn is_chain(depths: &[usize]) -> bool {
    depths.iter().enumerate().all(|(i, &d)| d == i)
}

/// [`attend_rows`] for a round shaped as a chain with leaves: with `depths`, new row i sits at
/// position `pos + depths[i]` and sees the cached keys, the new rows `0..depths[i]` (a prefix of the
/// chain, see [`check_depths`]) and its own key, which the cache holds at slot `pos + i`. A chain
/// row (`depths[i] == i`) sees exactly what `attend_rows` shows it, and a leaf sees the keys a
/// chain row at its position would see, in the same order: either way a row's result has the bits
/// it would have in a plain chain. `None` is the plain chain.
///
/// # Shapes
/// as [`attend_rows`]
pub fn attend_tree(q: &Tensor, k: &Tensor, v: &Tensor, pos: usize, span: Span, depths: Option<&[usize]>) -> Result<Tensor> {
    if q.dtype() != DType::F32 || !q.device().is_cpu() {
        return Err(ModelError::InvalidConfig("row attention needs f32 on the CPU".into()));
    }
    let (b, heads, seq, d) = q.dims4()?;
    let (_, kv_heads, total, _) = k.dims4()?;
    if span.key_start + total != pos + seq || heads % kv_heads != 0 {
        return Err(ModelError::InvalidConfig(format!("attention over {total} keys from {} for {seq} rows at {pos}", span.key_start)));
    }
    if let Some(t) = depths {
        check_depths(t, seq)?;
    }
    let depth = |i: usize| depths.map_or(i, |t| t[i]);
    if let Some(first) = (0..seq).map(|i| span.keys(pos + depth(i)).start).find(|&f| f < span.key_start) {
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
    // One task per batch entry, key/value head and block of rows: every query head that reads the
    // same keys, for every row of the block, goes over them together, a block of keys at a time
    // while it sits in L1, instead of each (head, row) streaming the whole cache again. Each score
    // and each output lane is still summed in its own fixed order (see `score_block` and
    // `weigh_block`), so a row's bits do not depend on its company.
    let blocks = seq.div_ceil(ROW_BLOCK);
    let tasks: Vec<(usize, usize, usize)> =
        (0..b).flat_map(|bi| (0..kv_heads).flat_map(move |kv| (0..blocks).map(move |r| (bi, kv, r)))).collect();
    let task = |&(bi, kv, r): &(usize, usize, usize)| {
        let keys = Rows { data: &kd[bi * ks[0] + kv * ks[1]..], first: ks0, stride: ks[2], d };
        let values = Rows { data: &vd[bi * vs[0] + kv * vs[1]..], first: ks0, stride: vs[2], d };
        let rows = row_block(r, seq);
        // Query (head h, row i), heads outer: the keys before it and its own key at slot pos + i.
        let queries: Vec<Query> = (kv * rep..(kv + 1) * rep)
            .flat_map(|h| rows.clone().map(move |i| (h, i)))
            .map(|(h, i)| {
                let seen = span.keys(pos + depth(i));
                Query { row: &qd[((bi * heads + h) * seq + i) * d..][..d], before: seen.start..seen.end - 1, own: pos + i }
            })
            .collect();
        // The query heads of one row read the same keys: they weigh the values together.
        let groups: Vec<Vec<usize>> = (0..rows.len()).map(|i| (0..rep).map(|h| h * rows.len() + i).collect()).collect();
        let first = queries.iter().map(|q| q.before.start).min().unwrap_or(0);
        let last = queries.iter().map(|q| q.before.end).max().unwrap_or(0);
        // A query's scores: the keys before its own in order, then its own.
        let mut scores: Vec<Vec<f32>> = queries.iter().map(|q| vec![0f32; q.before.len() + 1]).collect();
        for block in key_blocks(first..last) {
            for (q, s) in queries.iter().zip(&mut scores) {
                let seen = q.before_in(&block);
                if !seen.is_empty() {
                    let from = seen.start - q.before.start;
                    score_block(&mut s[from..from + seen.len()], q.row, seen, &keys, scale);
                }
            }
        }
        let mut sums = Vec::with_capacity(queries.len());
        for (q, s) in queries.iter().zip(&mut scores) {
            *s.last_mut().expect("a query sees its own key") = dot(q.row, keys.row(q.own)) * scale;
            sums.push(softmax(s));
        }
        let mut out = vec![0f32; queries.len() * d];
        for block in key_blocks(first..last) {
            for group in &groups {
                let q = &queries[group[0]];
                let seen = q.before_in(&block);
                if seen.is_empty() {
                    continue;
                }
                let from = seen.start - q.before.start;
                let p: Vec<&[f32]> = group.iter().map(|&g| &scores[g][from..from + seen.len()]).collect();
                weigh_group(&mut out, group, &p, &values, seen);
            }
        }
        for group in &groups {
            let own = queries[group[0]].own;
            let p: Vec<&[f32]> = group.iter().map(|&g| &scores[g][scores[g].len() - 1..]).collect();
            weigh_group(&mut out, group, &p, &values, own..own + 1);
        }
        for (o, sum) in out.chunks_exact_mut(d).zip(sums) {
            let inv = 1.0 / sum;
            o.iter_mut().for_each(|x| *x *= inv);
        }
        out
    };
    // Handing a few small tasks to rayon's pool costs a thread wake-up per call, tens of
    // microseconds, more than a decode round's attention in a layer: small calls run here.
    let work: usize = seq * heads * (pos + seq - ks0);
    let done: Vec<Vec<f32>> = if rayon::current_num_threads() > 1 && work > PARALLEL_WORK {
        tasks.par_iter().map(task).collect()
    } else {
        tasks.iter().map(task).collect()
    };
    let mut out = vec![0f32; b * heads * seq * d];
    for (&(bi, kv, r), done) in tasks.iter().zip(&done) {
        let rows = row_block(r, seq);
        for (n, h) in (kv * rep..(kv + 1) * rep).enumerate() {
            let src = &done[n * rows.len() * d..(n + 1) * rows.len() * d];
            out[((bi * heads + h) * seq + rows.start) * d..][..src.len()].copy_from_slice(src);
        }
    }
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
        // Small, and past a block of rows and a block of keys with AVX-sized heads.
        for (d, pos, seq) in [(16, 11, 5), (64, 130, 19)] {
            same_alone_and_in_a_batch(d, pos, seq)?;
        }
        Ok(())
    }

    fn same_alone_and_in_a_batch(d: usize, pos: usize, seq: usize) -> Result<()> {
        let dev = Device::Cpu;
        let (heads, kv) = (6, 2);
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

    /// In a round shaped as a chain with leaves, every row gets the bits it gets in a plain chain
    /// that ends at it: a leaf sees the chain before its position and itself, nothing else.
    #[test]
    fn a_leaf_gets_the_bits_of_a_chain_ending_at_it() -> Result<()> {
        let dev = Device::Cpu;
        let (heads, kv, d, pos) = (6, 2, 64, 13);
        // Rows 0..3 are the chain, row 3 is a leaf at depth 1, row 4 a leaf at depth 2.
        let depths = [0, 1, 2, 1, 2];
        let seq = depths.len();
        let q = Tensor::randn(0f32, 1.0, (1, heads, seq, d), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (1, kv, pos + seq, d), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (1, kv, pos + seq, d), &dev)?;
        let span = Span { key_start: 0, window: None, scale: 0.125 };
        let tree = attend_tree(&q, &k, &v, pos, span, Some(&depths))?;
        for (i, &depth) in depths.iter().enumerate() {
            // The chain that ends at row i: rows 0..depth, then row i.
            let rows: Vec<usize> = (0..depth).chain([i]).collect();
            let pick = |t: &Tensor, n: usize| -> Result<Tensor> {
                let idx = Tensor::new(rows.iter().map(|&r| (n + r) as u32).collect::<Vec<_>>().as_slice(), &dev)?;
                let new = t.index_select(&idx, 2)?;
                Ok(if n == 0 { new } else { Tensor::cat(&[&t.narrow(2, 0, n)?, &new], 2)? })
            };
            let chain = attend_rows(&pick(&q, 0)?, &pick(&k, pos)?, &pick(&v, pos)?, pos, span)?;
            let diff = (chain.narrow(2, depth, 1)? - tree.narrow(2, i, 1)?)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert_eq!(diff, 0.0, "row {i}");
        }
        // A row that does not extend the chain is refused.
        assert!(attend_tree(&q, &k, &v, pos, span, Some(&[0, 1, 2, 3, 4][..4])).is_err());
        assert!(attend_tree(&q, &k, &v, pos, span, Some(&[0, 1, 1, 3, 2])).is_err());
        Ok(())
    }

    /// Whether the AVX-512 forms run on this CPU; says so when a test is skipped.
    fn vector_form_runs() -> bool {
        if !avx512() {
            eprintln!("skipped: this CPU has no AVX-512, the plain form runs");
        }
        avx512()
    }

    /// Eight keys at once on AVX-512 give each key's score in `dot`'s bits, at head sizes of whole
    /// chunks of 16 lanes and not, and so do the scores of a block whose last group is short: a
    /// row's scores must not depend on where its keys fall, nor on the CPU.
    #[test]
    fn eight_keys_at_once_have_the_bits_of_dot() -> Result<()> {
        if !vector_form_runs() {
            return Ok(());
        }
        for n in [64, 128, 256, 24, 13, 5] {
            let t = Tensor::randn(0f32, 3.0, (12, n), &Device::Cpu)?.to_vec2::<f32>()?;
            let flat: Vec<f32> = t.concat();
            let keys = Rows { data: &flat, first: 0, stride: n, d: n };
            let mut scores = vec![0f32; 11];
            score_block(&mut scores, &t[0], 1..12, &keys, 0.125);
            let want: Vec<u32> = (1..12).map(|j| (dot(&t[0], &t[j]) * 0.125).to_bits()).collect();
            assert_eq!(scores.iter().map(|s| s.to_bits()).collect::<Vec<_>>(), want, "length {n}, a block of 11 keys");
        }
        Ok(())
    }

    /// `dot` is the dot product and `exp` the exponential, to rounding; below -87 `exp` holds at
    /// e^-87.
    #[test]
    fn dot_and_exp_are_accurate() -> Result<()> {
        let t = Tensor::randn(0f32, 1.0, (2, 200), &Device::Cpu)?.to_vec2::<f32>()?;
        let (a, b) = (&t[0], &t[1]);
        let want: f64 = a.iter().zip(b).map(|(&a, &b)| a as f64 * b as f64).sum();
        assert!((dot(a, b) as f64 - want).abs() < 1e-4, "{} against {want}", dot(a, b));
        for i in 0..=20_000 {
            let x = -87.0 * i as f32 / 20_000.0;
            let (got, want) = (exp(x) as f64, (x as f64).exp());
            assert!((got - want).abs() <= 2.5e-7 * want, "exp({x}) = {got}, not {want}");
        }
        assert_eq!(exp(-1000.0), exp(-87.0));
        assert_eq!(exp(0.0), 1.0);
        Ok(())
    }

    /// The AVX-512 softmax gives the plain one's bits: exponentials and their sum, on rows of
    /// whole chunks and not, with scores far below the largest.
    #[test]
    fn the_vector_softmax_is_the_plain_one() -> Result<()> {
        if !vector_form_runs() {
            return Ok(());
        }
        for n in [1, 7, 16, 100, 1301] {
            let mut x = (Tensor::randn(0f32, 4.0, n, &Device::Cpu)?.to_vec1::<f32>()?).clone();
            if n > 7 {
                x[3] = -200.0;
            }
            let mut plain = x.clone();
            let max = plain.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            plain.iter_mut().for_each(|s| *s = exp(*s - max));
            let plain_sum = sum(&plain);
            // SAFETY: `avx512()` holds (checked above).
            #[allow(unsafe_code)]
            let got_sum = unsafe { softmax_avx512(&mut x) };
            assert_eq!(got_sum.to_bits(), plain_sum.to_bits(), "sum of {n}");
            assert!(x.iter().zip(&plain).all(|(a, b)| a.to_bits() == b.to_bits()), "exponentials of {n}");
        }
        Ok(())
    }

    /// The weighted sum gives each query's plain loop's bits (on AVX-512, its register-held form,
    /// several queries at once), for head sizes of 64, 128 and ones that are not multiples of 64 or
    /// 16, in one pass or continued block by block.
    #[test]
    fn weigh_group_has_the_bits_of_the_plain_loop() -> Result<()> {
        for d in [64, 128, 24, 80, 13] {
            let v = Tensor::randn(0f32, 2.0, (37, d), &Device::Cpu)?.to_vec2::<f32>()?;
            let flat: Vec<f32> = v.concat();
            let values = Rows { data: &flat, first: 0, stride: d, d };
            let p = Tensor::rand(0f32, 1.0, (5, 37), &Device::Cpu)?.to_vec2::<f32>()?;
            let want: Vec<Vec<f32>> = p
                .iter()
                .map(|p| {
                    let mut o = vec![0f32; d];
                    for (p, v) in p.iter().zip(&v) {
                        for (x, y) in o.iter_mut().zip(v) {
                            *x = p.mul_add(*y, *x);
                        }
                    }
                    o
                })
                .collect();
            let group: Vec<usize> = (0..5).collect();
            let mut whole = vec![0f32; 5 * d];
            let all: Vec<&[f32]> = p.iter().map(|p| p.as_slice()).collect();
            weigh_group(&mut whole, &group, &all, &values, 0..37);
            let mut split = vec![0f32; 5 * d];
            let (head, tail): (Vec<&[f32]>, Vec<&[f32]>) = (p.iter().map(|p| &p[..20]).collect(), p.iter().map(|p| &p[20..]).collect());
            weigh_group(&mut split, &group, &head, &values, 0..20);
            weigh_group(&mut split, &group, &tail, &values, 20..37);
            for got in [whole, split] {
                for (g, want) in got.chunks_exact(d).zip(&want) {
                    assert!(g.iter().zip(want).all(|(g, w)| g.to_bits() == w.to_bits()), "head size {d}");
                }
            }
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
