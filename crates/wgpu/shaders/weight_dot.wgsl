// The format-independent fallback of `w_dot4` (weight_*_dot.wgsl): element by element through
// `w_get8`, for rows or activation offsets the 16-byte path cannot take.
fn w_dot4_by_element(row: u32, cols: u32, xb: u32, xs: u32, nm: u32, lane: u32, lanes: u32) -> vec4<f32> {
    var acc = vec4<f32>(0.0);
    for (var c0 = lane * 8u; c0 < cols; c0 += lanes * 8u) {
        let w = w_get8(row, cols, c0);
        for (var j = 0u; j < 4u; j++) {
            if (j < nm) {
                var s = 0.0;
                for (var i = 0u; i < 8u; i++) {
                    if (c0 + i < cols) {
                        s += w[i] * x_at(xb + j * xs + c0 + i);
                    }
                }
                acc[j] += s;
            }
        }
    }
    return acc;
}

// The decode products' lane partial sums: a row's GEMV_LANES lanes (consecutive invocations)
// add theirs up here (no subgroup size is assumed).
var<workgroup> lane_red: array<vec4<f32>, WG>;

// The sum over the GEMV_LANES lanes of this thread's row (valid in each row's lane 0). Every
// invocation of the workgroup calls it (it holds barriers).
fn lane_sum(lid: u32, lane: u32, acc: vec4<f32>) -> vec4<f32> {
    lane_red[lid] = acc;
    workgroupBarrier();
    for (var s = GEMV_LANES / 2u; s > 0u; s = s / 2u) {
        if (lane < s) {
            lane_red[lid] += lane_red[lid + s];
        }
        workgroupBarrier();
    }
    return lane_red[lid];
}
