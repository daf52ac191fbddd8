//! `fp4moe logits MODEL_DIR --ids 3,14,15 [--quant none|mxfp4|nvfp4] [--backend cpu]`: the logits
//! of every position of one full-sequence forward, as one JSON object on stdout:
//! `{"logits": [[f32; vocab]; n_ids]}` and nothing else (messages go to stderr). This is how the
//! golden scripts and users compare fp4moe with other implementations; it needs only
//! `config.json` and the weights (the ids are given, so no tokenizer).

use crate::backend::{BackendKind, OnBackend, dispatch};
use anyhow::Context;
use fp4moe_models::LoadOptions;
use fp4moe_ops::Backend;
use std::io::Write;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Checkpoint directory (config.json and safetensors weights).
    pub model: PathBuf,
    /// Token ids, comma-separated (e.g. 3,14,15).
    #[arg(long, value_delimiter = ',', required = true, num_args = 1..)]
    pub ids: Vec<u32>,
    /// Quantize-on-load of the attention and expert projections of a 16-bit checkpoint
    /// (`none`: the weights as stored, f32 math). Pre-quantized checkpoints stay as they are.
    #[arg(long, value_enum, default_value_t = Quant::None)]
    pub quant: Quant,
    #[arg(long, value_enum, default_value_t = BackendKind::Cpu)]
    pub backend: BackendKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Quant {
    None,
    Mxfp4,
    Nvfp4,
}

impl Quant {
    fn format(self) -> Option<fp4::Format> {
        match self {
            Quant::None => None,
            Quant::Mxfp4 => Some(fp4::Format::Mxfp4),
            Quant::Nvfp4 => Some(fp4::Format::Nvfp4),
        }
    }
}

struct Job<'a> {
    args: &'a Args,
}

impl OnBackend for Job<'_> {
    /// Per position, `[vocab]` logits.
    type Output = Vec<Vec<f32>>;

    fn run<B: Backend + 'static>(self, backend: B) -> anyhow::Result<Vec<Vec<f32>>> {
        let a = self.args;
        let opts = LoadOptions { quant: a.quant.format(), ..LoadOptions::default() };
        let model = fp4moe_models::load(backend, &a.model, &opts)
            .with_context(|| format!("loading {}", a.model.display()))?;
        let vocab = model.info().vocab_size;
        let mut seq = model.new_sequence(a.ids.len())?;
        let mut out = model.forward(&mut [(&mut seq, &a.ids[..])], true)?;
        let flat = out.pop().context("the model returned no logits")?;
        if let Some(i) = flat.iter().position(|v| !v.is_finite()) {
            anyhow::bail!("logit {} of position {} is {} (not finite)", i % vocab, i / vocab, flat[i]);
        }
        Ok(flat.chunks(vocab).map(<[f32]>::to_vec).collect())
    }
}

#[derive(serde::Serialize)]
struct Output<'a> {
    logits: &'a [Vec<f32>],
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.ids.is_empty() {
        anyhow::bail!("--ids needs at least one token id");
    }
    let logits = dispatch(args.backend, Job { args: &args })?;
    let mut stdout = std::io::BufWriter::new(std::io::stdout().lock());
    serde_json::to_writer(&mut stdout, &Output { logits: &logits })?;
    writeln!(stdout)?;
    stdout.flush()?;
    Ok(())
}
