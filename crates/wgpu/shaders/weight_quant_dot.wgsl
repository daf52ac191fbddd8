// The decode-path dot products of an FP4 weight (weight_quant.wgsl), for kernels that declare
// `x_vec(i)` (16-byte vector i of the activations) and `x_at(i)` (element i).

// The 8 codes of one word, times 2^-14 (`fp4_e2m1_pair_f16`): elements 0..3 and 4..7.
struct W8 {
    lo: vec4<f32>,
    hi: vec4<f32>,
}

fn w_decode8(w: u32) -> W8 {
    let p0 = fp4_e2m1_pair_f16(w);
    let p1 = fp4_e2m1_pair_f16(w >> 4u);
    let p2 = fp4_e2m1_pair_f16(w >> 8u);
    let p3 = fp4_e2m1_pair_f16(w >> 12u);
    return W8(vec4<f32>(p0.x, p1.x, p2.x, p3.x), vec4<f32>(p0.y, p1.y, p2.y, p3.y));
}

fn w8_dot(w: W8, x: u32) -> f32 {
    return dot(w.lo, x_vec(x)) + dot(w.hi, x_vec(x + 1u));
}

// Lane `lane` of `lanes`: its share of W[row, :] · x for up to four activation rows starting at
// elements xb, xb + xs, ... (nm of them). When the x rows start on 16 bytes each step reads one
// code word (8 elements under one scale) and decodes it two codes at a time; consecutive lanes
// take consecutive words, so a subgroup's x reads are one contiguous run (a lane per 32-element
// block made every 16-byte x load of a subgroup touch 32 cache lines). Else element by
// element.
fn w_dot4(row: u32, cols: u32, xb: u32, xs: u32, nm: u32, lane: u32, lanes: u32) -> vec4<f32> {
    var acc = vec4<f32>(0.0);
    if (xb % 4u == 0u && xs % 4u == 0u) {
        let nw = cols / 8u;
        for (var w = lane; w < nw; w += lanes) {
            let d = w_decode8(w_word(row * nw + w));
            let s = w_bscale(row, cols, 8u * w) * FP4_F16_SCALE;
            for (var j = 0u; j < 4u; j++) {
                if (j < nm) {
                    acc[j] += w8_dot(d, (xb + j * xs) / 4u + 2u * w) * s;
                }
            }
        }
        return acc * w_tscale[row];
    }
    return w_dot4_by_element(row, cols, xb, xs, nm, lane, lanes);
}
