//! Qwen3-MoE (HF `model_type` `qwen3_moe`, e.g. Qwen3-30B-A3B).
//!
//! Per layer: `x += o_proj(attention(rope(q_norm(q)), rope(k_norm(k)), v))` with GQA, then
//! `x += moe(rms_norm(x))` with a softmax top-k router (renormalised when `norm_topk_prob`), or
//! a dense SwiGLU MLP for layers listed in `mlp_only_layers` / off the `decoder_sparse_step`.
//! q_norm/k_norm are RMSNorms over `head_dim`, per head, applied before NeoX (rotate-half) RoPE.
//! The KV cache holds per layer k and v as `[capacity, kv_heads, head_dim]`.

use crate::batch::{self, BatchPlan, DecodeGraph, Stack, StackWeights};
use crate::layers::{
    Experts, Mlp, Norm, OneOrMany, RopeParameters, WeightSource, check_capacity, check_silu, either,
    parse_config, zeros,
};
use crate::{Error, LanguageModel, ModelInfo, PrefillActivations, ReducedRow, Result, Sequence};
use fp4moe_ops::sampling::WeightSpec;
use fp4moe_ops::{Backend, LinearPath, Rope, RopeStyle, T};
use serde::Deserialize;
use std::path::Path;

pub const MODEL_TYPE: &str = "qwen3_moe";

/// The `config.json` keys this model reads, as spelled by the published checkpoints or by
/// current transformers.
#[derive(Debug, Deserialize)]
struct RawConfig {
    vocab_size: usize,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: usize,
    /// transformers falls back to `hidden_size / num_attention_heads`.
    head_dim: Option<usize>,
    max_position_embeddings: usize,
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_parameters: Option<RopeParameters>,
    rope_scaling: Option<serde_json::Value>,
    num_experts: Option<usize>,
    num_local_experts: Option<usize>,
    num_experts_per_tok: usize,
    moe_intermediate_size: usize,
    norm_topk_prob: bool,
    /// Only read when some layer is dense.
    intermediate_size: Option<usize>,
    decoder_sparse_step: Option<usize>,
    mlp_only_layers: Option<Vec<usize>>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    use_sliding_window: Option<bool>,
    hidden_act: String,
    eos_token_id: Option<OneOrMany>,
    bos_token_id: Option<u32>,
}

/// Resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub num_experts: usize,
    pub top_k: usize,
    pub moe_intermediate_size: usize,
    pub norm_topk_prob: bool,
    /// Dense MLP width (layers that are not MoE).
    pub intermediate_size: Option<usize>,
    /// Per layer: MoE (true) or dense MLP.
    pub sparse: Vec<bool>,
    pub tie_word_embeddings: bool,
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
}

impl Config {
    /// Reads `config.json` (already parsed); `path` is for messages.
    pub fn from_json(v: &serde_json::Value, path: &Path) -> Result<Config> {
        let r: RawConfig = parse_config(v, path)?;
        check_silu(path, &r.hidden_act)?;
        let unsupported = |what: &str| Error::Unsupported {
            what: format!("config {}: {what}", path.display()),
            reason: format!("not used by {MODEL_TYPE} checkpoints this engine supports"),
        };
        if r.attention_bias == Some(true) {
            return Err(unsupported("attention_bias = true"));
        }
        if r.use_sliding_window == Some(true) {
            return Err(unsupported("use_sliding_window = true"));
        }
        let num_experts =
            either(path, &["num_experts", "num_local_experts"], &[r.num_experts, r.num_local_experts])?;
        let step = r.decoder_sparse_step.unwrap_or(1).max(1);
        let mlp_only = r.mlp_only_layers.unwrap_or_default();
        let sparse: Vec<bool> = (0..r.num_hidden_layers)
            .map(|l| !mlp_only.contains(&l) && num_experts > 0 && (l + 1) % step == 0)
            .collect();
        if sparse.iter().any(|s| !s) && r.intermediate_size.is_none() {
            return Err(Error::MissingConfigKey {
                path: path.to_path_buf(),
                key: "intermediate_size".into(),
            });
        }
        let head_dim = r.head_dim.unwrap_or(r.hidden_size / r.num_attention_heads.max(1));
        let bad = |what: String| Err(Error::Config { path: path.to_path_buf(), reason: what });
        if r.num_attention_heads == 0
            || r.num_key_value_heads == 0
            || !r.num_attention_heads.is_multiple_of(r.num_key_value_heads)
        {
            return bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                r.num_attention_heads, r.num_key_value_heads
            ));
        }
        if !head_dim.is_multiple_of(2) {
            return bad(format!("head_dim {head_dim} must be even for RoPE"));
        }
        if r.num_experts_per_tok == 0 || r.num_experts_per_tok > num_experts.max(1) {
            return bad(format!("num_experts_per_tok {} with {num_experts} experts", r.num_experts_per_tok));
        }
        Ok(Config {
            vocab_size: r.vocab_size,
            hidden_size: r.hidden_size,
            num_layers: r.num_hidden_layers,
            num_heads: r.num_attention_heads,
            num_kv_heads: r.num_key_value_heads,
            head_dim,
            max_position_embeddings: r.max_position_embeddings,
            rms_norm_eps: r.rms_norm_eps as f32,
            rope_theta: crate::layers::rope_theta(
                path,
                r.rope_theta,
                r.rope_parameters.as_ref(),
                r.rope_scaling.as_ref(),
            )?,
            num_experts,
            top_k: r.num_experts_per_tok,
            moe_intermediate_size: r.moe_intermediate_size,
            norm_topk_prob: r.norm_topk_prob,
            intermediate_size: r.intermediate_size,
            sparse,
            tie_word_embeddings: r.tie_word_embeddings.unwrap_or(false),
            eos_token_ids: OneOrMany::ids(r.eos_token_id.as_ref()),
            bos_token_id: r.bos_token_id,
        })
    }

    fn rope(&self) -> Rope {
        Rope { style: RopeStyle::NeoX, offset: 0, dims: self.head_dim, theta: self.rope_theta }
    }

    /// f32 values per token per layer in the cache: k and v of every kv head.
    pub fn cache_values_per_token(&self) -> usize {
        2 * self.num_kv_heads * self.head_dim
    }
}

pub(crate) struct Attention<B: Backend> {
    q_proj: B::Weight, // [Hq * D, H]
    k_proj: B::Weight, // [Hkv * D, H]
    v_proj: B::Weight, // [Hkv * D, H]
    o_proj: B::Weight, // [H, Hq * D]
    q_norm: Norm<B>,   // [D]
    k_norm: Norm<B>,   // [D]
}

pub(crate) enum Ffn<B: Backend> {
    Dense(Mlp<B>),
    Moe {
        router: B::Weight, // [E, H] 16-bit, never quantized (selection is sensitive to it)
        experts: Experts<B>,
    },
}

/// A loaded Qwen3-MoE.
pub struct Qwen3Moe<B: Backend> {
    backend: B,
    cfg: Config,
    info: ModelInfo,
    w: StackWeights<B, Attention<B>, Ffn<B>>,
    prefill: PrefillActivations,
}

/// Per-sequence KV cache.
pub(crate) struct State<B: Backend> {
    k: Vec<T<B>>, // per layer [capacity, Hkv, D]
    v: Vec<T<B>>, // per layer [capacity, Hkv, D]
    graph: DecodeGraph<B>,
}

impl<B: Backend> Qwen3Moe<B> {
    /// Builds the model from `src` (a checkpoint or the synthetic generator), uploading each
    /// weight as it is read so host copies do not pile up.
    pub(crate) fn build(backend: B, cfg: Config, src: &mut dyn WeightSource) -> Result<Self> {
        let b = &backend;
        let (h, d, eps) = (cfg.hidden_size, cfg.head_dim, cfg.rms_norm_eps);
        let dims = batch::stack_dims!(cfg);
        let (w, info) = StackWeights::load(b, src, &dims, |src, l| {
            let p = format!("model.layers.{l}");
            let a = format!("{p}.self_attn");
            let attn = Attention {
                q_proj: b.upload_weight(&src.projection(&format!("{a}.q_proj"), [cfg.num_heads * d, h])?)?,
                k_proj: b
                    .upload_weight(&src.projection(&format!("{a}.k_proj"), [cfg.num_kv_heads * d, h])?)?,
                v_proj: b
                    .upload_weight(&src.projection(&format!("{a}.v_proj"), [cfg.num_kv_heads * d, h])?)?,
                o_proj: b.upload_weight(&src.projection(&format!("{a}.o_proj"), [h, cfg.num_heads * d])?)?,
                q_norm: Norm::load(b, src, &format!("{a}.q_norm.weight"), d, eps)?,
                k_norm: Norm::load(b, src, &format!("{a}.k_norm.weight"), d, eps)?,
            };
            let ffn = if cfg.sparse[l] {
                Ffn::Moe {
                    router: b.upload_weight(&src.dense(&format!("{p}.mlp.gate"), [cfg.num_experts, h])?)?,
                    experts: Experts::load(
                        b,
                        src,
                        &format!("{p}.mlp"),
                        cfg.num_experts,
                        cfg.moe_intermediate_size,
                        h,
                        None,
                    )?,
                }
            } else {
                let inter = cfg.intermediate_size.expect("checked in Config::from_json");
                Ffn::Dense(Mlp::load(b, src, &format!("{p}.mlp"), inter, h)?)
            };
            Ok((attn, ffn))
        })?;
        Ok(Qwen3Moe { backend, cfg, info, w, prefill: PrefillActivations::F32 })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }
}

impl<B: Backend + 'static> Stack<B> for Qwen3Moe<B> {
    type State = State<B>;
    type Attn = Attention<B>;
    type Ffn = Ffn<B>;
    const MODEL_TYPE: &'static str = MODEL_TYPE;

    fn backend(&self) -> &B {
        &self.backend
    }

    fn vocab(&self) -> usize {
        self.cfg.vocab_size
    }

    fn decode_graph(state: &State<B>) -> &DecodeGraph<B> {
        &state.graph
    }

    fn weights(&self) -> &StackWeights<B, Attention<B>, Ffn<B>> {
        &self.w
    }

    fn prefill_activations(&self) -> PrefillActivations {
        self.prefill
    }

    /// Attention of every sequence in the batch: projections on all rows at once, cache writes
    /// and attention per sequence. h `[N, H]` -> `[N, H]`.
    fn attention(
        &self,
        l: usize,
        at: &Attention<B>,
        h: &T<B>,
        positions: &T<B>,
        plan: &BatchPlan,
        states: &[&State<B>],
    ) -> Result<T<B>> {
        let b = &self.backend;
        let c = &self.cfg;
        let (n, d, hq, hkv) = (plan.rows(), c.head_dim, c.num_heads, c.num_kv_heads);
        let [q, k, v]: [T<B>; 3] = b
            .linears(&plan.input(b, h)?, &[&at.q_proj, &at.k_proj, &at.v_proj], LinearPath::Auto)?
            .try_into()
            .map_err(|_| Error::Invalid("linears: not three outputs for three weights".into()))?;
        let (q, k) = (q.reshape(&[n, hq, d])?, k.reshape(&[n, hkv, d])?);
        let (qn, kn) = (at.q_norm.rope_input(&q), at.k_norm.rope_input(&k));
        let caches = |i: usize| -> Result<(T<B>, T<B>)> {
            let (kc, vc) = (&states[i].k[l], &states[i].v[l]);
            let cap = kc.shape()[0];
            Ok((kc.reshape(&[cap, hkv * d])?, vc.reshape(&[cap, hkv * d])?))
        };
        // One sequence: the caches are written by the norm's own op. Several: each sequence's
        // rows to its own caches.
        let q = if let [span] = &plan.spans[..] {
            let (k2, v2) = caches(0)?;
            b.norm_ropes_to_cache(qn, kn, &v, positions, c.rope(), (&k2, &v2), span.pos0)?
        } else {
            let [q, k]: [T<B>; 2] = b
                .norm_ropes(&[qn, kn], positions, c.rope())?
                .try_into()
                .map_err(|_| Error::Invalid("norm_ropes: not two outputs for two inputs".into()))?;
            let k = k.reshape(&[n, hkv * d])?;
            for (i, span) in plan.spans.iter().enumerate() {
                let (k2, v2) = caches(i)?;
                let (kr, vr) = (plan.rows_of(b, &k, i)?, plan.rows_of(b, &v, i)?);
                b.write_rows_many(&[(&k2, &kr, span.pos0, 0), (&v2, &vr, span.pos0, 0)])?;
            }
            q
        };
        let scale = 1.0 / (d as f32).sqrt();
        let mut outs = Vec::with_capacity(plan.spans.len());
        for (i, span) in plan.spans.iter().enumerate() {
            let (kc, vc) = (&states[i].k[l], &states[i].v[l]);
            let q = plan.rows_of(b, &q, i)?;
            // A bf16-activation prefill lets the products read bf16 (Backend::attention_gqa_bf16).
            outs.push(if plan.bf16_inputs {
                b.attention_gqa_bf16(&q, kc, vc, span.pos0, scale)?
            } else {
                b.attention_gqa(&q, kc, vc, span.pos0, scale)?
            });
        }
        let o = plan.stack(b, outs)?.reshape(&[n, hq * d])?;
        Ok(b.linear(&plan.input(b, &o)?, &at.o_proj, LinearPath::Auto)?)
    }

    fn ffn_add(
        &self,
        ffn: &Ffn<B>,
        plan: &BatchPlan,
        h: &T<B>,
        x: &T<B>,
        next: Option<&Norm<B>>,
    ) -> Result<(T<B>, Option<T<B>>)> {
        let b = &self.backend;
        match ffn {
            Ffn::Dense(mlp) => Norm::add_then(b, x, &mlp.forward(b, &plan.input(b, h)?)?, next),
            Ffn::Moe { router, experts } => {
                let logits = b.linear(h, router, LinearPath::Auto)?;
                let (ids, w) = b.route_softmax(&logits, self.cfg.top_k, self.cfg.norm_topk_prob)?;
                experts.forward_add(b, &plan.input(b, h)?, &ids, &w, x, next)
            }
        }
    }
}

impl<B: Backend + 'static> LanguageModel for Qwen3Moe<B> {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn set_prefill_activations(&mut self, a: PrefillActivations) -> Result<()> {
        self.prefill = a;
        Ok(())
    }

    fn new_sequence(&self, capacity: usize) -> Result<Sequence> {
        check_capacity(capacity, self.cfg.max_position_embeddings)?;
        let shape = [capacity, self.cfg.num_kv_heads, self.cfg.head_dim];
        let b = &self.backend;
        let mut st = State::<B> { k: Vec::new(), v: Vec::new(), graph: DecodeGraph::default() };
        for _ in 0..self.cfg.num_layers {
            st.k.push(zeros(b, &shape)?);
            st.v.push(zeros(b, &shape)?);
        }
        Ok(Sequence { state: Box::new(st), len: 0, capacity })
    }

    fn forward(&self, batch: &mut [(&mut Sequence, &[u32])], all_logits: bool) -> Result<Vec<Vec<f32>>> {
        batch::forward(self, batch, all_logits)
    }

    fn forward_top_k(
        &self,
        batch: &mut [(&mut Sequence, &[u32])],
        k: usize,
        vocab_limit: usize,
    ) -> Result<Vec<Vec<(u32, f32)>>> {
        batch::forward_top_k(self, batch, k, vocab_limit)
    }

    fn forward_reduced(
        &self,
        batch: &mut [(&mut Sequence, &[u32])],
        k: usize,
        vocab_limit: usize,
        specs: &[Option<WeightSpec>],
    ) -> Result<Vec<Box<dyn ReducedRow + '_>>> {
        batch::forward_reduced(self, batch, k, vocab_limit, specs)
    }

    fn reduces_weights_on_device(&self) -> bool {
        self.backend().device_weight_sums()
    }

    fn cache_values_per_token_per_layer(&self) -> Option<usize> {
        Some(self.cfg.cache_values_per_token())
    }
}
