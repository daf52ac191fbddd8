//! E8M0: the MXFP4 block scale, a bare biased exponent. Value `2^(c-127)`; `0xFF` is NaN.

/// Code of NaN.
pub const NAN_CODE: u8 = 0xFF;
pub const BIAS: i32 = 127;

/// Decode; `0xFF` gives NaN. Exact for every code (f32 reaches 2^-127 as a subnormal).
pub fn decode(code: u8) -> f32 {
    if code == NAN_CODE {
        return f32::NAN;
    }
    pow2(code as i32 - BIAS)
}

/// `2^e` for e in -127..=127, exactly.
pub fn pow2(e: i32) -> f32 {
    if e >= -126 {
        f32::from_bits(((e + 127) as u32) << 23)
    } else {
        // Subnormal: 2^-127 is mantissa bit 22.
        f32::from_bits(1u32 << (22 + (e + 127)) as u32)
    }
}

/// Code for the scale `2^e`, clamping `e` into the representable -127..=127.
pub fn encode_exponent(e: i32) -> u8 {
    (e.clamp(-BIAS, 127) + BIAS) as u8
}
