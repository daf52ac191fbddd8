//! The shared conformance suite on the wgpu backend (lavapipe in CI, any GPU elsewhere).
//! Without an adapter every test prints `skipped: no wgpu adapter` and passes.
//!
//! The four cases at the models' full shapes (every real linear shape, and MoE layers with 128
//! and 64 experts of 2048x768 / 2048x1536) run only on a hardware adapter: on lavapipe, which
//! emulates Vulkan on the CPU, each takes well over ten minutes on CI's two cores. They pass on
//! the H100 through Vulkan (`tools/device/wgpu.sh`); on lavapipe they print why they skip. The
//! odd-shape, routing and attention cases exercise the same kernels on every change.

use fp4moe_ops::conformance_tests;
use fp4moe_wgpu::{Options, WgpuBackend};

fn any_adapter() -> Option<WgpuBackend> {
    WgpuBackend::new().ok()
}

fn hardware_adapter() -> Option<WgpuBackend> {
    WgpuBackend::new().ok().filter(|b| !b.caps().cpu_adapter)
}

conformance_tests!(@each any_adapter(), "wgpu adapter";
    check_paths, check_memory, check_cast,
    check_linear_odd_shapes, check_linear_router_shapes, check_head_linear, check_embedding,
    check_rms_norm, check_rope, check_norm_rope, check_norm_ropes_to_cache, check_split_rope, check_softmax, check_elementwise, check_data_movement,
    check_route_softmax, check_route_sigmoid_grouped, check_argmax_top_k, check_weight_sums,
    check_moe_routing, check_attention_gqa, check_attention_mla, check_attention_mla_expanded, check_shape_errors);

conformance_tests!(@each hardware_adapter(),
    "hardware wgpu adapter (full-shape case; over 10 minutes on a CPU adapter such as lavapipe)";
    check_linear_glm_shapes, check_linear_qwen_shapes, check_moe_qwen_shape, check_moe_glm_shape);

/// The kernels run without wgpu's runtime checks (index clamps, division guards, loop
/// counters) by default; the suite again with them on (`FP4MOE_WGPU_CHECKS=1`, wgpu's own
/// default), so both compilations of every kernel are held to the reference.
mod runtime_checks {
    use super::*;

    fn checked_adapter() -> Option<WgpuBackend> {
        WgpuBackend::with_options(Options { runtime_checks: Some(true), ..Options::default() }).ok()
    }

    conformance_tests!(@each checked_adapter(), "wgpu adapter";
        check_linear_odd_shapes, check_linear_router_shapes, check_head_linear, check_embedding,
        check_rms_norm, check_rope, check_norm_rope, check_norm_ropes_to_cache, check_split_rope, check_softmax, check_elementwise, check_data_movement,
        check_route_softmax, check_route_sigmoid_grouped, check_argmax_top_k,
        check_moe_routing, check_attention_gqa, check_attention_mla, check_attention_mla_expanded);
}

/// Every kernel variant becomes a pipeline on the adapter's driver (naga accepting a kernel
/// does not mean the driver does: see the cooperative-matrix notes), in both check modes.
#[test]
fn every_variant_compiles() {
    for checks in [false, true] {
        let opts = Options { runtime_checks: Some(checks), ..Options::default() };
        let Ok(b) = WgpuBackend::with_options(opts) else {
            println!("every_variant_compiles: skipped: no wgpu adapter");
            return;
        };
        let t = std::time::Instant::now();
        b.compile_all().unwrap_or_else(|e| panic!("runtime checks {checks}: {e}"));
        println!("every_variant_compiles (runtime checks {checks}): {:.1?}", t.elapsed());
    }
}
