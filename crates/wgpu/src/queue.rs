//! The pending command encoder: ops record compute passes into it, and it is submitted only when
//! the host waits for results (or after [`SUBMIT_EVERY`] dispatches, which bounds the memory of
//! one command buffer), so a forward pass costs a handful of submits, not one per op.

use crate::kernels::Kernel;
use crate::{GpuBuf, WgpuBackend};
use fp4moe_ops::{Error, Result};
use std::sync::{Mutex, PoisonError};

/// Dispatches recorded before the encoder is submitted without waiting.
const SUBMIT_EVERY: usize = 2048;

/// Bytes reserved per dispatch in the params buffer: the largest params struct, rounded up to
/// the uniform offset alignment every adapter accepts (WebGPU's default limit is 256).
const PARAMS_STRIDE: usize = 256;

#[derive(Default)]
pub struct Pending(Mutex<State>);

/// The encoder being recorded, with the uniform params of its dispatches: they are gathered on
/// the host and written into one buffer just before submission (one buffer per submit rather
/// than one per dispatch).
#[derive(Default)]
struct State {
    enc: Option<wgpu::CommandEncoder>,
    params: Option<wgpu::Buffer>,
    staged: Vec<u8>,
    recorded: usize,
}

impl State {
    /// Takes the encoder for submission, writing the staged params first (queue writes are
    /// ordered before the command buffers submitted after them).
    fn take(&mut self, queue: &wgpu::Queue) -> Option<wgpu::CommandEncoder> {
        if let Some(p) = self.params.take()
            && !self.staged.is_empty()
        {
            queue.write_buffer(&p, 0, &self.staged);
        }
        self.staged.clear();
        self.recorded = 0;
        self.enc.take()
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
        if st.enc.is_none() {
            st.enc = Some(self.ctx.device.create_command_encoder(&Default::default()));
            st.params = Some(self.ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("params"),
                size: (SUBMIT_EVERY * PARAMS_STRIDE) as u64,
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }));
        }
        let offset = st.staged.len();
        st.staged.extend_from_slice(&bytes);
        st.staged.resize(offset + PARAMS_STRIDE, 0);
        let pbuf = st.params.as_ref().expect("created with the encoder");
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
        let bg = self.ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &k.layout,
            entries: &entries,
        });
        let enc = st.enc.as_mut().expect("created above");
        {
            let mut pass =
                enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes: None });
            pass.set_pipeline(&k.pipeline);
            pass.set_bind_group(0, &bg, &[]);
            pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
        }
        st.recorded += 1;
        if st.recorded >= SUBMIT_EVERY {
            let enc = st.take(&self.ctx.queue).expect("encoder was just used");
            drop(st);
            self.ctx.queue.submit([enc.finish()]);
        }
        Ok(())
    }

    /// Submits what is pending (without waiting) and returns wgpu's deferred errors.
    pub(crate) fn flush(&self) -> Result<()> {
        let enc = self.queue.0.lock().unwrap_or_else(PoisonError::into_inner).take(&self.ctx.queue);
        if let Some(enc) = enc {
            self.ctx.queue.submit([enc.finish()]);
        }
        self.ctx.take_errors()
    }

    pub(crate) fn wait(&self) -> Result<()> {
        self.flush()?;
        self.ctx
            .device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Device(format!("waiting for the GPU: {e}")))?;
        self.ctx.take_errors()
    }

    /// The first `bytes` of a buffer, after all recorded work.
    pub(crate) fn read_back(&self, src: &GpuBuf, bytes: u64) -> Result<Vec<u8>> {
        let size = bytes.div_ceil(4).max(1) * 4;
        let staging = self.ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("staging"),
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = self
            .queue
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take(&self.ctx.queue)
            .unwrap_or_else(|| self.ctx.device.create_command_encoder(&Default::default()));
        enc.copy_buffer_to_buffer(&src.buf, 0, &staging, 0, size);
        self.ctx.queue.submit([enc.finish()]);
        let (tx, rx) = std::sync::mpsc::channel();
        staging.slice(..).map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.ctx
            .device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Device(format!("waiting for the GPU: {e}")))?;
        self.ctx.take_errors()?;
        rx.recv()
            .map_err(|_| Error::Device("buffer map callback was dropped".into()))?
            .map_err(|e| Error::Device(format!("mapping a buffer for download: {e}")))?;
        let out = staging
            .slice(..)
            .get_mapped_range()
            .map_err(|e| Error::Device(format!("reading a mapped buffer: {e}")))?[..bytes as usize]
            .to_vec();
        staging.unmap();
        Ok(out)
    }
}
