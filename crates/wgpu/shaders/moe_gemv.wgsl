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
    _pad: u32,
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

// Workgroup (x: row block, z: pair). Rows j < I: gate row j and up row I + j of the expert.
@compute @workgroup_size(WG)
fn moe_gate_up_gemv(@builtin(local_invocation_id) lid3: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let pair = wid.z;
    let e = ids[pair];
    if (e < p.e_lo || e >= p.e_hi) {
        return;
    }
    let lid = lid3.x;
    let lane = lid % GEMV_LANES;
    let j = wid.x * GEMV_ROWS + lid / GEMV_LANES;
    var v = vec2<f32>(0.0);
    if (j < p.inter) {
        let base = e * 2u * p.inter - p.row0;
        let xb = (pair / p.k) * p.h;
        v = w_dot2(base + j, base + p.inter + j, p.h, xb, lane, GEMV_LANES);
    }
    let r = lane_sum(lid, lane, vec4<f32>(v, 0.0, 0.0)).xy;
    if (lane == 0u && j < p.inter) {
        out[pair * p.inter + j] = r.x / (1.0 + exp(-r.x)) * r.y;
    }
}

@compute @workgroup_size(WG)
fn moe_down_gemv(@builtin(local_invocation_id) lid3: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let pair = wid.z;
    let e = ids[pair];
    if (e < p.e_lo || e >= p.e_hi) {
        return;
    }
    let lid = lid3.x;
    let lane = lid % GEMV_LANES;
    let n = wid.x * GEMV_ROWS + lid / GEMV_LANES;
    var v = vec2<f32>(0.0);
    if (n < p.h) {
        v.x = w_dot4(e * p.h - p.row0 + n, p.inter, pair * p.inter, 0u, 1u, lane, GEMV_LANES).x;
    }
    let r = lane_sum(lid, lane, vec4<f32>(v, 0.0, 0.0)).xy;
    if (lane == 0u && n < p.h) {
        out[pair * p.h + n] = r.x;
    }
}
