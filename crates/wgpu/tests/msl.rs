//! Every WGSL kernel variant must parse, validate and translate to Metal Shading Language with
//! naga (the translator wgpu uses on macOS), so nothing relies on what Metal cannot express
//! (except the cooperative-matrix GEMM, which is not enabled on Metal); and every variant,
//! that one included with the shape of NVIDIA's Vulkan driver (16 x 16 matrices, 32-wide
//! subgroups, which CI's lavapipe does not offer), must translate to SPIR-V. Needs no GPU.

#[test]
fn every_kernel_translates_to_msl() {
    let sources = fp4moe_wgpu::shader_sources(None);
    assert!(sources.len() > 20, "expected every kernel variant, got {}", sources.len());
    let caps = naga::back::msl::supported_capabilities();
    for (name, src) in sources {
        let module = naga::front::wgsl::parse_str(&src)
            .unwrap_or_else(|e| panic!("{name}: WGSL parse error:\n{}", e.emit_to_string(&src)));
        let info = naga::valid::Validator::new(naga::valid::ValidationFlags::all(), caps)
            .validate(&module)
            .unwrap_or_else(|e| panic!("{name}: validation error: {e:?}"));
        let options = naga::back::msl::Options { lang_version: (2, 4), ..Default::default() };
        let (msl, _) = naga::back::msl::write_string(&module, &info, &options, &Default::default())
            .unwrap_or_else(|e| panic!("{name}: MSL translation error: {e}"));
        assert!(msl.contains("kernel void"), "{name}: no compute entry point in the MSL output");
    }
}

#[test]
fn every_kernel_translates_to_spirv_with_16x16_matrices() {
    let sources = fp4moe_wgpu::shader_sources(Some(fp4moe_wgpu::Coop { s: 16, subgroup: 32 }));
    for (name, src) in sources {
        let module = naga::front::wgsl::parse_str(&src)
            .unwrap_or_else(|e| panic!("{name}: WGSL parse error:\n{}", e.emit_to_string(&src)));
        let info = naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::all(),
        )
        .validate(&module)
        .unwrap_or_else(|e| panic!("{name}: validation error: {e:?}"));
        let options = naga::back::spv::Options { lang_version: (1, 3), ..Default::default() };
        let words = naga::back::spv::write_vec(&module, &info, &options, None)
            .unwrap_or_else(|e| panic!("{name}: SPIR-V translation error: {e}"));
        assert!(!words.is_empty(), "{name}: empty SPIR-V");
    }
}
