//! `crates/ops/generated/sampling.cuh` must be exactly what `fp4moe_ops::sampling::cuda_header`
//! writes (CI's NVRTC check compiles the kernels against the file; the backend passes the
//! function's text). `FP4MOE_BLESS=1 cargo test -p fp4moe-ops --test codegen` rewrites it.

#[test]
fn generated_header_is_fresh() {
    let path = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/generated/sampling.cuh"));
    let text = fp4moe_ops::sampling::cuda_header();
    if std::env::var_os("FP4MOE_BLESS").is_some() {
        std::fs::write(path, &text).unwrap();
        return;
    }
    let on_disk = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        on_disk == text,
        "{} is stale: run `FP4MOE_BLESS=1 cargo test -p fp4moe-ops --test codegen`",
        path.display()
    );
}
