//! Converters from other projects' FP4 byte layouts into this crate's [`QuantMatrix`] layout.
//!
//! - ModelOpt NVFP4 and gpt-oss MXFP4 put element `2j` in the low nibble of byte `j` along K —
//!   the same as this project, so they import by wrapping the bytes (no copy).
//! - ggml's `block_mxfp4` is `{ u8 e; u8 qs[16]; }` per 32 elements with element `j` in the low
//!   nibble of `qs[j]` and element `j + 16` in the high nibble; it is repacked.

use crate::{Bytes, Error, Format, QuantMatrix, e2m1, e8m0};

/// ModelOpt NVFP4 Linear: `weight` u8 `[rows, cols/2]`, `weight_scale` E4M3 `[rows, cols/16]`,
/// `weight_scale_2` f32 (the tensor scale). Zero or non-finite `weight_scale_2` is rejected.
pub fn modelopt_nvfp4(
    rows: usize,
    cols: usize,
    weight: Bytes,
    weight_scale: Bytes,
    weight_scale_2: f32,
) -> Result<QuantMatrix, Error> {
    QuantMatrix::new(Format::Nvfp4, rows, cols, weight, weight_scale, vec![weight_scale_2])
}

/// gpt-oss MXFP4: `blocks` u8 `[rows, cols/32, 16]`, `scales` E8M0 `[rows, cols/32]`.
pub fn gpt_oss_mxfp4(rows: usize, cols: usize, blocks: Bytes, scales: Bytes) -> Result<QuantMatrix, Error> {
    QuantMatrix::new(Format::Mxfp4, rows, cols, blocks, scales, vec![1.0])
}

/// Bytes of one ggml `block_mxfp4` (32 elements).
pub const GGML_MXFP4_BLOCK_BYTES: usize = 17;

/// ggml `block_mxfp4` rows (`[rows, cols/32]` blocks of 17 bytes) into this project's layout.
pub fn from_ggml_mxfp4(rows: usize, cols: usize, data: &[u8]) -> Result<QuantMatrix, Error> {
    let block = Format::Mxfp4.block();
    if !cols.is_multiple_of(block) {
        return Err(Error::NotBlockMultiple { what: "columns", got: cols, block, format: Format::Mxfp4 });
    }
    let nb = rows * cols / block;
    if data.len() != nb * GGML_MXFP4_BLOCK_BYTES {
        return Err(Error::Length {
            what: "ggml mxfp4 blocks",
            expected: nb * GGML_MXFP4_BLOCK_BYTES,
            got: data.len(),
        });
    }
    let mut codes = vec![0u8; rows * cols / 2];
    let mut scales = vec![0u8; nb];
    for (b, blk) in data.chunks_exact(GGML_MXFP4_BLOCK_BYTES).enumerate() {
        scales[b] = blk[0];
        let qs = &blk[1..];
        let out = &mut codes[b * 16..(b + 1) * 16];
        for (j, o) in out.iter_mut().enumerate() {
            // Our byte j holds elements 2j and 2j+1 of the block; ggml keeps element i < 16 in
            // the low nibble of qs[i] and element i >= 16 in the high nibble of qs[i-16].
            let nib = |i: usize| if i < 16 { qs[i] & 0xF } else { qs[i - 16] >> 4 };
            *o = e2m1::pack(nib(2 * j), nib(2 * j + 1));
        }
    }
    QuantMatrix::new(Format::Mxfp4, rows, cols, codes.into(), scales.into(), vec![1.0])
}

/// This project's MXFP4 layout back to ggml `block_mxfp4` (for tests and interchange).
pub fn to_ggml_mxfp4(m: &QuantMatrix) -> Vec<u8> {
    assert_eq!(m.format, Format::Mxfp4, "only MXFP4 has a ggml block layout");
    let nb = m.rows * m.blocks_per_row();
    let mut out = vec![0u8; nb * GGML_MXFP4_BLOCK_BYTES];
    for b in 0..nb {
        let src = &m.codes[b * 16..(b + 1) * 16];
        let elem = |i: usize| (src[i / 2] >> (4 * (i % 2))) & 0xF;
        let blk = &mut out[b * GGML_MXFP4_BLOCK_BYTES..(b + 1) * GGML_MXFP4_BLOCK_BYTES];
        blk[0] = m.scales[b];
        for i in 0..16 {
            blk[1 + i] = e2m1::pack(elem(i), elem(i + 16));
        }
    }
    out
}

/// Check a scale code is a usable E8M0 (not NaN); re-exported for importers that validate early.
pub fn e8m0_is_valid(code: u8) -> bool {
    code != e8m0::NAN_CODE
}
