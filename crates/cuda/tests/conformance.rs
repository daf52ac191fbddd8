//! The shared conformance suite on the CUDA backend: every op and every listed path against the
//! reference twin. Without a CUDA device each test prints `skipped: no CUDA device` and passes.

fp4moe_ops::conformance_tests!(fp4moe_cuda::CudaBackend::new().ok(), "CUDA device");
