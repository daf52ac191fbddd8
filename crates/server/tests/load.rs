//! A bounded load test over loopback: 64 concurrent streaming clients, a few hundred requests, a
//! fixed time budget. Alone in its own test binary so the memory check sees only this server.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

/// Concurrent clients, each sending its requests one after another.
const CLIENTS: usize = 64;
const REQUESTS_PER_CLIENT: usize = 4;
/// Short completions keep the whole run inside the budget on a 2-core CI box.
const MAX_TOKENS: usize = 12;
/// The whole test, warm-up included, must finish within this.
const BUDGET: Duration = Duration::from_secs(60);
/// Resident memory may end at most this far above where it started. The warm-up round brings
/// the allocator's per-thread arenas and the runtime's buffers to their working size first, so
/// what remains is growth that outlives the requests (about 1 MiB measured: allocator noise).
/// Leaking what each request holds — a KV cache of ~1 KiB per token (2 layers · 2·2·32 f32) for
/// ~30 tokens, its sampler's vocab-sized buffers, and the connection's ~16 KiB of I/O buffers —
/// would add several MiB over the ~250 requests of the measured round and exceed this.
const RSS_TOLERANCE_KIB: u64 = 4 * 1024;

fn vm_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

struct Outcome {
    ok: usize,
    refused: usize,
    prompt_tokens: u64,
    completion_tokens: u64,
}

/// Runs `CLIENTS` clients × `REQUESTS_PER_CLIENT` streaming requests; checks each stream against
/// the prompt's expected greedy text.
async fn round(srv: &TestServer, prompts: &[String], expected: &HashMap<String, String>) -> Outcome {
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let addr = srv.addr;
        let prompts = prompts.to_vec();
        let expected = expected.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Outcome { ok: 0, refused: 0, prompt_tokens: 0, completion_tokens: 0 };
            for r in 0..REQUESTS_PER_CLIENT {
                let prompt = &prompts[(c * REQUESTS_PER_CLIENT + r) % prompts.len()];
                let body = json!({"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": true,
                                  "stream_options": {"include_usage": true}});
                match SseReader::open(addr, "/v1/completions", &body).await {
                    Ok(reader) => {
                        // collect() checks the framing: one id, JSON chunks, a finish, [DONE] last.
                        let s = reader.collect().await;
                        assert_eq!(&s.text, &expected[prompt], "stream for {prompt:?} differs from its solo run");
                        assert!(s.finish_reason.is_some());
                        let u = s.usage.expect("usage chunk");
                        out.prompt_tokens += u["prompt_tokens"].as_u64().unwrap();
                        out.completion_tokens += u["completion_tokens"].as_u64().unwrap();
                        out.ok += 1;
                    }
                    Err(reply) => {
                        assert_error(&reply, 429);
                        assert!(reply.headers.contains_key("retry-after"));
                        out.refused += 1;
                    }
                }
            }
            out
        }));
    }
    let mut total = Outcome { ok: 0, refused: 0, prompt_tokens: 0, completion_tokens: 0 };
    for t in tasks {
        let o = t.await.expect("client task");
        total.ok += o.ok;
        total.refused += o.refused;
        total.prompt_tokens += o.prompt_tokens;
        total.completion_tokens += o.completion_tokens;
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_64_streaming_clients_nothing_lost() {
    let start = Instant::now();
    let mut cfg = config();
    cfg.max_batch = 16;
    // Smaller than the number of clients minus the batch: some requests must be refused, which
    // exercises the 429 path under load too.
    cfg.max_queue = 24;
    let srv = TestServer::golden(cfg.clone()).await;
    let (_, tok) = golden();
    let prompts: Vec<String> =
        (0..16).map(|i| format!("Request {i}: count {} {}", i * 7, "ab".repeat(i % 5))).collect();
    // The expected text of every prompt: the engine alone, greedy.
    let expected: HashMap<String, String> = prompts
        .iter()
        .map(|p| (p.clone(), solo_greedy(&tok.encode(p, true).unwrap(), MAX_TOKENS, cfg.prefill_chunk).0))
        .collect();

    let warm = round(&srv, &prompts, &expected).await;
    let baseline_kib = vm_rss_kib();
    let main = round(&srv, &prompts, &expected).await;
    let total = CLIENTS * REQUESTS_PER_CLIENT;
    for o in [&warm, &main] {
        assert_eq!(o.ok + o.refused, total, "every request completes or is refused");
        assert!(o.ok >= total / 4, "too few served: {} of {total}", o.ok);
    }

    // Token counts add up: the metrics saw exactly what the usage chunks reported.
    let m = srv.metrics.clone();
    assert!(wait_for(10, || m.running.load(std::sync::atomic::Ordering::Relaxed) == 0).await);
    let text = get(srv.addr, "/metrics").await.text();
    assert_eq!(metric(&text, "fp4moe_requests_total{outcome=\"ok\"}") as usize, warm.ok + main.ok);
    assert_eq!(
        metric(&text, "fp4moe_requests_total{outcome=\"rejected\"}") as usize,
        warm.refused + main.refused
    );
    assert_eq!(metric(&text, "fp4moe_requests_total{outcome=\"cancelled\"}"), 0.0);
    assert_eq!(
        metric(&text, "fp4moe_generated_tokens_total") as u64,
        warm.completion_tokens + main.completion_tokens
    );
    assert_eq!(metric(&text, "fp4moe_prompt_tokens_total") as u64, warm.prompt_tokens + main.prompt_tokens);
    assert_eq!(metric(&text, "fp4moe_queue_depth"), 0.0);

    // Memory returns near its baseline once the requests are gone.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after_kib = vm_rss_kib();
    eprintln!(
        "load: {} ok, {} refused per round; RSS {baseline_kib} KiB -> {after_kib} KiB; {:.1} s",
        main.ok,
        main.refused,
        start.elapsed().as_secs_f64()
    );
    assert!(
        after_kib <= baseline_kib + RSS_TOLERANCE_KIB,
        "RSS grew from {baseline_kib} KiB to {after_kib} KiB (tolerance {RSS_TOLERANCE_KIB} KiB)"
    );
    assert!(start.elapsed() < BUDGET, "load test took {:?}, budget {BUDGET:?}", start.elapsed());
}
