// Helpers shared by every kernel (prepended after the generated FP4 snippet).

// Grids larger than the per-dimension limit (65535 workgroups) are split over x and y; kernels
// recover the flat workgroup index here and bound-check it against their element count.
fn flat_wg(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.y * nwg.x + wid.x;
}

fn bf16_to_f32(bits: u32) -> f32 {
    return bitcast<f32>((bits & 0xffffu) << 16u);
}

// Round to nearest even, as `half::bf16::from_f32` (and torch's cast) does; NaN stays NaN.
fn f32_to_bf16(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    if ((b & 0x7fffffffu) > 0x7f800000u) {
        return (b >> 16u) | 0x40u;
    }
    return (b + 0x7fffu + ((b >> 16u) & 1u)) >> 16u;
}

fn neg_inf() -> f32 {
    return bitcast<f32>(0xff800000u);
}

// Ranking key of top-k selections: NaN ranks below every number (as in the reference). NaN is
// found from its bits: shader compilers may fold `v != v` to false (lavapipe's does).
fn rank_key(v: f32) -> f32 {
    if ((bitcast<u32>(v) & 0x7fffffffu) > 0x7f800000u) {
        return neg_inf();
    }
    return v;
}

// True when (va, ia) comes before (vb, ib) in "descending value, ties to the lower index".
fn ranks_before(va: f32, ia: u32, vb: f32, ib: u32) -> bool {
    let a = rank_key(va);
    let b = rank_key(vb);
    return a > b || (a == b && ia < ib);
}

// sin and cos of an angle of any size: GPU sin/cos are only accurate on [-pi, pi], and angles
// reach pos * 1 rad, so reduce by 2*pi first. 2*pi is split into three f32 parts (the first
// with few significant bits) so that k * part is exact or nearly so for the k seen here.
fn sincos(a: f32) -> vec2<f32> {
    let k = round(a * 0.15915493667125702);
    var r = fma(-k, 6.28125, a);
    r = fma(-k, 0.0019353071693331003, r);
    r = fma(-k, 1.0253131677018246e-11, r);
    return vec2<f32>(sin(r), cos(r));
}

// RoPE pairing of rotated dim i of `dims` (see `fp4moe_ops::Rope`): its frequency index,
// whether it is its pair's first element, and the distance to its partner.
struct RopePair {
    f: u32,
    first: bool,
    dist: u32,
}

fn rope_pair(i: u32, dims: u32, interleaved: bool) -> RopePair {
    if (interleaved) {
        return RopePair(i / 2u, (i & 1u) == 0u, 1u);
    }
    let half = dims / 2u;
    let first = i < half;
    return RopePair(select(i - half, i, first), first, half);
}

// Element y rotated with its partner yp by the angle whose (sin, cos) is sc.
fn rope_rotate(y: f32, yp: f32, first: bool, sc: vec2<f32>) -> f32 {
    if (first) {
        return y * sc.y - yp * sc.x;
    }
    return y * sc.y + yp * sc.x;
}
