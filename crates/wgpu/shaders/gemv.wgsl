// Linear, decode path: `y[m, n_off + r] = W[r, :] · x[m, :]` for the rows r of one weight chunk.
// A workgroup takes GEMV_ROWS weight rows with GEMV_LANES threads each and up to GEMV_MR activation rows, so
// each weight word is read once per GEMV_MR rows; lanes stride K word by word (coalesced), and the
// lane partial sums meet in workgroup memory (no subgroup size is assumed).

struct P {
    m: u32,
    n: u32,
    k: u32,
    n_off: u32,
    y_stride: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

var<workgroup> red: array<vec4<f32>, WG>;

@compute @workgroup_size(WG)
fn gemv(@builtin(local_invocation_id) lid3: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>) {
    let lid = lid3.x;
    let lane = lid % GEMV_LANES;
    let r = (wid.y * nwg.x + wid.x) * GEMV_ROWS + lid / GEMV_LANES;
    let m0 = wid.z * GEMV_MR;
    var acc = vec4<f32>(0.0);
    if (r < p.n) {
        for (var c0 = lane * 8u; c0 < p.k; c0 += GEMV_LANES * 8u) {
            let w = w_get8(r, p.k, c0);
            for (var mi = 0u; mi < GEMV_MR; mi++) {
                let m = m0 + mi;
                if (m < p.m) {
                    var s = 0.0;
                    for (var i = 0u; i < 8u; i++) {
                        if (c0 + i < p.k) {
                            s += w[i] * x[m * p.k + c0 + i];
                        }
                    }
                    acc[mi] += s;
                }
            }
        }
    }
    red[lid] = acc;
    workgroupBarrier();
    for (var s = GEMV_LANES / 2u; s > 0u; s = s / 2u) {
        if (lane < s) {
            red[lid] += red[lid + s];
        }
        workgroupBarrier();
    }
    if (lane == 0u && r < p.n) {
        let v = red[lid];
        for (var mi = 0u; mi < GEMV_MR; mi++) {
            if (m0 + mi < p.m) {
                y[(m0 + mi) * p.y_stride + p.n_off + r] = v[mi];
            }
        }
    }
}
