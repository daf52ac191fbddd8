// A dense weight chunk `[rows, cols]` (rows relative to the chunk). 16-bit rows are padded to an
// even length so every row starts on a word. `DENSE_AT` and `DENSE_KIND` (0 f32, 1 bf16, 2 f16)
// are filled in per dtype.
@group(0) @binding(8) var<storage, read> w_data: array<vec4<u32>>; // f32: [rows, cols]; bf16/f16: [rows, ceil(cols/2)] words; 4 words a vector

const W_DENSE: u32 = DENSE_KINDu;

fn w_word(i: u32) -> u32 {
    return w_data[i / 4u][i % 4u];
}

fn w_at_f32(row: u32, cols: u32, col: u32) -> f32 {
    return bitcast<f32>(w_word(row * cols + col));
}

fn w_at_bf16(row: u32, cols: u32, col: u32) -> f32 {
    return bf16_to_f32(w_word(row * ((cols + 1u) / 2u) + col / 2u) >> (16u * (col & 1u)));
}

fn w_at_f16(row: u32, cols: u32, col: u32) -> f32 {
    return unpack2x16float(w_word(row * ((cols + 1u) / 2u) + col / 2u))[col & 1u];
}

fn w_at(row: u32, cols: u32, col: u32) -> f32 {
    return DENSE_AT(row, cols, col);
}

// Elements c0..c0+8 of a row (zeros past the end).
fn w_get8(row: u32, cols: u32, c0: u32) -> array<f32, 8> {
    var v: array<f32, 8>;
    for (var i = 0u; i < 8u; i++) {
        if (c0 + i < cols) {
            v[i] = w_at(row, cols, c0 + i);
        }
    }
    return v;
}
