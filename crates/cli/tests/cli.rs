//! End-to-end tests of the `fp4moe` binary: the README's first command, a real (tiny) checkpoint
//! with its tokenizer and chat template, seeded reproducibility, and every kind of bad input
//! getting a clear message and a non-zero exit. Model dirs come from testdata/ (written by
//! tools/gen_golden.py); nothing is downloaded.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn fp4moe(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fp4moe"))
        .args(args)
        .env("FP4MOE_LOG", "warn")
        .output()
        .expect("the fp4moe binary runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts a clean failure: non-zero exit, an `error:` line containing every `needles`, no panic.
fn assert_fails_with(o: &Output, needles: &[&str]) {
    let err = stderr(o);
    assert!(!o.status.success(), "expected failure, got success; stderr:\n{err}");
    assert!(err.contains("error"), "no error message:\n{err}");
    assert!(!err.contains("panicked"), "panicked:\n{err}");
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}:\n{err}");
    }
}

fn assert_ok(o: &Output) {
    assert!(o.status.success(), "exit {:?}\nstdout:\n{}\nstderr:\n{}", o.status, stdout(o), stderr(o));
}

fn golden(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/golden").join(name)
}

fn golden_str(name: &str) -> String {
    golden(name).to_str().unwrap().to_owned()
}

/// A fresh scratch directory for one test (removed on drop).
struct Scratch(PathBuf);

impl Scratch {
    fn new(test: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("fp4moe-cli-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
    fn path(&self, sub: &str) -> PathBuf {
        self.0.join(sub)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Copies a model directory's files (not recursively), except those `skip` names.
fn copy_dir(from: &Path, to: &Path, skip: &dyn Fn(&str) -> bool) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.path().is_file() && !skip(&name) {
            std::fs::copy(entry.path(), to.join(&name)).unwrap();
        }
    }
}

/// Synthetic-model flags small enough for CI: one layer.
const SMALL_SYNTHETIC: &[&str] = &["--layers", "1", "--backend", "cpu"];

#[test]
fn readme_first_command_streams_text_from_a_synthetic_model() {
    let mut args = vec!["run", "--prompt", "Hello", "--max-tokens", "8"];
    args.extend_from_slice(SMALL_SYNTHETIC);
    let o = fp4moe(&args);
    assert_ok(&o);
    let err = stderr(&o);
    assert!(err.contains("synthetic") && err.contains("random"), "must say it is synthetic:\n{err}");
    assert!(err.contains("1 of 48 layers"), "{err}");
    assert!(err.contains("tok/s"), "stats on stderr:\n{err}");
    assert!(stdout(&o).ends_with('\n'));
}

#[test]
fn seeded_sampling_is_reproducible_and_json_reports_it() {
    let dir = golden_str("glm4_moe_lite");
    let run = |seed: &str| {
        let o = fp4moe(&[
            "run",
            "--model",
            &dir,
            "--prompt",
            "Hi",
            "-n",
            "8",
            "--seed",
            seed,
            "--temperature",
            "1.5",
            "--json",
            "--backend",
            "cpu",
        ]);
        assert_ok(&o);
        let v: Value = serde_json::from_str(&stdout(&o)).expect("--json prints one JSON object");
        assert_eq!(v["seed"], seed.parse::<u64>().unwrap());
        assert_eq!(v["synthetic"], false);
        let n = v["generated_tokens"].as_u64().unwrap();
        assert!((1..=8).contains(&n));
        assert_eq!(v["tokens"].as_array().unwrap().len() as u64, n);
        v["tokens"].clone()
    };
    let a = run("7");
    assert_eq!(a, run("7"), "same seed, same tokens");
    assert_ne!(a, run("8"), "another seed, other tokens");
}

#[test]
fn golden_checkpoints_greedy_first_token_matches_transformers() {
    // expected.json: transformers' argmax after the chat-rendered prompt "Hello world", for bf16
    // and ModelOpt NVFP4 checkpoints of both architectures, through tokenizer, template and model.
    for name in ["qwen3_moe", "glm4_moe_lite", "qwen3_moe_nvfp4", "glm4_moe_lite_nvfp4"] {
        let expected: Value =
            serde_json::from_str(&std::fs::read_to_string(golden(name).join("expected.json")).unwrap())
                .unwrap();
        let seq = &expected["sequences"][0];
        let want = seq["argmax"].as_array().unwrap().last().unwrap().as_u64().unwrap();
        let dir = golden_str(name);
        let o = fp4moe(&[
            "run",
            "--model",
            &dir,
            "--prompt",
            "Hello world",
            "--greedy",
            "-n",
            "1",
            "--json",
            "--backend",
            "cpu",
        ]);
        assert_ok(&o);
        let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
        let prompt_len = seq["ids"].as_array().unwrap().len();
        assert_eq!(v["prompt_tokens"].as_u64().unwrap() as usize, prompt_len, "{name}: prompt length");
        assert_eq!(v["tokens"][0].as_u64().unwrap(), want, "{name}: first greedy token");
    }
    // Streaming mode prints text and statistics.
    let o = fp4moe(&[
        "run",
        "--model",
        &golden_str("qwen3_moe"),
        "--prompt",
        "Hello world",
        "-n",
        "4",
        "--seed",
        "1",
    ]);
    assert_ok(&o);
    assert!(stderr(&o).contains("generated"), "{}", stderr(&o));
}

#[test]
fn bf16_prefill_activations_run_and_unknown_ones_are_refused() {
    let dir = golden_str("glm4_moe_lite");
    let run = |acts: &str| {
        fp4moe(&[
            "run",
            "--model",
            &dir,
            "--prompt",
            "Hello world",
            "--greedy",
            "-n",
            "2",
            "--json",
            "--backend",
            "cpu",
            "--prefill-activations",
            acts,
        ])
    };
    for acts in ["f32", "bf16"] {
        let o = run(acts);
        assert_ok(&o);
        let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
        assert_eq!(v["tokens"].as_array().map(Vec::len), Some(2), "{acts}: {}", stdout(&o));
    }
    assert_fails_with(&run("fp8"), &["fp8", "--prefill-activations"]);
}

#[test]
fn chat_keeps_history_resets_and_quits() {
    use std::io::Write;
    let dir = golden_str("qwen3_moe");
    let mut child = Command::new(env!("CARGO_BIN_EXE_fp4moe"))
        .args(["chat", "--model", &dir, "-n", "3", "--seed", "1", "--stats", "--backend", "cpu"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"Hello\nHow are you?\n/reset\nHi\n/quit\nnever read\n").unwrap();
    let o = child.wait_with_output().unwrap();
    assert_ok(&o);
    let err = stderr(&o);
    assert!(err.contains("conversation cleared"), "{err}");
    // Three replies, each with a stats line; the second prompt includes the first exchange.
    let prompts: Vec<u64> =
        err.lines().filter_map(|l| l.split("[prompt ").nth(1)?.split(' ').next()?.parse().ok()).collect();
    assert_eq!(prompts.len(), 3, "{err}");
    assert!(prompts[1] > prompts[0] + 3, "history is kept: {prompts:?}");
    assert!(prompts[2] < prompts[1], "reset forgets: {prompts:?}");
}

#[test]
fn empty_prompt_is_refused() {
    assert_fails_with(&fp4moe(&["run", "--prompt", ""]), &["prompt is empty"]);
}

#[test]
fn invalid_sampling_values_are_refused_before_loading() {
    let cases: [(&[&str], &str); 5] = [
        (&["--temperature", "-1"], "temperature"),
        (&["--top-p", "0"], "top_p"),
        (&["--top-p", "1.5"], "top_p"),
        (&["--min-p", "2"], "min_p"),
        (&["--repetition-penalty", "0"], "repetition_penalty"),
    ];
    for (flags, name) in cases {
        let mut args = vec!["run", "--prompt", "hi"];
        args.extend_from_slice(flags);
        let o = fp4moe(&args);
        assert_fails_with(&o, &[name]);
        assert!(!stderr(&o).contains("model:"), "must fail before loading a model");
    }
    assert_fails_with(&fp4moe(&["run", "--prompt", "hi", "--max-tokens", "0"]), &["max-tokens"]);
}

#[test]
fn missing_and_incomplete_model_dirs_are_refused() {
    assert_fails_with(
        &fp4moe(&["run", "--model", "/nonexistent/model", "--prompt", "hi"]),
        &["does not exist"],
    );
    let s = Scratch::new("incomplete");
    // No tokenizer.json.
    let no_tok = s.path("no_tok");
    copy_dir(&golden("qwen3_moe"), &no_tok, &|n| n == "tokenizer.json");
    assert_fails_with(
        &fp4moe(&["run", "--model", no_tok.to_str().unwrap(), "--prompt", "hi"]),
        &["tokenizer.json"],
    );
    // No weights.
    let no_weights = s.path("no_weights");
    copy_dir(&golden("qwen3_moe"), &no_weights, &|n| n.ends_with(".safetensors"));
    assert_fails_with(
        &fp4moe(&["run", "--model", no_weights.to_str().unwrap(), "--prompt", "hi"]),
        &["safetensors"],
    );
    // A shard missing from an index.
    let missing_shard = s.path("missing_shard");
    copy_dir(&golden("qwen3_moe"), &missing_shard, &|n| n == "model-00003-of-00005.safetensors");
    assert_fails_with(
        &fp4moe(&["run", "--model", missing_shard.to_str().unwrap(), "--prompt", "hi"]),
        &["model-00003-of-00005.safetensors"],
    );
    // A file given instead of a directory.
    let file = golden("qwen3_moe").join("config.json");
    assert_fails_with(
        &fp4moe(&["run", "--model", file.to_str().unwrap(), "--prompt", "hi"]),
        &["not a directory"],
    );
}

#[test]
fn tokenizer_that_does_not_match_the_model_is_refused() {
    let s = Scratch::new("mismatch");
    let dir = s.path("model");
    copy_dir(&golden("qwen3_moe"), &dir, &|_| false);
    // Give the tokenizer an added token far beyond the model's 384-row vocabulary.
    let path = dir.join("tokenizer.json");
    let mut tok: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    tok["added_tokens"].as_array_mut().unwrap().push(serde_json::json!({
        "id": 1000, "content": "<|extra|>", "single_word": false, "lstrip": false, "rstrip": false,
        "normalized": false, "special": true
    }));
    std::fs::write(&path, tok.to_string()).unwrap();
    let o = fp4moe(&["run", "--model", dir.to_str().unwrap(), "--prompt", "hi"]);
    // tokenizers renumbers an out-of-sequence added token to the next free id: 385 ids.
    assert_fails_with(&o, &["tokenizer does not match the model", "385", "384"]);
}

#[test]
fn prompt_over_the_context_limit_is_refused() {
    let dir = golden_str("qwen3_moe");
    let long = "word ".repeat(50);
    let o = fp4moe(&["run", "--model", &dir, "--prompt", &long, "--ctx", "32", "--raw"]);
    assert_fails_with(&o, &["context limit is 32"]);
    // The prompt fits but prompt + max_tokens does not.
    let o = fp4moe(&["run", "--model", &dir, "--prompt", "Hello", "--ctx", "32", "-n", "100"]);
    assert_fails_with(&o, &["exceeds the context limit of 32", "lower max_tokens"]);
}

#[test]
fn inspect_describes_a_checkpoint() {
    let dir = golden_str("qwen3_moe");
    let o = fp4moe(&["inspect", &dir, "--json"]);
    assert_ok(&o);
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["model_type"], "qwen3_moe");
    assert_eq!(v["layers"], 2);
    assert_eq!(v["tokenizer"], true);
    let total = v["total_bytes"].as_u64().unwrap();
    let by_dtype: u64 = v["bytes_by_dtype"].as_object().unwrap().values().map(|b| b.as_u64().unwrap()).sum();
    let by_cat: u64 = v["bytes_by_category"].as_object().unwrap().values().map(|b| b.as_u64().unwrap()).sum();
    assert_eq!(by_dtype, total);
    assert_eq!(by_cat, total);
    assert!(v["bytes_by_category"]["routed experts"].as_u64().unwrap() > 0);
    assert!(v["tensors"].as_u64().unwrap() > 10);
    let o = fp4moe(&["inspect", &dir]);
    assert_ok(&o);
    assert!(stdout(&o).contains("qwen3_moe") && stdout(&o).contains("bytes by kind of weight"));
    assert_fails_with(&fp4moe(&["inspect", "/nonexistent/model"]), &["/nonexistent/model"]);
}

#[test]
fn quantize_writes_a_loadable_checkpoint_and_never_clobbers_or_leaves_partials() {
    let s = Scratch::new("quantize");
    let src = golden_str("qwen3_moe");
    let out = s.path("q-mxfp4");
    let out_str = out.to_str().unwrap();
    let o = fp4moe(&["quantize", "--model", &src, "--out", out_str, "--format", "mxfp4"]);
    assert_ok(&o);
    assert!(out.join("config.json").is_file() && out.join("tokenizer.json").is_file());
    let v: Value = serde_json::from_str(&stdout(&fp4moe(&["inspect", out_str, "--json"]))).unwrap();
    assert!(v["quantization"].as_str().unwrap().contains("mxfp4"), "{v}");
    assert_ok(&fp4moe(&["run", "--model", out_str, "--prompt", "Hello", "-n", "2", "--backend", "cpu"]));

    // An existing output directory is refused and left as it was.
    let before: Vec<_> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name()).collect();
    let o = fp4moe(&["quantize", "--model", &src, "--out", out_str, "--format", "nvfp4"]);
    assert_fails_with(&o, &["already exists", "--force"]);
    let after: Vec<_> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(before.len(), after.len());
    // --force replaces it.
    assert_ok(&fp4moe(&["quantize", "--model", &src, "--out", out_str, "--format", "nvfp4", "--force"]));
    let v: Value = serde_json::from_str(&stdout(&fp4moe(&["inspect", out_str, "--json"]))).unwrap();
    assert!(v["quantization"].as_str().unwrap().contains("nvfp4"), "{v}");

    // A source that fails midway leaves neither the output nor a partial directory behind.
    let broken = s.path("broken");
    copy_dir(&golden("qwen3_moe"), &broken, &|n| n == "model-00005-of-00005.safetensors");
    let o = fp4moe(&[
        "quantize",
        "--model",
        broken.to_str().unwrap(),
        "--out",
        s.path("q2").to_str().unwrap(),
        "--format",
        "mxfp4",
    ]);
    assert!(!o.status.success());
    let leftovers: Vec<String> = std::fs::read_dir(&s.0)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("q2"))
        .collect();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
    assert_fails_with(
        &fp4moe(&[
            "quantize",
            "--model",
            "/nonexistent",
            "--out",
            s.path("q3").to_str().unwrap(),
            "--format",
            "mxfp4",
        ]),
        &["/nonexistent"],
    );
}
