//! Loader and checkpoint-writer tests on small checkpoints built here, plus the committed goldens.

use fp4::{Format, QuantMatrix};
use fp4moe_models::Error;
use fp4moe_models::checkpoint_writer::{self, PlanItem, WriteOptions};
use fp4moe_models::loader::{
    Checkpoint, FP4MOE_QUANT_FILE, LoadOptions, PACKED_SUFFIX, QuantPolicy, Quantization, apply_policy,
};
use fp4moe_ops::{DenseDType, HostWeight};
use safetensors::Dtype;
use safetensors::tensor::TensorView;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

// ---- fixtures --------------------------------------------------------------------------------

/// A directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "fp4moe-loader-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn path(&self) -> &Path {
        &self.0
    }
    fn join(&self, s: &str) -> PathBuf {
        self.0.join(s)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Deterministic pseudo-random values in [-1, 1) (xorshift), scaled per row so rows differ in
/// magnitude and block scales vary.
fn randn(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|i| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let u = (s >> 40) as f32 / (1u64 << 24) as f32;
            (2.0 * u - 1.0) * (1.0 + (i % 7) as f32)
        })
        .collect()
}

/// A tensor to write: dtype, shape, little-endian bytes.
#[derive(Clone)]
struct T(Dtype, Vec<usize>, Vec<u8>);

fn t_f32(shape: &[usize], v: &[f32]) -> T {
    T(Dtype::F32, shape.to_vec(), v.iter().flat_map(|x| x.to_le_bytes()).collect())
}
fn t_bf16(shape: &[usize], v: &[f32]) -> T {
    T(Dtype::BF16, shape.to_vec(), v.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect())
}
fn t_f16(shape: &[usize], v: &[f32]) -> T {
    T(Dtype::F16, shape.to_vec(), v.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect())
}
fn bf16_round(v: &[f32]) -> Vec<f32> {
    v.iter().map(|x| half::bf16::from_f32(*x).to_f32()).collect()
}

fn serialize(tensors: &BTreeMap<String, T>) -> Vec<u8> {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, T(d, s, b))| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize(views, None).unwrap()
}

fn write_config(dir: &Path, extra: serde_json::Value) {
    let mut cfg = json!({ "model_type": "qwen3_moe", "hidden_size": 64 });
    if let (Some(c), Some(e)) = (cfg.as_object_mut(), extra.as_object()) {
        c.extend(e.clone());
    }
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
}

fn write_single(dir: &Path, tensors: &BTreeMap<String, T>) {
    write_config(dir, json!({}));
    std::fs::write(dir.join("model.safetensors"), serialize(tensors)).unwrap();
}

/// Writes `tensors` as `n` shards with an index (tensors dealt round-robin).
fn write_sharded(dir: &Path, tensors: &BTreeMap<String, T>, n: usize) {
    write_config(dir, json!({}));
    let mut shards = vec![BTreeMap::new(); n];
    let mut map = serde_json::Map::new();
    for (i, (name, t)) in tensors.iter().enumerate() {
        shards[i % n].insert(name.clone(), t.clone());
        map.insert(name.clone(), json!(format!("model-{:05}-of-{n:05}.safetensors", i % n + 1)));
    }
    for (k, s) in shards.iter().enumerate() {
        std::fs::write(dir.join(format!("model-{:05}-of-{n:05}.safetensors", k + 1)), serialize(s)).unwrap();
    }
    let index = json!({ "metadata": {}, "weight_map": map });
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

/// A ModelOpt NVFP4 Linear `[rows, cols]` quantized with fp4's ModelOpt recipe.
fn modelopt_linear(
    tensors: &mut BTreeMap<String, T>,
    module: &str,
    rows: usize,
    cols: usize,
    seed: u64,
) -> fp4::Quantized {
    let q = fp4::quantize(&randn(rows * cols, seed), rows, cols, Format::Nvfp4).unwrap();
    let m = &q.matrix;
    tensors.insert(format!("{module}.weight"), T(Dtype::U8, vec![rows, cols / 2], m.codes.to_vec()));
    tensors.insert(
        format!("{module}.weight_scale"),
        T(Dtype::F8_E4M3, vec![rows, cols / 16], m.scales.to_vec()),
    );
    tensors.insert(format!("{module}.weight_scale_2"), t_f32(&[], &[m.tensor_scales[0]]));
    tensors.insert(format!("{module}.input_scale"), t_f32(&[], &[0.5]));
    q
}

fn hf_quant_config(dir: &Path, exclude: &[&str]) {
    let v = json!({
        "producer": { "name": "modelopt", "version": "0.37.0" },
        "quantization": { "quant_algo": "NVFP4", "group_size": 16, "exclude_modules": exclude }
    });
    std::fs::write(dir.join("hf_quant_config.json"), v.to_string()).unwrap();
}

fn quant(w: &HostWeight) -> &QuantMatrix {
    match w {
        HostWeight::Quant(q) => q,
        HostWeight::Dense { .. } => panic!("expected an FP4 weight, got dense"),
    }
}

fn dense_bytes(w: &HostWeight) -> (&[u8], DenseDType) {
    match w {
        HostWeight::Dense { bytes, dtype, .. } => (bytes, *dtype),
        HostWeight::Quant(_) => panic!("expected a dense weight, got FP4"),
    }
}

fn assert_same_quant(a: &QuantMatrix, b: &QuantMatrix) {
    assert_eq!((a.format, a.rows, a.cols), (b.format, b.rows, b.cols));
    assert_eq!(&a.codes[..], &b.codes[..], "codes differ");
    assert_eq!(&a.scales[..], &b.scales[..], "scales differ");
    assert_eq!(a.dequantize(), b.dequantize(), "dequantized values differ");
}

fn err_of<T: std::fmt::Debug>(r: Result<T, Error>) -> String {
    r.expect_err("expected an error").to_string()
}

// ---- dense checkpoints ---------------------------------------------------------------------

fn dense_fixture() -> (BTreeMap<String, T>, Vec<f32>, Vec<f32>) {
    let w = randn(8 * 32, 1);
    let norm = randn(32, 2);
    let mut t = BTreeMap::new();
    t.insert("model.layers.0.self_attn.q_proj.weight".into(), t_bf16(&[8, 32], &w));
    t.insert("model.layers.0.self_attn.k_proj.weight".into(), t_f16(&[8, 32], &w));
    t.insert("model.layers.0.self_attn.v_proj.weight".into(), t_f32(&[8, 32], &w));
    t.insert("model.norm.weight".into(), t_bf16(&[32], &norm));
    t.insert("model.layers.0.input_layernorm.weight".into(), t_f32(&[32], &norm));
    (t, w, norm)
}

fn check_dense(ck: &Checkpoint, w: &[f32], norm: &[f32]) {
    assert_eq!(ck.len(), 5);
    assert_eq!(ck.model_type().unwrap(), "qwen3_moe");
    assert!(matches!(ck.quantization(), Quantization::None));
    let info = ck.info("model.layers.0.self_attn.q_proj.weight").unwrap();
    assert_eq!((info.dtype, info.shape.clone()), (Dtype::BF16, vec![8, 32]));

    for (m, dtype, expect) in [
        ("q_proj", DenseDType::BF16, bf16_round(w)),
        ("k_proj", DenseDType::F16, w.iter().map(|x| half::f16::from_f32(*x).to_f32()).collect()),
        ("v_proj", DenseDType::F32, w.to_vec()),
    ] {
        let module = format!("model.layers.0.self_attn.{m}");
        let hw = ck.linear(&module, [8, 32], QuantPolicy::Keep).unwrap();
        let (bytes, d) = dense_bytes(&hw);
        assert_eq!(d, dtype);
        // Zero-copy: the weight views the same mapped bytes the checkpoint holds.
        let raw = ck.bytes(&format!("{module}.weight")).unwrap();
        assert_eq!(bytes.as_ptr(), raw.as_ptr(), "{m}: weight was copied");
        assert_eq!(hw.to_f32(), expect, "{m}");
    }
    assert_eq!(ck.vector_f32("model.norm.weight", 32).unwrap(), bf16_round(norm));
    assert_eq!(ck.vector_f32("model.layers.0.input_layernorm.weight", 32).unwrap(), norm);
}

#[test]
fn single_file_bf16_f16_f32() {
    let d = TempDir::new("single");
    let (t, w, norm) = dense_fixture();
    write_single(d.path(), &t);
    let ck = Checkpoint::open(d.path()).unwrap();
    check_dense(&ck, &w, &norm);
    assert_eq!(ck.files().count(), 1);
}

#[test]
fn sharded_with_index() {
    let d = TempDir::new("sharded");
    let (t, w, norm) = dense_fixture();
    write_sharded(d.path(), &t, 3);
    let ck = Checkpoint::open(d.path()).unwrap();
    check_dense(&ck, &w, &norm);
    assert_eq!(ck.files().count(), 3);
    let f = ck.file_of("model.norm.weight").unwrap();
    assert!(f.file_name().unwrap().to_string_lossy().starts_with("model-0000"));
}

#[test]
fn router_bias_f32_or_bf16() {
    let bias = vec![0.25f32, -1.5, 3.0, 0.0078125];
    for t in [t_f32(&[4], &bias), t_bf16(&[4], &bias)] {
        let d = TempDir::new("bias");
        let mut m = BTreeMap::new();
        m.insert("model.layers.0.mlp.gate.e_score_correction_bias".to_string(), t);
        write_single(d.path(), &m);
        let ck = Checkpoint::open(d.path()).unwrap();
        assert_eq!(ck.vector_f32("model.layers.0.mlp.gate.e_score_correction_bias", 4).unwrap(), bias);
    }
}

// ---- quantize on load ------------------------------------------------------------------------

#[test]
fn quantize_on_load_equals_fp4_quantize() {
    // 4100 rows x 64 cols is past the MXFP4 parallel chunk size, so the chunked path runs too.
    for (rows, cols) in [(24, 64), (4100, 64)] {
        let w = randn(rows * cols, 7);
        let d = TempDir::new("qol");
        let mut t = BTreeMap::new();
        t.insert("l.weight".to_string(), t_bf16(&[rows, cols], &w));
        write_single(d.path(), &t);
        let ck = Checkpoint::open(d.path()).unwrap();
        for format in [Format::Mxfp4, Format::Nvfp4] {
            let got = ck.linear("l", [rows, cols], QuantPolicy::Quantize(format)).unwrap();
            let want = fp4::quantize(&bf16_round(&w), rows, cols, format).unwrap();
            assert_same_quant(quant(&got), &want.matrix);
            assert_eq!(quant(&got).tensor_scales, want.matrix.tensor_scales);
        }
    }
}

#[test]
fn load_options_default_policy() {
    let o = LoadOptions { quant: Some(Format::Mxfp4), quantize_all: false };
    let q = QuantPolicy::Quantize(Format::Mxfp4);
    for m in [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.kv_a_proj_with_mqa",
        "model.layers.1.mlp.experts",
        "model.layers.1.mlp.experts.3.up_proj",
        "model.layers.1.mlp.shared_experts.gate_proj",
        "model.layers.0.mlp.down_proj",
    ] {
        assert_eq!(o.policy_for(m), q, "{m}");
    }
    for m in ["model.embed_tokens", "lm_head", "model.layers.1.mlp.gate", "model.norm"] {
        assert_eq!(o.policy_for(m), QuantPolicy::Keep, "{m}");
        assert_eq!(LoadOptions { quantize_all: true, ..o }.policy_for(m), q, "{m}");
    }
    assert_eq!(LoadOptions::default().policy_for("model.layers.0.self_attn.q_proj"), QuantPolicy::Keep);
}

// ---- experts ---------------------------------------------------------------------------------

const E: usize = 3;
const INTER: usize = 32;
const HID: usize = 64;

/// Per-expert gate/up/down values.
fn expert_values() -> Vec<[Vec<f32>; 3]> {
    (0..E)
        .map(|e| {
            let s = 100 + 10 * e as u64;
            [randn(INTER * HID, s), randn(INTER * HID, s + 1), randn(HID * INTER, s + 2)]
        })
        .collect()
}

fn per_expert_ckpt(dir: &Path, v: &[[Vec<f32>; 3]]) {
    let mut t = BTreeMap::new();
    for (e, [g, u, dn]) in v.iter().enumerate() {
        let p = format!("model.layers.0.mlp.experts.{e}");
        t.insert(format!("{p}.gate_proj.weight"), t_bf16(&[INTER, HID], g));
        t.insert(format!("{p}.up_proj.weight"), t_bf16(&[INTER, HID], u));
        t.insert(format!("{p}.down_proj.weight"), t_bf16(&[HID, INTER], dn));
    }
    t.insert("model.layers.0.mlp.gate.weight".into(), t_bf16(&[E, HID], &randn(E * HID, 5)));
    write_single(dir, &t);
}

fn fused_ckpt(dir: &Path, v: &[[Vec<f32>; 3]]) {
    let gu: Vec<f32> = v.iter().flat_map(|[g, u, _]| g.iter().chain(u).copied()).collect();
    let dn: Vec<f32> = v.iter().flat_map(|[_, _, d]| d.iter().copied()).collect();
    let mut t = BTreeMap::new();
    t.insert("model.layers.0.mlp.experts.gate_up_proj".into(), t_bf16(&[E, 2 * INTER, HID], &gu));
    t.insert("model.layers.0.mlp.experts.down_proj".into(), t_bf16(&[E, HID, INTER], &dn));
    write_single(dir, &t);
}

#[test]
fn experts_per_expert_and_fused_layouts_agree() {
    let v = expert_values();
    let (a, b) = (TempDir::new("exp-a"), TempDir::new("exp-b"));
    per_expert_ckpt(a.path(), &v);
    fused_ckpt(b.path(), &v);
    let (ca, cb) = (Checkpoint::open(a.path()).unwrap(), Checkpoint::open(b.path()).unwrap());
    let prefix = "model.layers.0.mlp";

    // Dense: [gate_0; up_0; gate_1; up_1; ...] and [down_0; down_1; ...], in bf16.
    let want_gu: Vec<f32> =
        v.iter().flat_map(|[g, u, _]| bf16_round(g).into_iter().chain(bf16_round(u))).collect();
    let want_dn: Vec<f32> = v.iter().flat_map(|[_, _, d]| bf16_round(d)).collect();
    for ck in [&ca, &cb] {
        let (gu, dn) = ck.experts(prefix, E, [INTER, HID], QuantPolicy::Keep).unwrap();
        assert_eq!(gu.shape(), [E * 2 * INTER, HID]);
        assert_eq!(dn.shape(), [E * HID, INTER]);
        assert_eq!(gu.to_f32(), want_gu);
        assert_eq!(dn.to_f32(), want_dn);
    }
    // Both layouts plan the same stacked write.
    let opts = LoadOptions { quant: Some(Format::Mxfp4), quantize_all: false };
    let want_plan =
        vec![PlanItem::Experts { prefix: prefix.into(), n_experts: E, inter: INTER, hidden: HID }];
    assert_eq!(checkpoint_writer::default_plan(&cb, &opts).unwrap(), want_plan);
    assert_eq!(checkpoint_writer::default_plan(&ca, &opts).unwrap(), want_plan);
    // The fused layout is already the stacked one: no copy.
    let (gu, _) = cb.experts(prefix, E, [INTER, HID], QuantPolicy::Keep).unwrap();
    let raw = cb.bytes("model.layers.0.mlp.experts.gate_up_proj").unwrap();
    assert_eq!(dense_bytes(&gu).0.as_ptr(), raw.as_ptr());

    // Quantized: identical whichever layout is stored, each part quantized on its own.
    for format in [Format::Mxfp4, Format::Nvfp4] {
        let p = QuantPolicy::Quantize(format);
        let (gua, dna) = ca.experts(prefix, E, [INTER, HID], p).unwrap();
        let (gub, dnb) = cb.experts(prefix, E, [INTER, HID], p).unwrap();
        assert_same_quant(quant(&gua), quant(&gub));
        assert_same_quant(quant(&dna), quant(&dnb));
        let g1 = fp4::quantize(&bf16_round(&v[1][0]), INTER, HID, format).unwrap().matrix;
        assert_same_quant(&quant(&gua).row_range(2 * INTER, INTER), &g1);
        if format == Format::Nvfp4 {
            assert_eq!(quant(&gua).tensor_scales.len(), 2 * E, "one tensor scale per gate/up part");
        }
    }
}

#[test]
fn linear_concat_stacks_in_order() {
    let v = expert_values();
    let d = TempDir::new("concat");
    per_expert_ckpt(d.path(), &v);
    let ck = Checkpoint::open(d.path()).unwrap();
    let mods: Vec<String> =
        ["2.up_proj", "0.gate_proj"].iter().map(|m| format!("model.layers.0.mlp.experts.{m}")).collect();
    let w = ck.linear_concat(&mods, [INTER, HID], QuantPolicy::Keep).unwrap();
    let want: Vec<f32> = bf16_round(&v[2][1]).into_iter().chain(bf16_round(&v[0][0])).collect();
    assert_eq!(w.to_f32(), want);
    let e = err_of(ck.linear_concat(&mods, [INTER + 1, HID], QuantPolicy::Keep));
    assert!(e.contains("experts.2.up_proj.weight") && e.contains("expected shape"), "{e}");
}

// ---- ModelOpt NVFP4 --------------------------------------------------------------------------

#[test]
fn modelopt_nvfp4_loads_zero_copy_and_honours_exclude() {
    let d = TempDir::new("modelopt");
    let mut t = BTreeMap::new();
    let q = modelopt_linear(&mut t, "model.layers.0.self_attn.q_proj", 16, 64, 11);
    let experts: Vec<[fp4::Quantized; 3]> = (0..2)
        .map(|e| {
            let p = format!("model.layers.0.mlp.experts.{e}");
            let s = 20 + 3 * e as u64;
            [
                modelopt_linear(&mut t, &format!("{p}.gate_proj"), INTER, HID, s),
                modelopt_linear(&mut t, &format!("{p}.up_proj"), INTER, HID, s + 1),
                modelopt_linear(&mut t, &format!("{p}.down_proj"), HID, INTER, s + 2),
            ]
        })
        .collect();
    let gate = randn(2 * HID, 3);
    t.insert("model.layers.0.mlp.gate.weight".into(), t_bf16(&[2, HID], &gate));
    t.insert("lm_head.weight".into(), t_bf16(&[4, HID], &randn(4 * HID, 4)));
    write_single(d.path(), &t);
    hf_quant_config(d.path(), &["lm_head", "*mlp.gate"]);

    let ck = Checkpoint::open(d.path()).unwrap();
    assert!(matches!(ck.quantization(), Quantization::ModelOpt { .. }));
    let w = ck.linear("model.layers.0.self_attn.q_proj", [16, 64], QuantPolicy::Keep).unwrap();
    assert_same_quant(quant(&w), &q.matrix);
    assert_eq!(w.to_f32(), q.dequantized);
    let raw = ck.bytes("model.layers.0.self_attn.q_proj.weight").unwrap();
    assert_eq!(quant(&w).codes.as_ptr(), raw.as_ptr(), "ModelOpt codes were copied");
    // A quantize policy does not re-quantize FP4 weights.
    let w2 = ck.linear("model.layers.0.self_attn.q_proj", [16, 64], QuantPolicy::Quantize(Format::Mxfp4));
    assert_eq!(quant(&w2.unwrap()).format, Format::Nvfp4);

    // Experts: per-expert weight_scale_2 kept exactly (one tensor scale per part).
    let (gu, dn) = ck.experts("model.layers.0.mlp", 2, [INTER, HID], QuantPolicy::Keep).unwrap();
    let want_gu: Vec<f32> =
        experts.iter().flat_map(|[g, u, _]| g.dequantized.iter().chain(&u.dequantized).copied()).collect();
    let want_dn: Vec<f32> = experts.iter().flat_map(|[_, _, d]| d.dequantized.clone()).collect();
    assert_eq!(gu.to_f32(), want_gu);
    assert_eq!(dn.to_f32(), want_dn);
    assert_eq!(quant(&gu).tensor_scales.len(), 4);

    // exclude_modules: the router and lm_head stay dense under the default options.
    let opts = LoadOptions { quant: Some(Format::Nvfp4), quantize_all: false };
    assert!(ck.is_excluded("model.layers.0.mlp.gate"));
    assert!(ck.is_excluded("lm_head"));
    assert!(!ck.is_excluded("model.layers.0.mlp.gate_proj"));
    assert!(!ck.is_excluded("model.layers.0.mlp.experts"));
    assert_eq!(ck.policy_for(&opts, "lm_head"), QuantPolicy::Keep);
    assert_eq!(
        ck.policy_for(&LoadOptions { quantize_all: true, ..opts }, "lm_head"),
        QuantPolicy::Quantize(Format::Nvfp4)
    );
    let g = ck
        .linear("model.layers.0.mlp.gate", [2, HID], ck.policy_for(&opts, "model.layers.0.mlp.gate"))
        .unwrap();
    assert_eq!(g.to_f32(), bf16_round(&gate));
    assert_eq!(ck.policy_for(&opts, "model.layers.0.self_attn.q_proj"), QuantPolicy::Quantize(Format::Nvfp4));
}

#[test]
fn modelopt_detected_from_config_quantization_config() {
    let d = TempDir::new("modelopt-cfg");
    let mut t = BTreeMap::new();
    let q = modelopt_linear(&mut t, "m.proj", 16, 32, 9);
    std::fs::write(d.join("model.safetensors"), serialize(&t)).unwrap();
    write_config(
        d.path(),
        json!({ "quantization_config": { "quant_method": "modelopt", "quant_algo": "NVFP4", "ignore": ["lm_head"] } }),
    );
    let ck = Checkpoint::open(d.path()).unwrap();
    assert!(ck.is_excluded("lm_head"));
    let w = ck.linear("m.proj", [16, 32], QuantPolicy::Keep).unwrap();
    assert_eq!(w.to_f32(), q.dequantized);

    write_config(d.path(), json!({ "quantization_config": { "quant_method": "gptq" } }));
    let e = err_of(Checkpoint::open(d.path()));
    assert!(e.contains("gptq") && e.contains("modelopt"), "{e}");
    write_config(d.path(), json!({}));
    std::fs::write(d.join("hf_quant_config.json"), r#"{"quantization":{"quant_algo":"FP8"}}"#).unwrap();
    let e = err_of(Checkpoint::open(d.path()));
    assert!(e.contains("FP8") && e.contains("hf_quant_config.json"), "{e}");
}

#[test]
fn nan_block_scale_and_bad_weight_scale_2_are_errors() {
    let build = |edit: &dyn Fn(&mut BTreeMap<String, T>)| {
        let d = TempDir::new("badscale");
        let mut t = BTreeMap::new();
        modelopt_linear(&mut t, "m.proj", 16, 32, 9);
        edit(&mut t);
        write_single(d.path(), &t);
        hf_quant_config(d.path(), &[]);
        let ck = Checkpoint::open(d.path()).unwrap();
        err_of(ck.linear("m.proj", [16, 32], QuantPolicy::Keep))
    };
    let e = build(&|t| {
        let s = t.get_mut("m.proj.weight_scale").unwrap();
        s.2[2 * 2 + 1] = 0x7F; // row 2, block 1
    });
    assert!(e.contains("m.proj.weight_scale") && e.contains("row 2, block 1") && e.contains("NaN"), "{e}");
    for bad in [0.0f32, -1.0, f32::NAN] {
        let e = build(&|t| {
            t.insert("m.proj.weight_scale_2".into(), t_f32(&[], &[bad]));
        });
        assert!(e.contains("m.proj.weight_scale_2"), "{bad}: {e}");
    }
    let e = build(&|t| {
        t.remove("m.proj.weight_scale");
    });
    assert!(e.contains("`m.proj.weight_scale`") && e.contains("not found"), "{e}");
    let e = build(&|t| {
        t.get_mut("m.proj.weight_scale").unwrap().0 = Dtype::I8;
    });
    assert!(e.contains("m.proj.weight_scale") && e.contains("I8"), "{e}");
}

// ---- the writer ------------------------------------------------------------------------------

fn mixed_source(dir: &Path) -> Vec<[Vec<f32>; 3]> {
    let v = expert_values();
    let mut t = BTreeMap::new();
    for (e, [g, u, dn]) in v.iter().enumerate() {
        let p = format!("model.layers.0.mlp.experts.{e}");
        t.insert(format!("{p}.gate_proj.weight"), t_bf16(&[INTER, HID], g));
        t.insert(format!("{p}.up_proj.weight"), t_bf16(&[INTER, HID], u));
        t.insert(format!("{p}.down_proj.weight"), t_bf16(&[HID, INTER], dn));
    }
    t.insert("model.layers.0.self_attn.q_proj.weight".into(), t_bf16(&[64, HID], &randn(64 * HID, 8)));
    t.insert("model.layers.0.mlp.gate.weight".into(), t_bf16(&[E, HID], &randn(E * HID, 5)));
    t.insert("model.embed_tokens.weight".into(), t_bf16(&[16, HID], &randn(16 * HID, 6)));
    t.insert("model.norm.weight".into(), t_f32(&[HID], &randn(HID, 7)));
    write_sharded(dir, &t, 2);
    std::fs::write(dir.join("tokenizer.json"), "{\"fake\": true}").unwrap();
    v
}

#[test]
fn writer_round_trip_is_zero_copy_and_exact() {
    let src_dir = TempDir::new("w-src");
    let out_root = TempDir::new("w-out");
    mixed_source(src_dir.path());
    let src = Checkpoint::open(src_dir.path()).unwrap();
    for (format, shard_bytes) in [(Format::Mxfp4, 1 << 30), (Format::Nvfp4, 4096)] {
        let out = out_root.join(format.name());
        let opts = LoadOptions { quant: Some(format), quantize_all: false };
        let plan = checkpoint_writer::default_plan(&src, &opts).unwrap();
        assert!(plan.contains(&PlanItem::Experts {
            prefix: "model.layers.0.mlp".into(),
            n_experts: E,
            inter: INTER,
            hidden: HID
        }));
        assert!(plan.iter().any(|p| p.name() == "model.layers.0.self_attn.q_proj"));
        assert!(!plan.iter().any(|p| p.name().contains("mlp.gate") || p.name().contains("embed")));
        let mut calls = Vec::new();
        let summary = checkpoint_writer::write_quantized(
            &src,
            &out,
            format,
            &plan,
            &WriteOptions { force: false, shard_bytes },
            &mut |p| calls.push((p.done, p.total)),
        )
        .unwrap();
        assert_eq!(calls.last(), Some(&(plan.len(), plan.len())));
        assert_eq!(summary.files > 1, shard_bytes < (1 << 20), "shard count follows shard_bytes");
        assert!(out.join("tokenizer.json").is_file() && out.join(FP4MOE_QUANT_FILE).is_file());

        let ck = Checkpoint::open(&out).unwrap();
        assert!(matches!(ck.quantization(), Quantization::Fp4moe { format: f, .. } if *f == format));
        assert_eq!(ck.config(), src.config());
        let p = QuantPolicy::Quantize(format);
        // Experts: pre-stacked on disk, identical to quantize-on-load, and mapped without copies.
        let (gu, dn) = ck.experts("model.layers.0.mlp", E, [INTER, HID], QuantPolicy::Keep).unwrap();
        let (gu0, dn0) = src.experts("model.layers.0.mlp", E, [INTER, HID], p).unwrap();
        assert_same_quant(quant(&gu), quant(&gu0));
        assert_same_quant(quant(&dn), quant(&dn0));
        assert_eq!(quant(&gu).tensor_scales, quant(&gu0).tensor_scales);
        let raw = ck.bytes(&format!("model.layers.0.mlp.experts.gate_up.{PACKED_SUFFIX}")).unwrap();
        assert_eq!(quant(&gu).codes.as_ptr(), raw.as_ptr(), "stacked experts were copied");
        // A Linear.
        let q = ck.linear("model.layers.0.self_attn.q_proj", [64, HID], QuantPolicy::Keep).unwrap();
        let q0 = src.linear("model.layers.0.self_attn.q_proj", [64, HID], p).unwrap();
        assert_same_quant(quant(&q), quant(&q0));
        // Dense tensors copied as stored; per-expert source tensors are gone.
        for (n, shape) in [("model.layers.0.mlp.gate.weight", vec![E, HID]), ("model.norm.weight", vec![HID])]
        {
            assert_eq!(&ck.bytes(n).unwrap()[..], &src.bytes(n).unwrap()[..]);
            assert_eq!(ck.info(n).unwrap().shape, shape);
        }
        assert!(!ck.has("model.layers.0.mlp.experts.0.gate_proj.weight"));
        // Re-quantizing an fp4moe checkpoint is refused.
        assert!(err_of(checkpoint_writer::default_plan(&ck, &opts)).contains("already"));
    }
}

#[test]
fn writer_converts_modelopt_to_stacked_nvfp4() {
    let d = TempDir::new("w-modelopt");
    let out = TempDir::new("w-modelopt-out");
    let mut t = BTreeMap::new();
    for e in 0..2 {
        let p = format!("model.layers.0.mlp.experts.{e}");
        modelopt_linear(&mut t, &format!("{p}.gate_proj"), INTER, HID, 40 + e as u64);
        modelopt_linear(&mut t, &format!("{p}.up_proj"), INTER, HID, 50 + e as u64);
        modelopt_linear(&mut t, &format!("{p}.down_proj"), HID, INTER, 60 + e as u64);
    }
    write_single(d.path(), &t);
    hf_quant_config(d.path(), &[]);
    let src = Checkpoint::open(d.path()).unwrap();
    let opts = LoadOptions { quant: Some(Format::Nvfp4), quantize_all: false };
    let plan = checkpoint_writer::default_plan(&src, &opts).unwrap();
    assert_eq!(plan.len(), 1);
    let o = out.join("ck");
    checkpoint_writer::write_quantized(&src, &o, Format::Nvfp4, &plan, &WriteOptions::default(), &mut |_| {})
        .unwrap();
    let ck = Checkpoint::open(&o).unwrap();
    let a = ck.experts("model.layers.0.mlp", 2, [INTER, HID], QuantPolicy::Keep).unwrap();
    let b = src.experts("model.layers.0.mlp", 2, [INTER, HID], QuantPolicy::Keep).unwrap();
    assert_same_quant(quant(&a.0), quant(&b.0));
    assert_eq!(quant(&a.0).tensor_scales, quant(&b.0).tensor_scales);
    assert!(!ck.has("model.layers.0.mlp.experts.0.gate_proj.input_scale"));
    // MXFP4 from NVFP4 would re-quantize: refused with a reason.
    let e = err_of(checkpoint_writer::write_quantized(
        &src,
        &out.join("mx"),
        Format::Mxfp4,
        &plan,
        &WriteOptions::default(),
        &mut |_| {},
    ));
    assert!(e.contains("nvfp4"), "{e}");
    assert!(!out.join("mx").exists());
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".partial-") || n.contains(".old-"))
        .collect()
}

#[test]
fn writer_refuses_existing_output_unless_forced() {
    let src_dir = TempDir::new("w2-src");
    let root = TempDir::new("w2-out");
    mixed_source(src_dir.path());
    let src = Checkpoint::open(src_dir.path()).unwrap();
    let out = root.join("ck");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "precious").unwrap();
    let plan = vec![PlanItem::Linear { module: "model.layers.0.self_attn.q_proj".into(), shape: [64, HID] }];
    let write = |force| {
        checkpoint_writer::write_quantized(
            &src,
            &out,
            Format::Mxfp4,
            &plan,
            &WriteOptions { force, ..WriteOptions::default() },
            &mut |_| {},
        )
    };
    let e = err_of(write(false));
    assert!(e.contains("already exists") && e.contains("force"), "{e}");
    assert!(out.join("keep.txt").is_file(), "refusal must not touch the directory");
    write(true).unwrap();
    assert!(!out.join("keep.txt").exists());
    Checkpoint::open(&out).unwrap();
    assert!(leftovers(root.path()).is_empty(), "{:?}", leftovers(root.path()));
    // The source itself is never a valid output.
    let e = err_of(checkpoint_writer::write_quantized(
        &src,
        src_dir.path(),
        Format::Mxfp4,
        &plan,
        &WriteOptions { force: true, ..WriteOptions::default() },
        &mut |_| {},
    ));
    assert!(e.contains("source"), "{e}");
}

#[test]
fn failed_write_leaves_nothing_that_looks_complete() {
    let src_dir = TempDir::new("w3-src");
    let root = TempDir::new("w3-out");
    mixed_source(src_dir.path());
    let src = Checkpoint::open(src_dir.path()).unwrap();
    let out = root.join("ck");
    // The first item succeeds (and, with tiny shards, is flushed to disk); the second fails.
    let plan = vec![
        PlanItem::Linear { module: "model.layers.0.self_attn.q_proj".into(), shape: [64, HID] },
        PlanItem::Linear { module: "model.layers.0.self_attn.missing_proj".into(), shape: [64, HID] },
    ];
    let mut seen = 0;
    let e = err_of(checkpoint_writer::write_quantized(
        &src,
        &out,
        Format::Mxfp4,
        &plan,
        &WriteOptions { force: false, shard_bytes: 64 },
        &mut |p| seen = p.done,
    ));
    assert_eq!(seen, 1);
    assert!(e.contains("missing_proj.weight"), "{e}");
    assert!(!out.exists());
    assert!(leftovers(root.path()).is_empty(), "{:?}", leftovers(root.path()));
}

// ---- bad input -------------------------------------------------------------------------------

#[test]
fn missing_config_and_weights() {
    let d = TempDir::new("bad-cfg");
    let e = err_of(Checkpoint::open(d.join("nope")));
    assert!(e.contains("nope"), "{e}");
    let e = err_of(Checkpoint::open(d.path()));
    assert!(e.contains("config.json"), "{e}");
    std::fs::write(d.join("config.json"), "{ not json").unwrap();
    let e = err_of(Checkpoint::open(d.path()));
    assert!(e.contains("config.json") && e.contains("invalid JSON"), "{e}");
    write_config(d.path(), json!({}));
    let e = err_of(Checkpoint::open(d.path()));
    assert!(e.contains("no weights"), "{e}");
    // An index naming a shard that is not there.
    std::fs::write(d.join("model.safetensors.index.json"), r#"{"weight_map":{"a":"model-1.safetensors"}}"#)
        .unwrap();
    let e = err_of(Checkpoint::open(d.path()));
    assert!(e.contains("model-1.safetensors") && e.contains("shard listed in the index"), "{e}");
    std::fs::write(d.join("model.safetensors.index.json"), r#"{"weight_map":{"a":"../x.safetensors"}}"#)
        .unwrap();
    let e = err_of(Checkpoint::open(d.path()));
    assert!(e.contains("leaves the checkpoint directory"), "{e}");
}

#[test]
fn config_errors_name_the_key() {
    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Cfg {
        hidden_size: usize,
        num_experts: usize,
    }
    let d = TempDir::new("cfg-key");
    let (t, _, _) = dense_fixture();
    write_single(d.path(), &t);
    let ck = Checkpoint::open(d.path()).unwrap();
    let e = err_of(ck.config_as::<Cfg>());
    assert!(e.contains("num_experts") && e.contains("config.json"), "{e}");
    let e = err_of(ck.config_key("rope_theta"));
    assert!(e.contains("`rope_theta`") && e.contains("config.json"), "{e}");
    assert_eq!(ck.config_key("hidden_size").unwrap(), &json!(64));
    let e = Error::unknown_model_type("llama", &["qwen3_moe", "glm4_moe_lite"]).to_string();
    assert!(e.contains("llama") && e.contains("qwen3_moe, glm4_moe_lite"), "{e}");
    write_config(d.path(), json!({ "model_type": 3 }));
    let e = err_of(Checkpoint::open(d.path()).unwrap().model_type());
    assert!(e.contains("model_type"), "{e}");
}

#[test]
fn index_listing_an_absent_tensor() {
    let d = TempDir::new("bad-index");
    let (t, _, _) = dense_fixture();
    write_sharded(d.path(), &t, 2);
    let mut index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("model.safetensors.index.json")).unwrap())
            .unwrap();
    index["weight_map"]["ghost.weight"] = json!("model-00001-of-00002.safetensors");
    std::fs::write(d.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let e = err_of(Checkpoint::open(d.path()));
    assert!(e.contains("ghost.weight") && e.contains("model-00001-of-00002"), "{e}");
}

#[test]
fn missing_tensor_wrong_shape_wrong_dtype() {
    let d = TempDir::new("bad-tensor");
    let (mut t, _, _) = dense_fixture();
    t.insert("ids".into(), T(Dtype::I64, vec![2], vec![0; 16]));
    t.insert("odd.weight".into(), t_bf16(&[2, 24], &randn(48, 3)));
    write_single(d.path(), &t);
    let ck = Checkpoint::open(d.path()).unwrap();
    let e = err_of(ck.linear("model.layers.0.self_attn.o_proj", [8, 32], QuantPolicy::Keep));
    assert!(e.contains("model.layers.0.self_attn.o_proj.weight") && e.contains("not found"), "{e}");
    let e = err_of(ck.linear("model.layers.0.self_attn.q_proj", [32, 8], QuantPolicy::Keep));
    assert!(e.contains("q_proj.weight") && e.contains("[32, 8]") && e.contains("[8, 32]"), "{e}");
    assert!(e.contains("model.safetensors"), "error names the file: {e}");
    let e = err_of(ck.vector_f32("model.norm.weight", 31));
    assert!(e.contains("model.norm.weight"), "{e}");
    let e = err_of(ck.vector_f32("ids", 2));
    assert!(e.contains("`ids`") && e.contains("I64"), "{e}");
    let e = err_of(ck.experts("model.layers.0.mlp", 2, [4, 32], QuantPolicy::Keep));
    assert!(e.contains("experts.0.gate_proj.weight"), "{e}");
    // Quantize-on-load of a width that is not a whole number of blocks names the tensor.
    // A width that is not a whole number of blocks stays dense under a quantize policy.
    let w = ck.linear("odd", [2, 24], QuantPolicy::Quantize(Format::Mxfp4)).unwrap();
    assert_eq!(dense_bytes(&w).1, DenseDType::BF16);
    let w = ck.linear("odd", [2, 24], QuantPolicy::Quantize(Format::Nvfp4)).unwrap();
    assert_eq!(dense_bytes(&w).1, DenseDType::BF16);
    let e = err_of(apply_policy(
        "x.weight",
        HostWeight::from_f32(1, 32, &[f32::NAN; 32]),
        QuantPolicy::Quantize(Format::Mxfp4),
    ));
    assert!(e.contains("x.weight") && e.contains("non-finite"), "{e}");
}

#[test]
fn corrupt_and_truncated_files() {
    let (t, _, _) = dense_fixture();
    let good = serialize(&t);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("garbage", b"this is not a safetensors file at all, just garbage bytes".to_vec()),
        ("huge header length", {
            let mut b = good.clone();
            b[..8].copy_from_slice(&u64::MAX.to_le_bytes());
            b
        }),
        ("header not JSON", {
            let mut b = good.clone();
            b[8] = b'#';
            b
        }),
        ("truncated", good[..good.len() - 10].to_vec()),
        ("trailing bytes", [good.clone(), vec![0; 3]].concat()),
    ];
    for (what, bytes) in cases {
        let d = TempDir::new("corrupt");
        write_config(d.path(), json!({}));
        std::fs::write(d.join("model.safetensors"), &bytes).unwrap();
        let e = err_of(Checkpoint::open(d.path()));
        assert!(e.contains("model.safetensors") && e.contains("not a valid safetensors"), "{what}: {e}");
    }
}

#[test]
fn fp4moe_format_errors() {
    let src_dir = TempDir::new("w4-src");
    let root = TempDir::new("w4-out");
    mixed_source(src_dir.path());
    let src = Checkpoint::open(src_dir.path()).unwrap();
    let out = root.join("ck");
    let plan = vec![PlanItem::Linear { module: "model.layers.0.self_attn.q_proj".into(), shape: [64, HID] }];
    checkpoint_writer::write_quantized(
        &src,
        &out,
        Format::Mxfp4,
        &plan,
        &WriteOptions::default(),
        &mut |_| {},
    )
    .unwrap();
    // A NaN E8M0 code (0xFF) in the written scales.
    let ck = Checkpoint::open(&out).unwrap();
    let mut tensors = BTreeMap::new();
    for n in ck.names() {
        let i = ck.info(n).unwrap();
        tensors.insert(n.to_string(), T(i.dtype, i.shape.clone(), ck.bytes(n).unwrap().to_vec()));
    }
    drop(ck);
    tensors.get_mut("model.layers.0.self_attn.q_proj.weight_scales").unwrap().2[5] = 0xFF;
    std::fs::write(out.join("model.safetensors"), serialize(&tensors)).unwrap();
    let ck = Checkpoint::open(&out).unwrap();
    let e = err_of(ck.linear("model.layers.0.self_attn.q_proj", [64, HID], QuantPolicy::Keep));
    assert!(e.contains("q_proj.weight_scales") && e.contains("NaN") && e.contains("row 2, block 1"), "{e}");
    // Metadata naming an unknown format.
    std::fs::write(out.join(FP4MOE_QUANT_FILE), r#"{"format":"int3"}"#).unwrap();
    let e = err_of(Checkpoint::open(&out));
    assert!(e.contains("int3") && e.contains(FP4MOE_QUANT_FILE), "{e}");
    let newer = checkpoint_writer::LAYOUT_VERSION + 1;
    std::fs::write(
        out.join(FP4MOE_QUANT_FILE),
        json!({"format": "mxfp4", "layout_version": newer}).to_string(),
    )
    .unwrap();
    let e = err_of(Checkpoint::open(&out));
    assert!(e.contains("layout_version") && e.contains("newer"), "{e}");
}

// ---- committed goldens -----------------------------------------------------------------------

#[test]
fn golden_checkpoints_open() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/golden");
    let Ok(rd) = std::fs::read_dir(&root) else { return };
    let mut dirs: Vec<PathBuf> =
        rd.map(|e| e.unwrap().path()).filter(|p| p.join("config.json").is_file()).collect();
    dirs.sort();
    for dir in dirs {
        let ck = Checkpoint::open(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        assert!(!ck.is_empty(), "{}", dir.display());
        let mt = ck.model_type().unwrap();
        assert!(["qwen3_moe", "glm4_moe_lite"].contains(&mt), "{mt}");
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        if name.ends_with("nvfp4") {
            assert!(matches!(ck.quantization(), Quantization::ModelOpt { .. }), "{name}");
        }
        // Every Linear weight in the checkpoint loads and validates (scales included).
        let mut n = 0;
        for t in ck.names().filter(|t| t.ends_with(".weight")) {
            let info = ck.info(t).unwrap();
            let module = t.strip_suffix(".weight").unwrap();
            let shape = match (info.dtype, &info.shape[..]) {
                (Dtype::U8, &[r, c]) => [r, 2 * c],
                (_, &[r, c]) => [r, c],
                _ => continue,
            };
            let w = ck.linear(module, shape, QuantPolicy::Keep).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(w.to_f32().iter().all(|v| v.is_finite()), "{name}: {t}");
            n += 1;
        }
        assert!(n > 0, "{name}");
    }
}

/// The whole point of the writer: a written FP4 checkpoint runs exactly like quantize-on-load
/// (bit-identical logits, same weights through the same kernels), and a ModelOpt checkpoint
/// rewritten pre-stacked runs exactly like the original.
#[test]
fn written_goldens_run_like_quantize_on_load() {
    use fp4moe_models::{LanguageModel, load};
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/golden");
    if !root.join("qwen3_moe").is_dir() {
        return;
    }
    let logits = |model: &dyn LanguageModel| {
        let ids: Vec<u32> = (0..6).map(|i| (i * 37 + 5) % model.info().vocab_size as u32).collect();
        let mut seq = model.new_sequence(ids.len()).unwrap();
        model.forward(&mut [(&mut seq, &ids)], true).unwrap().pop().unwrap()
    };
    let out_root = TempDir::new("golden-write");
    let cases = [
        ("qwen3_moe", Format::Mxfp4),
        ("qwen3_moe", Format::Nvfp4),
        ("glm4_moe_lite", Format::Mxfp4),
        ("glm4_moe_lite", Format::Nvfp4),
        ("qwen3_moe_nvfp4", Format::Nvfp4),
        ("glm4_moe_lite_nvfp4", Format::Nvfp4),
    ];
    for (fixture, format) in cases {
        let dir = root.join(fixture);
        if !dir.is_dir() {
            continue;
        }
        let opts = LoadOptions { quant: Some(format), quantize_all: false };
        let src = Checkpoint::open(&dir).unwrap();
        let plan = checkpoint_writer::default_plan(&src, &opts).unwrap();
        let out = out_root.join(&format!("{fixture}-{}", format.name()));
        checkpoint_writer::write_quantized(&src, &out, format, &plan, &WriteOptions::default(), &mut |_| {})
            .unwrap();
        let on_load = load(fp4moe_cpu::CpuBackend::new(), &dir, &opts).unwrap();
        let written = load(fp4moe_cpu::CpuBackend::new(), &out, &LoadOptions::default()).unwrap();
        let (a, b) = (logits(on_load.as_ref()), logits(written.as_ref()));
        assert!(a.iter().all(|v| v.is_finite()), "{fixture}");
        assert_eq!(a, b, "{fixture} {}: written checkpoint differs from quantize-on-load", format.name());
    }
}
