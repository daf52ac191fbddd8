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
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<storage, read> pos: array<u32>;
@group(0) @binding(5) var<storage, read> inv_freq: array<f32>;
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
    let r = row_rms_inv(lid, base);
    for (var i = lid; i < p.d; i += WG) {
        out[base + i] = w[i] * (x[base + i] * r);
    }
}

// rope(rms_norm(x, w, eps)) per head row (Qwen3's q and k): one dispatch instead of two. The
// rotation's partner element is normalized again from x (the same expression) rather than
// exchanged through workgroup memory.
@compute @workgroup_size(WG)
fn norm_rope(@builtin(local_invocation_id) lid3: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>,
             @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = flat_wg(wid, nwg);
    let lid = lid3.x;
    if (row >= p.rows) {
        return;
    }
    let base = row * p.d;
    let r = row_rms_inv(lid, base);
    let t = row / p.heads;
    for (var c = lid; c < p.d; c += WG) {
        let y = w[c] * (x[base + c] * r);
        if (c < p.offset || c >= p.offset + p.dims) {
            out[base + c] = y;
            continue;
        }
        let rp = rope_pair(c - p.offset, p.dims, p.interleaved != 0u);
        let pc = select(c - rp.dist, c + rp.dist, rp.first);
        let yp = w[pc] * (x[base + pc] * r);
        out[base + c] = rope_rotate(y, yp, rp.first, sincos(f32(pos[t]) * inv_freq[rp.f]));
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
