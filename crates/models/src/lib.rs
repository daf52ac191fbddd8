//! The models, on any [`fp4moe_ops::Backend`], and the loader that turns checkpoints into
//! uploaded weights.
//!
//! - [`loader`]: safetensors checkpoints (single or sharded, bf16 / NVFP4 / our FP4 format) and the
//!   one-time weight rewrites (experts stacked, gate/up fused, quantize-on-load).
//! - [`qwen3_moe`] and [`glm4_moe_lite`]: one file per HF `model_type`, each a config struct of
//!   exactly the keys it reads, its weights with their shapes, and its forward pass as op calls.
//!   Shared pieces (norms, RoPE, SwiGLU, routers) live in `layers`; the batch plumbing of a
//!   forward pass, and batch-1 decode replayed as a recorded graph, in `batch`.
//! - [`synthetic`]: random FP4 models of the real shapes, for benchmarks and runs without weights.
//! - [`golden`]: the checks against transformers' logits that every backend's tests run.
//!
//! [`LanguageModel`] is the backend-erased contract the engine and server build on; [`load`] and
//! [`synthetic()`] produce one.

mod batch;
pub mod checkpoint_writer;
pub mod error;
pub mod glm4_moe_lite;
pub mod golden;
mod layers;
pub mod loader;
pub mod qwen3_moe;
pub mod synthetic;

pub use batch::decode_graph_replays;
pub use error::{Error, Result};
pub use loader::LoadOptions;
pub use synthetic::Arch;

use fp4moe_ops::Backend;
use fp4moe_ops::sampling::WeightSpec;
use std::any::Any;
use std::path::Path;

/// What the engine needs to know about a loaded model.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// HF `model_type`: `qwen3_moe` or `glm4_moe_lite`.
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    /// Longest sequence the model accepts (config `max_position_embeddings`).
    pub max_position_embeddings: usize,
    /// Every end-of-sequence id the config lists.
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
    /// How the weights are held: `bf16`, `mxfp4`, `nvfp4` (plus details).
    pub quantization: String,
}

/// What the FP4 products of a prefill chunk (a forward where some sequence appends more than
/// one token; other sequences' decode rows batched with it read the same) read: f32 (the
/// default; every product f32-accurate, as decode-only steps always are),
/// or bf16, as vLLM and PyTorch run them. bf16 rounds each block's normed input where the
/// projections and experts read it (the router still reads f32, so that routing near ties
/// flip less often),
/// the attention output before `o_proj`, GLM's normed query latent before `q_b` and the MLPs'
/// and experts' intermediate before `down` (`Backend::moe` does it for the experts), and lets
/// attention's products read bf16 (`Backend::attention_gqa_bf16`); the CUDA backend's
/// tensor-core GEMMs then take one bf16 term per activation instead of two or three
/// (BENCHMARKS.md, "bf16 prefill activations"). The logits move by about that rounding
/// (2^-9 relative per element; ~3e-3 on the golden fixtures).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PrefillActivations {
    #[default]
    F32,
    Bf16,
}

/// One sequence's state (KV cache on the device, and its length). Opaque to the engine.
pub struct Sequence {
    pub state: Box<dyn Any + Send + Sync>,
    /// Tokens already in the cache.
    pub len: usize,
    /// Tokens the cache can hold.
    pub capacity: usize,
}

/// A loaded model, backend-erased so the engine and server need no generics.
pub trait LanguageModel: Send + Sync {
    fn info(&self) -> &ModelInfo;
    /// What prefill chunks' products read from now on ([`PrefillActivations`]). A model that
    /// offers only f32 refuses anything else.
    fn set_prefill_activations(&mut self, a: PrefillActivations) -> Result<()> {
        match a {
            PrefillActivations::F32 => Ok(()),
            _ => Err(Error::Invalid(format!("prefill activations {a:?}: this model reads f32 only"))),
        }
    }
    /// A new, empty sequence whose cache holds `capacity` tokens (at most
    /// `max_position_embeddings`).
    fn new_sequence(&self, capacity: usize) -> Result<Sequence>;
    /// Appends `tokens` to each sequence and runs them in one batched forward (a prefill chunk
    /// or one decode token per sequence). Returns, per sequence, the logits `[vocab]` of its last
    /// new token, or of all its new tokens (`[n, vocab]` flattened) when `all_logits`.
    /// Token ids are checked against the vocabulary and lengths against each sequence's capacity
    /// before any work is enqueued; on error no sequence is changed.
    fn forward(&self, batch: &mut [(&mut Sequence, &[u32])], all_logits: bool) -> Result<Vec<Vec<f32>>>;
    /// [`LanguageModel::forward`] for samplers that need only the best logits (greedy: k = 1):
    /// per sequence, the `k` largest (all, if fewer) of the first `vocab_limit` logits of its
    /// last new token as `(id, logit)`, most likely first (ties to the lower id, NaN ranked below -inf). Models
    /// reduce on the device, so only those cross to the host; this default reduces the
    /// downloaded rows.
    fn forward_top_k(
        &self,
        batch: &mut [(&mut Sequence, &[u32])],
        k: usize,
        vocab_limit: usize,
    ) -> Result<Vec<Vec<(u32, f32)>>> {
        if k == 0 || vocab_limit == 0 {
            return Err(Error::Invalid(format!("forward_top_k: top {k} of {vocab_limit} logits")));
        }
        let rows = self.forward(batch, false)?;
        Ok(rows
            .iter()
            .map(|row| {
                let row = &row[..vocab_limit.min(row.len())];
                fp4moe_ops::reference::top_k_indices(row, k).into_iter().map(|i| (i as u32, row[i])).collect()
            })
            .collect())
    }
    /// [`LanguageModel::forward_top_k`] for samplers that draw from the whole row: per sequence,
    /// the `k` best of the first `vocab_limit` logits of its last new token and, where `specs`
    /// (one per sequence) holds a [`WeightSpec`], the chunk sums of its weights
    /// ([`fp4moe_ops::sampling::weight_sums`]); any other logits are read on request. Models
    /// compute these where the logits are; this default downloads the rows. A row is valid
    /// until the next forward on this model.
    fn forward_reduced(
        &self,
        batch: &mut [(&mut Sequence, &[u32])],
        k: usize,
        vocab_limit: usize,
        specs: &[Option<WeightSpec>],
    ) -> Result<Vec<Box<dyn ReducedRow + '_>>> {
        check_reduced(batch.len(), k, vocab_limit, specs)?;
        Ok(HostRow::reduce_all(self.forward(batch, false)?, k, vocab_limit, specs))
    }
    /// Whether [`LanguageModel::forward_reduced`] sums weights on the device (its backend's
    /// [`Backend::device_weight_sums`]), so that a sampler gains by asking for them instead of
    /// the whole row.
    fn reduces_weights_on_device(&self) -> bool {
        false
    }
    /// f32 values the cache holds per token per layer (GQA: 2 · kv_heads · head_dim; MLA: latent
    /// + rope key), for memory budgets and bandwidth floors. `None` when a model does not say.
    fn cache_values_per_token_per_layer(&self) -> Option<usize> {
        None
    }
}

/// One row of logits as [`LanguageModel::forward_reduced`] leaves it: what a sampler that draws
/// from the whole row reads without downloading it.
pub trait ReducedRow {
    /// Logits in the row (the vocabulary limit it was reduced over).
    fn width(&self) -> usize;
    /// The best `(id, logit)`, most likely first (ties to the lower id, NaN ranked below -inf).
    fn top(&self) -> &[(u32, f32)];
    /// The [`fp4moe_ops::sampling::WEIGHT_CHUNK`] sums of the row's weights, with the row's
    /// largest logit as the maximum, when a spec was given.
    fn weight_sums(&self) -> Option<&[f32]>;
    /// Logits `start..start + len` (on a GPU, a small download).
    fn logits(&self, start: usize, len: usize) -> Result<Vec<f32>>;
}

/// A [`ReducedRow`] of a row on the host, reduced there.
pub struct HostRow {
    row: Vec<f32>,
    top: Vec<(u32, f32)>,
    sums: Option<Vec<f32>>,
}

impl HostRow {
    /// The `k` best of `row` and, with a spec, its weight sums.
    pub fn new(row: Vec<f32>, k: usize, spec: Option<WeightSpec>) -> Self {
        let top: Vec<(u32, f32)> =
            fp4moe_ops::reference::top_k_indices(&row, k).into_iter().map(|i| (i as u32, row[i])).collect();
        let max = top.first().map_or(f32::NEG_INFINITY, |t| t.1);
        let sums = spec.map(|s| fp4moe_ops::sampling::weight_sums(&row, max, s));
        Self { row, top, sums }
    }
}

impl HostRow {
    /// Rows downloaded by a forward, each cut to `vocab_limit` and reduced with its spec.
    pub fn reduce_all(
        rows: Vec<Vec<f32>>,
        k: usize,
        vocab_limit: usize,
        specs: &[Option<WeightSpec>],
    ) -> Vec<Box<dyn ReducedRow>> {
        rows.into_iter()
            .zip(specs)
            .map(|(mut row, spec)| {
                row.truncate(vocab_limit);
                Box::new(HostRow::new(row, k, *spec)) as Box<dyn ReducedRow>
            })
            .collect()
    }
}

impl ReducedRow for HostRow {
    fn width(&self) -> usize {
        self.row.len()
    }
    fn top(&self) -> &[(u32, f32)] {
        &self.top
    }
    fn weight_sums(&self) -> Option<&[f32]> {
        self.sums.as_deref()
    }
    fn logits(&self, start: usize, len: usize) -> Result<Vec<f32>> {
        self.row
            .get(start..start.saturating_add(len))
            .map(<[f32]>::to_vec)
            .ok_or_else(|| Error::Invalid(format!("logits {start}..+{len} of a row of {}", self.row.len())))
    }
}

/// The arguments of a reduced forward: a k and a limit above 0, one spec per sequence.
fn check_reduced(n: usize, k: usize, vocab_limit: usize, specs: &[Option<WeightSpec>]) -> Result<()> {
    if k == 0 || vocab_limit == 0 || specs.len() != n {
        return Err(Error::Invalid(format!(
            "forward_reduced: top {k} of {vocab_limit} logits, {} specs for {n} sequences",
            specs.len()
        )));
    }
    Ok(())
}

/// The `model_type`s this crate runs.
pub const SUPPORTED_MODEL_TYPES: &[&str] = &[qwen3_moe::MODEL_TYPE, glm4_moe_lite::MODEL_TYPE];

/// Loads the checkpoint in `dir` (its `config.json` picks the model) onto `backend`.
pub fn load<B: Backend + 'static>(
    backend: B,
    dir: &Path,
    opts: &LoadOptions,
) -> Result<Box<dyn LanguageModel>> {
    let mut source = layers::CheckpointSource::open(dir, *opts)?;
    let (config, path) = (source.config().clone(), source.config_path());
    build(backend, &config, &path, &mut source)
}

/// [`load`] with every FP4 weight (stored or quantized on load) expanded to dense f32: the
/// same values the quantized model computes with, so a run on [`fp4moe_ops::reference::RefBackend`]
/// is the reference that isolates kernel error from quantization error.
pub fn load_dequantized<B: Backend + 'static>(
    backend: B,
    dir: &Path,
    opts: &LoadOptions,
) -> Result<Box<dyn LanguageModel>> {
    let source = layers::CheckpointSource::open(dir, *opts)?;
    let (config, path) = (source.config().clone(), source.config_path());
    build(backend, &config, &path, &mut layers::Dequantized(source))
}

/// The model `config` names (its `model_type`), with weights from `src`.
fn build<B: Backend + 'static>(
    backend: B,
    config: &serde_json::Value,
    path: &Path,
    src: &mut dyn layers::WeightSource,
) -> Result<Box<dyn LanguageModel>> {
    match config.get("model_type").and_then(|v| v.as_str()).unwrap_or("") {
        qwen3_moe::MODEL_TYPE => {
            let cfg = qwen3_moe::Config::from_json(config, path)?;
            Ok(Box::new(qwen3_moe::Qwen3Moe::build(backend, cfg, src)?))
        }
        glm4_moe_lite::MODEL_TYPE => {
            let cfg = glm4_moe_lite::Config::from_json(config, path)?;
            Ok(Box::new(glm4_moe_lite::Glm4MoeLite::build(backend, cfg, src)?))
        }
        other => Err(Error::unknown_model_type(other, SUPPORTED_MODEL_TYPES)),
    }
}

/// A model of the real architecture `arch` with random FP4 weights (see [`synthetic`]).
/// `layers` overrides the number of decoder layers (all of them by default).
pub fn synthetic<B: Backend + 'static>(
    backend: B,
    arch: Arch,
    layers: Option<usize>,
    format: fp4::Format,
    seed: u64,
) -> Result<Box<dyn LanguageModel>> {
    synthetic::build(backend, arch, layers, format, seed)
}
