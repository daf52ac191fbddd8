//! Reuse of device buffers. A decode step allocates the same few hundred activation buffers
//! every token; creating each anew costs the driver an allocation and wgpu a zero-fill and
//! state tracking at submit, which on a fast GPU is more than the kernel itself. Freed buffers
//! go back to a free list by size class and the next request of that class takes the most
//! recently freed one, so a steady decode loop binds the same buffers in the same order every
//! step (which also lets the bind-group cache in `queue.rs` hit).
//!
//! Reuse is safe without waiting for the GPU: all work goes through one queue in recording
//! order, and wgpu inserts the barriers between a buffer's last use and its next.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

/// Free bytes the pool keeps; buffers freed beyond it are released to the driver.
const MAX_FREE_BYTES: u64 = 1 << 30;

/// Buffers larger than this are never pooled (a KV cache, a long prefill's activations).
const MAX_POOLED_BYTES: u64 = 256 << 20;

/// Every pooled buffer has these usages, so any request of a size class can take any of them.
pub(crate) const USAGE: wgpu::BufferUsages =
    wgpu::BufferUsages::STORAGE.union(wgpu::BufferUsages::COPY_SRC).union(wgpu::BufferUsages::COPY_DST);

/// `bytes` rounded up to a size with at most three significant bits (at most 25 % slack), and
/// to at least 256 bytes.
pub(crate) fn size_class(bytes: u64) -> u64 {
    let b = bytes.max(256);
    let shift = (63 - b.leading_zeros()).saturating_sub(2);
    b.div_ceil(1 << shift) << shift
}

#[derive(Default)]
pub(crate) struct Pool {
    free: Mutex<Free>,
}

#[derive(Default)]
struct Free {
    by_class: HashMap<u64, Vec<wgpu::Buffer>>,
    bytes: u64,
    /// Bumped whenever a buffer leaves the pool's reach (released to the driver), so caches
    /// keyed by buffers know to drop what they hold.
    generation: u64,
}

impl Pool {
    /// A buffer of at least `bytes` (its size class when pooled). Its contents are whatever
    /// the last user left: callers that need zeros clear it.
    pub fn take(self: &Arc<Self>, device: &wgpu::Device, bytes: u64) -> crate::GpuBuf {
        let class = size_class(bytes);
        let pooled = class <= MAX_POOLED_BYTES;
        if pooled {
            let mut f = self.free.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(buf) = f.by_class.get_mut(&class).and_then(Vec::pop) {
                f.bytes -= class;
                return crate::GpuBuf { buf, pool: self.clone(), pooled };
            }
        }
        let buf = device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: if pooled { class } else { bytes.div_ceil(16).max(1) * 16 },
            usage: USAGE,
            mapped_at_creation: false,
        });
        crate::GpuBuf { buf, pool: self.clone(), pooled }
    }

    pub fn put(&self, buf: wgpu::Buffer) {
        let class = buf.size();
        let mut f = self.free.lock().unwrap_or_else(PoisonError::into_inner);
        if f.bytes + class > MAX_FREE_BYTES {
            f.generation += 1;
            return;
        }
        f.bytes += class;
        f.by_class.entry(class).or_default().push(buf);
    }

    /// Marks that a buffer outside the pool (a large tensor, a weight) was released.
    pub fn released(&self) {
        self.free.lock().unwrap_or_else(PoisonError::into_inner).generation += 1;
    }

    pub fn generation(&self) -> u64 {
        self.free.lock().unwrap_or_else(PoisonError::into_inner).generation
    }
}

/// Held by a device object outside the pool (a weight): marks its release when dropped.
pub(crate) struct Release(pub Arc<Pool>);

impl Drop for Release {
    fn drop(&mut self) {
        self.0.released();
    }
}

#[cfg(test)]
mod tests {
    use super::size_class;

    #[test]
    fn size_classes_cover_the_request_with_at_most_a_quarter_slack() {
        for bytes in (1..5000u64).chain([65536, 65537, 100_000, 1 << 20, (1 << 20) + 1, 123_456_789]) {
            let c = size_class(bytes);
            assert!(c >= bytes && c >= 256, "{bytes} -> {c}");
            assert!(bytes < 256 || c as f64 <= bytes as f64 * 1.25 + 1.0, "{bytes} -> {c}");
            assert_eq!(size_class(c), c, "a class is its own class");
            assert_eq!(c % 4, 0);
        }
    }
}
