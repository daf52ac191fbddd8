//! Direct checks of the CPU kernels against the reference twin, on every instruction set this
//! machine has and every path, on shapes that exercise the kernels' edges: K not a multiple of
//! the 64-element SIMD chunk (the natural-order tail), N not a multiple of the tile or of the
//! microkernel's 4 rows, M not a multiple of its 3 rows, and dense bf16 / f32 weights.

use fp4moe_cpu::{CpuBackend, Isa};
use fp4moe_ops::conformance::{Rng, WeightKind, random_weight, seed, tol_sum};
use fp4moe_ops::reference::RefBackend;
use fp4moe_ops::{Backend, HostTensor, LinearPath};

fn rel_err_rows(got: &[f32], want: &[f32], cols: usize) -> f32 {
    got.chunks(cols)
        .zip(want.chunks(cols))
        .map(|(g, w)| {
            let e: f32 = g.iter().zip(w).map(|(a, b)| (a - b) * (a - b)).sum::<f32>().sqrt();
            let n: f32 = w.iter().map(|a| a * a).sum::<f32>().sqrt();
            e / n.max(f32::MIN_POSITIVE)
        })
        .fold(0.0, f32::max)
}

#[test]
fn linear_paths_match_reference_on_edge_shapes() {
    let s = seed();
    let mut rng = Rng::new(s);
    let r = RefBackend;
    let cases: &[(WeightKind, usize, usize)] = &[
        (WeightKind::Mxfp4, 96, 37),
        (WeightKind::Nvfp4, 48, 70),
        (WeightKind::Nvfp4, 2048 + 16, 9),
        (WeightKind::Mxfp4, 1024 + 64 + 32, 133),
        (WeightKind::Bf16, 37, 19),
        (WeightKind::Bf16, 2048 + 8, 65),
        (WeightKind::F32, 70, 33),
    ];
    for &(kind, k, n) in cases {
        let host = random_weight(&mut rng, kind, n, k).unwrap();
        for m in [1, 2, 5, 33] {
            let x = rng.normals(m * k, 1.0);
            let want = {
                let w = r.upload_weight(&host).unwrap();
                let xt = r.upload(HostTensor::F32(&x, &[m, k])).unwrap();
                r.download(&r.linear(&xt, &w, LinearPath::Decode).unwrap()).unwrap().into_f32().unwrap()
            };
            for isa in Isa::available() {
                let b = CpuBackend::with_isa(isa).unwrap();
                let w = b.upload_weight(&host).unwrap();
                let xt = b.upload(HostTensor::F32(&x, &[m, k])).unwrap();
                for path in b.linear_paths().into_iter().chain([LinearPath::Auto]) {
                    let got = b.download(&b.linear(&xt, &w, path).unwrap()).unwrap().into_f32().unwrap();
                    let err = rel_err_rows(&got, &want, n);
                    // Rows of n >= 9 random terms: no cancellation-dominated single outputs.
                    assert!(
                        err <= tol_sum(k),
                        "{kind:?} {k}->{n} M={m} {isa:?} {path:?}: rel err {err:.2e} [seed {s}]"
                    );
                }
            }
        }
    }
}

#[test]
fn attention_matches_reference_with_history() {
    let s = seed();
    let mut rng = Rng::new(s);
    let r = RefBackend;
    let (t, pos0) = (5, 11);
    let len = pos0 + t;
    // GQA: 8 query heads over 2 kv heads, head dim 40 (not a multiple of 16), value dim 24.
    let (hq, hkv, d, dv) = (8, 2, 40, 24);
    let q = rng.normals(t * hq * d, 1.0);
    let k = rng.normals(len * hkv * d, 1.0);
    let v = rng.normals(len * hkv * dv, 1.0);
    // MLA: 3 heads, latent 36, rope 8.
    let (heads, l, rr) = (3, 36, 8);
    let ql = rng.normals(t * heads * l, 1.0);
    let qr = rng.normals(t * heads * rr, 1.0);
    let cache = rng.normals(len * (l + rr), 1.0);
    let run = |b: &dyn Fn() -> (Vec<f32>, Vec<f32>)| b();
    let want = run(&|| {
        let up = |x: &[f32], sh: &[usize]| r.upload(HostTensor::F32(x, sh)).unwrap();
        let g = r
            .attention_gqa(
                &up(&q, &[t, hq, d]),
                &up(&k, &[len, hkv, d]),
                &up(&v, &[len, hkv, dv]),
                pos0,
                0.15,
            )
            .unwrap();
        let m = r
            .attention_mla(
                &up(&ql, &[t, heads, l]),
                &up(&qr, &[t, heads, rr]),
                &up(&cache, &[len, l + rr]),
                pos0,
                0.1,
            )
            .unwrap();
        (r.download(&g).unwrap().into_f32().unwrap(), r.download(&m).unwrap().into_f32().unwrap())
    });
    for isa in Isa::available() {
        let b = CpuBackend::with_isa(isa).unwrap();
        let up = |x: &[f32], sh: &[usize]| b.upload(HostTensor::F32(x, sh)).unwrap();
        let g = b
            .attention_gqa(
                &up(&q, &[t, hq, d]),
                &up(&k, &[len, hkv, d]),
                &up(&v, &[len, hkv, dv]),
                pos0,
                0.15,
            )
            .unwrap();
        let m = b
            .attention_mla(
                &up(&ql, &[t, heads, l]),
                &up(&qr, &[t, heads, rr]),
                &up(&cache, &[len, l + rr]),
                pos0,
                0.1,
            )
            .unwrap();
        let g = b.download(&g).unwrap().into_f32().unwrap();
        let m = b.download(&m).unwrap().into_f32().unwrap();
        assert!(rel_err_rows(&g, &want.0, dv) <= tol_sum(len * d), "gqa {isa:?} [seed {s}]");
        assert!(rel_err_rows(&m, &want.1, l) <= tol_sum(len * (l + rr)), "mla {isa:?} [seed {s}]");
    }
}

#[test]
fn bad_tile_and_isa_are_errors_not_panics() {
    let b = CpuBackend::new();
    let mut rng = Rng::new(1);
    let w = b.upload_weight(&random_weight(&mut rng, WeightKind::Mxfp4, 4, 32).unwrap()).unwrap();
    let x = b.upload(HostTensor::F32(&[0.0; 32], &[1, 32])).unwrap();
    assert!(b.linear(&x, &w, LinearPath::Prefill { n_tile: 0 }).is_err());
    let x_bad = b.upload(HostTensor::F32(&[0.0; 31], &[1, 31])).unwrap();
    assert!(b.linear(&x_bad, &w, LinearPath::Decode).is_err());
    #[cfg(target_arch = "x86_64")]
    assert!(CpuBackend::with_isa(Isa::Neon).is_err());
}
