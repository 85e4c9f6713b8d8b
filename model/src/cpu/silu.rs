//! `silu(gate) * up` with the bits of candle's two ops (`g / (1 + e^-g)`, then the product), in
//! AVX-512 where the CPU has it, on the calling thread.
//!
//! candle computes `e^-g` with libm's `expf`, one scalar call a value, and splits the map over
//! rayon's pool: in a batch of 16 sessions' rows that was 7 % of the cloud middle's time. Here
//! `e^-g` is glibc's `expf` algorithm (the one its x86-64 FMA build runs: x = (k + r) ln 2 / 32, a
//! 32-entry table of 2^(i/32) and a cubic in r, in doubles with fused multiply-adds, rounded once to
//! f32), eight doubles a register. It gives glibc's bits for every one of the 2^32 floats (the test
//! `expf_is_glibcs_everywhere` checks them all), so packages, trained heads and `--mode local` keep
//! their bits, and now on every libm alike.

/// 2^(i/32) as doubles, less `i << 47`: adding `k << 47` for k = 32n + i then gives 2^(k/32).
const TABLE: [u64; 32] = [
    0x3ff0000000000000,
    0x3fefd9b0d3158574,
    0x3fefb5586cf9890f,
    0x3fef9301d0125b51,
    0x3fef72b83c7d517b,
    0x3fef54873168b9aa,
    0x3fef387a6e756238,
    0x3fef1e9df51fdee1,
    0x3fef06fe0a31b715,
    0x3feef1a7373aa9cb,
    0x3feedea64c123422,
    0x3feece086061892d,
    0x3feebfdad5362a27,
    0x3feeb42b569d4f82,
    0x3feeab07dd485429,
    0x3feea47eb03a5585,
    0x3feea09e667f3bcd,
    0x3fee9f75e8ec5f74,
    0x3feea11473eb0187,
    0x3feea589994cce13,
    0x3feeace5422aa0db,
    0x3feeb737b0cdc5e5,
    0x3feec49182a3f090,
    0x3feed503b23e255d,
    0x3feee89f995ad3ad,
    0x3feeff76f2fb5e47,
    0x3fef199bdd85529c,
    0x3fef3720dcef9069,
    0x3fef5818dcfba487,
    0x3fef7c97337b9b5f,
    0x3fefa4afa2a490da,
    0x3fefd0765b6e4540,
];
/// 32 / ln 2.
const INV_LN2_32: f64 = f64::from_bits(0x40471547652b82fe);
/// 1.5 * 2^52: adding it rounds a double of magnitude below 2^51 to an integer, left in the low bits.
const SHIFT: f64 = f64::from_bits(0x4338000000000000);
/// The cubic's coefficients for r in units of ln 2 / 32: r^3, r^2 and r.
const POLY: [f64; 3] = [f64::from_bits(0x3ebc6af84b912394), f64::from_bits(0x3f2ebfce50fac4f3), f64::from_bits(0x3f962e42ff0c52d6)];
/// |x| from here on takes glibc's special cases (bits of 88.0 with the low mantissa bits cleared).
const SPECIAL: u32 = 0x42b0_0000;
/// Above this `expf` overflows to infinity, below that it underflows to zero.
const OVERFLOW: f32 = f32::from_bits(0x42b1_7217);
const UNDERFLOW: f32 = f32::from_bits(0xc2cf_f1b4);

/// glibc's `expf`, bit for bit.
pub(super) fn expf(x: f32) -> f32 {
    if x.to_bits() & 0x7fff_ffff >= SPECIAL {
        if x == f32::NEG_INFINITY {
            return 0.0;
        }
        if !x.is_finite() {
            return x + x;
        }
        if x > OVERFLOW {
            return f32::INFINITY;
        }
        if x < UNDERFLOW {
            return 0.0;
        }
    }
    let xd = x as f64;
    let kd = INV_LN2_32.mul_add(xd, SHIFT);
    let ki = kd.to_bits();
    let r = INV_LN2_32.mul_add(xd, -(kd - SHIFT));
    let s = f64::from_bits(TABLE[(ki % 32) as usize].wrapping_add(ki << 47));
    let z = POLY[0].mul_add(r, POLY[1]);
    let y = POLY[2].mul_add(r, 1.0);
    (z.mul_add(r * r, y) * s) as f32
}

/// One value: candle's `silu` (`g / (1 + e^-g)`), then times `u`.
fn one(g: f32, u: f32) -> f32 {
    g / (1.0 + expf(-g)) * u
}

/// `dst[i] = silu(gate[i]) * up[i]`, in candle's bits.
pub(super) fn silu_mul(gate: &[f32], up: &[f32], dst: &mut [f32]) {
    assert!(gate.len() == up.len() && up.len() == dst.len());
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        let whole = gate.len() / 16 * 16;
        for c in (0..whole).step_by(16) {
            // SAFETY: AVX512F was found above; 16 values from c are in all three slices.
            #[allow(unsafe_code)]
            let done = unsafe { silu_mul16(gate.as_ptr().add(c), up.as_ptr().add(c), dst.as_mut_ptr().add(c)) };
            if !done {
                for i in c..c + 16 {
                    dst[i] = one(gate[i], up[i]);
                }
            }
        }
        for i in whole..gate.len() {
            dst[i] = one(gate[i], up[i]);
        }
        return;
    }
    for ((d, &g), &u) in dst.iter_mut().zip(gate).zip(up) {
        *d = one(g, u);
    }
}

/// [`silu_mul`] for 16 values in AVX-512: [`expf`]'s operations on two registers of eight doubles.
/// Returns false, writing nothing, when a value takes one of `expf`'s special cases (|g| of 88 or
/// more, infinities, NaN): the caller does those 16 in the plain form.
///
/// # Safety
/// The CPU has AVX512F; `gate`, `up` and `dst` each hold 16 values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(unsafe_code)]
unsafe fn silu_mul16(gate: *const f32, up: *const f32, dst: *mut f32) -> bool {
    use std::arch::x86_64::*;
    let g = _mm512_loadu_ps(gate);
    let abs = _mm512_and_si512(_mm512_castps_si512(g), _mm512_set1_epi32(0x7fff_ffff));
    if _mm512_cmpge_epu32_mask(abs, _mm512_set1_epi32(SPECIAL as i32)) != 0 {
        return false;
    }
    let x = _mm512_sub_ps(_mm512_setzero_ps(), g);
    let tab: [__m512i; 4] = std::array::from_fn(|i| _mm512_loadu_si512(TABLE.as_ptr().add(8 * i) as *const _));
    let exp8 = |x: __m256| -> __m256 {
        let xd = _mm512_cvtps_pd(x);
        let kd = _mm512_fmadd_pd(_mm512_set1_pd(INV_LN2_32), xd, _mm512_set1_pd(SHIFT));
        let ki = _mm512_castpd_si512(kd);
        let r = _mm512_fmsub_pd(_mm512_set1_pd(INV_LN2_32), xd, _mm512_sub_pd(kd, _mm512_set1_pd(SHIFT)));
        // TABLE[ki % 32]: entries 0..16 and 16..32 by the low four bits, then bit 4 picks.
        let low = _mm512_permutex2var_epi64(tab[0], ki, tab[1]);
        let high = _mm512_permutex2var_epi64(tab[2], ki, tab[3]);
        let t = _mm512_mask_blend_epi64(_mm512_test_epi64_mask(ki, _mm512_set1_epi64(16)), low, high);
        let s = _mm512_castsi512_pd(_mm512_add_epi64(t, _mm512_slli_epi64::<47>(ki)));
        let z = _mm512_fmadd_pd(_mm512_set1_pd(POLY[0]), r, _mm512_set1_pd(POLY[1]));
        let y = _mm512_fmadd_pd(_mm512_set1_pd(POLY[2]), r, _mm512_set1_pd(1.0));
        _mm512_cvtpd_ps(_mm512_mul_pd(_mm512_fmadd_pd(z, _mm512_mul_pd(r, r), y), s))
    };
    let lo = exp8(_mm512_castps512_ps256(x));
    let hi = exp8(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(x))));
    let e = _mm512_castpd_ps(_mm512_insertf64x4::<1>(_mm512_castps_pd(_mm512_castps256_ps512(lo)), _mm256_castps_pd(hi)));
    let silu = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0), e));
    _mm512_storeu_ps(dst, _mm512_mul_ps(silu, _mm512_loadu_ps(up)));
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `step`-th float, in the order of their bits.
    fn floats(step: u64) -> impl Iterator<Item = f32> {
        (0..1u64 << 32).step_by(step as usize).map(|b| f32::from_bits(b as u32))
    }

    fn same(a: f32, b: f32) -> bool {
        a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
    }

    /// `expf` gives libm's bits (glibc's, on the x86-64 Linux hat is built for) for every float
    /// (about 15 s).
    #[test]
    fn expf_is_glibcs_everywhere() {
        let bad: Vec<f32> = floats(1).filter(|&x| !same(expf(x), x.exp())).take(5).collect();
        assert!(bad.is_empty(), "differs from libm at {bad:?}");
    }

    /// The vector form gives candle's bits (`silu` then the product) on 16.7 million floats spread
    /// over the whole range, with values past the special-case bound, infinities and NaN among them,
    /// in runs of lengths that are not multiples of 16.
    #[test]
    fn silu_mul_has_candles_bits() {
        let candle = |g: f32, u: f32| (g / (1.0 + (-g).exp())) * u;
        let mut gate: Vec<f32> = floats(257).collect();
        gate.extend([88.0, -88.0, 100.0, -120.0, f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 1e-40, -0.0]);
        let up: Vec<f32> = gate.iter().enumerate().map(|(i, _)| (i as f32 * 0.37).sin() * 3.0).collect();
        for len in [gate.len(), gate.len() - 7, 33, 16, 5] {
            let mut dst = vec![0f32; len];
            silu_mul(&gate[..len], &up[..len], &mut dst);
            for i in 0..len {
                assert!(
                    same(dst[i], candle(gate[i], up[i])),
                    "silu({}) * {}: {} against {}",
                    gate[i],
                    up[i],
                    dst[i],
                    candle(gate[i], up[i])
                );
            }
        }
    }
}
