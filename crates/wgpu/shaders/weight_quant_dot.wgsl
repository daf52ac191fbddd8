// The decode-path dot products of an FP4 weight (weight_quant.wgsl), for kernels that declare
// `x_vec(i)` (16-byte vector i of the activations) and `x_at(i)` (element i).

// Block scales of elements 32q..32q+15 and 32q+16..32q+31 of `row` (cols a multiple of 32; with
// blocks of 32 both are the one block's). With blocks of 16 the two scale bytes share a word.
fn w_scale32(row: u32, cols: u32, q: u32) -> vec2<f32> {
    let i = row * (cols / W_BLOCK) + q * (32u / W_BLOCK);
    let word = w_scales[i / 4u] >> (8u * (i & 3u));
    let s0 = SCALE_DECODE(word & 255u);
    if (W_BLOCK == 32u) {
        return vec2<f32>(s0, s0);
    }
    return vec2<f32>(s0, SCALE_DECODE((word >> 8u) & 255u));
}

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
// elements xb, xb + xs, ... (nm of them). When cols is a multiple of 32 and the rows start on
// 16 bytes, each step reads 32 codes as one 16-byte load and decodes them two at a time; else
// element by element.
fn w_dot4(row: u32, cols: u32, xb: u32, xs: u32, nm: u32, lane: u32, lanes: u32) -> vec4<f32> {
    var acc = vec4<f32>(0.0);
    if (cols % 32u == 0u && xb % 4u == 0u && xs % 4u == 0u) {
        let nq = cols / 32u;
        for (var q = lane; q < nq; q += lanes) {
            let c = w_codes[row * nq + q];
            let s = w_scale32(row, cols, q) * FP4_F16_SCALE;
            let d0 = w_decode8(c.x);
            let d1 = w_decode8(c.y);
            let d2 = w_decode8(c.z);
            let d3 = w_decode8(c.w);
            for (var j = 0u; j < 4u; j++) {
                if (j < nm) {
                    let xv = (xb + j * xs) / 4u + q * 8u;
                    let lo = w8_dot(d0, xv) + w8_dot(d1, xv + 2u);
                    let hi = w8_dot(d2, xv + 4u) + w8_dot(d3, xv + 6u);
                    acc[j] += lo * s.x + hi * s.y;
                }
            }
        }
        return acc * w_tscale[row];
    }
    return w_dot4_by_element(row, cols, xb, xs, nm, lane, lanes);
}
