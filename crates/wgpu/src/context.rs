//! Adapter and device creation, feature negotiation, and a minimal executor for wgpu's futures
//! (on native backends they are ready at once or after a device poll, so no runtime is needed).

use std::future::Future;
use std::pin::pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context as TaskContext, Poll, Waker};

/// Errors of this crate outside the op trait (which uses [`fp4moe_ops::Error`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no wgpu adapter found (no Vulkan/Metal/DX12 driver; install mesa-vulkan-drivers for lavapipe)")]
    NoAdapter,
    #[error("requesting a device from {adapter}: {detail}")]
    Device { adapter: String, detail: String },
}

/// What the adapter offers, as used by the kernels.
#[derive(Debug, Clone)]
pub struct Caps {
    pub adapter: String,
    /// A CPU implementation of the API (lavapipe, WARP): correct but orders of magnitude slower.
    pub cpu_adapter: bool,
    pub backend: String,
    pub shader_f16: bool,
    pub subgroup: bool,
    pub subgroup_min_size: u32,
    pub subgroup_max_size: u32,
    /// Cooperative matrix shapes offered (M, N, K, AB type, CR type), e.g. 16x16x16 f16 -> f32.
    pub cooperative_matrix: Vec<String>,
    /// What the prefill GEMMs use of them, or None (then they run on the f32 tile kernels):
    /// 16 x 16 x 16 f16 x f16 -> f32 matrices, a fixed subgroup size of at least 32, and
    /// [`COOP_ENV`] not `0`.
    pub coop: Option<crate::kernels::Coop>,
    pub max_storage_binding: u64,
    pub max_workgroup_memory: u32,
    /// Kernels are timed on the device ([`TIMESTAMPS_ENV`] set and the adapter offers
    /// timestamp queries).
    pub timestamps: bool,
}

/// Environment variable that turns on per-kernel device timing (each dispatch then gets its own
/// compute pass with timestamps, and each submit waits for its times: slower, for profiling).
pub const TIMESTAMPS_ENV: &str = "FP4MOE_WGPU_TIMESTAMPS";

/// Environment variable that, set to `0`, keeps the prefill GEMMs off cooperative matrices
/// (A/B measurements, or a driver that miscompiles them).
pub const COOP_ENV: &str = "FP4MOE_WGPU_COOP";

pub(crate) struct Context {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub caps: Caps,
    /// Errors wgpu reports outside an error scope (validation, out of memory); the next wait
    /// point turns them into an op error instead of a panic.
    pub errors: Arc<Mutex<Vec<String>>>,
}

/// What a wgpu error says: its description (the top-level message is only "Validation Error";
/// the cause, such as a shader the driver rejects or a binding mismatch, is in the description).
pub(crate) fn error_text(e: &wgpu::Error) -> String {
    match e {
        wgpu::Error::Validation { description, .. } | wgpu::Error::Internal { description, .. } => {
            description.clone()
        }
        other => other.to_string(),
    }
}

/// Drives a future to completion on this thread.
pub(crate) fn block_on<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    let mut cx = TaskContext::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::sleep(std::time::Duration::from_micros(50));
    }
}

fn type_rank(t: wgpu::DeviceType) -> u32 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 3,
        wgpu::DeviceType::Other => 4,
    }
}

/// The cooperative matrices coop_gemm.wgsl can use on this adapter (see [`Caps::coop`]).
fn pick_coop(
    adapter: &wgpu::Adapter,
    info: &wgpu::AdapterInfo,
    features: wgpu::Features,
    limits: &wgpu::Limits,
) -> Option<crate::kernels::Coop> {
    use wgpu::CooperativeScalarType as T;
    let needed = wgpu::Features::SHADER_F16 | wgpu::Features::SUBGROUP;
    let sg = info.subgroup_max_size;
    // The kernel's workgroup is a whole number of subgroups only if their size is fixed.
    if !features.contains(needed) || sg == 0 || info.subgroup_min_size != sg {
        return None;
    }
    // 16 x 16 only: the kernel's tiling (2S x 2S blocks of a 64 x 128 tile, 256 threads staging
    // a k step) assumes it. Apple GPUs' 8 x 8 simdgroup matrices would need another tiling, and
    // no Apple GPU has run it.
    let s = 16;
    let offered = adapter.cooperative_matrix_properties().iter().any(|p| {
        p.ab_type == T::F16 && p.cr_type == T::F32 && p.m_size == s && p.n_size == s && p.k_size == s
    });
    let c = crate::kernels::Coop { s, subgroup: sg };
    let threads = sg * crate::kernels::shape::COOP_SUBGROUPS;
    (offered
        && threads >= c.staging_threads()
        && threads <= limits.max_compute_invocations_per_workgroup
        && threads <= limits.max_compute_workgroup_size_x
        && c.workgroup_bytes() <= limits.max_compute_workgroup_storage_size)
        .then_some(c)
}

impl Context {
    pub fn new() -> Result<Context, Error> {
        let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
        // GL cannot run these kernels (no storage-buffer compute guarantees); WGPU_BACKEND may
        // still narrow the choice.
        desc.backends = wgpu::Backends::from_env().unwrap_or(wgpu::Backends::PRIMARY);
        let instance = wgpu::Instance::new(desc);
        let mut adapters = block_on(instance.enumerate_adapters(wgpu::Backends::all()));
        adapters.retain(|a| a.get_info().backend != wgpu::Backend::Gl);
        adapters.sort_by_key(|a| type_rank(a.get_info().device_type));
        let adapter = adapters.into_iter().next().ok_or(Error::NoAdapter)?;
        let info = adapter.get_info();
        let offered = adapter.features();
        let mut wanted = wgpu::Features::SHADER_F16
            | wgpu::Features::SUBGROUP
            | wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX;
        if std::env::var_os(TIMESTAMPS_ENV).is_some_and(|v| v != "0") {
            wanted |= wgpu::Features::TIMESTAMP_QUERY;
        }
        let features = offered & wanted;
        let coop = features.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX);
        let limits = adapter.limits();
        let (device, queue) = block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("fp4moe"),
            required_features: features,
            required_limits: limits.clone(),
            // SAFETY: cooperative matrices are wgpu's "experimental" tier: their validation is
            // incomplete, so only kernels tested against the reference use them.
            experimental_features: if coop {
                unsafe { wgpu::ExperimentalFeatures::enabled() }
            } else {
                wgpu::ExperimentalFeatures::disabled()
            },
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .map_err(|e| Error::Device { adapter: info.name.clone(), detail: e.to_string() })?;
        let errors = Arc::new(Mutex::new(Vec::new()));
        let sink = errors.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            sink.lock().unwrap_or_else(PoisonError::into_inner).push(error_text(&e));
        }));
        let cooperative_matrix = if coop {
            adapter
                .cooperative_matrix_properties()
                .iter()
                .map(|p| format!("{}x{}x{} {:?}->{:?}", p.m_size, p.n_size, p.k_size, p.ab_type, p.cr_type))
                .collect()
        } else {
            Vec::new()
        };
        let coop = if coop && !std::env::var(COOP_ENV).is_ok_and(|v| v == "0") {
            pick_coop(&adapter, &info, features, &limits)
        } else {
            None
        };
        let caps = Caps {
            adapter: info.name.clone(),
            cpu_adapter: info.device_type == wgpu::DeviceType::Cpu,
            backend: format!("{:?}", info.backend),
            shader_f16: features.contains(wgpu::Features::SHADER_F16),
            subgroup: features.contains(wgpu::Features::SUBGROUP),
            subgroup_min_size: info.subgroup_min_size,
            subgroup_max_size: info.subgroup_max_size,
            cooperative_matrix,
            coop,
            max_storage_binding: limits.max_storage_buffer_binding_size,
            max_workgroup_memory: limits.max_compute_workgroup_storage_size,
            timestamps: features.contains(wgpu::Features::TIMESTAMP_QUERY),
        };
        Ok(Context { device, queue, caps, errors })
    }

    /// Bytes one storage binding (and so one weight chunk) may hold.
    pub fn max_binding_bytes(&self) -> u64 {
        let l = self.device.limits();
        l.max_storage_buffer_binding_size.min(l.max_buffer_size)
    }

    /// A storage buffer holding `bytes` (padded to whole 16-byte vectors, at least one: kernels
    /// read weights as `array<vec4<u32>>`).
    pub fn buffer_init(&self, mut bytes: Vec<u8>, usage: wgpu::BufferUsages) -> wgpu::Buffer {
        let len = bytes.len().div_ceil(16).max(1) * 16;
        bytes.resize(len, 0);
        use wgpu::util::DeviceExt;
        self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: None,
            contents: &bytes,
            usage,
        })
    }

    /// The errors wgpu reported since the last call, as one op error.
    pub fn take_errors(&self) -> fp4moe_ops::Result<()> {
        let mut errs = self.errors.lock().unwrap_or_else(PoisonError::into_inner);
        if errs.is_empty() {
            return Ok(());
        }
        let msg = errs.join("; ");
        errs.clear();
        Err(fp4moe_ops::Error::Device(msg))
    }
}
