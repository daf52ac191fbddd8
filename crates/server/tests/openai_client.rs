//! The official `openai` Python client against the server (tools/openai_client_check.py). CI
//! installs the client; where it is missing the test says so and passes.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;

fn python_has_openai() -> bool {
    Command::new("python3").args(["-c", "import openai"]).output().is_ok_and(|o| o.status.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_openai_client_streaming_and_not() {
    if !python_has_openai() {
        eprintln!(
            "SKIPPED official_openai_client_streaming_and_not: python3 cannot `import openai` (pip install openai)"
        );
        return;
    }
    let mut cfg = config();
    cfg.api_key = Some("test-key".into());
    let srv = TestServer::golden(cfg).await;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tools/openai_client_check.py");
    let url = srv.url("/v1");
    // The client blocks; run it off the runtime that serves it.
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(script)
            .args(["--base-url", &url, "--api-key", "test-key"])
            .output()
            .expect("run python3")
    })
    .await
    .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("{stdout}{stderr}");
    assert!(out.status.success(), "openai_client_check failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("openai_client_check: ok"));
}
