//! E2M1: the FP4 element of OCP Microscaling v1.0 (`ml_dtypes.float4_e2m1fn`).
//!
//! Code `s eee m` is not a typo for 3 exponent bits: bit 3 is the sign, bits 2..1 the exponent
//! (bias 1), bit 0 the mantissa. Normal (e > 0): `2^(e-1) * (1 + m/2)`; subnormal (e = 0):
//! `0.5 * m` — i.e. `2^(1-bias) * (m/2)`, *not* `0.25 * m`. No Inf or NaN; code 8 is -0.

/// Largest finite magnitude; quantization saturates here.
pub const MAX: f32 = 6.0;

/// Decode by the bit layout. Every table in the project (including [`TABLE`] and the GPU
/// snippets) is produced by this function, so there is exactly one definition.
pub const fn decode_bits(code: u8) -> f32 {
    let sign = if code & 0x8 != 0 { -1.0 } else { 1.0 };
    let e = (code >> 1) & 0x3;
    let m = (code & 0x1) as f32;
    let mag = if e == 0 {
        0.5 * m
    } else {
        // 2^(e-1) for e in 1..=3.
        let pow = (1u32 << (e - 1)) as f32;
        pow * (1.0 + m / 2.0)
    };
    sign * mag
}

const fn build_table() -> [f32; 16] {
    let mut t = [0.0f32; 16];
    let mut i = 0;
    while i < 16 {
        t[i] = decode_bits(i as u8);
        i += 1;
    }
    t
}

/// The 16 values, indexed by code. Built at compile time from [`decode_bits`].
pub const TABLE: [f32; 16] = build_table();

/// Decode by bit placement, as the GPU kernels do two codes at a time: the code's sign goes to
/// the bf16 sign bit and its exponent and mantissa bits to bf16 bits 8..6 (the two lowest
/// exponent bits and the top mantissa bit). That bf16 is exactly `code * 2^-BF16_EXP_OFFSET`:
/// the E2M1 subnormal lands on the bf16 subnormal, so no code needs a special case. Kernels
/// multiply by `block scale * 2^BF16_EXP_OFFSET` (folded into the scale) to get the value.
pub const BF16_SHIFT: u32 = 6;
pub const BF16_EXP_OFFSET: i32 = 126;

/// The bf16 bits of `code * 2^-BF16_EXP_OFFSET` by the placement above.
pub const fn bf16_bits(code: u8) -> u16 {
    (((code as u16) & 0x8) << 12) | (((code as u16) & 0x7) << BF16_SHIFT)
}

/// The same placement in IEEE half precision, for GPUs reached through WGSL (which has f16
/// pair unpacking but no bf16): exponent and mantissa bits go to f16 bits 11..9, the sign to
/// bit 15, and the f16 is exactly `code * 2^-F16_EXP_OFFSET` (the E2M1 subnormal on the f16
/// subnormal).
pub const F16_SHIFT: u32 = 9;
pub const F16_EXP_OFFSET: i32 = 14;

/// The f16 bits of `code * 2^-F16_EXP_OFFSET` by the placement above.
pub const fn f16_bits(code: u8) -> u16 {
    (((code as u16) & 0x8) << 12) | (((code as u16) & 0x7) << F16_SHIFT)
}

/// Decode one 4-bit code (the high bits of `code` are ignored).
#[inline(always)]
pub fn decode(code: u8) -> f32 {
    TABLE[(code & 0xF) as usize]
}

/// Encode with round-to-nearest, ties to even code (even mantissa), saturating at ±6.
/// NaN encodes to a zero (callers reject non-finite input before quantizing).
pub fn encode(x: f32) -> u8 {
    let sign: u8 = if x.is_sign_negative() { 0x8 } else { 0 };
    let a = x.abs();
    // Midpoints between consecutive magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6. At a tie the code with
    // mantissa bit 0 (even) wins: codes 0,2,4,6 are even, so ties at .25, 1.25, 2.5, 5 go down and
    // ties at .75, 1.75, 3.5 go up.
    // NaN fails every comparison below except the first, which maps it to 0.
    let mag: u8 = if a.is_nan() || a <= 0.25 {
        0
    } else if a < 0.75 {
        1
    } else if a <= 1.25 {
        2
    } else if a < 1.75 {
        3
    } else if a <= 2.5 {
        4
    } else if a < 3.5 {
        5
    } else if a <= 5.0 {
        6
    } else {
        7
    };
    sign | mag
}

/// Pack two codes into a byte in this project's layout: element `2j` low nibble, `2j+1` high.
#[inline(always)]
pub fn pack(lo: u8, hi: u8) -> u8 {
    (lo & 0xF) | ((hi & 0xF) << 4)
}
