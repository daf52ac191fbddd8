//! `fp4moe run`: one prompt, streamed completion, statistics on stderr.
//!
//! Also home of what `chat` and `bench model` share: the model-selection flags ([`ModelArgs`]:
//! a checkpoint directory or a synthetic model), the sampling flags ([`SamplingArgs`]) and
//! [`load`], which turns them into a model plus tokenizer.

use std::io::Write;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use fp4moe_engine::{Generation, Generator, Message, RenderOptions, Request, SamplingParams, Tokenizer};
use fp4moe_models::{Arch, LanguageModel, LoadOptions, PrefillActivations};
use serde_json::{Value, json};

use crate::backend::{BackendKind, OnBackend, dispatch};

/// Decoder layers a synthetic model gets when `--layers` is not given: enough to run every kind
/// of layer (GLM's dense layer 0 and MoE layers), small enough to build in seconds and a few GB.
pub const DEFAULT_SYNTHETIC_LAYERS: usize = 4;

/// Seed of a synthetic model's random weights (fixed, so runs are comparable).
pub(crate) const SYNTHETIC_WEIGHT_SEED: u64 = 0;

/// What a prefill chunk's products read (`fp4moe_models::PrefillActivations`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ActivationsArg {
    /// f32, as decode steps: every product f32-accurate.
    #[default]
    F32,
    /// The FP4 products' inputs rounded to bf16 (as vLLM runs prefill): faster prefill on the
    /// CUDA backend's tensor cores; logits move by about that rounding (~3e-3 relative). The
    /// CPU and wgpu backends read f32 anyway, so there it costs precision and gains nothing.
    Bf16,
}

impl ActivationsArg {
    pub fn get(self) -> PrefillActivations {
        match self {
            ActivationsArg::F32 => PrefillActivations::F32,
            ActivationsArg::Bf16 => PrefillActivations::Bf16,
        }
    }
}

/// Weight format: keep what the checkpoint stores, or quantize to FP4 while loading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum QuantArg {
    /// Keep the checkpoint's weights as stored (bf16, or its FP4). Not valid for synthetic models.
    None,
    /// OCP MXFP4: blocks of 32, power-of-two scales.
    Mxfp4,
    /// NVIDIA NVFP4: blocks of 16, E4M3 scales, one f32 tensor scale.
    Nvfp4,
}

impl QuantArg {
    pub fn format(self) -> Option<fp4::Format> {
        match self {
            QuantArg::None => None,
            QuantArg::Mxfp4 => Some(fp4::Format::Mxfp4),
            QuantArg::Nvfp4 => Some(fp4::Format::Nvfp4),
        }
    }
}

/// A synthetic architecture as a CLI value, named by [`Arch::name`] (`glm-4.7-flash`,
/// `qwen3-30b-a3b`), so the names live only in the models crate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyntheticArch(pub Arch);

impl SyntheticArch {
    pub const DEFAULT: SyntheticArch = SyntheticArch(Arch::Qwen3_30bA3b);

    pub fn arch(self) -> Arch {
        self.0
    }
}

impl clap::ValueEnum for SyntheticArch {
    fn value_variants<'a>() -> &'a [Self] {
        static ALL: std::sync::LazyLock<Vec<SyntheticArch>> =
            std::sync::LazyLock::new(|| Arch::ALL.into_iter().map(SyntheticArch).collect());
        &ALL
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        let c = self.0.config();
        let help = format!(
            "{}: {} layers, {} experts",
            c["model_type"].as_str().unwrap_or("?"),
            c["num_hidden_layers"],
            c.get("num_experts").or(c.get("n_routed_experts")).cloned().unwrap_or_default()
        );
        Some(clap::builder::PossibleValue::new(self.0.name()).help(help))
    }
}

/// Which model to load, and on what.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// Checkpoint directory (HF layout: config.json, *.safetensors, tokenizer.json). Without it,
    /// a synthetic model of a real architecture with random weights is used (no download needed;
    /// the text it produces is noise).
    #[arg(long, short = 'm', value_name = "DIR")]
    pub model: Option<PathBuf>,

    /// Compute backend.
    #[arg(long, value_enum, default_value_t = BackendKind::Auto)]
    pub backend: BackendKind,

    /// Weight format. For a checkpoint: `none` keeps it as stored, mxfp4/nvfp4 quantize on load
    /// (quantize once with `fp4moe quantize` to load faster). For a synthetic model: its FP4
    /// format (default mxfp4).
    #[arg(long, value_enum)]
    pub quant: Option<QuantArg>,

    /// Architecture of the synthetic model (used without --model).
    #[arg(long, value_enum, default_value_t = SyntheticArch::DEFAULT, conflicts_with = "model")]
    pub synthetic: SyntheticArch,

    /// Decoder layers of the synthetic model [default: 4 for run/chat; all for bench]. Pass the
    /// architecture's full depth (48 / 47) for real-size compute.
    #[arg(long, conflicts_with = "model")]
    pub layers: Option<usize>,

    /// Context limit in tokens (prompt + completion); at most the model's max_position_embeddings.
    #[arg(long, value_name = "TOKENS")]
    pub ctx: Option<usize>,

    /// Prompt tokens per forward pass during prefill.
    #[arg(long, value_name = "TOKENS", default_value_t = fp4moe_engine::DEFAULT_PREFILL_CHUNK)]
    pub prefill_chunk: usize,

    /// What the products of prefill chunks read: f32 (decode always does) or bf16.
    #[arg(long, value_enum, default_value_t = ActivationsArg::F32)]
    pub prefill_activations: ActivationsArg,
}

/// Sampling flags. Unset flags take the checkpoint's generation_config.json values, then the
/// neutral defaults (temperature 1, no filters).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct SamplingArgs {
    /// Sampling temperature; 0 = greedy (always the most likely token).
    #[arg(long, short = 't', allow_negative_numbers = true)]
    pub temperature: Option<f32>,
    /// Greedy decoding (same as --temperature 0).
    #[arg(long, conflicts_with = "temperature")]
    pub greedy: bool,
    /// Sample only among the K most likely tokens (0 = off).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Nucleus sampling: the smallest set of tokens with total probability >= P, in (0, 1].
    #[arg(long, allow_negative_numbers = true)]
    pub top_p: Option<f32>,
    /// Drop tokens less likely than P × the most likely one, in [0, 1].
    #[arg(long, allow_negative_numbers = true)]
    pub min_p: Option<f32>,
    /// Penalize tokens already in the prompt or output (> 1 discourages repeats; 1 = off).
    #[arg(long, allow_negative_numbers = true)]
    pub repetition_penalty: Option<f32>,
    /// Subtract this from the logit of every token already generated, in [-2, 2].
    #[arg(long, allow_negative_numbers = true)]
    pub presence_penalty: Option<f32>,
    /// Subtract this per occurrence of a token already generated, in [-2, 2].
    #[arg(long, allow_negative_numbers = true)]
    pub frequency_penalty: Option<f32>,
    /// Seed for sampling: the same seed, prompt and settings give the same output.
    #[arg(long)]
    pub seed: Option<u64>,
}

impl SamplingArgs {
    /// Flags over `defaults` (from generation_config.json), validated.
    pub fn resolve(&self, defaults: SamplingParams) -> anyhow::Result<SamplingParams> {
        let mut p = defaults;
        if let Some(v) = self.temperature {
            p.temperature = v;
        }
        if self.greedy {
            p.temperature = 0.0;
        }
        if let Some(v) = self.top_k {
            p.top_k = v;
        }
        if let Some(v) = self.top_p {
            p.top_p = v;
        }
        if let Some(v) = self.min_p {
            p.min_p = v;
        }
        if let Some(v) = self.repetition_penalty {
            p.repetition_penalty = v;
        }
        if let Some(v) = self.presence_penalty {
            p.presence_penalty = v;
        }
        if let Some(v) = self.frequency_penalty {
            p.frequency_penalty = v;
        }
        if self.seed.is_some() {
            p.seed = self.seed;
        }
        p.validate()?;
        Ok(p)
    }
}

/// A model ready to generate with.
pub struct Loaded {
    pub model: Box<dyn LanguageModel>,
    pub tokenizer: Arc<Tokenizer>,
    /// Sampling defaults recommended by the checkpoint (neutral for synthetic models).
    pub sampling_defaults: SamplingParams,
    /// One line saying what was loaded (for stderr / JSON).
    pub description: String,
    pub synthetic: bool,
    pub load_s: f64,
}

struct LoadCheckpoint<'a> {
    dir: &'a Path,
    opts: LoadOptions,
}

impl OnBackend for LoadCheckpoint<'_> {
    type Output = Box<dyn LanguageModel>;
    fn run<B: fp4moe_ops::Backend + 'static>(self, backend: B) -> anyhow::Result<Self::Output> {
        Ok(fp4moe_models::load(backend, self.dir, &self.opts)?)
    }
}

pub struct BuildSynthetic {
    pub arch: Arch,
    pub layers: Option<usize>,
    pub format: fp4::Format,
}

impl OnBackend for BuildSynthetic {
    type Output = Box<dyn LanguageModel>;
    fn run<B: fp4moe_ops::Backend + 'static>(self, backend: B) -> anyhow::Result<Self::Output> {
        Ok(fp4moe_models::synthetic(backend, self.arch, self.layers, self.format, SYNTHETIC_WEIGHT_SEED)?)
    }
}

/// Checks the directory before the (slow) load so the common mistakes get a direct message.
fn check_model_dir(dir: &Path) -> anyhow::Result<()> {
    if !dir.exists() {
        bail!("model directory {} does not exist", dir.display());
    }
    if !dir.is_dir() {
        bail!("{} is not a directory (--model takes a checkpoint directory)", dir.display());
    }
    let missing: Vec<&str> =
        ["config.json", "tokenizer.json"].into_iter().filter(|f| !dir.join(f).is_file()).collect();
    if !missing.is_empty() {
        bail!(
            "{} is not a complete model directory: missing {} (expected a HF checkpoint: config.json, \
             *.safetensors, tokenizer.json)",
            dir.display(),
            missing.join(", ")
        );
    }
    Ok(())
}

/// Loads what `args` names. `default_layers` applies to synthetic models without `--layers`
/// (`None` = the architecture's full depth).
pub fn load(args: &ModelArgs, default_layers: Option<usize>) -> anyhow::Result<Loaded> {
    let start = Instant::now();
    match &args.model {
        Some(dir) => {
            check_model_dir(dir)?;
            let tokenizer = Tokenizer::from_dir(dir)?;
            let sampling_defaults = fp4moe_engine::sampling::defaults_from_dir(dir)?;
            let opts = LoadOptions { quant: args.quant.and_then(QuantArg::format), ..LoadOptions::default() };
            let mut model = dispatch(args.backend, LoadCheckpoint { dir, opts })
                .with_context(|| format!("loading model {}", dir.display()))?;
            model.set_prefill_activations(args.prefill_activations.get())?;
            tokenizer
                .check_model(model.info())
                .with_context(|| format!("{}/tokenizer.json", dir.display()))?;
            let info = model.info();
            let description = format!(
                "{} ({}, {} layers, {})",
                dir.display(),
                info.model_type,
                info.num_layers,
                info.quantization
            );
            Ok(Loaded {
                model,
                tokenizer: Arc::new(tokenizer),
                sampling_defaults,
                description,
                synthetic: false,
                load_s: start.elapsed().as_secs_f64(),
            })
        }
        None => {
            let arch = args.synthetic.arch();
            let format = match args.quant {
                None => fp4::Format::Mxfp4,
                Some(q) => q.format().context(
                    "a synthetic model has random FP4 weights: --quant must be mxfp4 or nvfp4 (or pass --model)",
                )?,
            };
            let layers = args.layers.or(default_layers);
            let mut model = dispatch(args.backend, BuildSynthetic { arch, layers, format })
                .with_context(|| format!("building synthetic {}", arch.name()))?;
            model.set_prefill_activations(args.prefill_activations.get())?;
            let info = model.info();
            let full = arch.config()["num_hidden_layers"].as_u64().unwrap_or(0);
            let description = format!(
                "synthetic {} ({}, {} of {full} layers, random {} weights; byte-level tokenizer — the text is noise)",
                arch.name(),
                info.model_type,
                info.num_layers,
                format.name()
            );
            Ok(Loaded {
                model,
                tokenizer: Arc::new(Tokenizer::byte_level()),
                sampling_defaults: SamplingParams::default(),
                description,
                synthetic: true,
                load_s: start.elapsed().as_secs_f64(),
            })
        }
    }
}

/// Whether to wrap the prompt in the chat template.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct PromptFormat {
    /// Wrap the prompt as a user message in the model's chat template (the default when the
    /// model has one).
    #[arg(long, conflicts_with = "raw")]
    pub chat: bool,
    /// Feed the prompt as plain text, without the chat template.
    #[arg(long)]
    pub raw: bool,
    /// System message (chat template only).
    #[arg(long, value_name = "TEXT")]
    pub system: Option<String>,
    /// Qwen3-style thinking switch passed to the chat template (`enable_thinking`).
    #[arg(long, value_name = "BOOL")]
    pub thinking: Option<bool>,
}

/// `fp4moe run`
#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    fp4moe run --prompt \"Hello\" --max-tokens 16          # synthetic model, no download\n  \
    fp4moe run --model ./Qwen3-30B-A3B --prompt \"Why is the sky blue?\" --quant mxfp4\n  \
    fp4moe run --model DIR --prompt \"...\" --temperature 0 --json")]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,

    /// The prompt.
    #[arg(long, short = 'p')]
    pub prompt: String,

    /// Most tokens to generate.
    #[arg(long, short = 'n', default_value_t = 128)]
    pub max_tokens: usize,

    /// Stop when the output contains this string (repeatable; the string is not printed).
    #[arg(long, value_name = "TEXT")]
    pub stop: Vec<String>,

    /// Generate exactly --max-tokens tokens, past any end-of-sequence token (for timing runs).
    #[arg(long)]
    pub ignore_eos: bool,

    #[command(flatten)]
    pub format: PromptFormat,

    #[command(flatten)]
    pub sampling: SamplingArgs,

    /// Print one JSON object (text, tokens, finish reason, statistics) instead of streaming.
    #[arg(long)]
    pub json: bool,
}

/// Builds the prompt ids: the chat template around `messages` or, raw, the text itself.
pub fn encode_prompt(
    tokenizer: &Tokenizer,
    format: &PromptFormat,
    messages: &[Message],
    raw_text: &str,
) -> anyhow::Result<Vec<u32>> {
    let use_template = !format.raw && (format.chat || tokenizer.chat_template().is_some());
    if !use_template {
        return Ok(tokenizer.encode(raw_text, true)?);
    }
    let template = tokenizer.chat_template().context("--chat: the model has no chat template (use --raw)")?;
    let opts = RenderOptions { add_generation_prompt: true, enable_thinking: format.thinking, tools: None };
    let text = template.render(messages, &opts)?;
    // The template wrote the special tokens itself; adding them again would double the BOS.
    Ok(tokenizer.encode(&text, false)?)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.prompt.is_empty() {
        bail!("the prompt is empty (--prompt \"...\")");
    }
    // Reject bad flags before spending seconds on loading.
    args.sampling.resolve(SamplingParams::default())?;
    if args.max_tokens == 0 {
        bail!("--max-tokens must be at least 1");
    }
    let loaded = load(&args.model, Some(DEFAULT_SYNTHETIC_LAYERS))?;
    eprintln!("model: {} [loaded in {:.1} s]", loaded.description, loaded.load_s);
    if loaded.synthetic {
        eprintln!(
            "note: no --model given, so this is a synthetic model with random weights: use --model DIR for real text"
        );
    }
    let sampling = args.sampling.resolve(loaded.sampling_defaults.clone())?;
    let generator = Generator::new(loaded.model.as_ref(), loaded.tokenizer.clone())?
        .with_context_limit(args.model.ctx)
        .with_prefill_chunk(args.model.prefill_chunk);

    let mut messages = Vec::new();
    if let Some(s) = &args.format.system {
        messages.push(Message::new("system", s.clone()));
    }
    messages.push(Message::new("user", args.prompt.clone()));
    let prompt = encode_prompt(&loaded.tokenizer, &args.format, &messages, &args.prompt)?;

    let request = Request {
        sampling,
        max_tokens: args.max_tokens,
        stop: args.stop.clone(),
        ignore_eos: args.ignore_eos,
    };
    let mut stdout = std::io::stdout().lock();
    let mut write_error = None;
    let generation = generator.generate(&prompt, &request, |step| {
        if args.json || step.text.is_empty() {
            return ControlFlow::Continue(());
        }
        // A closed pipe (`| head`) ends generation instead of panicking.
        match stdout.write_all(step.text.as_bytes()).and_then(|()| stdout.flush()) {
            Ok(()) => ControlFlow::Continue(()),
            Err(e) => {
                write_error = Some(e);
                ControlFlow::Break(())
            }
        }
    })?;
    if let Some(e) = write_error {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            return Ok(());
        }
        return Err(e).context("writing to stdout");
    }
    if args.json {
        let out = generation_json(&generation, &loaded);
        writeln!(stdout, "{}", serde_json::to_string_pretty(&out)?)?;
    } else {
        writeln!(stdout)?;
        eprintln!("{}", stats_line(&generation));
    }
    Ok(())
}

/// The statistics line printed on stderr after a completion.
pub fn stats_line(g: &Generation) -> String {
    let s = &g.stats;
    format!(
        "[prompt {} tok, {:.1} tok/s | generated {} tok, {:.2} tok/s | first token {:.2} s | finish: {} | seed {}]",
        s.prompt_tokens,
        s.prompt_tok_s(),
        s.generated_tokens,
        s.decode_tok_s(),
        s.time_to_first_token_s,
        g.finish_reason.openai(),
        g.seed
    )
}

fn generation_json(g: &Generation, loaded: &Loaded) -> Value {
    let s = &g.stats;
    json!({
        "model": loaded.description,
        "synthetic": loaded.synthetic,
        "text": g.text,
        "tokens": g.tokens,
        "finish_reason": g.finish_reason,
        "seed": g.seed,
        "prompt_tokens": s.prompt_tokens,
        "generated_tokens": s.generated_tokens,
        "prompt_tok_s": s.prompt_tok_s(),
        "decode_tok_s": s.decode_tok_s(),
        "time_to_first_token_s": s.time_to_first_token_s,
        "load_s": loaded.load_s,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::ValueEnum;

    #[test]
    fn flags_override_checkpoint_defaults_and_are_validated() {
        let defaults =
            SamplingParams { temperature: 0.6, top_k: 20, top_p: 0.95, ..SamplingParams::default() };
        let flags = SamplingArgs { top_p: Some(0.5), seed: Some(3), ..SamplingArgs::default() };
        let p = flags.resolve(defaults.clone()).unwrap();
        assert_eq!((p.temperature, p.top_k, p.top_p, p.seed), (0.6, 20, 0.5, Some(3)));
        let greedy = SamplingArgs { greedy: true, ..SamplingArgs::default() };
        assert!(greedy.resolve(defaults.clone()).unwrap().is_greedy());
        let bad = SamplingArgs { min_p: Some(-1.0), ..SamplingArgs::default() };
        assert!(bad.resolve(defaults).unwrap_err().to_string().contains("min_p"));
    }

    #[test]
    fn synthetic_arch_values_are_the_models_crate_names() {
        for arch in Arch::ALL {
            assert_eq!(SyntheticArch::from_str(arch.name(), false).unwrap().arch(), arch);
        }
        assert!(SyntheticArch::from_str("llama", false).is_err());
    }
}
