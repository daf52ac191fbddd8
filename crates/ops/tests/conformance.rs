//! Three kinds of tests of the reference and the suite:
//! 1. the conformance suite run on `RefBackend` itself (the suite's plumbing works end to end);
//! 2. hand-computed small cases per op, independent of the reference code, so the reference is
//!    shown to be right rather than merely self-consistent;
//! 3. mutation tests: a backend that delegates to the reference but carries one known bug must
//!    make the relevant check fail — the suite has teeth.

use fp4moe_ops::conformance::{self, Check};
use fp4moe_ops::reference::{HostBuf, HostStorage, HostT, RefBackend};
use fp4moe_ops::{
    Backend, DType, GroupedRouter, HeadLinear, HostData, HostTensor, HostWeight, LinearPath, MoePath,
    MoeWeights, Result, Rope, RopeStyle, T,
};

mod suite {
    fp4moe_ops::conformance_tests!(Some(fp4moe_ops::reference::RefBackend::new()), "reference");
}

// ---- helpers ----------------------------------------------------------------------------------------

fn t(v: &[f32], shape: &[usize]) -> HostT {
    RefBackend.upload(HostTensor::F32(v, shape)).unwrap()
}

fn tu(v: &[u32], shape: &[usize]) -> HostT {
    RefBackend.upload(HostTensor::U32(v, shape)).unwrap()
}

fn f(x: &HostT) -> Vec<f32> {
    RefBackend.download(x).unwrap().into_f32().unwrap()
}

fn u(x: &HostT) -> Vec<u32> {
    RefBackend.download(x).unwrap().into_u32().unwrap()
}

fn assert_close(got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "length: got {got:?}, want {want:?}");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g as f64 - w).abs() <= tol * w.abs().max(1.0),
            "element {i}: got {g}, want {w} (all: {got:?})"
        );
    }
}

fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// MXFP4 matrix [2, 32] built from codes by hand: row 0 holds code 1 (+0.5) at element 0 and
/// code 0xF (-6) at element 1 with block scale 2^0; row 1 holds code 2 (+1.0) at element 31 with
/// block scale 2^1. Everything else is code 0.
fn hand_mxfp4() -> HostWeight {
    let mut codes = vec![0u8; 32];
    codes[0] = 0x1 | (0xF << 4); // element 0 low nibble, element 1 high nibble
    codes[16 + 15] = 0x2 << 4; // row 1, byte 15, high nibble = element 31
    let scales = vec![127u8, 128];
    HostWeight::Quant(
        fp4::QuantMatrix::new(fp4::Format::Mxfp4, 2, 32, codes.into(), scales.into(), vec![1.0]).unwrap(),
    )
}

// ---- hand-computed cases ------------------------------------------------------------------------------

#[test]
fn linear_dense_by_hand() {
    let w = HostWeight::from_f32(3, 2, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let x = t(&[1.0, -1.0, 0.5, 2.0], &[2, 2]);
    let y = RefBackend.linear(&x, &w, LinearPath::Decode).unwrap();
    assert_eq!(y.shape(), [2, 3]);
    assert_eq!(f(&y), [-1.0, -1.0, -1.0, 4.5, 9.5, 14.5]);
    // bf16 activations: 1/3 rounds to 171/512 in bf16 (8 significant bits).
    let third = 171.0 / 512.0;
    let xb = RefBackend.cast(&t(&[1.0 / 3.0, 0.0], &[1, 2]), DType::BF16).unwrap();
    let y = RefBackend.linear(&xb, &w, LinearPath::Prefill { n_tile: 32 }).unwrap();
    assert_eq!(f(&y), [third, 3.0 * third, 5.0 * third]);
}

#[test]
fn fp4_nibble_order_and_subnormal_by_hand() {
    let w = hand_mxfp4();
    let mut x = vec![0.0f32; 32];
    x[0] = 2.0;
    x[1] = 1.0;
    x[31] = 3.0;
    let y = RefBackend.linear(&t(&x, &[1, 32]), &w, LinearPath::Auto).unwrap();
    // Row 0: 0.5 * 2 + (-6) * 1 = -5 (the subnormal code 1 is 0.5, not 0.25). Row 1: 1.0 * 2^1 * 3.
    assert_eq!(f(&y), [-5.0, 6.0]);
    let e = RefBackend.embedding(&w, &tu(&[1, 0], &[2])).unwrap();
    let v = f(&e);
    assert_eq!(e.shape(), [2, 32]);
    assert_eq!((v[31], v[32], v[33]), (2.0, 0.5, -6.0));
    assert!(v.iter().enumerate().all(|(i, &x)| [31, 32, 33].contains(&i) || x == 0.0));
}

#[test]
fn head_linear_by_hand() {
    // 2 heads x 2 rows: head 0 = I, head 1 = diag(2, 3); use row 1 of each head.
    let w = HostWeight::from_f32(4, 2, &[1.0, 0.0, 0.0, 1.0, 2.0, 0.0, 0.0, 3.0]);
    let spec = HeadLinear { heads: 2, rows_per_head: 2, row_start: 1, row_count: 1, transpose: false };
    let y = RefBackend.head_linear(&t(&[5.0, 6.0, 7.0, 8.0], &[1, 2, 2]), &w, spec).unwrap();
    assert_eq!(y.shape(), [1, 2, 1]);
    assert_eq!(f(&y), [6.0, 24.0]);
    let spec = HeadLinear { transpose: true, ..spec };
    let y = RefBackend.head_linear(&t(&[2.0, 3.0], &[1, 2, 1]), &w, spec).unwrap();
    assert_eq!(y.shape(), [1, 2, 2]);
    assert_eq!(f(&y), [0.0, 2.0, 0.0, 9.0]);
}

#[test]
fn top_k_indices_by_hand() {
    use fp4moe_ops::reference::top_k_indices;
    let nan = f32::NAN;
    // Ties to the lower index, -0 equal to +0, NaN below -inf.
    let row = [1.0, nan, 3.0, -0.0, 3.0, f32::NEG_INFINITY, 0.0];
    assert_eq!(top_k_indices(&row, 1), [2]);
    assert_eq!(top_k_indices(&row, 4), [2, 4, 0, 3]);
    assert_eq!(top_k_indices(&row, 7), [2, 4, 0, 3, 6, 1, 5]);
    assert_eq!(top_k_indices(&row, 9), [2, 4, 0, 3, 6, 1, 5]);
    assert!(top_k_indices(&row, 0).is_empty());
    // Only NaN and -inf: the lowest index, whichever it is.
    assert_eq!(top_k_indices(&[nan, f32::NEG_INFINITY, nan], 1), [0]);
    assert_eq!(top_k_indices(&[nan, f32::NEG_INFINITY, nan], 2), [0, 1]);
}

#[test]
fn rms_norm_by_hand() {
    let y = RefBackend.rms_norm(&t(&[3.0, 4.0], &[1, 2]), &t(&[1.0, 2.0], &[2]), 0.0).unwrap();
    let r = 12.5f64.sqrt();
    assert_close(&f(&y), &[3.0 / r, 8.0 / r], 1e-6);
}

#[test]
fn rope_by_hand_at_position_one() {
    // theta 10000, dims 4: inv_freq = [1, 10000^-0.5 = 0.01], so at position 1 the angles are 1 and 0.01.
    let (c1, s1, c2, s2) = (1f64.cos(), 1f64.sin(), 0.01f64.cos(), 0.01f64.sin());
    let x = [9.0, 1.0, 2.0, 3.0, 4.0, 9.0];
    let pos = tu(&[1], &[1]);
    let neox = Rope { style: RopeStyle::NeoX, offset: 1, dims: 4, theta: 10000.0 };
    let y = RefBackend.rope(&t(&x, &[1, 1, 6]), &pos, neox).unwrap();
    // NeoX pairs (1, 3) at angle 1 and (2, 4) at angle 0.01; dims 0 and 5 pass through.
    let want = [9.0, 1.0 * c1 - 3.0 * s1, 2.0 * c2 - 4.0 * s2, 3.0 * c1 + 1.0 * s1, 4.0 * c2 + 2.0 * s2, 9.0];
    assert_close(&f(&y), &want, 1e-6);
    let il = Rope { style: RopeStyle::Interleaved, ..neox };
    let y = RefBackend.rope(&t(&x, &[1, 1, 6]), &pos, il).unwrap();
    // Interleaved pairs (1, 2) at angle 1 and (3, 4) at angle 0.01.
    let want = [9.0, 1.0 * c1 - 2.0 * s1, 2.0 * c1 + 1.0 * s1, 3.0 * c2 - 4.0 * s2, 4.0 * c2 + 3.0 * s2, 9.0];
    assert_close(&f(&y), &want, 1e-6);
    // Position 0 is the identity.
    let y = RefBackend.rope(&t(&x, &[1, 1, 6]), &tu(&[0], &[1]), il).unwrap();
    assert_eq!(f(&y), x);
}

#[test]
fn rope_inv_freq_matches_the_formula() {
    let inv = fp4moe_ops::reference::rope_inv_freq(64, 1e6);
    assert_eq!(inv.len(), 32);
    for (i, &v) in inv.iter().enumerate() {
        let want = 1e6f64.powf(-(2.0 * i as f64) / 64.0);
        assert!((v as f64 - want).abs() <= 4.0 * f32::EPSILON as f64 * want, "i {i}: {v} vs {want}");
    }
}

#[test]
fn softmax_silu_add_by_hand() {
    let y = RefBackend.softmax(&t(&[0.0, 2f32.ln(), 4f32.ln(), 1000.0, 1000.0, 1000.0], &[2, 3])).unwrap();
    assert_close(&f(&y), &[1.0 / 7.0, 2.0 / 7.0, 4.0 / 7.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0], 1e-6);
    let y = RefBackend.silu_mul(&t(&[0.0, 1.0, 2.0, 3.0], &[1, 4])).unwrap();
    assert_eq!(y.shape(), [1, 2]);
    assert_close(&f(&y), &[0.0, silu(1.0) * 3.0], 1e-6);
    let y = RefBackend.add(&t(&[1.0, 2.0], &[2]), &t(&[0.5, -2.0], &[2])).unwrap();
    assert_eq!(f(&y), [1.5, 0.0]);
}

#[test]
fn cast_rounds_to_nearest_even() {
    let one = 1.0f32.to_bits();
    let x = [f32::from_bits(one + 0x8000), f32::from_bits(one + 0x18000), -0.0, f32::MAX];
    let y = RefBackend.cast(&t(&x, &[4]), DType::BF16).unwrap();
    assert_eq!(y.dtype(), DType::BF16);
    let v = f(&y);
    // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: even mantissa (1.0) wins; 1 + 3*2^-8 is halfway
    // between mantissas 1 and 2 (x 2^-7): 2 wins. f32::MAX is above bf16's largest finite value
    // by more than half an ulp, so it rounds to infinity.
    assert_eq!(v[..2], [1.0, 1.0 + 2.0 / 128.0]);
    assert!(v[2] == 0.0 && v[2].is_sign_negative());
    assert_eq!(v[3], f32::INFINITY);
}

#[test]
fn data_movement_by_hand() {
    let x = t(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0], &[2, 3]);
    assert_eq!(f(&RefBackend.slice_cols(&x, 1, 2).unwrap()), [1.0, 2.0, 4.0, 5.0]);
    assert_eq!(f(&RefBackend.slice_rows(&x, 1, 1).unwrap()), [3.0, 4.0, 5.0]);
    let c = RefBackend.concat_rows(&[&x, &t(&[7.0, 8.0, 9.0], &[1, 3])]).unwrap();
    assert_eq!(c.shape(), [3, 3]);
    assert_eq!(f(&c)[6..], [7.0, 8.0, 9.0]);
    let d = RefBackend.zeros(&[3, 2, 2], DType::F32).unwrap();
    // dst [3, 2, 2] is viewed [6, 2]: row 4 is elements 8 and 9.
    RefBackend.write_rows(&d, &t(&[1.0, 2.0], &[1, 2]), 4, 0).unwrap();
    assert_eq!(f(&d), [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 2.0, 0.0, 0.0]);
    let d = RefBackend.zeros(&[2, 3], DType::F32).unwrap();
    RefBackend.write_rows(&d, &t(&[7.0], &[1, 1]), 1, 2).unwrap();
    assert_eq!(f(&d), [0.0, 0.0, 0.0, 0.0, 0.0, 7.0]);
}

#[test]
fn route_softmax_by_hand() {
    let l = t(&[0.0, 2f32.ln(), 4f32.ln(), 1.0, 1.0, 1.0], &[2, 3]);
    let (ids, w) = RefBackend.route_softmax(&l, 2, true).unwrap();
    // Row 0: probs 1/7, 2/7, 4/7 -> ids [2, 1], renormalised 2/3, 1/3. Row 1: ties -> lower ids.
    assert_eq!(u(&ids), [2, 1, 0, 1]);
    assert_close(&f(&w), &[2.0 / 3.0, 1.0 / 3.0, 0.5, 0.5], 1e-6);
    let (_, w) = RefBackend.route_softmax(&l, 2, false).unwrap();
    assert_close(&f(&w), &[4.0 / 7.0, 2.0 / 7.0, 1.0 / 3.0, 1.0 / 3.0], 1e-6);
}

#[test]
fn grouped_router_bias_selects_but_weights_are_unbiased() {
    let logits = [2.0f32, -1.0, 1.0, 0.5];
    let s: Vec<f64> = logits.iter().map(|&x| sigmoid(x as f64)).collect();
    let l = t(&logits, &[1, 4]);
    let one = GroupedRouter { k: 1, n_group: 1, topk_group: 1, renormalize: false, scale: 1.8 };
    // Without bias expert 0 has the best score (0.881).
    let (ids, _) = RefBackend.route_sigmoid_grouped(&l, &t(&[0.0; 4], &[4]), one).unwrap();
    assert_eq!(u(&ids), [0]);
    // +0.3 on expert 2 (0.731 -> 1.031) makes it win; its weight is its *unbiased* score x 1.8.
    let bias = t(&[0.0, 0.0, 0.3, 0.0], &[4]);
    let (ids, w) = RefBackend.route_sigmoid_grouped(&l, &bias, one).unwrap();
    assert_eq!(u(&ids), [2]);
    assert_close(&f(&w), &[s[2] * 1.8], 1e-6);
    // Two groups {0, 1} and {2, 3}: scores 0.881 + 0.269 = 1.150 and 1.031 + 0.622 = 1.654, so
    // group 1 is kept and expert 0 — better than expert 3 — is not a candidate.
    let grouped = GroupedRouter { k: 2, n_group: 2, topk_group: 1, renormalize: true, scale: 1.8 };
    let (ids, w) = RefBackend.route_sigmoid_grouped(&l, &bias, grouped).unwrap();
    assert_eq!(u(&ids), [2, 3]);
    let sum = s[2] + s[3];
    assert_close(&f(&w), &[s[2] / sum * 1.8, s[3] / sum * 1.8], 1e-6);
}

#[test]
fn moe_by_hand() {
    // H 2, I 1, 2 experts. Expert 0: gate [1, 0], up [0, 1], down [1, 2]ᵀ.
    // Expert 1: gate [0, 1], up [1, 1], down [-1, 1]ᵀ. Shared: gate [1, 1], up [1, 0], down [0, 1]ᵀ.
    let gate_up = HostWeight::from_f32(4, 2, &[1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0]);
    let down = HostWeight::from_f32(4, 1, &[1.0, 2.0, -1.0, 1.0]);
    let sgu = HostWeight::from_f32(2, 2, &[1.0, 1.0, 1.0, 0.0]);
    let sdn = HostWeight::from_f32(2, 1, &[0.0, 1.0]);
    let x = t(&[1.0, 2.0, 0.0, 3.0], &[2, 2]);
    let ids = tu(&[1, 0, 0, 1], &[2, 2]);
    let wts = t(&[0.75, 0.25, 1.0, 0.5], &[2, 2]);
    let e0 = |x: [f64; 2]| {
        let h = silu(x[0]) * x[1];
        [h, 2.0 * h]
    };
    let e1 = |x: [f64; 2]| {
        let h = silu(x[1]) * (x[0] + x[1]);
        [-h, h]
    };
    let sh = |x: [f64; 2]| [0.0, silu(x[0] + x[1]) * x[0]];
    let (a, b) = ([1.0, 2.0], [0.0, 3.0]);
    let mix = |s: [f64; 2], y: [[f64; 2]; 2], w: [f64; 2]| {
        [s[0] + w[0] * y[0][0] + w[1] * y[1][0], s[1] + w[0] * y[0][1] + w[1] * y[1][1]]
    };
    let no_shared = [0.0, 0.0];
    let want0 = mix(no_shared, [e1(a), e0(a)], [0.75, 0.25]);
    let want1 = mix(no_shared, [e0(b), e1(b)], [1.0, 0.5]);
    let mw = MoeWeights { gate_up: &gate_up, down: &down, n_experts: 2, shared: None };
    // MoeWeights<HostWeight> is Clone but not Copy (the derive asks W: Copy).
    let y = RefBackend.moe(&x, &ids, &wts, mw, MoePath::Decode).unwrap();
    assert_close(&f(&y), &[want0[0], want0[1], want1[0], want1[1]], 1e-6);
    let mw = MoeWeights { shared: Some((&sgu, &sdn)), ..mw };
    let y = RefBackend.moe(&x, &ids, &wts, mw, MoePath::Auto).unwrap();
    let want0 = mix(sh(a), [e1(a), e0(a)], [0.75, 0.25]);
    let want1 = mix(sh(b), [e0(b), e1(b)], [1.0, 0.5]);
    assert_close(&f(&y), &[want0[0], want0[1], want1[0], want1[1]], 1e-6);
    // An expert id out of range is an error, not a panic.
    let bad = tu(&[1, 2, 0, 1], &[2, 2]);
    assert!(RefBackend.moe(&x, &bad, &wts, mw, MoePath::Auto).is_err());
}

#[test]
fn attention_gqa_by_hand() {
    // T 1 at position 1 (attends rows 0 and 1; row 2 must be ignored), 2 q heads share 1 kv head.
    let q = t(&[1.0, 2.0], &[1, 2, 1]);
    let k = t(&[0.0, 1.0, 100.0], &[3, 1, 1]);
    let v = t(&[10.0, 20.0, 999.0], &[3, 1, 1]);
    let y = RefBackend.attention_gqa(&q, &k, &v, 1, 1.0).unwrap();
    let out = |s: f64| (10.0 + 20.0 * s.exp()) / (1.0 + s.exp());
    assert_close(&f(&y), &[out(1.0), out(2.0)], 1e-6);
    // Prefill: query 0 at position 0 sees only row 0.
    let q = t(&[1.0, 1.0], &[2, 1, 1]);
    let y = RefBackend.attention_gqa(&q, &k, &v, 0, 1.0).unwrap();
    assert_close(&f(&y), &[10.0, out(1.0)], 1e-6);
}

#[test]
fn attention_mla_by_hand() {
    // Cache rows [c, k_r]: (1, 0), (2, 1), poison. q_lat 1, q_rope 1, scale 0.5 at position 1:
    // scores (1*1 + 1*0) * 0.5 = 0.5 and (1*2 + 1*1) * 0.5 = 1.5.
    let cache = t(&[1.0, 0.0, 2.0, 1.0, 99.0, 99.0], &[3, 2]);
    let y = RefBackend.attention_mla(&t(&[1.0], &[1, 1, 1]), &t(&[1.0], &[1, 1, 1]), &cache, 1, 0.5).unwrap();
    let (p0, p1) = (0.5f64.exp(), 1.5f64.exp());
    assert_close(&f(&y), &[(p0 + 2.0 * p1) / (p0 + p1)], 1e-6);
}

#[test]
fn attention_mla_expanded_equals_absorbed() {
    // The same attention both ways on a small layer: the latents' kv_b product, then the
    // expanded op; or W_UK into the query, the absorbed op, and W_UV out of its result.
    let (heads, nope, r, lora, dv, tq, pos0) = (2, 3, 2, 4, 3, 3, 1);
    let s = pos0 + tq + 1; // one row past the queries' keys, poisoned below
    let vals = |n: usize, k: u32| -> Vec<f32> {
        (0..n as u32).map(|i| (((i * 7 + k * 13) % 11) as f32 - 5.0) / 8.0).collect()
    };
    let w = HostWeight::from_f32(heads * (nope + dv), lora, &vals(heads * (nope + dv) * lora, 1));
    let w = RefBackend.upload_weight(&w).unwrap();
    let (mut lat, mut kr) = (vals(s * lora, 2), vals(s * r, 3));
    lat[(s - 1) * lora..].fill(1e3);
    kr[(s - 1) * r..].fill(1e3);
    let (q_nope, q_rope) =
        (t(&vals(tq * heads * nope, 4), &[tq, heads, nope]), t(&vals(tq * heads * r, 5), &[tq, heads, r]));
    let b = RefBackend;
    let kv = b
        .linear(&t(&lat, &[s, lora]), &w, LinearPath::Auto)
        .unwrap()
        .reshape(&[s, heads, nope + dv])
        .unwrap();
    let expanded =
        b.attention_mla_expanded(&q_nope, &q_rope, &kv, &t(&kr, &[s, r]), pos0, 0.5, false).unwrap();
    let block = |row_start, row_count, transpose| HeadLinear {
        heads,
        rows_per_head: nope + dv,
        row_start,
        row_count,
        transpose,
    };
    let q_lat = b.head_linear(&q_nope, &w, block(0, nope, true)).unwrap();
    let cache: Vec<f32> =
        (0..s).flat_map(|j| [&lat[j * lora..(j + 1) * lora], &kr[j * r..(j + 1) * r]].concat()).collect();
    let o_lat = b.attention_mla(&q_lat, &q_rope, &t(&cache, &[s, lora + r]), pos0, 0.5).unwrap();
    let absorbed = b.head_linear(&o_lat, &w, block(nope, dv, false)).unwrap();
    assert_eq!(expanded.shape(), absorbed.shape());
    let want: Vec<f64> = f(&absorbed).iter().map(|&x| x as f64).collect();
    assert_close(&f(&expanded), &want, 1e-5);
}

#[test]
fn argmax_top_k_ties_to_lower_index() {
    let x = t(&[1.0, 3.0, 3.0, 2.0, -1.0, -1.0, -1.0, -1.0], &[2, 4]);
    assert_eq!(u(&RefBackend.argmax(&x).unwrap()), [1, 0]);
    let (v, i) = RefBackend.top_k(&x, 3).unwrap();
    assert_eq!(u(&i), [1, 2, 3, 0, 1, 2]);
    assert_eq!(f(&v), [3.0, 3.0, 2.0, -1.0, -1.0, -1.0]);
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let w = HostWeight::from_f32(3, 2, &[0.0; 6]);
    assert!(RefBackend.embedding(&w, &tu(&[3], &[1])).is_err(), "id past the table");
    assert!(RefBackend.linear(&tu(&[1, 2], &[1, 2]), &w, LinearPath::Auto).is_err(), "u32 activations");
    let broken = HostWeight::Dense {
        rows: 4,
        cols: 4,
        dtype: fp4moe_ops::DenseDType::F32,
        bytes: vec![0u8; 8].into(),
    };
    assert!(RefBackend.upload_weight(&broken).is_err(), "dense bytes shorter than the shape");
    // A tensor whose shape disagrees with its storage.
    let lying =
        T::<RefBackend>::new(std::sync::Arc::new(HostStorage::f32(vec![1.0; 3])), vec![2, 2], DType::F32);
    assert!(RefBackend.softmax(&lying).is_err());
    assert!(RefBackend.download(&lying).is_err());
}

// ---- mutation tests -------------------------------------------------------------------------------------

/// One known bug, injected into a backend that otherwise is the reference.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mutation {
    None,
    /// FP4 decode with the subnormal code 1 (and 9) read as ±0.25 instead of ±0.5.
    WrongE2m1Entry,
    /// MoE where every token of a 32-token tile uses the experts of the tile's first token.
    RepresentativeExpert,
    /// Attention that also attends the cache row one past the causal window.
    CausalOffByOne,
    /// Sigmoid router that returns the *biased* scores as weights.
    BiasedRouterWeights,
    /// RoPE with the two pairing styles swapped.
    SwappedRopeStyle,
}

struct Mutant(Mutation);

/// Decodes like the reference, then halves every element whose code is ±0.5 — the classic
/// "subnormal = 0.25·m" mistake — and hands the result on as a dense f32 weight.
fn wrong_e2m1(w: &HostWeight) -> HostWeight {
    let HostWeight::Quant(q) = w else { return w.clone() };
    let mut v = q.dequantize();
    for (i, x) in v.iter_mut().enumerate() {
        let byte = q.codes[i / 2];
        let code = if i % 2 == 0 { byte & 0xF } else { byte >> 4 };
        if code & 0x7 == 1 {
            *x *= 0.5;
        }
    }
    HostWeight::from_f32(q.rows, q.cols, &v)
}

const SHORTCUT_TILE: usize = 32;

impl Backend for Mutant {
    type Storage = HostStorage;
    type Weight = HostWeight;
    fn name(&self) -> String {
        format!("mutant {:?}", self.0)
    }
    fn upload(&self, t: HostTensor<'_>) -> Result<T<Self>> {
        RefBackend.upload(t)
    }
    fn zeros(&self, shape: &[usize], dtype: DType) -> Result<T<Self>> {
        RefBackend.zeros(shape, dtype)
    }
    fn download(&self, t: &T<Self>) -> Result<HostData> {
        RefBackend.download(t)
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
    fn upload_weight(&self, w: &HostWeight) -> Result<HostWeight> {
        let w = RefBackend.upload_weight(w)?;
        Ok(if self.0 == Mutation::WrongE2m1Entry { wrong_e2m1(&w) } else { w })
    }
    fn weight_shape(&self, w: &HostWeight) -> [usize; 2] {
        w.shape()
    }
    fn linear_paths(&self) -> Vec<LinearPath> {
        vec![LinearPath::Decode, LinearPath::Prefill { n_tile: 32 }]
    }
    fn moe_paths(&self) -> Vec<MoePath> {
        vec![MoePath::Decode, MoePath::Prefill { n_tile: 64 }]
    }
    fn embedding(&self, table: &HostWeight, ids: &T<Self>) -> Result<T<Self>> {
        RefBackend.embedding(table, ids)
    }
    fn linear(&self, x: &T<Self>, w: &HostWeight, path: LinearPath) -> Result<T<Self>> {
        RefBackend.linear(x, w, path)
    }
    fn head_linear(&self, x: &T<Self>, w: &HostWeight, spec: HeadLinear) -> Result<T<Self>> {
        RefBackend.head_linear(x, w, spec)
    }
    fn rms_norm(&self, x: &T<Self>, w: &T<Self>, eps: f32) -> Result<T<Self>> {
        RefBackend.rms_norm(x, w, eps)
    }
    fn rope(&self, x: &T<Self>, positions: &T<Self>, spec: Rope) -> Result<T<Self>> {
        let spec = if self.0 == Mutation::SwappedRopeStyle {
            let style = match spec.style {
                RopeStyle::NeoX => RopeStyle::Interleaved,
                RopeStyle::Interleaved => RopeStyle::NeoX,
            };
            Rope { style, ..spec }
        } else {
            spec
        };
        RefBackend.rope(x, positions, spec)
    }
    fn softmax(&self, x: &T<Self>) -> Result<T<Self>> {
        RefBackend.softmax(x)
    }
    fn add(&self, a: &T<Self>, b: &T<Self>) -> Result<T<Self>> {
        RefBackend.add(a, b)
    }
    fn silu_mul(&self, x: &T<Self>) -> Result<T<Self>> {
        RefBackend.silu_mul(x)
    }
    fn slice_cols(&self, x: &T<Self>, start: usize, len: usize) -> Result<T<Self>> {
        RefBackend.slice_cols(x, start, len)
    }
    fn slice_rows(&self, x: &T<Self>, start: usize, len: usize) -> Result<T<Self>> {
        RefBackend.slice_rows(x, start, len)
    }
    fn concat_rows(&self, parts: &[&T<Self>]) -> Result<T<Self>> {
        RefBackend.concat_rows(parts)
    }
    fn cast(&self, x: &T<Self>, dtype: DType) -> Result<T<Self>> {
        RefBackend.cast(x, dtype)
    }
    fn write_rows(&self, dst: &T<Self>, src: &T<Self>, row0: usize, col0: usize) -> Result<()> {
        RefBackend.write_rows(dst, src, row0, col0)
    }
    fn route_softmax(&self, logits: &T<Self>, k: usize, renormalize: bool) -> Result<(T<Self>, T<Self>)> {
        RefBackend.route_softmax(logits, k, renormalize)
    }
    fn route_sigmoid_grouped(
        &self,
        logits: &T<Self>,
        bias: &T<Self>,
        spec: GroupedRouter,
    ) -> Result<(T<Self>, T<Self>)> {
        let (ids, w) = RefBackend.route_sigmoid_grouped(logits, bias, spec)?;
        if self.0 != Mutation::BiasedRouterWeights {
            return Ok((ids, w));
        }
        let (l, b, idv) = (f(logits), f(bias), u(&ids));
        let e = b.len();
        let biased: Vec<f32> = idv
            .iter()
            .enumerate()
            .map(|(j, &i)| {
                let x = l[(j / spec.k) * e + i as usize];
                (1.0 / (1.0 + (-x).exp()) + b[i as usize]) * spec.scale
            })
            .collect();
        Ok((ids, RefBackend.upload(HostTensor::F32(&biased, w.shape()))?))
    }
    fn moe(
        &self,
        x: &T<Self>,
        ids: &T<Self>,
        weights: &T<Self>,
        experts: MoeWeights<'_, HostWeight>,
        path: MoePath,
    ) -> Result<T<Self>> {
        if self.0 != Mutation::RepresentativeExpert {
            return RefBackend.moe(x, ids, weights, experts, path);
        }
        let k = ids.last_dim();
        let mut v = u(ids);
        for t in 0..ids.rows() {
            let rep = t / SHORTCUT_TILE * SHORTCUT_TILE;
            for s in 0..k {
                v[t * k + s] = v[rep * k + s];
            }
        }
        let ids = RefBackend.upload(HostTensor::U32(&v, ids.shape()))?;
        RefBackend.moe(x, &ids, weights, experts, path)
    }
    fn attention_gqa(
        &self,
        q: &T<Self>,
        k: &T<Self>,
        v: &T<Self>,
        pos0: usize,
        scale: f32,
    ) -> Result<T<Self>> {
        let off = usize::from(self.0 == Mutation::CausalOffByOne && k.shape()[0] > pos0 + q.shape()[0]);
        RefBackend.attention_gqa(q, k, v, pos0 + off, scale)
    }
    fn attention_mla(
        &self,
        q_lat: &T<Self>,
        q_rope: &T<Self>,
        cache: &T<Self>,
        pos0: usize,
        scale: f32,
    ) -> Result<T<Self>> {
        let off =
            usize::from(self.0 == Mutation::CausalOffByOne && cache.shape()[0] > pos0 + q_lat.shape()[0]);
        RefBackend.attention_mla(q_lat, q_rope, cache, pos0 + off, scale)
    }
    fn argmax(&self, x: &T<Self>) -> Result<T<Self>> {
        RefBackend.argmax(x)
    }
    fn top_k(&self, x: &T<Self>, k: usize) -> Result<(T<Self>, T<Self>)> {
        RefBackend.top_k(x, k)
    }
}

/// Asserts that `check` fails on the mutant, and that the message names the seed.
fn must_fail(m: Mutation, check: fn(&Mutant, u64) -> Check) {
    let seed = conformance::seed();
    match check(&Mutant(m), seed) {
        Ok(()) => panic!("{m:?} passed the check (seed {seed}): the suite has no teeth here"),
        Err(e) => {
            assert!(e.contains(&format!("FP4MOE_SEED={seed}")), "message lacks the seed: {e}");
            println!("{m:?} caught: {e}");
        }
    }
}

#[test]
fn unmutated_wrapper_passes() {
    // The wrapper itself is sound, so the failures below come from the injected bugs alone.
    let seed = conformance::seed();
    let b = Mutant(Mutation::None);
    for check in [
        conformance::check_linear_odd_shapes::<Mutant>,
        conformance::check_moe_routing::<Mutant>,
        conformance::check_attention_gqa::<Mutant>,
        conformance::check_attention_mla::<Mutant>,
        conformance::check_attention_mla_expanded::<Mutant>,
        conformance::check_route_sigmoid_grouped::<Mutant>,
        conformance::check_rope::<Mutant>,
        conformance::check_split_rope::<Mutant>,
        conformance::check_embedding::<Mutant>,
    ] {
        check(&b, seed).unwrap();
    }
}

#[test]
fn suite_catches_wrong_e2m1_entry() {
    must_fail(Mutation::WrongE2m1Entry, conformance::check_linear_odd_shapes);
    must_fail(Mutation::WrongE2m1Entry, conformance::check_embedding);
    must_fail(Mutation::WrongE2m1Entry, conformance::check_head_linear);
    must_fail(Mutation::WrongE2m1Entry, conformance::check_moe_routing);
}

#[test]
fn suite_catches_representative_expert_shortcut() {
    must_fail(Mutation::RepresentativeExpert, conformance::check_moe_routing);
    must_fail(Mutation::RepresentativeExpert, conformance::check_moe_qwen_shape);
}

#[test]
fn suite_catches_causal_off_by_one() {
    must_fail(Mutation::CausalOffByOne, conformance::check_attention_gqa);
    must_fail(Mutation::CausalOffByOne, conformance::check_attention_mla);
    must_fail(Mutation::CausalOffByOne, conformance::check_attention_mla_expanded);
}

#[test]
fn suite_catches_biased_router_weights() {
    must_fail(Mutation::BiasedRouterWeights, conformance::check_route_sigmoid_grouped);
}

#[test]
fn suite_catches_swapped_rope_style() {
    must_fail(Mutation::SwappedRopeStyle, conformance::check_rope);
    must_fail(Mutation::SwappedRopeStyle, conformance::check_norm_rope);
    must_fail(Mutation::SwappedRopeStyle, conformance::check_split_rope);
}

#[test]
fn host_storage_helpers() {
    let s = HostStorage::f32(vec![1.0, 2.0]);
    assert_eq!(s.to_f32_vec().unwrap(), [1.0, 2.0]);
    s.write().to_f32_vec().unwrap();
    assert_eq!(*s.read(), HostBuf::F32(vec![1.0, 2.0]));
    assert!(HostStorage::u32(vec![1]).to_f32_vec().is_err());
    let t = HostT::from_f32(vec![1.0; 6], &[2, 3]).unwrap();
    assert_eq!(t.dtype(), DType::F32);
    assert!(HostT::from_f32(vec![1.0; 5], &[2, 3]).is_err());
}
