//! The fast CPU backend: [`CpuBackend`] implements [`fp4moe_ops::Backend`] on host memory with
//! rayon threads and SIMD chosen at run time ([`Isa`]: AVX2+FMA on x86-64, NEON on aarch64,
//! a portable fallback everywhere).
//!
//! Tensors are [`HostStorage`], the same storage as the reference twin [`RefBackend`], so the ops
//! that are not worth accelerating (norms, RoPE, softmax, routers, slicing, …) call the twin
//! directly. The accelerated ones:
//! - `linear`: decode path ([`gemv`]: weights streamed once, several rows per pass) and prefill
//!   path ([`gemm`]: weights decoded once per N tile into an f32 panel, register-blocked
//!   microkernel), for FP4 (MXFP4 / NVFP4) and dense bf16 / f32 weights;
//! - `moe`: decode path (per token and slot) and prefill path (tokens sorted by expert, a GEMM per
//!   expert and N tile, deterministic combine in slot order), see [`moe`];
//! - `attention_gqa` / `attention_mla`: threads over query rows and heads, see [`attention`].
//!
//! FP4 decoding (see [`decode`]) builds its SIMD lookup tables from [`fp4::e2m1::TABLE`].

// Kernels index fixed-size arrays that mirror register blocks (`acc[r][q]`); index loops say that
// more plainly than iterator chains.
#![allow(clippy::needless_range_loop)]

mod attention;
mod decode;
mod gemm;
mod gemv;
mod isa;
mod linear;
mod moe;

pub use isa::Isa;

use decode::WRows;
use fp4moe_ops::reference::{HostStorage, RefBackend};
use fp4moe_ops::{
    Backend, DType, DenseDType, Error, GroupedRouter, HeadLinear, HostData, HostTensor, HostWeight,
    KernelConfig, LinearPath, MoePath, MoeWeights, Result, Rope, Tensor,
};

type HostT = Tensor<HostStorage>;

/// The CPU backend. Cheap to clone; holds only its instruction set and tile configuration.
#[derive(Debug, Clone)]
pub struct CpuBackend {
    isa: Isa,
    config: KernelConfig,
    reference: RefBackend,
}

impl Default for CpuBackend {
    fn default() -> Self {
        CpuBackend::new()
    }
}

impl CpuBackend {
    /// The best instruction set of this CPU and the default tile configuration.
    pub fn new() -> Self {
        CpuBackend { isa: Isa::detect(), config: KernelConfig::default(), reference: RefBackend }
    }

    /// Forces an instruction set (tests run every one). Errors if this CPU lacks it.
    pub fn with_isa(isa: Isa) -> Result<Self> {
        if !isa.is_available() {
            return Err(Error::Unsupported {
                op: "with_isa",
                backend: "cpu".into(),
                what: format!("{} is not available on this CPU", isa.name()),
            });
        }
        Ok(CpuBackend { isa, ..CpuBackend::new() })
    }

    /// Replaces the tile configuration `Auto` dispatch reads.
    pub fn with_config(mut self, config: KernelConfig) -> Self {
        self.config = config;
        self
    }

    pub fn isa(&self) -> Isa {
        self.isa
    }

    pub fn config(&self) -> &KernelConfig {
        &self.config
    }
}

/// An uploaded weight: the host weight (kept for the ops that delegate to the reference) plus
/// what the kernels read.
pub struct CpuWeight {
    host: HostWeight,
    prep: Prepared,
}

enum Prepared {
    /// Kernels read the packed codes and scales in place.
    Fp4,
    /// Kernels read the host bytes in place (lm_head is 0.6 GB; it is not copied).
    Bf16,
    /// `[rows, cols]` f32, widened once from f32 / f16 bytes (small dense weights only).
    F32(Vec<f32>),
}

impl CpuWeight {
    fn rows(&self) -> WRows<'_> {
        match (&self.host, &self.prep) {
            (HostWeight::Quant(q), Prepared::Fp4) => WRows::Fp4 {
                format: q.format,
                codes: &q.codes,
                scales: &q.scales,
                tensor_scales: &q.tensor_scales,
                rows_per_ts: q.rows_per_tensor_scale(),
                row0: 0,
                cols: q.cols,
            },
            (HostWeight::Dense { bytes, cols, .. }, Prepared::Bf16) => WRows::Bf16 { bytes, cols: *cols },
            (HostWeight::Dense { cols, .. }, Prepared::F32(data)) => WRows::F32 { data, cols: *cols },
            _ => unreachable!("CpuWeight is only built by upload_weight, which pairs these"),
        }
    }

    /// The weight as uploaded.
    pub fn host(&self) -> &HostWeight {
        &self.host
    }
}

fn shape_err(op: &'static str, detail: impl Into<String>) -> Error {
    Error::Shape { op, detail: detail.into() }
}

impl Backend for CpuBackend {
    type Storage = HostStorage;
    type Weight = CpuWeight;

    fn name(&self) -> String {
        format!("cpu:{}", self.isa.name())
    }

    fn upload(&self, t: HostTensor<'_>) -> Result<HostT> {
        self.reference.upload(t)
    }
    fn zeros(&self, shape: &[usize], dtype: DType) -> Result<HostT> {
        self.reference.zeros(shape, dtype)
    }
    fn download(&self, t: &HostT) -> Result<HostData> {
        self.reference.download(t)
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn upload_weight(&self, w: &HostWeight) -> Result<CpuWeight> {
        // The reference validates buffer lengths against the shape.
        let host = self.reference.upload_weight(w)?;
        let prep = match &host {
            HostWeight::Quant(_) => Prepared::Fp4,
            HostWeight::Dense { dtype: DenseDType::BF16, .. } => Prepared::Bf16,
            HostWeight::Dense { .. } => Prepared::F32(host.to_f32()),
        };
        Ok(CpuWeight { host, prep })
    }

    fn weight_shape(&self, w: &CpuWeight) -> [usize; 2] {
        w.host.shape()
    }

    fn linear_paths(&self) -> Vec<LinearPath> {
        vec![LinearPath::Decode, LinearPath::Prefill { n_tile: 32 }, LinearPath::Prefill { n_tile: 64 }]
    }

    fn moe_paths(&self) -> Vec<MoePath> {
        vec![MoePath::Decode, MoePath::Prefill { n_tile: 32 }, MoePath::Prefill { n_tile: 64 }]
    }

    fn embedding(&self, table: &CpuWeight, ids: &HostT) -> Result<HostT> {
        self.reference.embedding(&table.host, ids)
    }

    fn linear(&self, x: &HostT, w: &CpuWeight, path: LinearPath) -> Result<HostT> {
        const OP: &str = "linear";
        let [n, k] = w.host.shape();
        if x.shape().is_empty() || x.last_dim() != k {
            return Err(shape_err(OP, format!("x {:?} against weight [{n}, {k}]", x.shape())));
        }
        let xv = x.activations(OP)?;
        let m = x.rows();
        let path = if path == LinearPath::Auto { self.config.linear_path(m) } else { path };
        let y = match path {
            LinearPath::Decode | LinearPath::Auto => linear::decode(self.isa, &w.rows(), &xv, m),
            LinearPath::Prefill { n_tile } => {
                check_tile(OP, n_tile)?;
                linear::prefill(self.isa, &w.rows(), &xv, m, n_tile)
            }
        };
        let mut shape = x.shape().to_vec();
        *shape.last_mut().expect("non-empty") = n;
        Tensor::from_f32(y, &shape)
    }

    fn head_linear(&self, x: &HostT, w: &CpuWeight, spec: HeadLinear) -> Result<HostT> {
        const OP: &str = "head_linear";
        let HeadLinear { heads, rows_per_head, row_start, row_count, transpose } = spec;
        let [rows, k] = w.host.shape();
        if rows != heads * rows_per_head || row_start + row_count > rows_per_head {
            return Err(shape_err(OP, format!("{spec:?} against weight [{rows}, {k}]")));
        }
        let kx = if transpose { row_count } else { k };
        let s = x.shape();
        if s.len() != 3 || s[1] != heads || s[2] != kx {
            return Err(shape_err(OP, format!("x {s:?}, expected [M, {heads}, {kx}] for {spec:?}")));
        }
        let xv = x.f32_vec(OP)?;
        let y = linear::head_linear(self.isa, &w.rows(), &xv, s[0], spec);
        Tensor::from_f32(y, &[s[0], heads, if transpose { k } else { row_count }])
    }

    fn rms_norm(&self, x: &HostT, w: &HostT, eps: f32) -> Result<HostT> {
        self.reference.rms_norm(x, w, eps)
    }
    fn rope(&self, x: &HostT, positions: &HostT, spec: Rope) -> Result<HostT> {
        self.reference.rope(x, positions, spec)
    }
    fn softmax(&self, x: &HostT) -> Result<HostT> {
        self.reference.softmax(x)
    }
    fn add(&self, a: &HostT, b: &HostT) -> Result<HostT> {
        self.reference.add(a, b)
    }
    fn silu_mul(&self, x: &HostT) -> Result<HostT> {
        self.reference.silu_mul(x)
    }
    fn slice_cols(&self, x: &HostT, start: usize, len: usize) -> Result<HostT> {
        self.reference.slice_cols(x, start, len)
    }
    fn slice_rows(&self, x: &HostT, start: usize, len: usize) -> Result<HostT> {
        self.reference.slice_rows(x, start, len)
    }
    fn concat_rows(&self, parts: &[&HostT]) -> Result<HostT> {
        self.reference.concat_rows(parts)
    }
    fn cast(&self, x: &HostT, dtype: DType) -> Result<HostT> {
        self.reference.cast(x, dtype)
    }
    fn write_rows(&self, dst: &HostT, src: &HostT, row0: usize, col0: usize) -> Result<()> {
        self.reference.write_rows(dst, src, row0, col0)
    }
    fn route_softmax(&self, logits: &HostT, k: usize, renormalize: bool) -> Result<(HostT, HostT)> {
        self.reference.route_softmax(logits, k, renormalize)
    }
    fn route_sigmoid_grouped(
        &self,
        logits: &HostT,
        bias: &HostT,
        spec: GroupedRouter,
    ) -> Result<(HostT, HostT)> {
        self.reference.route_sigmoid_grouped(logits, bias, spec)
    }

    fn moe(
        &self,
        x: &HostT,
        ids: &HostT,
        weights: &HostT,
        experts: MoeWeights<'_, CpuWeight>,
        path: MoePath,
    ) -> Result<HostT> {
        const OP: &str = "moe";
        let shape = fp4moe_ops::check::moe(
            x.shape(),
            experts.gate_up.host().shape(),
            experts.down.host().shape(),
            experts.n_experts,
            ids.shape(),
            weights.shape(),
            experts.shared.map(|(g, d)| (g.host().shape(), d.host().shape())),
        )?;
        let xv = x.activations(OP)?;
        let idv = ids.u32_vec(OP)?;
        let wv = weights.f32_vec(OP)?;
        if let Some(p) = idv.iter().position(|&e| e as usize >= experts.n_experts) {
            let k = shape.k;
            return Err(shape_err(
                OP,
                format!("expert id {} at token {}, slot {} (>= {})", idv[p], p / k, p % k, experts.n_experts),
            ));
        }
        let path = if path == MoePath::Auto { self.config.moe_path(shape.n) } else { path };
        let inp = moe::Inputs { x: &xv, ids: &idv, wts: &wv, bf16_act: x.dtype() == DType::BF16 };
        let w = moe::Weights {
            gate_up: experts.gate_up.rows(),
            down: experts.down.rows(),
            shared: experts.shared.map(|(g, d)| (g.rows(), d.rows())),
        };
        let out = match path {
            MoePath::Decode | MoePath::Auto => moe::decode(self.isa, &shape, &w, &inp),
            MoePath::Prefill { n_tile } => {
                check_tile(OP, n_tile)?;
                moe::prefill(self.isa, &shape, &w, &inp, n_tile)
            }
        };
        Tensor::from_f32(out, &[shape.n, shape.h])
    }

    fn attention_gqa(&self, q: &HostT, k: &HostT, v: &HostT, pos0: usize, scale: f32) -> Result<HostT> {
        attention::gqa(self.isa, q, k, v, pos0, scale)
    }

    fn attention_mla(
        &self,
        q_lat: &HostT,
        q_rope: &HostT,
        cache: &HostT,
        pos0: usize,
        scale: f32,
    ) -> Result<HostT> {
        attention::mla(self.isa, q_lat, q_rope, cache, pos0, scale)
    }

    fn mla_expands(&self, queries: usize, keys: usize) -> bool {
        fp4moe_ops::mla_expansion_pays(queries, keys)
    }

    fn argmax(&self, x: &HostT) -> Result<HostT> {
        self.reference.argmax(x)
    }
    fn top_k(&self, x: &HostT, k: usize) -> Result<(HostT, HostT)> {
        self.reference.top_k(x, k)
    }
}

fn check_tile(op: &'static str, n_tile: usize) -> Result<()> {
    if n_tile == 0 {
        return Err(shape_err(op, "n_tile must be > 0"));
    }
    Ok(())
}
