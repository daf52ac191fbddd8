// Per-head products against row blocks of one weight (MLA's absorbed kv_b_proj); see
// `Backend::head_linear`.

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
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

fn x_vec(i: u32) -> vec4<f32> {
    return x[i];
}

fn x_at(i: u32) -> f32 {
    return x[i / 4u][i % 4u];
}

var<workgroup> red: array<vec4<f32>, 2u * WG>;

// y[m, h, r] = W_h[r, :] · x[m, h, :]: the decode GEMV's layout (GEMV_ROWS outputs of GEMV_LANES
// threads each per workgroup, 16-byte steps along the weight row).
@compute @workgroup_size(WG)
fn head_linear(@builtin(local_invocation_id) lid3: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>,
               @builtin(num_workgroups) nwg: vec3<u32>) {
    let lid = lid3.x;
    let lane = lid % GEMV_LANES;
    let i = flat_wg(wid, nwg) * GEMV_ROWS + lid / GEMV_LANES;
    let live = i < p.m * p.heads * p.row_count;
    var v = vec4<f32>(0.0);
    if (live) {
        let r = i % p.row_count;
        let mh = i / p.row_count;
        let row = (mh % p.heads) * p.rows_per_head + p.row_start + r;
        v = w_dot4(row, p.k, mh * p.k, 0u, 1u, lane, GEMV_LANES);
    }
    let r = lane_sum(lid, lane, v);
    if (lane == 0u && live) {
        y[i] = r.x;
    }
}

// y[m, h, c] = Σ_r W_h[r, c] * x[m, h, r]. A workgroup takes 8 * HEADT_WORDS columns of one
// (m, h): thread (word w, row group g) sums rows g, g + HEADT_GROUPS, ... for the 8 columns of
// word w, and the row groups meet in workgroup memory.
const HEADT_GROUPS: u32 = WG / HEADT_WORDS;

@compute @workgroup_size(WG)
fn head_linear_t(@builtin(local_invocation_id) lid3: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>,
                 @builtin(num_workgroups) nwg: vec3<u32>) {
    let lid = lid3.x;
    let blocks = (p.k + 8u * HEADT_WORDS - 1u) / (8u * HEADT_WORDS);
    let b = flat_wg(wid, nwg);
    if (b >= p.m * p.heads * blocks) {
        return;
    }
    let mh = b / blocks;
    let h = mh % p.heads;
    let c0 = ((b % blocks) * HEADT_WORDS + lid % HEADT_WORDS) * 8u;
    let g = lid / HEADT_WORDS;
    var lo = vec4<f32>(0.0);
    var hi = vec4<f32>(0.0);
    if (c0 < p.k) {
        for (var r = g; r < p.row_count; r += HEADT_GROUPS) {
            let w = w_get8(h * p.rows_per_head + p.row_start + r, p.k, c0);
            let xr = x_at(mh * p.row_count + r);
            lo += vec4<f32>(w[0], w[1], w[2], w[3]) * xr;
            hi += vec4<f32>(w[4], w[5], w[6], w[7]) * xr;
        }
    }
    red[2u * lid] = lo;
    red[2u * lid + 1u] = hi;
    workgroupBarrier();
    if (g == 0u && c0 < p.k) {
        for (var gg = 1u; gg < HEADT_GROUPS; gg++) {
            lo += red[2u * (lid + gg * HEADT_WORDS)];
            hi += red[2u * (lid + gg * HEADT_WORDS) + 1u];
        }
        let o = mh * p.k + c0;
        for (var i = 0u; i < 8u; i++) {
            if (c0 + i < p.k) {
                if (i < 4u) {
                    y[o + i] = lo[i];
                } else {
                    y[o + i] = hi[i - 4u];
                }
            }
        }
    }
}
