// An FP4 weight chunk `[rows, cols]` in the layout of `fp4::QuantMatrix` (rows relative to the
// chunk). `BLOCK_SIZE` and `SCALE_DECODE` are filled in per format from `fp4::Format`.
// Everything below reads the weight through the accessors in this block; kernels that read
// several weights get weight_quant_multi.wgsl in its place (kernels.rs).
// BEGIN WEIGHT ACCESS
@group(0) @binding(8) var<storage, read> w_codes: array<vec4<u32>>; // [rows, cols/8] words: element 8j+i in bits 4i..4i+3 of word j; 4 words a vector
@group(0) @binding(9) var<storage, read> w_scales: array<u32>; // [rows, cols/BLOCK] scale-code bytes, 4 a word
@group(0) @binding(10) var<storage, read> w_tscale: array<f32>; // [rows] the row's tensor scale

fn w_word(i: u32) -> u32 {
    return w_codes[i / 4u][i % 4u];
}

// Scale-code byte i (row-major over [rows, cols/BLOCK]).
fn w_scale_code(i: u32) -> u32 {
    return (w_scales[i / 4u] >> (8u * (i & 3u))) & 255u;
}

fn w_row_tscale(row: u32) -> f32 {
    return w_tscale[row];
}
// END WEIGHT ACCESS

const W_BLOCK: u32 = BLOCK_SIZEu;

// Block scale of element `col` of `row`.
fn w_bscale(row: u32, cols: u32, col: u32) -> f32 {
    let i = row * (cols / W_BLOCK) + col / W_BLOCK;
    return SCALE_DECODE(w_scale_code(i));
}

// Block scale times tensor scale of element `col` of `row`, multiplied first as the reference does.
fn w_scale(row: u32, cols: u32, col: u32) -> f32 {
    return w_bscale(row, cols, col) * w_row_tscale(row);
}

fn w_at(row: u32, cols: u32, col: u32) -> f32 {
    let word = w_word(row * (cols / 8u) + col / 8u);
    return fp4_e2m1(word >> (4u * (col & 7u))) * w_scale(row, cols, col);
}

// Elements c0..c0+8 of a row (c0 a multiple of 8; zeros past the end). Blocks are multiples of
// 8 elements, so the 8 share one scale.
fn w_get8(row: u32, cols: u32, c0: u32) -> array<f32, 8> {
    var v: array<f32, 8>;
    if (c0 < cols) {
        let word = w_word(row * (cols / 8u) + c0 / 8u);
        let s = w_scale(row, cols, c0);
        for (var i = 0u; i < 8u; i++) {
            v[i] = fp4_e2m1(word >> (4u * i)) * s;
        }
    }
    return v;
}
