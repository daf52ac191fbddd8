//! wgpu backend: every [`fp4moe_ops::Backend`] op as a WGSL kernel, run through `wgpu` on
//! Metal (Apple GPUs), Vulkan (Linux/Windows, incl. Mesa's lavapipe in CI) and DX12.
//!
//! How it is put together:
//! - [`context`]: adapter and device, with `SHADER_F16`, `SUBGROUP` and cooperative matrices
//!   requested when offered. Only the cooperative-matrix GEMM (`coop_gemm.wgsl`: FP4 prefill
//!   linears, MoE and per-head products on tensor cores) uses them, where the adapter has
//!   16x16 f16 matrices and a fixed subgroup size (`Caps::coop`); everything else, and every
//!   adapter without them, runs the f32 kernels.
//! - [`kernels`]: WGSL sources under `crates/wgpu/shaders/`, assembled as
//!   `fp4::codegen::wgsl()` (the generated E2M1/E8M0/E4M3 decode) + shared helpers + the
//!   weight-access snippet of the weight's format + the kernel; pipelines are compiled once per
//!   variant and cached, without wgpu's runtime checks unless [`Options::runtime_checks`] (or
//!   `FP4MOE_WGPU_CHECKS=1`) asks for them: the clamps, guards and loop counters cost 20-30 % of
//!   decode speed on the H100, and the conformance suite runs the kernels both ways.
//! - [`weight`]: weights are uploaded once, split into chunks of whole rows when a matrix is
//!   larger than one storage binding may be (128 MiB on lavapipe; an lm_head is 622 MB).
//! - [`queue`]: ops record dispatches into one compute pass of one pending command encoder; it
//!   is submitted only when the host waits (download, synchronize) or a large batch has built
//!   up, so a forward pass is a handful of submits. Bind groups are cached.
//! - [`pool`]: activation buffers are reused by size class, so a steady decode loop creates no
//!   buffers and binds the same ones every step. With a buffer, bind group and pass per op,
//!   wgpu's host time was ~16 us per op on the 2-core development machine; now ~2.3 us while
//!   recording plus ~4 us in `CommandEncoder::finish`, where wgpu-core replays the pass. That
//!   is more than most decode kernels take on a fast GPU, so decode is written for few
//!   dispatches: fused ops (`add_rms_norm`, `moe_add_rms_norm`, two-input `norm_rope` writing
//!   the k/v caches, `split_rope_and_cache`, one GEMV for `linears`, the shared expert inside
//!   the MoE products), 11 per Qwen3 layer and 15 per GLM layer. On the H100 through Vulkan
//!   the host's recording now overlaps the GPU, and each dispatch costs the GPU 5-7 us however
//!   small its kernel (most likely the barrier between dependent dispatches).
//! - `ops.rs`: the op trait, each op validating shapes on the host and recording kernels.

mod context;
mod kernels;
mod ops;
mod pool;
mod queue;
mod timing;
mod weight;

pub use context::{Caps, Error};
pub use kernels::{Coop, all_sources as shader_sources};
pub use weight::WgpuWeight;

use fp4moe_ops::KernelConfig;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

/// A device buffer behind a tensor, from the backend's [`pool`]: at least the tensor's bytes
/// rounded up to whole words (bf16 tensors pack two elements a word), often more (its size
/// class), so kernels take element counts from their params, never from the binding's length.
pub struct GpuBuf {
    buf: wgpu::Buffer,
    pool: Arc<pool::Pool>,
    /// Whether the buffer goes back to the pool when dropped (else it is released).
    pooled: bool,
}

impl GpuBuf {
    pub fn buffer(&self) -> &wgpu::Buffer {
        &self.buf
    }
}

impl std::fmt::Debug for GpuBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuBuf").field("bytes", &self.buf.size()).field("pooled", &self.pooled).finish()
    }
}

impl std::ops::Deref for GpuBuf {
    type Target = wgpu::Buffer;
    fn deref(&self) -> &wgpu::Buffer {
        &self.buf
    }
}

impl Drop for GpuBuf {
    fn drop(&mut self) {
        if self.pooled {
            self.pool.put(self.buf.clone());
        } else {
            self.pool.released();
        }
    }
}

/// The wgpu backend. Cheap to share by reference; all interior state is behind locks.
pub struct WgpuBackend {
    ctx: context::Context,
    kernels: kernels::Cache,
    queue: queue::Pending,
    pool: Arc<pool::Pool>,
    config: KernelConfig,
    /// Largest byte size of one weight chunk (the device's storage binding limit unless lowered
    /// for tests).
    max_chunk_bytes: u64,
    /// RoPE inverse frequencies by (dims, theta bits), uploaded on first use.
    inv_freq: Mutex<HashMap<(usize, u32), Arc<wgpu::Buffer>>>,
    /// `linears` runs as one dispatch (gemv_multi.wgsl): the adapter allows its
    /// [`MULTI_GEMV_BUFFERS`] storage buffers in one kernel, and `FP4MOE_WGPU_MULTI_GEMV` is not 0.
    multi_gemv: bool,
    /// Nanoseconds the host has spent blocked in waits for the GPU (`Backend::host_waits`).
    waited: Arc<std::sync::atomic::AtomicU64>,
    /// The mappable buffer downloads of up to [`queue::STAGED_READ_MAX`] bytes land in, grown to
    /// the largest so far (a decode step whose sampler needs the whole logits row downloads
    /// 600 KB; a new buffer per step cost an allocation and a copy out of the mapping).
    staging: Mutex<Option<wgpu::Buffer>>,
}

/// Storage buffers of gemv_multi.wgsl: x, three outputs, three FP4 weights of three buffers.
const MULTI_GEMV_BUFFERS: u32 = 13;

impl WgpuBackend {
    /// The first suitable adapter (discrete GPU first), or [`Error::NoAdapter`].
    pub fn new() -> Result<Self, Error> {
        Self::with_options(Options::default())
    }

    pub fn with_options(opts: Options) -> Result<Self, Error> {
        let ctx = context::Context::new()?;
        let limit = ctx.max_binding_bytes();
        let max_chunk_bytes = opts.max_chunk_bytes.map_or(limit, |b| b.min(limit));
        Ok(WgpuBackend {
            kernels: kernels::Cache::new(
                opts.runtime_checks
                    .unwrap_or_else(|| std::env::var("FP4MOE_WGPU_CHECKS").is_ok_and(|v| v == "1")),
            ),
            queue: queue::Pending::new(
                ctx.caps.timestamps.then(|| timing::Timer::new(&ctx.device, &ctx.queue, queue::SUBMIT_EVERY)),
                ctx.caps.cpu_adapter,
            ),
            pool: Arc::default(),
            config: opts.config.unwrap_or_else(|| ops::default_config(ctx.caps.coop.is_some())),
            max_chunk_bytes,
            inv_freq: Mutex::new(HashMap::new()),
            multi_gemv: ctx.device.limits().max_storage_buffers_per_shader_stage >= MULTI_GEMV_BUFFERS
                && !std::env::var("FP4MOE_WGPU_MULTI_GEMV").is_ok_and(|v| v == "0"),
            waited: Arc::default(),
            staging: Mutex::new(None),
            ctx,
        })
    }

    /// What the adapter offers and this backend uses.
    pub fn caps(&self) -> &Caps {
        &self.ctx.caps
    }

    pub fn config(&self) -> &KernelConfig {
        &self.config
    }

    fn inv_freq(&self, dims: usize, theta: f32) -> Arc<wgpu::Buffer> {
        let mut map = self.inv_freq.lock().unwrap_or_else(PoisonError::into_inner);
        map.entry((dims, theta.to_bits()))
            .or_insert_with(|| {
                let v = fp4moe_ops::reference::rope_inv_freq(dims, theta);
                Arc::new(self.ctx.buffer_init(bytes_of_f32(&v), wgpu::BufferUsages::STORAGE))
            })
            .clone()
    }
}

/// Construction options.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Tile choices; by default the cooperative-matrix GEMMs where the adapter has them.
    pub config: Option<KernelConfig>,
    /// Split weights into chunks of at most this many bytes per buffer (tests use it to exercise
    /// chunking on small matrices); the device limit applies regardless.
    pub max_chunk_bytes: Option<u64>,
    /// wgpu's runtime checks in the kernels (index clamps, division guards, loop counters):
    /// by default off unless `FP4MOE_WGPU_CHECKS=1`. The kernels are written to need none; the
    /// conformance suite runs both ways.
    pub runtime_checks: Option<bool>,
}

fn bytes_of_f32(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn bytes_of_u32(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
