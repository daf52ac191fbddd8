//! Bad input gives an error that says what is wrong, never a panic: broken checkpoint
//! directories (missing files or tensors, wrong shapes or dtypes, corrupt or truncated
//! safetensors, NaN or zero FP4 scales), bad configs (unknown model_type, missing keys,
//! unsupported RoPE), and bad requests (token ids outside the vocabulary, sequences over their
//! capacity or the context length, a sequence from another model).
//!
//! Each broken checkpoint is a golden fixture rewritten into a temporary directory.

use fp4moe_models::{Error, LanguageModel, LoadOptions, load};
use fp4moe_ops::reference::RefBackend;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/golden").join(name)
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("fp4moe-bad-input-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One stored tensor, owned so tests can edit it.
struct Stored {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

/// Every tensor of a fixture (all shards), in name order.
fn read_tensors(fixture: &str) -> Vec<Stored> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(golden(fixture)).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            let bytes = std::fs::read(&path).unwrap();
            let st = SafeTensors::deserialize(&bytes).unwrap();
            for (name, t) in st.tensors() {
                out.push(Stored {
                    name,
                    dtype: t.dtype(),
                    shape: t.shape().to_vec(),
                    data: t.data().to_vec(),
                });
            }
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

fn config(fixture: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(golden(fixture).join("config.json")).unwrap()).unwrap()
}

/// Writes `config` and `tensors` as a single-file checkpoint (plus the fixture's quantization
/// metadata, if any) into a fresh temporary directory.
fn write_checkpoint(tag: &str, fixture: &str, config: &Value, tensors: &[Stored]) -> TempDir {
    let dir = TempDir::new(tag);
    std::fs::write(dir.0.join("config.json"), serde_json::to_string_pretty(config).unwrap()).unwrap();
    let quant = golden(fixture).join("hf_quant_config.json");
    if quant.exists() {
        std::fs::copy(&quant, dir.0.join("hf_quant_config.json")).unwrap();
    }
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|t| (t.name.clone(), TensorView::new(t.dtype, t.shape.clone(), &t.data).unwrap()))
        .collect();
    let bytes = safetensors::tensor::serialize(views, None).unwrap();
    std::fs::write(dir.0.join("model.safetensors"), bytes).unwrap();
    dir
}

/// Loads `dir` and returns the error message; fails the test if loading succeeds.
fn load_err(dir: &Path) -> (Error, String) {
    match load(RefBackend, dir, &LoadOptions::default()) {
        Ok(_) => panic!("{} loaded, but should not", dir.display()),
        Err(e) => {
            let msg = e.to_string();
            (e, msg)
        }
    }
}

fn edit<F: FnOnce(&mut Stored)>(tensors: &mut [Stored], name: &str, f: F) {
    f(tensors.iter_mut().find(|t| t.name == name).unwrap_or_else(|| panic!("fixture lacks {name}")));
}

// ---- directories and files ------------------------------------------------------------------

#[test]
fn nonexistent_directory_is_an_error_naming_it() {
    let dir = std::env::temp_dir().join("fp4moe-no-such-model-dir");
    let (_, msg) = load_err(&dir);
    assert!(msg.contains("fp4moe-no-such-model-dir"), "{msg}");
}

#[test]
fn missing_config_is_an_error() {
    let dir = write_checkpoint("no-config", "qwen3_moe", &config("qwen3_moe"), &read_tensors("qwen3_moe"));
    std::fs::remove_file(dir.0.join("config.json")).unwrap();
    let (_, msg) = load_err(&dir.0);
    assert!(msg.contains("config.json"), "{msg}");
}

#[test]
fn missing_weights_are_an_error() {
    let dir = write_checkpoint("no-weights", "qwen3_moe", &config("qwen3_moe"), &read_tensors("qwen3_moe"));
    std::fs::remove_file(dir.0.join("model.safetensors")).unwrap();
    let (e, msg) = load_err(&dir.0);
    assert!(matches!(e, Error::NoWeights { .. }), "{msg}");
}

#[test]
fn missing_tensor_is_an_error_naming_it() {
    let name = "model.layers.1.self_attn.k_norm.weight";
    let tensors: Vec<Stored> = read_tensors("qwen3_moe").into_iter().filter(|t| t.name != name).collect();
    let dir = write_checkpoint("missing-tensor", "qwen3_moe", &config("qwen3_moe"), &tensors);
    let (_, msg) = load_err(&dir.0);
    assert!(msg.contains(name), "{msg}");
}

#[test]
fn missing_expert_is_an_error_naming_it() {
    let name = "model.layers.1.mlp.experts.5.up_proj.weight";
    let mut tensors = read_tensors("glm4_moe_lite");
    let before = tensors.len();
    tensors.retain(|t| t.name != name);
    if tensors.len() == before {
        // Fused-expert layout: drop the fused parameter instead.
        tensors.retain(|t| t.name != "model.layers.1.mlp.experts.gate_up_proj");
    }
    let dir = write_checkpoint("missing-expert", "glm4_moe_lite", &config("glm4_moe_lite"), &tensors);
    let (_, msg) = load_err(&dir.0);
    assert!(msg.contains("model.layers.1.mlp.experts"), "{msg}");
}

#[test]
fn wrong_shape_is_an_error_naming_the_tensor() {
    let name = "model.layers.0.self_attn.q_proj.weight";
    let mut tensors = read_tensors("qwen3_moe");
    edit(&mut tensors, name, |t| t.shape.reverse());
    let dir = write_checkpoint("wrong-shape", "qwen3_moe", &config("qwen3_moe"), &tensors);
    let (e, msg) = load_err(&dir.0);
    assert!(matches!(e, Error::Shape { .. }), "{msg}");
    assert!(msg.contains(name), "{msg}");
}

#[test]
fn wrong_dtype_is_an_error_naming_the_tensor() {
    let name = "model.layers.0.input_layernorm.weight";
    let mut tensors = read_tensors("qwen3_moe");
    edit(&mut tensors, name, |t| {
        assert_eq!(t.dtype, Dtype::BF16);
        t.dtype = Dtype::I16;
    });
    let dir = write_checkpoint("wrong-dtype", "qwen3_moe", &config("qwen3_moe"), &tensors);
    let (_, msg) = load_err(&dir.0);
    assert!(msg.contains(name), "{msg}");
}

#[test]
fn corrupt_header_is_an_error_naming_the_file() {
    let dir = write_checkpoint("corrupt", "qwen3_moe", &config("qwen3_moe"), &read_tensors("qwen3_moe"));
    let path = dir.0.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    // Overwrite the JSON header after its length prefix with garbage of the same length.
    for b in bytes[8..40].iter_mut() {
        *b = b'#';
    }
    std::fs::write(&path, &bytes).unwrap();
    let (_, msg) = load_err(&dir.0);
    assert!(msg.contains("model.safetensors"), "{msg}");

    // A header length beyond the file.
    bytes[..8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let (_, msg) = load_err(&dir.0);
    assert!(msg.contains("model.safetensors"), "{msg}");
}

#[test]
fn truncated_file_is_an_error_naming_the_file() {
    let dir = write_checkpoint("truncated", "qwen3_moe", &config("qwen3_moe"), &read_tensors("qwen3_moe"));
    let path = dir.0.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let (_, msg) = load_err(&dir.0);
    assert!(msg.contains("model.safetensors"), "{msg}");
}

// ---- FP4 scales -----------------------------------------------------------------------------

fn nvfp4_with(tag: &str, scale_2: Option<f32>, block_scale_code: Option<u8>) -> String {
    let mut tensors = read_tensors("qwen3_moe_nvfp4");
    let module = "model.layers.0.self_attn.o_proj";
    if let Some(v) = scale_2 {
        edit(&mut tensors, &format!("{module}.weight_scale_2"), |t| {
            t.data = v.to_le_bytes().repeat(t.data.len() / 4);
        });
    }
    if let Some(code) = block_scale_code {
        edit(&mut tensors, &format!("{module}.weight_scale"), |t| t.data[3] = code);
    }
    let dir = write_checkpoint(tag, "qwen3_moe_nvfp4", &config("qwen3_moe_nvfp4"), &tensors);
    let (_, msg) = load_err(&dir.0);
    assert!(msg.contains(module), "{msg}");
    msg
}

#[test]
fn nan_or_zero_nvfp4_scales_are_errors_naming_the_tensor() {
    nvfp4_with("nan-scale2", Some(f32::NAN), None);
    nvfp4_with("zero-scale2", Some(0.0), None);
    // E4M3 0x7F is NaN.
    nvfp4_with("nan-block-scale", None, Some(0x7F));
}

// ---- configs --------------------------------------------------------------------------------

#[test]
fn unknown_model_type_lists_the_supported_ones() {
    let mut cfg = config("qwen3_moe");
    cfg["model_type"] = "llama".into();
    let dir = write_checkpoint("unknown-type", "qwen3_moe", &cfg, &read_tensors("qwen3_moe"));
    let (_, msg) = load_err(&dir.0);
    for want in ["llama", "qwen3_moe", "glm4_moe_lite"] {
        assert!(msg.contains(want), "{msg}");
    }
}

fn config_err(tag: &str, fixture: &str, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) -> String {
    let mut cfg = config(fixture);
    edit(cfg.as_object_mut().unwrap());
    let dir = write_checkpoint(tag, fixture, &cfg, &read_tensors(fixture));
    load_err(&dir.0).1
}

#[test]
fn missing_config_keys_are_named() {
    let msg = config_err("no-layers", "qwen3_moe", |c| {
        c.remove("num_hidden_layers");
    });
    assert!(msg.contains("num_hidden_layers"), "{msg}");
    // Keys with two spellings name both.
    let msg = config_err("no-experts", "qwen3_moe", |c| {
        c.remove("num_local_experts");
        c.remove("num_experts");
    });
    assert!(msg.contains("num_experts") && msg.contains("num_local_experts"), "{msg}");
    let msg = config_err("no-rope", "qwen3_moe", |c| {
        c.remove("rope_parameters");
        c.remove("rope_theta");
    });
    assert!(msg.contains("rope_theta"), "{msg}");
    let msg = config_err("no-dense-layers", "glm4_moe_lite", |c| {
        c.remove("mlp_layer_types");
        c.remove("first_k_dense_replace");
    });
    assert!(msg.contains("mlp_layer_types") && msg.contains("first_k_dense_replace"), "{msg}");
    let msg = config_err("no-q-lora", "glm4_moe_lite", |c| {
        c.remove("q_lora_rank");
    });
    assert!(msg.contains("q_lora_rank"), "{msg}");
    let msg = config_err("no-scaling", "glm4_moe_lite", |c| {
        c.remove("routed_scaling_factor");
    });
    assert!(msg.contains("routed_scaling_factor"), "{msg}");
}

#[test]
fn published_config_spellings_are_accepted() {
    // The published checkpoints' spelling: top-level rope_theta, num_experts,
    // first_k_dense_replace; the fixtures use current transformers' spelling.
    let mut cfg = config("qwen3_moe");
    let theta = cfg["rope_parameters"]["rope_theta"].clone();
    let obj = cfg.as_object_mut().unwrap();
    obj.remove("rope_parameters");
    obj.insert("rope_theta".into(), theta);
    let experts = obj.remove("num_local_experts").unwrap();
    obj.insert("num_experts".into(), experts);
    let dir = write_checkpoint("published-qwen", "qwen3_moe", &cfg, &read_tensors("qwen3_moe"));
    let model = load(RefBackend, &dir.0, &LoadOptions::default()).expect("published spelling");
    assert_eq!(model.info().num_layers, cfg["num_hidden_layers"].as_u64().unwrap() as usize);

    let mut cfg = config("glm4_moe_lite");
    let obj = cfg.as_object_mut().unwrap();
    let types = obj.remove("mlp_layer_types").unwrap();
    let first_sparse = types.as_array().unwrap().iter().position(|t| t == "sparse").unwrap();
    obj.insert("first_k_dense_replace".into(), first_sparse.into());
    let dir = write_checkpoint("published-glm", "glm4_moe_lite", &cfg, &read_tensors("glm4_moe_lite"));
    load(RefBackend, &dir.0, &LoadOptions::default()).expect("published spelling");
}

#[test]
fn scaled_rope_is_refused_not_run_wrong() {
    let msg = config_err("yarn", "glm4_moe_lite", |c| {
        c["rope_parameters"]["rope_type"] = "yarn".into();
    });
    assert!(msg.contains("yarn"), "{msg}");
}

// ---- requests -------------------------------------------------------------------------------

fn golden_model() -> Box<dyn LanguageModel> {
    load(RefBackend, &golden("qwen3_moe"), &LoadOptions::default()).unwrap()
}

#[test]
fn token_ids_outside_the_vocabulary_are_errors_and_change_nothing() {
    let model = golden_model();
    let vocab = model.info().vocab_size as u32;
    let mut seq = model.new_sequence(8).unwrap();
    let err = model.forward(&mut [(&mut seq, &[1, vocab, 2])], false).unwrap_err();
    assert!(matches!(err, Error::TokenOutOfRange { id, position: 1, .. } if id == vocab), "{err}");
    assert!(err.to_string().contains(&vocab.to_string()), "{err}");
    assert_eq!(seq.len, 0);
    // A later valid request on the same sequence still works.
    model.forward(&mut [(&mut seq, &[1, 2])], false).unwrap();
    assert_eq!(seq.len, 2);
    let err = model.forward(&mut [(&mut seq, &[u32::MAX])], false).unwrap_err();
    assert!(matches!(err, Error::TokenOutOfRange { position: 2, .. }), "{err}");
}

#[test]
fn sequences_over_capacity_or_context_are_errors() {
    let model = golden_model();
    let mut seq = model.new_sequence(3).unwrap();
    let err = model.forward(&mut [(&mut seq, &[1, 2, 3, 4])], false).unwrap_err();
    assert!(matches!(err, Error::ContextOverflow { len: 4, max: 3 }), "{err}");
    model.forward(&mut [(&mut seq, &[1, 2, 3])], false).unwrap();
    let err = model.forward(&mut [(&mut seq, &[1])], false).unwrap_err();
    assert!(matches!(err, Error::ContextOverflow { len: 4, max: 3 }), "{err}");

    let max = model.info().max_position_embeddings;
    assert!(model.new_sequence(max + 1).is_err());
    assert!(model.new_sequence(0).is_err());
    let mut empty = model.new_sequence(2).unwrap();
    assert!(model.forward(&mut [(&mut empty, &[])], false).is_err());
}

#[test]
fn a_sequence_from_another_model_is_an_error() {
    let qwen = golden_model();
    let glm = load(RefBackend, &golden("glm4_moe_lite"), &LoadOptions::default()).unwrap();
    let mut seq = glm.new_sequence(4).unwrap();
    let err = qwen.forward(&mut [(&mut seq, &[1])], false).unwrap_err();
    assert!(err.to_string().contains("not created by this"), "{err}");
}
