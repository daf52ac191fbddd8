//! The device: library probing, context and stream, run-time compilation of the `.cu` files,
//! buffers, and raw kernel launches.

use crate::CudaError;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, result, sys};
use cudarc::nvrtc::Ptx;
use std::collections::HashMap;
use std::ffi::{CStr, CString, c_void};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

/// Every kernel file, by name. Sources are embedded so the binary needs no files at run time.
pub const KERNEL_FILES: &[(&str, &str)] = &[
    ("elementwise.cu", include_str!("../kernels/elementwise.cu")),
    ("route.cu", include_str!("../kernels/route.cu")),
    ("attention.cu", include_str!("../kernels/attention.cu")),
    ("gemv.cu", include_str!("../kernels/gemv.cu")),
    ("gemm.cu", include_str!("../kernels/gemm.cu")),
    ("moe.cu", include_str!("../kernels/moe.cu")),
];

/// Headers the kernel files include. `fp4.cuh` comes from `fp4::codegen`, the one definition of
/// the E2M1 table, at run time (the same text as `crates/fp4/generated/fp4.cuh`).
fn headers() -> Vec<(&'static str, String)> {
    vec![("fp4.cuh", fp4::codegen::cuda()), ("common.cuh", include_str!("../kernels/common.cuh").to_string())]
}

/// True when the driver and NVRTC libraries can be loaded. cudarc panics on first use when a
/// library is missing, so nothing touches it before this says yes.
pub(crate) fn libraries_present() -> bool {
    std::panic::catch_unwind(|| unsafe {
        cudarc::driver::sys::is_culib_present() && cudarc::nvrtc::sys::is_culib_present()
    })
    .unwrap_or(false)
}

fn drv(e: impl std::fmt::Debug) -> CudaError {
    CudaError::Driver(format!("{e:?}"))
}

/// Compiled images per (device ordinal, arch, file), shared by every backend in the process so
/// that tests and benchmarks compile each file once.
type CubinCache = Mutex<HashMap<(usize, String, &'static str), Arc<Vec<u8>>>>;
fn cubin_cache() -> &'static CubinCache {
    static CACHE: OnceLock<CubinCache> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// NVRTC target for a compute capability: `sm_90a` on Hopper (the `a` unlocks wgmma/setmaxnreg),
/// plain `sm_XY` elsewhere.
pub fn arch_for(major: i32, minor: i32) -> String {
    if (major, minor) == (9, 0) { "sm_90a".into() } else { format!("sm_{major}{minor}") }
}

/// Compile one kernel file to a CUBIN for `arch`.
pub fn compile(file: &'static str, src: &str, arch: &str) -> Result<Vec<u8>, CudaError> {
    use cudarc::nvrtc::sys as nv;
    let hdrs = headers();
    let cerr = |what: &str, log: String| CudaError::Compile { file, log: format!("{what}: {log}") };
    let csrc = CString::new(src).map_err(|e| cerr("source", e.to_string()))?;
    let cname = CString::new(file).map_err(|e| cerr("name", e.to_string()))?;
    let hsrc: Vec<CString> = hdrs.iter().map(|(_, s)| CString::new(s.as_str()).unwrap_or_default()).collect();
    let hname: Vec<CString> = hdrs.iter().map(|(n, _)| CString::new(*n).unwrap_or_default()).collect();
    let hsrc_p: Vec<*const std::ffi::c_char> = hsrc.iter().map(|s| s.as_ptr()).collect();
    let hname_p: Vec<*const std::ffi::c_char> = hname.iter().map(|s| s.as_ptr()).collect();
    let opts: Vec<CString> = [format!("--gpu-architecture={arch}"), "-std=c++17".into(), "-lineinfo".into()]
        .into_iter()
        .map(|o| CString::new(o).unwrap_or_default())
        .collect();
    let opts_p: Vec<*const std::ffi::c_char> = opts.iter().map(|s| s.as_ptr()).collect();
    let check = |r: nv::nvrtcResult, what: &str| -> Result<(), CudaError> {
        if r == nv::nvrtcResult::NVRTC_SUCCESS { Ok(()) } else { Err(cerr(what, format!("{r:?}"))) }
    };
    // SAFETY: every pointer handed to NVRTC points into a CString or Vec alive for this call,
    // and the program is destroyed on every path below.
    unsafe {
        let mut prog: nv::nvrtcProgram = std::ptr::null_mut();
        check(
            nv::nvrtcCreateProgram(
                &mut prog,
                csrc.as_ptr(),
                cname.as_ptr(),
                hsrc_p.len() as i32,
                hsrc_p.as_ptr(),
                hname_p.as_ptr(),
            ),
            "nvrtcCreateProgram",
        )?;
        let r = nv::nvrtcCompileProgram(prog, opts_p.len() as i32, opts_p.as_ptr());
        let mut log_size = 0usize;
        nv::nvrtcGetProgramLogSize(prog, &mut log_size);
        let mut log = vec![0u8; log_size.max(1)];
        nv::nvrtcGetProgramLog(prog, log.as_mut_ptr() as *mut _);
        let log =
            CStr::from_bytes_until_nul(&log).map(|c| c.to_string_lossy().into_owned()).unwrap_or_default();
        if r != nv::nvrtcResult::NVRTC_SUCCESS {
            nv::nvrtcDestroyProgram(&mut prog);
            return Err(cerr(&format!("{r:?}"), log));
        }
        let mut size = 0usize;
        let r = nv::nvrtcGetCUBINSize(prog, &mut size);
        if r != nv::nvrtcResult::NVRTC_SUCCESS {
            nv::nvrtcDestroyProgram(&mut prog);
            return Err(cerr("nvrtcGetCUBINSize", format!("{r:?}")));
        }
        let mut cubin = vec![0u8; size];
        let r = nv::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut _);
        nv::nvrtcDestroyProgram(&mut prog);
        check(r, "nvrtcGetCUBIN")?;
        Ok(cubin)
    }
}

/// One GPU: context, the stream every op is enqueued on, and loaded kernels.
pub(crate) struct Device {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub name: String,
    pub arch: String,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    funcs: Mutex<HashMap<(&'static str, &'static str), CudaFunction>>,
    pool: Arc<Pool>,
}

/// Freed buffers by size class, handed out again instead of a driver allocation: a decode step
/// allocates about twenty buffers per layer, each of the same size every step, and a driver
/// allocate + free pair per op cost as much host time as the launch. Reuse is safe because every
/// op runs on the one stream: a buffer's next user is ordered after its last.
pub(crate) struct Pool {
    free: Mutex<HashMap<usize, Vec<CudaSlice<u8>>>>,
    cached: std::sync::atomic::AtomicUsize,
}

/// Most bytes the pool keeps; beyond this a freed buffer goes back to the driver.
const POOL_MAX_CACHED: usize = 4 << 30;

/// Size class of a request: powers of two up to 1 MiB, then multiples of 1 MiB (bounding the
/// waste at 2x for small buffers and 1 MiB for large ones).
fn size_class(bytes: usize) -> usize {
    const MIB: usize = 1 << 20;
    let b = bytes.max(256);
    if b <= MIB { b.next_power_of_two() } else { b.div_ceil(MIB) * MIB }
}

impl Pool {
    fn take(&self, class: usize) -> Option<CudaSlice<u8>> {
        let s = self.free.lock().unwrap_or_else(PoisonError::into_inner).get_mut(&class)?.pop()?;
        self.cached.fetch_sub(class, std::sync::atomic::Ordering::Relaxed);
        Some(s)
    }

    /// Frees every cached buffer (before a driver allocation is retried).
    fn trim(&self) {
        let freed = std::mem::take(&mut *self.free.lock().unwrap_or_else(PoisonError::into_inner));
        self.cached.store(0, std::sync::atomic::Ordering::Relaxed);
        drop(freed);
    }

    fn give(&self, class: usize, slice: CudaSlice<u8>) {
        use std::sync::atomic::Ordering::Relaxed;
        if self.cached.fetch_add(class, Relaxed) + class > POOL_MAX_CACHED {
            self.cached.fetch_sub(class, Relaxed);
            return; // dropped: freed by the driver
        }
        self.free.lock().unwrap_or_else(PoisonError::into_inner).entry(class).or_default().push(slice);
    }
}

impl Device {
    pub fn open(ordinal: usize) -> Result<Device, CudaError> {
        if !libraries_present() {
            return Err(CudaError::LibraryMissing);
        }
        let ctx = std::panic::catch_unwind(|| CudaContext::new(ordinal))
            .map_err(|_| CudaError::LibraryMissing)?
            .map_err(|e| CudaError::NoDevice(format!("{e:?}")))?;
        // One stream orders all work, so cudarc's cross-stream event tracking is pure overhead.
        // SAFETY: no other stream of this context exists yet.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let name = ctx.name().map_err(drv)?;
        let (major, minor) = ctx.compute_capability().map_err(drv)?;
        Ok(Device {
            ctx,
            stream,
            name,
            arch: arch_for(major, minor),
            modules: Mutex::new(HashMap::new()),
            funcs: Mutex::new(HashMap::new()),
            pool: Arc::new(Pool { free: Mutex::new(HashMap::new()), cached: 0.into() }),
        })
    }

    pub fn module(&self, file: &'static str) -> Result<Arc<CudaModule>, CudaError> {
        let mut mods = self.modules.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(m) = mods.get(file) {
            return Ok(m.clone());
        }
        let src = KERNEL_FILES
            .iter()
            .find(|(n, _)| *n == file)
            .map(|(_, s)| *s)
            .ok_or(CudaError::Compile { file, log: "unknown kernel file".into() })?;
        let key = (self.ctx.ordinal(), self.arch.clone(), file);
        let cached = cubin_cache().lock().unwrap_or_else(PoisonError::into_inner).get(&key).cloned();
        let cubin = match cached {
            Some(c) => c,
            None => {
                let c = Arc::new(compile(file, src, &self.arch)?);
                cubin_cache().lock().unwrap_or_else(PoisonError::into_inner).insert(key, c.clone());
                c
            }
        };
        let m = self.ctx.load_module(Ptx::from_binary(cubin.to_vec())).map_err(drv)?;
        mods.insert(file, m.clone());
        Ok(m)
    }

    /// A kernel by file and name; `smem` above 48 KiB is opted into once per function.
    pub fn func(&self, file: &'static str, name: &'static str, smem: u32) -> Result<CudaFunction, CudaError> {
        if let Some(f) = self.funcs.lock().unwrap_or_else(PoisonError::into_inner).get(&(file, name)) {
            return Ok(f.clone());
        }
        let f = self.module(file)?.load_function(name).map_err(drv)?;
        if smem > 48 * 1024 {
            // SAFETY: f is a valid function of a loaded module.
            unsafe {
                result::function::set_function_attribute(
                    f.cu_function(),
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    smem as i32,
                )
            }
            .map_err(drv)?;
        }
        self.funcs.lock().unwrap_or_else(PoisonError::into_inner).insert((file, name), f.clone());
        Ok(f)
    }

    /// Enqueue a kernel. Arguments are raw values ([`Arg`]), matching the kernel's parameters.
    pub fn launch(
        &self,
        f: &CudaFunction,
        grid: (u32, u32, u32),
        block: u32,
        smem: u32,
        args: &[Arg],
    ) -> Result<(), CudaError> {
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return Ok(());
        }
        let mut store: Vec<Vec<u8>> = args.iter().map(Arg::bytes).collect();
        let mut params: Vec<*mut c_void> = store.iter_mut().map(|b| b.as_mut_ptr() as *mut c_void).collect();
        self.ctx.bind_to_thread().map_err(drv)?;
        // SAFETY: each parameter points to bytes laid out as the kernel's parameter (checked by
        // the #[repr(C)] structs and the conformance suite), alive until the launch returns.
        unsafe {
            result::launch_kernel(
                f.cu_function(),
                grid,
                (block, 1, 1),
                smem,
                self.stream.cu_stream(),
                &mut params,
            )
        }
        .map_err(drv)
    }

    pub fn alloc(&self, bytes: usize) -> Result<Buf, CudaError> {
        let class = size_class(bytes);
        let s = match self.pool.take(class) {
            Some(s) => s,
            None => self.driver_alloc(class)?,
        };
        Ok(Buf::new(s, &self.stream, bytes, class, Some(self.pool.clone())))
    }

    pub fn alloc_zeros(&self, bytes: usize) -> Result<Buf, CudaError> {
        let b = self.alloc(bytes)?;
        self.memset(b.ptr, 0, size_class(bytes))?;
        Ok(b)
    }

    /// An allocation of exactly `bytes` that never enters the pool (weights: large, long-lived,
    /// freed only with the model).
    pub fn alloc_exact(&self, bytes: usize) -> Result<Buf, CudaError> {
        let s = self.driver_alloc(bytes.max(4))?;
        Ok(Buf::new(s, &self.stream, bytes, bytes.max(4), None))
    }

    /// A new driver allocation; when the device is out of memory, the pool's cached buffers are
    /// freed and the allocation tried once more, so caching never turns into an out-of-memory error.
    fn driver_alloc(&self, bytes: usize) -> Result<CudaSlice<u8>, CudaError> {
        // SAFETY (both calls): the contents are written by a kernel or a copy before any read.
        match unsafe { self.stream.alloc::<u8>(bytes) } {
            Ok(s) => Ok(s),
            Err(_) => {
                self.pool.trim();
                self.stream.synchronize().map_err(drv)?;
                unsafe { self.stream.alloc::<u8>(bytes) }.map_err(drv)
            }
        }
    }

    /// Host data into a pooled buffer (activations, ids, positions).
    pub fn upload(&self, data: &[u8]) -> Result<Buf, CudaError> {
        self.copy_in(self.alloc(data.len())?, data)
    }

    /// Host data into a buffer of its own (weights).
    pub fn upload_exact(&self, data: &[u8]) -> Result<Buf, CudaError> {
        self.copy_in(self.alloc_exact(data.len())?, data)
    }

    fn copy_in(&self, b: Buf, data: &[u8]) -> Result<Buf, CudaError> {
        if !data.is_empty() {
            self.ctx.bind_to_thread().map_err(drv)?;
            // SAFETY: b holds at least data.len() bytes; the copy is ordered on the stream and
            // the host slice outlives it because we synchronize before returning.
            unsafe { result::memcpy_htod_async(b.ptr, data, self.stream.cu_stream()) }.map_err(drv)?;
            self.stream.synchronize().map_err(drv)?;
        }
        Ok(b)
    }

    pub fn download(&self, b: &Buf, bytes: usize) -> Result<Vec<u8>, CudaError> {
        let mut out = vec![0u8; bytes];
        if bytes > 0 {
            self.ctx.bind_to_thread().map_err(drv)?;
            // SAFETY: b holds at least `bytes` bytes; we synchronize before reading `out`.
            unsafe { result::memcpy_dtoh_async(&mut out[..], b.ptr, self.stream.cu_stream()) }
                .map_err(drv)?;
        }
        self.stream.synchronize().map_err(drv)?;
        Ok(out)
    }

    pub fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<(), CudaError> {
        if bytes == 0 {
            return Ok(());
        }
        self.ctx.bind_to_thread().map_err(drv)?;
        // SAFETY: callers pass ranges inside live buffers.
        unsafe { result::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream()) }.map_err(drv)
    }

    pub fn memset(&self, dst: u64, value: u8, bytes: usize) -> Result<(), CudaError> {
        if bytes == 0 {
            return Ok(());
        }
        self.ctx.bind_to_thread().map_err(drv)?;
        // SAFETY: callers pass ranges inside live buffers.
        unsafe { result::memset_d8_async(dst, value, bytes, self.stream.cu_stream()) }.map_err(drv)
    }

    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.stream.synchronize().map_err(drv)
    }
}

/// A device allocation and its raw address (kernels take raw pointers). Dropping it returns the
/// memory to the device's pool (or to the driver, for weights).
pub struct Buf {
    slice: Option<CudaSlice<u8>>,
    pub ptr: u64,
    pub bytes: usize,
    class: usize,
    pool: Option<Arc<Pool>>,
}

impl Buf {
    fn new(
        slice: CudaSlice<u8>,
        stream: &CudaStream,
        bytes: usize,
        class: usize,
        pool: Option<Arc<Pool>>,
    ) -> Buf {
        let ptr = {
            let (p, _sync) = slice.device_ptr(stream);
            p
        };
        Buf { slice: Some(slice), ptr, bytes, class, pool }
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        if let (Some(pool), Some(slice)) = (&self.pool, self.slice.take()) {
            pool.give(self.class, slice);
        }
    }
}

impl std::fmt::Debug for Buf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Buf({:#x}, {} bytes)", self.ptr, self.bytes)
    }
}

/// A kernel argument by value.
pub enum Arg {
    Ptr(u64),
    I32(i32),
    F32(f32),
    Usize(u64),
    Raw(Vec<u8>),
}

impl Arg {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Arg::Ptr(p) | Arg::Usize(p) => p.to_le_bytes().to_vec(),
            Arg::I32(v) => v.to_le_bytes().to_vec(),
            Arg::F32(v) => v.to_le_bytes().to_vec(),
            Arg::Raw(b) => b.clone(),
        }
    }
}
