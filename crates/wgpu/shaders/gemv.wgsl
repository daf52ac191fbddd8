// Linear, decode path: `y[m, n_off + r] = W[r, :] · x[m, :]` for the rows r of one weight chunk.
// A workgroup takes GEMV_ROWS weight rows with GEMV_LANES threads each and up to GEMV_MR activation
// rows, so each weight vector is read once per GEMV_MR rows; lanes stride K by words / 16-byte
// vectors (`w_dot4`, coalesced), and the lane partial sums meet in workgroup memory
// (`lane_sum`, weight_dot.wgsl).

struct P {
    m: u32,
    n: u32,
    k: u32,
    n_off: u32,
    y_stride: u32,
    // gemv_multi: rows of the second and third weights, row blocks of the first and second.
    n1: u32,
    n2: u32,
    blocks0: u32,
    blocks1: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
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

@compute @workgroup_size(WG)
fn gemv(@builtin(local_invocation_id) lid3: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>) {
    let lid = lid3.x;
    let lane = lid % GEMV_LANES;
    let r = (wid.y * nwg.x + wid.x) * GEMV_ROWS + lid / GEMV_LANES;
    let m0 = wid.z * GEMV_MR;
    let nm = min(GEMV_MR, p.m - m0);
    var acc = vec4<f32>(0.0);
    if (r < p.n) {
        acc = w_dot4(r, p.k, m0 * p.k, p.k, nm, lane, GEMV_LANES);
    }
    let v = lane_sum(lid, lane, acc);
    if (lane == 0u && r < p.n) {
        for (var mi = 0u; mi < nm; mi++) {
            y[(m0 + mi) * p.y_stride + p.n_off + r] = v[mi];
        }
    }
}
