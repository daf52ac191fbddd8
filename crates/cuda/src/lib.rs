//! CUDA backend for NVIDIA GPUs (developed and measured on the H100 and H200).
//!
//! - Host side through `cudarc` with *dynamic loading*: the crate builds, and every CPU test runs,
//!   on machines without CUDA. [`CudaBackend::available`] and [`CudaBackend::new`] probe for the
//!   driver and NVRTC libraries before cudarc touches them (cudarc panics when they are missing)
//!   and answer with a typed [`CudaError`].
//! - Kernels are `.cu` files under `kernels/`, embedded with `include_str!` and compiled at run
//!   time by NVRTC for the device's architecture (`sm_90a` on Hopper), once per process and
//!   device. They include `fp4.cuh`, generated from the Rust E2M1 definition by `fp4::codegen`;
//!   no kernel spells the table. `tools/nvrtc_check.py` compiles the same files in CI.
//! - Activations are f32 device buffers (bf16 accepted by `linear` and `cast`); every op enqueues
//!   on one stream and returns at once; only `download` and `synchronize` wait.
//! - Paths: `linear` Decode is an FP4 GEMV: for one activation row on the tensor cores (16 weight
//!   rows as the A operand of `mma.sync`, x as B in three exact bf16 terms; each warp's weight
//!   steps copied ahead into shared memory, [`CudaBackend::with_unstaged_decode`] keeps one step
//!   ahead in registers instead), for several rows on
//!   the SIMT kernels (16-byte weight loads, several in flight per lane; `FP4MOE_CUDA_TC=0` or
//!   [`CudaBackend::with_simt_decode`] uses them for one row too); Prefill{128|256} is a tensor-core
//!   GEMM (FP4 dequantized in registers, `cp.async` pipeline; tiles of 32 to 256 activation rows
//!   by the rows each tile serves, [`CudaBackend::with_gemm_block_rows`] to force one): `mma.sync`
//!   bf16, or on Hopper, for tiles of 64 rows and more, `wgmma` with the decoded weights as
//!   its register operand, warp-specialized (a producer warpgroup: activation tiles by TMA,
//!   weight codes by `cp.async`, stages handed over through mbarriers) and persistent (one block
//!   per SM walks the tiles), for dense linears, MLA's head products and the grouped MoE (whose
//!   activations it reads in a permuted k order); `FP4MOE_CUDA_WGMMA=0` or
//!   [`CudaBackend::with_mma_gemm`] turns it off, `FP4MOE_CUDA_MOE_WGMMA=0` for the MoE only;
//!   `linears` runs up to three one-row tensor-core GEMVs on one x as one launch. `moe` Decode runs
//!   per (token, slot) products, on the tensor cores when every weight is FP4, with SiLU fused
//!   into gate/up and the router weight into down, then a slot-ordered sum; Prefill{128|256} sorts
//!   pairs by expert on the GPU (counts -> padded offsets -> scatter) and runs the same GEMM per
//!   expert block, then combines in slot order. No float atomics anywhere. Attention: decode
//!   splits the keys (flash-decoding, ordered combine); many queries take FlashAttention-2 tiles
//!   on the tensor cores (GQA and MLA; f32 operands as tf32 hi + lo, three `mma.sync` products,
//!   which keeps f32 agreement; f32 kernels for widths that are not multiples of 8). Prefills on
//!   bf16 activations (`attention_*_bf16`) run bf16 `mma.sync` kernels at Qwen3's and GLM's head
//!   widths (keys and values rounded once per call) and one TF32 product elsewhere. Products
//!   with f32 weights (routers) and MLA's per-head products at prefill use one batched
//!   tensor-core GEMM of the same kind (`gemm_f32_tc`).
//! - On sm_90+ every kernel is launched with programmatic stream serialization: it may start
//!   while the previous one finishes and waits for its inputs in the kernel (`pdl_wait`,
//!   kernels/common.cuh), so launch latency and the GEMVs' first weight loads overlap the
//!   previous kernel. `FP4MOE_PDL=0` turns it off.
//! - `Backend::capture` records the ops as a CUDA graph (the models record batch-1 decode once per
//!   sequence): buffers allocated while recording belong to the graph (`device::Arena`), and
//!   cache rows and attention ranges are read on the device (`row_shift`), so `replay` runs the
//!   same graph at every position.
//!
//! Source map: `device.rs` (probe, NVRTC, launches, buffer pool, graphs), `weight.rs` (upload layout),
//! `backend.rs` (the `Backend` ops), `kernels/*.cu`.

mod backend;
mod device;
mod weight;

pub use backend::GEMM_BLOCK_ROWS;
pub use device::{KERNEL_FILES, arch_for, compile, fill_disk_cache};
pub use weight::{CudaWeight, FP4_KP_ALIGN, WeightKind};

use device::{Buf, Device};
use fp4moe_ops::KernelConfig;
use std::sync::Arc;

/// Why the CUDA backend is not usable, or what failed on the device.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("CUDA libraries not found (libcuda and libnvrtc must be loadable)")]
    LibraryMissing,
    #[error("no usable CUDA device: {0}")]
    NoDevice(String),
    #[error("CUDA driver error: {0}")]
    Driver(String),
    #[error("NVRTC failed to compile {file}: {log}")]
    Compile { file: &'static str, log: String },
    #[error("bad weight: {0}")]
    BadWeight(String),
    #[error("bad kernel config {path}: {detail}")]
    Config { path: String, detail: String },
}

impl From<CudaError> for fp4moe_ops::Error {
    fn from(e: CudaError) -> Self {
        fp4moe_ops::Error::Device(e.to_string())
    }
}

pub type Result<T, E = CudaError> = std::result::Result<T, E>;

/// Device memory behind a tensor.
#[derive(Debug)]
pub struct CudaStorage {
    buf: Buf,
}

impl CudaStorage {
    /// Raw device address (for kernels).
    pub fn ptr(&self) -> u64 {
        self.buf.ptr
    }
}

/// `fp4moe autotune --backend cuda --model qwen3-30b-a3b` on an H100 80GB HBM3 (checked in as
/// written; GLM's run differed only in linear_decode_max_rows, 32).
pub const H100_CONFIG_JSON: &str = include_str!("../configs/h100.json");

/// Cards with a config of their own, by a part of the name the driver reports. Only the H100
/// has one: the H200's autotune predates the current GEMM kernels and could not be re-run (the
/// device tool lends H200s only for work that does not fit an H100), so its file, a copy of the
/// H100's, was removed. `fp4moe autotune --out crates/cuda/configs/<card>.json` adds one.
const CARD_CONFIGS: &[(&str, &str, &str)] = &[("H100", "configs/h100.json", H100_CONFIG_JSON)];

/// The checked-in config for a device, by the name the driver reports; the H100's for every
/// card without its own.
pub fn default_config_for(device_name: &str) -> (&'static str, &'static str) {
    CARD_CONFIGS
        .iter()
        .find(|(card, _, _)| device_name.contains(card))
        .map_or(("configs/h100.json", H100_CONFIG_JSON), |&(_, path, json)| (path, json))
}

/// The CUDA backend on one device.
pub struct CudaBackend {
    dev: Arc<Device>,
    config: KernelConfig,
    /// RoPE inverse frequencies per (dims, theta bits), uploaded once: an upload waits for the
    /// stream, and one per `rope` call stalled the whole decode pipeline twice per layer.
    inv_freq: Arc<InvFreqCache>,
    /// One-row FP4 products (decode GEMV, MoE decode) on the tensor cores (`gemv_tc`,
    /// `moe_*_tc` in gemv.cu); false selects the SIMT row kernels, which the conformance suite
    /// also runs ([`CudaBackend::with_simt_decode`]). `FP4MOE_CUDA_TC=0` turns it off.
    tc_decode: bool,
    /// Tensor-core decode products (all but the MoE gate/up) give each warp shared room for all
    /// of its weight steps (`tc_stage` in gemv.cu: every step copied ahead with cp.async)
    /// instead of one step ahead in registers. [`CudaBackend::with_unstaged_decode`] and
    /// `FP4MOE_CUDA_TC_STAGE=0` select the register path, which the conformance suite also runs.
    tc_stage: bool,
    /// Tile rows of every FP4 prefill GEMM (one of `GEMM_BLOCK_ROWS`), or None to pick them by
    /// the rows each tile serves ([`CudaBackend::with_gemm_block_rows`]: tests, benchmarks).
    gemm_rows: Option<usize>,
    /// FP4 prefill GEMM tiles of 64 rows and more on Hopper's warpgroup MMA (`gemm_fp4_wg_*`,
    /// sm_90a only; dense linears and MLA's head products) instead of `mma.sync`
    /// (`gemm_fp4_t*`). `FP4MOE_CUDA_WGMMA=0` or [`CudaBackend::with_mma_gemm`] selects
    /// `mma.sync`, which the conformance suite also runs.
    wgmma: bool,
    /// The grouped MoE GEMM on the wgmma kernel too (where `wgmma` holds):
    /// `FP4MOE_CUDA_MOE_WGMMA` (1 or 0) or [`CudaBackend::with_moe_on_wgmma`]; the default is
    /// MOE_ON_WGMMA (backend.rs).
    moe_wgmma: bool,
    /// MLA prefill chunks attend in the expanded form where it pays ([`fp4moe_ops::Backend::mla_expands`]:
    /// `attention_mla_expanded` after the latents' kv_b product). `FP4MOE_CUDA_MLA_EXPAND=0`
    /// or [`CudaBackend::with_absorbed_mla`] keeps every step absorbed.
    mla_expand: bool,
}

type InvFreqCache =
    std::sync::Mutex<std::collections::HashMap<(usize, u32), fp4moe_ops::Tensor<CudaStorage>>>;

impl CudaBackend {
    /// True when the libraries load and device 0 can be opened.
    pub fn available() -> bool {
        CudaBackend::new().is_ok()
    }

    /// Device 0 with the checked-in default config.
    pub fn new() -> Result<Self> {
        CudaBackend::on_device(0)
    }

    /// Device `ordinal` with the config in `FP4MOE_CUDA_CONFIG` (a file from `fp4moe autotune`)
    /// when set, else the checked-in default for the card ([`default_config_for`]).
    pub fn on_device(ordinal: usize) -> Result<Self> {
        let dev = Arc::new(Device::open(ordinal)?);
        let config = match std::env::var_os("FP4MOE_CUDA_CONFIG") {
            Some(p) => CudaBackend::load_config(std::path::Path::new(&p))?,
            None => {
                let (path, json) = default_config_for(&dev.name);
                serde_json::from_str(json)
                    .map_err(|e| CudaError::Config { path: path.into(), detail: e.to_string() })?
            }
        };
        let tc_decode = std::env::var_os("FP4MOE_CUDA_TC").is_none_or(|v| v != "0");
        let tc_stage = std::env::var_os("FP4MOE_CUDA_TC_STAGE").is_none_or(|v| v != "0");
        let wgmma = dev.arch == "sm_90a" && std::env::var_os("FP4MOE_CUDA_WGMMA").is_none_or(|v| v != "0");
        let mla_expand = std::env::var_os("FP4MOE_CUDA_MLA_EXPAND").is_none_or(|v| v != "0");
        let moe_wgmma = std::env::var_os("FP4MOE_CUDA_MOE_WGMMA").map_or(backend::MOE_ON_WGMMA, |v| v != "0");
        Ok(CudaBackend {
            dev,
            config,
            inv_freq: Arc::default(),
            tc_decode,
            tc_stage,
            gemm_rows: None,
            wgmma,
            moe_wgmma,
            mla_expand,
        })
    }

    /// The same device with another tile configuration (autotune, tests).
    pub fn with_config(&self, config: KernelConfig) -> Self {
        CudaBackend { config, ..self.clone_handle() }
    }

    /// The same device with one-row FP4 products on the SIMT row kernels instead of the tensor
    /// cores (tests, comparisons).
    pub fn with_simt_decode(&self) -> Self {
        CudaBackend { tc_decode: false, ..self.clone_handle() }
    }

    /// The same device with the tensor-core decode products keeping one weight step ahead in
    /// registers instead of copying every step ahead into shared memory (tests, comparisons).
    pub fn with_unstaged_decode(&self) -> Self {
        CudaBackend { tc_stage: false, ..self.clone_handle() }
    }

    /// The same device with every FP4 prefill GEMM on tiles of `rows` rows (one of
    /// [`GEMM_BLOCK_ROWS`], or the tallest below it that the GEMM has), so the conformance
    /// suite's small shapes also run the tiles large prefills take.
    pub fn with_gemm_block_rows(&self, rows: usize) -> Self {
        CudaBackend { gemm_rows: Some(rows), ..self.clone_handle() }
    }

    /// The same device with every FP4 prefill GEMM on `mma.sync` (tests, comparisons).
    pub fn with_mma_gemm(&self) -> Self {
        CudaBackend { wgmma: false, ..self.clone_handle() }
    }

    /// The same device with the grouped MoE GEMM on the wgmma kernel (`on`) or on `mma.sync`,
    /// where the backend uses wgmma at all (tests, comparisons).
    pub fn with_moe_on_wgmma(&self, on: bool) -> Self {
        CudaBackend { moe_wgmma: on, ..self.clone_handle() }
    }

    /// The same device with every MLA step in the absorbed form (tests, comparisons).
    pub fn with_absorbed_mla(&self) -> Self {
        CudaBackend { mla_expand: false, ..self.clone_handle() }
    }

    /// The tile heights (`GEMM_BLOCK_ROWS`) the grouped MoE GEMM can take on this backend, for
    /// benchmarks that force each one.
    pub fn moe_block_rows(&self) -> &'static [usize] {
        self.gemm_block_rows_for("moe", backend::MOE_DOWN_TERMS)
    }

    fn clone_handle(&self) -> Self {
        CudaBackend {
            dev: self.dev.clone(),
            config: self.config,
            inv_freq: self.inv_freq.clone(),
            tc_decode: self.tc_decode,
            tc_stage: self.tc_stage,
            gemm_rows: self.gemm_rows,
            wgmma: self.wgmma,
            moe_wgmma: self.moe_wgmma,
            mla_expand: self.mla_expand,
        }
    }

    /// Loads a KernelConfig JSON file (as written by `fp4moe autotune`).
    pub fn load_config(path: &std::path::Path) -> Result<KernelConfig> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| CudaError::Config { path: path.display().to_string(), detail: e.to_string() })?;
        serde_json::from_str(&text)
            .map_err(|e| CudaError::Config { path: path.display().to_string(), detail: e.to_string() })
    }

    pub fn config(&self) -> KernelConfig {
        self.config
    }

    /// Device name as the driver reports it (e.g. `NVIDIA H100 80GB HBM3`).
    pub fn device_name(&self) -> &str {
        &self.dev.name
    }

    /// NVRTC target used for this device.
    pub fn arch(&self) -> &str {
        &self.dev.arch
    }

    /// Compiles every kernel file now (otherwise each compiles on first use), so that timing
    /// loops never include NVRTC.
    pub fn warm_up(&self) -> Result<()> {
        for (file, _) in KERNEL_FILES {
            self.dev.module(file)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checked_in_configs_parse_and_are_picked_by_card() {
        for name in ["NVIDIA H100 80GB HBM3", "NVIDIA H200", "NVIDIA A100-SXM4-80GB"] {
            let (path, json) = default_config_for(name);
            let c: KernelConfig = serde_json::from_str(json).unwrap_or_else(|e| panic!("{path}: {e}"));
            assert!(c.linear_n_tile > 0 && c.moe_n_tile > 0, "{path}");
        }
        assert_eq!(default_config_for("NVIDIA H100 80GB HBM3").0, "configs/h100.json");
        assert_eq!(default_config_for("NVIDIA H200").0, "configs/h100.json", "no H200 file of its own");
    }
}
