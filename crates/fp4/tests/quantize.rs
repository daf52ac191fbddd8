//! Quantizers, packing and importers.

use fp4::{Format, QuantMatrix, e2m1, e4m3, e8m0, import, quantize};
use proptest::prelude::*;

/// Every value `e2m1 * s` can take for block scale `s`.
fn grid(s: f32) -> Vec<f32> {
    e2m1::TABLE.iter().map(|v| v * s).collect()
}

/// Checks each element decodes to a nearest point of its block's grid (saturating at ±6·s).
fn check_nearest(w: &[f32], q: &fp4::Quantized) -> Result<(), TestCaseError> {
    let m = &q.matrix;
    let block = m.format.block();
    for r in 0..m.rows {
        for k in 0..m.cols {
            let s =
                m.format.decode_scale(m.scales[r * m.blocks_per_row() + k / block]) * m.row_tensor_scale(r);
            let x = w[r * m.cols + k];
            let got = q.dequantized[r * m.cols + k];
            let best = grid(s).into_iter().map(|g| (g - x).abs()).fold(f32::INFINITY, f32::min);
            // Relative slack for the division x / s that the quantizer performs in f32.
            prop_assert!(
                (got - x).abs() <= best * (1.0 + 1e-6) + 1e-30,
                "row {r} col {k}: x {x} -> {got}, nearest distance {best} (scale {s})"
            );
        }
    }
    Ok(())
}

fn matrix_strategy() -> impl Strategy<Value = (usize, usize, Vec<f32>)> {
    (1usize..4, 1usize..3).prop_flat_map(|(rows, blocks)| {
        let cols = blocks * 32;
        let mags = prop_oneof![Just(1e-3f32), Just(1.0), Just(37.0), Just(1e4)];
        (Just(rows), Just(cols), mags)
            .prop_flat_map(move |(r, c, mag)| (Just(r), Just(c), proptest::collection::vec(-mag..mag, r * c)))
    })
}

proptest! {
    #[test]
    fn mxfp4_dequantize_is_nearest_representable((rows, cols, w) in matrix_strategy()) {
        let q = quantize(&w, rows, cols, Format::Mxfp4).unwrap();
        check_nearest(&w, &q)?;
        prop_assert_eq!(q.dequantized.clone(), q.matrix.dequantize());
    }

    #[test]
    fn nvfp4_dequantize_is_nearest_representable((rows, cols, w) in matrix_strategy()) {
        let q = quantize(&w, rows, cols, Format::Nvfp4).unwrap();
        check_nearest(&w, &q)?;
        prop_assert_eq!(q.dequantized.clone(), q.matrix.dequantize());
    }

    #[test]
    fn ggml_mxfp4_round_trip((rows, cols, w) in matrix_strategy()) {
        let q = quantize(&w, rows, cols, Format::Mxfp4).unwrap();
        let ggml = import::to_ggml_mxfp4(&q.matrix);
        let back = import::from_ggml_mxfp4(rows, cols, &ggml).unwrap();
        prop_assert_eq!(&back.codes[..], &q.matrix.codes[..]);
        prop_assert_eq!(&back.scales[..], &q.matrix.scales[..]);
    }
}

#[test]
fn mxfp4_scale_is_floor_log2_amax_minus_2() {
    // amax 6.0 -> floor(log2 6) - 2 = 0 -> scale 1; amax 8.0 -> 1 -> scale 2; amax 0.1 -> -6.
    for (amax, exp) in [(6.0f32, 0), (8.0, 1), (7.99, 0), (0.1, -6), (1.0, -2)] {
        let mut w = vec![0.0f32; 32];
        w[5] = -amax;
        let q = quantize(&w, 1, 32, Format::Mxfp4).unwrap();
        assert_eq!(q.matrix.scales[0], e8m0::encode_exponent(exp), "amax {amax}");
    }
}

#[test]
fn nvfp4_follows_modelopt_recipe() {
    let w: Vec<f32> = (0..64).map(|i| ((i * 37 % 64) as f32 - 32.0) * 0.11).collect();
    let q = quantize(&w, 2, 32, Format::Nvfp4).unwrap();
    let amax = w.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let s2 = amax / (6.0 * 448.0);
    assert_eq!(q.matrix.tensor_scales, vec![s2]);
    for b in 0..4 {
        let bamax = w[b * 16..(b + 1) * 16].iter().fold(0.0f32, |m, v| m.max(v.abs()));
        assert_eq!(q.matrix.scales[b], e4m3::encode(bamax / (6.0 * s2)), "block {b}");
    }
}

#[test]
fn packing_puts_element_2j_in_low_nibble() {
    let mut w = vec![0.0f32; 32];
    w[0] = 0.5; // code 1
    w[1] = -6.0; // code 15
    // amax 6 -> MXFP4 scale exponent 0, values encode exactly.
    let q = quantize(&w, 1, 32, Format::Mxfp4).unwrap();
    assert_eq!(q.matrix.codes[0], 0xF1);
}

#[test]
fn non_finite_weight_is_an_error_naming_its_position() {
    let mut w = vec![1.0f32; 64];
    w[40] = f32::NAN;
    let err = quantize(&w, 2, 32, Format::Mxfp4).unwrap_err();
    assert!(matches!(err, fp4::Error::NonFinite { row: 1, col: 8, .. }), "{err}");
    w[40] = f32::INFINITY;
    assert!(quantize(&w, 2, 32, Format::Nvfp4).is_err());
}

#[test]
fn bad_shapes_and_scales_are_errors() {
    assert!(quantize(&[0.0; 48], 1, 48, Format::Mxfp4).is_err(), "48 is not a multiple of 32");
    let codes: fp4::Bytes = vec![0u8; 16].into();
    let nan_scale: fp4::Bytes = vec![e8m0::NAN_CODE].into();
    assert!(QuantMatrix::new(Format::Mxfp4, 1, 32, codes.clone(), nan_scale, vec![1.0]).is_err());
    let ok_scale: fp4::Bytes = vec![127u8, 127].into();
    assert!(
        import::modelopt_nvfp4(1, 32, codes.clone(), ok_scale.clone(), 0.0).is_err(),
        "zero tensor scale"
    );
    assert!(import::modelopt_nvfp4(1, 32, codes.clone(), ok_scale.clone(), f32::NAN).is_err());
    assert!(import::modelopt_nvfp4(1, 32, codes, vec![0x7Fu8, 0].into(), 1.0).is_err(), "E4M3 NaN scale");
}

#[test]
fn concat_rows_keeps_each_parts_tensor_scale() {
    let a = quantize(&[1.0f32; 32], 1, 32, Format::Nvfp4).unwrap();
    let b = quantize(&[-300.0f32; 64], 2, 32, Format::Nvfp4).unwrap();
    let c = QuantMatrix::concat_rows(&[&a.matrix, &b.matrix]).unwrap();
    let mut want = a.dequantized.clone();
    want.extend_from_slice(&b.dequantized);
    assert_eq!(c.dequantize(), want);
    assert_eq!(c.row_range(1, 2).dequantize(), b.dequantized);
}

#[test]
fn ggml_nibble_order_is_j_and_j_plus_16() {
    // One ggml block: scale code 127 (1.0), qs[0] = low: element 0 = code 2 (1.0), high: element 16 = code 7 (6.0).
    let mut blk = vec![0u8; 17];
    blk[0] = 127;
    blk[1] = 0x72;
    let m = import::from_ggml_mxfp4(1, 32, &blk).unwrap();
    let d = m.dequantize();
    assert_eq!(d[0], 1.0);
    assert_eq!(d[16], 6.0);
    assert_eq!(d.iter().filter(|v| **v != 0.0).count(), 2);
}
