//! Per-kernel device time from timestamp queries, on when [`crate::context::TIMESTAMPS_ENV`] is
//! set and the adapter offers them. Each dispatch then gets its own compute pass with a
//! timestamp at its start and end, and each submit waits for its times, so a timed run is
//! slower than a plain one; the per-kernel times themselves are the GPU's.

use fp4moe_ops::profile::OpStats;
use fp4moe_ops::{Error, Result};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

pub(crate) struct Timer {
    /// Two queries per dispatch of one segment.
    set: wgpu::QuerySet,
    resolve: wgpu::Buffer,
    read: wgpu::Buffer,
    /// Kernels of the segment being recorded, in dispatch order.
    names: Vec<String>,
    /// Kernels of the submitted segment whose times are not read yet.
    submitted: Vec<String>,
    period_ns: f64,
    pub stats: Arc<Mutex<OpStats>>,
}

impl Timer {
    pub fn new(device: &wgpu::Device, queue: &wgpu::Queue, dispatches: usize) -> Timer {
        let n = 2 * dispatches as u32;
        let bytes = u64::from(n) * 8;
        let buffer = |usage| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("timestamps"),
                size: bytes,
                usage,
                mapped_at_creation: false,
            })
        };
        Timer {
            set: device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("timestamps"),
                ty: wgpu::QueryType::Timestamp,
                count: n,
            }),
            resolve: buffer(wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC),
            read: buffer(wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST),
            names: Vec::new(),
            submitted: Vec::new(),
            period_ns: f64::from(queue.get_timestamp_period()),
            stats: Arc::default(),
        }
    }

    /// The timestamp writes of the next dispatch, a run of `name`.
    pub fn writes(&mut self, name: &str) -> wgpu::ComputePassTimestampWrites<'_> {
        let i = 2 * self.names.len() as u32;
        self.names.push(name.to_string());
        wgpu::ComputePassTimestampWrites {
            query_set: &self.set,
            beginning_of_pass_write_index: Some(i),
            end_of_pass_write_index: Some(i + 1),
        }
    }

    /// Records copying the segment's timestamps out, before its encoder is finished.
    pub fn resolve(&mut self, enc: &mut wgpu::CommandEncoder) {
        let n = 2 * self.names.len() as u32;
        if n > 0 {
            enc.resolve_query_set(&self.set, 0..n, &self.resolve, 0);
            enc.copy_buffer_to_buffer(&self.resolve, 0, &self.read, 0, u64::from(n) * 8);
        }
        self.submitted = std::mem::take(&mut self.names);
    }

    /// After the segment's submit: waits for it and adds its kernels' times to the stats.
    pub fn collect(&mut self, device: &wgpu::Device) -> Result<()> {
        if self.submitted.is_empty() {
            return Ok(());
        }
        let bytes = self.submitted.len() as u64 * 16;
        let slice = self.read.slice(..bytes);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Device(format!("waiting for timestamps: {e}")))?;
        rx.recv()
            .map_err(|_| Error::Device("timestamp map callback was dropped".into()))?
            .map_err(|e| Error::Device(format!("mapping timestamps: {e}")))?;
        {
            let data =
                slice.get_mapped_range().map_err(|e| Error::Device(format!("reading timestamps: {e}")))?;
            let ticks: Vec<u64> =
                data.chunks_exact(8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes"))).collect();
            let mut stats = self.stats.lock().unwrap_or_else(PoisonError::into_inner);
            for (name, t) in self.submitted.drain(..).zip(ticks.chunks_exact(2)) {
                let ns = t[1].saturating_sub(t[0]) as f64 * self.period_ns;
                let e = stats.by_op.entry(name).or_default();
                e.0 += 1;
                e.1 += Duration::from_nanos(ns as u64);
            }
        }
        self.read.unmap();
        Ok(())
    }
}
