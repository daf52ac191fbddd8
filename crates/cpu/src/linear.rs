//! `linear` drivers: split the output columns over threads and run the decode (GEMV) or the
//! prefill (panel GEMM) kernels on each part.

use crate::decode::{WRows, decode_row, permute_into, permute_rows, unpermute_into};
use crate::gemm::{OutMat, gemm_tile};
use crate::gemv::gemv;
use crate::isa::Isa;
use rayon::prelude::*;

/// Weight rows per decode work item: enough items for load balance on every thread, large
/// enough that scheduling costs nothing next to streaming the rows.
fn decode_chunk_rows(n: usize) -> usize {
    (n / (8 * rayon::current_num_threads().max(1))).clamp(16, 4096)
}

/// `y [m, N] = x [m, K] · Wᵀ` with every row of W decoded once (few rows).
pub(crate) fn decode(isa: Isa, w: &WRows, x: &[f32], m: usize) -> Vec<f32> {
    let (n, k) = (w.rows(), w.cols());
    let xp = permute_rows(isa, w.kind(), x, k);
    let xs: Vec<&[f32]> = xp.chunks_exact(k.max(1)).take(m).collect();
    // Computed as [N, m] so each work item owns a contiguous block, then transposed.
    let mut yt = vec![0.0f32; n * m];
    let ch = decode_chunk_rows(n);
    yt.par_chunks_mut(ch * m.max(1)).enumerate().for_each(|(i, out)| {
        let n0 = i * ch;
        gemv(isa, w, n0, (n0 + ch).min(n), &xs, out);
    });
    if m == 1 {
        return yt;
    }
    let mut y = vec![0.0f32; m * n];
    for (j, row) in yt.chunks_exact(m).enumerate() {
        for (r, v) in row.iter().enumerate() {
            y[r * n + j] = *v;
        }
    }
    y
}

/// `y [m, N] = x [m, K] · Wᵀ`, N tiles of `n_tile` weight rows decoded once into a panel each.
pub(crate) fn prefill(isa: Isa, w: &WRows, x: &[f32], m: usize, n_tile: usize) -> Vec<f32> {
    let (n, k) = (w.rows(), w.cols());
    let xp = permute_rows(isa, w.kind(), x, k);
    let a: Vec<&[f32]> = xp.chunks_exact(k.max(1)).take(m).collect();
    let mut y = vec![0.0f32; m * n];
    let out = OutMat { ptr: y.as_mut_ptr(), ld: n };
    let tiles = n.div_ceil(n_tile.max(1));
    (0..tiles).into_par_iter().for_each_init(Vec::new, |panel, t| {
        let n0 = t * n_tile;
        let nt = n_tile.min(n - n0);
        // SAFETY: `y` outlives the parallel loop; tile t writes only columns n0..n0+nt.
        unsafe { gemm_tile(isa, w, n0, nt, &a, out, panel) };
    });
    y
}

/// MLA's per-head products (see `Backend::head_linear`): x `[m, heads, kx]`, one work item per
/// head. Without transpose each head is a GEMV over its row block; with transpose the head's
/// rows are decoded once and accumulated, weighted by x, in the decode's element order.
pub(crate) fn head_linear(
    isa: Isa,
    w: &WRows,
    x: &[f32],
    m: usize,
    spec: fp4moe_ops::HeadLinear,
) -> Vec<f32> {
    let fp4moe_ops::HeadLinear { heads, rows_per_head, row_start, row_count, transpose } = spec;
    let k = w.cols();
    let (kx, ky) = if transpose { (row_count, k) } else { (k, row_count) };
    // Per head: [m, ky], gathered into [m, heads, ky] below.
    let per_head: Vec<Vec<f32>> = (0..heads)
        .into_par_iter()
        .map(|h| {
            let wh = w.sub(h * rows_per_head + row_start, row_count);
            let xh = |t: usize| &x[(t * heads + h) * kx..(t * heads + h + 1) * kx];
            let mut y = vec![0.0f32; m * ky];
            if transpose {
                let mut row = vec![0.0f32; k];
                let mut acc = vec![0.0f32; m * k];
                for r in 0..row_count {
                    decode_row(isa, &wh, r, 0, k, &mut row);
                    for t in 0..m {
                        let a = xh(t)[r];
                        for (o, v) in acc[t * k..(t + 1) * k].iter_mut().zip(&row) {
                            *o += v * a;
                        }
                    }
                }
                for t in 0..m {
                    unpermute_into(isa, wh.kind(), &acc[t * k..(t + 1) * k], &mut y[t * k..(t + 1) * k]);
                }
            } else {
                let mut xp = vec![0.0f32; m * k];
                for t in 0..m {
                    permute_into(isa, wh.kind(), xh(t), &mut xp[t * k..(t + 1) * k]);
                }
                let xs: Vec<&[f32]> = xp.chunks_exact(k.max(1)).collect();
                let mut yt = vec![0.0f32; row_count * m];
                gemv(isa, &wh, 0, row_count, &xs, &mut yt);
                for (j, col) in yt.chunks_exact(m.max(1)).enumerate() {
                    for (t, v) in col.iter().enumerate() {
                        y[t * ky + j] = *v;
                    }
                }
            }
            y
        })
        .collect();
    let mut out = vec![0.0f32; m * heads * ky];
    for (h, y) in per_head.iter().enumerate() {
        for t in 0..m {
            out[(t * heads + h) * ky..(t * heads + h + 1) * ky].copy_from_slice(&y[t * ky..(t + 1) * ky]);
        }
    }
    out
}
