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
// word per step, each lane waits out a memory round trip per 4-byte load (decode GEMVs of 0.5-4
// MB ran at a fraction of the bandwidth on the H100).
fn w_dot4(row: u32, cols: u32, xb: u32, xs: u32, nm: u32, lane: u32, lanes: u32) -> vec4<f32> {
    var acc = vec4<f32>(0.0);
    if (xb % 4u == 0u && xs % 4u == 0u) {
        let nw = cols / 8u;
        let rw = row * nw;
        var w = lane;
        for (; w + 3u * lanes < nw; w += 4u * lanes) {
            let c = vec4<u32>(w_word(rw + w), w_word(rw + w + lanes), w_word(rw + w + 2u * lanes),
                              w_word(rw + w + 3u * lanes));
            let s = vec4<f32>(w_bscale(row, cols, 8u * w), w_bscale(row, cols, 8u * (w + lanes)),
                              w_bscale(row, cols, 8u * (w + 2u * lanes)),
                              w_bscale(row, cols, 8u * (w + 3u * lanes))) * FP4_F16_SCALE;
            let d0 = w_decode8(c.x);
            let d1 = w_decode8(c.y);
            let d2 = w_decode8(c.z);
            let d3 = w_decode8(c.w);
            for (var j = 0u; j < 4u; j++) {
                if (j < nm) {
                    let xw = (xb + j * xs) / 4u + 2u * w;
                    acc[j] += w8_dot(d0, xw) * s.x + w8_dot(d1, xw + 2u * lanes) * s.y
                        + w8_dot(d2, xw + 4u * lanes) * s.z + w8_dot(d3, xw + 6u * lanes) * s.w;
                }
            }
        }
        for (; w < nw; w += lanes) {
            let d = w_decode8(w_word(rw + w));
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

// Lane `lane` of `lanes`: its shares of rows ra and rb of W times one activation row at element
// xb (MoE gate and up rows): four words of each row per step, all eight loaded before use, and
// the x vectors read once for both rows.
fn w_dot2(ra: u32, rb: u32, cols: u32, xb: u32, lane: u32, lanes: u32) -> vec2<f32> {
    if (xb % 4u != 0u) {
        return vec2<f32>(w_dot4(ra, cols, xb, 0u, 1u, lane, lanes).x, w_dot4(rb, cols, xb, 0u, 1u, lane, lanes).x);
    }
    let nw = cols / 8u;
    let wa = ra * nw;
    let wb = rb * nw;
    var acc = vec2<f32>(0.0);
    var w = lane;
    for (; w + 3u * lanes < nw; w += 4u * lanes) {
        var ca: array<u32, 4>;
        var cb: array<u32, 4>;
        var sa: array<f32, 4>;
        var sb: array<f32, 4>;
        for (var i = 0u; i < 4u; i++) {
            let wi = w + i * lanes;
            ca[i] = w_word(wa + wi);
            cb[i] = w_word(wb + wi);
            sa[i] = w_bscale(ra, cols, 8u * wi);
            sb[i] = w_bscale(rb, cols, 8u * wi);
        }
        for (var i = 0u; i < 4u; i++) {
            let xw = xb / 4u + 2u * (w + i * lanes);
            let xl = x_vec(xw);
            let xh = x_vec(xw + 1u);
            let da = w_decode8(ca[i]);
            let db = w_decode8(cb[i]);
            acc += vec2<f32>((dot(da.lo, xl) + dot(da.hi, xh)) * sa[i], (dot(db.lo, xl) + dot(db.hi, xh)) * sb[i]);
        }
    }
    for (; w < nw; w += lanes) {
        let xw = xb / 4u + 2u * w;
        acc += vec2<f32>(w8_dot(w_decode8(w_word(wa + w)), xw) * w_bscale(ra, cols, 8u * w),
                         w8_dot(w_decode8(w_word(wb + w)), xw) * w_bscale(rb, cols, 8u * w));
    }
    return acc * FP4_F16_SCALE * vec2<f32>(w_tscale[ra], w_tscale[rb]);
}
