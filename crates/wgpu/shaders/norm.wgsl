// Row reductions: RMSNorm (alone and followed by RoPE) and softmax, one workgroup per row.

struct P {
    rows: u32,
    d: u32,
    eps: f32,
    // norm_rope: heads per token (rows are [n, heads]) and the rotation (see rope.wgsl).
    heads: u32,
    offset: u32,
    dims: u32,
    interleaved: u32,
    // norm_rope: rows of the first input (the rest are the second's), the second's eps and
    // heads per token.
    rows0: u32,
    eps1: f32,
    heads1: u32,
    // split_rope: the first part's width, and whether it is normed.
    split: u32,
    normed: u32,
}

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<storage, read> pos: array<u32>;
@group(0) @binding(5) var<storage, read> inv_freq: array<f32>;
// add_rms_norm: the second addend and the sum.
@group(0) @binding(6) var<storage, read> xb: array<f32>;
@group(0) @binding(7) var<storage, read_write> sum_out: array<f32>;
// norm_rope: the second input, its weight and its output (split_rope: out1, the rotated part).
@group(0) @binding(8) var<storage, read> x1: array<f32>;
@group(0) @binding(9) var<storage, read> w1: array<f32>;
@group(0) @binding(10) var<storage, read_write> out1: array<f32>;
var<workgroup> red: array<f32, WG>;

fn reduce_sum(lid: u32, v: f32) -> f32 {
    red[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s / 2u) {
        if (lid < s) {
            red[lid] += red[lid + s];
        }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

fn reduce_max(lid: u32, v: f32) -> f32 {
    red[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s / 2u) {
        if (lid < s) {
            red[lid] = max(red[lid], red[lid + s]);
        }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

// Elements of a row one thread holds in registers: rows up to ROW_REGS * WG wide (2048, both
// models' hidden size) are loaded in one unrolled pass, every load in flight at once. A strided
// loop with a runtime trip count waits out a memory round trip per element (rms_norm of one
// 2048-wide row took ~5 µs above an empty kernel on the H100). Wider rows take the loops.
const ROW_REGS: u32 = 8u;

// out = w * v * rsqrt(mean(v²) + eps) for a row held as `v` (elements lid + k * WG); the
// squares are summed in the order the strided loops use.
fn norm_regs(lid: u32, base: u32, v: array<f32, ROW_REGS>) {
    var wr: array<f32, ROW_REGS>;
    var s = 0.0;
    for (var k = 0u; k < ROW_REGS; k++) {
        let i = lid + k * WG;
        if (i < p.d) {
            wr[k] = w[i];
            s += v[k] * v[k];
        }
    }
    let r = 1.0 / sqrt(reduce_sum(lid, s) / f32(p.d) + p.eps);
    for (var k = 0u; k < ROW_REGS; k++) {
        let i = lid + k * WG;
        if (i < p.d) {
            out[base + i] = wr[k] * (v[k] * r);
        }
    }
}

// 1 / sqrt(mean(x²) + eps) of the row at base (every thread gets it).
fn row_rms_inv(lid: u32, base: u32) -> f32 {
    var s = 0.0;
    for (var i = lid; i < p.d; i += WG) {
        s += x[base + i] * x[base + i];
    }
    return 1.0 / sqrt(reduce_sum(lid, s) / f32(p.d) + p.eps);
}

@compute @workgroup_size(WG)
fn rms_norm(@builtin(local_invocation_id) lid3: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>,
            @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = flat_wg(wid, nwg);
    let lid = lid3.x;
    if (row >= p.rows) {
        return;
    }
    let base = row * p.d;
    if (p.d <= ROW_REGS * WG) {
        var v: array<f32, ROW_REGS>;
        for (var k = 0u; k < ROW_REGS; k++) {
            let i = lid + k * WG;
            if (i < p.d) {
                v[k] = x[base + i];
            }
        }
        norm_regs(lid, base, v);
        return;
    }
    let r = row_rms_inv(lid, base);
    for (var i = lid; i < p.d; i += WG) {
        out[base + i] = w[i] * (x[base + i] * r);
    }
}

// (x + xb, rms_norm(x + xb)) per row: a residual add and the norm of its sum in one dispatch.
// The second pass adds again rather than reading sum_out back, which would need a storage
// barrier; the rounded f32 sum is the same.
@compute @workgroup_size(WG)
fn add_rms_norm(@builtin(local_invocation_id) lid3: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>,
                @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = flat_wg(wid, nwg);
    let lid = lid3.x;
    if (row >= p.rows) {
        return;
    }
    let base = row * p.d;
    if (p.d <= ROW_REGS * WG) {
        var v: array<f32, ROW_REGS>;
        for (var k = 0u; k < ROW_REGS; k++) {
            let i = lid + k * WG;
            if (i < p.d) {
                v[k] = x[base + i] + xb[base + i];
                sum_out[base + i] = v[k];
            }
        }
        norm_regs(lid, base, v);
        return;
    }
    var s = 0.0;
    for (var i = lid; i < p.d; i += WG) {
        let v = x[base + i] + xb[base + i];
        sum_out[base + i] = v;
        s += v * v;
    }
    let r = 1.0 / sqrt(reduce_sum(lid, s) / f32(p.d) + p.eps);
    for (var i = lid; i < p.d; i += WG) {
        out[base + i] = w[i] * ((x[base + i] + xb[base + i]) * r);
    }
}

// rope(rms_norm(x, w, eps)) per head row (Qwen3's q and k) for two inputs at the same
// positions, one dispatch for both (a single input binds itself as the second, with no rows).
// The rotation's partner element is normalized again from x (the same expression) rather than
// exchanged through workgroup memory. `second` is uniform per workgroup.
fn nr_x(second: bool, i: u32) -> f32 {
    if (second) {
        return x1[i];
    }
    return x[i];
}

fn nr_w(second: bool, i: u32) -> f32 {
    if (second) {
        return w1[i];
    }
    return w[i];
}

@compute @workgroup_size(WG)
fn norm_rope(@builtin(local_invocation_id) lid3: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>,
             @builtin(num_workgroups) nwg: vec3<u32>) {
    let flat = flat_wg(wid, nwg);
    let lid = lid3.x;
    if (flat >= p.rows) {
        return;
    }
    let second = flat >= p.rows0;
    let row = select(flat, flat - p.rows0, second);
    let base = row * p.d;
    var s = 0.0;
    for (var i = lid; i < p.d; i += WG) {
        let v = nr_x(second, base + i);
        s += v * v;
    }
    let r = 1.0 / sqrt(reduce_sum(lid, s) / f32(p.d) + select(p.eps, p.eps1, second));
    let t = row / select(p.heads, p.heads1, second);
    for (var c = lid; c < p.d; c += WG) {
        var y = nr_w(second, c) * (nr_x(second, base + c) * r);
        if (c >= p.offset && c < p.offset + p.dims) {
            let rp = rope_pair(c - p.offset, p.dims, p.interleaved != 0u);
            let pc = select(c - rp.dist, c + rp.dist, rp.first);
            let yp = nr_w(second, pc) * (nr_x(second, base + pc) * r);
            y = rope_rotate(y, yp, rp.first, sincos(f32(pos[t]) * inv_freq[rp.f]));
        }
        if (second) {
            out1[base + c] = y;
        } else {
            out[base + c] = y;
        }
    }
}

// MLA's split of each head row at p.split (Backend::split_rope): out = x[.., :split], normed
// when p.normed (GLM's kv row; its query heads are not), out1 = x[.., split:] rotated on its
// dims offset .. offset + dims. One dispatch for two slices, a norm and a rotation.
@compute @workgroup_size(WG)
fn split_rope(@builtin(local_invocation_id) lid3: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>,
              @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = flat_wg(wid, nwg);
    let lid = lid3.x;
    if (row >= p.rows) {
        return;
    }
    let a = p.split;
    let rl = p.d - a;
    let base = row * p.d;
    var r = 1.0;
    if (p.normed != 0u) {
        var s = 0.0;
        for (var i = lid; i < a; i += WG) {
            s += x[base + i] * x[base + i];
        }
        r = 1.0 / sqrt(reduce_sum(lid, s) / f32(a) + p.eps);
    }
    for (var i = lid; i < a; i += WG) {
        var y = x[base + i];
        if (p.normed != 0u) {
            y = w[i] * (y * r);
        }
        out[row * a + i] = y;
    }
    let t = row / p.heads;
    for (var c = lid; c < rl; c += WG) {
        var y = x[base + a + c];
        if (c >= p.offset && c < p.offset + p.dims) {
            let rp = rope_pair(c - p.offset, p.dims, p.interleaved != 0u);
            let pc = select(c - rp.dist, c + rp.dist, rp.first);
            y = rope_rotate(y, x[base + a + pc], rp.first, sincos(f32(pos[t]) * inv_freq[rp.f]));
        }
        out1[row * rl + c] = y;
    }
}

@compute @workgroup_size(WG)
fn softmax(@builtin(local_invocation_id) lid3: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>,
           @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = flat_wg(wid, nwg);
    let lid = lid3.x;
    if (row >= p.rows) {
        return;
    }
    let base = row * p.d;
    var m = neg_inf();
    for (var i = lid; i < p.d; i += WG) {
        m = max(m, x[base + i]);
    }
    m = reduce_max(lid, m);
    var s = 0.0;
    for (var i = lid; i < p.d; i += WG) {
        s += exp(x[base + i] - m);
    }
    s = reduce_sum(lid, s);
    for (var i = lid; i < p.d; i += WG) {
        out[base + i] = exp(x[base + i] - m) / s;
    }
}
