//! The batch plumbing of a forward pass, shared by both models: which rows belong to which
//! sequence ([`BatchPlan`]), logits of the requested rows only, and batch-1 decode through a
//! recorded graph ([`DecodeGraph`]). A model supplies its layer stack ([`Stack`]); [`forward`]
//! does the rest.

use crate::layers::{Norm, WeightSource};
use crate::{Error, ModelInfo, PrefillActivations, ReducedRow, Result, Sequence};
use fp4moe_ops::sampling::WeightSpec;
use fp4moe_ops::{Backend, DType, Graph, HostTensor, LinearPath, T};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

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
    /// Logits of every new token, or only of each sequence's last.
    pub all_logits: bool,
    /// The FP4 products read bf16 inputs: a prefill chunk (some sequence appends more than one
    /// token) of a model set to [`PrefillActivations::Bf16`].
    pub bf16_inputs: bool,
}

impl BatchPlan {
    /// Validates the batch before anything is enqueued: token ids below `vocab` (checked on the
    /// host, because the embedding op must not read out of bounds), no empty token list, and
    /// room in each sequence's cache.
    pub fn new(batch: &[(&mut Sequence, &[u32])], vocab: usize, all_logits: bool) -> Result<BatchPlan> {
        let mut plan = BatchPlan {
            spans: Vec::new(),
            ids: Vec::new(),
            positions: Vec::new(),
            all_logits,
            bf16_inputs: false,
        };
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

    /// `t` as an FP4 product of this forward reads it: rounded to bf16 where `bf16_inputs`.
    pub fn input<B: Backend>(&self, b: &B, t: &T<B>) -> Result<T<B>> {
        Ok(if self.bf16_inputs { b.cast(t, DType::BF16)? } else { t.clone() })
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
    /// sequence's last): `[rows, V]` on the device.
    pub fn logits<B: Backend>(&self, b: &B, x: &T<B>, norm: &Norm<B>, lm_head: &B::Weight) -> Result<T<B>> {
        let rows = if self.all_logits {
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
        Ok(b.linear(&h, lm_head, LinearPath::Auto)?)
    }

    /// Downloaded logits rows split per sequence.
    fn split(&self, logits: Vec<f32>, vocab: usize) -> Vec<Vec<f32>> {
        // One sequence's one row (a decode step) is the whole download: no copy.
        if self.spans.len() == 1 && logits.len() == vocab {
            return vec![logits];
        }
        self.spans
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let (r0, n) = if self.all_logits { (s.row0, s.len) } else { (i, 1) };
                logits[r0 * vocab..(r0 + n) * vocab].to_vec()
            })
            .collect()
    }
}

/// The model-specific state inside a [`Sequence`], or an error if the sequence was made by a
/// different model.
pub(crate) fn state_of<'a, S: 'static>(seq: &'a Sequence, model: &str) -> Result<&'a S> {
    seq.state
        .downcast_ref::<S>()
        .ok_or_else(|| Error::Invalid(format!("forward: sequence was not created by this {model} model")))
}

/// One pre-norm residual layer: `x += attn(input_norm(x))`, then `x += ffn(post_norm(x))`.
pub(crate) struct Layer<B: Backend, A, F> {
    pub input_norm: Norm<B>, // [H]
    pub attn: A,
    pub post_norm: Norm<B>, // [H]
    pub ffn: F,
}

/// Both models' weights around their attention and FFN blocks.
pub(crate) struct StackWeights<B: Backend, A, F> {
    pub embed: B::Weight, // [V, H]
    pub layers: Vec<Layer<B, A, F>>,
    pub norm: Norm<B>,              // [H]
    pub lm_head: Option<B::Weight>, // [V, H]; None when tied to `embed`
}

/// What both checkpoints name alike around the layers, taken from a model's config.
pub(crate) struct StackDims<'a> {
    pub model_type: &'static str,
    pub vocab: usize,
    pub hidden: usize,
    pub layers: usize,
    pub rms_norm_eps: f32,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
    pub eos_token_ids: &'a [u32],
    pub bos_token_id: Option<u32>,
}

/// [`StackDims`] of a model config (both models' configs name these fields alike).
macro_rules! stack_dims {
    ($cfg:expr) => {
        $crate::batch::StackDims {
            model_type: MODEL_TYPE,
            vocab: $cfg.vocab_size,
            hidden: $cfg.hidden_size,
            layers: $cfg.num_layers,
            rms_norm_eps: $cfg.rms_norm_eps,
            tie_word_embeddings: $cfg.tie_word_embeddings,
            max_position_embeddings: $cfg.max_position_embeddings,
            eos_token_ids: &$cfg.eos_token_ids,
            bos_token_id: $cfg.bos_token_id,
        }
    };
}
pub(crate) use stack_dims;

impl<B: Backend, A, F> StackWeights<B, A, F> {
    /// Reads, in checkpoint order, the embedding, every layer (`blocks(src, l)` reads its attention
    /// and FFN blocks, then its two norms are read here), the final norm and the lm_head, uploading
    /// each as it is read.
    pub(crate) fn load(
        b: &B,
        src: &mut dyn WeightSource,
        d: &StackDims<'_>,
        mut blocks: impl FnMut(&mut dyn WeightSource, usize) -> Result<(A, F)>,
    ) -> Result<(Self, ModelInfo)> {
        let (h, eps) = (d.hidden, d.rms_norm_eps);
        let embed = b.upload_weight(&src.dense("model.embed_tokens", [d.vocab, h])?)?;
        let mut layers = Vec::with_capacity(d.layers);
        for l in 0..d.layers {
            let p = format!("model.layers.{l}");
            let (attn, ffn) = blocks(&mut *src, l)?;
            layers.push(Layer {
                input_norm: Norm::load(b, src, &format!("{p}.input_layernorm.weight"), h, eps)?,
                attn,
                post_norm: Norm::load(b, src, &format!("{p}.post_attention_layernorm.weight"), h, eps)?,
                ffn,
            });
        }
        let norm = Norm::load(b, src, "model.norm.weight", h, eps)?;
        let lm_head = if d.tie_word_embeddings {
            None
        } else {
            Some(b.upload_weight(&src.dense("lm_head", [d.vocab, h])?)?)
        };
        let info = ModelInfo {
            model_type: d.model_type.into(),
            vocab_size: d.vocab,
            hidden_size: h,
            num_layers: d.layers,
            max_position_embeddings: d.max_position_embeddings,
            eos_token_ids: d.eos_token_ids.to_vec(),
            bos_token_id: d.bos_token_id,
            quantization: src.quantization(),
        };
        Ok((StackWeights { embed, layers, norm, lm_head }, info))
    }
}

/// A model's layer stack, as [`forward`] drives it: its weights, its attention and FFN blocks.
pub(crate) trait Stack<B: Backend> {
    /// The per-sequence state (caches); it holds the sequence's [`DecodeGraph`].
    type State: Send + Sync + 'static;
    type Attn;
    type Ffn;
    const MODEL_TYPE: &'static str;
    fn backend(&self) -> &B;
    fn vocab(&self) -> usize;
    fn decode_graph(state: &Self::State) -> &DecodeGraph<B>;
    fn weights(&self) -> &StackWeights<B, Self::Attn, Self::Ffn>;
    /// What the products of a prefill chunk read (see [`PrefillActivations`]).
    fn prefill_activations(&self) -> PrefillActivations;
    /// Layer `l`'s attention over the batch (cache writes and attention per sequence):
    /// h `[N, H]` -> `[N, H]`.
    fn attention(
        &self,
        l: usize,
        at: &Self::Attn,
        h: &T<B>,
        positions: &T<B>,
        plan: &BatchPlan,
        states: &[&Self::State],
    ) -> Result<T<B>>;
    /// An FFN block (dense or MoE) of h `[N, H]` added to the residual x `[N, H]`, and that
    /// sum normed by `next` (the next layer's input norm) when given: `(x + ffn(h),
    /// next(x + ffn(h)))`.
    fn ffn_add(
        &self,
        ffn: &Self::Ffn,
        plan: &BatchPlan,
        h: &T<B>,
        x: &T<B>,
        next: Option<&Norm<B>>,
    ) -> Result<(T<B>, Option<T<B>>)>;
}

/// Embedding, every layer, final norm and lm_head on the plan's logits rows: ids and positions
/// u32 `[rows]` -> logits `[logits rows, V]`. Only ops, no host waits, so a backend can record it.
fn logits<B: Backend, M: Stack<B>>(
    m: &M,
    plan: &BatchPlan,
    states: &[&M::State],
    ids: &T<B>,
    positions: &T<B>,
) -> Result<T<B>> {
    let b = m.backend();
    let w = m.weights();
    let mut x = b.embedding(&w.embed, ids)?;
    let Some(first) = w.layers.first() else {
        return plan.logits(b, &x, &w.norm, w.lm_head.as_ref().unwrap_or(&w.embed));
    };
    // Each residual add runs with the norm that reads its sum (the next layer's input norm
    // after a layer's FFN); the last layer's sum is normed on the logits rows only.
    let mut normed = first.input_norm.forward(b, &x)?;
    for (l, layer) in w.layers.iter().enumerate() {
        let a = m.attention(l, &layer.attn, &normed, positions, plan, states)?;
        let (sum, post) = layer.post_norm.add_forward(b, &x, &a)?;
        let (s, next) =
            m.ffn_add(&layer.ffn, plan, &post, &sum, w.layers.get(l + 1).map(|n| &n.input_norm))?;
        x = s;
        if let Some(next) = next {
            normed = next;
        }
    }
    plan.logits(b, &x, &w.norm, w.lm_head.as_ref().unwrap_or(&w.embed))
}

/// `LanguageModel::forward` for any [`Stack`]: plan and validate, run the stack (batch-1 decode
/// through the sequence's graph when the backend records one), download, split, and advance each
/// sequence.
pub(crate) fn forward<B: Backend, M: Stack<B>>(
    m: &M,
    batch: &mut [(&mut Sequence, &[u32])],
    all_logits: bool,
) -> Result<Vec<Vec<f32>>> {
    run(m, batch, all_logits, |plan, logits| {
        let logits = m.backend().download(logits)?.into_f32()?;
        Ok(plan.split(logits, m.vocab()))
    })
}

/// `LanguageModel::forward_top_k` for any [`Stack`]: [`forward`]'s logits reduced to each row's
/// k best (id, logit) on the device, so a greedy or top-k step downloads a few bytes per sequence
/// instead of its vocabulary (~600 KB, then a host scan of it, while the device idles).
pub(crate) fn forward_top_k<B: Backend, M: Stack<B>>(
    m: &M,
    batch: &mut [(&mut Sequence, &[u32])],
    k: usize,
    vocab_limit: usize,
) -> Result<Vec<Vec<(u32, f32)>>> {
    let limit = vocab_limit.min(m.vocab());
    if k == 0 || limit == 0 {
        return Err(Error::Invalid(format!("forward_top_k: top {k} of {limit} logits")));
    }
    // A k past the vocabulary keeps every logit, in order.
    let k = k.min(limit);
    run(m, batch, false, |_, logits| {
        let b = m.backend();
        let logits = if limit < m.vocab() { b.slice_cols(logits, 0, limit)? } else { logits.clone() };
        let (vals, ids) = b.top_k(&logits, k)?;
        let ids = b.download(&ids)?.into_u32()?;
        let vals = b.download(&vals)?.into_f32()?;
        Ok(ids
            .chunks(k)
            .zip(vals.chunks(k))
            .map(|(i, v)| i.iter().copied().zip(v.iter().copied()).collect())
            .collect())
    })
}

/// `LanguageModel::forward_reduced` for any [`Stack`]: each row's k best and, where asked, its
/// weight sums, computed on the device; the logits stay there for the draw to read a chunk of.
pub(crate) fn forward_reduced<'a, B: Backend + 'a, M: Stack<B>>(
    m: &'a M,
    batch: &mut [(&mut Sequence, &[u32])],
    k: usize,
    vocab_limit: usize,
    specs: &[Option<WeightSpec>],
) -> Result<Vec<Box<dyn ReducedRow + 'a>>> {
    let limit = vocab_limit.min(m.vocab());
    crate::check_reduced(batch.len(), k, limit, specs)?;
    let k = k.min(limit);
    run(m, batch, false, |_, logits| {
        let b = m.backend();
        let logits = if limit < m.vocab() { b.slice_cols(logits, 0, limit)? } else { logits.clone() };
        let n = logits.shape()[0];
        let (vals, ids) = b.top_k(&logits, k)?;
        // Rows may differ in temperature: one call per row that asks (a batch-1 step is the row).
        let one = |t: &T<B>, r: usize| if n == 1 { Ok(t.clone()) } else { b.slice_rows(t, r, 1) };
        let row_logits = (0..n).map(|r| one(&logits, r)).collect::<std::result::Result<Vec<_>, _>>()?;
        let sums = specs
            .iter()
            .zip(&row_logits)
            .enumerate()
            .map(|(r, (spec, row))| spec.map(|s| b.weight_sums(row, &one(&vals, r)?, s)).transpose())
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let ids = b.download(&ids)?.into_u32()?;
        let vals = b.download(&vals)?.into_f32()?;
        let mut rows: Vec<Box<dyn ReducedRow + 'a>> = Vec::with_capacity(n);
        for (r, (s, logits)) in sums.into_iter().zip(row_logits).enumerate() {
            let top = ids[r * k..(r + 1) * k]
                .iter()
                .copied()
                .zip(vals[r * k..(r + 1) * k].iter().copied())
                .collect();
            let sums = s.map(|s| b.download(&s)?.into_f32()).transpose()?;
            rows.push(Box::new(DeviceRow { b, logits, len: limit, top, sums }));
        }
        Ok(rows)
    })
}

/// A row of logits left on the device, with what `forward_reduced` downloaded of it.
struct DeviceRow<'a, B: Backend> {
    b: &'a B,
    /// `[1, len]`
    logits: T<B>,
    len: usize,
    top: Vec<(u32, f32)>,
    sums: Option<Vec<f32>>,
}

impl<B: Backend> ReducedRow for DeviceRow<'_, B> {
    fn width(&self) -> usize {
        self.len
    }
    fn top(&self) -> &[(u32, f32)] {
        &self.top
    }
    fn weight_sums(&self) -> Option<&[f32]> {
        self.sums.as_deref()
    }
    fn logits(&self, start: usize, len: usize) -> Result<Vec<f32>> {
        if start.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(Error::Invalid(format!("logits {start}..+{len} of a row of {}", self.len)));
        }
        let part = self.b.slice_cols(&self.logits, start, len)?;
        Ok(self.b.download(&part)?.into_f32()?)
    }
}

/// Plans and validates the batch, runs the stack to its logits tensor (`[rows, V]`) and hands it
/// to `read`; each sequence advances only once `read` succeeded.
fn run<B: Backend, M: Stack<B>, R>(
    m: &M,
    batch: &mut [(&mut Sequence, &[u32])],
    all_logits: bool,
    read: impl FnOnce(&BatchPlan, &T<B>) -> Result<Vec<R>>,
) -> Result<Vec<R>> {
    if batch.is_empty() {
        return Ok(Vec::new());
    }
    let mut plan = BatchPlan::new(batch, m.vocab(), all_logits)?;
    plan.bf16_inputs =
        m.prefill_activations() == PrefillActivations::Bf16 && plan.spans.iter().any(|s| s.len > 1);
    let states =
        batch.iter().map(|(s, _)| state_of::<M::State>(s, M::MODEL_TYPE)).collect::<Result<Vec<_>>>()?;
    let logits = if plan.rows() == 1 && graphs_enabled() {
        M::decode_graph(states[0]).step(m, &plan, &states)?
    } else {
        eager(m, &plan, &states)?
    };
    let out = read(&plan, &logits)?;
    for (seq, tokens) in batch.iter_mut() {
        seq.len += tokens.len();
    }
    Ok(out)
}

fn eager<B: Backend, M: Stack<B>>(m: &M, plan: &BatchPlan, states: &[&M::State]) -> Result<T<B>> {
    let b = m.backend();
    let n = plan.rows();
    let ids = b.upload(HostTensor::U32(&plan.ids, &[n]))?;
    let positions = b.upload(HostTensor::U32(&plan.positions, &[n]))?;
    logits(m, plan, states, &ids, &positions)
}

/// Graphs are on unless `FP4MOE_GRAPHS=0` (to compare against op-by-op decode; read per step).
fn graphs_enabled() -> bool {
    std::env::var_os("FP4MOE_GRAPHS").is_none_or(|v| v != "0")
}

static REPLAYS: AtomicU64 = AtomicU64::new(0);

/// Decode steps run by replaying a recorded graph, in this process (benchmarks report it; tests
/// check that the graph path ran).
pub fn decode_graph_replays() -> u64 {
    REPLAYS.load(Ordering::Relaxed)
}

/// One sequence's batch-1 decode step, recorded once and replayed for every later token: on a
/// GPU the ~25 ops per layer cost more host time to launch one by one than they take to run.
/// The graph bakes in this sequence's cache buffers; the token and position go through its
/// input tensors, and the cache row through the replay's row shift.
pub(crate) struct DecodeGraph<B: Backend>(Mutex<GraphState<B>>);

enum GraphState<B: Backend> {
    /// No decode step yet. The first runs op by op: it compiles kernels, fills the backend's
    /// tables and leaves its buffer pool holding a decode step's buffers for recording.
    Cold,
    Warm,
    Ready {
        graph: Graph,
        ids: T<B>,
        positions: T<B>,
        logits: T<B>,
        /// Position of the recorded step.
        pos: usize,
    },
    /// The backend does not record, or recording failed: op by op.
    Off,
}

impl<B: Backend> Default for DecodeGraph<B> {
    fn default() -> Self {
        DecodeGraph(Mutex::new(GraphState::Cold))
    }
}

impl<B: Backend> DecodeGraph<B> {
    /// Logits `[1, V]` of a one-token plan (the tensor is the graph's: read it before the next
    /// step).
    fn step<M: Stack<B>>(&self, m: &M, plan: &BatchPlan, states: &[&M::State]) -> Result<T<B>> {
        let b = m.backend();
        let pos = plan.spans[0].pos0;
        let mut st = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        match &*st {
            GraphState::Ready { graph, ids, positions, logits, pos: at } if pos >= *at => {
                b.overwrite(ids, HostTensor::U32(&plan.ids, &[1]))?;
                b.overwrite(positions, HostTensor::U32(&plan.positions, &[1]))?;
                b.replay(graph, pos - at)?;
                REPLAYS.fetch_add(1, Ordering::Relaxed);
                return Ok(logits.clone());
            }
            GraphState::Cold | GraphState::Ready { .. } => {
                // A sequence rewound before the recorded position records again.
                *st = GraphState::Warm;
                return eager(m, plan, states);
            }
            GraphState::Off => return eager(m, plan, states),
            GraphState::Warm => {}
        }
        let ids = b.upload(HostTensor::U32(&plan.ids, &[1]))?;
        let positions = b.upload(HostTensor::U32(&plan.positions, &[1]))?;
        let mut out = None;
        // A model error inside the recording is reported through the op error type; any
        // failure runs the step op by op below, which reports a real error again.
        let recorded = b.capture(&mut || {
            let t = logits(m, plan, states, &ids, &positions)
                .map_err(|e| fp4moe_ops::Error::Device(e.to_string()))?;
            out = Some(t);
            Ok(())
        });
        match (recorded, out) {
            (Ok(Some(graph)), Some(logits)) => {
                *st = GraphState::Ready { graph, ids, positions, logits: logits.clone(), pos };
                Ok(logits)
            }
            (Ok(None), Some(logits)) => {
                *st = GraphState::Off;
                Ok(logits)
            }
            (recorded, _) => {
                if let Err(e) = recorded {
                    tracing::debug!("decode graph not recorded, running op by op: {e}");
                }
                *st = GraphState::Off;
                eager(m, plan, states)
            }
        }
    }
}
