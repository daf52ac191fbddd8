// Per-head products against row blocks of one weight (MLA's absorbed kv_b_proj); see
// `Backend::head_linear`. One thread per output element.

struct P {
    m: u32,
    heads: u32,
    rows_per_head: u32,
    row_start: u32,
    row_count: u32,
    k: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

// y[m, h, r] = W_h[r, :] · x[m, h, :]
@compute @workgroup_size(WG)
fn head_linear(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>,
               @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_wg(wid, nwg) * WG + lid.x;
    if (i >= p.m * p.heads * p.row_count) {
        return;
    }
    let r = i % p.row_count;
    let mh = i / p.row_count;
    let h = mh % p.heads;
    let row = h * p.rows_per_head + p.row_start + r;
    var s = 0.0;
    for (var c0 = 0u; c0 < p.k; c0 += 8u) {
        let w = w_get8(row, p.k, c0);
        for (var j = 0u; j < 8u; j++) {
            if (c0 + j < p.k) {
                s += w[j] * x[mh * p.k + c0 + j];
            }
        }
    }
    y[i] = s;
}

// y[m, h, c] = Σ_r W_h[r, c] * x[m, h, r], r in order.
@compute @workgroup_size(WG)
fn head_linear_t(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>,
                 @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_wg(wid, nwg) * WG + lid.x;
    if (i >= p.m * p.heads * p.k) {
        return;
    }
    let c = i % p.k;
    let mh = i / p.k;
    let h = mh % p.heads;
    var s = 0.0;
    for (var r = 0u; r < p.row_count; r++) {
        s += w_at(h * p.rows_per_head + p.row_start + r, p.k, c) * x[mh * p.row_count + r];
    }
    y[i] = s;
}
