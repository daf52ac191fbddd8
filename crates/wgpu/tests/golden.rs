//! Both models through wgpu against transformers' logits (`testdata/golden`): the same checks the
//! CPU backend passes (`fp4moe_models::golden::check_backend`). The fixtures are tiny, so this
//! runs on lavapipe in CI as well as on GPUs. Skips, saying so, without an adapter.

use fp4moe_wgpu::WgpuBackend;

#[test]
fn models_match_transformers_through_wgpu() {
    if WgpuBackend::new().is_err() {
        println!("skipped: no wgpu adapter");
        return;
    }
    let report =
        fp4moe_models::golden::check_backend(|| WgpuBackend::new().map_err(|e| e.to_string()), "wgpu")
            .unwrap_or_else(|e| panic!("{e}"));
    for line in report {
        println!("{line}");
    }
}
