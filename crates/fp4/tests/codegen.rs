//! The GPU decode snippets in `crates/fp4/generated/` must be exactly what `fp4::codegen` writes
//! from the Rust table. `FP4MOE_BLESS=1 cargo test -p fp4 --test codegen` rewrites them.

#[test]
fn generated_files_are_fresh() {
    let dir = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/generated"));
    let bless = std::env::var_os("FP4MOE_BLESS").is_some();
    for (name, text) in fp4::codegen::all() {
        let path = dir.join(name);
        if bless {
            std::fs::write(&path, &text).unwrap();
            continue;
        }
        let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            on_disk == text,
            "{} is stale: run `FP4MOE_BLESS=1 cargo test -p fp4 --test codegen`",
            path.display()
        );
    }
}

/// The table snippets (CUDA, Metal) carry every value; the WGSL one decodes by bit layout
/// (`wgsl_decode_by_bit_layout_is_the_table`).
#[test]
fn snippets_carry_every_table_value() {
    for (name, text) in fp4::codegen::all() {
        assert!(text.contains("GENERATED"), "{name}");
        if name.ends_with(".wgsl") {
            continue;
        }
        for v in fp4::e2m1::TABLE {
            assert!(text.contains(&format!("{v:?}")), "{name} lacks {v:?}");
        }
    }
}

/// The kernels' two-codes-at-a-time decode (bit placement into bf16) gives every code of the
/// table exactly, for each of the four positions a word is read at, with the neighbouring
/// codes set to anything.
#[test]
fn pair_decode_by_bit_placement_is_the_table() {
    let scale = 2f32.powi(fp4::e2m1::BF16_EXP_OFFSET);
    let bf16 = |bits: u32| f32::from_bits(bits << 16);
    for code in 0..16u8 {
        let b = fp4::e2m1::bf16_bits(code) as u32;
        assert_eq!((bf16(b) * scale).to_bits(), fp4::e2m1::TABLE[code as usize].to_bits(), "code {code}");
        for other in [0u32, 0x5, 0xF] {
            for pos in 0..4 {
                // Codes at nibbles 3 - pos and 7 - pos, shifted up by 4 * pos as the kernels do.
                let mut w = 0u32;
                for n in 0..8 {
                    w |= other << (4 * n);
                }
                let (lo, hi) = (3 - pos, 7 - pos);
                w &= !(0xF << (4 * lo)) & !(0xF << (4 * hi));
                w |= (code as u32) << (4 * lo) | ((code as u32 ^ 0x8) << (4 * hi));
                let p = fp4::codegen::pair_bf16(w << (4 * pos));
                assert_eq!(p & 0xFFFF, b, "code {code} pos {pos} other {other:x}");
                assert_eq!(p >> 16, fp4::e2m1::bf16_bits(code ^ 0x8) as u32, "code {code} pos {pos}");
            }
        }
    }
}

/// The WGSL pair decode: f16 bits of the codes at nibbles pos and pos + 4 after `w >> 4 * pos`
/// are exactly code * 2^-F16_EXP_OFFSET (half's f16 -> f32 is exact, subnormals included),
/// whatever the other codes are.
#[test]
fn wgsl_pair_decode_by_f16_placement_is_the_table() {
    let scale = 2f32.powi(fp4::e2m1::F16_EXP_OFFSET);
    let f16 = |bits: u32| half::f16::from_bits(bits as u16).to_f32();
    for code in 0..16u8 {
        let b = fp4::e2m1::f16_bits(code) as u32;
        assert_eq!((f16(b) * scale).to_bits(), fp4::e2m1::TABLE[code as usize].to_bits(), "code {code}");
        for other in [0u32, 0x5, 0xF] {
            for pos in 0..4 {
                let mut w = 0u32;
                for n in 0..8 {
                    w |= other << (4 * n);
                }
                let (lo, hi) = (pos, pos + 4);
                w &= !(0xF << (4 * lo)) & !(0xF << (4 * hi));
                w |= (code as u32) << (4 * lo) | ((code as u32 ^ 0x8) << (4 * hi));
                let p = fp4::codegen::pair_f16(w >> (4 * pos));
                assert_eq!(p & 0xFFFF, b, "code {code} pos {pos} other {other:x}");
                assert_eq!(p >> 16, fp4::e2m1::f16_bits(code ^ 0x8) as u32, "code {code} pos {pos}");
                let want = fp4::e2m1::TABLE[(code ^ 0x8) as usize];
                assert_eq!((f16(p >> 16) * scale).to_bits(), want.to_bits());
            }
        }
    }
}

/// The WGSL snippet decodes by bit layout, not by table; its formulas (mirrored in Rust by
/// `codegen::e2m1_by_bits` / `e4m3_by_bits`) give every code's table value bit for bit.
#[test]
fn wgsl_decode_by_bit_layout_is_the_table() {
    for code in 0..16u32 {
        let want = fp4::e2m1::TABLE[code as usize];
        assert_eq!(fp4::codegen::e2m1_by_bits(code).to_bits(), want.to_bits(), "e2m1 code {code}");
        // The kernels pass whole words shifted down: bits above the nibble must not matter.
        assert_eq!(fp4::codegen::e2m1_by_bits(code | 0xABCD0).to_bits(), want.to_bits(), "e2m1 code {code}");
    }
    for code in 0..256u32 {
        let v = fp4::e4m3::decode(code as u8);
        let want = if v.is_nan() { 0.0f32 } else { v };
        assert_eq!(fp4::codegen::e4m3_by_bits(code).to_bits(), want.to_bits(), "e4m3 code {code:#x}");
    }
}
