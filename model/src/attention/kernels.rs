//! The fixed arithmetic of row attention: a score is 16 lanes of fused multiply-adds summed in a
//! fixed tree, the softmax uses hat's own `exp` (Cephes' `expf` in fused multiply-adds) and 16-lane
//! sums, and each output value is a chain of fused multiply-adds over the keys in order. On AVX-512
//! the same operations run in vector registers (eight keys' scores at once, up to four query heads
//! over the same values at once); elsewhere in plain loops; the bits are the same either way, so a
//! row's result depends neither on its batch nor on the CPU.

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

/// The lanes of the chunk of 16 values from `c` that fall inside `len` values (none past the end):
/// the mask every AVX-512 form loads and stores a short last chunk with.
fn tail_mask(c: usize, len: usize) -> u16 {
    match len.saturating_sub(c) {
        n if n >= LANES => 0xffff,
        n => (1u16 << n) - 1,
    }
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
pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
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
pub(super) fn softmax(s: &mut [f32]) -> f32 {
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
pub(super) struct Rows<'a> {
    pub(super) data: &'a [f32],
    pub(super) first: usize,
    pub(super) stride: usize,
    pub(super) d: usize,
}

impl<'a> Rows<'a> {
    pub(super) fn row(&self, j: usize) -> &'a [f32] {
        &self.data[(j - self.first) * self.stride..][..self.d]
    }
}

/// Asks for rows `range` of `rows` to be brought into the cache ahead of use (the values a block's
/// scores will weigh, the next block's keys): a row is read once a round, from memory when many
/// sessions' caches do not fit in the CPU's, and the hardware prefetcher ramps up too slowly on
/// runs of a few hundred keys.
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
pub(super) fn prefetch(rows: &Rows, range: std::ops::Range<usize>) {
    #[cfg(target_arch = "x86_64")]
    if !range.is_empty() {
        let (first, _) = (rows.row(range.start).as_ptr(), rows.row(range.end - 1));
        for n in 0..range.len() {
            for line in (0..rows.d).step_by(16) {
                // SAFETY: rows range.start..range.end are in `rows.data` (the last was checked just
                // above), `stride` apart and `d` long; a prefetch reads nothing and cannot fault.
                #[allow(unsafe_code)]
                unsafe {
                    std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(first.add(n * rows.stride + line) as *const i8)
                };
            }
        }
    }
}

/// `dst[n] = dot(row, keys.row(range.start + n)) * scale`. On AVX-512, eight keys at a time, each
/// in [`dot`]'s bits, so a score does not depend on where its block starts.
pub(super) fn score_block(dst: &mut [f32], row: &[f32], range: std::ops::Range<usize>, keys: &Rows, scale: f32) {
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
pub(super) fn weigh_group(out: &mut [f32], group: &[usize], p: &[&[f32]], values: &Rows, range: std::ops::Range<usize>) {
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
        let at = |i: usize| group[i] * d;
        let pp = |i: usize| p[i].as_ptr();
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
        let mask = tail_mask(c, n);
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
    let mask = |c: usize| tail_mask(c, n);
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
        let masks: [__mmask16; 4] = std::array::from_fn(|r| tail_mask(block + r * LANES, d));
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    use crate::error::Result;

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
}
