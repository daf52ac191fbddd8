//! The shared conformance suite on the CUDA backend: every op and every listed path against the
//! reference twin. Without a CUDA device each test prints `skipped: no CUDA device` and passes.

fp4moe_ops::conformance_tests!(fp4moe_cuda::CudaBackend::new().ok(), "CUDA device");

/// The same suite with one-row FP4 products on the SIMT row kernels (the default runs them on
/// the tensor cores), so both paths stay checked.
mod simt_decode {
    fp4moe_ops::conformance_tests!(
        fp4moe_cuda::CudaBackend::new().ok().map(|b| b.with_simt_decode()),
        "CUDA device"
    );
}

/// The same suite with every FP4 prefill GEMM on 64-row tiles (the suite's small shapes would
/// otherwise take the 32-row ones): on Hopper the wgmma kernels, the grouped MoE's included.
mod gemm_64_rows {
    fp4moe_ops::conformance_tests!(
        fp4moe_cuda::CudaBackend::new().ok().map(|b| b.with_gemm_block_rows(64)),
        "CUDA device"
    );
}

/// 64-row tiles on `mma.sync`: elsewhere than Hopper the only ones.
mod gemm_64_rows_mma {
    fp4moe_ops::conformance_tests!(
        fp4moe_cuda::CudaBackend::new().ok().map(|b| b.with_gemm_block_rows(64).with_mma_gemm()),
        "CUDA device"
    );
}

/// 128-row tiles (wgmma only; elsewhere they fall back to 64), the grouped MoE's included.
mod gemm_128_rows {
    fp4moe_ops::conformance_tests!(
        fp4moe_cuda::CudaBackend::new().ok().map(|b| b.with_gemm_block_rows(128).with_moe_on_wgmma(true)),
        "CUDA device"
    );
}

/// 256-row tiles (wgmma, dense linears with bf16 x only; the rest take 128), each step's
/// second wgmma covering rows 128 to 255.
mod gemm_256_rows {
    fp4moe_ops::conformance_tests!(
        fp4moe_cuda::CudaBackend::new().ok().map(|b| b.with_gemm_block_rows(256).with_moe_on_wgmma(true)),
        "CUDA device"
    );
}

/// One-row tensor-core products keeping one weight step ahead in registers (the default copies
/// every step of a warp ahead into shared memory).
mod unstaged_decode {
    fp4moe_ops::conformance_tests!(
        fp4moe_cuda::CudaBackend::new().ok().map(|b| b.with_unstaged_decode()),
        "CUDA device"
    );
}
