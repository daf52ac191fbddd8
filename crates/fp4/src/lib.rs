//! The one definition of FP4 in this project.
//!
//! Everything that decodes or encodes an FP4 value — the CPU kernels, the CUDA and WGSL kernels
//! (through the snippets that [`codegen`] writes), the checkpoint importers — goes through this
//! crate. The audit that started this project found four hand-written decoders with two answers;
//! here there is one table, derived from the E2M1 bit layout, and tests pin it against `ml_dtypes`.
//!
//! - [`e2m1`]: the 4-bit element (1 sign, 2 exponent bits with bias 1, 1 mantissa bit).
//! - [`e8m0`] and [`e4m3`]: the block-scale codecs of MXFP4 and NVFP4.
//! - [`Format`], [`QuantMatrix`], [`quantize`]: block formats and the packed layout.
//! - [`import`]: converters from the nibble orders other projects use.
//! - [`codegen`]: decode snippets for WGSL, CUDA C and MSL, generated from the table here.

pub mod codegen;
pub mod e2m1;
pub mod e4m3;
pub mod e8m0;
pub mod import;
mod matrix;

pub use matrix::{
    Bytes, Format, QuantMatrix, Quantized, dequantize_row, nvfp4_tensor_scale, quantize,
    quantize_with_tensor_scale,
};

/// Errors from quantizing or importing FP4 data. Each names where the problem is.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum Error {
    #[error("non-finite weight {value} at row {row}, column {col}")]
    NonFinite { row: usize, col: usize, value: f32 },
    #[error("{what}: {got} is not a multiple of the {format:?} block size {block}")]
    NotBlockMultiple { what: &'static str, got: usize, block: usize, format: Format },
    #[error("{what}: expected {expected} bytes, got {got}")]
    Length { what: &'static str, expected: usize, got: usize },
    #[error("invalid scale in {what} at row {row}, block {block}: code {code:#04x} ({reason})")]
    BadScale { what: &'static str, row: usize, block: usize, code: u8, reason: &'static str },
    #[error("invalid tensor scale {value} ({reason})")]
    BadTensorScale { value: f32, reason: &'static str },
}
