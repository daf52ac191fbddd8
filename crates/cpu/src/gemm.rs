//! Prefill path: C += A · Wᵀ for many activation rows, one N tile of weight rows at a time.
//!
//! The tile's weights are decoded once per K block into an f32 panel `[n_tile, KC]` (in the
//! permuted element order of [`crate::decode`], which the activation rows share) that stays in
//! L2, and reused by every activation row. The microkernel works in dot form: an `MR x NR`
//! block of outputs keeps `MR * NR` vector accumulators over K, so neither operand needs a
//! transpose; with MR = 3, NR = 4 it issues 12 FMAs per 7 loads, all from L1. Loop order keeps
//! four panel rows in L1 while the tile's activation rows stream past from L2.

use crate::decode::{WRows, decode_row};
use crate::isa::Isa;

/// K block (elements): a multiple of the 64-element decode chunk, so blocks split no chunk.
pub(crate) const KC: usize = 512;
const _: () = assert!(KC.is_multiple_of(crate::decode::FP4_CHUNK));
/// Activation rows per microkernel call.
const MR: usize = 3;
/// Weight rows per microkernel call.
const NR: usize = 4;
/// Activation rows per block: `MC * KC` f32 stay in L2 next to the panel.
const MC: usize = 96;

/// An output matrix written by several threads, each into its own columns.
#[derive(Clone, Copy)]
pub(crate) struct OutMat {
    pub(crate) ptr: *mut f32,
    /// Row stride (elements).
    pub(crate) ld: usize,
}

// SAFETY: OutMat is a raw view that callers only write through at disjoint (row, column) cells
// (each tile owns its columns), which is what makes sharing it across threads sound.
unsafe impl Send for OutMat {}
unsafe impl Sync for OutMat {}

/// `C[i, n0 + j] += A[i] · W[n0 + j]` for `i < a.len()`, `j < nt`. `a[i]` are activation rows
/// permuted for `w` on `isa`; `panel` is scratch that grows to `nt * KC`.
///
/// # Safety
/// `c` must be valid for writes at rows `0..a.len()`, columns `n0..n0 + nt`, and no other
/// thread may access those cells during the call.
pub(crate) unsafe fn gemm_tile(
    isa: Isa,
    w: &WRows,
    n0: usize,
    nt: usize,
    a: &[&[f32]],
    c: OutMat,
    panel: &mut Vec<f32>,
) {
    let k = w.cols();
    if panel.len() < nt * KC {
        panel.resize(nt * KC, 0.0);
    }
    for k0 in (0..k).step_by(KC) {
        let k1 = (k0 + KC).min(k);
        let kc = k1 - k0;
        for j in 0..nt {
            decode_row(isa, w, n0 + j, k0, k1, &mut panel[j * KC..j * KC + kc]);
        }
        // Rows in blocks of MC, so the block's K slice stays in L2 while every group of NR
        // panel rows (in L1) passes over it.
        for m0 in (0..a.len()).step_by(MC) {
            let m1 = (m0 + MC).min(a.len());
            let mut j = 0;
            while j < nt {
                let nr = NR.min(nt - j);
                let cols: [&[f32]; NR] = std::array::from_fn(|q| {
                    let jj = (j + q).min(nt - 1);
                    &panel[jj * KC..jj * KC + kc]
                });
                let mut i = m0;
                while i < m1 {
                    let mr = MR.min(m1 - i);
                    let rows: [&[f32]; MR] = std::array::from_fn(|r| &a[(i + r).min(m1 - 1)][k0..k1]);
                    let mut acc = [[0.0f32; NR]; MR];
                    micro(isa, &rows, &cols, mr, nr, &mut acc);
                    for (r, accr) in acc.iter().enumerate().take(mr) {
                        for (q, v) in accr.iter().enumerate().take(nr) {
                            // SAFETY: the caller owns rows 0..a.len(), columns n0..n0+nt of c.
                            unsafe { *c.ptr.add((i + r) * c.ld + n0 + j + q) += v };
                        }
                    }
                    i += mr;
                }
                j += nr;
            }
        }
    }
}

/// `acc[r][q] = rows[r] · cols[q]` for `r < mr`, `q < nr` (the rest is computed on clamped
/// duplicates and ignored, which keeps one instantiation per ISA).
fn micro(
    isa: Isa,
    rows: &[&[f32]; MR],
    cols: &[&[f32]; NR],
    mr: usize,
    nr: usize,
    acc: &mut [[f32; NR]; MR],
) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            // SAFETY: Avx2 is only selected after runtime detection.
            unsafe {
                if mr == MR && nr == NR {
                    avx2::micro::<MR, NR>(rows, cols, acc)
                } else if nr == NR && mr == 2 {
                    // Rows left over (M not a multiple of MR): skip the duplicate row.
                    let mut a2 = [[0.0f32; NR]; 2];
                    avx2::micro::<2, NR>(&rows[..2], cols, &mut a2);
                    acc[..2].copy_from_slice(&a2);
                } else if nr == NR && mr == 1 {
                    let mut a1 = [[0.0f32; NR]; 1];
                    avx2::micro::<1, NR>(&rows[..1], cols, &mut a1);
                    acc[0] = a1[0];
                } else {
                    avx2::micro::<MR, NR>(rows, cols, acc)
                }
            }
        }
        _ => {
            // The portable kernel computes the clamped duplicates too (cheap, and one shape).
            let _ = (mr, nr);
            portable::<MR, NR>(rows, cols, acc)
        }
    }
}

/// Portable microkernel: eight partial sums per output so that the compiler vectorizes it
/// (NEON on aarch64, SSE2 on baseline x86-64) without reassociating a single sum.
fn portable<const M: usize, const N: usize>(rows: &[&[f32]; M], cols: &[&[f32]; N], acc: &mut [[f32; N]; M]) {
    let kc = rows[0].len();
    let whole = kc / 8 * 8;
    let mut lanes = [[[0.0f32; 8]; N]; M];
    for k in (0..whole).step_by(8) {
        for r in 0..M {
            let a = &rows[r][k..k + 8];
            for q in 0..N {
                let b = &cols[q][k..k + 8];
                for l in 0..8 {
                    lanes[r][q][l] += a[l] * b[l];
                }
            }
        }
    }
    for r in 0..M {
        for q in 0..N {
            let mut s = lanes[r][q].iter().sum::<f32>();
            for k in whole..kc {
                s += rows[r][k] * cols[q][k];
            }
            acc[r][q] = s;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use crate::gemv::avx2::hsum;
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX2 + FMA must be available; all rows and cols have the same length.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn micro<const M: usize, const N: usize>(
        rows: &[&[f32]],
        cols: &[&[f32]; N],
        acc: &mut [[f32; N]; M],
    ) {
        let kc = cols[0].len();
        debug_assert!(rows.iter().take(M).all(|r| r.len() == kc));
        let whole = kc / 8 * 8;
        let a: [*const f32; M] = std::array::from_fn(|r| rows[r].as_ptr());
        let b: [*const f32; N] = std::array::from_fn(|q| cols[q].as_ptr());
        let mut v = [[_mm256_setzero_ps(); N]; M];
        for k in (0..whole).step_by(8) {
            // SAFETY: k + 8 <= whole <= every length.
            unsafe {
                let av: [__m256; M] = std::array::from_fn(|r| _mm256_loadu_ps(a[r].add(k)));
                for q in 0..N {
                    let bv = _mm256_loadu_ps(b[q].add(k));
                    for r in 0..M {
                        v[r][q] = _mm256_fmadd_ps(av[r], bv, v[r][q]);
                    }
                }
            }
        }
        for r in 0..M {
            for q in 0..N {
                let mut s = hsum(v[r][q]);
                for k in whole..kc {
                    s += rows[r][k] * cols[q][k];
                }
                acc[r][q] = s;
            }
        }
    }
}
