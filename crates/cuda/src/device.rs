//! The device: library probing, context and stream, run-time compilation of the `.cu` files,
//! buffers, and raw kernel launches.

use crate::CudaError;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, PinnedHostSlice, result, sys,
};
use cudarc::nvrtc::Ptx;
use fp4moe_ops::profile::OpStats;
use std::collections::HashMap;
use std::ffi::{CStr, CString, OsString, c_void};
use std::path::{Path, PathBuf};
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
/// the E2M1 table, at run time (the same text as `crates/fp4/generated/fp4.cuh`); `sampling.cuh`
/// from `fp4moe_ops::sampling` (the same as `crates/ops/generated/sampling.cuh`).
fn headers() -> Vec<(&'static str, String)> {
    vec![
        ("fp4.cuh", fp4::codegen::cuda()),
        ("sampling.cuh", fp4moe_ops::sampling::cuda_header()),
        ("common.cuh", include_str!("../kernels/common.cuh").to_string()),
    ]
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

/// Compiled images per (device ordinal, arch, file, traced), shared by every backend in the
/// process so that tests and benchmarks compile each file once.
type CubinCache = Mutex<HashMap<(usize, String, &'static str, bool), Arc<Vec<u8>>>>;
fn cubin_cache() -> &'static CubinCache {
    static CACHE: OnceLock<CubinCache> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Compiled kernels are kept on disk between runs, so NVRTC runs once per kernel file, card
/// architecture and build rather than in every process (all files take about a minute of NVRTC
/// time on the 2-core development machine, paid before the first token). The directory: this variable (`off`: no cache),
/// else `$XDG_CACHE_HOME/fp4moe/cuda`, else `$HOME/.cache/fp4moe/cuda`.
pub const CACHE_ENV: &str = "FP4MOE_CUDA_CACHE";

/// The cache directory from the values of CACHE_ENV, XDG_CACHE_HOME and HOME (empty = unset).
fn disk_cache_dir(env: Option<OsString>, xdg: Option<OsString>, home: Option<OsString>) -> Option<PathBuf> {
    let set = |v: Option<OsString>| v.filter(|v| !v.is_empty());
    match set(env) {
        Some(v) if v == "off" => None,
        Some(v) => Some(v.into()),
        None => set(xdg)
            .map(|x| PathBuf::from(x).join("fp4moe/cuda"))
            .or_else(|| set(home).map(|h| PathBuf::from(h).join(".cache/fp4moe/cuda"))),
    }
}

/// The cache file of one compiled image: named by the kernel file and arch, with a hash of
/// everything that shapes the image (the source and the headers it includes, the options, the
/// NVRTC version, this crate's version). A hash of another Rust release only misses.
fn cache_file(dir: &Path, file: &str, arch: &str, traced: bool, src: &str) -> PathBuf {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    src.hash(&mut h);
    for (name, text) in headers() {
        (name, text).hash(&mut h);
    }
    (nvrtc_options(arch, traced), nvrtc_version(), env!("CARGO_PKG_VERSION")).hash(&mut h);
    let tag = if traced { "-traced" } else { "" };
    dir.join(format!("{}-{arch}{tag}-{:016x}.cubin", file.trim_end_matches(".cu"), h.finish()))
}

/// Compiles every kernel file for `arch` into the disk cache (the directory the runtime would
/// use), where it is not there yet; needs NVRTC but no GPU. Returns each image's path and whether
/// it was already cached. So a device's first process can skip NVRTC (a minute on an H100 host).
pub fn fill_disk_cache(arch: &str, traced: bool) -> Result<Vec<(PathBuf, bool)>, CudaError> {
    let env = |k| std::env::var_os(k);
    let dir = disk_cache_dir(env(CACHE_ENV), env("XDG_CACHE_HOME"), env("HOME")).ok_or_else(|| {
        CudaError::Compile { file: "", log: format!("no cache directory ({CACHE_ENV} is off)") }
    })?;
    KERNEL_FILES
        .iter()
        .map(|&(file, src)| {
            let path = cache_file(&dir, file, arch, traced, src);
            let (_, cached) = read_or_make(Some(&path), || compile(file, src, arch, traced))?;
            Ok((path, cached))
        })
        .collect()
}

fn nvrtc_version() -> (i32, i32) {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two valid out-pointers; only called once the library is known to load.
    unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    (major, minor)
}

/// The bytes of the file at `path` when it can be read, else `make()`'s, written there (through
/// a temporary name, so a reader never sees half a file; a failed write only loses the cache).
/// Also says whether the bytes came from the file.
fn read_or_make(
    path: Option<&Path>,
    make: impl FnOnce() -> Result<Vec<u8>, CudaError>,
) -> Result<(Vec<u8>, bool), CudaError> {
    if let Some(bytes) = path.and_then(|p| std::fs::read(p).ok()).filter(|b| !b.is_empty()) {
        return Ok((bytes, true));
    }
    let bytes = make()?;
    if let Some(p) = path {
        store(p, &bytes);
    }
    Ok((bytes, false))
}

fn store(path: &Path, bytes: &[u8]) {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp{}-{n}", std::process::id()));
    let written = path.parent().is_some_and(|d| std::fs::create_dir_all(d).is_ok())
        && std::fs::write(&tmp, bytes).is_ok()
        && std::fs::rename(&tmp, path).is_ok();
    if !written {
        let _ = std::fs::remove_file(&tmp);
        tracing::debug!("{CACHE_ENV}: could not write {}", path.display());
    }
}

/// NVRTC target for a compute capability: `sm_90a` on Hopper (the `a` unlocks wgmma/setmaxnreg),
/// plain `sm_XY` elsewhere.
pub fn arch_for(major: i32, minor: i32) -> String {
    if (major, minor) == (9, 0) { "sm_90a".into() } else { format!("sm_{major}{minor}") }
}

/// Set to 1, every replayed graph records when each of its kernels passed its wait (the
/// programmatic-launch wait, so when the kernels before it had finished), and
/// `Backend::kernel_stats` reports each kernel's share of the replay: the time from its own
/// instant to the next kernel's. Kernels are compiled with `FP4MOE_TRACE_CAP` defined
/// (kernels/common.cuh), so nothing of it exists in an ordinary run.
pub const TRACE_ENV: &str = "FP4MOE_CUDA_TRACE";

/// Entries a traced replay can record (kernels per graph; a Qwen3 decode step has ~780).
const TRACE_CAP: usize = 8192;

fn nvrtc_options(arch: &str, traced: bool) -> Vec<String> {
    let mut opts = vec![format!("--gpu-architecture={arch}"), "-std=c++17".into(), "-lineinfo".into()];
    if traced {
        opts.push(format!("-DFP4MOE_TRACE_CAP={TRACE_CAP}"));
    }
    opts
}

/// Compile one kernel file to a CUBIN for `arch`; `traced`: with the replay timeline's
/// instrumentation ([`TRACE_ENV`]).
pub fn compile(file: &'static str, src: &str, arch: &str, traced: bool) -> Result<Vec<u8>, CudaError> {
    use cudarc::nvrtc::sys as nv;
    let hdrs = headers();
    let cerr = |what: &str, log: String| CudaError::Compile { file, log: format!("{what}: {log}") };
    let csrc = CString::new(src).map_err(|e| cerr("source", e.to_string()))?;
    let cname = CString::new(file).map_err(|e| cerr("name", e.to_string()))?;
    let hsrc: Vec<CString> = hdrs.iter().map(|(_, s)| CString::new(s.as_str()).unwrap_or_default()).collect();
    let hname: Vec<CString> = hdrs.iter().map(|(n, _)| CString::new(*n).unwrap_or_default()).collect();
    let hsrc_p: Vec<*const std::ffi::c_char> = hsrc.iter().map(|s| s.as_ptr()).collect();
    let hname_p: Vec<*const std::ffi::c_char> = hname.iter().map(|s| s.as_ptr()).collect();
    let opts: Vec<CString> =
        nvrtc_options(arch, traced).into_iter().map(|o| CString::new(o).unwrap_or_default()).collect();
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

/// Largest download staged through page-locked memory (a decode step's logits rows); larger
/// ones (all of a prefill's logits) go to pageable memory rather than pin that much.
const STAGED_DOWNLOAD_MAX: usize = 16 << 20;

/// One GPU: context, the stream every op is enqueued on, and loaded kernels.
pub(crate) struct Device {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub name: String,
    pub arch: String,
    /// Multiprocessors, for grid-size choices.
    pub sms: usize,
    /// Launch with programmatic stream serialization (compute capability 9.0+, unless
    /// `FP4MOE_PDL=0`): each kernel may start while the previous one finishes, and waits for it
    /// with `pdl_wait` (kernels/common.cuh) before touching its results.
    pdl: bool,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    funcs: Mutex<HashMap<(&'static str, &'static str), LoadedFunc>>,
    pool: Arc<Pool>,
    /// Device u32 that kernels add to cache rows (`write_rows`' row0, attention's pos0): the
    /// zero buffer outside recording, the graph's own shift while recording (Backend::replay).
    row_shift: Mutex<u64>,
    zero_row_shift: OnceLock<Buf>,
    /// The replay timeline, when [`TRACE_ENV`] asks for it.
    trace: Option<Trace>,
    /// Kernels launched so far, and the launch count after the last cache row write
    /// (`Backend::write_rows`) with the (buffer, first row) of each cache it wrote: see
    /// [`Device::rows_settled`].
    launches: std::sync::atomic::AtomicU64,
    last_row_write: Mutex<(u64, Vec<(u64, usize)>)>,
    /// Page-locked memory that downloads of up to [`STAGED_DOWNLOAD_MAX`] bytes land in, grown
    /// to the largest so far. Into pageable memory the driver copies through bounce buffers of
    /// its own, and a fresh vector per download faults its pages in: for a decode step's logits
    /// row (600 KB, whenever a sampler needs all of it) this saved ~0.1 ms on the H100 machine.
    staging: Mutex<Option<PinnedHostSlice<u8>>>,
}

/// What a traced run keeps: the device buffer the kernels append to (`[count, instant...]`,
/// u64), kernel names by function handle, the launches of the graph being recorded, and the
/// per-kernel totals of every replay so far.
struct Trace {
    buf: Buf,
    names: Mutex<HashMap<usize, &'static str>>,
    recording: Mutex<Option<Vec<String>>>,
    stats: Arc<Mutex<OpStats>>,
    /// Replays whose entry count did not match the graph's kernels (reported once).
    mismatched: std::sync::atomic::AtomicBool,
}

/// A loaded kernel and the dynamic shared memory it is opted into.
type LoadedFunc = (CudaFunction, u32);

/// Freed buffers by size class, handed out again instead of a driver allocation: a decode step
/// allocates about twenty buffers per layer, each of the same size every step, and a driver
/// allocate + free pair per op cost as much host time as the launch. Reuse is safe because every
/// op runs on the one stream: a buffer's next user is ordered after its last.
pub(crate) struct Pool {
    free: Mutex<HashMap<usize, Vec<CudaSlice<u8>>>>,
    cached: std::sync::atomic::AtomicUsize,
    /// The arena of the graph being recorded, if any.
    recording: Mutex<Option<Arc<Arena>>>,
}

/// The buffers a recorded graph writes. A replay rewrites them, so none may go back to the pool
/// (and on to other work) while the graph lives: buffers allocated while recording belong to
/// the arena, return to it when dropped (reused only by the same recording, whose ops the graph
/// orders exactly as the stream did), and go back to the pool when the graph and every tensor
/// made while recording are gone.
pub(crate) struct Arena {
    free: Mutex<Vec<(usize, CudaSlice<u8>)>>,
    pool: Arc<Pool>,
}

impl Arena {
    fn take(&self, class: usize) -> Option<CudaSlice<u8>> {
        let mut free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
        let i = free.iter().position(|(c, _)| *c == class)?;
        Some(free.swap_remove(i).1)
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        for (class, slice) in std::mem::take(&mut *self.free.lock().unwrap_or_else(PoisonError::into_inner)) {
            self.pool.give(class, slice);
        }
    }
}

/// Where a buffer goes when dropped.
enum Home {
    Driver,
    Pool(Arc<Pool>),
    Arena(Arc<Arena>),
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
        // A created stream, not the legacy default one: only a created stream can be recorded
        // into a graph.
        let stream = ctx.new_stream().map_err(drv)?;
        let name = ctx.name().map_err(drv)?;
        let (major, minor) = ctx.compute_capability().map_err(drv)?;
        let sms = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(drv)?
            .max(1) as usize;
        let dev = Device {
            ctx,
            stream,
            name,
            arch: arch_for(major, minor),
            sms,
            pdl: major >= 9 && std::env::var_os("FP4MOE_PDL").is_none_or(|v| v != "0"),
            modules: Mutex::new(HashMap::new()),
            funcs: Mutex::new(HashMap::new()),
            pool: Arc::new(Pool {
                free: Mutex::new(HashMap::new()),
                cached: 0.into(),
                recording: Mutex::new(None),
            }),
            row_shift: Mutex::new(0),
            zero_row_shift: OnceLock::new(),
            trace: None,
            launches: 0.into(),
            last_row_write: Mutex::new((0, Vec::new())),
            staging: Mutex::new(None),
        };
        let zero = dev.alloc_exact(4)?;
        dev.set_u32(zero.ptr, 0)?;
        let _ = dev.zero_row_shift.set(zero);
        let traced = std::env::var_os(TRACE_ENV).is_some_and(|v| v == "1");
        let trace = if traced {
            let buf = dev.alloc_exact(8 * (1 + TRACE_CAP))?;
            dev.memset(buf.ptr, 0, buf.bytes)?;
            Some(Trace {
                buf,
                names: Mutex::default(),
                recording: Mutex::default(),
                stats: Arc::default(),
                mismatched: false.into(),
            })
        } else {
            None
        };
        Ok(Device { trace, ..dev })
    }

    /// The device u32 added to cache rows by the ops enqueued now (see `row_shift`).
    pub fn row_shift(&self) -> u64 {
        match *self.row_shift.lock().unwrap_or_else(PoisonError::into_inner) {
            0 => self.no_row_shift(),
            p => p,
        }
    }

    /// The zero row shift, for copies that are not cache writes.
    pub fn no_row_shift(&self) -> u64 {
        self.zero_row_shift.get().map_or(0, |z| z.ptr)
    }

    /// Points the row shift of the ops enqueued from now on at `ptr` (0: the zero buffer).
    pub fn set_row_shift(&self, ptr: u64) {
        *self.row_shift.lock().unwrap_or_else(PoisonError::into_inner) = ptr;
    }

    /// Enqueues `*ptr = v` (a memset: no host memory is involved).
    pub fn set_u32(&self, ptr: u64, v: u32) -> Result<(), CudaError> {
        self.ctx.bind_to_thread().map_err(drv)?;
        // SAFETY: callers pass a live device u32.
        let r = unsafe { sys::cuMemsetD32Async(ptr, v, 1, self.stream.cu_stream()) };
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(CudaError::Driver(format!("cuMemsetD32Async: {r:?}")));
        }
        Ok(())
    }

    /// Host data into an existing buffer (a graph's inputs).
    pub fn write(&self, b: &Buf, data: &[u8]) -> Result<(), CudaError> {
        if data.len() > b.bytes {
            return Err(CudaError::Driver(format!("write of {} bytes into {:?}", data.len(), b)));
        }
        self.copy_into(b.ptr, data)
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
        let traced = self.trace.is_some();
        let key = (self.ctx.ordinal(), self.arch.clone(), file, traced);
        let cached = cubin_cache().lock().unwrap_or_else(PoisonError::into_inner).get(&key).cloned();
        let load = |c: &[u8]| self.ctx.load_module(Ptx::from_binary(c.to_vec()));
        let (cubin, m) = match cached {
            Some(c) => {
                let m = load(&c).map_err(drv)?;
                (c, m)
            }
            None => {
                let env = |k| std::env::var_os(k);
                let path = disk_cache_dir(env(CACHE_ENV), env("XDG_CACHE_HOME"), env("HOME"))
                    .map(|d| cache_file(&d, file, &self.arch, traced, src));
                let (c, from_disk) =
                    read_or_make(path.as_deref(), || compile(file, src, &self.arch, traced))?;
                let (c, m) = match load(&c) {
                    Ok(m) => (c, m),
                    // A cached image the driver refuses (damaged on disk): compiled again.
                    Err(_) if from_disk => {
                        let c = compile(file, src, &self.arch, traced)?;
                        if let Some(p) = &path {
                            store(p, &c);
                        }
                        let m = load(&c).map_err(drv)?;
                        (c, m)
                    }
                    Err(e) => return Err(drv(e)),
                };
                (Arc::new(c), m)
            }
        };
        cubin_cache().lock().unwrap_or_else(PoisonError::into_inner).insert(key, cubin);
        if let Some(t) = &self.trace {
            let global = m.get_global("fp4moe_trace", &self.stream).map_err(drv)?;
            let (ptr, _sync) = global.device_ptr(&self.stream);
            self.copy_into(ptr, &t.buf.ptr.to_le_bytes())?;
        }
        mods.insert(file, m.clone());
        Ok(m)
    }

    /// A kernel by file and name; dynamic shared memory above 48 KiB is opted into per function,
    /// raised whenever a launch asks for more than any before it.
    pub fn func(&self, file: &'static str, name: &'static str, smem: u32) -> Result<CudaFunction, CudaError> {
        let mut funcs = self.funcs.lock().unwrap_or_else(PoisonError::into_inner);
        let (f, opted) = match funcs.get(&(file, name)) {
            Some(entry) => entry.clone(),
            None => {
                let f = self.module(file)?.load_function(name).map_err(drv)?;
                if let Some(t) = &self.trace {
                    t.names
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(f.cu_function() as usize, name);
                }
                (f, 48 * 1024)
            }
        };
        let opted = if smem > opted {
            // SAFETY: f is a valid function of a loaded module.
            unsafe {
                result::function::set_function_attribute(
                    f.cu_function(),
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    smem as i32,
                )
            }
            .map_err(drv)?;
            smem
        } else {
            opted
        };
        funcs.insert((file, name), (f.clone(), opted));
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
        if let Some(t) = &self.trace
            && let Some(log) = t.recording.lock().unwrap_or_else(PoisonError::into_inner).as_mut()
        {
            let names = t.names.lock().unwrap_or_else(PoisonError::into_inner);
            let name = names.get(&(f.cu_function() as usize)).copied().unwrap_or("?");
            log.push(format!("{name} {}x{}x{}", grid.0, grid.1, grid.2));
        }
        self.launches.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut store: Vec<Vec<u8>> = args.iter().map(Arg::bytes).collect();
        let mut params: Vec<*mut c_void> = store.iter_mut().map(|b| b.as_mut_ptr() as *mut c_void).collect();
        self.ctx.bind_to_thread().map_err(drv)?;
        if !self.pdl {
            // SAFETY: each parameter points to bytes laid out as the kernel's parameter (checked
            // by the #[repr(C)] structs and the conformance suite), alive until the launch returns.
            return unsafe {
                result::launch_kernel(
                    f.cu_function(),
                    grid,
                    (block, 1, 1),
                    smem,
                    self.stream.cu_stream(),
                    &mut params,
                )
            }
            .map_err(drv);
        }
        // SAFETY: an all-zero attribute is a valid "ignore" entry; the fields set below are the
        // documented ones for this attribute id.
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let cfg = sys::CUlaunchConfig {
            gridDimX: grid.0,
            gridDimY: grid.1,
            gridDimZ: grid.2,
            blockDimX: block,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: smem,
            hStream: self.stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: 1,
        };
        // SAFETY: as above for the parameters; `cfg` and `attr` outlive the call.
        unsafe { sys::cuLaunchKernelEx(&cfg, f.cu_function(), params.as_mut_ptr(), std::ptr::null_mut()) }
            .result()
            .map_err(drv)
    }

    pub fn alloc(&self, bytes: usize) -> Result<Buf, CudaError> {
        let class = size_class(bytes);
        let recording = self.pool.recording.lock().unwrap_or_else(PoisonError::into_inner).clone();
        if let Some(arena) = recording {
            // A driver allocation on a recording stream would itself be recorded (an allocation
            // node the graph owns); the step run before recording leaves the pool warm, so
            // needing one is reported and the caller runs the ops unrecorded.
            let s = arena.take(class).or_else(|| self.pool.take(class)).ok_or_else(|| {
                CudaError::Driver(format!("graph recording needs a new {class}-byte device buffer"))
            })?;
            return Ok(Buf::new(s, &self.stream, bytes, class, Home::Arena(arena)));
        }
        let s = match self.pool.take(class) {
            Some(s) => s,
            None => self.driver_alloc(class)?,
        };
        Ok(Buf::new(s, &self.stream, bytes, class, Home::Pool(self.pool.clone())))
    }

    /// Starts recording the stream's work into a graph; buffers allocated until
    /// [`Device::end_capture`] belong to the returned arena.
    pub fn begin_capture(&self) -> Result<Arc<Arena>, CudaError> {
        let arena = Arc::new(Arena { free: Mutex::new(Vec::new()), pool: self.pool.clone() });
        // Relaxed: this thread may still make driver calls that are not stream work (module
        // lookups); no other thread enqueues on this backend while it records (Backend::capture).
        self.stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED).map_err(drv)?;
        *self.pool.recording.lock().unwrap_or_else(PoisonError::into_inner) = Some(arena.clone());
        if let Some(t) = &self.trace {
            *t.recording.lock().unwrap_or_else(PoisonError::into_inner) = Some(Vec::new());
        }
        Ok(arena)
    }

    /// Stops recording and instantiates the graph (always ends the capture, also on error).
    pub fn end_capture(&self) -> Result<DeviceGraph, CudaError> {
        *self.pool.recording.lock().unwrap_or_else(PoisonError::into_inner) = None;
        let kernels = match &self.trace {
            Some(t) => t.recording.lock().unwrap_or_else(PoisonError::into_inner).take().unwrap_or_default(),
            None => Vec::new(),
        };
        let g = self.stream.end_capture(sys::CUgraphInstantiate_flags(0)).map_err(drv)?;
        g.map(|g| DeviceGraph(g, kernels))
            .ok_or_else(|| CudaError::Driver("graph recording produced no graph".into()))
    }

    pub fn launch_graph(&self, g: &DeviceGraph) -> Result<(), CudaError> {
        let Some(t) = &self.trace else {
            return g.0.launch().map_err(drv);
        };
        self.memset(t.buf.ptr, 0, 8)?;
        g.0.launch().map_err(drv)?;
        let raw = self.download(&t.buf, t.buf.bytes)?;
        let word = |i: usize| u64::from_le_bytes(raw[8 * i..8 * i + 8].try_into().unwrap_or_default());
        let count = word(0) as usize;
        if count != g.1.len() || count > TRACE_CAP {
            if !t.mismatched.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::warn!(
                    "{TRACE_ENV}: a replay recorded {count} kernel instants for {} kernels; its timeline is left out",
                    g.1.len()
                );
            }
            return Ok(());
        }
        // Kernel i's share: from its instant to the next kernel's (the last one has no end).
        let mut stats = t.stats.lock().unwrap_or_else(PoisonError::into_inner);
        for i in 0..count.saturating_sub(1) {
            let dt = word(2 + i).saturating_sub(word(1 + i));
            let e = stats.by_op.entry(g.1[i].clone()).or_default();
            e.0 += 1;
            e.1 += std::time::Duration::from_nanos(dt);
        }
        Ok(())
    }

    /// Records that the kernels just enqueued wrote rows `row0..` of each `(ptr, row0)` buffer
    /// (caches); listing one written by an earlier launch only makes the check stricter.
    pub fn note_row_writes(&self, writes: &[(u64, usize)]) {
        let n = self.launches.load(std::sync::atomic::Ordering::Relaxed);
        *self.last_row_write.lock().unwrap_or_else(PoisonError::into_inner) = (n, writes.to_vec());
    }

    /// Whether the rows below `row` of the buffers at `ptrs` may be read before a kernel's
    /// programmatic-launch wait: true unless the kernel just enqueued wrote some of them. A kernel
    /// starts only once the one before it has passed its own wait, so every kernel before that
    /// one has finished and its writes are visible; only the last one's may still be running.
    pub fn rows_settled(&self, ptrs: &[u64], row: usize) -> bool {
        let n = self.launches.load(std::sync::atomic::Ordering::Relaxed);
        let last = self.last_row_write.lock().unwrap_or_else(PoisonError::into_inner);
        !(last.0 == n && last.1.iter().any(|&(ptr, row0)| ptrs.contains(&ptr) && row0 < row))
    }

    /// Each kernel's share of the traced replays ([`TRACE_ENV`]), when tracing.
    pub fn trace_stats(&self) -> Option<Arc<Mutex<OpStats>>> {
        self.trace.as_ref().map(|t| t.stats.clone())
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
        Ok(Buf::new(s, &self.stream, bytes, bytes.max(4), Home::Driver))
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
        self.copy_into(b.ptr, data)?;
        Ok(b)
    }

    fn copy_into(&self, ptr: u64, data: &[u8]) -> Result<(), CudaError> {
        if !data.is_empty() {
            self.ctx.bind_to_thread().map_err(drv)?;
            // SAFETY: callers pass a buffer of at least data.len() bytes; the copy is ordered on
            // the stream and the host slice outlives it because we synchronize before returning.
            unsafe { result::memcpy_htod_async(ptr, data, self.stream.cu_stream()) }.map_err(drv)?;
            self.stream.synchronize().map_err(drv)?;
        }
        Ok(())
    }

    pub fn download(&self, b: &Buf, bytes: usize) -> Result<Vec<u8>, CudaError> {
        self.download_with(b, bytes, <[u8]>::to_vec)
    }

    /// The first `bytes` of `b`, after all enqueued work, handed to `read` (which converts them
    /// without another copy).
    pub fn download_with<R>(
        &self,
        b: &Buf,
        bytes: usize,
        read: impl FnOnce(&[u8]) -> R,
    ) -> Result<R, CudaError> {
        self.ctx.bind_to_thread().map_err(drv)?;
        if bytes == 0 || bytes > STAGED_DOWNLOAD_MAX {
            let mut out = vec![0u8; bytes];
            if bytes > 0 {
                // SAFETY: b holds at least `bytes` bytes; we synchronize before reading `out`.
                unsafe { result::memcpy_dtoh_async(&mut out[..], b.ptr, self.stream.cu_stream()) }
                    .map_err(drv)?;
            }
            self.stream.synchronize().map_err(drv)?;
            return Ok(read(&out));
        }
        let mut staging = self.staging.lock().unwrap_or_else(PoisonError::into_inner);
        if staging.as_ref().is_none_or(|s| s.len() < bytes) {
            *staging = None;
            // SAFETY: the memory is written by the copy below before it is read. Flags 0: plain
            // cached memory (write-combined memory is slow for the host to read).
            *staging = Some(
                unsafe { self.ctx.alloc_pinned_with_flags::<u8>(bytes.next_power_of_two(), 0) }
                    .map_err(drv)?,
            );
        }
        let host = staging.as_mut().expect("allocated above").as_mut_slice().map_err(drv)?;
        // SAFETY: b holds at least `bytes` bytes and `host` at least as many; we synchronize
        // before reading `host`, and the lock keeps other downloads out of it until then.
        unsafe { result::memcpy_dtoh_async(&mut host[..bytes], b.ptr, self.stream.cu_stream()) }
            .map_err(drv)?;
        self.stream.synchronize().map_err(drv)?;
        Ok(read(&host[..bytes]))
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
    home: Home,
}

impl Buf {
    fn new(slice: CudaSlice<u8>, stream: &CudaStream, bytes: usize, class: usize, home: Home) -> Buf {
        let ptr = {
            let (p, _sync) = slice.device_ptr(stream);
            p
        };
        Buf { slice: Some(slice), ptr, bytes, class, home }
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        let Some(slice) = self.slice.take() else { return };
        match &self.home {
            Home::Driver => drop(slice),
            Home::Pool(pool) => pool.give(self.class, slice),
            Home::Arena(arena) => {
                arena.free.lock().unwrap_or_else(PoisonError::into_inner).push((self.class, slice))
            }
        }
    }
}

impl std::fmt::Debug for Buf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Buf({:#x}, {} bytes)", self.ptr, self.bytes)
    }
}

/// An instantiated graph of recorded stream work, and its kernels in launch order ("name grid";
/// traced runs only).
pub(crate) struct DeviceGraph(cudarc::driver::CudaGraph, Vec<String>);

// SAFETY: the graph is only launched on the device's one stream, and the driver's graph calls are
// thread-safe; cudarc does not mark it Send/Sync because it holds raw driver handles.
unsafe impl Send for DeviceGraph {}
unsafe impl Sync for DeviceGraph {}

/// A kernel argument by value.
#[derive(Clone)]
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

/// A TMA descriptor (CUtensorMap, 128 bytes, passed to a kernel by value) for a 3D bf16 view
/// at `ptr`: `dims` elements per dimension (innermost first), `strides` the bytes between
/// consecutive indices of dimensions 1 and 2, boxes of `boxes` elements, read in the 128-byte
/// swizzle, out-of-range elements filled with zeros. Host-side only; needs the driver library.
pub fn tma_map_bf16_3d(
    ptr: u64,
    dims: [u64; 3],
    strides: [u64; 2],
    boxes: [u32; 3],
) -> Result<Vec<u8>, CudaError> {
    use sys::{
        CUtensorMapDataType, CUtensorMapFloatOOBfill, CUtensorMapInterleave, CUtensorMapL2promotion,
        CUtensorMapSwizzle,
    };
    // SAFETY: CUtensorMap is plain data (an aligned array of 16 u64); zero is a valid start.
    let mut map: sys::CUtensorMap = unsafe { std::mem::zeroed() };
    let elem = [1u32; 3];
    // SAFETY: every pointer points to a local array of the rank the call names (3 dims, 2
    // strides, 3 box sizes, 3 element strides), alive for the call; the driver only writes `map`.
    let r = unsafe {
        sys::cuTensorMapEncodeTiled(
            &mut map,
            CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
            3,
            ptr as *mut c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            elem.as_ptr(),
            CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
            CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    if r != sys::CUresult::CUDA_SUCCESS {
        return Err(CudaError::Driver(format!(
            "cuTensorMapEncodeTiled(dims {dims:?}, strides {strides:?}, box {boxes:?}): {r:?}"
        )));
    }
    // SAFETY: reading the initialized 128-byte descriptor as bytes.
    let bytes = unsafe {
        std::slice::from_raw_parts(
            &map as *const sys::CUtensorMap as *const u8,
            std::mem::size_of::<sys::CUtensorMap>(),
        )
    };
    Ok(bytes.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_dir_follows_the_variable_then_xdg_then_home() {
        let s = |v: &str| Some(OsString::from(v));
        assert_eq!(disk_cache_dir(s("/c"), s("/x"), s("/h")), Some(PathBuf::from("/c")));
        assert_eq!(disk_cache_dir(s("off"), s("/x"), s("/h")), None);
        assert_eq!(disk_cache_dir(None, s("/x"), s("/h")), Some(PathBuf::from("/x/fp4moe/cuda")));
        assert_eq!(disk_cache_dir(s(""), s(""), s("/h")), Some(PathBuf::from("/h/.cache/fp4moe/cuda")));
        assert_eq!(disk_cache_dir(None, None, None), None);
    }

    #[test]
    fn cached_images_are_made_once_then_read() {
        let dir = std::env::temp_dir().join(format!("fp4moe-cache-test-{}", std::process::id()));
        let path = dir.join("a").join("k.cubin");
        let made = std::cell::Cell::new(0);
        let make = || {
            made.set(made.get() + 1);
            Ok(vec![1u8, 2, 3])
        };
        assert_eq!(read_or_make(Some(&path), make).unwrap(), (vec![1, 2, 3], false));
        assert_eq!(read_or_make(Some(&path), make).unwrap(), (vec![1, 2, 3], true));
        assert_eq!(made.get(), 1, "the second call must read the file");
        // A failed compile is the caller's error and writes nothing.
        let other = dir.join("b.cubin");
        let failed = read_or_make(Some(&other), || Err(CudaError::Driver("no".into())));
        assert!(failed.is_err() && !other.exists());
        // Without a directory every call makes the image.
        assert_eq!(read_or_make(None, make).unwrap(), (vec![1, 2, 3], false));
        assert_eq!(made.get(), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
