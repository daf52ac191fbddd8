
// Appended to gemv.wgsl with weight_quant_multi.wgsl's access block: the decode-path products of
// two or three FP4 weights of one format that read the same x (Qwen3's q / k / v, GLM's q_a /
// kv_a; `Backend::linears`) in one dispatch instead of one each. The grid's row blocks run over
// the weights in order (p.blocks0 of the first, p.blocks1 of the second, the rest of the
// third); a workgroup reads its weight through `w_sel` and writes its own output
// `[m, n_i]`. Rows: p.n, p.n1, p.n2.

@group(0) @binding(3) var<storage, read_write> y1: array<f32>;
@group(0) @binding(4) var<storage, read_write> y2: array<f32>;

@compute @workgroup_size(WG)
fn gemv_multi(@builtin(local_invocation_id) lid3: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>,
              @builtin(num_workgroups) nwg: vec3<u32>) {
    let lid = lid3.x;
    let lane = lid % GEMV_LANES;
    var blk = wid.y * nwg.x + wid.x;
    var sel = 0u;
    var n = p.n;
    if (blk >= p.blocks0) {
        blk -= p.blocks0;
        sel = 1u;
        n = p.n1;
        if (blk >= p.blocks1) {
            blk -= p.blocks1;
            sel = 2u;
            n = p.n2;
        }
    }
    w_sel = sel;
    let r = blk * GEMV_ROWS + lid / GEMV_LANES;
    let m0 = wid.z * GEMV_MR;
    let nm = min(GEMV_MR, p.m - m0);
    var acc = vec4<f32>(0.0);
    if (r < n) {
        acc = w_dot4(r, p.k, m0 * p.k, p.k, nm, lane, GEMV_LANES);
    }
    let v = lane_sum(lid, lane, acc);
    if (lane == 0u && r < n) {
        for (var mi = 0u; mi < nm; mi++) {
            let o = (m0 + mi) * n + r;
            if (sel == 0u) {
                y[o] = v[mi];
            } else if (sel == 1u) {
                y1[o] = v[mi];
            } else {
                y2[o] = v[mi];
            }
        }
    }
}
