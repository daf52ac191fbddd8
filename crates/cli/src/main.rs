//! `fp4moe`: the command-line interface. Each subcommand lives in `cmd/<name>.rs` with its own
//! clap `Args`; backend selection (`--backend`) is shared in `backend.rs`.

mod backend;
mod cmd;

use clap::{Parser, Subcommand};

/// Run FP4-quantized mixture-of-experts models (GLM-4.7-Flash, Qwen3-30B-A3B) on the CPU,
/// NVIDIA GPUs (CUDA) and Apple/Vulkan/DX12 GPUs (wgpu).
#[derive(Parser)]
#[command(name = "fp4moe", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a completion for a prompt, streaming tokens (synthetic model without --model).
    Run(cmd::run::Args),
    /// Interactive chat (/reset clears the history, /quit leaves).
    Chat(cmd::chat::Args),
    /// Print the logits of every position of one forward pass as JSON.
    Logits(cmd::logits::Args),
    /// Quantize a checkpoint once to MXFP4 or NVFP4.
    Quantize(cmd::quantize::Args),
    /// Show a checkpoint's architecture, tensors, quantization and memory footprint.
    Inspect(cmd::inspect::Args),
    /// Benchmarks: kernels at the models' shapes, or a whole synthetic model.
    #[command(subcommand)]
    Bench(cmd::bench::Command),
    /// Time kernel tile variants on a model's shapes and write a tuned config.
    Autotune(cmd::autotune::Args),
    /// Serve the OpenAI-compatible HTTP API.
    Serve(cmd::serve::Args),
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FP4MOE_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(a) => cmd::run::run(a),
        Command::Chat(a) => cmd::chat::run(a),
        Command::Logits(a) => cmd::logits::run(a),
        Command::Quantize(a) => cmd::quantize::run(a),
        Command::Inspect(a) => cmd::inspect::run(a),
        Command::Bench(c) => cmd::bench::run(c),
        Command::Autotune(a) => cmd::autotune::run(a),
        Command::Serve(a) => cmd::serve::run(a),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the whole context chain: "loading model: file x: tensor y: ...".
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
