//! The real Qwen3 and GLM-4.7-Flash chat templates and (small, same-algorithm) tokenizers, rendered
//! and encoded by the engine, must match what transformers produced for the same conversations
//! (testdata/tokenizer/*/expected_render.json, written by tools/gen_golden.py).

use std::path::PathBuf;

use fp4moe_engine::{RenderOptions, Tokenizer};
use serde_json::Value;

fn testdata(model: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/tokenizer").join(model)
}

fn check(model: &str) {
    let dir = testdata(model);
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let template = tok.chat_template().expect("the golden tokenizers ship a chat template");
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected_render.json")).unwrap()).unwrap();
    let cases = expected["cases"].as_array().unwrap();
    assert!(!cases.is_empty());
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let messages = case["messages"].as_array().unwrap();
        let opts = RenderOptions {
            add_generation_prompt: case["add_generation_prompt"].as_bool().unwrap_or(false),
            enable_thinking: case.get("enable_thinking").and_then(Value::as_bool),
            tools: case.get("tools").cloned(),
        };
        let rendered = template.render(messages, &opts).unwrap();
        assert_eq!(rendered, case["rendered"].as_str().unwrap(), "{model}/{name}: rendered text");
        let ids = tok.encode(&rendered, false).unwrap();
        let want: Vec<u32> =
            case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        assert_eq!(ids, want, "{model}/{name}: token ids");
        // Decoding with specials kept gives the rendered text back.
        assert_eq!(tok.decode(&ids, false).unwrap(), rendered, "{model}/{name}: decode");
    }
}

#[test]
fn qwen3_template_and_tokenizer_match_transformers() {
    check("qwen3");
}

#[test]
fn glm_template_and_tokenizer_match_transformers() {
    check("glm");
}

#[test]
fn eos_ids_come_from_tokenizer_config_and_generation_config() {
    // The golden model dir has generation_config.json listing two eos ids.
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/golden/qwen3_moe");
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let info = fp4moe_models::ModelInfo {
        model_type: "qwen3_moe".into(),
        vocab_size: 384,
        hidden_size: 64,
        num_layers: 2,
        max_position_embeddings: 4096,
        eos_token_ids: vec![],
        bos_token_id: None,
        quantization: "bf16".into(),
    };
    let eos = tok.token_to_id("<|im_end|>").unwrap();
    let stops = tok.stop_ids(&info);
    assert!(stops.contains(&eos) && stops.contains(&375), "{stops:?}");
    tok.check_model(&info).unwrap();
}
