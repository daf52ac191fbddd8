//! The pending command encoder: ops record compute passes into it, and it is submitted only when
//! the host waits for results (or after [`SUBMIT_EVERY`] dispatches, which bounds the memory of
//! one command buffer and lets the GPU start while the host records), so a forward pass costs a
//! handful of submits, not one per op.
//!
//! Host cost per dispatch is what bounds a decode step on a fast GPU (hundreds of small
//! kernels), so nothing is created per dispatch once a loop is steady: buffers come from the
//! pool, uniform params go to per-segment buffers that are reused every step, and bind groups
//! are cached by (kernel, params slot, buffers).

use crate::kernels::Kernel;
use crate::timing::Timer;
use crate::{GpuBuf, WgpuBackend};
use fp4moe_ops::profile::OpStats;
use fp4moe_ops::{Error, Result};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

/// Most dispatches recorded before the encoder is submitted without waiting (the params buffer
/// and the timer's query set are sized for it): what a CPU adapter uses, whose submit runs the
/// work before returning.
pub(crate) const SUBMIT_EVERY: usize = 2048;

/// Dispatches per submit on a GPU, so the GPU starts on the first layers while the host
/// records the rest (Qwen3 decode on the H100: 52.7 tok/s with 2048, 74.9 with 128).
/// `FP4MOE_WGPU_SUBMIT_EVERY` overrides either.
const GPU_SUBMIT_EVERY: usize = 128;

/// Bytes reserved per dispatch in the params buffer: the largest params struct, rounded up to
/// the uniform offset alignment every adapter accepts (WebGPU's default limit is 256).
const PARAMS_STRIDE: usize = 256;

/// Largest download staged through the backend's kept mappable buffer (a decode step's logits
/// rows); larger ones (all of a prefill's logits) get a buffer of their own.
pub(crate) const STAGED_READ_MAX: u64 = 16 << 20;

/// Cached bind groups kept before the cache starts over (a steady decode step needs one per
/// dispatch).
const MAX_CACHED_BIND_GROUPS: usize = 16384;

pub struct Pending(Mutex<State>);

impl Pending {
    pub fn new(timer: Option<Timer>, cpu_adapter: bool) -> Pending {
        let default = if cpu_adapter { SUBMIT_EVERY } else { GPU_SUBMIT_EVERY };
        let submit_every = std::env::var("FP4MOE_WGPU_SUBMIT_EVERY")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .map_or(default, |n| n.clamp(1, SUBMIT_EVERY));
        Pending(Mutex::new(State { timer, submit_every, ..State::default() }))
    }

    /// The per-kernel times, when kernels are timed.
    pub fn kernel_stats(&self) -> Option<Arc<Mutex<OpStats>>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).timer.as_ref().map(|t| t.stats.clone())
    }
}

/// A bind group's identity: the kernel, the params slot (segment, offset, size) and the buffers
/// at each binding.
#[derive(PartialEq, Eq, Hash)]
struct BindKey {
    kernel: usize,
    params: (usize, usize, usize),
    binds: Vec<(u32, wgpu::Buffer)>,
}

/// The encoder being recorded, with the uniform params of its dispatches: they are gathered on
/// the host and written into the segment's params buffer just before submission.
#[derive(Default)]
struct State {
    /// The open compute pass of `enc` (dispatches go into one pass until a copy needs the
    /// encoder: wgpu's cost per pass is larger than per dispatch).
    pass: Option<wgpu::ComputePass<'static>>,
    enc: Option<wgpu::CommandEncoder>,
    /// One params buffer per segment (the dispatches between two submits) since the host last
    /// waited; reused by the same segment of the next step.
    params: Vec<wgpu::Buffer>,
    /// The segment being recorded.
    seg: usize,
    staged: Vec<u8>,
    recorded: usize,
    /// Dispatches per submit (at most [`SUBMIT_EVERY`]).
    submit_every: usize,
    binds: HashMap<BindKey, wgpu::BindGroup>,
    /// The pool generation the cached bind groups belong to.
    binds_gen: u64,
    /// Per-kernel device timing, when on.
    timer: Option<Timer>,
}

impl State {
    /// Takes the encoder for submission, writing the staged params first (queue writes are
    /// ordered before the command buffers submitted after them, and after those submitted
    /// before). `waiting`: the host waits next, so the following work starts at segment 0.
    fn take(&mut self, queue: &wgpu::Queue, waiting: bool) -> Option<wgpu::CommandEncoder> {
        if !self.staged.is_empty() {
            queue.write_buffer(&self.params[self.seg], 0, &self.staged);
        }
        self.pass = None;
        let mut enc = self.enc.take();
        if let Some(e) = enc.as_mut() {
            if let Some(t) = self.timer.as_mut() {
                t.resolve(e);
            }
            self.seg += 1;
        }
        if waiting {
            self.seg = 0;
        }
        self.staged.clear();
        self.recorded = 0;
        enc
    }

    /// The encoder, for commands outside a compute pass (ends the open pass).
    fn encoder(&mut self, device: &wgpu::Device) -> &mut wgpu::CommandEncoder {
        self.pass = None;
        self.enc.get_or_insert_with(|| device.create_command_encoder(&Default::default()))
    }

    fn pass(&mut self, device: &wgpu::Device) -> &mut wgpu::ComputePass<'static> {
        if self.pass.is_none() {
            let enc = self.enc.get_or_insert_with(|| device.create_command_encoder(&Default::default()));
            let pass =
                enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes: None });
            self.pass = Some(pass.forget_lifetime());
        }
        self.pass.as_mut().expect("opened above")
    }
}

impl WgpuBackend {
    /// Records one dispatch of `k` with `params` (a uniform struct of 32-bit fields at binding 0)
    /// and storage buffers at the given bindings.
    pub(crate) fn dispatch(
        &self,
        k: &std::sync::Arc<Kernel>,
        params: &[u32],
        binds: &[(u32, &wgpu::Buffer)],
        groups: [u32; 3],
    ) -> Result<()> {
        if groups.contains(&0) {
            return Ok(());
        }
        let mut bytes = crate::bytes_of_u32(params);
        // Uniform structs are sized in multiples of 16 bytes.
        bytes.resize(bytes.len().div_ceil(16).max(1) * 16, 0);
        if bytes.len() > PARAMS_STRIDE {
            return Err(Error::Device(format!("{} bytes of params exceed {PARAMS_STRIDE}", bytes.len())));
        }
        let mut st = self.queue.0.lock().unwrap_or_else(PoisonError::into_inner);
        let st = &mut *st;
        let device = &self.ctx.device;
        while st.params.len() <= st.seg {
            st.params.push(device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("params"),
                size: (SUBMIT_EVERY * PARAMS_STRIDE) as u64,
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }));
        }
        let offset = st.staged.len();
        st.staged.extend_from_slice(&bytes);
        st.staged.resize(offset + PARAMS_STRIDE, 0);
        let pool_gen = self.pool.generation();
        if pool_gen != st.binds_gen || st.binds.len() >= MAX_CACHED_BIND_GROUPS {
            st.binds.clear();
            st.binds_gen = pool_gen;
        }
        let key = BindKey {
            kernel: std::sync::Arc::as_ptr(k) as usize,
            params: (st.seg, offset, bytes.len()),
            binds: binds.iter().map(|&(b, buf)| (b, buf.clone())).collect(),
        };
        let pbuf = &st.params[st.seg];
        let bg = st.binds.entry(key).or_insert_with(|| {
            let mut entries = vec![wgpu::BindGroupEntry {
                binding: 0,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: pbuf,
                    offset: offset as u64,
                    size: std::num::NonZeroU64::new(bytes.len() as u64),
                }),
            }];
            entries.extend(
                binds
                    .iter()
                    .map(|(b, buf)| wgpu::BindGroupEntry { binding: *b, resource: buf.as_entire_binding() }),
            );
            device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: None,
                layout: &k.layout,
                entries: &entries,
            })
        });
        let bg = bg.clone();
        if let Some(t) = st.timer.as_mut() {
            // A pass of its own, timestamped at its start and end.
            st.pass = None;
            let enc = st.enc.get_or_insert_with(|| device.create_command_encoder(&Default::default()));
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: None,
                timestamp_writes: Some(t.writes(&k.name)),
            });
            pass.set_pipeline(&k.pipeline);
            pass.set_bind_group(0, &bg, &[]);
            pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
        } else {
            let pass = st.pass(device);
            pass.set_pipeline(&k.pipeline);
            pass.set_bind_group(0, &bg, &[]);
            pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
        }
        st.recorded += 1;
        if st.recorded >= st.submit_every {
            let enc = st.take(&self.ctx.queue, false).expect("encoder was just used");
            self.submit_encoder(st, enc)?;
        }
        Ok(())
    }

    /// Submits a taken encoder (collecting its kernel times when timed).
    fn submit_encoder(&self, st: &mut State, enc: wgpu::CommandEncoder) -> Result<()> {
        self.ctx.queue.submit([enc.finish()]);
        match st.timer.as_mut() {
            Some(t) => t.collect(&self.ctx.device),
            None => Ok(()),
        }
    }

    /// Per-kernel device times, when kernels are timed ([`crate::context::TIMESTAMPS_ENV`]).
    pub(crate) fn kernel_stats(&self) -> Option<Arc<Mutex<OpStats>>> {
        self.queue.kernel_stats()
    }

    /// Records a copy of `bytes` into `dst` (in order with the recorded dispatches: a pooled
    /// buffer may still be read by a dispatch recorded before it was freed).
    pub(crate) fn write_buffer(&self, dst: &GpuBuf, mut bytes: Vec<u8>) {
        bytes.resize(bytes.len().div_ceil(4).max(1) * 4, 0);
        let src = self.ctx.buffer_init(bytes, wgpu::BufferUsages::COPY_SRC);
        let mut st = self.queue.0.lock().unwrap_or_else(PoisonError::into_inner);
        st.encoder(&self.ctx.device).copy_buffer_to_buffer(&src, 0, dst, 0, src.size());
    }

    /// Records zeroing the whole of `dst`.
    pub(crate) fn clear(&self, dst: &GpuBuf) {
        let mut st = self.queue.0.lock().unwrap_or_else(PoisonError::into_inner);
        st.encoder(&self.ctx.device).clear_buffer(dst, 0, None);
    }

    /// Submits what is pending and returns wgpu's deferred errors; `waiting`: the host waits
    /// for the GPU next.
    fn submit(&self, waiting: bool) -> Result<()> {
        let mut st = self.queue.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(enc) = st.take(&self.ctx.queue, waiting) {
            self.submit_encoder(&mut st, enc)?;
        }
        self.ctx.take_errors()
    }

    /// Blocks until the GPU has run everything submitted, counting the time (`waited`).
    fn poll_wait(&self) -> Result<()> {
        let t0 = std::time::Instant::now();
        let r = self.ctx.device.poll(wgpu::PollType::wait_indefinitely());
        let ns = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.waited.fetch_add(ns, std::sync::atomic::Ordering::Relaxed);
        r.map(|_| ()).map_err(|e| Error::Device(format!("waiting for the GPU: {e}")))
    }

    pub(crate) fn wait(&self) -> Result<()> {
        self.submit(true)?;
        self.poll_wait()?;
        self.ctx.take_errors()
    }

    /// The first `bytes` of a buffer, after all recorded work, handed to `read` straight from
    /// the mapping (which converts them without another copy).
    pub(crate) fn read_back_with<R>(
        &self,
        src: &GpuBuf,
        bytes: u64,
        read: impl FnOnce(&[u8]) -> R,
    ) -> Result<R> {
        let size = bytes.div_ceil(4).max(1) * 4;
        let mut kept = self.staging.lock().unwrap_or_else(PoisonError::into_inner);
        let staged = size <= STAGED_READ_MAX;
        if staged && kept.as_ref().is_none_or(|b| b.size() < size) {
            *kept = None;
            *kept = Some(self.staging_buffer(size.next_power_of_two()));
        }
        let fresh;
        let staging = match kept.as_ref() {
            Some(b) if staged => b,
            _ => {
                fresh = self.staging_buffer(size);
                &fresh
            }
        };
        {
            let mut st = self.queue.0.lock().unwrap_or_else(PoisonError::into_inner);
            let mut enc = st
                .take(&self.ctx.queue, true)
                .unwrap_or_else(|| self.ctx.device.create_command_encoder(&Default::default()));
            enc.copy_buffer_to_buffer(&src.buf, 0, staging, 0, size);
            self.submit_encoder(&mut st, enc)?;
        }
        let slice = staging.slice(..size);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.poll_wait()?;
        self.ctx.take_errors()?;
        rx.recv()
            .map_err(|_| Error::Device("buffer map callback was dropped".into()))?
            .map_err(|e| Error::Device(format!("mapping a buffer for download: {e}")))?;
        let out = {
            let view = slice
                .get_mapped_range()
                .map_err(|e| Error::Device(format!("reading a mapped buffer: {e}")))?;
            read(&view[..bytes as usize])
        };
        staging.unmap();
        Ok(out)
    }

    fn staging_buffer(&self, size: u64) -> wgpu::Buffer {
        self.ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("staging"),
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    }
}
