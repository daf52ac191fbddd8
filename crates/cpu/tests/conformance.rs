//! The shared conformance suite, run on the CPU backend once per instruction set this machine
//! has (the portable fallback always; AVX2 or NEON where present), so every SIMD kernel and its
//! fallback are proven against the reference on the same cases.

use fp4moe_cpu::{CpuBackend, Isa};

/// The best instruction set (what `CpuBackend::new()` picks).
mod best {
    fp4moe_ops::conformance_tests!(Some(fp4moe_cpu::CpuBackend::new()), "cpu");
}

/// The portable fallback, forced.
mod scalar {
    fp4moe_ops::conformance_tests!(
        fp4moe_cpu::CpuBackend::with_isa(fp4moe_cpu::Isa::Scalar).ok(),
        "cpu (portable kernels)"
    );
}

#[test]
fn new_picks_the_best_available_isa() {
    assert_eq!(CpuBackend::new().isa(), Isa::detect());
    assert!(Isa::available().contains(&Isa::Scalar));
}
