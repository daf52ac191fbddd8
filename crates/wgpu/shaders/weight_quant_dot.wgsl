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
//
// A lane takes four words (`lanes` apart) per step, loading all four before using any: with one
// word per step each lane waits out a memory round trip per 4-byte load (decode GEMVs of 0.5-4
// MB ran at a fraction of the bandwidth on the H100). The last step's words past the row re-read
// its last word and count zero, so every step is the same straight-line code (K = 768, Qwen3's
// expert down, is one step; a word-at-a-time remainder loop made it three round trips, and
// private arrays indexed in loops went to slow local memory).
const STEP4: vec4<u32> = vec4<u32>(0u, 1u, 2u, 3u);

fn w_dot4(row: u32, cols: u32, xb: u32, xs: u32, nm: u32, lane: u32, lanes: u32) -> vec4<f32> {
    var acc = vec4<f32>(0.0);
    if (xb % 4u == 0u && xs % 4u == 0u) {
        let nw = cols / 8u;
        let rw = row * nw;
        for (var w = lane; w < nw; w += 4u * lanes) {
            let at = vec4<u32>(w) + STEP4 * lanes;
            let wi = min(at, vec4<u32>(nw - 1u));
            let d0 = w_decode8(w_word(rw + wi.x));
            let d1 = w_decode8(w_word(rw + wi.y));
            let d2 = w_decode8(w_word(rw + wi.z));
            let d3 = w_decode8(w_word(rw + wi.w));
            let sc = vec4<f32>(w_bscale(row, cols, 8u * wi.x), w_bscale(row, cols, 8u * wi.y),
                               w_bscale(row, cols, 8u * wi.z), w_bscale(row, cols, 8u * wi.w));
            let s = select(vec4<f32>(0.0), sc, at < vec4<u32>(nw));
            for (var j = 0u; j < 4u; j++) {
                if (j < nm) {
                    let xw = (xb + j * xs) / 4u;
                    acc[j] += w8_dot(d0, xw + 2u * wi.x) * s.x + w8_dot(d1, xw + 2u * wi.y) * s.y
                        + w8_dot(d2, xw + 2u * wi.z) * s.z + w8_dot(d3, xw + 2u * wi.w) * s.w;
                }
            }
        }
        return acc * (FP4_F16_SCALE * w_row_tscale(row));
    }
    return w_dot4_by_element(row, cols, xb, xs, nm, lane, lanes);
}

// Row r's four-word step at word w against the x vectors from xw (one activation row).
fn w_step_dot(r: u32, cols: u32, rw: u32, at: vec4<u32>, wi: vec4<u32>, nw: u32, xw: u32) -> f32 {
    let sc = vec4<f32>(w_bscale(r, cols, 8u * wi.x), w_bscale(r, cols, 8u * wi.y),
                       w_bscale(r, cols, 8u * wi.z), w_bscale(r, cols, 8u * wi.w));
    let s = select(vec4<f32>(0.0), sc, at < vec4<u32>(nw));
    return w8_dot(w_decode8(w_word(rw + wi.x)), xw + 2u * wi.x) * s.x
        + w8_dot(w_decode8(w_word(rw + wi.y)), xw + 2u * wi.y) * s.y
        + w8_dot(w_decode8(w_word(rw + wi.z)), xw + 2u * wi.z) * s.z
        + w8_dot(w_decode8(w_word(rw + wi.w)), xw + 2u * wi.w) * s.w;
}

// Lane `lane` of `lanes`: its shares of rows ra and rb of W times one activation row at element
// xb (MoE gate and up rows), in the steps of `w_dot4`, both rows' words in one step.
fn w_dot2(ra: u32, rb: u32, cols: u32, xb: u32, lane: u32, lanes: u32) -> vec2<f32> {
    if (xb % 4u != 0u) {
        return vec2<f32>(w_dot4(ra, cols, xb, 0u, 1u, lane, lanes).x, w_dot4(rb, cols, xb, 0u, 1u, lane, lanes).x);
    }
    let nw = cols / 8u;
    var acc = vec2<f32>(0.0);
    for (var w = lane; w < nw; w += 4u * lanes) {
        let at = vec4<u32>(w) + STEP4 * lanes;
        let wi = min(at, vec4<u32>(nw - 1u));
        acc += vec2<f32>(w_step_dot(ra, cols, ra * nw, at, wi, nw, xb / 4u),
                         w_step_dot(rb, cols, rb * nw, at, wi, nw, xb / 4u));
    }
    return acc * FP4_F16_SCALE * vec2<f32>(w_row_tscale(ra), w_row_tscale(rb));
}
