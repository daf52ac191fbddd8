//! Every WGSL kernel variant must parse, validate and translate to Metal Shading Language with
//! naga (the translator wgpu uses on macOS), so nothing relies on what Metal cannot express.
//! Needs no GPU.

#[test]
fn every_kernel_translates_to_msl() {
    let sources = fp4moe_wgpu::shader_sources();
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
