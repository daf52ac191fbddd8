// weight_quant.wgsl's access block for kernels that read up to three FP4 weights of one format
// (gemv_multi): the weights at bindings 8-10, 11-13 and 14-16, and `w_sel`, set once per
// workgroup, naming the one the accessors read.
@group(0) @binding(8) var<storage, read> w_codes: array<vec4<u32>>;
@group(0) @binding(9) var<storage, read> w_scales: array<u32>;
@group(0) @binding(10) var<storage, read> w_tscale: array<f32>;
@group(0) @binding(11) var<storage, read> w1_codes: array<vec4<u32>>;
@group(0) @binding(12) var<storage, read> w1_scales: array<u32>;
@group(0) @binding(13) var<storage, read> w1_tscale: array<f32>;
@group(0) @binding(14) var<storage, read> w2_codes: array<vec4<u32>>;
@group(0) @binding(15) var<storage, read> w2_scales: array<u32>;
@group(0) @binding(16) var<storage, read> w2_tscale: array<f32>;

var<private> w_sel: u32;

fn w_word(i: u32) -> u32 {
    if (w_sel == 1u) {
        return w1_codes[i / 4u][i % 4u];
    }
    if (w_sel == 2u) {
        return w2_codes[i / 4u][i % 4u];
    }
    return w_codes[i / 4u][i % 4u];
}

fn w_scale_code(i: u32) -> u32 {
    var word: u32;
    if (w_sel == 1u) {
        word = w1_scales[i / 4u];
    } else if (w_sel == 2u) {
        word = w2_scales[i / 4u];
    } else {
        word = w_scales[i / 4u];
    }
    return (word >> (8u * (i & 3u))) & 255u;
}

fn w_row_tscale(row: u32) -> f32 {
    if (w_sel == 1u) {
        return w1_tscale[row];
    }
    if (w_sel == 2u) {
        return w2_tscale[row];
    }
    return w_tscale[row];
}
