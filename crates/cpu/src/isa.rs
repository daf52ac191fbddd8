//! Which instruction set the kernels use, chosen at run time.
//!
//! The binary is built for the baseline target (x86-64 without AVX, or aarch64 with NEON), so
//! SIMD kernels are `#[target_feature]` functions entered only after detection says the CPU has
//! them. Every kernel also has a portable version ([`Isa::Scalar`]) that tests force explicitly.

/// An instruction set a kernel family is written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Portable Rust (the compiler may still vectorize it for the baseline target).
    Scalar,
    /// x86-64 AVX2 + FMA (Haswell / Zen and later).
    Avx2,
    /// aarch64 Advanced SIMD (always present on aarch64).
    Neon,
}

impl Isa {
    /// The best instruction set this CPU supports.
    pub fn detect() -> Isa {
        *Isa::available().last().unwrap_or(&Isa::Scalar)
    }

    /// Every instruction set usable on this CPU, from the portable one up; tests run each.
    pub fn available() -> Vec<Isa> {
        let mut v = vec![Isa::Scalar];
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            v.push(Isa::Avx2);
        }
        #[cfg(target_arch = "aarch64")]
        if std::arch::is_aarch64_feature_detected!("neon") {
            v.push(Isa::Neon);
        }
        v
    }

    /// Whether this CPU can run `self` (a kernel must never be entered otherwise).
    pub fn is_available(self) -> bool {
        Isa::available().contains(&self)
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Neon => "neon",
        }
    }
}
