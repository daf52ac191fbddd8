//! Fast CPU backend (skeleton).

/// The CPU backend (filled in by the CPU kernels work).
#[derive(Debug, Default, Clone)]
pub struct CpuBackend;

impl CpuBackend {
    pub fn new() -> Self {
        CpuBackend
    }
}
