//! The GPU decode snippets in `crates/fp4/generated/` must be exactly what `fp4::codegen` writes
//! from the Rust table. `FP4MOE_BLESS=1 cargo test -p fp4 --test codegen` rewrites them.

#[test]
fn generated_files_are_fresh() {
    let dir = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/generated"));
    let bless = std::env::var_os("FP4MOE_BLESS").is_some();
    for (name, text) in fp4::codegen::all() {
        let path = dir.join(name);
        if bless {
            std::fs::write(&path, &text).unwrap();
            continue;
        }
        let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            on_disk == text,
            "{} is stale: run `FP4MOE_BLESS=1 cargo test -p fp4 --test codegen`",
            path.display()
        );
    }
}

#[test]
fn snippets_carry_every_table_value() {
    for (name, text) in fp4::codegen::all() {
        assert!(text.contains("GENERATED"), "{name}");
        for v in fp4::e2m1::TABLE {
            assert!(text.contains(&format!("{v:?}")), "{name} lacks {v:?}");
        }
    }
}
