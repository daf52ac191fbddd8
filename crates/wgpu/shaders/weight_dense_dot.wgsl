// The decode-path dot products of a dense weight (weight_dense.wgsl), for kernels that declare
// `x_vec(i)` (16-byte vector i of the activations) and `x_at(i)` (element i).

// Two 16-bit words' pairs as elements 0..3.
fn w_pairs(a: u32, b: u32) -> vec4<f32> {
    if (W_DENSE == 1u) {
        return vec4<f32>(bitcast<f32>(a << 16u), bitcast<f32>(a & 0xffff0000u),
                         bitcast<f32>(b << 16u), bitcast<f32>(b & 0xffff0000u));
    }
    return vec4<f32>(unpack2x16float(a), unpack2x16float(b));
}

// One 16-byte vector of a row (8 16-bit or 4 f32 elements) times x from vector xv.
fn w_vec_dot(v: vec4<u32>, xv: u32) -> f32 {
    if (W_DENSE == 0u) {
        return dot(bitcast<vec4<f32>>(v), x_vec(xv));
    }
    return dot(w_pairs(v.x, v.y), x_vec(xv)) + dot(w_pairs(v.z, v.w), x_vec(xv + 1u));
}

// Lane `lane` of `lanes`: its share of W[row, :] · x for up to four activation rows starting at
// elements xb, xb + xs, ... (nm of them). Each step reads four 16-byte vectors of the row
// (`lanes` apart, all loaded before use; past the row they re-read its last vector and count
// zero, as the FP4 path does) when rows and x rows start on 16 bytes; else element by element.
fn w_dot4(row: u32, cols: u32, xb: u32, xs: u32, nm: u32, lane: u32, lanes: u32) -> vec4<f32> {
    var acc = vec4<f32>(0.0);
    let per = select(8u, 4u, W_DENSE == 0u);
    if (cols % per == 0u && xb % 4u == 0u && xs % 4u == 0u) {
        let nq = cols / per;
        let rq = row * nq;
        let step = per / 4u; // x vectors per weight vector
        for (var q = lane; q < nq; q += 4u * lanes) {
            let at = vec4<u32>(q) + vec4<u32>(0u, 1u, 2u, 3u) * lanes;
            let qi = min(at, vec4<u32>(nq - 1u));
            let live = select(vec4<f32>(0.0), vec4<f32>(1.0), at < vec4<u32>(nq));
            let v0 = w_data[rq + qi.x];
            let v1 = w_data[rq + qi.y];
            let v2 = w_data[rq + qi.z];
            let v3 = w_data[rq + qi.w];
            for (var j = 0u; j < 4u; j++) {
                if (j < nm) {
                    let xv = (xb + j * xs) / 4u;
                    acc[j] += w_vec_dot(v0, xv + qi.x * step) * live.x + w_vec_dot(v1, xv + qi.y * step) * live.y
                        + w_vec_dot(v2, xv + qi.z * step) * live.z + w_vec_dot(v3, xv + qi.w * step) * live.w;
                }
            }
        }
        return acc;
    }
    return w_dot4_by_element(row, cols, xb, xs, nm, lane, lanes);
}

// Rows ra and rb of W times one activation row at element xb (the FP4 snippet loads the two rows
// together; dense MoE weights are a test path).
fn w_dot2(ra: u32, rb: u32, cols: u32, xb: u32, lane: u32, lanes: u32) -> vec2<f32> {
    return vec2<f32>(w_dot4(ra, cols, xb, 0u, 1u, lane, lanes).x, w_dot4(rb, cols, xb, 0u, 1u, lane, lanes).x);
}
