//! Block formats and the project's packed layout.
//!
//! A quantized weight matrix `W [N, K]` (N output rows, K input columns, `y = x · Wᵀ`) is stored
//! row-major as:
//! - `codes  [N, K/2]` u8: element `2j` of a row in the LOW nibble of byte `j`, `2j+1` in the HIGH
//!   nibble (the ModelOpt / gpt-oss order, so their checkpoints import by copying);
//! - `scales [N, K/B]` u8: one block-scale code per B consecutive elements of a row
//!   (B = 32 with E8M0 codes for MXFP4, B = 16 with E4M3 codes for NVFP4);
//! - `tensor_scales [G]` f32: NVFP4's second-level scale, one per group of `N / G` consecutive
//!   rows (`[1.0]` for MXFP4). A single Linear has G = 1; stacked experts imported from ModelOpt
//!   keep one per expert (ModelOpt shares it across an expert's fused gate/up), because folding
//!   different tensor scales into one would need re-rounding the E4M3 block scales.
//!
//! Value of element (n, k): `e2m1(code) * scale(scales[n, k/B]) * tensor_scales[n / (N/G)]`.
//! Stacked expert weights are the same layout with `N = E * rows_per_expert`.

use crate::{Error, e2m1, e4m3, e8m0};
use std::ops::Deref;
use std::sync::Arc;

/// The two block formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// OCP MXFP4: blocks of 32, E8M0 scale.
    Mxfp4,
    /// NVIDIA NVFP4: blocks of 16, E4M3 scale, f32 tensor scale.
    Nvfp4,
}

impl Format {
    /// Elements per block scale.
    pub const fn block(self) -> usize {
        match self {
            Format::Mxfp4 => 32,
            Format::Nvfp4 => 16,
        }
    }

    /// Decode one block-scale code (without the tensor scale).
    #[inline]
    pub fn decode_scale(self, code: u8) -> f32 {
        match self {
            Format::Mxfp4 => e8m0::decode(code),
            Format::Nvfp4 => e4m3::decode(code),
        }
    }

    /// Storage bits per element including the block scale (4.25 for MXFP4, 4.5 for NVFP4).
    pub fn bits_per_element(self) -> f64 {
        4.0 + 8.0 / self.block() as f64
    }

    pub fn name(self) -> &'static str {
        match self {
            Format::Mxfp4 => "mxfp4",
            Format::Nvfp4 => "nvfp4",
        }
    }

    pub fn parse(s: &str) -> Option<Format> {
        match s.to_ascii_lowercase().as_str() {
            "mxfp4" => Some(Format::Mxfp4),
            "nvfp4" => Some(Format::Nvfp4),
            _ => None,
        }
    }
}

/// Shared, immutable bytes: owned or borrowed from a memory map, without copying.
#[derive(Clone)]
pub struct Bytes {
    owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
    start: usize,
    len: usize,
}

impl Bytes {
    /// A view of `range` within `owner` (e.g. an `Arc<memmap2::Mmap>`).
    pub fn from_owner(owner: Arc<dyn AsRef<[u8]> + Send + Sync>, start: usize, len: usize) -> Bytes {
        assert!(start + len <= (*owner).as_ref().len(), "Bytes view out of range");
        Bytes { owner, start, len }
    }
}

impl From<Vec<u8>> for Bytes {
    fn from(v: Vec<u8>) -> Bytes {
        let len = v.len();
        Bytes { owner: Arc::new(v), start: 0, len }
    }
}

impl Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &(*self.owner).as_ref()[self.start..self.start + self.len]
    }
}

impl std::fmt::Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bytes({} bytes)", self.len)
    }
}

/// A quantized matrix `[rows, cols]` in the layout of this module's overview.
#[derive(Clone, Debug)]
pub struct QuantMatrix {
    pub format: Format,
    pub rows: usize,
    pub cols: usize,
    /// `[rows, cols/2]`, element 2j in the low nibble.
    pub codes: Bytes,
    /// `[rows, cols/block]` scale codes.
    pub scales: Bytes,
    /// `[G]` NVFP4 second-level scales, one per `rows / G` rows; `[1.0]` for MXFP4.
    pub tensor_scales: Vec<f32>,
}

impl QuantMatrix {
    /// Build from parts, checking lengths and that every scale is usable (no NaN codes, a finite
    /// positive tensor scale). Errors name what is wrong and where.
    pub fn new(
        format: Format,
        rows: usize,
        cols: usize,
        codes: Bytes,
        scales: Bytes,
        tensor_scales: Vec<f32>,
    ) -> Result<QuantMatrix, Error> {
        let block = format.block();
        if !cols.is_multiple_of(block) {
            return Err(Error::NotBlockMultiple { what: "columns", got: cols, block, format });
        }
        if codes.len() != rows * cols / 2 {
            return Err(Error::Length { what: "codes", expected: rows * cols / 2, got: codes.len() });
        }
        let nb = cols / block;
        if scales.len() != rows * nb {
            return Err(Error::Length { what: "scales", expected: rows * nb, got: scales.len() });
        }
        if tensor_scales.is_empty() || !rows.is_multiple_of(tensor_scales.len()) {
            return Err(Error::Length {
                what: "tensor scales (must divide rows)",
                expected: rows,
                got: tensor_scales.len(),
            });
        }
        if let Some(&value) = tensor_scales.iter().find(|s| !s.is_finite() || **s <= 0.0) {
            return Err(Error::BadTensorScale { value, reason: "must be finite and > 0" });
        }
        for (i, &c) in scales.iter().enumerate() {
            if format.decode_scale(c).is_nan() {
                return Err(Error::BadScale {
                    what: "block scales",
                    row: i / nb,
                    block: i % nb,
                    code: c,
                    reason: "NaN",
                });
            }
        }
        Ok(QuantMatrix { format, rows, cols, codes, scales, tensor_scales })
    }

    /// Rows sharing one tensor scale.
    pub fn rows_per_tensor_scale(&self) -> usize {
        self.rows / self.tensor_scales.len()
    }

    /// The tensor scale that applies to row `r`.
    #[inline]
    pub fn row_tensor_scale(&self, r: usize) -> f32 {
        self.tensor_scales[r / self.rows_per_tensor_scale()]
    }

    /// Rows of several matrices of one format and width, stacked in order (experts, fused
    /// gate/up). Each part keeps its own tensor scales, so the result is exact.
    pub fn concat_rows(parts: &[&QuantMatrix]) -> Result<QuantMatrix, Error> {
        let first = parts.first().ok_or(Error::Length { what: "matrices to stack", expected: 1, got: 0 })?;
        let (format, cols) = (first.format, first.cols);
        let mut codes = Vec::new();
        let mut scales = Vec::new();
        for p in parts {
            if p.format != format || p.cols != cols {
                return Err(Error::Length {
                    what: "columns of stacked matrices",
                    expected: cols,
                    got: p.cols,
                });
            }
            codes.extend_from_slice(&p.codes);
            scales.extend_from_slice(&p.scales);
        }
        let rows: usize = parts.iter().map(|p| p.rows).sum();
        let single = |p: &&QuantMatrix| p.tensor_scales.len() == 1;
        // Keep the representation as compact as exactness allows: one scale for all, one per
        // (equal-height) part, or one per row.
        let tensor_scales: Vec<f32> =
            if parts.iter().all(|p| p.tensor_scales == first.tensor_scales) && single(first) {
                first.tensor_scales.clone()
            } else if parts.iter().all(|p| single(p) && p.rows == first.rows) {
                parts.iter().map(|p| p.tensor_scales[0]).collect()
            } else {
                parts.iter().flat_map(|p| (0..p.rows).map(move |r| p.row_tensor_scale(r))).collect()
            };
        QuantMatrix::new(format, rows, cols, codes.into(), scales.into(), tensor_scales)
    }

    pub fn blocks_per_row(&self) -> usize {
        self.cols / self.format.block()
    }

    /// Bytes a kernel must read for the whole matrix (codes + scales).
    pub fn nbytes(&self) -> usize {
        self.codes.len() + self.scales.len()
    }

    /// Rows `start..start+count` as a matrix sharing the same storage (e.g. one expert).
    pub fn row_range(&self, start: usize, count: usize) -> QuantMatrix {
        assert!(start + count <= self.rows);
        let cb = self.cols / 2;
        let nb = self.blocks_per_row();
        let g = self.rows_per_tensor_scale();
        let tensor_scales = if start.is_multiple_of(g) && count.is_multiple_of(g) {
            self.tensor_scales[start / g..(start + count) / g].to_vec()
        } else {
            (start..start + count).map(|r| self.row_tensor_scale(r)).collect()
        };
        QuantMatrix {
            format: self.format,
            rows: count,
            cols: self.cols,
            codes: sub(&self.codes, start * cb, count * cb),
            scales: sub(&self.scales, start * nb, count * nb),
            tensor_scales,
        }
    }

    /// Dequantize row `r` into `out[..cols]`.
    pub fn dequantize_row_into(&self, r: usize, out: &mut [f32]) {
        let cb = self.cols / 2;
        let nb = self.blocks_per_row();
        dequantize_row(
            self.format,
            &self.codes[r * cb..(r + 1) * cb],
            &self.scales[r * nb..(r + 1) * nb],
            self.row_tensor_scale(r),
            &mut out[..self.cols],
        );
    }

    /// The whole matrix as f32 `[rows, cols]`.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.rows * self.cols];
        for (r, row) in out.chunks_mut(self.cols.max(1)).enumerate().take(self.rows) {
            self.dequantize_row_into(r, row);
        }
        out
    }
}

fn sub(b: &Bytes, start: usize, len: usize) -> Bytes {
    assert!(start + len <= b.len);
    Bytes { owner: b.owner.clone(), start: b.start + start, len }
}

/// Dequantize one packed row: `codes [cols/2]`, `scales [cols/block]`.
pub fn dequantize_row(format: Format, codes: &[u8], scales: &[u8], tensor_scale: f32, out: &mut [f32]) {
    let block = format.block();
    for (j, &byte) in codes.iter().enumerate() {
        let s = format.decode_scale(scales[2 * j / block]) * tensor_scale;
        out[2 * j] = e2m1::decode(byte & 0xF) * s;
        out[2 * j + 1] = e2m1::decode(byte >> 4) * s;
    }
}

/// A quantizer's result: the packed matrix and its exact dequantized values, so that kernel
/// tests compare against `x · dequantize(W)ᵀ` and measure kernel error alone.
#[derive(Debug)]
pub struct Quantized {
    pub matrix: QuantMatrix,
    /// `[rows, cols]` f32: exactly what the packed matrix decodes to.
    pub dequantized: Vec<f32>,
}

/// Quantize `w [rows, cols]` (row-major f32). Non-finite input is an error naming its position.
///
/// - MXFP4: block exponent `floor(log2(amax)) - 2` (OCP v1.0: the largest element lands in
///   [4, 8) and saturates to 6 when above), clamped to the E8M0 range; elements RNE-saturated.
/// - NVFP4 (ModelOpt): `s2 = amax(W) / (6 * 448)`; block scale `block_amax / (6 * s2)` cast to
///   E4M3; elements `x / (scale * s2)` RNE-saturated.
pub fn quantize(w: &[f32], rows: usize, cols: usize, format: Format) -> Result<Quantized, Error> {
    if let Some(i) = w.iter().position(|v| !v.is_finite()) {
        return Err(Error::NonFinite { row: i / cols.max(1), col: i % cols.max(1), value: w[i] });
    }
    quantize_with_tensor_scale(w, rows, cols, format, nvfp4_tensor_scale(format, w))
}

/// The tensor scale [`quantize`] uses: `amax / (6 * 448)` for NVFP4 (1.0 for an all-zero
/// tensor, which must still have a valid scale), 1.0 for MXFP4.
pub fn nvfp4_tensor_scale(format: Format, w: &[f32]) -> f32 {
    match format {
        Format::Mxfp4 => 1.0,
        Format::Nvfp4 => {
            let amax = w.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            if amax > 0.0 { amax / (e2m1::MAX * e4m3::MAX) } else { 1.0 }
        }
    }
}

/// [`quantize`] with a given tensor scale, so a large NVFP4 tensor can be quantized in row
/// chunks (in parallel) after one pass for its amax, with results identical to `quantize`.
pub fn quantize_with_tensor_scale(
    w: &[f32],
    rows: usize,
    cols: usize,
    format: Format,
    tensor_scale: f32,
) -> Result<Quantized, Error> {
    let block = format.block();
    if !cols.is_multiple_of(block) {
        return Err(Error::NotBlockMultiple { what: "columns", got: cols, block, format });
    }
    if w.len() != rows * cols {
        return Err(Error::Length { what: "weights", expected: rows * cols, got: w.len() });
    }
    if let Some(i) = w.iter().position(|v| !v.is_finite()) {
        return Err(Error::NonFinite { row: i / cols, col: i % cols, value: w[i] });
    }
    let nb = cols / block;
    let mut codes = vec![0u8; rows * cols / 2];
    let mut scales = vec![0u8; rows * nb];
    let mut deq = vec![0.0f32; rows * cols];
    for r in 0..rows {
        for b in 0..nb {
            let x = &w[r * cols + b * block..r * cols + (b + 1) * block];
            let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let code = match format {
                Format::Mxfp4 => {
                    if amax == 0.0 {
                        0
                    } else {
                        e8m0::encode_exponent(floor_log2(amax) - 2)
                    }
                }
                Format::Nvfp4 => e4m3::encode(amax / (e2m1::MAX * tensor_scale)),
            };
            scales[r * nb + b] = code;
            let s = format.decode_scale(code) * tensor_scale;
            for (i, &v) in x.iter().enumerate() {
                let q = if s > 0.0 { e2m1::encode(v / s) } else { 0 };
                let k = b * block + i;
                let byte = &mut codes[(r * cols + k) / 2];
                *byte |= q << (4 * (k % 2));
                deq[r * cols + k] = e2m1::decode(q) * s;
            }
        }
    }
    let matrix = QuantMatrix::new(format, rows, cols, codes.into(), scales.into(), vec![tensor_scale])?;
    Ok(Quantized { matrix, dequantized: deq })
}

/// `floor(log2(x))` for finite x > 0, exact (read from the bits; `log2` may round up just below
/// a power of two).
fn floor_log2(x: f32) -> i32 {
    let bits = x.to_bits();
    let exp = ((bits >> 23) & 0xFF) as i32;
    if exp == 0 {
        // Subnormal: value = mantissa * 2^-149.
        let m = bits & 0x7F_FFFF;
        31 - m.leading_zeros() as i32 - 149
    } else {
        exp - 127
    }
}
