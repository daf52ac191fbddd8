//! Both models against the transformers reference (`testdata/golden`, see its README), on the
//! CPU backend and on the reference twin:
//! - unquantized logits within 1e-3 relative error (‖a − e‖ / ‖e‖) and the same argmax;
//! - ModelOpt NVFP4 checkpoints against transformers run on their dequantized weights;
//! - decode token by token through the cache, chunked prefill and batched sequences all equal
//!   the one-shot forward;
//! - quantize-on-load (MXFP4, NVFP4) on the CPU equals the reference twin run on the
//!   dequantized weights, so the only difference from the 16-bit model is quantization error;
//! - the MLA latent cache holds kv_lora + rope values per token per layer.
//!
//! Measured errors are printed (`cargo test -p fp4moe-models --test golden -- --nocapture`).

use fp4moe_cpu::CpuBackend;
use fp4moe_models::{LanguageModel, LoadOptions, glm4_moe_lite, load, load_dequantized, synthetic::Arch};
use fp4moe_ops::reference::RefBackend;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Budget against transformers (float32 reference; ours differs by summation order only).
const GOLDEN_TOL: f64 = 1e-3;
/// Budget between two runs of the same weights through different cache / batch paths.
const PATH_TOL: f64 = 1e-4;

#[derive(Deserialize)]
struct Expected {
    sequences: Vec<ExpectedSeq>,
}

#[derive(Deserialize)]
struct ExpectedSeq {
    ids: Vec<u32>,
    argmax: Vec<usize>,
    logits: Vec<Vec<f32>>,
}

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/golden").join(name)
}

fn expected(name: &str) -> Expected {
    let path = golden(name).join("expected.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn rel_err(a: &[f32], e: &[f32]) -> f64 {
    assert_eq!(a.len(), e.len(), "length mismatch");
    let num: f64 = a.iter().zip(e).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum();
    let den: f64 = e.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

fn argmax(row: &[f32]) -> usize {
    row.iter().enumerate().fold(0, |best, (i, v)| if *v > row[best] { i } else { best })
}

/// Logits `[n, vocab]` (flattened) of one full-sequence forward.
fn forward_all(model: &dyn LanguageModel, ids: &[u32]) -> Vec<f32> {
    let mut seq = model.new_sequence(ids.len()).expect("new_sequence");
    let mut out = model.forward(&mut [(&mut seq, ids)], true).expect("forward");
    assert_eq!(seq.len, ids.len());
    out.pop().expect("one sequence")
}

/// Runs every golden sequence and checks logits and argmax; returns the worst relative error.
fn check_against_golden(model: &dyn LanguageModel, fixture: &str, label: &str) -> f64 {
    let exp = expected(fixture);
    let vocab = model.info().vocab_size;
    let mut worst = 0.0f64;
    for (s, seq) in exp.sequences.iter().enumerate() {
        let got = forward_all(model, &seq.ids);
        let want: Vec<f32> = seq.logits.iter().flatten().copied().collect();
        assert_eq!(got.len(), want.len(), "{label} seq {s}: logits length");
        let err = rel_err(&got, &want);
        println!("{label}: sequence {s} ({} tokens): rel err {err:.3e}", seq.ids.len());
        assert!(err < GOLDEN_TOL, "{label} seq {s}: rel err {err:.3e} >= {GOLDEN_TOL:e}");
        for (p, row) in got.chunks(vocab).enumerate() {
            assert_eq!(argmax(row), seq.argmax[p], "{label} seq {s}: argmax at position {p}");
        }
        worst = worst.max(err);
    }
    worst
}

fn cpu_model(fixture: &str, opts: LoadOptions) -> Box<dyn LanguageModel> {
    load(CpuBackend::new(), &golden(fixture), &opts).unwrap_or_else(|e| panic!("loading {fixture}: {e}"))
}

fn ref_model(fixture: &str, opts: LoadOptions) -> Box<dyn LanguageModel> {
    load(RefBackend, &golden(fixture), &opts).unwrap_or_else(|e| panic!("loading {fixture}: {e}"))
}

fn quant(format: Option<fp4::Format>) -> LoadOptions {
    LoadOptions { quant: format, ..LoadOptions::default() }
}

// ---- unquantized and pre-quantized checkpoints against transformers --------------------------

#[test]
fn qwen3_moe_bf16_sharded_matches_transformers() {
    check_against_golden(&*cpu_model("qwen3_moe", quant(None)), "qwen3_moe", "qwen3_moe cpu");
    check_against_golden(&*ref_model("qwen3_moe", quant(None)), "qwen3_moe", "qwen3_moe reference");
}

#[test]
fn glm4_moe_lite_bf16_matches_transformers() {
    check_against_golden(&*cpu_model("glm4_moe_lite", quant(None)), "glm4_moe_lite", "glm4_moe_lite cpu");
    check_against_golden(
        &*ref_model("glm4_moe_lite", quant(None)),
        "glm4_moe_lite",
        "glm4_moe_lite reference",
    );
}

#[test]
fn qwen3_moe_modelopt_nvfp4_matches_transformers_on_dequantized_weights() {
    let model = cpu_model("qwen3_moe_nvfp4", quant(None));
    assert!(model.info().quantization.contains("nvfp4"), "{}", model.info().quantization);
    check_against_golden(&*model, "qwen3_moe_nvfp4", "qwen3_moe_nvfp4 cpu");
    // A format asked for at load does not re-quantize weights that are already FP4.
    let requested = cpu_model("qwen3_moe_nvfp4", quant(Some(fp4::Format::Mxfp4)));
    check_against_golden(&*requested, "qwen3_moe_nvfp4", "qwen3_moe_nvfp4 cpu --quant mxfp4");
}

#[test]
fn glm4_moe_lite_modelopt_nvfp4_matches_transformers_on_dequantized_weights() {
    let model = cpu_model("glm4_moe_lite_nvfp4", quant(None));
    assert!(model.info().quantization.contains("nvfp4"), "{}", model.info().quantization);
    check_against_golden(&*model, "glm4_moe_lite_nvfp4", "glm4_moe_lite_nvfp4 cpu");
}

// ---- cache and batch paths ------------------------------------------------------------------

/// Token-by-token decode, a two-chunk prefill, and a batch of two sequences of different
/// lengths (prefilled together, then decoded together) all reproduce the one-shot forward.
fn check_paths(model: &dyn LanguageModel, fixture: &str) {
    let exp = expected(fixture);
    let vocab = model.info().vocab_size;
    let (a, b) = (&exp.sequences[0].ids, &exp.sequences[1].ids);
    let full_a = forward_all(model, a);
    let full_b = forward_all(model, b);

    // Decode: one token per forward, last-token logits only.
    let mut seq = model.new_sequence(a.len()).unwrap();
    let mut stepped = Vec::new();
    for t in a {
        stepped.extend(model.forward(&mut [(&mut seq, std::slice::from_ref(t))], false).unwrap().remove(0));
    }
    let err = rel_err(&stepped, &full_a);
    println!("{fixture}: token-by-token decode vs full forward: rel err {err:.3e}");
    assert!(err < PATH_TOL, "{fixture}: decode rel err {err:.3e}");

    // Chunked prefill: the second chunk attends to the first through the cache.
    let cut = a.len() / 2;
    let mut seq = model.new_sequence(a.len()).unwrap();
    let mut chunked = model.forward(&mut [(&mut seq, &a[..cut])], true).unwrap().remove(0);
    chunked.extend(model.forward(&mut [(&mut seq, &a[cut..])], true).unwrap().remove(0));
    let err = rel_err(&chunked, &full_a);
    println!("{fixture}: two-chunk prefill vs full forward: rel err {err:.3e}");
    assert!(err < PATH_TOL, "{fixture}: chunked prefill rel err {err:.3e}");

    // Batch: both prompts but the last token in one forward, then both last tokens together.
    let mut sa = model.new_sequence(a.len()).unwrap();
    let mut sb = model.new_sequence(b.len()).unwrap();
    let (na, nb) = (a.len() - 1, b.len() - 1);
    let pre = model.forward(&mut [(&mut sa, &a[..na]), (&mut sb, &b[..nb])], true).unwrap();
    let step = model.forward(&mut [(&mut sa, &a[na..]), (&mut sb, &b[nb..])], false).unwrap();
    for (name, pre, step, full) in [("a", &pre[0], &step[0], &full_a), ("b", &pre[1], &step[1], &full_b)] {
        let err_pre = rel_err(pre, &full[..pre.len()]);
        let err_step = rel_err(step, &full[full.len() - vocab..]);
        println!(
            "{fixture}: batched seq {name}: prefill rel err {err_pre:.3e}, decode rel err {err_step:.3e}"
        );
        assert!(err_pre < PATH_TOL && err_step < PATH_TOL, "{fixture}: batched seq {name}");
    }
    assert_eq!((sa.len, sb.len), (a.len(), b.len()));
}

#[test]
fn qwen3_moe_decode_chunks_and_batches_equal_full_forward() {
    check_paths(&*cpu_model("qwen3_moe", quant(None)), "qwen3_moe");
}

#[test]
fn glm4_moe_lite_decode_chunks_and_batches_equal_full_forward() {
    check_paths(&*cpu_model("glm4_moe_lite", quant(None)), "glm4_moe_lite");
}

#[test]
fn quantized_glm4_moe_lite_decode_equals_full_forward() {
    check_paths(&*cpu_model("glm4_moe_lite_nvfp4", quant(None)), "glm4_moe_lite_nvfp4");
}

// ---- quantize-on-load -----------------------------------------------------------------------

/// The CPU backend on quantized weights equals the reference twin on the same weights
/// dequantized to f32; returns (that error, the error against the 16-bit golden logits).
fn check_quantized(fixture: &str, format: fp4::Format) {
    let opts = quant(Some(format));
    let model = cpu_model(fixture, opts);
    assert!(model.info().quantization.contains(format.name()), "{}", model.info().quantization);
    let reference = load_dequantized(RefBackend, &golden(fixture), &opts).expect("dequantized reference");
    for (s, seq) in expected(fixture).sequences.iter().enumerate() {
        let got = forward_all(&*model, &seq.ids);
        let want = forward_all(&*reference, &seq.ids);
        let err = rel_err(&got, &want);
        let want16: Vec<f32> = seq.logits.iter().flatten().copied().collect();
        let q_err = rel_err(&got, &want16);
        println!(
            "{fixture} {}: seq {s}: cpu vs reference on dequantized weights {err:.3e}; vs 16-bit model {q_err:.3e}",
            format.name()
        );
        assert!(err < GOLDEN_TOL, "{fixture} {}: seq {s}: rel err {err:.3e}", format.name());
        // Quantization error itself is bounded loosely: garbage (a dropped scale, a wrong
        // nibble order) lands near 1 or beyond.
        assert!(q_err < 0.5, "{fixture} {}: seq {s}: quantization error {q_err:.3e}", format.name());
    }
}

#[test]
fn qwen3_moe_quantized_on_load_equals_reference_on_dequantized_weights() {
    check_quantized("qwen3_moe", fp4::Format::Mxfp4);
    check_quantized("qwen3_moe", fp4::Format::Nvfp4);
}

#[test]
fn glm4_moe_lite_quantized_on_load_equals_reference_on_dequantized_weights() {
    check_quantized("glm4_moe_lite", fp4::Format::Mxfp4);
    check_quantized("glm4_moe_lite", fp4::Format::Nvfp4);
}

// ---- cache size ---------------------------------------------------------------------------

#[test]
fn glm_latent_cache_is_kv_lora_plus_rope_per_token_per_layer() {
    let real = glm4_moe_lite::Config::from_json(&Arch::Glm47Flash.config(), Path::new("glm-4.7-flash"))
        .expect("real config");
    assert_eq!(real.cache_values_per_token(), 512 + 64);
    let tiny = cpu_model("glm4_moe_lite", quant(None));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(golden("glm4_moe_lite").join("config.json")).unwrap())
            .unwrap();
    let want = cfg["kv_lora_rank"].as_u64().unwrap() + cfg["qk_rope_head_dim"].as_u64().unwrap();
    assert_eq!(tiny.cache_values_per_token_per_layer(), Some(want as usize));
}
