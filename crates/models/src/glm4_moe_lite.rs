//! GLM-4.7-Flash (HF `model_type` `glm4_moe_lite`): DeepSeek-V3-style MLA attention and a
//! sigmoid-routed MoE with a shared expert.
//!
//! Attention (multi-head latent attention) in its absorbed form, so the cache holds only the
//! normed latent `c` (kv_lora values) and the roped shared key `k_r` (qk_rope values) per token:
//! - `q = q_b(rms_norm(q_a(x)))` split per head into `[q_nope | q_rope]`; `q_rope` is roped;
//! - `[c | k_r] = kv_a_proj_with_mqa(x)`; `c = rms_norm(c)`; `k_r` is roped (one key, all heads);
//! - `kv_b_proj` rows per head are `[W_UK (qk_nope rows) ; W_UV (v rows)]`, each `[.., kv_lora]`.
//!   Scores `q_nope·(W_UK c) = (W_UKᵀ q_nope)·c`, so `q_lat = W_UKᵀ q_nope` is taken once per
//!   query and scored against the cache directly; the attention-weighted latent `o_lat` is mapped
//!   out by `W_UV` per head. Both use the `head_linear` op on the unsplit `kv_b_proj`.
//! - A prefill chunk may instead attend in the expanded form, as transformers computes it, where
//!   the backend says it pays (`Backend::mla_expands`: many queries against few cached keys): the
//!   cached latents times `kv_b_proj` give every head's `k_nope` and values, and
//!   `attention_mla_expanded` scores `[q_nope | q_rope]` against `[k_nope | k_r]`. The cache
//!   layout is the same either way.
//!
//! RoPE is GPT-J interleaved on the rope dims (`rope_interleave`, the published setting).
//! transformers writes the rotated pairs de-interleaved (evens, then odds), which permutes q_rope
//! and k_r identically and so leaves every score unchanged; the cache keeps the pair order.
//!
//! Router: `s = sigmoid(x · Wᵀ)`, `e_score_correction_bias` added for selection only, top-k
//! within the best `topk_group` of `n_group` groups, weights the unbiased `s` renormalised and
//! scaled by `routed_scaling_factor`; plus the shared expert. The first layer(s) are dense.

use crate::batch::{self, BatchPlan, DecodeGraph, Stack, StackWeights};
use crate::layers::{
    Experts, Mlp, Norm, OneOrMany, RopeParameters, WeightSource, check_capacity, check_silu, either,
    parse_config, upload_f32, zeros,
};
use crate::{Error, LanguageModel, ModelInfo, PrefillActivations, ReducedRow, Result, Sequence};
use fp4moe_ops::sampling::WeightSpec;
use fp4moe_ops::{Backend, GroupedRouter, HeadLinear, LinearPath, Rope, RopeStyle, T};
use serde::Deserialize;
use std::path::Path;

pub const MODEL_TYPE: &str = "glm4_moe_lite";

/// eps of `q_a_layernorm` and `kv_a_layernorm`: transformers builds these RMSNorms with their
/// default eps, not the config's `rms_norm_eps`.
const LORA_NORM_EPS: f32 = 1e-6;

/// The `config.json` keys this model reads (published checkpoint or current transformers).
#[derive(Debug, Deserialize)]
struct RawConfig {
    vocab_size: usize,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    max_position_embeddings: usize,
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_parameters: Option<RopeParameters>,
    rope_scaling: Option<serde_json::Value>,
    /// transformers default: true.
    rope_interleave: Option<bool>,
    // `q_lora_rank` is read separately: `null` (a plain q_proj) differs from missing.
    kv_lora_rank: usize,
    qk_nope_head_dim: usize,
    qk_rope_head_dim: usize,
    v_head_dim: usize,
    n_routed_experts: Option<usize>,
    num_local_experts: Option<usize>,
    num_experts_per_tok: usize,
    n_shared_experts: usize,
    moe_intermediate_size: usize,
    intermediate_size: usize,
    n_group: usize,
    topk_group: usize,
    norm_topk_prob: bool,
    routed_scaling_factor: f64,
    scoring_func: Option<String>,
    mlp_layer_types: Option<Vec<String>>,
    first_k_dense_replace: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
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
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_interleave: bool,
    /// `None`: queries come from one `q_proj` instead of the q_a/q_b low-rank pair.
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    pub num_experts: usize,
    pub top_k: usize,
    pub n_shared_experts: usize,
    pub moe_intermediate_size: usize,
    /// Dense layers' MLP width.
    pub intermediate_size: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub norm_topk_prob: bool,
    pub routed_scaling_factor: f32,
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
        let q_lora_rank = match v.get("q_lora_rank") {
            None => {
                return Err(Error::MissingConfigKey { path: path.to_path_buf(), key: "q_lora_rank".into() });
            }
            Some(q) => parse_config::<Option<usize>>(q, path)?,
        };
        let unsupported = |what: String| Error::Unsupported {
            what: format!("config {}: {what}", path.display()),
            reason: format!("not used by {MODEL_TYPE} checkpoints this engine supports"),
        };
        if r.attention_bias == Some(true) {
            return Err(unsupported("attention_bias = true".into()));
        }
        if let Some(f) = r.scoring_func.as_deref().filter(|f| *f != "sigmoid") {
            return Err(unsupported(format!("scoring_func `{f}`")));
        }
        let num_experts = either(
            path,
            &["n_routed_experts", "num_local_experts"],
            &[r.n_routed_experts, r.num_local_experts],
        )?;
        let bad = |reason: String| Err(Error::Config { path: path.to_path_buf(), reason });
        let sparse: Vec<bool> = match (&r.mlp_layer_types, r.first_k_dense_replace) {
            (Some(types), _) => {
                if types.len() < r.num_hidden_layers {
                    return bad(format!(
                        "mlp_layer_types has {} entries for {} layers",
                        types.len(),
                        r.num_hidden_layers
                    ));
                }
                let mut s = Vec::with_capacity(r.num_hidden_layers);
                for t in &types[..r.num_hidden_layers] {
                    match t.as_str() {
                        "sparse" => s.push(true),
                        "dense" => s.push(false),
                        other => return bad(format!("mlp_layer_types: unknown entry `{other}`")),
                    }
                }
                s
            }
            (None, Some(k)) => (0..r.num_hidden_layers).map(|l| l >= k).collect(),
            (None, None) => {
                return Err(Error::MissingConfigKey {
                    path: path.to_path_buf(),
                    key: "mlp_layer_types` or `first_k_dense_replace".into(),
                });
            }
        };
        if r.n_group == 0
            || !num_experts.is_multiple_of(r.n_group)
            || r.topk_group == 0
            || r.topk_group > r.n_group
        {
            return bad(format!(
                "{num_experts} experts cannot form n_group {} groups with topk_group {}",
                r.n_group, r.topk_group
            ));
        }
        if r.num_experts_per_tok == 0 || r.num_experts_per_tok > num_experts / r.n_group * r.topk_group {
            return bad(format!(
                "num_experts_per_tok {} does not fit {} groups of {}",
                r.num_experts_per_tok,
                r.topk_group,
                num_experts / r.n_group
            ));
        }
        if !r.qk_rope_head_dim.is_multiple_of(2) {
            return bad(format!("qk_rope_head_dim {} must be even for RoPE", r.qk_rope_head_dim));
        }
        Ok(Config {
            vocab_size: r.vocab_size,
            hidden_size: r.hidden_size,
            num_layers: r.num_hidden_layers,
            num_heads: r.num_attention_heads,
            max_position_embeddings: r.max_position_embeddings,
            rms_norm_eps: r.rms_norm_eps as f32,
            rope_theta: crate::layers::rope_theta(
                path,
                r.rope_theta,
                r.rope_parameters.as_ref(),
                r.rope_scaling.as_ref(),
            )?,
            rope_interleave: r.rope_interleave.unwrap_or(true),
            q_lora_rank,
            kv_lora_rank: r.kv_lora_rank,
            qk_nope_head_dim: r.qk_nope_head_dim,
            qk_rope_head_dim: r.qk_rope_head_dim,
            v_head_dim: r.v_head_dim,
            num_experts,
            top_k: r.num_experts_per_tok,
            n_shared_experts: r.n_shared_experts,
            moe_intermediate_size: r.moe_intermediate_size,
            intermediate_size: r.intermediate_size,
            n_group: r.n_group,
            topk_group: r.topk_group,
            norm_topk_prob: r.norm_topk_prob,
            routed_scaling_factor: r.routed_scaling_factor as f32,
            sparse,
            tie_word_embeddings: r.tie_word_embeddings.unwrap_or(false),
            eos_token_ids: OneOrMany::ids(r.eos_token_id.as_ref()),
            bos_token_id: r.bos_token_id,
        })
    }

    fn rope(&self) -> Rope {
        let style = if self.rope_interleave { RopeStyle::Interleaved } else { RopeStyle::NeoX };
        Rope { style, offset: 0, dims: self.qk_rope_head_dim, theta: self.rope_theta }
    }

    fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// f32 values per token per layer in the latent cache: kv_lora + qk_rope (576 for
    /// GLM-4.7-Flash, against 20 · (256 + 256) for per-head keys and values).
    pub fn cache_values_per_token(&self) -> usize {
        self.kv_lora_rank + self.qk_rope_head_dim
    }

    /// One `kv_b_proj` head block `[W_UK ; W_UV]` addressed by `head_linear`.
    fn kv_b_block(&self, row_start: usize, row_count: usize, transpose: bool) -> HeadLinear {
        HeadLinear {
            heads: self.num_heads,
            rows_per_head: self.qk_nope_head_dim + self.v_head_dim,
            row_start,
            row_count,
            transpose,
        }
    }
}

enum QProj<B: Backend> {
    LowRank {
        a: B::Weight,  // q_a_proj [q_lora, H]
        norm: Norm<B>, // q_a_layernorm [q_lora]
        b: B::Weight,  // q_b_proj [heads * (qk_nope + qk_rope), q_lora]
    },
    Full(B::Weight), // q_proj [heads * (qk_nope + qk_rope), H]
}

pub(crate) struct Attention<B: Backend> {
    q: QProj<B>,
    kv_a: B::Weight,    // kv_a_proj_with_mqa [kv_lora + qk_rope, H]
    kv_a_norm: Norm<B>, // kv_a_layernorm [kv_lora]
    kv_b: B::Weight,    // kv_b_proj [heads * (qk_nope + v), kv_lora], per head [W_UK ; W_UV]
    o_proj: B::Weight,  // [H, heads * v]
}

pub(crate) enum Ffn<B: Backend> {
    Dense(Mlp<B>),
    Moe {
        router: B::Weight, // [E, H] 16-bit, never quantized (selection is sensitive to it)
        bias: T<B>,        // e_score_correction_bias [E] f32, selection only
        experts: Experts<B>,
    },
}

/// A loaded GLM-4.7-Flash-style model.
pub struct Glm4MoeLite<B: Backend> {
    backend: B,
    cfg: Config,
    info: ModelInfo,
    w: StackWeights<B, Attention<B>, Ffn<B>>,
    prefill: PrefillActivations,
}

/// Per-sequence latent cache.
pub(crate) struct State<B: Backend> {
    cache: Vec<T<B>>, // per layer [capacity, kv_lora + qk_rope]: normed latent, then roped k_r
    graph: DecodeGraph<B>,
}

impl<B: Backend> Glm4MoeLite<B> {
    /// Builds the model from `src`; the multi-token-prediction layer(s) after
    /// `num_hidden_layers` are never read.
    pub(crate) fn build(backend: B, cfg: Config, src: &mut dyn WeightSource) -> Result<Self> {
        let b = &backend;
        let (h, heads) = (cfg.hidden_size, cfg.num_heads);
        let qk = cfg.qk_head_dim();
        let dims = batch::stack_dims!(cfg);
        let (w, info) = StackWeights::load(b, src, &dims, |src, l| {
            let p = format!("model.layers.{l}");
            let a = format!("{p}.self_attn");
            let q = match cfg.q_lora_rank {
                Some(r) => QProj::LowRank {
                    a: b.upload_weight(&src.projection(&format!("{a}.q_a_proj"), [r, h])?)?,
                    norm: Norm::load(b, src, &format!("{a}.q_a_layernorm.weight"), r, LORA_NORM_EPS)?,
                    b: b.upload_weight(&src.projection(&format!("{a}.q_b_proj"), [heads * qk, r])?)?,
                },
                None => {
                    QProj::Full(b.upload_weight(&src.projection(&format!("{a}.q_proj"), [heads * qk, h])?)?)
                }
            };
            let (lora, rope) = (cfg.kv_lora_rank, cfg.qk_rope_head_dim);
            let attn = Attention {
                q,
                kv_a: b
                    .upload_weight(&src.projection(&format!("{a}.kv_a_proj_with_mqa"), [lora + rope, h])?)?,
                kv_a_norm: Norm::load(b, src, &format!("{a}.kv_a_layernorm.weight"), lora, LORA_NORM_EPS)?,
                kv_b: b.upload_weight(&src.projection(
                    &format!("{a}.kv_b_proj"),
                    [heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), lora],
                )?)?,
                o_proj: b
                    .upload_weight(&src.projection(&format!("{a}.o_proj"), [h, heads * cfg.v_head_dim])?)?,
            };
            let ffn = if cfg.sparse[l] {
                let e = cfg.num_experts;
                let shared = if cfg.n_shared_experts > 0 {
                    let inter = cfg.moe_intermediate_size * cfg.n_shared_experts;
                    Some(Mlp::load(b, src, &format!("{p}.mlp.shared_experts"), inter, h)?)
                } else {
                    None
                };
                let bias = src.vector(&format!("{p}.mlp.gate.e_score_correction_bias"), e)?;
                Ffn::Moe {
                    router: b.upload_weight(&src.dense(&format!("{p}.mlp.gate"), [e, h])?)?,
                    bias: upload_f32(b, &bias, &[e])?,
                    experts: Experts::load(
                        b,
                        src,
                        &format!("{p}.mlp"),
                        e,
                        cfg.moe_intermediate_size,
                        h,
                        shared,
                    )?,
                }
            } else {
                Ffn::Dense(Mlp::load(b, src, &format!("{p}.mlp"), cfg.intermediate_size, h)?)
            };
            Ok((attn, ffn))
        })?;
        Ok(Glm4MoeLite { backend, cfg, info, w, prefill: PrefillActivations::F32 })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }
}

impl<B: Backend + 'static> Stack<B> for Glm4MoeLite<B> {
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

    /// MLA over the batch: projections and the W_UK / W_UV maps on all rows at once, cache
    /// writes and attention per sequence. h `[N, H]` -> `[N, H]`.
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
        let (n, heads) = (plan.rows(), c.num_heads);
        let (nope, rope, lora, v) = (c.qk_nope_head_dim, c.qk_rope_head_dim, c.kv_lora_rank, c.v_head_dim);
        // The query's first product and kv_a both read h: one `linears` call.
        let first = match &at.q {
            QProj::LowRank { a, .. } => a,
            QProj::Full(w) => w,
        };
        let [q0, ckv]: [T<B>; 2] = b
            .linears(&plan.input(b, h)?, &[first, &at.kv_a], LinearPath::Auto)?
            .try_into()
            .map_err(|_| Error::Invalid("linears: not two outputs for two weights".into()))?;
        let q = match &at.q {
            QProj::LowRank { norm, b: qb, .. } => {
                b.linear(&plan.input(b, &norm.forward(b, &q0)?)?, qb, LinearPath::Auto)?
            }
            QProj::Full(_) => q0,
        }
        .reshape(&[n, heads, nope + rope])?;
        // q: [n, heads, nope | rope] split, the rope part rotated. ckv: [n, lora + rope] -> the
        // normed latent and the rotated key part, side by side in a cache row. One sequence:
        // both splits in one op, which writes the cache itself.
        let ckv = ckv.reshape(&[n, 1, lora + rope])?;
        let norm = Some(at.kv_a_norm.parts());
        let (q_nope, q_rope) = if let [span] = &plan.spans[..] {
            let cache = &states[0].cache[l];
            b.split_rope_and_cache(
                (&q, nope, None),
                (&ckv, lora, norm),
                positions,
                c.rope(),
                cache,
                span.pos0,
            )?
        } else {
            let (latent, k_rope) = b.split_rope(&ckv, lora, norm, positions, c.rope())?;
            let (latent, k_rope) = (latent.reshape(&[n, lora])?, k_rope.reshape(&[n, rope])?);
            for (i, span) in plan.spans.iter().enumerate() {
                let (lat, kr) = (plan.rows_of(b, &latent, i)?, plan.rows_of(b, &k_rope, i)?);
                b.write_rows_many(&[
                    (&states[i].cache[l], &lat, span.pos0, 0),
                    (&states[i].cache[l], &kr, span.pos0, lora),
                ])?;
            }
            b.split_rope(&q, nope, None, positions, c.rope())?
        };
        let scale = 1.0 / (c.qk_head_dim() as f32).sqrt();
        // Each sequence's form: a prefill chunk whose queries are many against its keys attends
        // expanded (every key row's heads from one kv_b product of its cached latents: no
        // per-query head products, and scores over nope + rope instead of lora + rope); decode
        // rows and short chunks stay absorbed. A server batch may mix the two.
        let expand: Vec<bool> = plan.spans.iter().map(|s| b.mla_expands(s.len, s.pos0 + s.len)).collect();
        let absorbed: Vec<usize> = (0..plan.spans.len()).filter(|&i| !expand[i]).collect();
        let every = absorbed.len() == plan.spans.len();
        // Rows `row0..row0 + len` of a tensor over the absorbed sequences' rows only.
        let rows_at = |x: &T<B>, row0: usize, len: usize| -> Result<T<B>> {
            Ok(if x.shape()[0] == len { x.clone() } else { b.slice_rows(x, row0, len)? })
        };
        let mut outs: Vec<Option<T<B>>> = vec![None; plan.spans.len()];
        let mut o_absorbed = None;
        if !absorbed.is_empty() {
            let q_nope = if every {
                q_nope.clone()
            } else {
                let parts =
                    absorbed.iter().map(|&i| plan.rows_of(b, &q_nope, i)).collect::<Result<Vec<_>>>()?;
                plan.stack(b, parts)?
            };
            let q_lat = b.head_linear(&q_nope, &at.kv_b, c.kv_b_block(0, nope, true))?; // [rows, heads, lora]
            let mut lats = Vec::with_capacity(absorbed.len());
            let mut row = 0;
            for &i in &absorbed {
                let span = plan.spans[i];
                let (ql, qr) = (rows_at(&q_lat, row, span.len)?, plan.rows_of(b, &q_rope, i)?);
                let cache = &states[i].cache[l];
                // A bf16-activation prefill lets the products read bf16 (Backend::attention_mla_bf16).
                lats.push(if plan.bf16_inputs {
                    b.attention_mla_bf16(&ql, &qr, cache, span.pos0, scale)?
                } else {
                    b.attention_mla(&ql, &qr, cache, span.pos0, scale)?
                });
                row += span.len;
            }
            let o_lat = plan.stack(b, lats)?; // [rows, heads, lora]
            let o = b.head_linear(&o_lat, &at.kv_b, c.kv_b_block(nope, v, false))?; // [rows, heads, v]
            if every {
                o_absorbed = Some(o);
            } else {
                let mut row = 0;
                for &i in &absorbed {
                    outs[i] = Some(rows_at(&o, row, plan.spans[i].len)?);
                    row += plan.spans[i].len;
                }
            }
        }
        for (i, span) in plan.spans.iter().enumerate().filter(|&(i, _)| expand[i]) {
            let keys = span.pos0 + span.len;
            let rows = b.slice_rows(&states[i].cache[l], 0, keys)?; // [keys, lora + rope]
            let latent = b.slice_cols(&rows, 0, lora)?;
            let k_rope = b.slice_cols(&rows, lora, rope)?;
            // f32 input even in a bf16-activation prefill: the absorbed form's head products read
            // f32, and the two forms must round the same values (a golden twin check compares them).
            let kv = b.linear(&latent, &at.kv_b, LinearPath::Auto)?; // [keys, heads * (nope + v)]
            let kv = kv.reshape(&[keys, heads, nope + v])?;
            let (qn, qr) = (plan.rows_of(b, &q_nope, i)?, plan.rows_of(b, &q_rope, i)?);
            // A bf16-activation prefill lets the products read bf16, as for the absorbed form.
            let bf16 = plan.bf16_inputs;
            outs[i] = Some(b.attention_mla_expanded(&qn, &qr, &kv, &k_rope, span.pos0, scale, bf16)?);
        }
        let o = match o_absorbed {
            Some(o) => o,
            None => {
                let outs: Option<Vec<T<B>>> = outs.into_iter().collect();
                plan.stack(b, outs.ok_or_else(|| Error::Invalid("MLA: a sequence was not attended".into()))?)?
            }
        }; // [n, heads, v]
        Ok(b.linear(&plan.input(b, &o.reshape(&[n, heads * v])?)?, &at.o_proj, LinearPath::Auto)?)
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
        let c = &self.cfg;
        match ffn {
            Ffn::Dense(mlp) => Norm::add_then(b, x, &mlp.forward(b, &plan.input(b, h)?)?, next),
            Ffn::Moe { router, bias, experts } => {
                let logits = b.linear(h, router, LinearPath::Auto)?;
                let spec = GroupedRouter {
                    k: c.top_k,
                    n_group: c.n_group,
                    topk_group: c.topk_group,
                    renormalize: c.norm_topk_prob,
                    scale: c.routed_scaling_factor,
                };
                let (ids, w) = b.route_sigmoid_grouped(&logits, bias, spec)?;
                experts.forward_add(b, &plan.input(b, h)?, &ids, &w, x, next)
            }
        }
    }
}

impl<B: Backend + 'static> LanguageModel for Glm4MoeLite<B> {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn set_prefill_activations(&mut self, a: PrefillActivations) -> Result<()> {
        self.prefill = a;
        Ok(())
    }

    fn new_sequence(&self, capacity: usize) -> Result<Sequence> {
        check_capacity(capacity, self.cfg.max_position_embeddings)?;
        let shape = [capacity, self.cfg.cache_values_per_token()];
        let cache = (0..self.cfg.num_layers).map(|_| zeros(&self.backend, &shape)).collect::<Result<_>>()?;
        Ok(Sequence {
            state: Box::new(State::<B> { cache, graph: DecodeGraph::default() }),
            len: 0,
            capacity,
        })
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
