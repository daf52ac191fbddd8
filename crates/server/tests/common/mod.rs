//! Shared by the integration tests: the tiny golden Qwen3-MoE checkpoint on the CPU backend, a
//! server on a loopback port in-process, and a plain HTTP/1.1 client (hyper) with an SSE reader.
#![allow(dead_code)] // each test binary uses a different part

use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use fp4moe_engine::{Generator, Request, SamplingParams, Tokenizer};
use fp4moe_models::{LanguageModel, LoadOptions, ModelInfo, Sequence};
use fp4moe_server::ServerConfig;
use fp4moe_server::metrics::Metrics;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/golden/qwen3_moe")
}

/// The golden checkpoint quantized to MXFP4 on load (the server's main path), loaded once per
/// test binary.
pub fn golden() -> (Arc<dyn LanguageModel>, Arc<Tokenizer>) {
    static CELL: OnceLock<(Arc<dyn LanguageModel>, Arc<Tokenizer>)> = OnceLock::new();
    CELL.get_or_init(|| {
        let opts = LoadOptions { quant: Some(fp4::Format::Mxfp4), ..LoadOptions::default() };
        let model = fp4moe_models::load(fp4moe_cpu::CpuBackend::new(), &golden_dir(), &opts)
            .expect("load golden qwen3_moe");
        let tok = Tokenizer::from_dir(&golden_dir()).expect("golden tokenizer");
        (Arc::from(model), Arc::new(tok))
    })
    .clone()
}

/// A model that sleeps before every forward, so tests can hold a request "running" for as long
/// as they need (queue full, disconnect, shutdown) without depending on the machine's speed.
pub struct Throttled {
    pub inner: Arc<dyn LanguageModel>,
    pub delay: Duration,
}

impl LanguageModel for Throttled {
    fn info(&self) -> &ModelInfo {
        self.inner.info()
    }
    fn new_sequence(&self, capacity: usize) -> fp4moe_models::Result<Sequence> {
        self.inner.new_sequence(capacity)
    }
    fn forward(
        &self,
        batch: &mut [(&mut Sequence, &[u32])],
        all_logits: bool,
    ) -> fp4moe_models::Result<Vec<Vec<f32>>> {
        std::thread::sleep(self.delay);
        self.inner.forward(batch, all_logits)
    }
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub metrics: Arc<Metrics>,
    shutdown: Option<oneshot::Sender<()>>,
    pub task: JoinHandle<std::io::Result<()>>,
}

impl TestServer {
    pub async fn start(model: Arc<dyn LanguageModel>, tok: Arc<Tokenizer>, config: ServerConfig) -> Self {
        let (router, metrics) = fp4moe_server::app(model, tok, config).expect("app");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(fp4moe_server::serve(listener, router, async {
            let _ = rx.await;
        }));
        TestServer { addr, metrics, shutdown: Some(tx), task }
    }

    /// The golden model with `config`.
    pub async fn golden(config: ServerConfig) -> Self {
        let (m, t) = golden();
        Self::start(m, t, config).await
    }

    pub fn shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

pub fn config() -> ServerConfig {
    ServerConfig::new("golden")
}

/// One request on a fresh connection. The connection task is returned so a test can cut the
/// connection (abort it) to play a client that goes away.
pub async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<String>,
    headers: &[(&str, &str)],
) -> (hyper::Response<Incoming>, JoinHandle<()>) {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.expect("handshake");
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = hyper::Request::builder().method(method).uri(path).header("host", addr.to_string());
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::from(body.unwrap_or_default()))).unwrap();
    let resp = sender.send_request(req).await.expect("send request");
    (resp, conn)
}

pub struct Reply {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Vec<u8>,
}

/// Shown when a test unwraps a refused stream: the status and the error body say why.
impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HTTP {}: {}", self.status, self.text())
    }
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<String>,
    headers: &[(&str, &str)],
) -> Reply {
    let (resp, _conn) = send(addr, method, path, body, headers).await;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.expect("read body").to_bytes().to_vec();
    Reply { status, headers, body }
}

pub async fn post(addr: SocketAddr, path: &str, body: &Value) -> Reply {
    request(addr, "POST", path, Some(body.to_string()), &[]).await
}

pub async fn get(addr: SocketAddr, path: &str) -> Reply {
    request(addr, "GET", path, None, &[]).await
}

/// Reads server-sent events off a streaming response as they arrive.
pub struct SseReader {
    body: Incoming,
    buf: Vec<u8>,
    pub conn: JoinHandle<()>,
}

impl SseReader {
    pub async fn open(addr: SocketAddr, path: &str, body: &Value) -> Result<Self, Reply> {
        let (resp, conn) = send(addr, "POST", path, Some(body.to_string()), &[]).await;
        let status = resp.status().as_u16();
        if status != 200 {
            let headers = resp.headers().clone();
            let body = resp.into_body().collect().await.expect("read body").to_bytes().to_vec();
            return Err(Reply { status, headers, body });
        }
        let ct = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("");
        assert!(ct.starts_with("text/event-stream"), "content-type {ct}");
        Ok(SseReader { body: resp.into_body(), buf: Vec::new(), conn })
    }

    /// The next event's `data` (comment-only keep-alive events skipped); `None` at the end of the
    /// body. A body that ends mid-event is a test failure (a cut stream).
    pub async fn next(&mut self) -> Option<String> {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let event: Vec<u8> = self.buf.drain(..end + 2).collect();
                let text = String::from_utf8(event).expect("SSE is UTF-8");
                let data: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
                if data.is_empty() {
                    continue;
                }
                return Some(data.join("\n"));
            }
            match self.body.frame().await {
                None => {
                    assert!(
                        self.buf.is_empty(),
                        "stream cut mid-event: {:?}",
                        String::from_utf8_lossy(&self.buf)
                    );
                    return None;
                }
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
                Some(Err(e)) => panic!("stream error: {e}"),
            }
        }
    }

    /// Reads to the end and checks the framing: JSON chunks, then `[DONE]`, then nothing.
    pub async fn collect(mut self) -> Streamed {
        let mut chunks = Vec::new();
        let mut done = false;
        while let Some(data) = self.next().await {
            assert!(!done, "data after [DONE]: {data}");
            if data == "[DONE]" {
                done = true;
            } else {
                chunks.push(serde_json::from_str::<Value>(&data).expect("chunk is JSON"));
            }
        }
        assert!(done, "stream ended without [DONE]");
        Streamed::from_chunks(chunks)
    }
}

/// A whole stream, checked and summed up.
#[derive(Debug)]
pub struct Streamed {
    pub chunks: Vec<Value>,
    pub text: String,
    pub finish_reason: Option<String>,
    pub usage: Option<Value>,
    pub id: String,
}

impl Streamed {
    pub fn from_chunks(chunks: Vec<Value>) -> Self {
        let id = chunks[0]["id"].as_str().expect("id").to_string();
        let mut text = String::new();
        let mut finish_reason = None;
        let mut usage = None;
        for c in &chunks {
            assert_eq!(c["id"], id.as_str(), "every chunk of a stream carries its id: {c}");
            assert!(c.get("error").is_none(), "error in stream: {c}");
            if let Some(u) = c.get("usage") {
                assert!(usage.is_none(), "one usage chunk");
                assert_eq!(c["choices"].as_array().unwrap().len(), 0, "the usage chunk has no choices");
                usage = Some(u.clone());
                continue;
            }
            assert!(finish_reason.is_none(), "a chunk after the finish chunk: {c}");
            let choice = &c["choices"][0];
            let piece = choice["delta"]["content"].as_str().or(choice["text"].as_str()).unwrap_or("");
            text.push_str(piece);
            if let Some(f) = choice["finish_reason"].as_str() {
                finish_reason = Some(f.to_string());
            }
        }
        Streamed { chunks, text, finish_reason, usage, id }
    }
}

/// Asserts an OpenAI error object with `status`, and returns its message.
pub fn assert_error(reply: &Reply, status: u16) -> String {
    assert_eq!(reply.status, status, "body: {}", reply.text());
    let v = reply.json();
    let e = &v["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "error object: {v}");
    assert!(e["type"].as_str().is_some(), "error object: {v}");
    assert!(e.get("param").is_some() && e.get("code").is_some(), "error object: {v}");
    e["message"].as_str().unwrap().to_string()
}

/// What the engine generates for `prompt` alone, greedy: the ground truth for the server.
pub fn solo_greedy(prompt: &[u32], max_tokens: usize, prefill_chunk: usize) -> (String, usize) {
    let (m, t) = golden();
    let g = Generator::new(m.as_ref(), t)
        .unwrap()
        .with_prefill_chunk(prefill_chunk)
        .generate(prompt, &Request::new(SamplingParams::greedy(), max_tokens), |_| ControlFlow::Continue(()))
        .unwrap();
    (g.text, g.tokens.len())
}

/// A metric's value from the Prometheus text (`name` includes any labels).
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("metric {name} missing from:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

/// Polls `cond` every 10 ms for up to `secs`.
pub async fn wait_for(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while tokio::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cond()
}
