//! Both models against the transformers reference (`testdata/golden`, see its README), on the
//! CPU backend and on the reference twin:
//! - unquantized logits within 1e-3 relative error (‖a − e‖ / ‖e‖) and the same argmax;
//! - ModelOpt NVFP4 checkpoints against transformers run on their dequantized weights;
//! - decode token by token through the cache, chunked prefill and batched sequences all equal
//!   the one-shot forward;
//! - quantize-on-load (MXFP4, NVFP4) on the CPU equals the reference twin run on the
//!   dequantized weights, so the only difference from the 16-bit model is quantization error;
//! - the MLA latent cache holds kv_lora + rope values per token per layer;
//! - bf16 prefill activations on the CPU equal the reference twin in the same mode.
//!
//! Measured errors are printed (`cargo test -p fp4moe-models --test golden -- --nocapture`).

use fp4moe_cpu::CpuBackend;
use fp4moe_models::golden::{self, GOLDEN_TOL, expected, forward_all, rel_err};
use fp4moe_models::{LanguageModel, LoadOptions, glm4_moe_lite, load, load_dequantized, synthetic::Arch};
use fp4moe_ops::reference::RefBackend;
use std::path::Path;

fn check_against_golden(model: &dyn LanguageModel, fixture: &str, label: &str) -> f64 {
    golden::check_against_golden(model, fixture, label).unwrap_or_else(|e| panic!("{e}"))
}

fn check_paths(model: &dyn LanguageModel, fixture: &str) {
    golden::check_paths(model, fixture).unwrap_or_else(|e| panic!("{e}"));
}

fn cpu_model(fixture: &str, opts: LoadOptions) -> Box<dyn LanguageModel> {
    load(CpuBackend::new(), &golden::fixture(fixture), &opts)
        .unwrap_or_else(|e| panic!("loading {fixture}: {e}"))
}

fn ref_model(fixture: &str, opts: LoadOptions) -> Box<dyn LanguageModel> {
    load(RefBackend, &golden::fixture(fixture), &opts).unwrap_or_else(|e| panic!("loading {fixture}: {e}"))
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

// ---- bf16 prefill activations ------------------------------------------------------------

#[test]
fn bf16_prefill_activations_equal_the_reference_in_the_same_mode() {
    for fixture in golden::FIXTURES {
        let (mut model, mut reference) = (cpu_model(fixture, quant(None)), ref_model(fixture, quant(None)));
        golden::check_bf16_prefill(&mut *model, &mut *reference, fixture, &format!("{fixture} cpu"))
            .unwrap_or_else(|e| panic!("{e}"));
    }
}

// ---- quantize-on-load -----------------------------------------------------------------------

/// The CPU backend on quantized weights equals the reference twin on the same weights
/// dequantized to f32; returns (that error, the error against the 16-bit golden logits).
fn check_quantized(fixture: &str, format: fp4::Format) {
    let opts = quant(Some(format));
    let model = cpu_model(fixture, opts);
    assert!(model.info().quantization.contains(format.name()), "{}", model.info().quantization);
    let reference =
        load_dequantized(RefBackend, &golden::fixture(fixture), &opts).expect("dequantized reference");
    for (s, seq) in expected(fixture).unwrap().sequences.iter().enumerate() {
        let got = forward_all(&*model, &seq.ids).unwrap();
        let want = forward_all(&*reference, &seq.ids).unwrap();
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
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(golden::fixture("glm4_moe_lite").join("config.json")).unwrap(),
    )
    .unwrap();
    let want = cfg["kv_lora_rank"].as_u64().unwrap() + cfg["qk_rope_head_dim"].as_u64().unwrap();
    assert_eq!(tiny.cache_values_per_token_per_layer(), Some(want as usize));
}
