//! Weights on the device: uploaded once, in chunks of whole rows that each fit one storage
//! binding. Chunks hold a multiple of [`CHUNK_ALIGN`] rows when they can, so that stacked expert
//! matrices (rows per expert 2I or H, multiples of 512 in both models) split between experts.

use crate::WgpuBackend;
use crate::kernels::WKind;
use fp4moe_ops::{DenseDType, Error, HostWeight, Result};

/// Row alignment of chunks: a multiple of every per-expert row count of the supported models
/// (Qwen3: 2I = 1536, H = 2048; GLM: 2I = 3072, H = 2048).
const CHUNK_ALIGN: usize = 6144;

/// A weight matrix `[rows, cols]` on the device.
pub struct WgpuWeight {
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) kind: WKind,
    pub(crate) chunks: Vec<Chunk>,
    /// Tells the bind-group cache, which holds the chunks' buffers, to let go on drop.
    _release: crate::pool::Release,
}

/// Rows `row0 .. row0 + rows` of a weight, bound at bindings 8.. (see weight_*.wgsl).
pub(crate) struct Chunk {
    pub row0: usize,
    pub rows: usize,
    /// FP4: codes `[rows, cols/2]` bytes, scales `[rows, cols/B]` bytes, tensor scales `[rows]` f32.
    /// Dense: the rows (16-bit rows padded to an even length).
    bufs: Vec<wgpu::Buffer>,
    /// FP4, for the cooperative-matrix GEMM: each row's largest finite E8M0 scale code `[rows]`
    /// i32 (MXFP4; zeros for NVFP4), which sets the row's f16 range there (coop_gemm.wgsl).
    row_exp: Option<wgpu::Buffer>,
}

impl Chunk {
    pub fn bindings(&self) -> impl Iterator<Item = (u32, &wgpu::Buffer)> {
        self.bufs.iter().enumerate().map(|(i, b)| (8 + i as u32, b))
    }

    /// [`Chunk::bindings`] and the row exponents at binding 11 (coop_gemm.wgsl).
    pub fn coop_bindings(&self) -> impl Iterator<Item = (u32, &wgpu::Buffer)> {
        self.bindings().chain(self.row_exp.iter().map(|b| (11, b)))
    }
}

/// Largest finite E8M0 code (not 255, the NaN code) of each MXFP4 row; zeros for NVFP4.
fn row_exponents(q: &fp4::QuantMatrix, rows: std::ops::Range<usize>) -> Vec<u32> {
    let nb = q.cols / q.format.block();
    rows.map(|r| match q.format {
        fp4::Format::Mxfp4 => {
            q.scales[r * nb..(r + 1) * nb].iter().copied().filter(|&c| c != 255).max().unwrap_or(0) as u32
        }
        fp4::Format::Nvfp4 => 0,
    })
    .collect()
}

/// Rows per chunk for rows of `row_bytes` under `limit` bytes.
fn chunk_rows(rows: usize, row_bytes: usize, limit: u64) -> Result<usize> {
    let fit = (limit / row_bytes.max(1) as u64) as usize;
    if fit == 0 {
        return Err(Error::Unsupported {
            op: "upload_weight",
            backend: "wgpu".into(),
            what: format!("one row of {row_bytes} bytes exceeds the storage binding limit {limit}"),
        });
    }
    if fit >= rows {
        return Ok(rows.max(1));
    }
    Ok(if fit >= CHUNK_ALIGN { fit / CHUNK_ALIGN * CHUNK_ALIGN } else { 1 << fit.ilog2() })
}

impl WgpuBackend {
    pub(crate) fn upload_weight_impl(&self, w: &HostWeight) -> Result<WgpuWeight> {
        const OP: &str = "upload_weight";
        let usage = wgpu::BufferUsages::STORAGE;
        let [rows, cols] = w.shape();
        let bad = |d: String| Err(Error::Shape { op: OP, detail: d });
        match w {
            HostWeight::Quant(q) => {
                let block = q.format.block();
                let nb = q.cols / block;
                if q.cols % block != 0 || q.codes.len() != rows * cols / 2 || q.scales.len() != rows * nb {
                    return bad(format!(
                        "{} [{rows}, {cols}] with {} code and {} scale bytes",
                        q.format.name(),
                        q.codes.len(),
                        q.scales.len()
                    ));
                }
                let kind = match q.format {
                    fp4::Format::Mxfp4 => WKind::Mxfp4,
                    fp4::Format::Nvfp4 => WKind::Nvfp4,
                };
                let per = chunk_rows(rows, cols / 2, self.max_chunk_bytes)?;
                let mut chunks = Vec::new();
                let mut row0 = 0;
                while row0 < rows || (rows == 0 && chunks.is_empty()) {
                    let n = per.min(rows - row0);
                    let cb = cols / 2;
                    let ts: Vec<f32> = (row0..row0 + n).map(|r| q.row_tensor_scale(r)).collect();
                    let bufs = vec![
                        self.ctx.buffer_init(q.codes[row0 * cb..(row0 + n) * cb].to_vec(), usage),
                        self.ctx.buffer_init(q.scales[row0 * nb..(row0 + n) * nb].to_vec(), usage),
                        self.ctx.buffer_init(crate::bytes_of_f32(&ts), usage),
                    ];
                    let row_exp = self.ctx.caps.coop.map(|_| {
                        self.ctx.buffer_init(crate::bytes_of_u32(&row_exponents(q, row0..row0 + n)), usage)
                    });
                    chunks.push(Chunk { row0, rows: n, bufs, row_exp });
                    row0 += n.max(1);
                }
                Ok(WgpuWeight { rows, cols, kind, chunks, _release: crate::pool::Release(self.pool.clone()) })
            }
            HostWeight::Dense { dtype, bytes, .. } => {
                let sz = dtype.size();
                if bytes.len() != rows * cols * sz {
                    return bad(format!("dense {dtype:?} [{rows}, {cols}] with {} bytes", bytes.len()));
                }
                let kind = match dtype {
                    DenseDType::F32 => WKind::F32,
                    DenseDType::BF16 => WKind::Bf16,
                    DenseDType::F16 => WKind::F16,
                };
                // 16-bit rows are padded to whole words so every row starts on a word.
                let padded = if sz == 2 { cols.div_ceil(2) * 2 } else { cols };
                let per = chunk_rows(rows, padded * sz, self.max_chunk_bytes)?;
                let mut chunks = Vec::new();
                let mut row0 = 0;
                while row0 < rows || (rows == 0 && chunks.is_empty()) {
                    let n = per.min(rows - row0);
                    let mut data = Vec::with_capacity(n * padded * sz);
                    for r in row0..row0 + n {
                        data.extend_from_slice(&bytes[r * cols * sz..(r + 1) * cols * sz]);
                        data.resize(data.len() + (padded - cols) * sz, 0);
                    }
                    chunks.push(Chunk {
                        row0,
                        rows: n,
                        bufs: vec![self.ctx.buffer_init(data, usage)],
                        row_exp: None,
                    });
                    row0 += n.max(1);
                }
                Ok(WgpuWeight { rows, cols, kind, chunks, _release: crate::pool::Release(self.pool.clone()) })
            }
        }
    }
}
