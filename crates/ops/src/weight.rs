use fp4::{Bytes, QuantMatrix};

/// Element type of a dense (16/32-bit) weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenseDType {
    F32,
    BF16,
    F16,
}

impl DenseDType {
    pub fn size(self) -> usize {
        match self {
            DenseDType::F32 => 4,
            DenseDType::BF16 | DenseDType::F16 => 2,
        }
    }
}

/// A weight matrix `[rows, cols]` on the host, before upload. Dense weights keep their
/// little-endian checkpoint bytes (possibly memory-mapped); FP4 weights use the layout of
/// [`fp4::QuantMatrix`]. Stacked experts are one matrix with `rows = E * rows_per_expert`.
#[derive(Debug, Clone)]
pub enum HostWeight {
    Quant(QuantMatrix),
    Dense { rows: usize, cols: usize, dtype: DenseDType, bytes: Bytes },
}

impl HostWeight {
    /// A dense f32 weight from values (tests, synthetic models).
    pub fn from_f32(rows: usize, cols: usize, data: &[f32]) -> HostWeight {
        assert_eq!(data.len(), rows * cols, "from_f32: data length");
        let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        HostWeight::Dense { rows, cols, dtype: DenseDType::F32, bytes: bytes.into() }
    }

    /// A dense bf16 weight from f32 values (rounded to nearest even).
    pub fn from_f32_as_bf16(rows: usize, cols: usize, data: &[f32]) -> HostWeight {
        assert_eq!(data.len(), rows * cols, "from_f32_as_bf16: data length");
        let bytes: Vec<u8> = data.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect();
        HostWeight::Dense { rows, cols, dtype: DenseDType::BF16, bytes: bytes.into() }
    }

    pub fn shape(&self) -> [usize; 2] {
        match self {
            HostWeight::Quant(q) => [q.rows, q.cols],
            HostWeight::Dense { rows, cols, .. } => [*rows, *cols],
        }
    }

    /// Bytes a kernel reads to use the whole matrix once.
    pub fn nbytes(&self) -> usize {
        match self {
            HostWeight::Quant(q) => q.nbytes(),
            HostWeight::Dense { bytes, .. } => bytes.len(),
        }
    }

    /// Row `r` as f32 (the reference decode of every weight kind).
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        match self {
            HostWeight::Quant(q) => q.dequantize_row_into(r, out),
            HostWeight::Dense { cols, dtype, bytes, .. } => {
                let sz = dtype.size();
                let row = &bytes[r * cols * sz..(r + 1) * cols * sz];
                for (o, b) in out[..*cols].iter_mut().zip(row.chunks_exact(sz)) {
                    *o = match dtype {
                        DenseDType::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                        DenseDType::BF16 => half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
                        DenseDType::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
                    };
                }
            }
        }
    }

    /// The whole matrix as f32 `[rows, cols]`.
    pub fn to_f32(&self) -> Vec<f32> {
        let [rows, cols] = self.shape();
        let mut out = vec![0.0; rows * cols];
        for r in 0..rows {
            self.row_f32(r, &mut out[r * cols..(r + 1) * cols]);
        }
        out
    }
}

/// The weights of one MoE block, as the `moe` op takes them. (Clone/Copy by hand: a derive
/// would require `W: Copy`, but only references are held.)
pub struct MoeWeights<'a, W> {
    /// `[E * 2I, H]`: per expert, I gate rows then I up rows.
    pub gate_up: &'a W,
    /// `[E * H, I]`: per expert, H rows.
    pub down: &'a W,
    pub n_experts: usize,
    /// Shared expert (GLM): gate_up `[2S, H]`, down `[H, S]`.
    pub shared: Option<(&'a W, &'a W)>,
}

impl<W> Clone for MoeWeights<'_, W> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<W> Copy for MoeWeights<'_, W> {}
