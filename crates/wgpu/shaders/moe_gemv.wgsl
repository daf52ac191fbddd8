// MoE decode path: one GEMV per (token, slot) pair against its expert (see moe.wgsl), laid out
// as gemv.wgsl (GEMV_ROWS weight rows x GEMV_LANES threads per workgroup, 16-byte steps along
// the row, partial sums in workgroup memory).

struct P {
    pairs: u32,
    k: u32,
    h: u32,
    inter: u32,
    e_lo: u32,
    e_hi: u32,
    row0: u32,
    n_experts: u32,
    max_tiles: u32,
    has_shared: u32,
    identity_pos: u32,
    // moe_gemv_shared.wgsl: the shared expert's intermediate size.
    inter_sh: u32,
}

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>; // gate_up: tokens [n, H]; down: act [pairs, I]
@group(0) @binding(2) var<storage, read> ids: array<u32>; // [pairs]
@group(0) @binding(3) var<storage, read_write> out: array<f32>; // gate_up: act [pairs, I]; down: [pairs, H]

fn x_vec(i: u32) -> vec4<f32> {
    return x[i];
}

fn x_at(i: u32) -> f32 {
    return x[i / 4u][i % 4u];
}

// Output j of gate/up rows j and inter + j from weight row `base` (`w_sel`'s weight) against
// the x row at element xb, SiLU-multiplied into out[o + j]. `j` is uniform per subgroup of
// GEMV_LANES; every thread of the workgroup calls this (lane_sum's barriers).
fn gate_up_row(lid: u32, j: u32, base: u32, inter: u32, xb: u32, o: u32) {
    let lane = lid % GEMV_LANES;
    var v = vec2<f32>(0.0);
    if (j < inter) {
        v = w_dot2(base + j, base + inter + j, p.h, xb, lane, GEMV_LANES);
    }
    let r = lane_sum(lid, lane, vec4<f32>(v, 0.0, 0.0)).xy;
    if (lane == 0u && j < inter) {
        out[o + j] = r.x / (1.0 + exp(-r.x)) * r.y;
    }
}

// Output n of a down product: weight row `row` against the act row at element xo (kk wide),
// into out[o + n].
fn down_row(lid: u32, n: u32, row: u32, kk: u32, xo: u32, o: u32) {
    let lane = lid % GEMV_LANES;
    var v = vec2<f32>(0.0);
    if (n < p.h) {
        v.x = w_dot4(row, kk, xo, 0u, 1u, lane, GEMV_LANES).x;
    }
    let r = lane_sum(lid, lane, vec4<f32>(v, 0.0, 0.0)).xy;
    if (lane == 0u && n < p.h) {
        out[o + n] = r.x;
    }
}

// Pair `pair`'s gate/up output j and down output n, when its expert is in this dispatch's
// chunk (uniform per workgroup, so the early return keeps lane_sum's barriers uniform).
fn gate_up_pair(lid: u32, pair: u32, j: u32) {
    let e = ids[pair];
    if (e < p.e_lo || e >= p.e_hi) {
        return;
    }
    gate_up_row(lid, j, e * 2u * p.inter - p.row0, p.inter, (pair / p.k) * p.h, pair * p.inter);
}

fn down_pair(lid: u32, pair: u32, n: u32) {
    let e = ids[pair];
    if (e < p.e_lo || e >= p.e_hi) {
        return;
    }
    down_row(lid, n, e * p.h - p.row0 + n, p.inter, pair * p.inter, pair * p.h);
}

// Workgroup (x: row block, z: pair). Rows j < I: gate row j and up row I + j of the expert.
@compute @workgroup_size(WG)
fn moe_gate_up_gemv(@builtin(local_invocation_id) lid3: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    gate_up_pair(lid3.x, wid.z, wid.x * GEMV_ROWS + lid3.x / GEMV_LANES);
}

@compute @workgroup_size(WG)
fn moe_down_gemv(@builtin(local_invocation_id) lid3: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    down_pair(lid3.x, wid.z, wid.x * GEMV_ROWS + lid3.x / GEMV_LANES);
}
