//! The one conformance suite every backend runs.
//!
//! Each `check_*` function builds fresh random inputs, runs an op on the backend under test and on
//! [`RefBackend`], and compares. Every path a backend lists ([`Backend::linear_paths`],
//! [`Backend::moe_paths`]) is called explicitly, and `Auto` as well, so a dispatcher can only pick
//! among proven paths. A backend crate gets one `#[test]` per check with
//!
//! ```ignore
//! // crates/<backend>/tests/conformance.rs
//! fp4moe_ops::conformance_tests!(fp4moe_cuda::CudaBackend::new().ok(), "cuda");
//! ```
//!
//! where the expression yields `Option<B>`: `None` means "no device here", and each test prints
//! `skipped: no <device>` and passes. Checks are also callable directly (the mutation tests in
//! `crates/ops/tests/` do so to prove that the suite fails on known bugs).
//!
//! Randomness: a small xorshift generator seeded from the clock; every failure message names the
//! seed, and `FP4MOE_SEED=<seed>` replays it.
//!
//! Tolerances are per check and justified where they are defined ([`tol_sum`] and the constants
//! below). Index outputs (routers, `top_k`, `argmax`) must match exactly: router inputs are
//! generated with a margin between competing scores far above f32 rounding, and `top_k`/`argmax`
//! compare identical input values, so there is no legitimate way to disagree.

use crate::reference::RefBackend;
use crate::{
    Backend, DType, GroupedRouter, HeadLinear, HostTensor, HostWeight, LinearPath, MoePath, MoeWeights, Rope,
    RopeStyle, T,
};
use fp4::Format;
use std::fmt::Display;

/// Result of one check: `Err` carries a message that names the case and the seed.
pub type Check = Result<(), String>;

// ---- randomness -------------------------------------------------------------------------------

/// xorshift64* — tiny, deterministic, and good enough for test data.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        // splitmix64 scrambles the seed so that nearby seeds give unrelated streams and the state
        // is never zero (a fixed point of xorshift).
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Rng((z ^ (z >> 31)) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [0, 1) with 24 random bits.
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    /// Uniform in [lo, hi).
    pub fn range(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.uniform()
    }
    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = (self.uniform() as f64 + 1.0 / (1u64 << 25) as f64).min(1.0);
        let u2 = self.uniform() as f64;
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    }
    pub fn normals(&mut self, n: usize, sigma: f32) -> Vec<f32> {
        (0..n).map(|_| self.normal() * sigma).collect()
    }
    /// Uniform integer in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    pub fn shuffle<E>(&mut self, v: &mut [E]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }
    /// `k` distinct values from `0..n`, in random order.
    pub fn distinct(&mut self, n: usize, k: usize) -> Vec<usize> {
        let mut all: Vec<usize> = (0..n).collect();
        self.shuffle(&mut all);
        all.truncate(k);
        all
    }
}

/// The suite's seed: `FP4MOE_SEED` when set, else the clock.
pub fn seed() -> u64 {
    if let Some(s) = std::env::var("FP4MOE_SEED").ok().and_then(|s| s.trim().parse().ok()) {
        return s;
    }
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
}

/// Seed and generator of one check; formats failure messages.
pub struct Ctx {
    pub seed: u64,
    pub rng: Rng,
}

impl Ctx {
    pub fn new(seed: u64) -> Ctx {
        Ctx { seed, rng: Rng::new(seed) }
    }
    pub fn fail(&self, case: &str, detail: impl Display) -> String {
        format!("{case}: {detail} [seed {s}; reproduce with FP4MOE_SEED={s}]", s = self.seed)
    }
}

trait OrFail<V> {
    fn or_fail(self, cx: &Ctx, case: &str) -> Result<V, String>;
}

impl<V, E: Display> OrFail<V> for Result<V, E> {
    fn or_fail(self, cx: &Ctx, case: &str) -> Result<V, String> {
        self.map_err(|e| cx.fail(case, format!("error: {e}")))
    }
}

// ---- tolerances -------------------------------------------------------------------------------

/// Relative L2 error allowed per output row for a value that sums `k` products in f32.
///
/// Two correct f32 summation orders (sequential, blocked, pairwise, SIMD lanes, FMA or not) of k
/// random-sign terms differ by about `u·sqrt(k)` relative (u = 2^-24; the rounding errors of the
/// partial sums add like a random walk). The bound is 64·2^-23·sqrt(k) — headroom of ~100 over
/// that typical figure for unlucky rows — which is 5.5e-4 at k = 5120 and 6e-5 at k = 64. The
/// bugs this suite exists for are far above it: one wrong E2M1 entry moves outputs by ~3e-2,
/// a dropped or misrouted expert by O(1). A backend that rounds f32 activations to bf16
/// internally (~1e-3) does not pass: f32 input is consumed as f32.
pub fn tol_sum(k: usize) -> f32 {
    64.0 * f32::EPSILON * (k.max(1) as f32).sqrt()
}

/// Elementwise transcendental ops (silu, sigmoid, exp, sin/cos of the *same* f32 angle): a few
/// ulp per element between libm implementations, GPU intrinsics included; 16 ulp of headroom.
pub const TOL_ELEMENTWISE: f32 = 16.0 * f32::EPSILON;

/// RoPE: the angle `pos * inv_freq` is one f32 multiply, identical everywhere *if* `inv_freq`
/// is identical — backends should upload [`crate::reference::rope_inv_freq`] rather than call a
/// device `pow` (a 1-ulp different frequency at position 30000 is a 2e-3 rad different angle,
/// a real divergence from transformers). What remains is sin/cos accuracy (a few ulp).
pub const TOL_ROPE: f32 = 1e-5;

/// Router weights: sigmoid/softmax (a few ulp each) then a sum of k ≤ 8 terms and a division.
pub const TOL_ROUTER: f32 = 1e-5;

/// Attention whose products may read bf16 (`attention_*_bf16`, `attention_mla_expanded` with
/// `bf16`): the scaled query, keys, probabilities and values each rounded to 8 mantissa bits
/// (2^-9 relative). Emulated in f64 on these cases' shapes (Qwen3's 128-wide heads, up to 300
/// queries over 1064 keys) that moves a row by up to 7.9e-3 relative; TF32 by ~1e-3. 3e-2
/// leaves headroom, and a mask or softmax bug (the poisoned cache tail, a lost rescale) lands
/// at O(1).
pub const TOL_BF16: f32 = 3e-2;

/// `moe` with bf16 x, whose intermediate is rounded to bf16 (`Backend::moe`): where a backend's
/// f32 value sits across a rounding boundary from the reference's (another summation order),
/// that element lands one bf16 ulp (2^-8 relative) away. A row of sums of such elements moves
/// by at most that relative amount, so 2^-8 even if every element did; a dropped slot or a wrong
/// expert lands at 1/k or more.
pub const TOL_MOE_BF16: f32 = 1.0 / 256.0;

/// FP4 decode: `e2m1 · block_scale · tensor_scale` may associate either way (1 ulp).
pub const TOL_DECODE: f32 = 4.0 * f32::EPSILON;

// ---- data helpers -----------------------------------------------------------------------------

/// Downloaded f32 output with its shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Out {
    pub v: Vec<f32>,
    pub shape: Vec<usize>,
}

/// Downloaded u32 output with its shape.
#[derive(Debug, Clone, PartialEq)]
pub struct OutU {
    pub v: Vec<u32>,
    pub shape: Vec<usize>,
}

fn fetch<X: Backend>(x: &X, t: &T<X>) -> crate::Result<Out> {
    Ok(Out { v: x.download(t)?.into_f32()?, shape: t.shape().to_vec() })
}

fn fetch_u<X: Backend>(x: &X, t: &T<X>) -> crate::Result<OutU> {
    Ok(OutU { v: x.download(t)?.into_u32()?, shape: t.shape().to_vec() })
}

fn up<X: Backend>(x: &X, v: &[f32], shape: &[usize]) -> crate::Result<T<X>> {
    x.upload(HostTensor::F32(v, shape))
}

fn up_u<X: Backend>(x: &X, v: &[u32], shape: &[usize]) -> crate::Result<T<X>> {
    x.upload(HostTensor::U32(v, shape))
}

/// Uploads f32 values, cast to bf16 on the device when asked (values should already be
/// bf16-representable so that the cast itself is exact; see [`bf16_round`]).
fn up_act<X: Backend>(x: &X, v: &[f32], shape: &[usize], dtype: DType) -> crate::Result<T<X>> {
    let t = up(x, v, shape)?;
    if dtype == DType::F32 { Ok(t) } else { x.cast(&t, dtype) }
}

/// Rounds to the nearest bf16 value (so that device casts of the result are exact).
pub fn bf16_round(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&f| half::bf16::from_f32(f).to_f32()).collect()
}

/// Per-row relative L2 comparison (rows = last dim). Non-finite output where the reference is
/// finite always fails.
pub fn close(cx: &Ctx, case: &str, got: &Out, want: &Out, tol: f32) -> Check {
    close_floored(cx, case, got, want, tol, &[])
}

/// [`close`] with a per-row floor under the denominator: a row whose expected values nearly
/// cancel (a single dot product of random-sign terms can land near 0) is judged against the size
/// its terms have, not against its own small norm. `floor` has one entry per row, or is empty.
pub fn close_floored(cx: &Ctx, case: &str, got: &Out, want: &Out, tol: f32, floor: &[f64]) -> Check {
    if got.shape != want.shape || got.v.len() != want.v.len() {
        return Err(cx.fail(
            case,
            format!("shape {:?} ({} values), expected {:?}", got.shape, got.v.len(), want.shape),
        ));
    }
    let row = want.shape.last().copied().unwrap_or(1).max(1);
    for (r, (g, w)) in got.v.chunks(row).zip(want.v.chunks(row)).enumerate() {
        let (mut num, mut den, mut worst) = (0.0f64, 0.0f64, (0usize, 0.0f64));
        for (c, (&a, &e)) in g.iter().zip(w).enumerate() {
            if !a.is_finite() && e.is_finite() {
                return Err(cx.fail(case, format!("row {r}, col {c}: got {a}, expected {e}")));
            }
            let d = (a as f64 - e as f64).abs();
            if !d.is_nan() && d > worst.1 {
                worst = (c, d);
            }
            num += d * d;
            den += (e as f64) * (e as f64);
        }
        let den = den.sqrt().max(floor.get(r).copied().unwrap_or(0.0)).max(1e-30);
        let rel = if num == 0.0 { 0.0 } else { num.sqrt() / den };
        if rel.is_nan() || rel > tol as f64 {
            let c = worst.0;
            return Err(cx.fail(
                case,
                format!(
                    "row {r}: relative L2 error {rel:.3e} > {tol:.1e} (worst col {c}: got {}, expected {})",
                    g[c], w[c]
                ),
            ));
        }
    }
    Ok(())
}

/// Bit-exact comparison (data movement, casts).
pub fn exact(cx: &Ctx, case: &str, got: &Out, want: &Out) -> Check {
    if got.shape != want.shape || got.v.len() != want.v.len() {
        return Err(cx.fail(case, format!("shape {:?}, expected {:?}", got.shape, want.shape)));
    }
    if let Some(i) = got.v.iter().zip(&want.v).position(|(a, e)| a.to_bits() != e.to_bits()) {
        return Err(cx.fail(case, format!("element {i}: got {}, expected {}", got.v[i], want.v[i])));
    }
    Ok(())
}

pub fn exact_u(cx: &Ctx, case: &str, got: &OutU, want: &OutU) -> Check {
    if got.shape != want.shape || got.v != want.v {
        let i = got.v.iter().zip(&want.v).position(|(a, e)| a != e);
        return Err(cx.fail(
            case,
            format!(
                "got {:?} {:?}, expected {:?} {:?} (first difference at {i:?})",
                got.shape,
                &got.v[..got.v.len().min(32)],
                want.shape,
                &want.v[..want.v.len().min(32)]
            ),
        ));
    }
    Ok(())
}

// ---- weights ----------------------------------------------------------------------------------

/// The weight encodings the suite feeds to every weight-taking op.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightKind {
    Mxfp4,
    Nvfp4,
    F32,
    Bf16,
}

pub const ALL_WEIGHT_KINDS: [WeightKind; 4] =
    [WeightKind::Mxfp4, WeightKind::Nvfp4, WeightKind::F32, WeightKind::Bf16];
pub const FP4_KINDS: [WeightKind; 2] = [WeightKind::Mxfp4, WeightKind::Nvfp4];

/// Above this many elements an FP4 test weight gets random codes instead of going through the
/// quantizer (quantizing the 600M-element real expert stacks would dominate the suite's time).
/// Random codes exercise all 16 E2M1 codes equally often, -0 and ±6 included.
const QUANTIZE_MAX_ELEMENTS: usize = 1 << 20;

/// A random weight `[rows, cols]` of the given kind: FP4 via [`fp4::quantize`] of Gaussian data
/// (small) or random codes and scales (large); dense from Gaussian data.
pub fn random_weight(
    rng: &mut Rng,
    kind: WeightKind,
    rows: usize,
    cols: usize,
) -> Result<HostWeight, String> {
    let format = match kind {
        WeightKind::Mxfp4 => Format::Mxfp4,
        WeightKind::Nvfp4 => Format::Nvfp4,
        WeightKind::F32 => return Ok(HostWeight::from_f32(rows, cols, &rng.normals(rows * cols, 0.5))),
        WeightKind::Bf16 => {
            return Ok(HostWeight::from_f32_as_bf16(rows, cols, &rng.normals(rows * cols, 0.5)));
        }
    };
    if rows * cols <= QUANTIZE_MAX_ELEMENTS {
        let q = fp4::quantize(&rng.normals(rows * cols, 0.5), rows, cols, format)
            .map_err(|e| format!("quantize: {e}"))?;
        return Ok(HostWeight::Quant(q.matrix));
    }
    let mut codes = vec![0u8; rows * cols / 2];
    for chunk in codes.chunks_mut(8) {
        let r = rng.next_u64().to_le_bytes();
        chunk.copy_from_slice(&r[..chunk.len()]);
    }
    let nb = rows * (cols / format.block());
    let (scales, tensor_scale): (Vec<u8>, f32) = match format {
        // Magnitudes like real checkpoints' (|w| up to ~0.5, typically ~0.03), so that model-
        // sized sums stay in a realistic range. E8M0 codes 118..=124: block scales 2^-9 ..= 2^-3.
        Format::Mxfp4 => ((0..nb).map(|_| 118 + rng.below(7) as u8).collect(), 1.0),
        // E4M3 codes 0x28..0x48: 2^-2 ..< 2^2 with every mantissa (never the NaN code 0x7F),
        // times a tensor scale in [0.005, 0.02).
        Format::Nvfp4 => ((0..nb).map(|_| 0x28 + rng.below(0x20) as u8).collect(), rng.range(0.005, 0.02)),
    };
    let m = fp4::QuantMatrix::new(format, rows, cols, codes.into(), scales.into(), vec![tensor_scale])
        .map_err(|e| format!("random FP4 matrix: {e}"))?;
    Ok(HostWeight::Quant(m))
}

/// Uploads one host weight to both backends.
fn both_weights<B: Backend>(
    cx: &Ctx,
    case: &str,
    b: &B,
    w: &HostWeight,
) -> Result<(B::Weight, HostWeight), String> {
    let wb = b.upload_weight(w).or_fail(cx, case)?;
    if b.weight_shape(&wb) != w.shape() {
        return Err(cx.fail(case, format!("weight_shape {:?} != {:?}", b.weight_shape(&wb), w.shape())));
    }
    Ok((wb, RefBackend.upload_weight(w).or_fail(cx, case)?))
}

fn linear_paths_with_auto<B: Backend>(b: &B) -> Vec<LinearPath> {
    let mut p = b.linear_paths();
    p.push(LinearPath::Auto);
    p
}

fn moe_paths_with_auto<B: Backend>(b: &B) -> Vec<MoePath> {
    let mut p = b.moe_paths();
    p.push(MoePath::Auto);
    p
}

// ---- checks: memory, paths, cast ----------------------------------------------------------------

/// The backend lists at least one concrete path of each kind, no `Auto`, no duplicates, no zero tile.
pub fn check_paths<B: Backend>(b: &B, seed: u64) -> Check {
    let cx = Ctx::new(seed);
    let lp = b.linear_paths();
    let mp = b.moe_paths();
    let bad_l = lp.iter().any(|p| matches!(p, LinearPath::Auto | LinearPath::Prefill { n_tile: 0 }));
    let bad_m = mp.iter().any(|p| matches!(p, MoePath::Auto | MoePath::Prefill { n_tile: 0 }));
    let dup_l = lp.iter().enumerate().any(|(i, p)| lp[..i].contains(p));
    let dup_m = mp.iter().enumerate().any(|(i, p)| mp[..i].contains(p));
    if lp.is_empty() || mp.is_empty() || bad_l || bad_m || dup_l || dup_m {
        return Err(cx.fail("paths", format!("linear {lp:?}, moe {mp:?}")));
    }
    Ok(())
}

/// upload/download round trips, zeros in every dtype, synchronize.
pub fn check_memory<B: Backend>(b: &B, seed: u64) -> Check {
    let mut cx = Ctx::new(seed);
    let case = "memory";
    let v = cx.rng.normals(2 * 3 * 5, 1.0);
    let t = up(b, &v, &[2, 3, 5]).or_fail(&cx, case)?;
    exact(&cx, "upload/download f32", &fetch(b, &t).or_fail(&cx, case)?, &Out { v, shape: vec![2, 3, 5] })?;
    let u: Vec<u32> = (0..7).map(|_| cx.rng.next_u64() as u32).collect();
    let t = up_u(b, &u, &[7]).or_fail(&cx, case)?;
    exact_u(&cx, "upload/download u32", &fetch_u(b, &t).or_fail(&cx, case)?, &OutU { v: u, shape: vec![7] })?;
    for dt in [DType::F32, DType::BF16] {
        let z = b.zeros(&[4, 9], dt).or_fail(&cx, case)?;
        if z.dtype() != dt {
            return Err(cx.fail(case, format!("zeros({dt:?}) has dtype {:?}", z.dtype())));
        }
        exact(&cx, "zeros", &fetch(b, &z).or_fail(&cx, case)?, &Out { v: vec![0.0; 36], shape: vec![4, 9] })?;
    }
    let z = b.zeros(&[5], DType::U32).or_fail(&cx, case)?;
    exact_u(&cx, "zeros u32", &fetch_u(b, &z).or_fail(&cx, case)?, &OutU { v: vec![0; 5], shape: vec![5] })?;
    b.synchronize().or_fail(&cx, case)
}

/// f32 -> bf16 rounds to nearest even (ties, signed zeros, subnormals, overflow to inf), and
/// bf16 -> f32 is exact: bit-exact against the reference.
pub fn check_cast<B: Backend>(b: &B, seed: u64) -> Check {
    let mut cx = Ctx::new(seed);
    let one = 1.0f32.to_bits();
    let mut v: Vec<f32> = vec![
        0.0,
        -0.0,
        1.0,
        -1.0,
        f32::from_bits(one + 0x8000),  // exactly halfway: ties to even (down)
        f32::from_bits(one + 0x18000), // halfway above an odd bf16: ties to even (up)
        f32::from_bits(one + 0x8001),  // just above halfway: up
        f32::from_bits(one + 0x7FFF),  // just below halfway: down
        1e-40,                         // f32 subnormal
        -3.0e38,
        f32::MAX, // rounds to +inf
        f32::INFINITY,
        f32::NEG_INFINITY,
        65504.0,
    ];
    v.extend(cx.rng.normals(50, 100.0));
    let shape = [v.len()];
    let go = |t_b: &T<B>, t_r: &T<RefBackend>, case: &str| -> Check {
        let bb = b.cast(t_b, DType::BF16).or_fail(&cx, case)?;
        let rb = RefBackend.cast(t_r, DType::BF16).or_fail(&cx, case)?;
        if bb.dtype() != DType::BF16 {
            return Err(cx.fail(case, format!("cast to bf16 gave {:?}", bb.dtype())));
        }
        exact(&cx, case, &fetch(b, &bb).or_fail(&cx, case)?, &fetch(&RefBackend, &rb).or_fail(&cx, case)?)?;
        let bf = b.cast(&bb, DType::F32).or_fail(&cx, case)?;
        let rf = RefBackend.cast(&rb, DType::F32).or_fail(&cx, case)?;
        exact(&cx, case, &fetch(b, &bf).or_fail(&cx, case)?, &fetch(&RefBackend, &rf).or_fail(&cx, case)?)
    };
    let case = "cast f32 -> bf16 -> f32";
    go(&up(b, &v, &shape).or_fail(&cx, case)?, &up(&RefBackend, &v, &shape).or_fail(&cx, case)?, case)
}

// ---- checks: linear ----------------------------------------------------------------------------

fn run_linear<X: Backend>(
    x: &X,
    xs: &[f32],
    m: usize,
    k: usize,
    dt: DType,
    w: &X::Weight,
    p: LinearPath,
) -> crate::Result<Out> {
    let t = up_act(x, xs, &[m, k], dt)?;
    fetch(x, &x.linear(&t, w, p)?)
}

/// One weight, several row counts and activation dtypes. The reference runs once, on the rows of
/// every dtype stacked (bf16 activations are exactly their f32 values, so the stacked f32 call
/// computes the same); a smaller M is the first rows of the larger (rows of `linear` are
/// independent). That keeps the reference's weight decoding to one pass per weight.
fn linear_case<B: Backend>(
    cx: &mut Ctx,
    b: &B,
    kind: WeightKind,
    n: usize,
    k: usize,
    ms: &[usize],
    dtypes: &[DType],
) -> Check {
    let case = format!("linear {kind:?} {k}->{n}");
    let hw = random_weight(&mut cx.rng, kind, n, k).map_err(|e| cx.fail(&case, e))?;
    linear_case_with(cx, b, &case, &hw, ms, dtypes)
}

/// [`linear_case`] on a given weight.
fn linear_case_with<B: Backend>(
    cx: &mut Ctx,
    b: &B,
    case: &str,
    hw: &HostWeight,
    ms: &[usize],
    dtypes: &[DType],
) -> Check {
    let [n, k] = hw.shape();
    let (wb, wr) = both_weights(cx, case, b, hw)?;
    let m_max = ms.iter().copied().max().unwrap_or(1);
    let mut xs = Vec::with_capacity(dtypes.len() * m_max * k);
    for &dt in dtypes {
        let x = cx.rng.normals(m_max * k, 1.0);
        xs.extend(if dt == DType::BF16 { bf16_round(&x) } else { x });
    }
    let rows = dtypes.len() * m_max;
    let want = run_linear(&RefBackend, &xs, rows, k, DType::F32, &wr, LinearPath::Auto).or_fail(cx, case)?;
    // The typical norm of an output row, ||x_m|| * ||W||_F / sqrt(k), floors the comparison so a
    // row that happens to cancel (N = 1 makes a row a single dot product) is not judged against
    // its own near-zero norm; summation-order noise scales with the terms, not with their sum.
    let w_frob = hw.to_f32().iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>().sqrt();
    let floor: Vec<f64> = xs
        .chunks(k)
        .map(|x| x.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>().sqrt() * w_frob / (k as f64).sqrt())
        .collect();
    for (d, &dt) in dtypes.iter().enumerate() {
        let (xd, wd, fd) = (&xs[d * m_max * k..], &want.v[d * m_max * n..], &floor[d * m_max..]);
        for &m in ms {
            let want_m = Out { v: wd[..m * n].to_vec(), shape: vec![m, n] };
            for p in linear_paths_with_auto(b) {
                let c = format!("{case} M={m} x {dt:?} {p:?}");
                let got = run_linear(b, &xd[..m * k], m, k, dt, &wb, p).or_fail(cx, &c)?;
                close_floored(cx, &c, &got, &want_m, tol_sum(k), &fd[..m])?;
            }
        }
    }
    Ok(())
}

/// Odd shapes: M = 1, 3, 33; N not a multiple of any tile; every weight kind; f32 and bf16 x.
pub fn check_linear_odd_shapes<B: Backend>(b: &B, seed: u64) -> Check {
    let mut cx = Ctx::new(seed);
    let both = [DType::F32, DType::BF16];
    for kind in ALL_WEIGHT_KINDS {
        for (n, k) in [(72, 96), (100, 64), (33, 128), (1, 32)] {
            linear_case(&mut cx, b, kind, n, k, &[1, 3, 33], &both)?;
        }
    }
    // Dense weights need no block multiple.
    for kind in [WeightKind::F32, WeightKind::Bf16] {
        linear_case(&mut cx, b, kind, 37, 50, &[1, 3, 33], &both)?;
    }
    // A wide output at one token (lm_head-like): GPU backends give each lane group several rows
    // once the blocks fill a few waves, one row below that (every other shape here). And a
    // short output with long rows at one token: GPU backends spread each row over several
    // warps there (the one-row GEMVs of up to a block per row).
    for kind in FP4_KINDS {
        linear_case(&mut cx, b, kind, 12288, 2048, &[1], &[DType::F32])?;
        linear_case(&mut cx, b, kind, 256, 4096, &[1], &[DType::F32])?;
    }
    // 300 rows: GPU prefill tiles of up to 256 rows hold live rows past their first 128, and the
    // last tile ends ragged.
    for kind in FP4_KINDS {
        linear_case(&mut cx, b, kind, 200, 128, &[300], &both)?;
    }
    // Block scales at the ends of their formats, which GPU decoders that fold the scale into a
    // narrower type must handle: E8M0 2^-27 ..= 2^23 in one matrix, E4M3 from its smallest
    // subnormal (2^-9) to its largest finite value (448).
    for (format, lo, hi) in [(Format::Mxfp4, 100u8, 150u8), (Format::Nvfp4, 0x01, 0x7E)] {
        let (rows, cols) = (40, 256);
        let mut codes = vec![0u8; rows * cols / 2];
        for c in codes.iter_mut() {
            *c = cx.rng.below(256) as u8;
        }
        let nb = rows * (cols / format.block());
        let mut scales: Vec<u8> = (0..nb).map(|_| lo + cx.rng.below((hi - lo) as usize + 1) as u8).collect();
        scales[0] = hi;
        scales[1] = lo;
        let m = fp4::QuantMatrix::new(format, rows, cols, codes.into(), scales.into(), vec![1.0])
            .map_err(|e| cx.fail("scale extremes", e))?;
        let case = format!("linear {format:?} block scales {lo}..={hi}");
        linear_case_with(&mut cx, b, &case, &HostWeight::Quant(m), &[1, 3], &[DType::F32])?;
    }
    // Several weights on one x (`linears`; GPU backends run one-row FP4 products as one launch).
    // Two weights with rows long enough for the unrolled decode steps and a remainder (K 1152).
    for kind in ALL_WEIGHT_KINDS {
        linears_case(&mut cx, b, kind, &[72, 33, 100], 96, &[1, 3])?;
        linears_case(&mut cx, b, kind, &[40, 24], 1152, &[1, 2])?;
    }
    Ok(())
}

/// `linears` of one x against weights of `ns` rows (K = k) matches the reference `linear` of each.
fn linears_case<B: Backend>(
    cx: &mut Ctx,
    b: &B,
    kind: WeightKind,
    ns: &[usize],
    k: usize,
    ms: &[usize],
) -> Check {
    let case = format!("linears {kind:?} {ns:?} x {k}");
    let mut pairs = Vec::new();
    for &n in ns {
        let hw = random_weight(&mut cx.rng, kind, n, k).map_err(|e| cx.fail(&case, e))?;
        pairs.push(both_weights(cx, &case, b, &hw)?);
    }
    for &m in ms {
        let xs = cx.rng.normals(m * k, 1.0);
        for p in linear_paths_with_auto(b) {
            let c = format!("{case} M={m} {p:?}");
            let x = up(b, &xs, &[m, k]).or_fail(cx, &c)?;
            let ws: Vec<_> = pairs.iter().map(|(wb, _)| wb).collect();
            let got = b.linears(&x, &ws, p).or_fail(cx, &c)?;
            if got.len() != ns.len() {
                return Err(cx.fail(&c, format!("{} outputs for {} weights", got.len(), ns.len())));
            }
            for ((y, (_, wr)), &n) in got.iter().zip(&pairs).zip(ns) {
                let got = fetch(b, y).or_fail(cx, &c)?;
                let want =
                    run_linear(&RefBackend, &xs, m, k, DType::F32, wr, LinearPath::Auto).or_fail(cx, &c)?;
                if got.shape != [m, n] {
                    return Err(cx.fail(&c, format!("output shape {:?}, expected [{m}, {n}]", got.shape)));
                }
                close(cx, &c, &got, &want, tol_sum(k))?;
            }
        }
    }
    Ok(())
}

/// `(K, N)` of the linear layers of both models (GLM-4.7-Flash, Qwen3-30B-A3B).
pub const GLM_LINEAR_SHAPES: [(usize, usize); 7] =
    [(2048, 1536), (1536, 2048), (2048, 768), (768, 5120), (2048, 576), (512, 8960), (5120, 2048)];
pub const QWEN_LINEAR_SHAPES: [(usize, usize); 5] =
    [(2048, 768), (768, 2048), (2048, 4096), (2048, 512), (4096, 2048)];
/// Router projections (dense in the checkpoints).
pub const ROUTER_SHAPES: [(usize, usize); 2] = [(2048, 64), (2048, 128)];

fn real_linear<B: Backend>(b: &B, seed: u64, shapes: &[(usize, usize)]) -> Check {
    let mut cx = Ctx::new(seed);
    for &(k, n) in shapes {
        for kind in FP4_KINDS {
            // M = 1 is the decode shape; M = 5 exercises a prefill path without a slow reference.
            linear_case(&mut cx, b, kind, n, k, &[1, 5], &[DType::F32, DType::BF16])?;
        }
    }
    Ok(())
}

pub fn check_linear_glm_shapes<B: Backend>(b: &B, seed: u64) -> Check {
    real_linear(b, seed, &GLM_LINEAR_SHAPES)
}

pub fn check_linear_qwen_shapes<B: Backend>(b: &B, seed: u64) -> Check {
    real_linear(b, seed, &QWEN_LINEAR_SHAPES)
}

pub fn check_linear_router_shapes<B: Backend>(b: &B, seed: u64) -> Check {
    let mut cx = Ctx::new(seed);
    for (k, n) in ROUTER_SHAPES {
        for kind in ALL_WEIGHT_KINDS {
            // 70 rows: two row tiles of a GEMM that splits its reduction (CUDA's dense routers).
            linear_case(&mut cx, b, kind, n, k, &[1, 5, 70], &[DType::F32, DType::BF16])?;
        }
    }
    Ok(())
}

// ---- checks: head_linear, embedding --------------------------------------------------------------

fn run_head_linear<X: Backend>(
    x: &X,
    xs: &[f32],
    shape: &[usize],
    w: &X::Weight,
    s: HeadLinear,
) -> crate::Result<Out> {
    fetch(x, &x.head_linear(&up(x, xs, shape)?, w, s)?)
}

/// MLA's absorbed `kv_b_proj` [20 * 448, 512] (W_UK = rows 0..192, W_UV = rows 192..448 of each
/// head) in both directions, plus a small odd case.
pub fn check_head_linear<B: Backend>(b: &B, seed: u64) -> Check {
    let mut cx = Ctx::new(seed);
    // (heads, rows per head, K, [(row_start, row_count); 2])
    let cases =
        [(20usize, 448usize, 512usize, [(0usize, 192usize), (192, 256)]), (3, 10, 64, [(2, 5), (0, 10)])];
    for (heads, rph, k, blocks) in cases {
        for kind in [WeightKind::Mxfp4, WeightKind::Nvfp4, WeightKind::Bf16] {
            let case = format!("head_linear {kind:?} [{heads}x{rph}, {k}]");
            let hw = random_weight(&mut cx.rng, kind, heads * rph, k).map_err(|e| cx.fail(&case, e))?;
            let (wb, wr) = both_weights(&cx, &case, b, &hw)?;
            for (row_start, row_count) in blocks {
                for transpose in [false, true] {
                    let spec = HeadLinear { heads, rows_per_head: rph, row_start, row_count, transpose };
                    let kx = if transpose { row_count } else { k };
                    // Decode-sized and prefill-sized row counts (GPU backends switch kernels),
                    // and more rows than one GEMM tile on the small shape.
                    let ms: &[usize] = if heads * rph * k > 1 << 16 { &[1, 3, 9] } else { &[1, 3, 9, 67] };
                    for &m in ms {
                        let c = format!("{case} M={m} {spec:?}");
                        let xs = cx.rng.normals(m * heads * kx, 1.0);
                        let shape = [m, heads, kx];
                        let want = run_head_linear(&RefBackend, &xs, &shape, &wr, spec).or_fail(&cx, &c)?;
                        let got = run_head_linear(b, &xs, &shape, &wb, spec).or_fail(&cx, &c)?;
                        close(&cx, &c, &got, &want, tol_sum(kx))?;
                    }
                }
            }
        }
    }
    Ok(())
}

/// Embedding rows of every weight kind (first and last id included).
pub fn check_embedding<B: Backend>(b: &B, seed: u64) -> Check {
    let mut cx = Ctx::new(seed);
    let (v, h) = (100, 64);
    for kind in ALL_WEIGHT_KINDS {
        let case = format!("embedding {kind:?} [{v}, {h}]");
        let hw = random_weight(&mut cx.rng, kind, v, h).map_err(|e| cx.fail(&case, e))?;
        let (wb, wr) = both_weights(&cx, &case, b, &hw)?;
        let mut ids: Vec<u32> = (0..9).map(|_| cx.rng.below(v) as u32).collect();
        ids[0] = 0;
        ids[8] = v as u32 - 1;
        let want = fetch(
            &RefBackend,
            &RefBackend
                .embedding(&wr, &up_u(&RefBackend, &ids, &[9]).or_fail(&cx, &case)?)
                .or_fail(&cx, &case)?,
        )
        .or_fail(&cx, &case)?;
        let got = fetch(b, &b.embedding(&wb, &up_u(b, &ids, &[9]).or_fail(&cx, &case)?).or_fail(&cx, &case)?)
            .or_fail(&cx, &case)?;
        close(&cx, &case, &got, &want, TOL_DECODE)?;
    }
    Ok(())
}

// ---- checks: elementwise and normalization ---------------------------------------------------------

fn unary<X: Backend>(
    x: &X,
    xs: &[f32],
    shape: &[usize],
    f: impl Fn(&X, &T<X>) -> crate::Result<T<X>>,
) -> crate::Result<Out> {
    fetch(x, &f(x, &up(x, xs, shape)?)?)
}

/// RMSNorm at every norm width of both models (2048 hidden, 768 q_a, 512 kv_a, per-head 128) and
/// an odd one; eps of both models. The same shapes through `add_rms_norm` (both of its outputs).
pub fn check_rms_norm<B: Backend>(b: &B, seed: u64) -> Check {
    let mut cx = Ctx::new(seed);
    // [2, 5000]: wider than GPU backends hold in registers (their strided fallback).
    let cases: [(&[usize], f32); 6] = [
        (&[3, 2048], 1e-5),
        (&[2, 768], 1e-6),
        (&[4, 512], 1e-6),
        (&[3, 32, 128], 1e-6),
        (&[5, 33], 1e-5),
        (&[2, 5000], 1e-5),
    ];
    for (shape, eps) in cases {
        let case = format!("rms_norm {shape:?} eps {eps}");
        let d = *shape.last().unwrap_or(&1);
        let n: usize = shape.iter().product();
        let mut xs = cx.rng.normals(n, 3.0);
        xs[0] = 0.0;
        let w: Vec<f32> = (0..d).map(|_| cx.rng.range(0.5, 1.5)).collect();
        let want = {
            let r = RefBackend;
            let wt = up(&r, &w, &[d]).or_fail(&cx, &case)?;
            unary(&r, &xs, shape, |x, t| x.rms_norm(t, &wt, eps)).or_fail(&cx, &case)?
        };
        let wt = up(b, &w, &[d]).or_fail(&cx, &case)?;
        let got = unary(b, &xs, shape, |x, t| x.rms_norm(t, &wt, eps)).or_fail(&cx, &case)?;
        close(&cx, &case, &got, &want, tol_sum(d))?;

        // add_rms_norm: the residual sum and its norm, against add then rms_norm.
        let case = format!("add_rms_norm {shape:?} eps {eps}");
        let ys = cx.rng.normals(n, 3.0);
        let (want_sum, want_norm) = {
            let r = RefBackend;
            let sum =
                r.add(&up(&r, &xs, shape).or_fail(&cx, &case)?, &up(&r, &ys, shape).or_fail(&cx, &case)?);
            let sum = sum.or_fail(&cx, &case)?;
            let normed = r.rms_norm(&sum, &up(&r, &w, &[d]).or_fail(&cx, &case)?, eps).or_fail(&cx, &case)?;
            (fetch(&r, &sum).or_fail(&cx, &case)?, fetch(&r, &normed).or_fail(&cx, &case)?)
        };
        let (got_sum, got_norm) = (|| -> crate::Result<(Out, Out)> {
            let (sum, normed) = b.add_rms_norm(&up(b, &xs, shape)?, &up(b, &ys, shape)?, &wt, eps)?;
            Ok((fetch(b, &sum)?, fetch(b, &normed)?))
        })()
        .or_fail(&cx, &case)?;
        close(&cx, &format!("{case} sum"), &got_sum, &want_sum, TOL_ELEMENTWISE)?;
        close(&cx, &format!("{case} norm"), &got_norm, &want_norm, tol_sum(d))?;
    }
    Ok(())
}

fn run_rope<X: Backend>(x: &X, xs: &[f32], shape: &[usize], pos: &[u32], spec: Rope) -> crate::Result<Out> {
    let p = up_u(x, pos, &[pos.len()])?;
    fetch(x, &x.rope(&up(x, xs, shape)?, &p, spec)?)
}

/// RoPE in both styles at the models' layouts — GLM q: interleaved on dims 192..256 of a 256-wide
/// head; GLM shared k_rope: 64 of 64; Qwen: NeoX on all 128 — plus odd sub-ranges, at positions
/// up to 32768 (0 included).
pub fn check_rope<B: Backend>(b: &B, seed: u64) -> Check {
    let mut cx = Ctx::new(seed);
    let il = RopeStyle::Interleaved;
    let nx = RopeStyle::NeoX;
    let cases = [
        ([5, 20, 256], Rope { style: il, offset: 192, dims: 64, theta: 1e6 }),
        ([5, 1, 64], Rope { style: il, offset: 0, dims: 64, theta: 1e6 }),
        ([5, 32, 128], Rope { style: nx, offset: 0, dims: 128, theta: 1e6 }),
        ([5, 4, 128], Rope { style: nx, offset: 0, dims: 128, theta: 1e6 }),
        ([3, 3, 10], Rope { style: nx, offset: 2, dims: 6, theta: 1e4 }),
        ([3, 3, 10], Rope { style: il, offset: 4, dims: 6, theta: 1e4 }),
    ];
    for (shape, spec) in cases {
        let case = format!("rope {shape:?} {spec:?}");
        let xs = cx.rng.normals(shape.iter().product(), 1.0);
        let mut pos: Vec<u32> = (0..shape[0]).map(|_| cx.rng.below(32768) as u32).collect();
        pos[0] = 0;
        let want = run_rope(&RefBackend, &xs, &shape, &pos, spec).or_fail(&cx, &case)?;
        let got = run_rope(b, &xs, &shape, &pos, spec).or_fail(&cx, &case)?;
        close(&cx, &case, &got, &want, TOL_ROPE)?;
    }
    Ok(())
}

fn run_norm_rope<X: Backend>(
    x: &X,
    xs: &[f32],
    shape: &[usize],
    w: &[f32],
    eps: f32,
    pos: &[u32],
    spec: Rope,
) -> crate::Result<Out> {
    let p = up_u(x, pos, &[pos.len()])?;
    let wt = up(x, w, &[w.len()])?;
    fetch(x, &x.norm_rope(&up(x, xs, shape)?, &wt, eps, &p, spec)?)
}

/// The fused per-head norm + RoPE against the reference's two ops: Qwen3's q and k (32 and 4
/// heads of 128, NeoX on all dims), a head wider than GPU backends hold in one warp's registers,
/// and partial rotations in both styles.
pub fn check_norm_rope<B: Backend>(b: &B, seed: u64) -> Check {
    let mut cx = Ctx::new(seed);
    let il = RopeStyle::Interleaved;
    let nx = RopeStyle::NeoX;
    let cases = [
        ([1, 32, 128], Rope { style: nx, offset: 0, dims: 128, theta: 1e6 }),
        ([5, 4, 128], Rope { style: nx, offset: 0, dims: 128, theta: 1e6 }),
        ([2, 3, 512], Rope { style: nx, offset: 0, dims: 512, theta: 1e4 }),
        ([3, 3, 10], Rope { style: nx, offset: 2, dims: 6, theta: 1e4 }),
        ([3, 5, 36], Rope { style: il, offset: 4, dims: 24, theta: 1e4 }),
    ];
    for (shape, spec) in cases {
        let case = format!("norm_rope {shape:?} {spec:?}");
        let d = shape[2];
        let mut xs = cx.rng.normals(shape.iter().product(), 3.0);
        xs[0] = 0.0;
        let w: Vec<f32> = (0..d).map(|_| cx.rng.range(0.5, 1.5)).collect();
        let mut pos: Vec<u32> = (0..shape[0]).map(|_| cx.rng.below(32768) as u32).collect();
        // Position 0 (no rotation) too, but not as a one-token case's only position.
        if pos.len() > 1 {
            pos[0] = 0;
        }
        let r = RefBackend;
        let want = {
            let p = up_u(&r, &pos, &[pos.len()]).or_fail(&cx, &case)?;
            let wt = up(&r, &w, &[d]).or_fail(&cx, &case)?;
            let normed =
                r.rms_norm(&up(&r, &xs, &shape).or_fail(&cx, &case)?, &wt, 1e-6).or_fail(&cx, &case)?;
            fetch(&r, &r.rope(&normed, &p, spec).or_fail(&cx, &case)?).or_fail(&cx, &case)?
        };
        let got = run_norm_rope(b, &xs, &shape, &w, 1e-6, &pos, spec).or_fail(&cx, &case)?;
        close(&cx, &case, &got, &want, TOL_ROPE.max(tol_sum(d)))?;
    }
    // norm_ropes: Qwen3's q and k at one and at three tokens (one launch on GPU backends), and
    // a pair too wide for that (each input on its own), every output against norm_rope.
    let pairs = [(1usize, 32usize, 4usize, 128usize, 1e6f32), (3, 32, 4, 128, 1e6), (2, 3, 2, 512, 1e4)];
    for (n, h0, h1, d, theta) in pairs {
        let case = format!("norm_ropes [{n}, {h0} | {h1}, {d}]");
        let spec = Rope { style: nx, offset: 0, dims: d, theta };
        let xs: Vec<Vec<f32>> = [h0, h1].iter().map(|h| cx.rng.normals(n * h * d, 3.0)).collect();
        let ws: Vec<Vec<f32>> = (0..2).map(|_| (0..d).map(|_| cx.rng.range(0.5, 1.5)).collect()).collect();
        let eps = [1e-6f32, 1e-5];
        let pos: Vec<u32> = (0..n).map(|_| cx.rng.below(32768) as u32).collect();
        let got = (|| -> crate::Result<Vec<Out>> {
            let p = up_u(b, &pos, &[n])?;
            let x = [up(b, &xs[0], &[n, h0, d])?, up(b, &xs[1], &[n, h1, d])?];
            let w = [up(b, &ws[0], &[d])?, up(b, &ws[1], &[d])?];
            let ys = b.norm_ropes(&[(&x[0], &w[0], eps[0]), (&x[1], &w[1], eps[1])], &p, spec)?;
            ys.iter().map(|y| fetch(b, y)).collect()
        })()
        .or_fail(&cx, &case)?;
        if got.len() != 2 {
            return Err(cx.fail(&case, format!("{} outputs for two inputs", got.len())));
        }
        for (i, h) in [h0, h1].into_iter().enumerate() {
            let want = run_norm_rope(&RefBackend, &xs[i], &[n, h, d], &ws[i], eps[i], &pos, spec)
                .or_fail(&cx, &case)?;
            close(&cx, &format!("{case} output {i}"), &got[i], &want, TOL_ROPE.max(tol_sum(d)))?;
        }
    }
    Ok(())
}

/// `norm_ropes_to_cache` on `b`: q's result and both whole caches (`[S, Hkv * D]`, random
/// before the write).
#[allow(clippy::too_many_arguments)]
fn run_norm_ropes_to_cache<X: Backend>(
    x: &X,
    xs: &[Vec<f32>; 3],
    [n, hq, hkv, d]: [usize; 4],
    ws: &[Vec<f32>; 2],
    pos: &[u32],
    spec: Rope,
    caches0: &[Vec<f32>; 2],
    row0: usize,
) -> crate::Result<[Out; 3]> {
    let p = up_u(x, pos, &[n])?;
    let (q, k, v) =
        (up(x, &xs[0], &[n, hq, d])?, up(x, &xs[1], &[n, hkv, d])?, up(x, &xs[2], &[n, hkv * d])?);
    let w = [up(x, &ws[0], &[d])?, up(x, &ws[1], &[d])?];
    let s = caches0[0].len() / (hkv * d);
    let caches = [up(x, &caches0[0], &[s, hkv * d])?, up(x, &caches0[1], &[s, hkv * d])?];
    let y = x.norm_ropes_to_cache(
        (&q, &w[0], 1e-6),
        (&k, &w[1], 1e-5),
        &v,
        &p,
        spec,
        (&caches[0], &caches[1]),
        row0,
    )?;
    Ok([fetch(x, &y)?, fetch(x, &caches[0])?, fetch(x, &caches[1])?])
}

/// The GQA cache step (norm + RoPE of q and k, k and v into the caches) against the
/// reference's separate ops: Qwen3's heads at one token and at three ending on the cache's last
/// row, heads too wide and a width not of whole float4s (GPU backends' fallbacks); writes past
/// the cache are errors.
pub fn check_norm_ropes_to_cache<B: Backend>(b: &B, seed: u64) -> Check {
    let mut cx = Ctx::new(seed);
    let nx = RopeStyle::NeoX;
    let cases = [
        (
            [1usize, 32usize, 4usize, 128usize],
            9usize,
            5usize,
            Rope { style: nx, offset: 0, dims: 128, theta: 1e6 },
        ),
        ([3, 32, 4, 128], 9, 6, Rope { style: nx, offset: 0, dims: 128, theta: 1e6 }),
        ([2, 3, 2, 512], 4, 1, Rope { style: nx, offset: 0, dims: 512, theta: 1e4 }),
        ([2, 3, 2, 10], 5, 0, Rope { style: RopeStyle::Interleaved, offset: 2, dims: 6, theta: 1e4 }),
    ];
    for (dims @ [n, hq, hkv, d], s, row0, spec) in cases {
        let case = format!("norm_ropes_to_cache {dims:?} into {s} rows at {row0}");
        let xs = [
            cx.rng.normals(n * hq * d, 3.0),
            cx.rng.normals(n * hkv * d, 3.0),
            cx.rng.normals(n * hkv * d, 1.0),
        ];
        let ws = [(); 2].map(|_| (0..d).map(|_| cx.rng.range(0.5, 1.5)).collect::<Vec<f32>>());
        let pos: Vec<u32> = (0..n).map(|_| cx.rng.below(32768) as u32).collect();
        let caches0 = [(); 2].map(|_| cx.rng.normals(s * hkv * d, 1.0));
        let want = run_norm_ropes_to_cache(&RefBackend, &xs, dims, &ws, &pos, spec, &caches0, row0)
            .or_fail(&cx, &case)?;
        let got =
            run_norm_ropes_to_cache(b, &xs, dims, &ws, &pos, spec, &caches0, row0).or_fail(&cx, &case)?;
        for (i, what) in ["q", "k cache", "v cache"].iter().enumerate() {
            close(&cx, &format!("{case}, {what}"), &got[i], &want[i], TOL_ROPE.max(tol_sum(d)))?;
        }
        let past = run_norm_ropes_to_cache(b, &xs, dims, &ws, &pos, spec, &caches0, s - n + 1);
        if past.is_ok() {
            return Err(cx.fail(&case, format!("a write at row {} of {s} was accepted", s - n + 1)));
        }
    }
    Ok(())
}

/// MLA's split + norm + RoPE against the reference's slices, norm and rotation: GLM's query
/// heads (20 x 256 at 192, no norm) and its kv row (576 at 512, normed), at one and three
/// tokens; a partial rotation in both styles; a row too wide for GPU backends' one-pass kernels.
pub fn check_split_rope<B: Backend>(b: &B, seed: u64) -> Check {
    let mut cx = Ctx::new(seed);
    let il = RopeStyle::Interleaved;
    let nx = RopeStyle::NeoX;
    let glm = Rope { style: il, offset: 0, dims: 64, theta: 1e6 };
    let cases = [
        ([1usize, 20usize, 256usize], 192usize, false, glm),
        ([3, 20, 256], 192, false, glm),
        ([1, 1, 576], 512, true, glm),
        ([3, 1, 576], 512, true, glm),
        ([3, 3, 14], 4, true, Rope { style: nx, offset: 2, dims: 6, theta: 1e4 }),
        ([2, 2, 14], 5, false, Rope { style: il, offset: 1, dims: 6, theta: 1e4 }),
        ([2, 1, 2112], 2048, true, Rope { style: nx, offset: 0, dims: 64, theta: 1e4 }),
    ];
    for (shape, a, normed, spec) in cases {
        let case = format!("split_rope {shape:?} at {a}, norm {normed}, {spec:?}");
        let mut xs = cx.rng.normals(shape.iter().product(), 3.0);
        xs[0] = 0.0;
        let w: Vec<f32> = (0..a).map(|_| cx.rng.range(0.5, 1.5)).collect();
        let mut pos: Vec<u32> = (0..shape[0]).map(|_| cx.rng.below(32768) as u32).collect();
        // Position 0 (no rotation) too, but not as a one-token case's only position.
        if pos.len() > 1 {
            pos[0] = 0;
        }
        let split = |r: &B| -> crate::Result<[Out; 2]> {
            let p = up_u(r, &pos, &[pos.len()])?;
            let wt = up(r, &w, &[a])?;
            let norm = normed.then_some((&wt, 1e-6f32));
            let (first, rest) = r.split_rope(&up(r, &xs, &shape)?, a, norm, &p, spec)?;
            Ok([fetch(r, &first)?, fetch(r, &rest)?])
        };
        let want = (|| -> crate::Result<[Out; 2]> {
            let r = RefBackend;
            let p = up_u(&r, &pos, &[pos.len()])?;
            let x = up(&r, &xs, &shape)?;
            let first = r.slice_cols(&x, 0, a)?;
            let first = if normed { r.rms_norm(&first, &up(&r, &w, &[a])?, 1e-6)? } else { first };
            let rest = r.rope(&r.slice_cols(&x, a, shape[2] - a)?, &p, spec)?;
            Ok([fetch(&r, &first)?, fetch(&r, &rest)?])
        })()
        .or_fail(&cx, &case)?;
        let got = split(b).or_fail(&cx, &case)?;
        close(&cx, &format!("{case}, first part"), &got[0], &want[0], TOL_ROPE.max(tol_sum(a)))?;
        close(&cx, &format!("{case}, rotated part"), &got[1], &want[1], TOL_ROPE)?;
        if shape[1] != 1 {
            continue;
        }
        // The same split into cache rows (random around them) with MLA's query heads split
        // beside it, against the reference's splits and two writes: a query that fits GPU
        // backends' one-pass kernel and one too wide for it (3 tokens); a write past the cache
        // is an error.
        let (n, c) = (shape[0], shape[2]);
        let (rows, row0) = (n + 3, 2);
        let kv = SplitCase { xs: &xs, shape, a, w: normed.then_some(&w[..]) };
        let qa = if n == 3 { 1040 } else { 16 };
        let qd = qa + spec.offset + spec.dims;
        let qs = cx.rng.normals(n * 4 * qd, 3.0);
        let q = SplitCase { xs: &qs, shape: [n, 4, qd], a: qa, w: None };
        let cache0 = cx.rng.normals(rows * c, 1.0);
        let case = format!("{case}, into a cache beside a query split [{n}, 4, {qd}] at {qa}");
        let want = split_to_cache(&RefBackend, &q, &kv, &pos, spec, &cache0, row0).or_fail(&cx, &case)?;
        let got = split_to_cache(b, &q, &kv, &pos, spec, &cache0, row0).or_fail(&cx, &case)?;
        close(&cx, &format!("{case}: cache"), &got[0], &want[0], TOL_ROPE.max(tol_sum(a)))?;
        close(&cx, &format!("{case}: query, first part"), &got[1], &want[1], TOL_ROPE)?;
        close(&cx, &format!("{case}: query, rotated part"), &got[2], &want[2], TOL_ROPE)?;
        if split_to_cache(b, &q, &kv, &pos, spec, &cache0, rows - n + 1).is_ok() {
            return Err(cx.fail(&case, format!("a write at row {} of {rows} was accepted", rows - n + 1)));
        }
    }
    Ok(())
}

/// One split_rope input of a conformance case: values, shape `[n, H, C]`, split column, norm
/// weight (eps 1e-6) when normed.
struct SplitCase<'a> {
    xs: &'a [f32],
    shape: [usize; 3],
    a: usize,
    w: Option<&'a [f32]>,
}

/// `split_rope_and_cache` of q and kv into a copy of `cache0` (`[S, C]`) at `row0`: the cache,
/// then q's two parts.
fn split_to_cache<X: Backend>(
    x: &X,
    q: &SplitCase,
    kv: &SplitCase,
    pos: &[u32],
    spec: Rope,
    cache0: &[f32],
    row0: usize,
) -> crate::Result<[Out; 3]> {
    let c = kv.shape[2];
    let p = up_u(x, pos, &[pos.len()])?;
    let cache = up(x, cache0, &[cache0.len() / c, c])?;
    let input = |s: &SplitCase| -> crate::Result<(T<X>, Option<T<X>>)> {
        Ok((up(x, s.xs, &s.shape)?, s.w.map(|w| up(x, w, &[w.len()])).transpose()?))
    };
    let ((qx, qw), (kx, kw)) = (input(q)?, input(kv)?);
    let (qn, kn) = (qw.as_ref().map(|w| (w, 1e-6f32)), kw.as_ref().map(|w| (w, 1e-6f32)));
    let (first, rest) = x.split_rope_and_cache((&qx, q.a, qn), (&kx, kv.a, kn), &p, spec, &cache, row0)?;
    Ok([fetch(x, &cache)?, fetch(x, &first)?, fetch(x, &rest)?])
}

/// Softmax on wide rows, rows whose max would overflow `exp` without max subtraction, and a
/// row of equal values.
pub fn check_softmax<B: Backend>(b: &B, seed: u64) -> Check {
    let mut cx = Ctx::new(seed);
    for shape in [[3usize, 1000], [5, 7], [2, 151936]] {
        let case = format!("softmax {shape:?}");
        let mut xs = cx.rng.normals(shape[0] * shape[1], 4.0);
        let c = shape[1];
        for v in &mut xs[..c] {
            *v += 100.0;
        }
        for v in &mut xs[c..2 * c] {
            *v = 0.25;
        }
        let want = unary(&RefBackend, &xs, &shape, |x, t| x.softmax(t)).or_fail(&cx, &case)?;
        let got = unary(b, &xs, &shape, |x, t| x.softmax(t)).or_fail(&cx, &case)?;
        close(&cx, &case, &got, &want, tol_sum(c).max(TOL_ELEMENTWISE))?;
    }
    Ok(())
}

fn run_add<X: Backend>(x: &X, a: &[f32], c: &[f32], shape: &[usize]) -> crate::Result<Out> {
    fetch(x, &x.add(&up(x, a, shape)?, &up(x, c, shape)?)?)
}

/// `add` (exact: one IEEE addition per element) and `silu_mul` at the models' intermediate sizes
/// and an odd one, gates up to ±40 (exp overflow territory for naive formulas).
pub fn check_elementwise<B: Backend>(b: &B, seed: u64) -> Check {
    let mut cx = Ctx::new(seed);
    for shape in [[3usize, 2048], [1, 7]] {
        let case = format!("add {shape:?}");
        let n = shape[0] * shape[1];
        let (a, c) = (cx.rng.normals(n, 1.0), cx.rng.normals(n, 1.0));
        let want = run_add(&RefBackend, &a, &c, &shape).or_fail(&cx, &case)?;
        let got = run_add(b, &a, &c, &shape).or_fail(&cx, &case)?;
        exact(&cx, &case, &got, &want)?;
    }
    for shape in [vec![3usize, 2 * 768], vec![2, 2 * 1536], vec![2, 3, 2 * 37]] {
        let case = format!("silu_mul {shape:?}");
        let xs = cx.rng.normals(shape.iter().product(), 10.0);
        let want = unary(&RefBackend, &xs, &shape, |x, t| x.silu_mul(t)).or_fail(&cx, &case)?;
        let got = unary(b, &xs, &shape, |x, t| x.silu_mul(t)).or_fail(&cx, &case)?;
        close(&cx, &case, &got, &want, TOL_ELEMENTWISE)?;
    }
    Ok(())
}

fn run_concat<X: Backend>(x: &X, parts: &[(Vec<f32>, [usize; 2])]) -> crate::Result<Out> {
    let ts = parts.iter().map(|(v, s)| up(x, v, s)).collect::<crate::Result<Vec<_>>>()?;
    fetch(x, &x.concat_rows(&ts.iter().collect::<Vec<_>>())?)
}

/// slice_cols, slice_rows, concat_rows, write_rows: bit-exact.
pub fn check_data_movement<B: Backend>(b: &B, seed: u64) -> Check {
    let mut cx = Ctx::new(seed);
    let shape = [6usize, 4, 10];
    let xs = cx.rng.normals(240, 1.0);
    for (start, len) in [(0, 10), (3, 5), (9, 1), (0, 0)] {
        let case = format!("slice_cols {shape:?} {start}+{len}");
        let want = unary(&RefBackend, &xs, &shape, |x, t| x.slice_cols(t, start, len)).or_fail(&cx, &case)?;
        let got = unary(b, &xs, &shape, |x, t| x.slice_cols(t, start, len)).or_fail(&cx, &case)?;
        exact(&cx, &case, &got, &want)?;
    }
    for (start, len) in [(0, 6), (2, 3), (5, 1)] {
        let case = format!("slice_rows {shape:?} {start}+{len}");
        let want = unary(&RefBackend, &xs, &shape, |x, t| x.slice_rows(t, start, len)).or_fail(&cx, &case)?;
        let got = unary(b, &xs, &shape, |x, t| x.slice_rows(t, start, len)).or_fail(&cx, &case)?;
        exact(&cx, &case, &got, &want)?;
    }
    {
        let case = "concat_rows";
        let parts: Vec<(Vec<f32>, [usize; 2])> =
            [1usize, 3, 2].iter().map(|&r| (cx.rng.normals(r * 12, 1.0), [r, 12])).collect();
        let want = run_concat(&RefBackend, &parts).or_fail(&cx, case)?;
        let got = run_concat(b, &parts).or_fail(&cx, case)?;
        exact(&cx, case, &got, &want)?;
    }
    // KV-cache style writes: a 3-D cache viewed [S, C] and a 2-D one, at a row and column offset.
    let cases: [(&[usize], &[usize], usize, usize); 3] =
        [(&[10, 24], &[3, 8], 4, 8), (&[10, 2, 12], &[2, 2, 12], 7, 0), (&[5, 7], &[1, 7], 0, 0)];
    for (dshape, sshape, row0, col0) in cases {
        let case = format!("write_rows {sshape:?} into {dshape:?} at ({row0}, {col0})");
        let d0 = cx.rng.normals(dshape.iter().product(), 1.0);
        let s = cx.rng.normals(sshape.iter().product(), 1.0);
        let want = {
            let r = RefBackend;
            let dt = up(&r, &d0, dshape).or_fail(&cx, &case)?;
            r.write_rows(&dt, &up(&r, &s, sshape).or_fail(&cx, &case)?, row0, col0).or_fail(&cx, &case)?;
            fetch(&r, &dt).or_fail(&cx, &case)?
        };
        let dt = up(b, &d0, dshape).or_fail(&cx, &case)?;
        b.write_rows(&dt, &up(b, &s, sshape).or_fail(&cx, &case)?, row0, col0).or_fail(&cx, &case)?;
        exact(&cx, &case, &fetch(b, &dt).or_fail(&cx, &case)?, &want)?;
    }
    // write_rows_many: Qwen3's key and value caches (two destinations) and GLM's latent and
    // rotary key into one cache row (one destination, two column ranges), against write_rows.
    for same_dst in [false, true] {
        let case = format!("write_rows_many, one destination {same_dst}");
        let (dshape, parts) = ([9usize, 20], [([2usize, 12], 5usize, 0usize), ([2, 8], 5, 12)]);
        let d0: Vec<Vec<f32>> = (0..2).map(|_| cx.rng.normals(180, 1.0)).collect();
        let srcs: Vec<Vec<f32>> = parts.iter().map(|(s, ..)| cx.rng.normals(s[0] * s[1], 1.0)).collect();
        let want =
            write_pair(&RefBackend, &d0, &srcs, &dshape, &parts, same_dst, false).or_fail(&cx, &case)?;
        let got = write_pair(b, &d0, &srcs, &dshape, &parts, same_dst, true).or_fail(&cx, &case)?;
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            exact(&cx, &format!("{case}, destination {i}"), g, w)?;
        }
    }
    Ok(())
}

/// Writes `srcs` (shapes, rows and columns in `parts`) into fresh caches from `d0` (the first for
/// both when `same_dst`), with `write_rows_many` when `many`, else one `write_rows` each; returns
/// the caches.
fn write_pair<X: Backend>(
    x: &X,
    d0: &[Vec<f32>],
    srcs: &[Vec<f32>],
    dshape: &[usize],
    parts: &[([usize; 2], usize, usize); 2],
    same_dst: bool,
    many: bool,
) -> crate::Result<Vec<Out>> {
    let dsts = [up(x, &d0[0], dshape)?, up(x, &d0[1], dshape)?];
    let ss = [up(x, &srcs[0], &parts[0].0)?, up(x, &srcs[1], &parts[1].0)?];
    let d1 = if same_dst { &dsts[0] } else { &dsts[1] };
    let writes = [(&dsts[0], &ss[0], parts[0].1, parts[0].2), (d1, &ss[1], parts[1].1, parts[1].2)];
    if many {
        x.write_rows_many(&writes)?;
    } else {
        for (d, s, r, c) in writes {
            x.write_rows(d, s, r, c)?;
        }
    }
    dsts.iter().map(|d| fetch(x, d)).collect()
}

// ---- checks: routers, top_k, argmax --------------------------------------------------------------

/// Smallest gap between consecutive values among the `m` largest of `row`.
fn top_gap(row: &[f32], m: usize) -> f32 {
    let idx = crate::reference::top_k_indices(row, m.min(row.len()));
    idx.windows(2).map(|w| row[w[0]] - row[w[1]]).fold(f32::INFINITY, f32::min)
}

/// Logit gap kept between the k+1 best candidates. Softmax is monotonic, so a logit gap of 1e-3
/// is a probability ratio of 1.001 — 10^4 times the f32 rounding of the computation.
const ROUTER_MARGIN: f32 = 1e-3;

fn run_route_softmax<X: Backend>(
    x: &X,
    l: &[f32],
    shape: &[usize],
    k: usize,
    renorm: bool,
) -> crate::Result<(OutU, Out)> {
    let (ids, w) = x.route_softmax(&up(x, l, shape)?, k, renorm)?;
    Ok((fetch_u(x, &ids)?, fetch(x, &w)?))
}

/// Softmax router: Qwen3 (128 experts, top-8) with and without renormalisation, small k, and a
/// row with exact ties (resolved to the lower id).
pub fn check_route_softmax<B: Backend>(b: &B, seed: u64) -> Check {
    let mut cx = Ctx::new(seed);
    for (n, e, k) in [(5usize, 128usize, 8usize), (4, 64, 4), (3, 10, 1), (2, 10, 10)] {
        for renorm in [true, false] {
            let case = format!("route_softmax [{n}, {e}] top-{k} renorm {renorm}");
            let mut l = Vec::with_capacity(n * e);
            for _ in 0..n {
                let row = loop {
                    let r = cx.rng.normals(e, 2.0);
                    if top_gap(&r, k + 1) >= ROUTER_MARGIN {
                        break r;
                    }
                };
                l.extend(row);
            }
            if k < e {
                // Exact ties across the selection boundary of row 0: equal values give equal
                // probabilities on any backend, and the lower id must win.
                let top = crate::reference::top_k_indices(&l[..e], k);
                let last = top[k - 1];
                let tied = (0..e).find(|i| !top.contains(i) && *i < last);
                if let Some(t) = tied {
                    l[t] = l[last];
                }
            }
            let (wi, ww) = run_route_softmax(&RefBackend, &l, &[n, e], k, renorm).or_fail(&cx, &case)?;
            let (gi, gw) = run_route_softmax(b, &l, &[n, e], k, renorm).or_fail(&cx, &case)?;
            exact_u(&cx, &format!("{case} ids"), &gi, &wi)?;
            close(&cx, &format!("{case} weights"), &gw, &ww, TOL_ROUTER)?;
        }
    }
    Ok(())
}

fn run_route_sigmoid<X: Backend>(
    x: &X,
    l: &[f32],
    bias: &[f32],
    n: usize,
    spec: GroupedRouter,
) -> crate::Result<(OutU, Out)> {
    let e = bias.len();
    let (ids, w) = x.route_sigmoid_grouped(&up(x, l, &[n, e])?, &up(x, bias, &[e])?, spec)?;
    Ok((fetch_u(x, &ids)?, fetch(x, &w)?))
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Builds one router row whose decisions are robust: biased scores have a margin of
/// [`ROUTER_MARGIN`] between the k+1 best kept candidates, and group scores between the kept and
/// the best dropped group. Returns None when this draw has a near tie (the caller redraws).
fn grouped_row(rng: &mut Rng, bias: &[f32], spec: GroupedRouter) -> Option<Vec<f32>> {
    let e = bias.len();
    let per = e / spec.n_group;
    let l = rng.normals(e, 2.0);
    let biased: Vec<f32> = l.iter().zip(bias).map(|(&x, b)| sigmoid(x) + b).collect();
    let gs: Vec<f32> = biased
        .chunks(per)
        .map(|g| crate::reference::top_k_indices(g, 2).iter().map(|&i| g[i]).sum())
        .collect();
    if spec.topk_group < spec.n_group && top_gap(&gs, spec.topk_group + 1) < ROUTER_MARGIN {
        return None;
    }
    let kept = crate::reference::top_k_indices(&gs, spec.topk_group);
    let cand: Vec<f32> =
        (0..e).map(|i| if kept.contains(&(i / per)) { biased[i] } else { f32::NEG_INFINITY }).collect();
    let m = (spec.k + 1).min(spec.topk_group * per);
    if top_gap(&cand, m) < ROUTER_MARGIN {
        return None;
    }
    Some(l)
}

/// Draws of router rows before check_route_sigmoid_grouped gives up finding one the bias
/// matters on.
const BIAS_DRAWS: usize = 100;

/// Sigmoid router with correction bias and group-limited top-k: GLM-4.7-Flash (64 experts,
/// 1 group, top-4, ×1.8, renormalised), DeepSeek-style groups (8 groups, 4 kept), and no
/// renormalisation. The bias is large enough to change selections, and the check draws rows
/// until it changes at least one, so the unbiased-weights rule is really exercised.
pub fn check_route_sigmoid_grouped<B: Backend>(b: &B, seed: u64) -> Check {
    let mut cx = Ctx::new(seed);
    let specs = [
        (64, GroupedRouter { k: 4, n_group: 1, topk_group: 1, renormalize: true, scale: 1.8 }),
        (64, GroupedRouter { k: 4, n_group: 8, topk_group: 4, renormalize: true, scale: 1.8 }),
        (64, GroupedRouter { k: 8, n_group: 8, topk_group: 3, renormalize: false, scale: 2.5 }),
        (16, GroupedRouter { k: 1, n_group: 4, topk_group: 1, renormalize: true, scale: 1.0 }),
    ];
    let n = 6;
    for (e, spec) in specs {
        let case = format!("route_sigmoid_grouped E={e} {spec:?}");
        let bias: Vec<f32> = (0..e).map(|_| cx.rng.range(-0.3, 0.3)).collect();
        let zero = vec![0.0; e];
        let sets = |o: &OutU| -> Vec<Vec<u32>> {
            o.v.chunks(spec.k)
                .map(|c| {
                    let mut s = c.to_vec();
                    s.sort();
                    s
                })
                .collect()
        };
        // Rows on which the bias changes at least one selection (with few experts and k = 1 a
        // random draw sometimes has none: then the bias would go untested, so draw again).
        let mut drawn = None;
        for _ in 0..BIAS_DRAWS {
            let mut l = Vec::with_capacity(n * e);
            for _ in 0..n {
                let row = loop {
                    if let Some(r) = grouped_row(&mut cx.rng, &bias, spec) {
                        break r;
                    }
                };
                l.extend(row);
            }
            let (wi, ww) = run_route_sigmoid(&RefBackend, &l, &bias, n, spec).or_fail(&cx, &case)?;
            let (ui, _) = run_route_sigmoid(&RefBackend, &l, &zero, n, spec).or_fail(&cx, &case)?;
            if sets(&ui) != sets(&wi) {
                drawn = Some((l, wi, ww));
                break;
            }
        }
        let Some((l, wi, ww)) = drawn else {
            return Err(
                cx.fail(&case, format!("suite bug: the bias changed no selection in {BIAS_DRAWS} draws"))
            );
        };
        let (gi, gw) = run_route_sigmoid(b, &l, &bias, n, spec).or_fail(&cx, &case)?;
        exact_u(&cx, &format!("{case} ids"), &gi, &wi)?;
        close(&cx, &format!("{case} weights"), &gw, &ww, TOL_ROUTER)?;
    }
    Ok(())
}

/// argmax and top_k: exact (the same input values on both sides), on Qwen's vocabulary width and
/// on rows with exact ties.
pub fn check_argmax_top_k<B: Backend>(b: &B, seed: u64) -> Check {
    let mut cx = Ctx::new(seed);
    for (n, v) in [(4usize, 151936usize), (4, 10), (3, 1), (2, 5000)] {
        let mut xs = cx.rng.normals(n * v, 3.0);
        if v == 5000 {
            // Row 0: its best are zeros of both signs (equal: the lower index first), the rest
            // negative.
            for x in &mut xs[..v] {
                *x = -x.abs() - 1.0;
            }
            xs[4000] = -0.0;
            xs[100] = 0.0;
            xs[2500] = -0.0;
        }
        if v >= 10 {
            // Row 1: ties everywhere.
            for (i, x) in xs[v..2 * v].iter_mut().enumerate() {
                *x = (i % 3) as f32;
            }
        }
        if v > 100_000 {
            // Logits-wide rows, which GPU backends may split into chunks. Row 0: NaN here and
            // there and its largest value twice, far apart (the lower index wins); row 2: only
            // -inf and NaN (index 0 wins); row 3: its largest value last.
            for i in (0..v).step_by(997) {
                xs[i] = f32::NAN;
            }
            xs[v - 5] = 50.0;
            xs[70_001] = 50.0;
            // Large values on both sides of power-of-two boundaries (chunk edges of GPU
            // kernels), two of them equal across one.
            for (j, i) in [1023usize, 1024, 2047, 2048, 4095, 4096, 8191, 8192].into_iter().enumerate() {
                xs[i] = 40.0 + j as f32;
            }
            xs[2048] = xs[2047];
            for (i, x) in xs[2 * v..3 * v].iter_mut().enumerate() {
                *x = if i % 7 == 3 { f32::NAN } else { f32::NEG_INFINITY };
            }
            xs[4 * v - 1] = 60.0;
        }
        let shape = [n, v];
        let case = format!("argmax {shape:?}");
        let want = fetch_u(
            &RefBackend,
            &RefBackend.argmax(&up(&RefBackend, &xs, &shape).or_fail(&cx, &case)?).or_fail(&cx, &case)?,
        )
        .or_fail(&cx, &case)?;
        let got = fetch_u(b, &b.argmax(&up(b, &xs, &shape).or_fail(&cx, &case)?).or_fail(&cx, &case)?)
            .or_fail(&cx, &case)?;
        exact_u(&cx, &case, &got, &want)?;
        // k past 64 too: GPU backends run larger k on another kernel, and k from 16 sort.
        for k in [1, v.min(5), v.min(15), v.min(16), v.min(50), v.min(64), v.min(100)] {
            let case = format!("top_k {shape:?} k={k}");
            let (rv, ri) = RefBackend
                .top_k(&up(&RefBackend, &xs, &shape).or_fail(&cx, &case)?, k)
                .or_fail(&cx, &case)?;
            let (bv, bi) = b.top_k(&up(b, &xs, &shape).or_fail(&cx, &case)?, k).or_fail(&cx, &case)?;
            exact_u(
                &cx,
                &case,
                &fetch_u(b, &bi).or_fail(&cx, &case)?,
                &fetch_u(&RefBackend, &ri).or_fail(&cx, &case)?,
            )?;
            exact(
                &cx,
                &case,
                &fetch(b, &bv).or_fail(&cx, &case)?,
                &fetch(&RefBackend, &rv).or_fail(&cx, &case)?,
            )?;
        }
    }
    Ok(())
}

/// weight_sums: bit-exact (the host's draw reads these sums), at several temperatures and
/// min-p floors, on Qwen's vocabulary width and on widths with a short last chunk; rows with
/// NaN, a +inf maximum, only -inf, and ties at the maximum.
pub fn check_weight_sums<B: Backend>(b: &B, seed: u64) -> Check {
    use crate::sampling::WeightSpec;
    let mut cx = Ctx::new(seed);
    let specs = [
        WeightSpec::new(1.0, 0.0),
        WeightSpec::new(0.7, 0.05),
        WeightSpec::new(0.01, 0.0),
        WeightSpec::new(100.0, 0.0),
        WeightSpec::new(1.3, 0.9),
    ];
    for (n, v) in [(5usize, 151936usize), (2, 151935), (3, 37), (1, 5)] {
        let mut xs = cx.rng.normals(n * v, 3.0);
        if n >= 5 {
            for i in (0..v).step_by(613) {
                xs[i] = f32::NAN; // row 0
            }
            xs[v + 77] = f32::INFINITY; // row 1: an infinite maximum
            for x in &mut xs[2 * v..3 * v] {
                *x = f32::NEG_INFINITY; // row 2
            }
            xs[3 * v + 10] = 20.0; // row 3: its maximum twice
            xs[4 * v - 1] = 20.0;
            for x in &mut xs[4 * v..5 * v] {
                *x *= 10.0; // row 4: a wide spread, most weights 0
            }
        }
        let shape = [n, v];
        for (si, &spec) in specs.iter().enumerate() {
            let case = format!("weight_sums {shape:?} spec {si} {spec:?}");
            let want = weight_sums_via(&RefBackend, &xs, &shape, 1, spec).or_fail(&cx, &case)?;
            let got = weight_sums_via(b, &xs, &shape, v.min(64), spec).or_fail(&cx, &case)?;
            exact(&cx, &case, &got, &want)?;
        }
    }
    Ok(())
}

/// weight_sums of `xs` with each row's maximum from the backend's own top-k.
fn weight_sums_via<X: Backend>(
    x: &X,
    xs: &[f32],
    shape: &[usize],
    k: usize,
    spec: crate::sampling::WeightSpec,
) -> crate::Result<Out> {
    let xt = up(x, xs, shape)?;
    let (top, _) = x.top_k(&xt, k)?;
    fetch(x, &x.weight_sums(&xt, &top, spec)?)
}

// ---- checks: MoE ----------------------------------------------------------------------------------

/// Host data of one MoE call.
struct MoeCase {
    name: String,
    n: usize,
    h: usize,
    k: usize,
    e: usize,
    /// `[n, h]` activations (bf16 values when `dtype` is bf16).
    x: Vec<f32>,
    /// How x is uploaded: f32, or bf16 (which backends must consume exactly).
    dtype: DType,
    /// `[n, k]` expert ids.
    ids: Vec<u32>,
    /// `[n, k]` routing weights.
    w: Vec<f32>,
}

fn run_moe<X: Backend>(
    x: &X,
    c: &MoeCase,
    gu: &X::Weight,
    dn: &X::Weight,
    shared: Option<(&X::Weight, &X::Weight)>,
    p: MoePath,
) -> crate::Result<Out> {
    let [xt, it, wt] = moe_inputs(x, c)?;
    let mw = MoeWeights { gate_up: gu, down: dn, n_experts: c.e, shared };
    fetch(x, &x.moe(&xt, &it, &wt, mw, p)?)
}

/// The case's x, ids and routing weights on `x`.
fn moe_inputs<X: Backend>(x: &X, c: &MoeCase) -> crate::Result<[T<X>; 3]> {
    Ok([up_act(x, &c.x, &[c.n, c.h], c.dtype)?, up_u(x, &c.ids, &[c.n, c.k])?, up(x, &c.w, &[c.n, c.k])?])
}

/// `moe_add_rms_norm` of the case onto residual `r` with norm weight `nw`: (sum, normed).
#[allow(clippy::too_many_arguments)]
fn run_moe_add_norm<X: Backend>(
    x: &X,
    c: &MoeCase,
    gu: &X::Weight,
    dn: &X::Weight,
    shared: Option<(&X::Weight, &X::Weight)>,
    p: MoePath,
    r: &[f32],
    nw: &[f32],
) -> crate::Result<[Out; 2]> {
    let [xt, it, wt] = moe_inputs(x, c)?;
    let mw = MoeWeights { gate_up: gu, down: dn, n_experts: c.e, shared };
    let (sum, y) =
        x.moe_add_rms_norm(&xt, &it, &wt, mw, p, &up(x, r, &[c.n, c.h])?, &up(x, nw, &[c.h])?, 1e-6)?;
    Ok([fetch(x, &sum)?, fetch(x, &y)?])
}

/// Runs every MoE path (and `Auto`) of `b` on the case against the reference, alone and with
/// the residual add and norm that follow it (`moe_add_rms_norm`).
fn moe_compare<B: Backend>(
    cx: &mut Ctx,
    b: &B,
    kind: WeightKind,
    inter: usize,
    shared_inter: Option<usize>,
    c: &MoeCase,
) -> Check {
    let case = format!(
        "moe {kind:?} {} (n={}, E={}, k={}, H={}, I={inter}, shared={shared_inter:?}, x {:?})",
        c.name, c.n, c.e, c.k, c.h, c.dtype
    );
    let gu = random_weight(&mut cx.rng, kind, c.e * 2 * inter, c.h).map_err(|e| cx.fail(&case, e))?;
    let dn = random_weight(&mut cx.rng, kind, c.e * c.h, inter).map_err(|e| cx.fail(&case, e))?;
    let (gub, gur) = both_weights(cx, &case, b, &gu)?;
    let (dnb, dnr) = both_weights(cx, &case, b, &dn)?;
    drop((gu, dn));
    let sh = match shared_inter {
        Some(s) => {
            let sgu = random_weight(&mut cx.rng, kind, 2 * s, c.h).map_err(|e| cx.fail(&case, e))?;
            let sdn = random_weight(&mut cx.rng, kind, c.h, s).map_err(|e| cx.fail(&case, e))?;
            Some((both_weights(cx, &case, b, &sgu)?, both_weights(cx, &case, b, &sdn)?))
        }
        None => None,
    };
    let sh_r = sh.as_ref().map(|((_, g), (_, d))| (g, d));
    let sh_b = sh.as_ref().map(|((g, _), (d, _))| (g, d));
    let want = run_moe(&RefBackend, c, &gur, &dnr, sh_r, MoePath::Auto).or_fail(cx, &case)?;
    let r = cx.rng.normals(c.n * c.h, 1.0);
    let nw: Vec<f32> = (0..c.h).map(|_| cx.rng.range(0.5, 1.5)).collect();
    let want_normed =
        run_moe_add_norm(&RefBackend, c, &gur, &dnr, sh_r, MoePath::Auto, &r, &nw).or_fail(cx, &case)?;
    let mut tol = tol_sum(c.h + inter.max(shared_inter.unwrap_or(0)));
    if c.dtype == DType::BF16 {
        tol += TOL_MOE_BF16;
    }
    for p in moe_paths_with_auto(b) {
        let cp = format!("{case} {p:?}");
        let got = run_moe(b, c, &gub, &dnb, sh_b, p).or_fail(cx, &cp)?;
        close(cx, &cp, &got, &want, tol)?;
        let [sum, y] = run_moe_add_norm(b, c, &gub, &dnb, sh_b, p, &r, &nw).or_fail(cx, &cp)?;
        close(cx, &format!("{cp}, added to a residual"), &sum, &want_normed[0], tol)?;
        close(cx, &format!("{cp}, added and normed"), &y, &want_normed[1], tol + tol_sum(c.h))?;
    }
    Ok(())
}

/// Routing weights as a router would make them (positive, not tiny).
fn route_weights(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.range(0.1, 1.0)).collect()
}

/// Small MoE shapes (H 64, I 32) with up to 70 tokens so that 32- and 64-token tiles mix
/// experts, and 200 whose experts span several tiles: every token on a different expert, all
/// tokens on one expert, experts without tokens, alternating experts, random top-1/4/8, experts
/// over 128 rows, with and without a shared expert, every weight kind.
pub fn check_moe_routing<B: Backend>(b: &B, seed: u64) -> Check {
    let mut cx = Ctx::new(seed);
    let (h, inter) = (64, 32);
    for kind in [WeightKind::Mxfp4, WeightKind::Nvfp4, WeightKind::Bf16] {
        let mut cases: Vec<(MoeCase, Option<usize>)> = Vec::new();
        let mut mk = |rng: &mut Rng, name: &str, n: usize, e: usize, k: usize, ids: Vec<u32>, shared| {
            let c = MoeCase {
                name: name.into(),
                n,
                h,
                k,
                e,
                x: rng.normals(n * h, 1.0),
                dtype: DType::F32,
                ids,
                w: route_weights(rng, n * k),
            };
            cases.push((c, shared));
        };
        let rng = &mut cx.rng;
        // 70 tokens on 70 distinct experts (top-1).
        let ids: Vec<u32> = rng.distinct(80, 70).into_iter().map(|i| i as u32).collect();
        mk(rng, "every token on a different expert", 70, 80, 1, ids, None);
        // 18 tokens x top-4 = 72 distinct (token, slot) experts.
        let ids: Vec<u32> = rng.distinct(72, 72).into_iter().map(|i| i as u32).collect();
        mk(rng, "every (token, slot) on a different expert", 18, 72, 4, ids, Some(64));
        // All tokens on expert 5 (top-1), then all on the same set of 4 in varying slot order.
        mk(rng, "all tokens on one expert", 70, 8, 1, vec![5; 70], None);
        let mut ids = Vec::new();
        for _ in 0..40 {
            let mut s = [5u32, 2, 7, 0];
            rng.shuffle(&mut s);
            ids.extend(s);
        }
        mk(rng, "all tokens on one expert set", 40, 8, 4, ids, Some(32));
        // Experts 6..15 get no tokens.
        let ids: Vec<u32> = (0..40).flat_map(|_| rng.distinct(6, 2)).map(|i| i as u32).collect();
        mk(rng, "experts without tokens", 40, 16, 2, ids, None);
        // Alternating experts: every tile of tokens holds two experts interleaved.
        let ids: Vec<u32> = (0..70).map(|t| (t % 2) as u32 * 3).collect();
        mk(rng, "alternating experts", 70, 4, 1, ids, Some(32));
        // Random routing, top-8 and top-4, with and without a shared expert.
        let ids: Vec<u32> = (0..70).flat_map(|_| rng.distinct(32, 8)).map(|i| i as u32).collect();
        mk(rng, "random top-8", 70, 32, 8, ids, Some(64));
        let ids: Vec<u32> = (0..33).flat_map(|_| rng.distinct(16, 4)).map(|i| i as u32).collect();
        mk(rng, "random top-4", 33, 16, 4, ids, None);
        let ids: Vec<u32> = (0..3).flat_map(|_| rng.distinct(16, 4)).map(|i| i as u32).collect();
        mk(rng, "decode-sized top-4", 3, 16, 4, ids, Some(32));
        let ids: Vec<u32> = vec![rng.below(16) as u32];
        mk(rng, "one token top-1", 1, 16, 1, ids, Some(32));
        // Experts taller than a 128-row tile: 150, 150, 90 and 10 rows (a GPU's tiles of 128
        // rows then end some experts with a shorter one).
        let ids: Vec<u32> = (0..200u32)
            .flat_map(|t| {
                let first = if t < 150 { 0 } else { 1 };
                let second = match t {
                    0..100 => 1,
                    100..140 | 150.. => 2,
                    _ => 3,
                };
                [first, second]
            })
            .collect();
        mk(rng, "experts over 128 rows", 200, 4, 2, ids, None);
        // bf16 x (a model's bf16 activations) on a grouped case with and without a shared
        // expert, and on one token: consumed exactly; the intermediate is rounded to bf16.
        let bf16: Vec<(MoeCase, Option<usize>)> = cases
            .iter()
            .filter(|(c, _)| {
                ["random top-8", "random top-4", "one token top-1", "experts over 128 rows"]
                    .contains(&c.name.as_str())
            })
            .map(|(c, sh)| {
                (
                    MoeCase {
                        x: bf16_round(&c.x),
                        dtype: DType::BF16,
                        ids: c.ids.clone(),
                        w: c.w.clone(),
                        name: c.name.clone(),
                        ..*c
                    },
                    *sh,
                )
            })
            .collect();
        for (c, shared) in cases.iter().chain(&bf16) {
            moe_compare(&mut cx, b, kind, inter, *shared, c)?;
        }
    }
    // Rows long enough for the decode products' unrolled steps (GPU backends take several
    // 8-element words per lane per step) and a remainder after them: H 1152, I 1088.
    for (n, kind) in [(1usize, WeightKind::Mxfp4), (3, WeightKind::Nvfp4)] {
        let (h, e, k) = (1152, 4, 2);
        let rng = &mut cx.rng;
        let ids: Vec<u32> = (0..n).flat_map(|_| rng.distinct(e, k)).map(|i| i as u32).collect();
        let c = MoeCase {
            name: format!("long rows, {n} tokens"),
            n,
            h,
            k,
            e,
            x: rng.normals(n * h, 1.0),
            dtype: DType::F32,
            ids,
            w: route_weights(rng, n * k),
        };
        moe_compare(&mut cx, b, kind, 1088, Some(1088), &c)?;
    }
    Ok(())
}

fn real_moe<B: Backend>(
    b: &B,
    seed: u64,
    name: &str,
    e: usize,
    inter: usize,
    k: usize,
    shared: Option<usize>,
) -> Check {
    let mut cx = Ctx::new(seed);
    let (h, n) = (2048, 3);
    for kind in FP4_KINDS {
        let rng = &mut cx.rng;
        let ids: Vec<u32> = (0..n).flat_map(|_| rng.distinct(e, k)).map(|i| i as u32).collect();
        let c = MoeCase {
            name: name.into(),
            n,
            h,
            k,
            e,
            x: rng.normals(n * h, 1.0),
            dtype: DType::F32,
            ids,
            w: route_weights(rng, n * k),
        };
        moe_compare(&mut cx, b, kind, inter, shared, &c)?;
    }
    Ok(())
}

/// Qwen3-30B-A3B's MoE: 128 experts, H 2048, I 768, top-8, 3 tokens.
pub fn check_moe_qwen_shape<B: Backend>(b: &B, seed: u64) -> Check {
    real_moe(b, seed, "qwen3_moe", 128, 768, 8, None)
}

/// GLM-4.7-Flash's MoE: 64 experts, H 2048, I 1536, top-4, shared expert I 1536, 3 tokens.
pub fn check_moe_glm_shape<B: Backend>(b: &B, seed: u64) -> Check {
    real_moe(b, seed, "glm4_moe_lite", 64, 1536, 4, Some(1536))
}

// ---- checks: attention ------------------------------------------------------------------------------

fn run_gqa<X: Backend>(
    x: &X,
    q: (&[f32], [usize; 3]),
    k: (&[f32], [usize; 3]),
    v: (&[f32], [usize; 3]),
    pos0: usize,
    scale: f32,
    bf16: bool,
) -> crate::Result<Out> {
    let (qt, kt, vt) = (up(x, q.0, &q.1)?, up(x, k.0, &k.1)?, up(x, v.0, &v.1)?);
    let out = if bf16 {
        x.attention_gqa_bf16(&qt, &kt, &vt, pos0, scale)?
    } else {
        x.attention_gqa(&qt, &kt, &vt, pos0, scale)?
    };
    fetch(x, &out)
}

/// Cache rows past the causal window hold large values, so attending beyond it cannot pass.
fn poison_tail(v: &mut [f32], row: usize, from_row: usize) {
    for x in v[from_row * row..].iter_mut() {
        *x = 1e3;
    }
}

/// GQA attention at Qwen3's layout (32 q / 4 kv heads, D 128): prefill with pos0 > 0, T > 1;
/// decode (T = 1) deep in the cache; the first token; and an odd case with Dv != D.
pub fn check_attention_gqa<B: Backend>(b: &B, seed: u64) -> Check {
    let mut cx = Ctx::new(seed);
    let cases = [
        (7usize, 5usize, 16usize, 32usize, 4usize, 128usize, 128usize),
        (1, 40, 48, 32, 4, 128, 128),
        // Long caches with few queries: GPU backends split the keys into ranges here.
        (1, 700, 720, 32, 4, 128, 128),
        (2, 333, 340, 32, 4, 128, 128),
        (1, 0, 4, 32, 4, 128, 128),
        (5, 0, 5, 32, 4, 128, 128),
        (3, 2, 8, 6, 2, 40, 24),
        // Keys wider than 128 (GPU backends have a separate kernel for up to 128).
        (2, 3, 9, 4, 2, 192, 64),
        (4, 1, 6, 3, 3, 16, 16),
        // Key width not a multiple of 4 (no vector loads).
        (3, 4, 9, 4, 2, 30, 20),
        // A cache much longer than the keys in use: GPU backends size the split grid by the cache
        // and leave the ranges past the keys empty.
        (1, 100, 2000, 32, 4, 128, 128),
        // 288 (query, head) rows: GPU backends take the unsplit (prefill) path; then a query
        // tile that ends past the queries, keys wider than that path takes, and a prefill
        // after a cached prefix.
        (9, 20, 40, 32, 4, 128, 128),
        (70, 0, 80, 8, 2, 64, 48),
        (9, 3, 20, 32, 4, 192, 64),
        (130, 70, 200, 4, 4, 128, 128),
        // Several query and key tiles of the bf16 kernels, with ragged ends.
        (300, 0, 300, 8, 2, 128, 128),
        (64, 1000, 1064, 4, 4, 128, 128),
        // Many rows with widths that are not whole tensor-core steps (GPU backends keep an f32
        // prefill kernel for them).
        (70, 2, 80, 8, 2, 36, 28),
    ];
    for (t, pos0, s, hq, hkv, d, dv) in cases {
        let case = format!("attention_gqa T={t} pos0={pos0} S={s} Hq={hq} Hkv={hkv} D={d} Dv={dv}");
        let q = cx.rng.normals(t * hq * d, 1.0);
        let mut k = cx.rng.normals(s * hkv * d, 1.0);
        let mut v = cx.rng.normals(s * hkv * dv, 1.0);
        poison_tail(&mut k, hkv * d, pos0 + t);
        poison_tail(&mut v, hkv * dv, pos0 + t);
        let scale = 1.0 / (d as f32).sqrt();
        let args = |q: &[f32], k: &[f32], v: &[f32]| {
            ((q.to_vec(), [t, hq, d]), (k.to_vec(), [s, hkv, d]), (v.to_vec(), [s, hkv, dv]))
        };
        let ((qv, qs), (kv, ks), (vv, vs)) = args(&q, &k, &v);
        let want =
            run_gqa(&RefBackend, (&qv, qs), (&kv, ks), (&vv, vs), pos0, scale, false).or_fail(&cx, &case)?;
        let got = run_gqa(b, (&qv, qs), (&kv, ks), (&vv, vs), pos0, scale, false).or_fail(&cx, &case)?;
        close(&cx, &case, &got, &want, 2.0 * tol_sum(d + pos0 + t))?;
        let c = format!("{case}, bf16 products");
        let got = run_gqa(b, (&qv, qs), (&kv, ks), (&vv, vs), pos0, scale, true).or_fail(&cx, &c)?;
        close(&cx, &c, &got, &want, TOL_BF16)?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn run_mla<X: Backend>(
    x: &X,
    ql: &[f32],
    qr: &[f32],
    cache: &[f32],
    dims: [usize; 5],
    pos0: usize,
    scale: f32,
    bf16: bool,
) -> crate::Result<Out> {
    let [t, h, l, r, s] = dims;
    let (a, bq, c) = (up(x, ql, &[t, h, l])?, up(x, qr, &[t, h, r])?, up(x, cache, &[s, l + r])?);
    let out = if bf16 {
        x.attention_mla_bf16(&a, &bq, &c, pos0, scale)?
    } else {
        x.attention_mla(&a, &bq, &c, pos0, scale)?
    };
    fetch(x, &out)
}

/// MLA attention at GLM-4.7-Flash's layout (20 heads, latent 512, rope 64, scale 1/16):
/// prefill with pos0 > 0, decode, the first token; and a small odd case.
pub fn check_attention_mla<B: Backend>(b: &B, seed: u64) -> Check {
    let mut cx = Ctx::new(seed);
    let cases = [
        (5usize, 3usize, 10usize, 20usize, 512usize, 64usize),
        (1, 30, 33, 20, 512, 64),
        (1, 600, 610, 20, 512, 64),
        (1, 0, 1, 20, 512, 64),
        (3, 2, 7, 3, 24, 8),
        (1, 50, 3000, 20, 512, 64),
        // At least 256 (query, head) rows: GPU backends take the tiled prefill path, whose
        // row tiles straddle queries; then an odd shape, and a prefill after a cached prefix.
        (20, 0, 24, 20, 512, 64),
        (90, 0, 100, 3, 24, 8),
        (40, 45, 100, 20, 512, 64),
        // Many rows with widths that are not whole tensor-core steps (the f32 prefill kernel).
        (90, 1, 100, 3, 20, 6),
    ];
    for (t, pos0, s, h, l, r) in cases {
        let case = format!("attention_mla T={t} pos0={pos0} S={s} H={h} L={l} R={r}");
        let ql = cx.rng.normals(t * h * l, 0.2);
        let qr = cx.rng.normals(t * h * r, 0.5);
        let mut cache = cx.rng.normals(s * (l + r), 1.0);
        poison_tail(&mut cache, l + r, pos0 + t);
        let scale = 1.0 / 16.0;
        let dims = [t, h, l, r, s];
        let want = run_mla(&RefBackend, &ql, &qr, &cache, dims, pos0, scale, false).or_fail(&cx, &case)?;
        let got = run_mla(b, &ql, &qr, &cache, dims, pos0, scale, false).or_fail(&cx, &case)?;
        close(&cx, &case, &got, &want, 2.0 * tol_sum(l + r + pos0 + t))?;
        let c = format!("{case}, bf16 products");
        let got = run_mla(b, &ql, &qr, &cache, dims, pos0, scale, true).or_fail(&cx, &c)?;
        close(&cx, &c, &got, &want, TOL_BF16)?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn run_mla_expanded<X: Backend>(
    x: &X,
    qn: &[f32],
    qr: &[f32],
    kv: &[f32],
    kr: &[f32],
    dims: [usize; 6],
    pos0: usize,
    scale: f32,
    bf16: bool,
) -> crate::Result<Out> {
    let [t, h, nope, r, dv, s] = dims;
    let a = up(x, qn, &[t, h, nope])?;
    let bq = up(x, qr, &[t, h, r])?;
    let c = up(x, kv, &[s, h, nope + dv])?;
    let d = up(x, kr, &[s, r])?;
    fetch(x, &x.attention_mla_expanded(&a, &bq, &c, &d, pos0, scale, bf16)?)
}

/// Expanded MLA attention: GLM-4.7-Flash's head widths (nope 192, rope 64, values 256) at a
/// first prefill, after a cached prefix, and at decode; smaller whole-mma widths; and widths that
/// are not (the fallbacks). Against the reference at f32 tolerance, and with bf16 products.
pub fn check_attention_mla_expanded<B: Backend>(b: &B, seed: u64) -> Check {
    let mut cx = Ctx::new(seed);
    let cases = [
        (70usize, 0usize, 70usize, 20usize, 192usize, 64usize, 256usize),
        (40, 45, 100, 4, 192, 64, 256),
        (150, 30, 180, 3, 192, 64, 256),
        (1, 9, 10, 20, 192, 64, 256),
        (90, 0, 96, 3, 16, 8, 24),
        (33, 5, 40, 2, 12, 6, 10),
    ];
    for (t, pos0, s, h, nope, r, dv) in cases {
        let case = format!("attention_mla_expanded T={t} pos0={pos0} S={s} H={h} N={nope} R={r} Dv={dv}");
        let qn = cx.rng.normals(t * h * nope, 0.2);
        let qr = cx.rng.normals(t * h * r, 0.5);
        let mut kv = cx.rng.normals(s * h * (nope + dv), 1.0);
        let mut kr = cx.rng.normals(s * r, 1.0);
        poison_tail(&mut kv, h * (nope + dv), pos0 + t);
        poison_tail(&mut kr, r, pos0 + t);
        let (dims, scale) = ([t, h, nope, r, dv, s], 1.0 / 16.0);
        let want = run_mla_expanded(&RefBackend, &qn, &qr, &kv, &kr, dims, pos0, scale, false)
            .or_fail(&cx, &case)?;
        let got = run_mla_expanded(b, &qn, &qr, &kv, &kr, dims, pos0, scale, false).or_fail(&cx, &case)?;
        close(&cx, &case, &got, &want, 2.0 * tol_sum(nope + r + pos0 + t))?;
        let c = format!("{case}, bf16 products");
        let got = run_mla_expanded(b, &qn, &qr, &kv, &kr, dims, pos0, scale, true).or_fail(&cx, &c)?;
        close(&cx, &c, &got, &want, TOL_BF16)?;
    }
    Ok(())
}

// ---- checks: bad input ------------------------------------------------------------------------------

/// Mis-shaped input is an `Err`, never a panic or garbage.
pub fn check_shape_errors<B: Backend>(b: &B, seed: u64) -> Check {
    let cx = Ctx::new(seed);
    let case = "shape errors";
    let f = |n: usize, shape: &[usize]| up(b, &vec![0.5; n], shape);
    let x = f(2 * 64, &[2, 64]).or_fail(&cx, case)?;
    let y = f(2 * 32, &[2, 32]).or_fail(&cx, case)?;
    let ids = up_u(b, &[0, 1], &[2, 1]).or_fail(&cx, case)?;
    let wts = f(2, &[2, 1]).or_fail(&cx, case)?;
    let hw = HostWeight::from_f32(8, 32, &[0.25; 256]);
    let w = b.upload_weight(&hw).or_fail(&cx, case)?;
    let rope = Rope { style: RopeStyle::NeoX, offset: 60, dims: 8, theta: 1e4 };
    let pos = up_u(b, &[0, 1], &[2]).or_fail(&cx, case)?;
    let x3 = x.reshape(&[2, 1, 64]).or_fail(&cx, case)?;
    let mw = MoeWeights { gate_up: &w, down: &w, n_experts: 2, shared: None };
    let results: Vec<(&str, bool)> = vec![
        ("linear with K 64 against [8, 32]", b.linear(&x, &w, LinearPath::Auto).is_err()),
        ("add of [2,64] and [2,32]", b.add(&x, &y).is_err()),
        ("rms_norm weight [32] on D 64", b.rms_norm(&x, &f(32, &[32]).or_fail(&cx, case)?, 1e-5).is_err()),
        ("rope dims 60..68 of a 64-wide head", b.rope(&x3, &pos, rope).is_err()),
        ("slice_cols past the end", b.slice_cols(&x, 60, 8).is_err()),
        ("slice_rows past the end", b.slice_rows(&x, 1, 2).is_err()),
        ("concat of [2,64] and [2,32]", b.concat_rows(&[&x, &y]).is_err()),
        ("write_rows past the last column", b.write_rows(&x, &y, 0, 40).is_err()),
        ("silu_mul of odd width", b.silu_mul(&f(3, &[1, 3]).or_fail(&cx, case)?).is_err()),
        ("top_k with k > V", b.top_k(&y, 33).is_err()),
        ("route_softmax with k > E", b.route_softmax(&y, 33, true).is_err()),
        ("moe with H 64 against gate_up of 32 columns", b.moe(&x, &ids, &wts, mw, MoePath::Auto).is_err()),
        ("attention_gqa with a cache shorter than pos0 + T", b.attention_gqa(&x3, &x3, &x3, 1, 1.0).is_err()),
    ];
    let missing: Vec<&str> = results.iter().filter(|(_, e)| !e).map(|(n, _)| *n).collect();
    if !missing.is_empty() {
        return Err(cx.fail(case, format!("accepted: {missing:?}")));
    }
    Ok(())
}

// ---- harness ----------------------------------------------------------------------------------------

/// Runs one check on an optional backend: `None` prints `skipped: no <device>` and passes.
/// Panics with the check's message on failure (this is the body of a generated `#[test]`).
pub fn run_check<B: Backend>(name: &str, device: &str, backend: Option<B>, check: fn(&B, u64) -> Check) {
    let Some(b) = backend else {
        println!("{name}: skipped: no {device}");
        return;
    };
    let s = seed();
    let t = std::time::Instant::now();
    match check(&b, s) {
        Ok(()) => println!("{name} on {}: ok in {:.2?} (seed {s})", b.name(), t.elapsed()),
        Err(e) => panic!("{name} on {}: {e}", b.name()),
    }
}

/// Generates one `#[test]` per conformance check for a backend.
///
/// `conformance_tests!(expr)` or `conformance_tests!(expr, "device name")`, where `expr` is an
/// `Option<B>` (evaluated once per test): `None` skips every test with `skipped: no <device>`.
#[macro_export]
macro_rules! conformance_tests {
    ($make:expr) => {
        $crate::conformance_tests!($make, "device");
    };
    ($make:expr, $device:expr) => {
        $crate::conformance_tests!(@each $make, $device;
            check_paths, check_memory, check_cast,
            check_linear_odd_shapes, check_linear_glm_shapes, check_linear_qwen_shapes,
            check_linear_router_shapes, check_head_linear, check_embedding,
            check_rms_norm, check_rope, check_norm_rope, check_norm_ropes_to_cache, check_split_rope, check_softmax,
            check_elementwise, check_data_movement,
            check_route_softmax, check_route_sigmoid_grouped, check_argmax_top_k, check_weight_sums,
            check_moe_routing, check_moe_qwen_shape, check_moe_glm_shape,
            check_attention_gqa, check_attention_mla, check_attention_mla_expanded, check_shape_errors);
    };
    (@each $make:expr, $device:expr; $($check:ident),* $(,)?) => {
        $(
            #[test]
            fn $check() {
                $crate::conformance::run_check(
                    stringify!($check),
                    $device,
                    $make,
                    $crate::conformance::$check,
                );
            }
        )*
    };
}
