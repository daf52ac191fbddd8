// Row reductions: RMSNorm (alone, after a residual add, followed by RoPE, or after the MoE
// combine whose sum it norms) and softmax, one workgroup per row; and the MoE combine itself.

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
    // norm_rope_cache / split_rope with a second input: the element of the cache where the
    // second input's first row lands, and (split_rope) the cache's row width.
    cache_off: u32,
    cache_stride: u32,
    // split_rope: the second input's row width and split, and whether its first part is
    // normed.
    d1: u32,
    split1: u32,
    normed1: u32,
    // moe_combine / moe_add_rms_norm: slots per token, whether y's rows are in pair order (no
    // pos), whether a shared expert's output is added, and its first element in moe_sh (which
    // is y itself when the decode products made it: moe_gemv_shared.wgsl).
    moe_k: u32,
    moe_identity: u32,
    moe_shared: u32,
    moe_sh_off: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
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
// moe_combine / moe_add_rms_norm: moe.wgsl's expert outputs y [pairs, d], each pair's row of y
// (pos), the routing weights [rows, moe_k] and the shared expert's output [rows, d].
@group(0) @binding(11) var<storage, read> moe_y: array<f32>;
@group(0) @binding(12) var<storage, read> moe_pos: array<u32>;
@group(0) @binding(13) var<storage, read> moe_w: array<f32>;
@group(0) @binding(14) var<storage, read> moe_sh: array<f32>;
// norm_rope_cache: the v cache and v; split_rope: the second input's cache (binding 15 alone).
@group(0) @binding(15) var<storage, read_write> cache: array<f32>;
@group(0) @binding(16) var<storage, read> v_src: array<f32>;
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

// ROW_REGS (kernels.rs: NORM_ROW_REGS) elements of a row per thread in registers: rows up to
// ROW_REGS * WG wide are loaded in one unrolled pass, every load in flight at once. A strided
// loop with a runtime trip count waits out a memory round trip per element (rms_norm of one
// 2048-wide row took ~5 µs above an empty kernel on the H100). Wider rows take the loops.

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

// Token t's MoE output, element c: the shared expert's (or 0), then each slot's weighted expert
// output added in slot order (deterministic: no float atomics). moe_term sums one element;
// moe_add_rms_norm runs the same steps over a row held in registers.
fn moe_init(t: u32, c: u32) -> f32 {
    if (p.moe_shared != 0u) {
        return moe_sh[p.moe_sh_off + t * p.d + c];
    }
    return 0.0;
}

struct MoeSlot {
    w: f32,
    row: u32, // y's row
}

fn moe_slot(t: u32, s: u32) -> MoeSlot {
    let q = t * p.moe_k + s;
    return MoeSlot(moe_w[q], select(moe_pos[q], q, p.moe_identity != 0u));
}

fn moe_term(t: u32, c: u32) -> f32 {
    var o = moe_init(t, c);
    for (var s = 0u; s < p.moe_k; s++) {
        let sl = moe_slot(t, s);
        o += sl.w * moe_y[sl.row * p.d + c];
    }
    return o;
}

// out [rows, d] = the MoE output, one thread per element.
@compute @workgroup_size(WG)
fn moe_combine(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>,
               @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_wg(wid, nwg) * WG + lid.x;
    if (i >= p.rows * p.d) {
        return;
    }
    out[i] = moe_term(i / p.d, i % p.d);
}

// add_rms_norm with the MoE output as the second addend (x is the residual): the combine and
// the next norm in one dispatch. Rows up to ROW_REGS * WG wide (the host checks). Slots are the
// outer loop, so each waits for one round of ROW_REGS loads in flight together (per element,
// a runtime slot loop made it a round trip per element and slot: 14 against 8.5 µs for
// add_rms_norm on the H100 through Vulkan).
@compute @workgroup_size(WG)
fn moe_add_rms_norm(@builtin(local_invocation_id) lid3: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>,
                    @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = flat_wg(wid, nwg);
    let lid = lid3.x;
    if (row >= p.rows) {
        return;
    }
    let base = row * p.d;
    var v: array<f32, ROW_REGS>;
    for (var k = 0u; k < ROW_REGS; k++) {
        let i = lid + k * WG;
        if (i < p.d) {
            v[k] = moe_init(row, i);
        }
    }
    for (var s = 0u; s < p.moe_k; s++) {
        let sl = moe_slot(row, s);
        for (var k = 0u; k < ROW_REGS; k++) {
            let i = lid + k * WG;
            if (i < p.d) {
                v[k] += sl.w * moe_y[sl.row * p.d + i];
            }
        }
    }
    for (var k = 0u; k < ROW_REGS; k++) {
        let i = lid + k * WG;
        if (i < p.d) {
            v[k] = x[base + i] + v[k];
            sum_out[base + i] = v[k];
        }
    }
    norm_regs(lid, base, v);
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

// One head row of norm_rope's inputs: the first input's rows, then the second's, whose
// results go to out1 from element p.cache_off (0, or the k cache's first written row).
fn norm_rope_row(lid: u32, flat: u32) {
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
            out1[p.cache_off + base + c] = y;
        } else {
            out[base + c] = y;
        }
    }
}

@compute @workgroup_size(WG)
fn norm_rope(@builtin(local_invocation_id) lid3: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>,
             @builtin(num_workgroups) nwg: vec3<u32>) {
    let flat = flat_wg(wid, nwg);
    if (flat < p.rows) {
        norm_rope_row(lid3.x, flat);
    }
}

// norm_rope of q and k with k's rows written straight into the k cache (out1) and v's rows
// (v_src, as wide as k's) into the v cache, from element p.cache_off of each: GQA's whole step
// between the projections and attention. Each of k's workgroups also copies v's row.
@compute @workgroup_size(WG)
fn norm_rope_cache(@builtin(local_invocation_id) lid3: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>,
                   @builtin(num_workgroups) nwg: vec3<u32>) {
    let flat = flat_wg(wid, nwg);
    let lid = lid3.x;
    if (flat >= p.rows) {
        return;
    }
    if (flat >= p.rows0) {
        let base = (flat - p.rows0) * p.d;
        for (var c = lid; c < p.d; c += WG) {
            cache[p.cache_off + base + c] = v_src[base + c];
        }
    }
    norm_rope_row(lid, flat);
}

// MLA's split of each head row at its split point a (Backend::split_rope): out = x[.., :a],
// normed when asked (GLM's kv row; its query heads are not), out1 = x[.., a:] rotated on its
// dims offset .. offset + dims. One dispatch for two slices, a norm and a rotation. Rows past
// p.rows0 are the second input's (x1, w1, its own width, split and norm), whose two parts go
// into its cache row as they lie there (MLA's kv row into the latent cache).
fn split_rope_row(lid: u32, flat: u32) {
    let second = flat >= p.rows0;
    let row = select(flat, flat - p.rows0, second);
    let d = select(p.d, p.d1, second);
    let a = select(p.split, p.split1, second);
    let normed = select(p.normed, p.normed1, second) != 0u;
    let rl = d - a;
    let base = row * d;
    let at = p.cache_off + row * p.cache_stride;
    var r = 1.0;
    if (normed) {
        var s = 0.0;
        for (var i = lid; i < a; i += WG) {
            let v = nr_x(second, base + i);
            s += v * v;
        }
        r = 1.0 / sqrt(reduce_sum(lid, s) / f32(a) + select(p.eps, p.eps1, second));
    }
    for (var i = lid; i < a; i += WG) {
        var y = nr_x(second, base + i);
        if (normed) {
            y = nr_w(second, i) * (y * r);
        }
        if (second) {
            cache[at + i] = y;
        } else {
            out[row * a + i] = y;
        }
    }
    let t = row / select(p.heads, p.heads1, second);
    for (var c = lid; c < rl; c += WG) {
        var y = nr_x(second, base + a + c);
        if (c >= p.offset && c < p.offset + p.dims) {
            let rp = rope_pair(c - p.offset, p.dims, p.interleaved != 0u);
            let pc = select(c - rp.dist, c + rp.dist, rp.first);
            y = rope_rotate(y, nr_x(second, base + a + pc), rp.first, sincos(f32(pos[t]) * inv_freq[rp.f]));
        }
        if (second) {
            cache[at + a + c] = y;
        } else {
            out1[row * rl + c] = y;
        }
    }
}

// split_rope of one input (p.rows0 = p.rows: the second input's bindings are unread), or of
// two with the second's parts into its cache (Backend::split_rope_and_cache).
@compute @workgroup_size(WG)
fn split_rope(@builtin(local_invocation_id) lid3: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>,
              @builtin(num_workgroups) nwg: vec3<u32>) {
    let flat = flat_wg(wid, nwg);
    if (flat < p.rows) {
        split_rope_row(lid3.x, flat);
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
