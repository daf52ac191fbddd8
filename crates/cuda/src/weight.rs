//! Weights on the device and the `W` struct the kernels take (kernels/common.cuh).

use crate::CudaError;
use crate::device::{Buf, Device};
use fp4::Format;
use fp4moe_ops::{DenseDType, HostWeight};

/// FP4 rows are padded to a multiple of this many columns: the prefill GEMM's K tile, so every
/// K tile is whole, every row starts 16-byte aligned, and each k-tile's scales are 4-byte aligned.
pub const FP4_KP_ALIGN: usize = 128;

/// Numbering shared with `KIND_*` in kernels/common.cuh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum WeightKind {
    Mxfp4 = 0,
    Nvfp4 = 1,
    F32 = 2,
    Bf16 = 3,
    F16 = 4,
}

impl WeightKind {
    pub fn is_fp4(self) -> bool {
        matches!(self, WeightKind::Mxfp4 | WeightKind::Nvfp4)
    }
}

/// An uploaded weight `[rows, cols]`.
#[derive(Debug)]
pub struct CudaWeight {
    pub kind: WeightKind,
    pub rows: usize,
    pub cols: usize,
    /// Padded row length of FP4 weights (== cols for dense).
    pub kp: usize,
    rows_per_ts: usize,
    codes: Option<Buf>,   // [rows, kp/2] packed, element 2j in the low nibble
    scales: Option<Buf>,  // [rows, kp/block] block-scale codes
    tscales: Option<Buf>, // [rows / rows_per_ts] f32
    data: Option<Buf>,    // dense [rows, cols] in its checkpoint dtype
    /// FP4 decode-kernel exponent offset (`W.s_off`, kernels/common.cuh).
    s_off: i32,
    /// Bytes a kernel streams to use the whole matrix once (unpadded, as on the host).
    pub nbytes: usize,
}

/// The GEMV kernels decode codes into bf16 as `code * 2^-OFF` (OFF =
/// `fp4::e2m1::BF16_EXP_OFFSET`) and multiply by the block scale times `2^(OFF - s_off)` in
/// bf16, applying `2^s_off` to the f32 sums. That bf16 factor must stay finite (below 2^128):
/// E4M3 scales (at most 448 < 2^9) never overflow with the default; an E8M0 code c gives
/// `2^(c - 127 + OFF - s_off)`, so weights with scales above 2^9 take a larger offset (their
/// smallest blocks then decode through bf16 subnormals).
fn decode_scale_offset(format: Format, scales: &[u8]) -> i32 {
    const DEFAULT: i32 = 8;
    const E8M0_BIAS: i32 = 127;
    const BF16_MAX_EXP: i32 = 127;
    match format {
        Format::Nvfp4 => DEFAULT,
        Format::Mxfp4 => {
            let top = scales.iter().copied().filter(|&c| c != 255).max().unwrap_or(0) as i32;
            DEFAULT.max(top - E8M0_BIAS + fp4::e2m1::BF16_EXP_OFFSET - BF16_MAX_EXP)
        }
    }
}

fn ptr(b: &Option<Buf>) -> u64 {
    b.as_ref().map_or(0, |b| b.ptr)
}

impl CudaWeight {
    pub(crate) fn upload(dev: &Device, w: &HostWeight) -> Result<CudaWeight, CudaError> {
        match w {
            HostWeight::Quant(q) => {
                let block = q.format.block();
                if q.cols % block != 0
                    || q.codes.len() != q.rows * q.cols / 2
                    || q.scales.len() != q.rows * (q.cols / block)
                {
                    return Err(CudaError::BadWeight(format!(
                        "{} [{}, {}] with {} code and {} scale bytes",
                        q.format.name(),
                        q.rows,
                        q.cols,
                        q.codes.len(),
                        q.scales.len()
                    )));
                }
                let kp = q.cols.div_ceil(FP4_KP_ALIGN).max(1) * FP4_KP_ALIGN;
                let (cb, pcb) = (q.cols / 2, kp / 2);
                let (nb, pnb) = (q.cols / block, kp / block);
                let mut codes = vec![0u8; q.rows * pcb];
                let mut scales = vec![0u8; q.rows * pnb];
                for r in 0..q.rows {
                    codes[r * pcb..r * pcb + cb].copy_from_slice(&q.codes[r * cb..(r + 1) * cb]);
                    scales[r * pnb..r * pnb + nb].copy_from_slice(&q.scales[r * nb..(r + 1) * nb]);
                }
                let ts: Vec<u8> = q.tensor_scales.iter().flat_map(|s| s.to_le_bytes()).collect();
                Ok(CudaWeight {
                    kind: match q.format {
                        Format::Mxfp4 => WeightKind::Mxfp4,
                        Format::Nvfp4 => WeightKind::Nvfp4,
                    },
                    rows: q.rows,
                    cols: q.cols,
                    kp,
                    rows_per_ts: q.rows_per_tensor_scale().max(1),
                    codes: Some(dev.upload_exact(&codes)?),
                    scales: Some(dev.upload_exact(&scales)?),
                    tscales: Some(dev.upload_exact(&ts)?),
                    data: None,
                    nbytes: q.nbytes(),
                    s_off: decode_scale_offset(q.format, &q.scales),
                })
            }
            HostWeight::Dense { rows, cols, dtype, bytes } => {
                if bytes.len() != rows * cols * dtype.size() {
                    return Err(CudaError::BadWeight(format!(
                        "dense {dtype:?} [{rows}, {cols}] with {} bytes",
                        bytes.len()
                    )));
                }
                Ok(CudaWeight {
                    kind: match dtype {
                        DenseDType::F32 => WeightKind::F32,
                        DenseDType::BF16 => WeightKind::Bf16,
                        DenseDType::F16 => WeightKind::F16,
                    },
                    rows: *rows,
                    cols: *cols,
                    kp: *cols,
                    rows_per_ts: 1,
                    codes: None,
                    scales: None,
                    tscales: None,
                    data: Some(dev.upload_exact(bytes)?),
                    nbytes: bytes.len(),
                    s_off: 0,
                })
            }
        }
    }

    /// The `W` struct of common.cuh: 4 pointers then 6 ints (56 bytes, 8-byte aligned).
    pub fn args(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(56);
        for p in [ptr(&self.codes), ptr(&self.scales), ptr(&self.tscales), ptr(&self.data)] {
            b.extend_from_slice(&p.to_le_bytes());
        }
        for v in [self.rows, self.cols, self.kp, self.rows_per_ts, self.kind as usize] {
            b.extend_from_slice(&(v as i32).to_le_bytes());
        }
        b.extend_from_slice(&self.s_off.to_le_bytes());
        b
    }

    /// Device address of an f32 weight's data (the layout `gemm_f32_tc` reads), if it is one.
    pub fn f32_ptr(&self) -> Option<u64> {
        (self.kind == WeightKind::F32).then(|| ptr(&self.data))
    }

    /// A zeroed `W` (for an absent optional weight).
    pub fn null_args() -> Vec<u8> {
        vec![0u8; 56]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bf16 factor `2^(c - 127 + BF16_EXP_OFFSET - s_off)` of every present E8M0 code stays
    /// finite (exponent at most 127), and the default offset is kept when nothing needs more.
    #[test]
    fn decode_scale_offset_keeps_every_block_scale_finite_in_bf16() {
        assert_eq!(decode_scale_offset(Format::Nvfp4, &[0x7E, 0x01]), 8);
        assert_eq!(decode_scale_offset(Format::Mxfp4, &[100, 124, 0]), 8);
        for top in 0..=254u8 {
            let s_off = decode_scale_offset(Format::Mxfp4, &[3, top, 255]);
            let exp = top as i32 - 127 + fp4::e2m1::BF16_EXP_OFFSET - s_off;
            assert!(exp <= 127, "code {top}: s_off {s_off} leaves 2^{exp}");
            assert!(s_off >= 8);
        }
        assert_eq!(decode_scale_offset(Format::Mxfp4, &[150]), 22);
    }
}
