//! Pieces both models share: where weights come from ([`WeightSource`]), config helpers, RMSNorm,
//! dense SwiGLU, routed experts. The batch plumbing of a forward pass is in `batch`.

use crate::loader::{Checkpoint, LoadOptions, QuantPolicy, Quantization};
use crate::{Error, Result};
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
    /// (weight, eps), for ops that fuse the norm into something else.
    pub fn parts(&self) -> (&T<B>, f32) {
        (&self.weight, self.eps)
    }
    /// `(x + a, forward(x + a))` as one op (`Backend::add_rms_norm`): a layer's residual add and
    /// the norm that reads the sum.
    pub fn add_forward(&self, b: &B, x: &T<B>, a: &T<B>) -> Result<(T<B>, T<B>)> {
        Ok(b.add_rms_norm(x, a, &self.weight, self.eps)?)
    }
    /// `(x + a, norm(x + a))` with `norm` given, else `(x + a, None)`: an FFN's residual add.
    pub fn add_then(b: &B, x: &T<B>, a: &T<B>, norm: Option<&Self>) -> Result<(T<B>, Option<T<B>>)> {
        match norm {
            Some(n) => n.add_forward(b, x, a).map(|(s, y)| (s, Some(y))),
            None => Ok((b.add(x, a)?, None)),
        }
    }
    /// This norm over heads x `[n, H, D]` as an input of `Backend::norm_ropes` (`rope(forward(x))`).
    pub fn rope_input<'a>(&'a self, x: &'a T<B>) -> (&'a T<B>, &'a T<B>, f32) {
        (x, &self.weight, self.eps)
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
    /// bf16 x (a bf16-activation prefill) rounds the intermediate to bf16 too, as the `moe` op
    /// does for its experts.
    pub fn forward(&self, b: &B, x: &T<B>) -> Result<T<B>> {
        let gu = b.linear(x, &self.gate_up, LinearPath::Auto)?;
        let mut h = b.silu_mul(&gu)?;
        if x.dtype() == DType::BF16 {
            h = b.cast(&h, DType::BF16)?;
        }
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
    /// The experts of h `[n, H]` (ids u32 `[n, k]`, weights f32 `[n, k]`) added to the residual
    /// x `[n, H]`, and that sum normed by `norm` when given (`Backend::moe_add_rms_norm`).
    pub fn forward_add(
        &self,
        b: &B,
        h: &T<B>,
        ids: &T<B>,
        weights: &T<B>,
        x: &T<B>,
        norm: Option<&Norm<B>>,
    ) -> Result<(T<B>, Option<T<B>>)> {
        let experts = MoeWeights {
            gate_up: &self.gate_up,
            down: &self.down,
            n_experts: self.n_experts,
            shared: self.shared.as_ref().map(|m| (&m.gate_up, &m.down)),
        };
        match norm {
            Some(n) => {
                let (w, eps) = n.parts();
                let (s, y) = b.moe_add_rms_norm(h, ids, weights, experts, MoePath::Auto, x, w, eps)?;
                Ok((s, Some(y)))
            }
            None => Ok((b.add(x, &b.moe(h, ids, weights, experts, MoePath::Auto)?)?, None)),
        }
    }
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
