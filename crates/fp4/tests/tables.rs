//! Every code of every format against `testdata/fp4/tables.json`, which `tools/gen_fp4_tables.py`
//! produced with `ml_dtypes` — an implementation independent of this crate.

use fp4::{e2m1, e4m3, e8m0};
use serde_json::Value;

fn tables() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../testdata/fp4/tables.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("read tables.json")).expect("parse")
}

fn num(v: &Value) -> f32 {
    match v {
        Value::String(s) if s == "nan" => f32::NAN,
        v => v.as_f64().expect("number") as f32,
    }
}

fn same(a: f32, b: f32) -> bool {
    (a.is_nan() && b.is_nan()) || a.to_bits() == b.to_bits()
}

#[test]
fn all_16_e2m1_codes_match_ml_dtypes() {
    let t = tables();
    for (code, v) in t["e2m1"].as_array().unwrap().iter().enumerate() {
        let want = num(v);
        assert!(
            same(e2m1::decode(code as u8), want),
            "code {code}: {} vs ml_dtypes {want}",
            e2m1::decode(code as u8)
        );
        assert!(same(e2m1::TABLE[code], want));
    }
    // The subnormal code 1 is 0.5 (2^(1-bias) * m/2), not 0.25.
    assert_eq!(e2m1::decode(1), 0.5);
    assert_eq!(e2m1::decode(9), -0.5);
}

#[test]
fn e2m1_rounding_matches_ml_dtypes() {
    let t = tables();
    for case in t["e2m1_rounding"].as_array().unwrap() {
        let (x, want) = (num(&case[0]), num(&case[1]));
        let got = e2m1::decode(e2m1::encode(x));
        assert!(
            same(got, want) || (got == 0.0 && want == 0.0),
            "encode({x}) decodes to {got}, ml_dtypes {want}"
        );
    }
}

#[test]
fn e2m1_ties_to_even_and_saturation() {
    for (x, want) in
        [(0.25, 0.0), (0.75, 1.0), (1.25, 1.0), (1.75, 2.0), (2.5, 2.0), (3.5, 4.0), (5.0, 4.0), (7.0, 6.0)]
    {
        assert_eq!(e2m1::decode(e2m1::encode(x)), want, "{x}");
        assert_eq!(e2m1::decode(e2m1::encode(-x)), -want, "-{x}");
    }
    assert_eq!(e2m1::decode(e2m1::encode(1e30)), 6.0);
    assert_eq!(e2m1::decode(e2m1::encode(f32::INFINITY)), 6.0);
    assert_eq!(e2m1::encode(-0.0), 8, "negative zero keeps its sign");
}

#[test]
fn all_256_e8m0_codes_match_ml_dtypes() {
    let t = tables();
    for (code, v) in t["e8m0"].as_array().unwrap().iter().enumerate() {
        let want = num(v);
        assert!(same(e8m0::decode(code as u8), want), "code {code}: {} vs {want}", e8m0::decode(code as u8));
    }
}

#[test]
fn all_256_e4m3_codes_match_ml_dtypes() {
    let t = tables();
    for (code, v) in t["e4m3"].as_array().unwrap().iter().enumerate() {
        let want = num(v);
        assert!(same(e4m3::decode(code as u8), want), "code {code}: {} vs {want}", e4m3::decode(code as u8));
        if !want.is_nan() {
            assert_eq!(e4m3::encode(want), code as u8, "encode({want}) must give back code {code}");
        }
    }
}

#[test]
fn e4m3_rounding_matches_ml_dtypes() {
    let t = tables();
    for case in t["e4m3_rounding"].as_array().unwrap() {
        let (x, want) = (num(&case[0]), num(&case[1]));
        assert_eq!(e4m3::decode(e4m3::encode(x)), want, "encode({x})");
    }
    assert_eq!(e4m3::decode(e4m3::encode(1e9)), 448.0, "saturates");
}
