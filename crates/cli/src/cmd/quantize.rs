//! `fp4moe quantize`: convert a checkpoint to FP4 once, so every later load is a memory map
//! instead of a quantization pass. The writer builds the output in a `.partial-…` sibling and
//! renames it into place only when complete, so an interrupted run never leaves a directory that
//! looks like a finished checkpoint.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use fp4moe_models::LoadOptions;
use fp4moe_models::checkpoint_writer::{self, WriteOptions};
use fp4moe_models::loader::Checkpoint;

/// The FP4 formats a checkpoint can be written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FormatArg {
    /// OCP MXFP4: blocks of 32, power-of-two (E8M0) scales. Runs everywhere.
    Mxfp4,
    /// NVIDIA NVFP4: blocks of 16, E4M3 scales, one f32 tensor scale. Lower error.
    Nvfp4,
}

impl FormatArg {
    fn format(self) -> fp4::Format {
        match self {
            FormatArg::Mxfp4 => fp4::Format::Mxfp4,
            FormatArg::Nvfp4 => fp4::Format::Nvfp4,
        }
    }
}

/// `fp4moe quantize`
#[derive(clap::Args)]
#[command(
    after_help = "Example:\n  fp4moe quantize --model ./Qwen3-30B-A3B --out ./Qwen3-30B-A3B-mxfp4 --format mxfp4"
)]
pub struct Args {
    /// Source checkpoint directory (bf16 safetensors, or ModelOpt NVFP4).
    #[arg(long, short = 'm', value_name = "DIR")]
    pub model: PathBuf,

    /// Output directory (must not exist unless --force).
    #[arg(long, short = 'o', value_name = "DIR")]
    pub out: PathBuf,

    /// FP4 format to write.
    #[arg(long, value_enum)]
    pub format: FormatArg,

    /// Replace the output directory if it exists.
    #[arg(long)]
    pub force: bool,

    /// Also quantize embeddings, routers and lm_head (by default only attention/MLP projections
    /// and experts: the rest is small, or decides routing and is sensitive to error).
    #[arg(long)]
    pub quantize_all: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    // Checked first so a mistake costs nothing; the writer checks again (and handles races).
    if args.out.exists() && !args.force {
        anyhow::bail!("output directory {} already exists (pass --force to replace it)", args.out.display());
    }
    if !args.model.is_dir() {
        anyhow::bail!("model directory {} does not exist or is not a directory", args.model.display());
    }
    let start = Instant::now();
    let src = Checkpoint::open(&args.model).with_context(|| format!("opening {}", args.model.display()))?;
    let format = args.format.format();
    let load_opts = LoadOptions { quant: Some(format), quantize_all: args.quantize_all };
    let plan = checkpoint_writer::default_plan(&src, &load_opts)?;
    if plan.is_empty() {
        anyhow::bail!(
            "{}: nothing to quantize (no projection or expert weights found)",
            args.model.display()
        );
    }
    eprintln!(
        "quantizing {} ({}, {}) to {} ({} modules)",
        args.model.display(),
        src.model_type().unwrap_or("?"),
        src.quantization().describe(),
        format.name(),
        plan.len()
    );

    let bar = indicatif::ProgressBar::new(plan.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{wide_bar}] {pos}/{len} {msg}")
            .expect("static template")
            .progress_chars("=> "),
    );
    let opts = WriteOptions { force: args.force, ..WriteOptions::default() };
    let summary = checkpoint_writer::write_quantized(
        &src,
        &args.out,
        format,
        &plan,
        &opts,
        &mut |p: checkpoint_writer::Progress<'_>| {
            bar.set_length(p.total as u64);
            bar.set_position(p.done as u64);
            bar.set_message(format!("{} ({:.2} GB written)", p.item, p.bytes as f64 / 1e9));
        },
    );
    bar.finish_and_clear();
    let summary = summary.with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!(
        "wrote {}: {} tensors in {} file(s), {:.2} GB, {} modules quantized, in {:.1} s",
        args.out.display(),
        summary.tensors,
        summary.files,
        summary.bytes as f64 / 1e9,
        summary.quantized_modules,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
