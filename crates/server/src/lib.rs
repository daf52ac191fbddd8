//! The OpenAI-compatible HTTP server: `POST /v1/chat/completions`, `POST /v1/completions`
//! (streaming as server-sent events, or whole), `GET /v1/models`, `GET /health`, `GET /metrics`.
//!
//! Request handlers validate and tokenize, then hand a [`scheduler::Job`] to the one scheduler
//! thread that owns the model ([`scheduler`] explains the batching). Handlers never touch the
//! model, so a bad request costs nothing but its own parse. Every error is an OpenAI error
//! object with a 4xx/5xx status ([`error`]).

pub mod api;
pub mod error;
pub mod metrics;
pub mod scheduler;

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request as HttpRequest, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use fp4moe_engine::template::RenderOptions;
use fp4moe_engine::{Request, SamplingParams, Tokenizer};
use fp4moe_models::LanguageModel;
use futures_util::stream::{self, Stream};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use api::{ChatRequest, CommonParams, CompletionRequest, Content, FinishReason, Prompt};
pub use error::{ApiError, ServerError};
use metrics::Metrics;
use scheduler::{Event, Job, SchedulerConfig};

/// Everything `fp4moe serve` can set about serving (the address is the listener's business).
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Name reported by `/v1/models` and in responses.
    pub model_name: String,
    /// When set, every request must send `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// Most sequences decoded together.
    pub max_batch: usize,
    /// Requests that may wait for a batch slot before new ones get 429.
    pub max_queue: usize,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// Prompt tokens per prefill step (see [`scheduler`]).
    pub prefill_chunk: usize,
    /// Context limit per request (prompt + max_tokens); `None` = the model's. Also bounds the KV
    /// cache a request can allocate.
    pub context_limit: Option<usize>,
    /// `max_tokens` when a request gives none (capped by the context left).
    pub default_max_tokens: usize,
}

impl ServerConfig {
    pub fn new(model_name: impl Into<String>) -> Self {
        ServerConfig {
            model_name: model_name.into(),
            api_key: None,
            max_batch: 32,
            max_queue: 256,
            max_body_bytes: 1 << 20,
            prefill_chunk: fp4moe_engine::DEFAULT_PREFILL_CHUNK,
            context_limit: None,
            default_max_tokens: 512,
        }
    }
}

struct AppState {
    config: ServerConfig,
    /// The context limit actually applied (the config's, capped by the model's).
    context_limit: usize,
    tokenizer: Arc<Tokenizer>,
    jobs: mpsc::Sender<Job>,
    metrics: Arc<Metrics>,
    started: u64,
}

/// Builds the router and starts the scheduler thread. The thread ends when the router (the
/// last holder of the job sender) is dropped and its running jobs finish.
pub fn app(
    model: Arc<dyn LanguageModel>,
    tokenizer: Arc<Tokenizer>,
    config: ServerConfig,
) -> Result<(Router, Arc<Metrics>), ServerError> {
    tokenizer.check_model(model.info())?;
    let metrics = Arc::new(Metrics::default());
    let (tx, rx) = mpsc::channel(config.max_queue.max(1));
    let context_limit = fp4moe_engine::context_limit(model.as_ref(), config.context_limit);
    let sched = SchedulerConfig {
        max_batch: config.max_batch.max(1),
        prefill_chunk: config.prefill_chunk.max(1),
        context_limit,
    };
    {
        let (model, tokenizer, metrics) = (model.clone(), tokenizer.clone(), metrics.clone());
        std::thread::Builder::new()
            .name("fp4moe-scheduler".into())
            .spawn(move || scheduler::run(model, tokenizer, sched, rx, metrics))
            .map_err(ServerError::Spawn)?;
    }
    let started = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let state = Arc::new(AppState {
        config: config.clone(),
        context_limit,
        tokenizer,
        jobs: tx,
        metrics: metrics.clone(),
        started,
    });
    let router = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(|| async { "ok" }))
        .route("/metrics", get(metrics_text))
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .layer(DefaultBodyLimit::max(config.max_body_bytes))
        .with_state(state);
    Ok((router, metrics))
}

/// Serves until `shutdown` resolves, then stops accepting and lets running streams finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router).with_graceful_shutdown(shutdown).await
}

async fn auth(State(state): State<Arc<AppState>>, req: HttpRequest, next: Next) -> Response {
    if let Some(key) = &state.config.api_key {
        let ok = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|given| constant_time_eq(given.as_bytes(), key.as_bytes()));
        if !ok {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(req).await
}

/// Compares without an early exit, so response time does not reveal how much of a key matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn models(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    axum::Json(json!({
        "object": "list",
        "data": [{"id": state.config.model_name, "object": "model", "created": state.started, "owned_by": "fp4moe"}]
    }))
}

async fn metrics_text(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render())
}

/// Which endpoint a response is for (their JSON differs).
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Text,
}

async fn chat_completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let result = async {
        let req: ChatRequest = api::parse(&body.map_err(ApiError::from_body)?)?;
        if req.messages.is_empty() {
            return Err(ApiError::bad_request("`messages` must not be empty", Some("messages")));
        }
        let template = state.tokenizer.chat_template().ok_or_else(|| {
            ApiError::bad_request("this model has no chat template; use /v1/completions", Some("messages"))
        })?;
        let messages: Vec<Value> = req
            .messages
            .iter()
            .map(|m| json!({"role": m.role, "content": content_text(m.content.as_ref())}))
            .collect();
        let enable_thinking =
            req.chat_template_kwargs.as_ref().and_then(|k| k.get("enable_thinking")).and_then(Value::as_bool);
        let opts = RenderOptions { add_generation_prompt: true, enable_thinking, tools: None };
        let text = template.render(&messages, &opts).map_err(|e| ApiError::from_engine(&e))?;
        // The template already wrote the special tokens.
        let prompt = state.tokenizer.encode(&text, false).map_err(|e| ApiError::from_engine(&e))?;
        start(&state, Kind::Chat, prompt, req.common).await
    }
    .await;
    result.unwrap_or_else(|e| reject(&state, e))
}

async fn completions(State(state): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    let result = async {
        let req: CompletionRequest = api::parse(&body.map_err(ApiError::from_body)?)?;
        let prompt = match req.prompt {
            // Ids are checked against the model's vocabulary when the job is admitted.
            Prompt::Ids(ids) => ids,
            Prompt::Text(t) => encode_prompt(&state, &t)?,
            Prompt::Texts(v) if v.len() == 1 => encode_prompt(&state, &v[0])?,
            Prompt::Texts(_) => {
                return Err(ApiError::bad_request(
                    "only one prompt per request is supported",
                    Some("prompt"),
                ));
            }
        };
        start(&state, Kind::Text, prompt, req.common).await
    }
    .await;
    result.unwrap_or_else(|e| reject(&state, e))
}

fn encode_prompt(state: &AppState, text: &str) -> Result<Vec<u32>, ApiError> {
    state.tokenizer.encode(text, true).map_err(|e| ApiError::from_engine(&e))
}

/// Answers with `e`; 4xx answers count as rejected (failures are counted where they happen).
fn reject(state: &AppState, e: ApiError) -> Response {
    if e.status.is_client_error() {
        state.metrics.requests_rejected.fetch_add(1, Relaxed);
    }
    e.into_response()
}

fn content_text(c: Option<&Content>) -> String {
    match c {
        None => String::new(),
        Some(Content::Text(t)) => t.clone(),
        Some(Content::Parts(parts)) => parts
            .iter()
            .filter(|p| p.kind == "text")
            .filter_map(|p| p.text.as_deref())
            .collect::<Vec<_>>()
            .join(""),
    }
}

/// The request's sampling fields over the neutral defaults (validated with the rest of the
/// request by [`Request::validate`]).
fn sampling(common: &CommonParams) -> Result<SamplingParams, ApiError> {
    let d = SamplingParams::default();
    let top_k = match common.top_k {
        None | Some(-1) => 0,
        Some(k) if k >= 0 => k as usize,
        Some(k) => {
            return Err(ApiError::bad_request(
                format!("top_k must be >= 0 (or -1 for off), got {k}"),
                Some("top_k"),
            ));
        }
    };
    Ok(SamplingParams {
        temperature: common.temperature.unwrap_or(d.temperature),
        top_k,
        top_p: common.top_p.unwrap_or(d.top_p),
        min_p: common.min_p.unwrap_or(d.min_p),
        repetition_penalty: common.repetition_penalty.unwrap_or(d.repetition_penalty),
        presence_penalty: common.presence_penalty.unwrap_or(d.presence_penalty),
        frequency_penalty: common.frequency_penalty.unwrap_or(d.frequency_penalty),
        seed: common.seed,
    })
}

/// Most stop strings per request: each one is scanned on every token.
const MAX_STOP_STRINGS: usize = 16;

/// Checks what can be checked without the model (so a bad request never takes a queue slot),
/// then queues the job and answers with its stream or its whole result.
async fn start(
    state: &Arc<AppState>,
    kind: Kind,
    prompt: Vec<u32>,
    common: CommonParams,
) -> Result<Response, ApiError> {
    use fp4moe_engine::Error as E;
    if prompt.is_empty() {
        return Err(ApiError::from_engine(&E::EmptyPrompt));
    }
    if let Some(n) = common.n
        && n != 1
    {
        return Err(ApiError::bad_request(format!("only n = 1 is supported, got {n}"), Some("n")));
    }
    let limit = state.context_limit;
    if prompt.len() >= limit {
        return Err(ApiError::from_engine(&E::PromptTooLong { prompt: prompt.len(), limit }));
    }
    let room = limit - prompt.len();
    let max_tokens = match common.max_completion_tokens.or(common.max_tokens) {
        None => state.config.default_max_tokens.min(room),
        Some(m) if m < 1 => {
            return Err(ApiError::bad_request(
                format!("max_tokens must be >= 1, got {m}"),
                Some("max_tokens"),
            ));
        }
        Some(m) if m as u64 > room as u64 => {
            let e = E::ContextOverflow { prompt: prompt.len(), max_tokens: m as usize, limit };
            return Err(ApiError::from_engine(&e));
        }
        Some(m) => m as usize,
    };
    let stop = common.stop.clone().map(api::Stop::into_vec).unwrap_or_default();
    if stop.len() > MAX_STOP_STRINGS {
        return Err(ApiError::bad_request(
            format!("`stop` takes at most {MAX_STOP_STRINGS} strings"),
            Some("stop"),
        ));
    }
    let request = Request { sampling: sampling(&common)?, max_tokens, stop, ignore_eos: common.ignore_eos };
    request.validate().map_err(|e| ApiError::from_engine(&e))?;

    let (tx, mut rx) = mpsc::unbounded_channel();
    let job = Job { prompt, request, events: tx, received: Instant::now() };
    // Count the job as queued before it becomes visible to the scheduler, which decrements.
    state.metrics.queue_depth.fetch_add(1, Relaxed);
    if let Err(e) = state.jobs.try_send(job) {
        state.metrics.queue_depth.fetch_sub(1, Relaxed);
        return Err(match e {
            mpsc::error::TrySendError::Full(_) => ApiError::overloaded(1),
            mpsc::error::TrySendError::Closed(_) => ApiError::unavailable("the server is shutting down"),
        });
    }
    let meta = Meta {
        id: format!("{}-{:x}", if kind == Kind::Chat { "chatcmpl" } else { "cmpl" }, rand_id()),
        created: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        model: state.config.model_name.clone(),
        kind,
        include_usage: common.stream_options.as_ref().is_some_and(|o| o.include_usage),
    };
    if !common.stream {
        return whole(meta, rx).await;
    }
    // Wait for the first event before sending headers, so a request the scheduler refuses
    // (e.g. a token id outside the model's vocabulary) still gets its 4xx status.
    let first = match rx.recv().await {
        Some(Event::Error(e)) => return Err(e),
        Some(ev) => ev,
        None => return Err(ApiError::unavailable("the server stopped before the request started")),
    };
    Ok(Sse::new(sse_stream(meta, first, rx)).keep_alive(KeepAlive::default()).into_response())
}

struct Meta {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
    include_usage: bool,
}

impl Meta {
    fn chunk(&self, delta_text: Option<&str>, finish: Option<FinishReason>, first: bool) -> Value {
        let choice = match self.kind {
            Kind::Chat => {
                let mut delta = json!({});
                if first {
                    delta["role"] = json!("assistant");
                }
                if let Some(t) = delta_text {
                    delta["content"] = json!(t);
                }
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
            Kind::Text => {
                json!({"index": 0, "text": delta_text.unwrap_or(""), "logprobs": null, "finish_reason": finish})
            }
        };
        json!({"id": self.id, "object": self.object(true), "created": self.created, "model": self.model, "choices": [choice]})
    }

    fn object(&self, stream: bool) -> &'static str {
        match (self.kind, stream) {
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Chat, false) => "chat.completion",
            (Kind::Text, _) => "text_completion",
        }
    }
}

/// The SSE body: one chunk per text event, a chunk with the finish reason, the usage chunk
/// when asked for, then `[DONE]`.
fn sse_stream(
    meta: Meta,
    first: Event,
    rx: mpsc::UnboundedReceiver<Event>,
) -> impl Stream<Item = Result<SseEvent, std::convert::Infallible>> {
    enum St {
        Open { meta: Meta, rx: mpsc::UnboundedReceiver<Event>, pending: Option<Event>, first: bool },
        Tail(Vec<String>),
    }
    let data = |d: String| Ok(SseEvent::default().data(d));
    stream::unfold(St::Open { meta, rx, pending: Some(first), first: true }, move |st| async move {
        match st {
            St::Open { meta, mut rx, pending, first } => {
                let ev = match pending {
                    Some(ev) => Some(ev),
                    None => rx.recv().await,
                };
                match ev {
                    Some(Event::Text(t)) => {
                        let chunk = meta.chunk(Some(&t), None, first).to_string();
                        Some((data(chunk), St::Open { meta, rx, pending: None, first: false }))
                    }
                    Some(Event::Done { finish_reason, usage }) => {
                        let mut tail = vec!["[DONE]".to_string()];
                        if meta.include_usage {
                            let u = json!({"id": meta.id, "object": meta.object(true), "created": meta.created,
                                "model": meta.model, "choices": [], "usage": usage});
                            tail.push(u.to_string());
                        }
                        let chunk = meta.chunk(None, Some(finish_reason), first).to_string();
                        Some((data(chunk), St::Tail(tail)))
                    }
                    Some(Event::Error(e)) => {
                        Some((data(e.body().to_string()), St::Tail(vec!["[DONE]".to_string()])))
                    }
                    // The scheduler went away without a word (it panicked); end the stream.
                    None => None,
                }
            }
            // Popped from the back: usage, then [DONE].
            St::Tail(mut rest) => rest.pop().map(|d| (data(d), St::Tail(rest))),
        }
    })
}

async fn whole(meta: Meta, mut rx: mpsc::UnboundedReceiver<Event>) -> Result<Response, ApiError> {
    let mut text = String::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Text(t) => text.push_str(&t),
            Event::Done { finish_reason, usage } => {
                let choice = match meta.kind {
                    Kind::Chat => json!({"index": 0, "message": {"role": "assistant", "content": text},
                        "logprobs": null, "finish_reason": finish_reason}),
                    Kind::Text => {
                        json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish_reason})
                    }
                };
                let body = json!({"id": meta.id, "object": meta.object(false), "created": meta.created,
                    "model": meta.model, "choices": [choice], "usage": usage});
                return Ok((StatusCode::OK, axum::Json(body)).into_response());
            }
            Event::Error(e) => return Err(e),
        }
    }
    Err(ApiError::unavailable("the server stopped before the request finished"))
}

/// Response ids need only be unique enough to tell requests apart in logs.
fn rand_id() -> u64 {
    use std::sync::atomic::AtomicU64;
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let t = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    t.rotate_left(17) ^ NEXT.fetch_add(1, Relaxed)
}
