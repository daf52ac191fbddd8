//! E4M3 (`float8_e4m3fn`): the NVFP4 block scale. 1 sign, 4 exponent bits (bias 7), 3 mantissa
//! bits; no Inf; `S.1111.111` is NaN; largest finite 448; subnormals `2^-6 * m/8`.

/// Largest finite value.
pub const MAX: f32 = 448.0;

/// Decode one code. `0x7F` and `0xFF` are NaN.
pub fn decode(code: u8) -> f32 {
    let sign = if code & 0x80 != 0 { -1.0f32 } else { 1.0 };
    let e = ((code >> 3) & 0xF) as i32;
    let m = (code & 0x7) as f32;
    if e == 0xF && code & 0x7 == 0x7 {
        return f32::NAN;
    }
    let mag =
        if e == 0 { m / 8.0 * crate::e8m0::pow2(-6) } else { (1.0 + m / 8.0) * crate::e8m0::pow2(e - 7) };
    sign * mag
}

/// Encode with round-to-nearest-even, saturating to ±448 (ModelOpt casts with saturation).
/// NaN encodes to the NaN code `0x7F`.
pub fn encode(x: f32) -> u8 {
    if x.is_nan() {
        return 0x7F;
    }
    let sign: u8 = if x.is_sign_negative() { 0x80 } else { 0 };
    let a = x.abs();
    if a >= MAX {
        return sign | 0x7E;
    }
    // Non-negative finite codes 0..=0x7E decode in increasing order, so the nearest value is
    // next to the partition point; ties go to the even code (round-half-to-even).
    let table = positive_table();
    let hi = table.partition_point(|&v| v < a).min(0x7E);
    let lo = hi.saturating_sub(1);
    let (dl, dh) = (a - table[lo], table[hi] - a);
    let best = if dl < dh || (dl == dh && lo % 2 == 0) { lo } else { hi };
    sign | best as u8
}

fn positive_table() -> &'static [f32; 127] {
    static TABLE: std::sync::OnceLock<[f32; 127]> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| std::array::from_fn(|c| decode(c as u8)))
}
