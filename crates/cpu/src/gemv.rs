//! Decode path: dot products of weight rows with a few activation rows, decoding each weight
//! once in registers and streaming the weights from memory exactly once per call.
//!
//! On AVX2 the FP4 decode of a 32-byte chunk (see [`crate::decode`]) feeds up to [`MAX_R`]
//! activation rows; with more rows the same (now L1-resident) weight row is decoded again for
//! the next group, so memory traffic stays one pass. With one row, products accumulate unscaled
//! per block and are scaled once per chunk (fewer multiplies: T = 1 is the decode-token case);
//! with more, the decoded weights are scaled once and shared by all rows.

use crate::decode::{WRows, decode_row};
use crate::isa::Isa;

/// Activation rows handled per decode of a weight row (bounded by the 16 AVX2 registers).
pub(crate) const MAX_R: usize = 4;

/// `out[(n - n0) * xs.len() + r] = W[n] · xs[r]` for `n in n0..n1`. Each `xs[r]` holds the
/// activations permuted for `w` on `isa` ([`crate::decode::permute_into`]).
pub(crate) fn gemv(isa: Isa, w: &WRows, n0: usize, n1: usize, xs: &[&[f32]], out: &mut [f32]) {
    let t = xs.len();
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: Avx2 is only selected after runtime detection (Isa::available).
        Isa::Avx2 => unsafe { avx2::gemv(w, n0, n1, xs, out) },
        _ => {
            // Portable and NEON: decode the row (NEON-accelerated where written), then dot.
            let mut buf = vec![0.0f32; w.cols()];
            for n in n0..n1 {
                decode_row(isa, w, n, 0, w.cols(), &mut buf);
                for (r, x) in xs.iter().enumerate() {
                    out[(n - n0) * t + r] = dot(isa, &buf, x);
                }
            }
        }
    }
}

/// f32 dot product on `isa`.
pub(crate) fn dot(isa: Isa, a: &[f32], b: &[f32]) -> f32 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: runtime-detected.
        Isa::Avx2 => unsafe { avx2::dot(a, b) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: runtime-detected.
        Isa::Neon => unsafe { neon::dot(a, b) },
        _ => dot_portable(a, b),
    }
}

/// Eight independent partial sums, so the compiler can vectorize without reassociating.
pub(crate) fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let mut acc = [0.0f32; 8];
    let whole = n / 8 * 8;
    for (ca, cb) in a[..whole].chunks_exact(8).zip(b[..whole].chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += ca[l] * cb[l];
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for k in whole..n {
        s += a[k] * b[k];
    }
    s
}

#[cfg(target_arch = "aarch64")]
mod neon {
    use std::arch::aarch64::*;

    /// # Safety
    /// NEON must be available.
    #[target_feature(enable = "neon")]
    pub(super) unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let whole = n / 8 * 8;
        let (mut s0, mut s1) = (vdupq_n_f32(0.0), vdupq_n_f32(0.0));
        for k in (0..whole).step_by(8) {
            // SAFETY: k + 8 <= whole <= both lengths.
            unsafe {
                s0 = vfmaq_f32(s0, vld1q_f32(a.as_ptr().add(k)), vld1q_f32(b.as_ptr().add(k)));
                s1 = vfmaq_f32(s1, vld1q_f32(a.as_ptr().add(k + 4)), vld1q_f32(b.as_ptr().add(k + 4)));
            }
        }
        let mut s = vaddvq_f32(vaddq_f32(s0, s1));
        for k in whole..n {
            s += a[k] * b[k];
        }
        s
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use super::MAX_R;
    use crate::decode::avx2::{Regs, chunk_scales, fp4_chunk, regs, row_scales};
    use crate::decode::{BF16_CHUNK, FP4_CHUNK, WRows, scale_lut};
    use fp4::{Format, e2m1};
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// # Safety
    /// AVX2 + FMA must be available.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let whole = n / 16 * 16;
        let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for k in (0..whole).step_by(16) {
            // SAFETY: k + 16 <= whole <= both lengths.
            unsafe {
                let (pa, pb) = (a.as_ptr().add(k), b.as_ptr().add(k));
                s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa), _mm256_loadu_ps(pb), s0);
                s1 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(8)), _mm256_loadu_ps(pb.add(8)), s1);
            }
        }
        let mut s = hsum(_mm256_add_ps(s0, s1));
        for k in whole..n {
            s += a[k] * b[k];
        }
        s
    }

    /// # Safety
    /// AVX2 + FMA must be available; `xs[r]` must hold `w.cols()` values, `out` the results.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn gemv(w: &WRows, n0: usize, n1: usize, xs: &[&[f32]], out: &mut [f32]) {
        let t = xs.len();
        let cols = w.cols();
        assert!(xs.iter().all(|x| x.len() >= cols) && out.len() >= (n1 - n0) * t);
        let regs = regs();
        let mut sbuf = Vec::with_capacity(cols / 16);
        for n in n0..n1 {
            let o = &mut out[(n - n0) * t..(n - n0 + 1) * t];
            for (g, xg) in xs.chunks(MAX_R).enumerate() {
                let og = &mut o[g * MAX_R..g * MAX_R + xg.len()];
                // SAFETY: lengths asserted above; AVX2 available (caller).
                unsafe {
                    match xg.len() {
                        1 => row::<1>(w, n, xg, og, &regs, &mut sbuf),
                        2 => row::<2>(w, n, xg, og, &regs, &mut sbuf),
                        3 => row::<3>(w, n, xg, og, &regs, &mut sbuf),
                        _ => row::<4>(w, n, xg, og, &regs, &mut sbuf),
                    }
                }
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn row<const R: usize>(
        w: &WRows,
        n: usize,
        xs: &[&[f32]],
        out: &mut [f32],
        regs: &Regs,
        sbuf: &mut Vec<f32>,
    ) {
        let xp: [*const f32; R] = std::array::from_fn(|r| xs[r].as_ptr());
        // SAFETY: forwarded from gemv.
        let sums = unsafe {
            match *w {
                WRows::Fp4 { format, codes, scales, cols, .. } => {
                    let (cb, nb) = (cols / 2, cols / format.block());
                    let (codes, scales) = (&codes[n * cb..(n + 1) * cb], &scales[n * nb..(n + 1) * nb]);
                    fp4_row::<R>(format, codes, scales, w.row_ts(n), xp, regs, sbuf)
                }
                WRows::Bf16 { bytes, cols } => bf16_row::<R>(&bytes[n * cols * 2..(n + 1) * cols * 2], xp),
                WRows::F32 { data, cols } => f32_row::<R>(&data[n * cols..(n + 1) * cols], xp),
            }
        };
        out[..R].copy_from_slice(&sums);
    }

    /// One FP4 row against R activation rows (permuted; natural past the last whole chunk).
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn fp4_row<const R: usize>(
        format: Format,
        codes: &[u8],
        scales: &[u8],
        ts: f32,
        xp: [*const f32; R],
        regs: &Regs,
        sbuf: &mut Vec<f32>,
    ) -> [f32; R] {
        let lut = scale_lut(format);
        row_scales(scales, lut, ts, sbuf);
        let cols = codes.len() * 2;
        let chunks = cols / FP4_CHUNK;
        // Two accumulators per row: vectors with q < 2 and q >= 2 have their own block scale
        // (NVFP4), and two chains halve the FMA latency each chunk waits on.
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for c in 0..chunks {
            // SAFETY: chunk c lies within the row; x rows hold `cols` values.
            unsafe {
                let f = fp4_chunk(codes.as_ptr().add(c * 32), regs);
                let (sa, sb) = chunk_scales(format, sbuf, c);
                let base = c * FP4_CHUNK;
                if R == 1 {
                    let x = |v: usize| _mm256_loadu_ps(xp[0].add(base + 8 * v));
                    let mut ta = _mm256_mul_ps(f[0], x(0));
                    let mut tb = _mm256_mul_ps(f[2], x(2));
                    ta = _mm256_fmadd_ps(f[1], x(1), ta);
                    tb = _mm256_fmadd_ps(f[3], x(3), tb);
                    ta = _mm256_fmadd_ps(f[4], x(4), ta);
                    tb = _mm256_fmadd_ps(f[6], x(6), tb);
                    ta = _mm256_fmadd_ps(f[5], x(5), ta);
                    tb = _mm256_fmadd_ps(f[7], x(7), tb);
                    acc[0][0] = _mm256_fmadd_ps(ta, sa, acc[0][0]);
                    acc[0][1] = _mm256_fmadd_ps(tb, sb, acc[0][1]);
                } else {
                    let g: [__m256; 8] =
                        std::array::from_fn(|v| _mm256_mul_ps(f[v], if v % 4 < 2 { sa } else { sb }));
                    for v in 0..8 {
                        for r in 0..R {
                            let x = _mm256_loadu_ps(xp[r].add(base + 8 * v));
                            let a = &mut acc[r][(v % 4) / 2];
                            *a = _mm256_fmadd_ps(g[v], x, *a);
                        }
                    }
                }
            }
        }
        let mut out = [0.0f32; R];
        for r in 0..R {
            out[r] = hsum(_mm256_add_ps(acc[r][0], acc[r][1]));
        }
        let block = format.block();
        for k in chunks * FP4_CHUNK..cols {
            let c = (codes[k / 2] >> (4 * (k % 2))) & 0xF;
            let wv = e2m1::decode(c) * sbuf[k / block];
            for r in 0..R {
                // SAFETY: k < cols.
                out[r] += wv * unsafe { *xp[r].add(k) };
            }
        }
        out
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn bf16_row<const R: usize>(row: &[u8], xp: [*const f32; R]) -> [f32; R] {
        let cols = row.len() / 2;
        let whole = cols / BF16_CHUNK * BF16_CHUNK;
        let top = _mm256_set1_epi32(0xFFFF_0000u32 as i32);
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for k in (0..whole).step_by(BF16_CHUNK) {
            // SAFETY: k + 16 <= whole; 32 bytes at 2k lie in the row.
            unsafe {
                let v = _mm256_loadu_si256(row.as_ptr().add(2 * k).cast());
                let even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
                let odd = _mm256_castsi256_ps(_mm256_and_si256(v, top));
                for r in 0..R {
                    acc[r][0] = _mm256_fmadd_ps(even, _mm256_loadu_ps(xp[r].add(k)), acc[r][0]);
                    acc[r][1] = _mm256_fmadd_ps(odd, _mm256_loadu_ps(xp[r].add(k + 8)), acc[r][1]);
                }
            }
        }
        let mut out = [0.0f32; R];
        for r in 0..R {
            out[r] = hsum(_mm256_add_ps(acc[r][0], acc[r][1]));
        }
        for k in whole..cols {
            let wv = half::bf16::from_le_bytes([row[2 * k], row[2 * k + 1]]).to_f32();
            for r in 0..R {
                // SAFETY: k < cols.
                out[r] += wv * unsafe { *xp[r].add(k) };
            }
        }
        out
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn f32_row<const R: usize>(row: &[f32], xp: [*const f32; R]) -> [f32; R] {
        let cols = row.len();
        let whole = cols / 16 * 16;
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for k in (0..whole).step_by(16) {
            // SAFETY: k + 16 <= whole.
            unsafe {
                let w0 = _mm256_loadu_ps(row.as_ptr().add(k));
                let w1 = _mm256_loadu_ps(row.as_ptr().add(k + 8));
                for r in 0..R {
                    acc[r][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xp[r].add(k)), acc[r][0]);
                    acc[r][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xp[r].add(k + 8)), acc[r][1]);
                }
            }
        }
        let mut out = [0.0f32; R];
        for r in 0..R {
            out[r] = hsum(_mm256_add_ps(acc[r][0], acc[r][1]));
        }
        for k in whole..cols {
            for r in 0..R {
                // SAFETY: k < cols.
                out[r] += row[k] * unsafe { *xp[r].add(k) };
            }
        }
        out
    }
}
