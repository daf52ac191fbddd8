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

// Lane `lane` of `lanes`: its share of W[row, :] · x for up to four activation rows starting at
// elements xb, xb + xs, ... (nm of them). Each step reads one 16-byte vector of the row (8
// 16-bit or 4 f32 elements) when rows and x rows start on 16 bytes; else element by element.
fn w_dot4(row: u32, cols: u32, xb: u32, xs: u32, nm: u32, lane: u32, lanes: u32) -> vec4<f32> {
    var acc = vec4<f32>(0.0);
    let per = select(8u, 4u, W_DENSE == 0u);
    if (cols % per == 0u && xb % 4u == 0u && xs % 4u == 0u) {
        let nq = cols / per;
        for (var q = lane; q < nq; q += lanes) {
            let v = w_data[row * nq + q];
            for (var j = 0u; j < 4u; j++) {
                if (j < nm) {
                    let xv = (xb + j * xs) / 4u + q * (per / 4u);
                    if (W_DENSE == 0u) {
                        acc[j] += dot(bitcast<vec4<f32>>(v), x_vec(xv));
                    } else {
                        acc[j] += dot(w_pairs(v.x, v.y), x_vec(xv)) + dot(w_pairs(v.z, v.w), x_vec(xv + 1u));
                    }
                }
            }
        }
        return acc;
    }
    return w_dot4_by_element(row, cols, xb, xs, nm, lane, lanes);
}
