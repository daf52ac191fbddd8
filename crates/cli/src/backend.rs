//! `--backend cpu|reference|cuda|wgpu|auto`: picks a backend and runs generic code on it.

use fp4moe_ops::Backend;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendKind {
    /// CUDA if an NVIDIA GPU is usable, else wgpu if a GPU adapter is found, else the CPU.
    Auto,
    /// The multithreaded SIMD CPU backend.
    Cpu,
    /// The plain reference twin (slow; for checking).
    Reference,
    /// NVIDIA GPUs through CUDA.
    Cuda,
    /// Metal / Vulkan / DX12 GPUs through wgpu.
    Wgpu,
}

/// Code to run on whichever backend was picked (Rust has no generic closures).
pub trait OnBackend {
    type Output;
    fn run<B: Backend + 'static>(self, backend: B) -> anyhow::Result<Self::Output>;
}

/// Build the backend `kind` names and run `job` on it. `Auto` says on stderr what it picked.
pub fn dispatch<J: OnBackend>(kind: BackendKind, job: J) -> anyhow::Result<J::Output> {
    match kind {
        BackendKind::Auto => {
            // A GPU first; a CPU-emulated wgpu adapter (lavapipe, WARP) is not one: the CPU
            // backend runs the same model far faster than Vulkan emulated on the same cores.
            match cuda() {
                Ok(b) => {
                    eprintln!("backend: cuda (auto): {}", b.device_name());
                    return job.run(b);
                }
                Err(e) => eprintln!("backend: cuda unavailable ({e}); falling back"),
            }
            match fp4moe_wgpu::WgpuBackend::new() {
                Ok(b) if !b.caps().cpu_adapter => {
                    eprintln!("backend: wgpu (auto): {}", b.name());
                    return job.run(b);
                }
                Ok(b) => eprintln!("backend: wgpu adapter {} is CPU-emulated; falling back", b.name()),
                Err(e) => eprintln!("backend: wgpu unavailable ({e}); falling back"),
            }
            eprintln!("backend: cpu (auto)");
            job.run(fp4moe_cpu::CpuBackend::new())
        }
        BackendKind::Cpu => job.run(fp4moe_cpu::CpuBackend::new()),
        BackendKind::Reference => job.run(fp4moe_ops::reference::RefBackend),
        BackendKind::Cuda => job.run(cuda()?),
        BackendKind::Wgpu => job.run(fp4moe_wgpu::WgpuBackend::new()?),
    }
}

/// The CUDA backend with every kernel file compiled now: NVRTC otherwise compiles each file on
/// its first use, which a server's first requests (or a run's first prefill) would wait for.
fn cuda() -> anyhow::Result<fp4moe_cuda::CudaBackend> {
    let b = fp4moe_cuda::CudaBackend::new()?;
    b.warm_up()?;
    Ok(b)
}
