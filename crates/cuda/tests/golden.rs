//! Both models on the GPU against transformers' logits (`testdata/golden`): the same checks the
//! CPU backend passes (`fp4moe_models::golden::check_backend`). Skips, saying so, without a
//! CUDA device.

use fp4moe_cuda::CudaBackend;

#[test]
fn models_match_transformers_on_the_gpu() {
    let Ok(first) = CudaBackend::new() else {
        println!("skipped: no CUDA device");
        return;
    };
    let report = fp4moe_models::golden::check_backend(|| Ok(first.with_config(first.config())), "cuda")
        .unwrap_or_else(|e| panic!("{e}"));
    for line in report {
        println!("{line}");
    }
}

/// The same with every MLA step absorbed: the golden prompts are short enough that GLM's
/// prefills otherwise attend expanded (`Backend::mla_expands`).
#[test]
fn models_match_transformers_on_the_gpu_with_absorbed_mla() {
    let Ok(first) = CudaBackend::new() else {
        println!("skipped: no CUDA device");
        return;
    };
    let report = fp4moe_models::golden::check_backend(|| Ok(first.with_absorbed_mla()), "cuda, absorbed MLA")
        .unwrap_or_else(|e| panic!("{e}"));
    for line in report {
        println!("{line}");
    }
}
