//! Serving throughput on a synthetic model (ignored by default: it is a measurement, not a check).
//!
//! ```text
//! FP4MOE_BENCH_LAYERS=2 FP4MOE_BENCH_TOKENS=32 cargo test -p fp4moe-server --test bench -- --ignored --nocapture
//! ```
//! Prints a markdown table of aggregate decode tok/s (all clients' completion tokens / wall time)
//! at 1, 8 and 32 concurrent streaming clients. `FP4MOE_BENCH_ARCH` picks `qwen3-30b-a3b`
//! (default) or `glm-4.7-flash`; `FP4MOE_BENCH_LAYERS` the decoder layers (default 2).

mod common;

use std::sync::Arc;
use std::time::Instant;

use common::*;
use fp4moe_engine::Tokenizer;
use fp4moe_models::{Arch, LanguageModel};
use serde_json::json;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --ignored --nocapture"]
async fn serve_throughput_synthetic() {
    let arch_name: String = env_or("FP4MOE_BENCH_ARCH", Arch::Qwen3_30bA3b.name().to_string());
    let arch = Arch::ALL.into_iter().find(|a| a.name() == arch_name).expect("FP4MOE_BENCH_ARCH");
    let layers: usize = env_or("FP4MOE_BENCH_LAYERS", 2);
    let max_tokens: usize = env_or("FP4MOE_BENCH_TOKENS", 32);
    let levels: Vec<usize> = vec![1, 8, 32];

    let built = Instant::now();
    let model: Arc<dyn LanguageModel> = Arc::from(
        fp4moe_models::synthetic(fp4moe_cpu::CpuBackend::new(), arch, Some(layers), fp4::Format::Mxfp4, 0)
            .expect("synthetic model"),
    );
    eprintln!("built synthetic {} ({layers} layers) in {:.1} s", arch.name(), built.elapsed().as_secs_f64());
    let mut cfg = config();
    cfg.max_batch = *levels.iter().max().unwrap();
    cfg.max_queue = cfg.max_batch;
    let srv = TestServer::start(model, Arc::new(Tokenizer::byte_level()), cfg).await;

    // Warm-up (first touch of weights and scratch buffers).
    post(srv.addr, "/v1/completions", &json!({"prompt": "warm up", "max_tokens": 2})).await;

    let mut rows = Vec::new();
    for &clients in &levels {
        let start = Instant::now();
        let tasks: Vec<_> = (0..clients)
            .map(|c| {
                let addr = srv.addr;
                // Seeded sampling, not greedy: random weights make greedy loops likely, and the
                // byte-level tokenizer's eos would then end requests early.
                let body = json!({"prompt": format!("client {c}: the quick brown fox"), "max_tokens": max_tokens,
                                  "seed": c, "stream": true, "stream_options": {"include_usage": true}});
                tokio::spawn(async move {
                    let s = SseReader::open(addr, "/v1/completions", &body).await.unwrap().collect().await;
                    s.usage.unwrap()["completion_tokens"].as_u64().unwrap()
                })
            })
            .collect();
        let mut tokens = 0;
        for t in tasks {
            tokens += t.await.unwrap();
        }
        let wall = start.elapsed().as_secs_f64();
        rows.push((clients, tokens, wall));
    }
    println!(
        "\nsynthetic {} ({layers} of its layers, random MXFP4 weights), CPU backend, max_tokens {max_tokens}, \
         one request per client, streaming, loopback\n",
        arch.name()
    );
    println!("| concurrent clients | completion tokens | wall s | aggregate tok/s | per-client tok/s |");
    println!("|---:|---:|---:|---:|---:|");
    for (clients, tokens, wall) in rows {
        let agg = tokens as f64 / wall;
        println!("| {clients} | {tokens} | {wall:.1} | {agg:.1} | {:.2} |", agg / clients as f64);
    }
}
