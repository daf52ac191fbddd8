//! The server over real HTTP on a loopback port, with the tiny golden Qwen3-MoE checkpoint.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use common::*;
use fp4moe_engine::RenderOptions;
use serde_json::{Value, json};

const CHAT: &str = "/v1/chat/completions";
const TEXT: &str = "/v1/completions";

fn chat_body(content: &str, max_tokens: u64) -> Value {
    json!({"model": "golden", "messages": [{"role": "user", "content": content}],
           "max_tokens": max_tokens, "temperature": 0})
}

fn chat_prompt_ids(content: &str) -> Vec<u32> {
    let (_, tok) = golden();
    let opts = RenderOptions { add_generation_prompt: true, enable_thinking: None, tools: None };
    let text =
        tok.chat_template().unwrap().render(&[json!({"role": "user", "content": content})], &opts).unwrap();
    tok.encode(&text, false).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_streamed_and_whole_match_the_engine_alone() {
    let srv = TestServer::golden(config()).await;
    let prompt = chat_prompt_ids("Hello there");
    let (expected, n) = solo_greedy(&prompt, 12, config().prefill_chunk);

    let whole = post(srv.addr, CHAT, &chat_body("Hello there", 12)).await;
    assert_eq!(whole.status, 200, "{}", whole.text());
    let v = whole.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "golden");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["message"]["content"], expected.as_str());
    assert_eq!(v["usage"]["prompt_tokens"], prompt.len());
    assert_eq!(v["usage"]["completion_tokens"], n);
    assert_eq!(v["usage"]["total_tokens"], prompt.len() + n);
    let finish = v["choices"][0]["finish_reason"].as_str().unwrap();
    assert_eq!(finish, if n == 12 { "length" } else { "stop" });

    let mut body = chat_body("Hello there", 12);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let s = SseReader::open(srv.addr, CHAT, &body).await.unwrap().collect().await;
    assert_eq!(s.text, expected);
    assert_eq!(s.finish_reason.as_deref(), Some(finish));
    assert_eq!(s.usage.as_ref().unwrap(), &v["usage"]);
    assert_eq!(s.chunks[0]["object"], "chat.completion.chunk");
    assert_eq!(s.chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(s.chunks.last().unwrap()["usage"], v["usage"], "usage is the last chunk before [DONE]");

    // Without include_usage there is no usage chunk.
    body["stream_options"] = json!({"include_usage": false});
    let s = SseReader::open(srv.addr, CHAT, &body).await.unwrap().collect().await;
    assert!(s.usage.is_none());
    assert_eq!(s.text, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_streamed_and_whole_with_exact_usage() {
    let srv = TestServer::golden(config()).await;
    let (_, tok) = golden();
    let prompt_text = "The quick brown fox";
    let prompt = tok.encode(prompt_text, true).unwrap();
    let (expected, n) = solo_greedy(&prompt, 10, config().prefill_chunk);

    let body = json!({"prompt": prompt_text, "max_tokens": 10, "temperature": 0.0});
    let v = post(srv.addr, TEXT, &body).await.json();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], expected.as_str());
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": prompt.len(), "completion_tokens": n, "total_tokens": prompt.len() + n})
    );

    // Token ids as the prompt give the same result.
    let by_ids =
        post(srv.addr, TEXT, &json!({"prompt": prompt, "max_tokens": 10, "temperature": 0})).await.json();
    assert_eq!(by_ids["choices"][0]["text"], expected.as_str());

    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    sbody["stream_options"] = json!({"include_usage": true});
    let s = SseReader::open(srv.addr, TEXT, &sbody).await.unwrap().collect().await;
    assert_eq!(s.text, expected);
    assert_eq!(s.usage.unwrap(), v["usage"]);
    assert_eq!(s.chunks[0]["object"], "text_completion");

    let m = get(srv.addr, "/metrics").await.text();
    assert_eq!(metric(&m, "fp4moe_requests_total{outcome=\"ok\"}"), 3.0);
    assert_eq!(metric(&m, "fp4moe_generated_tokens_total"), 3.0 * n as f64);
    assert_eq!(metric(&m, "fp4moe_prompt_tokens_total"), 3.0 * prompt.len() as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_cut_the_text() {
    let srv = TestServer::golden(config()).await;
    let free =
        post(srv.addr, TEXT, &json!({"prompt": "abc", "max_tokens": 16, "temperature": 0})).await.json();
    let full = free["choices"][0]["text"].as_str().unwrap().to_string();
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() >= 6, "the golden model's greedy output is too short for this test: {full:?}");
    let stop: String = chars[3..5].iter().collect();
    let cut = &full[..full.find(&stop).unwrap()];
    let v = post(srv.addr, TEXT, &json!({"prompt": "abc", "max_tokens": 16, "temperature": 0, "stop": stop}))
        .await
        .json();
    assert_eq!(v["choices"][0]["text"], cut);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_health_and_metrics() {
    let srv = TestServer::golden(config()).await;
    let v = get(srv.addr, "/v1/models").await.json();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], "golden");
    assert_eq!(v["data"][0]["object"], "model");
    let h = get(srv.addr, "/health").await;
    assert_eq!((h.status, h.text().as_str()), (200, "ok"));
    assert_error(&get(srv.addr, "/v1/nothing").await, 404);

    let r = post(srv.addr, TEXT, &json!({"prompt": "hi", "max_tokens": 3})).await;
    assert_eq!(r.status, 200);
    let generated = r.json()["usage"]["completion_tokens"].as_f64().unwrap();
    let m = get(srv.addr, "/metrics").await;
    assert!(m.headers["content-type"].to_str().unwrap().starts_with("text/plain"));
    let m = m.text();
    for name in [
        "# TYPE fp4moe_requests_total counter",
        "# TYPE fp4moe_queue_depth gauge",
        "# TYPE fp4moe_running_requests gauge",
        "# TYPE fp4moe_batch_size histogram",
        "# TYPE fp4moe_time_to_first_token_seconds histogram",
        "# TYPE fp4moe_request_duration_seconds histogram",
    ] {
        assert!(m.contains(name), "{name} missing:\n{m}");
    }
    assert_eq!(metric(&m, "fp4moe_requests_total{outcome=\"ok\"}"), 1.0);
    assert_eq!(metric(&m, "fp4moe_generated_tokens_total"), generated);
    assert_eq!(metric(&m, "fp4moe_request_duration_seconds_count"), 1.0);
    assert_eq!(metric(&m, "fp4moe_queue_depth"), 0.0);
    assert!(metric(&m, "fp4moe_batch_size_count") >= generated, "one step per token at least");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_is_required_on_every_endpoint() {
    let mut cfg = config();
    cfg.api_key = Some("sekrit".into());
    let srv = TestServer::golden(cfg).await;
    let body = Some(json!({"prompt": "hi", "max_tokens": 2}).to_string());
    for (method, path) in [("GET", "/v1/models"), ("GET", "/metrics"), ("GET", "/health"), ("POST", TEXT)] {
        for auth in [None, Some("Bearer wrong"), Some("sekrit"), Some("Bearer sekrit2")] {
            let headers: Vec<(&str, &str)> = auth.map(|a| ("authorization", a)).into_iter().collect();
            let r = request(srv.addr, method, path, body.clone(), &headers).await;
            let msg = assert_error(&r, 401);
            assert!(msg.contains("API key"), "{msg}");
        }
        let r = request(srv.addr, method, path, body.clone(), &[("authorization", "Bearer sekrit")]).await;
        assert_eq!(r.status, 200, "{method} {path}: {}", r.text());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_a_4xx_error_object_and_the_server_keeps_serving() {
    let mut cfg = config();
    cfg.context_limit = Some(64);
    cfg.max_body_bytes = 4096;
    let srv = TestServer::golden(cfg).await;
    let long_prompt = "word ".repeat(200);
    let raw_cases: Vec<(&str, String, &str)> = vec![
        (CHAT, "{not json".into(), "invalid request body"),
        (CHAT, "".into(), "invalid request body"),
        (CHAT, "[1, 2]".into(), "invalid request body"),
        (CHAT, json!({"messages": "hi"}).to_string(), "messages"),
        (CHAT, json!({"messages": []}).to_string(), "must not be empty"),
        (
            CHAT,
            json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}).to_string(),
            "max_tokens",
        ),
        (
            CHAT,
            json!({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}).to_string(),
            "temperature",
        ),
        (
            CHAT,
            json!({"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}).to_string(),
            "stream",
        ),
        (
            CHAT,
            json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}).to_string(),
            "max_tokens",
        ),
        (
            CHAT,
            json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}).to_string(),
            "max_tokens",
        ),
        (
            CHAT,
            json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1_000_000_000_000i64})
                .to_string(),
            "context",
        ),
        (
            CHAT,
            r#"{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e300}"#.into(),
            "max_tokens",
        ),
        (CHAT, json!({"messages": [{"role": "user", "content": "hi"}], "n": 2}).to_string(), "n = 1"),
        (
            CHAT,
            json!({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}).to_string(),
            "temperature",
        ),
        (CHAT, json!({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}).to_string(), "top_p"),
        (CHAT, json!({"messages": [{"role": "user", "content": long_prompt}]}).to_string(), "context limit"),
        (TEXT, json!({"prompt": long_prompt, "stream": true}).to_string(), "context limit"),
        (TEXT, json!({"prompt": ""}).to_string(), "empty"),
        (TEXT, json!({"prompt": ["a", "b"]}).to_string(), "one prompt"),
        (TEXT, json!({"prompt": 5}).to_string(), "prompt"),
        // Caught only when the scheduler admits the job: a streamed request still gets its 400.
        (TEXT, json!({"prompt": [1, 2, 100000], "stream": true}).to_string(), "vocabulary"),
        (TEXT, json!({"prompt": [1, 2, 100000]}).to_string(), "vocabulary"),
    ];
    for (path, body, needle) in &raw_cases {
        let r = request(srv.addr, "POST", path, Some(body.clone()), &[]).await;
        let msg = assert_error(&r, 400);
        assert!(msg.to_lowercase().contains(&needle.to_lowercase()), "{body}: {msg:?} lacks {needle:?}");
        // Everyone else is still served.
        assert_eq!(post(srv.addr, TEXT, &json!({"prompt": "ok", "max_tokens": 2})).await.status, 200);
    }

    // Over the body limit: 413, still an OpenAI error object.
    let big = json!({"prompt": "x".repeat(10_000)}).to_string();
    let r = request(srv.addr, "POST", TEXT, Some(big), &[]).await;
    assert_error(&r, 413);
    assert_eq!(post(srv.addr, TEXT, &json!({"prompt": "ok", "max_tokens": 2})).await.status, 200);

    let m = get(srv.addr, "/metrics").await.text();
    assert_eq!(metric(&m, "fp4moe_requests_total{outcome=\"rejected\"}"), raw_cases.len() as f64 + 1.0);
    assert_eq!(metric(&m, "fp4moe_requests_total{outcome=\"ok\"}"), raw_cases.len() as f64 + 1.0);
}

/// Several different prompts decoded together give, token for token, what each gives alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_decode_matches_each_request_alone() {
    let (m, t) = golden();
    // A short sleep per step makes sure the requests overlap in the batch on any machine.
    let slow = Arc::new(Throttled { inner: m, delay: Duration::from_millis(5) });
    let mut cfg = config();
    cfg.prefill_chunk = 4; // several prefill chunks interleave with other sequences' decode steps
    let srv = TestServer::start(slow, t.clone(), cfg).await;
    let prompts =
        ["Once upon a time", "1 2 3 4 5 6 7 8 9", "Hi", "The capital of France is", "abc abc abc", "zzz"];
    let expected: Vec<(String, usize)> =
        prompts.iter().map(|p| solo_greedy(&t.encode(p, true).unwrap(), 20, 4)).collect();
    let handles: Vec<_> = prompts
        .iter()
        .map(|p| {
            let body = json!({"prompt": p, "max_tokens": 20, "temperature": 0, "stream": true,
                              "stream_options": {"include_usage": true}});
            let addr = srv.addr;
            tokio::spawn(async move { SseReader::open(addr, TEXT, &body).await.unwrap().collect().await })
        })
        .collect();
    for (h, (text, n)) in handles.into_iter().zip(&expected) {
        let s = h.await.unwrap();
        assert_eq!(&s.text, text);
        assert_eq!(s.usage.unwrap()["completion_tokens"], *n);
    }
    // Batching really happened: some step ran more than one sequence.
    let m = get(srv.addr, "/metrics").await.text();
    let single = metric(&m, "fp4moe_batch_size_bucket{le=\"1\"}");
    assert!(metric(&m, "fp4moe_batch_size_count") > single, "no step batched two sequences:\n{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_is_429_with_retry_after() {
    let (m, t) = golden();
    let slow = Arc::new(Throttled { inner: m, delay: Duration::from_millis(20) });
    let mut cfg = config();
    cfg.max_batch = 1;
    cfg.max_queue = 1;
    let srv = TestServer::start(slow, t, cfg).await;
    // ignore_eos: a sampled eos must not end the running job before the test is done with it.
    let body = json!({"prompt": "hello", "max_tokens": 200, "stream": true, "ignore_eos": true});
    // The first request runs (its first event arrived), the second waits in the queue...
    let mut running = SseReader::open(srv.addr, TEXT, &body).await.unwrap();
    running.next().await.unwrap();
    let addr = srv.addr;
    let queued =
        tokio::spawn(async move { post(addr, TEXT, &json!({"prompt": "hello", "max_tokens": 2})).await });
    let metrics = srv.metrics.clone();
    assert!(wait_for(10, || metrics.queue_depth.load(Relaxed) == 1).await);
    // ...so the third is refused at once.
    let r = post(srv.addr, TEXT, &json!({"prompt": "hello", "max_tokens": 2})).await;
    assert_error(&r, 429);
    assert_eq!(r.headers["retry-after"], "1");
    // Cutting the running stream lets the queued one through.
    running.conn.abort();
    drop(running);
    let q = queued.await.unwrap();
    assert_eq!(q.status, 200, "{}", q.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_cancels_the_job() {
    let (m, t) = golden();
    let slow = Arc::new(Throttled { inner: m, delay: Duration::from_millis(10) });
    let srv = TestServer::start(slow, t, config()).await;
    let body = json!({"prompt": "hello", "max_tokens": 1000, "stream": true, "ignore_eos": true});
    let mut s = SseReader::open(srv.addr, TEXT, &body).await.unwrap();
    s.next().await.unwrap();
    assert_eq!(srv.metrics.running.load(Relaxed), 1);
    s.conn.abort();
    drop(s);
    let metrics = srv.metrics.clone();
    assert!(
        wait_for(10, || metrics.requests_cancelled.load(Relaxed) == 1 && metrics.running.load(Relaxed) == 0)
            .await,
        "cancelled {} running {}",
        metrics.requests_cancelled.load(Relaxed),
        metrics.running.load(Relaxed)
    );
    // Far fewer than 1000 tokens were spent on it.
    assert!(metrics.generated_tokens.load(Relaxed) < 500);
    assert_eq!(post(srv.addr, TEXT, &json!({"prompt": "hi", "max_tokens": 2})).await.status, 200);
    let m = get(srv.addr, "/metrics").await.text();
    assert_eq!(metric(&m, "fp4moe_requests_total{outcome=\"cancelled\"}"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_running_streams() {
    let (m, t) = golden();
    let slow = Arc::new(Throttled { inner: m, delay: Duration::from_millis(10) });
    let mut srv = TestServer::start(slow, t, config()).await;
    let body = json!({"prompt": "hello", "max_tokens": 40, "temperature": 0, "stream": true,
                      "stream_options": {"include_usage": true}});
    let mut s = SseReader::open(srv.addr, TEXT, &body).await.unwrap();
    let first = s.next().await.unwrap();
    srv.shutdown();
    // The stream runs to its end...
    let mut chunks = vec![serde_json::from_str::<Value>(&first).unwrap()];
    let mut done = false;
    while let Some(d) = s.next().await {
        if d == "[DONE]" {
            done = true;
        } else {
            chunks.push(serde_json::from_str(&d).unwrap());
        }
    }
    assert!(done, "stream cut by shutdown");
    let st = Streamed::from_chunks(chunks);
    assert!(st.finish_reason.is_some());
    assert!(st.usage.unwrap()["completion_tokens"].as_u64().unwrap() >= 1);
    // ...then the server stops and refuses new connections.
    tokio::time::timeout(Duration::from_secs(10), &mut srv.task)
        .await
        .expect("server stopped")
        .unwrap()
        .unwrap();
    assert!(tokio::net::TcpStream::connect(srv.addr).await.is_err());
}
