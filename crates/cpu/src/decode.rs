//! Weight decoding: FP4 (MXFP4 / NVFP4), bf16 and f32 rows into f32, in the element order the
//! SIMD kernels produce most cheaply.
//!
//! ## FP4 on AVX2
//! Every E2M1 value has at most two significant bits, so it is exact in bf16, and a bf16 is the
//! top half of an f32. Two `pshufb` lookups give the high and low byte of the bf16 of 32 nibbles
//! at once, one byte unpack makes bf16 words, and a shift / mask turns each dword's two words into
//! two f32s — no int->float conversion. Both 16-byte lookup tables are derived at startup from
//! [`fp4::e2m1::TABLE`]; no value is spelled here. The unpacks work within 128-bit lanes, so a
//! 32-byte chunk (64 elements) decodes in a fixed permutation ([`FP4_PERM`]); the kernels permute
//! the activations the same way once per call instead of un-permuting every weight.
//!
//! ## FP4 on NEON
//! `tbl` looks up `2 * TABLE[c]` as an i8 (exact: every value is a multiple of 0.5), `zip` puts
//! the nibbles in natural order, and the integers are widened and converted; the block scale is
//! applied halved.
//!
//! ## bf16 on AVX2
//! A dword holds two bf16s: `dword << 16` is the even element as f32, `dword & 0xFFFF0000` the
//! odd one ([`BF16_PERM`]).
//!
//! Elements past the last whole chunk of a row (K not a multiple of the chunk) keep their
//! natural order; the scalar and NEON paths use natural order throughout.

use crate::isa::Isa;
use fp4::{Format, e2m1};
use std::sync::OnceLock;

/// Elements per AVX2 FP4 chunk (32 code bytes, one 256-bit load).
pub(crate) const FP4_CHUNK: usize = 64;
/// Elements per AVX2 bf16 chunk (one 256-bit load).
pub(crate) const BF16_CHUNK: usize = 16;

/// Natural index (within a chunk) of the element at each position of the AVX2 FP4 decode:
/// position `8v + l` is lane `l = 4L + i` of output vector `v = 4 * nibble + q`.
pub(crate) const FP4_PERM: [u8; FP4_CHUNK] = {
    let mut p = [0u8; FP4_CHUNK];
    let mut pos = 0;
    while pos < FP4_CHUNK {
        let (v, l) = (pos / 8, pos % 8);
        let (nibble, q) = (v / 4, v % 4);
        let (lane, i) = (l / 4, l % 4);
        let byte = lane * 16 + (q / 2) * 8 + 2 * i + (q % 2);
        p[pos] = (2 * byte + nibble) as u8;
        pos += 1;
    }
    p
};

/// Natural index of the element at each position of the AVX2 bf16 decode (`8h + i` -> `2i + h`).
pub(crate) const BF16_PERM: [u8; BF16_CHUNK] = {
    let mut p = [0u8; BF16_CHUNK];
    let mut pos = 0;
    while pos < BF16_CHUNK {
        p[pos] = (2 * (pos % 8) + pos / 8) as u8;
        pos += 1;
    }
    p
};

/// A weight's element type as the kernels see it (dense f16/f32 are widened to f32 at upload).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Fp4,
    Bf16,
    F32,
}

/// Rows of a weight matrix, borrowed in the layout the kernels read.
#[derive(Clone, Copy)]
pub(crate) enum WRows<'a> {
    Fp4 {
        format: Format,
        /// `[rows, cols/2]` packed, element 2j in the low nibble.
        codes: &'a [u8],
        /// `[rows, cols/block]` scale codes.
        scales: &'a [u8],
        /// NVFP4 second-level scales of the whole matrix, one per `rows_per_ts` rows.
        tensor_scales: &'a [f32],
        rows_per_ts: usize,
        /// Index of this view's first row in the whole matrix (selects the tensor scale).
        row0: usize,
        cols: usize,
    },
    /// `[rows, cols]` little-endian bf16 bytes.
    Bf16 { bytes: &'a [u8], cols: usize },
    /// `[rows, cols]`.
    F32 { data: &'a [f32], cols: usize },
}

impl<'a> WRows<'a> {
    pub(crate) fn kind(&self) -> Kind {
        match self {
            WRows::Fp4 { .. } => Kind::Fp4,
            WRows::Bf16 { .. } => Kind::Bf16,
            WRows::F32 { .. } => Kind::F32,
        }
    }

    pub(crate) fn cols(&self) -> usize {
        match *self {
            WRows::Fp4 { cols, .. } | WRows::Bf16 { cols, .. } | WRows::F32 { cols, .. } => cols,
        }
    }

    pub(crate) fn rows(&self) -> usize {
        match *self {
            WRows::Fp4 { codes, cols, .. } => codes.len() / (cols / 2).max(1),
            WRows::Bf16 { bytes, cols } => bytes.len() / (2 * cols).max(1),
            WRows::F32 { data, cols } => data.len() / cols.max(1),
        }
    }

    /// Rows `start..start + count` (e.g. one expert of a stacked matrix).
    pub(crate) fn sub(&self, start: usize, count: usize) -> WRows<'a> {
        match *self {
            WRows::Fp4 { format, codes, scales, tensor_scales, rows_per_ts, row0, cols } => {
                let (cb, nb) = (cols / 2, cols / format.block());
                WRows::Fp4 {
                    format,
                    codes: &codes[start * cb..(start + count) * cb],
                    scales: &scales[start * nb..(start + count) * nb],
                    tensor_scales,
                    rows_per_ts,
                    row0: row0 + start,
                    cols,
                }
            }
            WRows::Bf16 { bytes, cols } => {
                WRows::Bf16 { bytes: &bytes[start * cols * 2..(start + count) * cols * 2], cols }
            }
            WRows::F32 { data, cols } => {
                WRows::F32 { data: &data[start * cols..(start + count) * cols], cols }
            }
        }
    }
}

impl WRows<'_> {
    /// Tensor scale (NVFP4 second level; 1 for MXFP4) of row `r` of this view.
    #[inline]
    pub(crate) fn row_ts(&self, r: usize) -> f32 {
        match *self {
            WRows::Fp4 { tensor_scales, rows_per_ts, row0, .. } => tensor_scales[(row0 + r) / rows_per_ts],
            _ => 1.0,
        }
    }
}

/// Block-scale code -> f32 scale, for every code of `format` (the `fp4` decode, tabulated).
/// Codes that decode to NaN never reach a kernel (`fp4::QuantMatrix::new` rejects them); they
/// map to 0 so that a row could not be poisoned anyway.
pub(crate) fn scale_lut(format: Format) -> &'static [f32; 256] {
    fn build(format: Format) -> [f32; 256] {
        std::array::from_fn(|c| {
            let s = format.decode_scale(c as u8);
            if s.is_nan() { 0.0 } else { s }
        })
    }
    static MX: OnceLock<[f32; 256]> = OnceLock::new();
    static NV: OnceLock<[f32; 256]> = OnceLock::new();
    match format {
        Format::Mxfp4 => MX.get_or_init(|| build(format)),
        Format::Nvfp4 => NV.get_or_init(|| build(format)),
    }
}

/// Elements per permutation chunk for `kind` on `isa` (`None`: natural order).
pub(crate) fn perm_of(isa: Isa, kind: Kind) -> Option<&'static [u8]> {
    match (isa, kind) {
        (Isa::Avx2, Kind::Fp4) => Some(&FP4_PERM),
        (Isa::Avx2, Kind::Bf16) => Some(&BF16_PERM),
        _ => None,
    }
}

/// `out[p] = x[natural(p)]`: activations in the order the weight decode of `kind` produces.
pub(crate) fn permute_into(isa: Isa, kind: Kind, x: &[f32], out: &mut [f32]) {
    let Some(perm) = perm_of(isa, kind) else {
        out.copy_from_slice(x);
        return;
    };
    let c = perm.len();
    let whole = x.len() / c * c;
    for (xo, xi) in out[..whole].chunks_exact_mut(c).zip(x[..whole].chunks_exact(c)) {
        for (o, &p) in xo.iter_mut().zip(perm) {
            *o = xi[p as usize];
        }
    }
    out[whole..].copy_from_slice(&x[whole..]);
}

/// `out[natural(p)] = y[p]`: undoes [`permute_into`].
pub(crate) fn unpermute_into(isa: Isa, kind: Kind, y: &[f32], out: &mut [f32]) {
    let Some(perm) = perm_of(isa, kind) else {
        out.copy_from_slice(y);
        return;
    };
    let c = perm.len();
    let whole = y.len() / c * c;
    for (yo, yi) in out[..whole].chunks_exact_mut(c).zip(y[..whole].chunks_exact(c)) {
        for (v, &p) in yi.iter().zip(perm) {
            yo[p as usize] = *v;
        }
    }
    out[whole..].copy_from_slice(&y[whole..]);
}

/// Permutes every row of `x [rows, k]`.
pub(crate) fn permute_rows(isa: Isa, kind: Kind, x: &[f32], k: usize) -> Vec<f32> {
    if perm_of(isa, kind).is_none() || k == 0 {
        return x.to_vec();
    }
    let mut out = vec![0.0f32; x.len()];
    for (o, i) in out.chunks_exact_mut(k).zip(x.chunks_exact(k)) {
        permute_into(isa, kind, i, o);
    }
    out
}

/// Decodes row `r` of `w`, columns `k0..k1`, scaled, into `out[..k1-k0]` in the order of
/// [`perm_of`]. `k0` must be a multiple of 64 (a chunk boundary for every format and kind).
pub(crate) fn decode_row(isa: Isa, w: &WRows, r: usize, k0: usize, k1: usize, out: &mut [f32]) {
    debug_assert!(k0.is_multiple_of(FP4_CHUNK) && k1 <= w.cols());
    match *w {
        WRows::Fp4 { format, codes, scales, cols, .. } => {
            let (cb, nb) = (cols / 2, cols / format.block());
            let (lut, ts) = (scale_lut(format), w.row_ts(r));
            let codes = &codes[r * cb..(r + 1) * cb];
            let scales = &scales[r * nb..(r + 1) * nb];
            let done = match isa {
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => {
                    let whole = k1 / FP4_CHUNK * FP4_CHUNK;
                    // SAFETY: Avx2 is only selected after runtime detection (Isa::available).
                    unsafe { avx2::decode_fp4(format, codes, scales, lut, ts, k0, whole, out) };
                    whole.max(k0)
                }
                #[cfg(target_arch = "aarch64")]
                Isa::Neon => {
                    let whole = k1 / 32 * 32;
                    // SAFETY: NEON is only selected after runtime detection.
                    unsafe { neon::decode_fp4(format, codes, scales, lut, ts, k0, whole, out) };
                    whole.max(k0)
                }
                _ => k0,
            };
            let block = format.block();
            for k in done..k1 {
                let c = (codes[k / 2] >> (4 * (k % 2))) & 0xF;
                out[k - k0] = e2m1::decode(c) * (lut[scales[k / block] as usize] * ts);
            }
        }
        WRows::Bf16 { bytes, cols } => {
            let row = &bytes[r * cols * 2..(r + 1) * cols * 2];
            let done = match isa {
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => {
                    let whole = k1 / BF16_CHUNK * BF16_CHUNK;
                    // SAFETY: runtime-detected; the range lies within the row.
                    unsafe { avx2::decode_bf16(row, k0, whole, out) };
                    whole.max(k0)
                }
                _ => k0,
            };
            for k in done..k1 {
                out[k - k0] = half::bf16::from_le_bytes([row[2 * k], row[2 * k + 1]]).to_f32();
            }
        }
        WRows::F32 { data, cols } => out[..k1 - k0].copy_from_slice(&data[r * cols + k0..r * cols + k1]),
    }
}

/// Lookup tables derived from [`e2m1::TABLE`] once per process.
pub(crate) struct Tables {
    /// High byte of the bf16 (= f32 bits 24..32) of each code's value.
    pub(crate) bf16_hi: [u8; 16],
    /// Low byte of the bf16 (= f32 bits 16..24).
    pub(crate) bf16_lo: [u8; 16],
    /// `2 * value` as an integer (exact: every value is a multiple of 0.5).
    pub(crate) twice_i8: [i8; 16],
}

pub(crate) fn tables() -> &'static Tables {
    static T: OnceLock<Tables> = OnceLock::new();
    T.get_or_init(|| {
        let mut t = Tables { bf16_hi: [0; 16], bf16_lo: [0; 16], twice_i8: [0; 16] };
        for (c, &v) in e2m1::TABLE.iter().enumerate() {
            let bits = v.to_bits();
            // Holds for E2M1 by construction (two significant bits); checked, not assumed.
            assert_eq!(bits & 0xFFFF, 0, "E2M1 value {v} is not exact in bf16");
            t.bf16_hi[c] = (bits >> 24) as u8;
            t.bf16_lo[c] = (bits >> 16) as u8;
            let twice = v * 2.0;
            assert!(twice == twice.trunc() && twice.abs() <= 127.0, "2 * {v} is not an i8");
            t.twice_i8[c] = twice as i8;
        }
        t
    })
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use super::{FP4_CHUNK, Format, tables};
    use std::arch::x86_64::*;

    /// Broadcast lookup tables and masks, loaded once per kernel call.
    #[derive(Clone, Copy)]
    pub(crate) struct Regs {
        hi: __m256i,
        lo: __m256i,
        nib: __m256i,
        top: __m256i,
    }

    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn regs() -> Regs {
        let t = tables();
        // SAFETY: 16-byte reads from 16-byte arrays.
        unsafe {
            Regs {
                hi: _mm256_broadcastsi128_si256(_mm_loadu_si128(t.bf16_hi.as_ptr().cast())),
                lo: _mm256_broadcastsi128_si256(_mm_loadu_si128(t.bf16_lo.as_ptr().cast())),
                nib: _mm256_set1_epi8(0x0F),
                top: _mm256_set1_epi32(0xFFFF_0000u32 as i32),
            }
        }
    }

    /// The 64 values (unscaled) of the 32 code bytes at `p`, as 8 vectors in [`super::FP4_PERM`]
    /// order: vector `4 * nibble + q`, lane `4L + i` holds byte `16L + 8(q/2) + 2i + q%2`.
    ///
    /// # Safety
    /// `p` must be readable for 32 bytes; AVX2 must be available.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn fp4_chunk(p: *const u8, r: &Regs) -> [__m256; 8] {
        // SAFETY: caller guarantees 32 readable bytes.
        let v = unsafe { _mm256_loadu_si256(p.cast()) };
        let lo = _mm256_and_si256(v, r.nib);
        let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), r.nib);
        let half = |n: __m256i| {
            let b3 = _mm256_shuffle_epi8(r.hi, n);
            let b2 = _mm256_shuffle_epi8(r.lo, n);
            let wl = _mm256_unpacklo_epi8(b2, b3);
            let wh = _mm256_unpackhi_epi8(b2, b3);
            [
                _mm256_castsi256_ps(_mm256_slli_epi32(wl, 16)),
                _mm256_castsi256_ps(_mm256_and_si256(wl, r.top)),
                _mm256_castsi256_ps(_mm256_slli_epi32(wh, 16)),
                _mm256_castsi256_ps(_mm256_and_si256(wh, r.top)),
            ]
        };
        let [a0, a1, a2, a3] = half(lo);
        let [b0, b1, b2, b3] = half(hi);
        [a0, a1, a2, a3, b0, b1, b2, b3]
    }

    /// `buf[b] = scale(scales[b]) * ts` for every block of a row: the same product as
    /// `fp4::dequantize_row`, so decodes are exact. Done with scalar instructions up front, so
    /// that [`chunk_scales`] needs only broadcast loads and a blend, and leaves the shuffle
    /// ports (the decode's bottleneck) alone.
    #[inline]
    pub(crate) fn row_scales(scales: &[u8], lut: &[f32; 256], ts: f32, buf: &mut Vec<f32>) {
        buf.clear();
        buf.extend(scales.iter().map(|&c| lut[c as usize] * ts));
    }

    /// Scale vectors of chunk `c` of a row from [`row_scales`]: `.0` for vectors with `q < 2`,
    /// `.1` for `q >= 2`. An MXFP4 block is 16 bytes (one per 128-bit lane); an NVFP4 block is
    /// 8 bytes (half a lane).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn chunk_scales(format: Format, s: &[f32], c: usize) -> (__m256, __m256) {
        let pair =
            |lo: &f32, hi: &f32| _mm256_blend_ps::<0xF0>(_mm256_broadcast_ss(lo), _mm256_broadcast_ss(hi));
        match format {
            Format::Mxfp4 => {
                let v = pair(&s[2 * c], &s[2 * c + 1]);
                (v, v)
            }
            Format::Nvfp4 => (pair(&s[4 * c], &s[4 * c + 2]), pair(&s[4 * c + 1], &s[4 * c + 3])),
        }
    }

    /// Scaled decode of elements `k0..k1` (both multiples of 64) of one row into `out`.
    ///
    /// # Safety
    /// AVX2 must be available; the row slices must hold columns `..k1`, `out` `k1 - k0` values.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn decode_fp4(
        format: Format,
        codes: &[u8],
        scales: &[u8],
        lut: &[f32; 256],
        ts: f32,
        k0: usize,
        k1: usize,
        out: &mut [f32],
    ) {
        let r = regs();
        assert!(codes.len() * 2 >= k1 && out.len() >= k1.saturating_sub(k0));
        let mut sbuf = Vec::with_capacity(scales.len());
        row_scales(scales, lut, ts, &mut sbuf);
        for c in k0 / FP4_CHUNK..k1 / FP4_CHUNK {
            // SAFETY: chunk c lies within the row (asserted above).
            let f = unsafe { fp4_chunk(codes.as_ptr().add(c * 32), &r) };
            let (sa, sb) = chunk_scales(format, &sbuf, c);
            let o = out[(c * FP4_CHUNK - k0)..].as_mut_ptr();
            for (v, fv) in f.iter().enumerate() {
                let s = if v % 4 < 2 { sa } else { sb };
                // SAFETY: 8 floats at offset 8v < 64 of a chunk inside `out`.
                unsafe { _mm256_storeu_ps(o.add(8 * v), _mm256_mul_ps(*fv, s)) };
            }
        }
    }

    /// bf16 elements `k0..k1` (multiples of 16) of one row (`row` = its bytes) into `out`.
    ///
    /// # Safety
    /// AVX2 must be available; `row` must hold `k1` bf16 values.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn decode_bf16(row: &[u8], k0: usize, k1: usize, out: &mut [f32]) {
        assert!(row.len() >= 2 * k1 && out.len() >= k1.saturating_sub(k0));
        let top = _mm256_set1_epi32(0xFFFF_0000u32 as i32);
        for k in (k0..k1).step_by(16) {
            // SAFETY: 32 bytes at 2k lie in the row; 16 floats at k - k0 lie in out.
            unsafe {
                let v = _mm256_loadu_si256(row.as_ptr().add(2 * k).cast());
                let o = out.as_mut_ptr().add(k - k0);
                _mm256_storeu_ps(o, _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)));
                _mm256_storeu_ps(o.add(8), _mm256_castsi256_ps(_mm256_and_si256(v, top)));
            }
        }
    }
}

#[cfg(target_arch = "aarch64")]
pub(crate) mod neon {
    use super::{Format, tables};
    use std::arch::aarch64::*;

    /// The 32 values of the 16 code bytes at `p`, natural order, as integers `2 * value`.
    ///
    /// # Safety
    /// `p` must be readable for 16 bytes.
    #[inline]
    #[target_feature(enable = "neon")]
    pub(crate) unsafe fn fp4_16(p: *const u8, tab: int8x16_t) -> [float32x4_t; 8] {
        // SAFETY: caller guarantees 16 readable bytes.
        let v = unsafe { vld1q_u8(p) };
        let lo = vandq_u8(v, vdupq_n_u8(0x0F));
        let hi = vshrq_n_u8(v, 4);
        let widen = |e: int8x16_t| {
            let a = vmovl_s8(vget_low_s8(e));
            let b = vmovl_high_s8(e);
            [
                vcvtq_f32_s32(vmovl_s16(vget_low_s16(a))),
                vcvtq_f32_s32(vmovl_high_s16(a)),
                vcvtq_f32_s32(vmovl_s16(vget_low_s16(b))),
                vcvtq_f32_s32(vmovl_high_s16(b)),
            ]
        };
        let [a0, a1, a2, a3] = widen(vqtbl1q_s8(tab, vzip1q_u8(lo, hi)));
        let [b0, b1, b2, b3] = widen(vqtbl1q_s8(tab, vzip2q_u8(lo, hi)));
        [a0, a1, a2, a3, b0, b1, b2, b3]
    }

    #[target_feature(enable = "neon")]
    pub(crate) fn table() -> int8x16_t {
        // SAFETY: 16-byte read from a 16-byte array.
        unsafe { vld1q_s8(tables().twice_i8.as_ptr()) }
    }

    /// Half the scale of each of the 8 vectors of a 16-byte group `g` (table values are doubled).
    #[inline]
    pub(crate) fn group_half_scales(
        format: Format,
        scales: &[u8],
        lut: &[f32; 256],
        ts: f32,
        g: usize,
    ) -> [f32; 8] {
        // Halving is exact, so `(2v) * (s/2)` equals `v * s` bit for bit.
        let h = |i: usize| 0.5 * (lut[scales[i] as usize] * ts);
        match format {
            Format::Mxfp4 => [h(g); 8],
            Format::Nvfp4 => {
                let (a, b) = (h(2 * g), h(2 * g + 1));
                [a, a, a, a, b, b, b, b]
            }
        }
    }

    /// Scaled decode of elements `k0..k1` (multiples of 32) of one row into `out`, natural order.
    ///
    /// # Safety
    /// NEON must be available; the slices must cover the range.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "neon")]
    pub(crate) unsafe fn decode_fp4(
        format: Format,
        codes: &[u8],
        scales: &[u8],
        lut: &[f32; 256],
        ts: f32,
        k0: usize,
        k1: usize,
        out: &mut [f32],
    ) {
        assert!(codes.len() * 2 >= k1 && out.len() >= k1.saturating_sub(k0));
        let tab = table();
        for g in k0 / 32..k1 / 32 {
            // SAFETY: group g lies within the row (asserted above).
            let f = unsafe { fp4_16(codes.as_ptr().add(16 * g), tab) };
            let hs = group_half_scales(format, scales, lut, ts, g);
            for (v, fv) in f.iter().enumerate() {
                // SAFETY: 4 floats at 32g + 4v - k0 lie in out.
                unsafe { vst1q_f32(out.as_mut_ptr().add(32 * g + 4 * v - k0), vmulq_n_f32(*fv, hs[v])) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quant_rows(format: Format, rows: usize, cols: usize, seed: u64) -> fp4::Quantized {
        let mut s = seed;
        let w: Vec<f32> = (0..rows * cols)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 3.0
            })
            .collect();
        fp4::quantize(&w, rows, cols, format).unwrap()
    }

    /// Every byte value (both nibbles) under several scales, on every available ISA, must decode
    /// bit for bit to what `fp4` dequantizes (after undoing the kernel's permutation).
    #[test]
    fn all_bytes_and_scales_match_fp4_on_every_isa() {
        for format in [Format::Mxfp4, Format::Nvfp4] {
            let block = format.block();
            // 256 bytes = 512 elements per row: every byte value once, per row a different set of
            // scale codes (including the smallest, 0, and large ones).
            let cols = 512;
            let codes: Vec<u8> = (0..=255u8).collect();
            let scale_sets: [&[u8]; 4] = [&[0, 1, 2], &[127, 120, 130], &[0x38, 0x40, 0x7E], &[254, 3, 77]];
            for (si, set) in scale_sets.iter().enumerate() {
                let nb = cols / block;
                let scales: Vec<u8> = (0..nb)
                    .map(|b| {
                        let c = set[b % set.len()];
                        // E4M3 0x7F is NaN and E8M0 0xFF is NaN; both are rejected on import.
                        if format == Format::Nvfp4 { c & 0x7E } else { c.min(254) }
                    })
                    .collect();
                let ts = if format == Format::Nvfp4 { vec![0.37] } else { vec![1.0] };
                let q =
                    fp4::QuantMatrix::new(format, 1, cols, codes.clone().into(), scales.clone().into(), ts)
                        .unwrap();
                let want = q.dequantize();
                let w = view(&q);
                for isa in Isa::available() {
                    let mut got = vec![0.0f32; cols];
                    decode_row(isa, &w, 0, 0, cols, &mut got);
                    let mut nat = vec![0.0f32; cols];
                    unpermute(isa, Kind::Fp4, &got, &mut nat);
                    for k in 0..cols {
                        assert_eq!(
                            nat[k].to_bits(),
                            want[k].to_bits(),
                            "{format:?} {isa:?} set {si} element {k}: {} vs {}",
                            nat[k],
                            want[k]
                        );
                    }
                }
            }
        }
    }

    pub(crate) fn view(q: &fp4::QuantMatrix) -> WRows<'_> {
        WRows::Fp4 {
            format: q.format,
            codes: &q.codes,
            scales: &q.scales,
            tensor_scales: &q.tensor_scales,
            rows_per_ts: q.rows_per_tensor_scale(),
            row0: 0,
            cols: q.cols,
        }
    }

    fn unpermute(isa: Isa, kind: Kind, got: &[f32], nat: &mut [f32]) {
        match perm_of(isa, kind) {
            None => nat.copy_from_slice(got),
            Some(p) => {
                let c = p.len();
                let whole = got.len() / c * c;
                for ch in 0..whole / c {
                    for (pos, &src) in p.iter().enumerate() {
                        nat[ch * c + src as usize] = got[ch * c + pos];
                    }
                }
                nat[whole..].copy_from_slice(&got[whole..]);
            }
        }
    }

    #[test]
    fn perms_are_permutations() {
        for p in [&FP4_PERM[..], &BF16_PERM[..]] {
            let mut seen = vec![false; p.len()];
            for &i in p {
                assert!(!seen[i as usize]);
                seen[i as usize] = true;
            }
        }
    }

    /// Sub-ranges and tails (K not a multiple of the chunk) on real and odd shapes.
    #[test]
    fn ranges_and_tails_match_fp4() {
        for format in [Format::Mxfp4, Format::Nvfp4] {
            for cols in [32, 48, 96, 160, 2048] {
                if cols % format.block() != 0 {
                    continue;
                }
                let q = quant_rows(format, 3, cols, cols as u64);
                let w = view(&q.matrix);
                for isa in Isa::available() {
                    for r in 0..3 {
                        for k0 in (0..cols).step_by(64) {
                            let mut got = vec![0.0f32; cols - k0];
                            decode_row(isa, &w, r, k0, cols, &mut got);
                            let mut nat = vec![0.0f32; cols - k0];
                            unpermute(isa, Kind::Fp4, &got, &mut nat);
                            assert_eq!(nat, q.dequantized[r * cols + k0..(r + 1) * cols], "{isa:?} {cols}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn bf16_rows_match_half() {
        let cols = 16 * 5 + 3;
        let vals: Vec<f32> = (0..2 * cols).map(|i| (i as f32 * 0.37).sin() * 100.0).collect();
        let bytes: Vec<u8> = vals.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect();
        let w = WRows::Bf16 { bytes: &bytes, cols };
        for isa in Isa::available() {
            let mut got = vec![0.0f32; cols];
            decode_row(isa, &w, 1, 0, cols, &mut got);
            let mut nat = vec![0.0f32; cols];
            unpermute(isa, Kind::Bf16, &got, &mut nat);
            for k in 0..cols {
                assert_eq!(nat[k], half::bf16::from_f32(vals[cols + k]).to_f32(), "{isa:?} {k}");
            }
        }
    }
}
