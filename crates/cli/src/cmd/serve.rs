//! `fp4moe serve`: the OpenAI-compatible HTTP API (see the `fp4moe-server` crate) over a loaded
//! checkpoint, or over a synthetic model when no `--model` is given.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use anyhow::Context;
use fp4moe_models::LanguageModel;
use fp4moe_server::ServerConfig;

use super::run::{DEFAULT_SYNTHETIC_LAYERS, ModelArgs, load};

/// `fp4moe serve`
#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    fp4moe serve                                   # synthetic model on 127.0.0.1:8000, no download\n  \
    fp4moe serve --model ./Qwen3-30B-A3B --quant mxfp4 --api-key secret\n  \
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\\n    \
    -d '{\"messages\":[{\"role\":\"user\",\"content\":\"Hi\"}],\"max_tokens\":16}'")]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,

    /// Address to listen on. The default accepts local connections only; use 0.0.0.0 (with
    /// --api-key) to serve the network.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,

    /// Port to listen on (0 picks a free one and prints it).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,

    /// Most requests decoded together in one batch.
    #[arg(long, default_value_t = 32)]
    pub max_batch: usize,

    /// Requests that may wait for a batch slot; beyond that the server answers 429.
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,

    /// Require `Authorization: Bearer KEY` on every request.
    #[arg(long, value_name = "KEY")]
    pub api_key: Option<String>,

    /// Largest accepted request body in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body_bytes: usize,

    /// max_tokens for requests that do not set it (capped by the context left).
    #[arg(long, default_value_t = 512)]
    pub default_max_tokens: usize,

    /// Model name reported by /v1/models [default: the directory name, or the synthetic
    /// architecture's].
    #[arg(long)]
    pub served_model_name: Option<String>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.max_batch == 0 || args.max_queue == 0 {
        anyhow::bail!("--max-batch and --max-queue must be at least 1");
    }
    let loaded = load(&args.model, Some(DEFAULT_SYNTHETIC_LAYERS))?;
    eprintln!("model: {} [loaded in {:.1} s]", loaded.description, loaded.load_s);
    if loaded.synthetic {
        eprintln!(
            "note: no --model given, so this serves a synthetic model with random weights (the text is noise): \
             use --model DIR for real text"
        );
    }
    let name = args.served_model_name.clone().unwrap_or_else(|| match &args.model.model {
        Some(dir) => dir
            .canonicalize()
            .ok()
            .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| dir.display().to_string()),
        None => args.model.synthetic.arch().name().to_string(),
    });
    let config = ServerConfig {
        api_key: args.api_key.clone(),
        max_batch: args.max_batch,
        max_queue: args.max_queue,
        max_body_bytes: args.max_body_bytes,
        prefill_chunk: args.model.prefill_chunk,
        context_limit: args.model.ctx,
        default_max_tokens: args.default_max_tokens,
        ..ServerConfig::new(name)
    };
    let model: Arc<dyn LanguageModel> = Arc::from(loaded.model);
    let (router, _metrics) = fp4moe_server::app(model, loaded.tokenizer, config)?;

    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async move {
        let addr = SocketAddr::new(args.host, args.port);
        let listener =
            tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
        let local = listener.local_addr()?;
        eprintln!("serving on http://{local}/v1 (Ctrl-C or SIGTERM stops; running requests finish)");
        if !args.host.is_loopback() && args.api_key.is_none() {
            eprintln!(
                "warning: listening on {} without --api-key: anyone who can reach it can use it",
                local
            );
        }
        fp4moe_server::serve(listener, router, shutdown_signal()).await.context("serving")?;
        eprintln!("stopped");
        anyhow::Ok(())
    })
}

/// Resolves on Ctrl-C or SIGTERM (what `docker stop` and systemd send).
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    eprintln!("shutting down: no new connections; waiting for running requests");
}
