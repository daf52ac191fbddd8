//! Mixture of experts.
//!
//! - Decode path ([`decode`]): every (token, slot) pair, and each token's shared expert, is a
//!   job; gate_up GEMV, SiLU·up, down GEMV, with the rows of all jobs split over threads.
//! - Prefill path ([`prefill`]): pairs are counted per expert, offsets are the prefix sum, and a
//!   stable permutation sorts pairs by expert, so each expert's rows are contiguous and every
//!   pair is computed exactly once — nothing assumes the tokens of a tile share an expert.
//!   Work items are (expert, N tile): the tile's weights are decoded once for all of the
//!   expert's rows (a panel GEMM, or for a handful of rows the fused GEMV that never leaves
//!   registers). Results land in per-pair rows, and the combine reads them back per token in slot
//!   order after the shared expert, so the sum is deterministic and needs no atomics.

use crate::decode::{WRows, permute_into, permute_rows};
use crate::gemm::{OutMat, gemm_tile};
use crate::gemv::{MAX_R, gemv};
use crate::isa::Isa;
use fp4moe_ops::reference::silu;
use rayon::prelude::*;

/// Experts with at most this many rows use the fused GEMV (one decode of the weights serves
/// them all); more rows amortize a panel decode.
pub(crate) const FUSED_MAX_ROWS: usize = MAX_R;

/// Weight rows per decode-path work item.
const DECODE_ROWS: usize = 128;

/// Checked sizes of one `moe` call (`fp4moe_ops::check::moe`).
pub(crate) use fp4moe_ops::check::Moe as Shape;

/// The kernels' view of an MoE block's weights.
pub(crate) struct Weights<'a> {
    /// `[E * 2I, H]`: per expert, I gate rows then I up rows.
    pub(crate) gate_up: WRows<'a>,
    /// `[E * H, I]`.
    pub(crate) down: WRows<'a>,
    /// Shared expert: gate_up `[2S, H]`, down `[H, S]`.
    pub(crate) shared: Option<(WRows<'a>, WRows<'a>)>,
}

/// One call's tokens: x `[n, H]`, their experts and router weights `[n, k]`, and whether x was
/// bf16 (`Backend::moe` then rounds the intermediate to bf16).
pub(crate) struct Inputs<'a> {
    pub(crate) x: &'a [f32],
    pub(crate) ids: &'a [u32],
    pub(crate) wts: &'a [f32],
    pub(crate) bf16_act: bool,
}

/// `silu(h[..i]) * h[i..]` for one row of gate/up outputs, rounded to bf16 where `bf16_act` (bf16
/// x, as `Backend::moe` says).
fn swiglu(h: &[f32], out: &mut [f32], bf16_act: bool) {
    let i = out.len();
    for (j, o) in out.iter_mut().enumerate() {
        *o = silu(h[j]) * h[i + j];
        if bf16_act {
            *o = half::bf16::from_f32(*o).to_f32();
        }
    }
}

/// One expert applied to one token in the decode path.
struct Job<'a> {
    token: usize,
    gate_up: WRows<'a>,
    down: WRows<'a>,
}

/// Runs `rows` row-ranges of every job's weight (`pick`) against that job's input row,
/// in parallel over (job, row chunk); returns each job's outputs.
fn jobs_gemv<'a, 'b>(
    isa: Isa,
    jobs: &[Job<'a>],
    pick: impl Fn(&Job<'a>) -> WRows<'a> + Sync,
    input: impl Fn(usize) -> &'b [f32] + Sync,
) -> Vec<Vec<f32>> {
    let items: Vec<(usize, usize)> = jobs
        .iter()
        .enumerate()
        .flat_map(|(j, job)| (0..pick(job).rows()).step_by(DECODE_ROWS).map(move |r0| (j, r0)))
        .collect();
    let parts: Vec<Vec<f32>> = items
        .par_iter()
        .map(|&(j, r0)| {
            let w = pick(&jobs[j]);
            let r1 = (r0 + DECODE_ROWS).min(w.rows());
            let mut out = vec![0.0f32; r1 - r0];
            gemv(isa, &w, r0, r1, &[input(j)], &mut out);
            out
        })
        .collect();
    let mut res: Vec<Vec<f32>> = jobs.iter().map(|job| Vec::with_capacity(pick(job).rows())).collect();
    for (&(j, _), p) in items.iter().zip(parts) {
        res[j].extend_from_slice(&p);
    }
    res
}

/// The decode path: each (token, slot) pair and each token's shared expert is a GEMV job.
pub(crate) fn decode(isa: Isa, s: &Shape, w: &Weights, inp: &Inputs) -> Vec<f32> {
    let Inputs { x, ids, wts, bf16_act } = *inp;
    let (n, h, k, inter) = (s.n, s.h, s.k, s.inter);
    let mut jobs = Vec::with_capacity(n * (k + 1));
    for t in 0..n {
        if let Some((g, d)) = w.shared {
            jobs.push(Job { token: t, gate_up: g, down: d });
        }
        for slot in 0..k {
            let e = ids[t * k + slot] as usize;
            jobs.push(Job {
                token: t,
                gate_up: w.gate_up.sub(e * 2 * inter, 2 * inter),
                down: w.down.sub(e * h, h),
            });
        }
    }
    // Activations permuted per weight kind (the shared expert may be stored differently).
    let xp_routed = permute_rows(isa, w.gate_up.kind(), x, h);
    let xp_shared = w.shared.map(|(g, _)| permute_rows(isa, g.kind(), x, h));
    let xin = |j: usize| -> &[f32] {
        let t = jobs[j].token;
        let is_shared = w.shared.is_some() && j.is_multiple_of(k + 1);
        let src = if is_shared { xp_shared.as_deref().unwrap_or(&xp_routed) } else { &xp_routed };
        &src[t * h..(t + 1) * h]
    };
    let hs = jobs_gemv(isa, &jobs, |j| j.gate_up, xin);
    let acts: Vec<Vec<f32>> = jobs
        .iter()
        .zip(&hs)
        .map(|(job, hv)| {
            let i = hv.len() / 2;
            let mut a = vec![0.0f32; i];
            swiglu(hv, &mut a, bf16_act);
            let mut ap = vec![0.0f32; i];
            permute_into(isa, job.down.kind(), &a, &mut ap);
            ap
        })
        .collect();
    let ys = jobs_gemv(isa, &jobs, |j| j.down, |j| &acts[j]);
    let mut out = vec![0.0f32; n * h];
    let per = k + usize::from(w.shared.is_some());
    for t in 0..n {
        let o = &mut out[t * h..(t + 1) * h];
        let mut j = t * per;
        if w.shared.is_some() {
            o.copy_from_slice(&ys[j]);
            j += 1;
        }
        for slot in 0..k {
            let wt = wts[t * k + slot];
            for (a, b) in o.iter_mut().zip(&ys[j + slot]) {
                *a += wt * b;
            }
        }
    }
    out
}

/// Pairs sorted by expert: `order[p]` is the pair (`token * k + slot`) at sorted position `p`;
/// expert e owns positions `offsets[e]..offsets[e + 1]`; `pos[pair]` inverts `order`.
pub(crate) struct Sorted {
    pub(crate) offsets: Vec<usize>,
    pub(crate) order: Vec<usize>,
    pub(crate) pos: Vec<usize>,
}

/// Counts -> offsets -> stable permutation (tokens keep their order within an expert).
pub(crate) fn sort_by_expert(ids: &[u32], n_experts: usize) -> Sorted {
    let mut offsets = vec![0usize; n_experts + 1];
    for &e in ids {
        offsets[e as usize + 1] += 1;
    }
    for e in 0..n_experts {
        offsets[e + 1] += offsets[e];
    }
    let mut cursor = offsets.clone();
    let mut order = vec![0usize; ids.len()];
    let mut pos = vec![0usize; ids.len()];
    for (pair, &e) in ids.iter().enumerate() {
        let p = cursor[e as usize];
        cursor[e as usize] += 1;
        order[p] = pair;
        pos[pair] = p;
    }
    Sorted { offsets, order, pos }
}

/// One group of rows against one weight: its rows of `a`, its weights, where its outputs go.
struct Group<'a> {
    a: Vec<&'a [f32]>,
    w: WRows<'a>,
    out: OutMat,
}

/// `out[i, :] = a[i] · Wᵀ` for every group, in parallel over (group, N tile). Groups write
/// disjoint rows; tiles disjoint columns. `fused_max_rows` picks the kernel per group size.
fn grouped_gemm(isa: Isa, groups: &[Group], n_tile: usize, fused_max_rows: usize) {
    let items: Vec<(usize, usize)> = groups
        .iter()
        .enumerate()
        .filter(|(_, g)| !g.a.is_empty())
        .flat_map(|(gi, g)| (0..g.w.rows()).step_by(n_tile).map(move |n0| (gi, n0)))
        .collect();
    items.par_iter().for_each_init(Vec::new, |panel, &(gi, n0)| {
        let g = &groups[gi];
        let nt = n_tile.min(g.w.rows() - n0);
        if g.a.len() <= fused_max_rows {
            let m = g.a.len();
            let mut tmp = vec![0.0f32; nt * m];
            gemv(isa, &g.w, n0, n0 + nt, &g.a, &mut tmp);
            for (j, row) in tmp.chunks_exact(m).enumerate() {
                for (i, v) in row.iter().enumerate() {
                    // SAFETY: this item alone writes columns n0..n0+nt of the group's rows.
                    unsafe { *g.out.ptr.add(i * g.out.ld + n0 + j) = *v };
                }
            }
        } else {
            // SAFETY: as above; the buffers behind `out` outlive this call.
            unsafe { gemm_tile(isa, &g.w, n0, nt, &g.a, g.out, panel) };
        }
    });
}

/// The prefill path (see the module overview).
pub(crate) fn prefill(isa: Isa, s: &Shape, w: &Weights, inp: &Inputs, n_tile: usize) -> Vec<f32> {
    prefill_with(isa, s, w, inp, n_tile, FUSED_MAX_ROWS)
}

/// [`prefill`] with the fused-GEMV row limit as a parameter, so tests can force either kernel.
pub(crate) fn prefill_with(
    isa: Isa,
    s: &Shape,
    w: &Weights,
    inp: &Inputs,
    n_tile: usize,
    fused_max_rows: usize,
) -> Vec<f32> {
    let Inputs { x, ids, wts, bf16_act } = *inp;
    let (n, h, k, inter) = (s.n, s.h, s.k, s.inter);
    let n_experts = w.gate_up.rows() / (2 * inter);
    let sorted = sort_by_expert(ids, n_experts);
    let pairs = n * k;

    // Stage 1: gate_up for every pair (rows sorted by expert) and for the shared expert.
    let xp = permute_rows(isa, w.gate_up.kind(), x, h);
    let mut hbuf = vec![0.0f32; pairs * 2 * inter];
    let xps = w.shared.map(|(g, _)| permute_rows(isa, g.kind(), x, h));
    let si = s.shared_inter.unwrap_or(0);
    let mut hs = vec![0.0f32; n * 2 * si];
    {
        let mut groups: Vec<Group> = (0..n_experts)
            .map(|e| {
                let (p0, p1) = (sorted.offsets[e], sorted.offsets[e + 1]);
                Group {
                    a: sorted.order[p0..p1]
                        .iter()
                        .map(|&pair| &xp[(pair / k) * h..(pair / k + 1) * h])
                        .collect(),
                    w: w.gate_up.sub(e * 2 * inter, 2 * inter),
                    // SAFETY (of later writes): rows p0..p1 of hbuf belong to this group only.
                    out: OutMat { ptr: hbuf[p0 * 2 * inter..].as_mut_ptr(), ld: 2 * inter },
                }
            })
            .collect();
        if let (Some((g, _)), Some(xps)) = (w.shared, xps.as_ref()) {
            groups.push(Group {
                a: xps.chunks_exact(h).collect(),
                w: g,
                out: OutMat { ptr: hs.as_mut_ptr(), ld: 2 * si },
            });
        }
        grouped_gemm(isa, &groups, n_tile, fused_max_rows);
    }

    // Stage 2: SiLU·up, permuted for the down weights.
    let down_kind = w.down.kind();
    let mut act = vec![0.0f32; pairs * inter];
    act.par_chunks_mut(inter.max(1)).zip(hbuf.par_chunks(2 * inter.max(1))).for_each_init(
        || vec![0.0f32; inter],
        |tmp, (a, hv)| {
            swiglu(hv, tmp, bf16_act);
            permute_into(isa, down_kind, tmp, a);
        },
    );
    drop(hbuf);
    let mut acts = vec![0.0f32; n * si];
    if let Some((_, d)) = w.shared {
        let dk = d.kind();
        acts.par_chunks_mut(si.max(1)).zip(hs.par_chunks(2 * si.max(1))).for_each_init(
            || vec![0.0f32; si],
            |tmp, (a, hv)| {
                swiglu(hv, tmp, bf16_act);
                permute_into(isa, dk, tmp, a);
            },
        );
    }

    // Stage 3: down for every pair and for the shared expert.
    let mut y = vec![0.0f32; pairs * h];
    let mut ys = vec![0.0f32; if w.shared.is_some() { n * h } else { 0 }];
    {
        let mut groups: Vec<Group> = (0..n_experts)
            .map(|e| {
                let (p0, p1) = (sorted.offsets[e], sorted.offsets[e + 1]);
                Group {
                    a: act[p0 * inter..p1 * inter].chunks_exact(inter.max(1)).collect(),
                    w: w.down.sub(e * h, h),
                    out: OutMat { ptr: y[p0 * h..].as_mut_ptr(), ld: h },
                }
            })
            .collect();
        if let Some((_, d)) = w.shared {
            groups.push(Group {
                a: acts.chunks_exact(si.max(1)).take(n).collect(),
                w: d,
                out: OutMat { ptr: ys.as_mut_ptr(), ld: h },
            });
        }
        grouped_gemm(isa, &groups, n_tile, fused_max_rows);
    }

    // Stage 4: per token, shared first, then slots in order.
    let mut out = vec![0.0f32; n * h];
    out.par_chunks_mut(h.max(1)).enumerate().for_each(|(t, o)| {
        if w.shared.is_some() {
            o.copy_from_slice(&ys[t * h..(t + 1) * h]);
        }
        for slot in 0..k {
            let p = sorted.pos[t * k + slot];
            let wt = wts[t * k + slot];
            for (a, b) in o.iter_mut().zip(&y[p * h..(p + 1) * h]) {
                *a += wt * b;
            }
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CpuBackend;
    use fp4moe_ops::conformance::{Rng, WeightKind, random_weight, tol_sum};
    use fp4moe_ops::reference::RefBackend;
    use fp4moe_ops::{Backend, HostTensor, MoePath, MoeWeights};

    /// Both prefill kernels (panel GEMM for every group, fused GEMV for every group) and the
    /// decode path, forced, on routings that stress the dispatch, against the reference.
    #[test]
    fn prefill_kernels_and_decode_match_reference() {
        let mut rng = Rng::new(fp4moe_ops::conformance::seed());
        let (h, inter, e) = (96, 64, 6);
        for kind in [WeightKind::Mxfp4, WeightKind::Nvfp4, WeightKind::Bf16] {
            for shared in [false, true] {
                for (n, k, route) in [(7, 2, "random"), (9, 1, "one"), (5, 4, "spread"), (3, 8, "dup")] {
                    let gu = random_weight(&mut rng, kind, e * 2 * inter, h).unwrap();
                    let dn = random_weight(&mut rng, kind, e * h, inter).unwrap();
                    let sg = random_weight(&mut rng, kind, 2 * inter, h).unwrap();
                    let sd = random_weight(&mut rng, kind, h, inter).unwrap();
                    let ids: Vec<u32> = (0..n * k)
                        .map(|p| match route {
                            "one" => 3,
                            "spread" => ((p / k) * k + p % k) as u32 % e as u32,
                            "dup" => (p % 3) as u32,
                            _ => rng.below(e - 1) as u32, // the last expert gets no tokens
                        })
                        .collect();
                    let wts: Vec<f32> = (0..n * k).map(|_| rng.range(0.1, 1.0)).collect();
                    let x = rng.normals(n * h, 1.0);
                    let r = RefBackend;
                    let want = {
                        let ex = MoeWeights {
                            gate_up: &gu,
                            down: &dn,
                            n_experts: e,
                            shared: shared.then_some((&sg, &sd)),
                        };
                        let t = |v: &[f32], s: &[usize]| r.upload(HostTensor::F32(v, s)).unwrap();
                        let ids_t = r.upload(HostTensor::U32(&ids, &[n, k])).unwrap();
                        let out =
                            r.moe(&t(&x, &[n, h]), &ids_t, &t(&wts, &[n, k]), ex, MoePath::Decode).unwrap();
                        r.download(&out).unwrap().into_f32().unwrap()
                    };
                    for isa in Isa::available() {
                        let b = CpuBackend::with_isa(isa).unwrap();
                        let up = |w: &fp4moe_ops::HostWeight| b.upload_weight(w).unwrap();
                        let (gu_c, dn_c, sg_c, sd_c) = (up(&gu), up(&dn), up(&sg), up(&sd));
                        let w = Weights {
                            gate_up: gu_c.rows(),
                            down: dn_c.rows(),
                            shared: shared.then(|| (sg_c.rows(), sd_c.rows())),
                        };
                        let s = Shape { n, h, k, inter, shared_inter: shared.then_some(inter) };
                        let inp = Inputs { x: &x, ids: &ids, wts: &wts, bf16_act: false };
                        let runs = [
                            ("decode", decode(isa, &s, &w, &inp)),
                            ("gemm32", prefill_with(isa, &s, &w, &inp, 32, 0)),
                            ("gemm64", prefill_with(isa, &s, &w, &inp, 64, 0)),
                            ("fused", prefill_with(isa, &s, &w, &inp, 32, usize::MAX)),
                        ];
                        for (name, got) in runs {
                            for t in 0..n {
                                let (g, wv) = (&got[t * h..(t + 1) * h], &want[t * h..(t + 1) * h]);
                                let err: f32 =
                                    g.iter().zip(wv).map(|(a, b)| (a - b) * (a - b)).sum::<f32>().sqrt();
                                let norm: f32 = wv.iter().map(|a| a * a).sum::<f32>().sqrt();
                                assert!(
                                    err <= 4.0 * tol_sum(h) * norm,
                                    "{kind:?} shared={shared} {route} {isa:?} {name} token {t}: {err} vs {norm}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn sort_counts_offsets_and_inverse() {
        let ids = [3u32, 1, 3, 0, 1, 3, 2, 2];
        let s = sort_by_expert(&ids, 5);
        assert_eq!(s.offsets, vec![0, 1, 3, 5, 8, 8]);
        // Each pair exactly once, grouped by expert, stable within an expert.
        let mut seen = s.order.clone();
        seen.sort();
        assert_eq!(seen, (0..ids.len()).collect::<Vec<_>>());
        for e in 0..5 {
            let grp = &s.order[s.offsets[e]..s.offsets[e + 1]];
            assert!(grp.iter().all(|&p| ids[p] as usize == e));
            assert!(grp.windows(2).all(|w| w[0] < w[1]));
        }
        for (pair, &p) in s.pos.iter().enumerate() {
            assert_eq!(s.order[p], pair);
        }
    }
}
