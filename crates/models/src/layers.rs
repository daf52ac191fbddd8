//! Pieces both models share: where weights come from ([`WeightSource`]), config helpers, RMSNorm,
//! dense SwiGLU, routed experts, and the batch plumbing of a forward pass (which rows belong to
//! which sequence, logits of the requested rows only).

use crate::loader::{Checkpoint, LoadOptions, QuantPolicy, Quantization};
use crate::{Error, Result, Sequence};
use fp4moe_ops::{Backend, DType, HostTensor, HostWeight, LinearPath, MoePath, MoeWeights, T};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Where a model's host weights come from: a checkpoint (through the loader) or random synthetic
/// ones. Models ask for each weight by its HF name and shape; the source validates and rewrites.
pub(crate) trait WeightSource {
    /// An attention or MLP/expert projection `[rows, cols]` by module name (no `.weight`).
    /// Quantized when the checkpoint is, or when the load options ask for it.
    fn projection(&mut self, module: &str, shape: [usize; 2]) -> Result<HostWeight>;
    /// A matrix that stays 16/32-bit (embeddings, lm_head, routers) by module name.
    fn dense(&mut self, module: &str, shape: [usize; 2]) -> Result<HostWeight>;
    /// A vector (norm weights, router bias) by full tensor name, as f32.
    fn vector(&mut self, name: &str, len: usize) -> Result<Vec<f32>>;
    /// Routed experts of the MoE block `prefix` (e.g. `model.layers.3.mlp`), stored as
    /// `{prefix}.experts.{e}.{gate,up,down}_proj` or already stacked, stacked and fused:
    /// gate_up `[E * 2I, H]` (per expert I gate rows then I up rows), down `[E * H, I]`.
    fn experts(
        &mut self,
        prefix: &str,
        n_experts: usize,
        inter: usize,
        hidden: usize,
    ) -> Result<(HostWeight, HostWeight)>;
    /// How the weights are held, for [`crate::ModelInfo::quantization`].
    fn quantization(&self) -> String;
}

/// Rows of several host weights stacked in order (a dense MLP's gate and up projections fused
/// into one `[2I, H]` matrix, so one GEMM feeds `silu_mul`).
pub(crate) fn stack_rows(name: &str, parts: &[HostWeight]) -> Result<HostWeight> {
    let cols = parts.first().map(|p| p.shape()[1]).unwrap_or(0);
    if let Some(p) = parts.iter().find(|p| p.shape()[1] != cols) {
        return Err(Error::Invalid(format!(
            "{name}: cannot stack matrices of {cols} and {} columns",
            p.shape()[1]
        )));
    }
    match parts {
        [] => Err(Error::Invalid(format!("{name}: nothing to stack"))),
        [HostWeight::Quant(_), ..] => {
            let qs: Vec<&fp4::QuantMatrix> = parts
                .iter()
                .map(|p| match p {
                    HostWeight::Quant(q) => Ok(q),
                    HostWeight::Dense { .. } => {
                        Err(Error::Invalid(format!("{name}: cannot stack quantized and dense parts")))
                    }
                })
                .collect::<Result<_>>()?;
            fp4::QuantMatrix::concat_rows(&qs).map(HostWeight::Quant).map_err(|e| Error::fp4(name, e))
        }
        [HostWeight::Dense { dtype, .. }, ..] => {
            let mut bytes = Vec::new();
            let mut rows = 0;
            for p in parts {
                match p {
                    HostWeight::Dense { rows: r, dtype: d, bytes: b, .. } if d == dtype => {
                        bytes.extend_from_slice(b);
                        rows += r;
                    }
                    _ => return Err(Error::Invalid(format!("{name}: parts differ in dtype or format"))),
                }
            }
            Ok(HostWeight::Dense { rows, cols, dtype: *dtype, bytes: bytes.into() })
        }
    }
}

// ---- config helpers ------------------------------------------------------------------------

/// Parses `config.json` into a model's raw serde struct; a missing key or a value of the wrong
/// type becomes an error naming the file and what serde could not read.
pub(crate) fn parse_config<C: serde::de::DeserializeOwned>(v: &serde_json::Value, path: &Path) -> Result<C> {
    C::deserialize(v).map_err(|e| Error::Config { path: path.to_path_buf(), reason: e.to_string() })
}

/// The first of `keys` that is present (the published checkpoint and current transformers
/// spell some keys differently); an error naming all of them when none is.
pub(crate) fn either<T: Copy>(path: &Path, keys: &[&str], values: &[Option<T>]) -> Result<T> {
    values
        .iter()
        .flatten()
        .copied()
        .next()
        .ok_or_else(|| Error::MissingConfigKey { path: path.to_path_buf(), key: keys.join("` or `") })
}

/// `rope_parameters` of current transformers (`{rope_theta, rope_type, ...}`).
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct RopeParameters {
    pub rope_theta: Option<f64>,
    pub rope_type: Option<String>,
}

/// RoPE base from a top-level `rope_theta` (published checkpoints) or `rope_parameters`
/// (current transformers). Only the default RoPE is implemented: scaled variants (YaRN, ...)
/// change frequencies and the attention scale, so they are refused rather than run wrong.
pub(crate) fn rope_theta(
    path: &Path,
    rope_theta: Option<f64>,
    params: Option<&RopeParameters>,
    legacy_scaling: Option<&serde_json::Value>,
) -> Result<f32> {
    let kind = params.and_then(|p| p.rope_type.clone()).or_else(|| {
        legacy_scaling
            .filter(|v| !v.is_null())
            .map(|v| v.get("rope_type").or(v.get("type")).and_then(|t| t.as_str()).unwrap_or("?").to_string())
    });
    if let Some(kind) = kind.filter(|k| k != "default") {
        return Err(Error::Unsupported {
            what: format!("config {}: rope type `{kind}`", path.display()),
            reason: "only the default RoPE is implemented".into(),
        });
    }
    let theta = either(
        path,
        &["rope_theta", "rope_parameters.rope_theta"],
        &[rope_theta, params.and_then(|p| p.rope_theta)],
    )?;
    Ok(theta as f32)
}

/// `eos_token_id` as one id or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(crate) enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

impl OneOrMany {
    pub fn ids(v: Option<&OneOrMany>) -> Vec<u32> {
        match v {
            None => Vec::new(),
            Some(OneOrMany::One(id)) => vec![*id],
            Some(OneOrMany::Many(ids)) => ids.clone(),
        }
    }
}

/// Refuses activations other than SiLU (both models' SwiGLU; the ops implement only that).
pub(crate) fn check_silu(path: &Path, hidden_act: &str) -> Result<()> {
    if hidden_act == "silu" {
        Ok(())
    } else {
        Err(Error::Unsupported {
            what: format!("config {}: hidden_act `{hidden_act}`", path.display()),
            reason: "only silu is implemented".into(),
        })
    }
}

// ---- layers --------------------------------------------------------------------------------

pub(crate) fn upload_f32<B: Backend>(b: &B, data: &[f32], shape: &[usize]) -> Result<T<B>> {
    Ok(b.upload(HostTensor::F32(data, shape))?)
}

/// RMSNorm over the last dim with its weight and eps.
pub(crate) struct Norm<B: Backend> {
    weight: T<B>, // [D] f32
    eps: f32,
}

impl<B: Backend> Norm<B> {
    pub fn load(b: &B, src: &mut dyn WeightSource, name: &str, dim: usize, eps: f32) -> Result<Self> {
        let w = src.vector(name, dim)?;
        Ok(Norm { weight: upload_f32(b, &w, &[dim])?, eps })
    }
    pub fn forward(&self, b: &B, x: &T<B>) -> Result<T<B>> {
        Ok(b.rms_norm(x, &self.weight, self.eps)?)
    }
}

/// Dense SwiGLU MLP: `down · (silu(gate · x) * (up · x))`, gate and up fused at load.
pub(crate) struct Mlp<B: Backend> {
    gate_up: B::Weight, // [2I, H]: I gate rows then I up rows
    down: B::Weight,    // [H, I]
}

impl<B: Backend> Mlp<B> {
    /// `{prefix}.gate_proj`, `{prefix}.up_proj`, `{prefix}.down_proj`.
    pub fn load(
        b: &B,
        src: &mut dyn WeightSource,
        prefix: &str,
        inter: usize,
        hidden: usize,
    ) -> Result<Self> {
        let gate = src.projection(&format!("{prefix}.gate_proj"), [inter, hidden])?;
        let up = src.projection(&format!("{prefix}.up_proj"), [inter, hidden])?;
        let gate_up = stack_rows(&format!("{prefix}.gate_proj+up_proj"), &[gate, up])?;
        let down = src.projection(&format!("{prefix}.down_proj"), [hidden, inter])?;
        Ok(Mlp { gate_up: b.upload_weight(&gate_up)?, down: b.upload_weight(&down)? })
    }
    pub fn forward(&self, b: &B, x: &T<B>) -> Result<T<B>> {
        let gu = b.linear(x, &self.gate_up, LinearPath::Auto)?;
        let h = b.silu_mul(&gu)?;
        Ok(b.linear(&h, &self.down, LinearPath::Auto)?)
    }
}

/// Routed experts (stacked) and the optional shared expert, run by the `moe` op.
pub(crate) struct Experts<B: Backend> {
    gate_up: B::Weight, // [E * 2I, H]
    down: B::Weight,    // [E * H, I]
    n_experts: usize,
    shared: Option<Mlp<B>>, // gate_up [2S, H], down [H, S]
}

impl<B: Backend> Experts<B> {
    pub fn load(
        b: &B,
        src: &mut dyn WeightSource,
        prefix: &str,
        n_experts: usize,
        inter: usize,
        hidden: usize,
        shared: Option<Mlp<B>>,
    ) -> Result<Self> {
        let (gate_up, down) = src.experts(prefix, n_experts, inter, hidden)?;
        let want = [[n_experts * 2 * inter, hidden], [n_experts * hidden, inter]];
        if [gate_up.shape(), down.shape()] != want {
            return Err(Error::Invalid(format!(
                "{prefix}.experts: stacked shapes {:?} and {:?}, expected {want:?}",
                gate_up.shape(),
                down.shape()
            )));
        }
        Ok(Experts { gate_up: b.upload_weight(&gate_up)?, down: b.upload_weight(&down)?, n_experts, shared })
    }
    /// x `[n, H]`, ids u32 `[n, k]`, weights f32 `[n, k]` -> `[n, H]`.
    pub fn forward(&self, b: &B, x: &T<B>, ids: &T<B>, weights: &T<B>) -> Result<T<B>> {
        let experts = MoeWeights {
            gate_up: &self.gate_up,
            down: &self.down,
            n_experts: self.n_experts,
            shared: self.shared.as_ref().map(|m| (&m.gate_up, &m.down)),
        };
        Ok(b.moe(x, ids, weights, experts, MoePath::Auto)?)
    }
}

// ---- batch plumbing ------------------------------------------------------------------------

/// The rows of one sequence within a batched forward.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Span {
    /// First row of this sequence's tokens in the batch.
    pub row0: usize,
    pub len: usize,
    /// Position of its first new token (tokens already in its cache).
    pub pos0: usize,
}

/// Host-side plan of one batched forward: every token id and position, and each sequence's rows.
pub(crate) struct BatchPlan {
    pub spans: Vec<Span>,
    pub ids: Vec<u32>,
    pub positions: Vec<u32>,
}

impl BatchPlan {
    /// Validates the batch before anything is enqueued: token ids below `vocab` (checked on the
    /// host, because the embedding op must not read out of bounds), no empty token list, and
    /// room in each sequence's cache.
    pub fn new(batch: &[(&mut Sequence, &[u32])], vocab: usize) -> Result<BatchPlan> {
        let mut plan = BatchPlan { spans: Vec::new(), ids: Vec::new(), positions: Vec::new() };
        for (seq, tokens) in batch {
            if tokens.is_empty() {
                return Err(Error::Invalid("forward: a sequence in the batch has no tokens".into()));
            }
            if let Some((i, &id)) = tokens.iter().enumerate().find(|(_, id)| **id as usize >= vocab) {
                return Err(Error::TokenOutOfRange { id, position: seq.len + i, vocab });
            }
            let end = seq.len + tokens.len();
            if end > seq.capacity {
                return Err(Error::ContextOverflow { len: end, max: seq.capacity });
            }
            plan.spans.push(Span { row0: plan.ids.len(), len: tokens.len(), pos0: seq.len });
            plan.ids.extend_from_slice(tokens);
            plan.positions.extend((seq.len..end).map(|p| p as u32));
        }
        Ok(plan)
    }

    pub fn rows(&self) -> usize {
        self.ids.len()
    }

    /// Sequence `i`'s rows of a batch-wide tensor (no copy for a batch of one).
    pub fn rows_of<B: Backend>(&self, b: &B, x: &T<B>, i: usize) -> Result<T<B>> {
        let s = self.spans[i];
        if self.spans.len() == 1 { Ok(x.clone()) } else { Ok(b.slice_rows(x, s.row0, s.len)?) }
    }

    /// Per-sequence results stacked back into batch rows.
    pub fn stack<B: Backend>(&self, b: &B, mut parts: Vec<T<B>>) -> Result<T<B>> {
        if parts.len() == 1 {
            return Ok(parts.pop().expect("one part"));
        }
        let refs: Vec<&T<B>> = parts.iter().collect();
        Ok(b.concat_rows(&refs)?)
    }

    /// Final norm and lm_head on only the rows whose logits are wanted (all rows, or each
    /// sequence's last), downloaded and split per sequence.
    pub fn logits<B: Backend>(
        &self,
        b: &B,
        x: &T<B>,
        all_logits: bool,
        norm: &Norm<B>,
        lm_head: &B::Weight,
        vocab: usize,
    ) -> Result<Vec<Vec<f32>>> {
        let rows = if all_logits {
            x.clone()
        } else {
            let last = self
                .spans
                .iter()
                .map(|s| Ok(b.slice_rows(x, s.row0 + s.len - 1, 1)?))
                .collect::<Result<Vec<_>>>()?;
            self.stack(b, last)?
        };
        let h = norm.forward(b, &rows)?;
        let logits = b.download(&b.linear(&h, lm_head, LinearPath::Auto)?)?.into_f32()?;
        Ok(self
            .spans
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let (r0, n) = if all_logits { (s.row0, s.len) } else { (i, 1) };
                logits[r0 * vocab..(r0 + n) * vocab].to_vec()
            })
            .collect())
    }
}

/// The model-specific state inside a [`Sequence`], or an error if the sequence was made by a
/// different model.
pub(crate) fn state_of<'a, S: 'static>(seq: &'a Sequence, model: &str) -> Result<&'a S> {
    seq.state
        .downcast_ref::<S>()
        .ok_or_else(|| Error::Invalid(format!("forward: sequence was not created by this {model} model")))
}

/// Checks a requested cache capacity against the model's context length.
pub(crate) fn check_capacity(capacity: usize, max_positions: usize) -> Result<()> {
    if capacity == 0 {
        return Err(Error::Invalid("new_sequence: capacity must be at least 1".into()));
    }
    if capacity > max_positions {
        return Err(Error::ContextOverflow { len: capacity, max: max_positions });
    }
    Ok(())
}

/// A zero-filled f32 cache tensor.
pub(crate) fn zeros<B: Backend>(b: &B, shape: &[usize]) -> Result<T<B>> {
    Ok(b.zeros(shape, DType::F32)?)
}

// ---- checkpoints ---------------------------------------------------------------------------

/// A checkpoint directory as a [`WeightSource`]: the loader reads and validates, the load
/// options decide what is quantized.
pub(crate) struct CheckpointSource {
    ckpt: Checkpoint,
    opts: LoadOptions,
}

impl CheckpointSource {
    pub fn open(dir: &Path, opts: LoadOptions) -> Result<Self> {
        Ok(CheckpointSource { ckpt: Checkpoint::open(dir)?, opts })
    }
    pub fn config(&self) -> &serde_json::Value {
        self.ckpt.config()
    }
    pub fn config_path(&self) -> PathBuf {
        self.ckpt.config_path()
    }
    fn weight(&self, module: &str, shape: [usize; 2]) -> Result<HostWeight> {
        self.ckpt.linear(module, shape, self.policy(module, &[shape[1]]))
    }

    /// The loader's policy, except that a matrix whose rows do not split into whole blocks
    /// stays as stored: the formats cannot hold it, and every matrix of the real models fits,
    /// so this only spares small test models (an MLA `q_lora_rank` of 48, say) an error.
    fn policy(&self, module: &str, cols: &[usize]) -> QuantPolicy {
        match self.ckpt.policy_for(&self.opts, module) {
            QuantPolicy::Quantize(f) if cols.iter().any(|c| !c.is_multiple_of(f.block())) => {
                tracing::warn!(
                    "{module}: {cols:?} columns are not whole {} blocks; kept as stored",
                    f.name()
                );
                QuantPolicy::Keep
            }
            p => p,
        }
    }
}

/// A source whose FP4 weights are handed on dequantized to dense f32: the exact values the
/// quantized model computes with, for reference runs that measure kernel error alone.
pub(crate) struct Dequantized<S>(pub S);

fn dequantize(w: HostWeight) -> HostWeight {
    match &w {
        HostWeight::Quant(q) => HostWeight::from_f32(q.rows, q.cols, &q.dequantize()),
        HostWeight::Dense { .. } => w,
    }
}

impl<S: WeightSource> WeightSource for Dequantized<S> {
    fn projection(&mut self, module: &str, shape: [usize; 2]) -> Result<HostWeight> {
        self.0.projection(module, shape).map(dequantize)
    }
    fn dense(&mut self, module: &str, shape: [usize; 2]) -> Result<HostWeight> {
        self.0.dense(module, shape).map(dequantize)
    }
    fn vector(&mut self, name: &str, len: usize) -> Result<Vec<f32>> {
        self.0.vector(name, len)
    }
    fn experts(
        &mut self,
        prefix: &str,
        n_experts: usize,
        inter: usize,
        hidden: usize,
    ) -> Result<(HostWeight, HostWeight)> {
        let (gu, down) = self.0.experts(prefix, n_experts, inter, hidden)?;
        Ok((dequantize(gu), dequantize(down)))
    }
    fn quantization(&self) -> String {
        format!("f32 (dequantized from {})", self.0.quantization())
    }
}

impl WeightSource for CheckpointSource {
    fn projection(&mut self, module: &str, shape: [usize; 2]) -> Result<HostWeight> {
        self.weight(module, shape)
    }
    fn dense(&mut self, module: &str, shape: [usize; 2]) -> Result<HostWeight> {
        self.weight(module, shape)
    }
    fn vector(&mut self, name: &str, len: usize) -> Result<Vec<f32>> {
        self.ckpt.vector_f32(name, len)
    }
    fn experts(
        &mut self,
        prefix: &str,
        n_experts: usize,
        inter: usize,
        hidden: usize,
    ) -> Result<(HostWeight, HostWeight)> {
        let policy = self.policy(&format!("{prefix}.experts"), &[hidden, inter]);
        self.ckpt.experts(prefix, n_experts, [inter, hidden], policy)
    }
    fn quantization(&self) -> String {
        let stored = match self.ckpt.quantization() {
            Quantization::None => self
                .ckpt
                .info("model.embed_tokens.weight")
                .map(|t| format!("{:?}", t.dtype).to_lowercase())
                .unwrap_or_else(|_| "dense".into()),
            q => q.describe(),
        };
        match (self.ckpt.quantization(), self.opts.quant) {
            (Quantization::None, Some(f)) => format!("{} (quantized on load from {stored})", f.name()),
            _ => stored,
        }
    }
}
