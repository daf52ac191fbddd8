//! The op interface that every backend implements, its reference twin, and the conformance suite.
//!
//! Read this crate first. A model (`fp4moe-models`) is a sequence of calls to [`Backend`] ops on
//! device-resident [`Tensor`]s. The trait is built for GPUs as well as the CPU:
//! - tensors live on the device; an op *enqueues* work and returns its output handle at once;
//! - the only points where the host waits are [`Backend::download`] and [`Backend::synchronize`],
//!   and no op needs the host to read device data (shapes, positions and paths are host values);
//! - weights are uploaded once ([`Backend::upload_weight`]) into the backend's own layout;
//! - a backend may record a fixed sequence of ops as a [`Graph`] ([`Backend::capture`]) and run it
//!   again with one host call ([`Backend::replay`]): batch-1 decode repeats the same ops every token,
//!   and on a GPU launching them one by one costs more host time than the kernels take.
//!
//! Every op has a plain twin in [`reference`] (dequantize, then f32 loops). The
//! [`conformance`] suite calls every op and every path a backend lists — each decode/prefill
//! variant, each tile size, each MoE path — explicitly, and requires agreement with the twin.
//! A backend's `Auto` dispatch may only pick among the paths it lists; it has no private path.
//! [`check`] holds the ops' shape rules, which every backend validates its inputs with.
//! [`sampling`] is the one definition of a sampling weight, which the engine's sampler draws
//! with and [`Backend::weight_sums`] sums where the logits are (bit for bit the same).
//! [`profile::Profiled`] wraps any backend and times its ops by kind (`fp4moe bench model --profile`).

pub mod check;
pub mod conformance;
pub mod profile;
pub mod reference;
pub mod sampling;
mod spec;
mod tensor;
mod weight;

pub use spec::{GroupedRouter, HeadLinear, KernelConfig, LinearPath, MoePath, Rope, RopeStyle};
pub use tensor::{DType, HostData, HostTensor, Tensor};
pub use weight::{DenseDType, HostWeight, MoeWeights};

/// Errors from ops. Shape errors name the op and what did not fit.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op}: {detail}")]
    Shape { op: &'static str, detail: String },
    #[error("{op}: unsupported on backend {backend}: {what}")]
    Unsupported { op: &'static str, backend: String, what: String },
    #[error("device error: {0}")]
    Device(String),
    #[error(transparent)]
    Fp4(#[from] fp4::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A recorded sequence of ops ([`Backend::capture`]), opaque outside the backend that made it.
/// It owns the device memory its ops wrote; tensors made while recording stay valid for as long
/// as the graph and are rewritten by every replay.
pub struct Graph(pub Box<dyn std::any::Any + Send + Sync>);

/// Shorthand for a backend's tensor type.
pub type T<B> = Tensor<<B as Backend>::Storage>;

/// One `split_rope` input of [`Backend::split_rope_and_cache`]: `(x, a, norm)`.
pub type SplitInput<'a, B> = (&'a T<B>, usize, Option<(&'a T<B>, f32)>);

/// The ops both models need. Shapes are row-major and contiguous; `[.., D]` means any number
/// of leading dims, the op acting on the last. Activations are f32 unless stated; index tensors
/// are u32. Every method documents its exact math; [`reference::RefBackend`] is that math.
pub trait Backend: Send + Sync {
    /// Device memory behind a [`Tensor`]. Ops may write outputs through a shared handle
    /// (interior mutability), as GPU buffers do.
    type Storage: Send + Sync;
    /// A weight matrix in the backend's own layout, uploaded once.
    type Weight: Send + Sync;

    /// Short name for logs and tables (`cpu`, `reference`, `cuda:H100`, …).
    fn name(&self) -> String;

    // ---- memory -------------------------------------------------------------------------
    fn upload(&self, t: HostTensor<'_>) -> Result<T<Self>>;
    fn zeros(&self, shape: &[usize], dtype: DType) -> Result<T<Self>>;
    /// Copies a tensor to the host; waits for the work that produces it.
    fn download(&self, t: &T<Self>) -> Result<HostData>;
    /// Waits until all enqueued work is done (for timing).
    fn synchronize(&self) -> Result<()>;
    /// Replaces the contents of `dst` with host data of the same shape and dtype (a graph's
    /// inputs, which must keep their device memory).
    fn overwrite(&self, dst: &T<Self>, src: HostTensor<'_>) -> Result<()> {
        let (shape, dtype) = match src {
            HostTensor::F32(_, s) => (s, DType::F32),
            HostTensor::U32(_, s) => (s, DType::U32),
        };
        if shape != dst.shape() || dtype != dst.dtype() {
            return Err(Error::Shape {
                op: "overwrite",
                detail: format!("{dtype:?} {shape:?} into {:?} {:?}", dst.dtype(), dst.shape()),
            });
        }
        let n = dst.numel();
        if n == 0 {
            return Ok(());
        }
        self.write_rows(&dst.reshape(&[1, n])?, &self.upload(src)?.reshape(&[1, n])?, 0, 0)
    }

    // ---- recording (optional) -----------------------------------------------------------
    /// Runs `work` (a sequence of ops on this backend); a backend that can record also returns it
    /// as a [`Graph`]. The default runs it and returns `None`. While recording, no other work
    /// may be enqueued on this backend, and `work` must not wait on the device (no download).
    /// Host scalars are baked in as recorded, except cache rows: see [`Backend::replay`].
    fn capture(&self, work: &mut dyn FnMut() -> Result<()>) -> Result<Option<Graph>> {
        work()?;
        Ok(None)
    }

    /// Runs a recorded graph again, on the data its tensors hold now, with every cache row moved
    /// `shift` rows past where it was recorded: `write_rows`' `row0` and the attention ops' `pos0`
    /// (a decode step recorded at position p replays at p + shift). The caller keeps those rows
    /// inside each cache, as it would for the same ops run one by one.
    fn replay(&self, graph: &Graph, shift: usize) -> Result<()> {
        let _ = (graph, shift);
        Err(Error::Unsupported {
            op: "replay",
            backend: self.name(),
            what: "this backend does not record graphs".into(),
        })
    }

    /// Device time per kernel, for a backend that times its kernels on the device (wgpu with
    /// `FP4MOE_WGPU_TIMESTAMPS=1`): a shared handle that accumulates while work runs. `None`
    /// where the backend does not (CUDA's per-kernel times come from Nsight Compute).
    fn kernel_stats(&self) -> Option<std::sync::Arc<std::sync::Mutex<profile::OpStats>>> {
        None
    }

    /// Nanoseconds the host has spent blocked waiting for the device, for a backend that keeps
    /// count (wgpu): a shared counter, so a benchmark can tell a step the host's recording
    /// bounds from one the device bounds. `None` where the backend does not count.
    fn host_waits(&self) -> Option<std::sync::Arc<std::sync::atomic::AtomicU64>> {
        None
    }

    /// Uploads a weight matrix `[rows, cols]` (FP4 or dense) once.
    fn upload_weight(&self, w: &HostWeight) -> Result<Self::Weight>;
    /// `[rows, cols]` of an uploaded weight.
    fn weight_shape(&self, w: &Self::Weight) -> [usize; 2];

    // ---- paths this backend implements (the conformance suite calls each one) -------------
    /// Concrete linear paths (not `Auto`), e.g. `[Decode, Prefill{n_tile: 32}, Prefill{64}]`.
    fn linear_paths(&self) -> Vec<LinearPath>;
    /// Concrete MoE paths (not `Auto`).
    fn moe_paths(&self) -> Vec<MoePath>;

    // ---- ops ----------------------------------------------------------------------------
    /// `out[i, :] = table[ids[i], :]`. table `[V, H]` (dense or FP4), ids u32 `[n]` -> `[n, H]`.
    /// Ids must be < V; callers validate on the host before upload.
    fn embedding(&self, table: &Self::Weight, ids: &T<Self>) -> Result<T<Self>>;

    /// `y = x · Wᵀ`: x `[M, K]` (f32 or bf16), W `[N, K]` -> y f32 `[M, N]`.
    fn linear(&self, x: &T<Self>, w: &Self::Weight, path: LinearPath) -> Result<T<Self>>;

    /// `linear` of one x against several weights, in order (the products that read the same
    /// activations: Qwen3's q / k / v, GLM's q_a / kv_a). A backend may run them as one launch;
    /// the results are those of the separate calls.
    fn linears(&self, x: &T<Self>, ws: &[&Self::Weight], path: LinearPath) -> Result<Vec<T<Self>>> {
        ws.iter().map(|w| self.linear(x, w, path)).collect()
    }

    /// Per-head products against row blocks of one weight (MLA's absorbed `kv_b_proj`).
    /// W is `[heads * rows_per_head, K]`; head h uses rows `h*rows_per_head + row_start ..+ row_count`,
    /// call that block `W_h [row_count, K]`. x is `[M, heads, Kx]`.
    /// - `transpose == false`: `y[m,h,:] = W_h · x[m,h,:]` (Kx = K) -> `[M, heads, row_count]`.
    /// - `transpose == true`:  `y[m,h,:] = W_hᵀ · x[m,h,:]` (Kx = row_count) -> `[M, heads, K]`.
    fn head_linear(&self, x: &T<Self>, w: &Self::Weight, spec: HeadLinear) -> Result<T<Self>>;

    /// RMSNorm over the last dim: `x / sqrt(mean(x²) + eps) * w`, w f32 `[D]`.
    fn rms_norm(&self, x: &T<Self>, w: &T<Self>, eps: f32) -> Result<T<Self>>;

    /// `(a + b, rms_norm(a + b, w, eps))`: a residual add and the norm that reads its sum (every
    /// layer boundary), so a backend can do both in one pass (the default runs the two ops).
    fn add_rms_norm(&self, a: &T<Self>, b: &T<Self>, w: &T<Self>, eps: f32) -> Result<(T<Self>, T<Self>)> {
        let sum = self.add(a, b)?;
        let normed = self.rms_norm(&sum, w, eps)?;
        Ok((sum, normed))
    }

    /// Rotary embedding of x `[n, H, D]` at u32 `positions [n]` on dims `spec.offset ..+ spec.dims`
    /// of each head; other dims pass through. See [`RopeStyle`] for the pairing.
    fn rope(&self, x: &T<Self>, positions: &T<Self>, spec: Rope) -> Result<T<Self>>;

    /// `rope(rms_norm(x, w, eps), positions, spec)` for x `[n, H, D]` with w `[D]`: the per-head
    /// norm and rotation of Qwen3's queries and keys as one op, so a backend can do both in one
    /// pass (the default runs the two ops).
    fn norm_rope(
        &self,
        x: &T<Self>,
        w: &T<Self>,
        eps: f32,
        positions: &T<Self>,
        spec: Rope,
    ) -> Result<T<Self>> {
        self.rope(&self.rms_norm(x, w, eps)?, positions, spec)
    }

    /// `norm_rope` of several `(x, w, eps)` at the same positions and spec (Qwen3's queries and
    /// keys), in order. A backend may run them as one launch; the results are those of the
    /// separate calls.
    fn norm_ropes(
        &self,
        xs: &[(&T<Self>, &T<Self>, f32)],
        positions: &T<Self>,
        spec: Rope,
    ) -> Result<Vec<T<Self>>> {
        xs.iter().map(|&(x, w, eps)| self.norm_rope(x, w, eps, positions, spec)).collect()
    }

    /// GQA's step between the projections and attention: `norm_ropes` of q `[n, Hq, D]` and k
    /// `[n, Hkv, D]` (each `(x, w, eps)`), then k's result and v `[n, Hkv * D]` written to rows
    /// `row0..row0 + n` of the caches `[S, Hkv * D]` (`write_rows_many`). Returns q's result.
    /// A backend may write the caches from the norm's own launch (the default runs the ops).
    #[allow(clippy::too_many_arguments)]
    fn norm_ropes_to_cache(
        &self,
        q: (&T<Self>, &T<Self>, f32),
        k: (&T<Self>, &T<Self>, f32),
        v: &T<Self>,
        positions: &T<Self>,
        spec: Rope,
        caches: (&T<Self>, &T<Self>),
        row0: usize,
    ) -> Result<T<Self>> {
        norm_ropes_to_cache_separately(self, q, k, v, positions, spec, caches, row0)
    }

    /// `split_rope` of `x` (`(x, a, norm)`) and of `to_cache` (`[n, 1, C]`) at the same
    /// positions and spec, returning x's parts and writing to_cache's to rows `row0..row0 + n`
    /// of `cache` `[S, C]` as they lie in it (first part, then the rotated part): MLA's query
    /// heads and its compressed kv row into the latent cache, which a backend may split and
    /// write in one launch (the default splits both, then writes the row's parts).
    #[allow(clippy::too_many_arguments)]
    fn split_rope_and_cache(
        &self,
        x: SplitInput<'_, Self>,
        to_cache: SplitInput<'_, Self>,
        positions: &T<Self>,
        spec: Rope,
        cache: &T<Self>,
        row0: usize,
    ) -> Result<(T<Self>, T<Self>)> {
        let parts = self.split_rope(x.0, x.1, x.2, positions, spec)?;
        split_rope_into_cache(self, to_cache, positions, spec, cache, row0)?;
        Ok(parts)
    }

    /// MLA's split of each head of x `[n, H, C]` at column `a`: `(x[.., :a], rope(x[.., a:],
    /// positions, spec))`, the first part normed when `norm = Some((w [a], eps))`. GLM's query
    /// heads (no norm) and its compressed kv row (H = 1, kv_a_layernorm), so a backend can do
    /// the two slices, the norm and the rotation in one pass (the default runs them apart).
    fn split_rope(
        &self,
        x: &T<Self>,
        a: usize,
        norm: Option<(&T<Self>, f32)>,
        positions: &T<Self>,
        spec: Rope,
    ) -> Result<(T<Self>, T<Self>)> {
        split_rope_separately(self, x, a, norm, positions, spec)
    }

    /// Softmax over the last dim (f32, max-subtracted).
    fn softmax(&self, x: &T<Self>) -> Result<T<Self>>;

    /// Elementwise `a + b` (same shape).
    fn add(&self, a: &T<Self>, b: &T<Self>) -> Result<T<Self>>;

    /// x `[.., 2I]` -> `[.., I]`: `silu(x[.., :I]) * x[.., I:]` (SwiGLU with gate rows first).
    fn silu_mul(&self, x: &T<Self>) -> Result<T<Self>>;

    /// Columns `start..start+len` of the last dim: `[.., C]` -> `[.., len]`.
    fn slice_cols(&self, x: &T<Self>, start: usize, len: usize) -> Result<T<Self>>;

    /// Rows `start..start+len` of the first dim.
    fn slice_rows(&self, x: &T<Self>, start: usize, len: usize) -> Result<T<Self>>;

    /// Concatenate along the first dim (same trailing shape and dtype).
    fn concat_rows(&self, parts: &[&T<Self>]) -> Result<T<Self>>;

    /// Cast f32 <-> bf16 (the linear op accepts either activation type).
    fn cast(&self, x: &T<Self>, dtype: DType) -> Result<T<Self>>;

    /// In place: `dst[row0 + i, col0 + j] = src[i, j]` with dst `[S, C]`, src `[n, c]` viewed 2-D
    /// (leading dims flattened). This is how KV caches are written.
    fn write_rows(&self, dst: &T<Self>, src: &T<Self>, row0: usize, col0: usize) -> Result<()>;

    /// `write_rows` of several `(dst, src, row0, col0)`, in order (a layer's two cache writes). A
    /// backend may run them as one launch; the result is that of the separate calls.
    fn write_rows_many(&self, writes: &[(&T<Self>, &T<Self>, usize, usize)]) -> Result<()> {
        writes.iter().try_for_each(|&(dst, src, row0, col0)| self.write_rows(dst, src, row0, col0))
    }

    /// Softmax router (Qwen3-MoE): probs = softmax(logits `[n, E]`) in f32, take the top k
    /// (ties to the lower expert id), and divide by their sum when `renormalize`.
    /// Returns (ids u32 `[n, k]`, weights f32 `[n, k]`), slots in descending probability.
    fn route_softmax(&self, logits: &T<Self>, k: usize, renormalize: bool) -> Result<(T<Self>, T<Self>)>;

    /// Sigmoid router with correction bias and group-limited top-k (GLM-4.7-Flash / DeepSeek-V3):
    /// s = sigmoid(logits); b = s + bias (bias f32 `[E]`, selection only); each of `n_group`
    /// equal groups scores the sum of its top-2 `b`; keep the best `topk_group` groups; pick the
    /// top k of `b` among their experts (ties to the lower id); weights are the *unbiased* `s` of
    /// those, divided by their sum when `renormalize`, times `scale`.
    fn route_sigmoid_grouped(
        &self,
        logits: &T<Self>,
        bias: &T<Self>,
        spec: GroupedRouter,
    ) -> Result<(T<Self>, T<Self>)>;

    /// Mixture of experts: x `[n, H]` (f32 or bf16), ids u32 `[n, k]`, weights f32 `[n, k]`.
    /// `out[t] = shared(x[t]) + Σ_slot weights[t,slot] * expert(ids[t,slot])(x[t])`, where an
    /// expert (and the shared one) is `down · (silu(gate·x) * (up·x))` with `gate_up` rows
    /// `[gate; up]` per expert. Every (token, slot) pair is computed exactly once, the sum runs
    /// in slot order after the shared term, and no float atomics are used (deterministic).
    /// With bf16 x (a bf16-activation prefill) the intermediate `silu(gate·x) * (up·x)` is
    /// rounded to bf16 (to nearest even) before `down` reads it, as vLLM and PyTorch run bf16
    /// experts. Every backend rounds at that point: the bf16 goldens compare each against the
    /// reference twin, and a near-tie router turns a rounding one side skips into a large move.
    fn moe(
        &self,
        x: &T<Self>,
        ids: &T<Self>,
        weights: &T<Self>,
        experts: MoeWeights<'_, Self::Weight>,
        path: MoePath,
    ) -> Result<T<Self>>;

    /// `moe(x, ids, weights, experts, path)` added to the residual `r` `[n, H]` and that sum
    /// normed: `(r + moe, rms_norm(r + moe, w, eps))`, as `add_rms_norm` gives them. A layer's
    /// MoE with its residual add and the next layer's input norm, so a backend can sum the
    /// experts' terms in the norm's pass (the default runs moe, then add_rms_norm).
    #[allow(clippy::too_many_arguments)]
    fn moe_add_rms_norm(
        &self,
        x: &T<Self>,
        ids: &T<Self>,
        weights: &T<Self>,
        experts: MoeWeights<'_, Self::Weight>,
        path: MoePath,
        r: &T<Self>,
        w: &T<Self>,
        eps: f32,
    ) -> Result<(T<Self>, T<Self>)> {
        self.add_rms_norm(r, &self.moe(x, ids, weights, experts, path)?, w, eps)
    }

    /// Causal GQA attention: q `[T, Hq, D]`, caches k `[S, Hkv, D]`, v `[S, Hkv, Dv]` (S ≥ pos0+T).
    /// Query t sits at position `pos0 + t` and attends to cache rows `0..=pos0+t`; query head h
    /// reads kv head `h / (Hq/Hkv)`. Scores are `q·k * scale`, softmax in f32. -> `[T, Hq, Dv]`.
    fn attention_gqa(
        &self,
        q: &T<Self>,
        k: &T<Self>,
        v: &T<Self>,
        pos0: usize,
        scale: f32,
    ) -> Result<T<Self>>;

    /// Causal MLA attention in the absorbed form over a latent cache `[S, L + R]` (row = normed
    /// latent `c` then roped shared key `k_r`): q_lat `[T, H, L]`, q_rope `[T, H, R]`;
    /// score_j = `(q_lat·c_j + q_rope·k_r_j) * scale`; out = `Σ_j p_j c_j` -> `[T, H, L]`.
    fn attention_mla(
        &self,
        q_lat: &T<Self>,
        q_rope: &T<Self>,
        cache: &T<Self>,
        pos0: usize,
        scale: f32,
    ) -> Result<T<Self>>;

    /// [`Backend::attention_gqa`] whose products (scores, probabilities times values) may read
    /// their inputs rounded to bf16 (8 mantissa bits, 2^-9 relative), as FlashAttention and vLLM
    /// compute them: for prefills that run on bf16 activations anyway. Scores, the softmax and
    /// the outputs stay f32. A backend may round less (TF32, or not at all); one without a
    /// faster form computes `attention_gqa`.
    fn attention_gqa_bf16(
        &self,
        q: &T<Self>,
        k: &T<Self>,
        v: &T<Self>,
        pos0: usize,
        scale: f32,
    ) -> Result<T<Self>> {
        self.attention_gqa(q, k, v, pos0, scale)
    }

    /// [`Backend::attention_mla`] with products that may read bf16-rounded inputs, as
    /// [`Backend::attention_gqa_bf16`].
    fn attention_mla_bf16(
        &self,
        q_lat: &T<Self>,
        q_rope: &T<Self>,
        cache: &T<Self>,
        pos0: usize,
        scale: f32,
    ) -> Result<T<Self>> {
        self.attention_mla(q_lat, q_rope, cache, pos0, scale)
    }

    /// Causal MLA attention in the expanded form (as transformers computes it): every head's keys
    /// and values come from `kv` `[S, H, N + Dv]`, the cached latents times `kv_b` (per head its
    /// N W_UK rows, then its Dv W_UV rows), and the keys share the roped part `k_rope` `[S, R]`.
    /// q_nope `[T, H, N]`, q_rope `[T, H, R]`; query t sits at position `pos0 + t` and attends
    /// rows `0..=pos0+t`; score_j = `(q_nope·kv_j[..N] + q_rope·k_rope_j) * scale`;
    /// out = `Σ_j p_j kv_j[N..]` -> `[T, H, Dv]`, the heads' outputs after W_UV. Equal to the
    /// absorbed form in exact arithmetic, with fewer products when a prefill chunk's queries are
    /// many against its keys ([`mla_expansion_pays`]): no per-query head products, and scores
    /// over N + R instead of L + R.
    /// `bf16`: the products may read their inputs rounded to bf16, as
    /// [`Backend::attention_gqa_bf16`]. The default is [`attention_mla_expanded_by_gqa`].
    #[allow(clippy::too_many_arguments)]
    fn attention_mla_expanded(
        &self,
        q_nope: &T<Self>,
        q_rope: &T<Self>,
        kv: &T<Self>,
        k_rope: &T<Self>,
        pos0: usize,
        scale: f32,
        bf16: bool,
    ) -> Result<T<Self>> {
        attention_mla_expanded_by_gqa(self, q_nope, q_rope, kv, k_rope, pos0, scale, bf16)
    }

    /// Whether an MLA model should attend `queries` new rows over `keys` cached ones (the new
    /// included) in the expanded form ([`Backend::attention_mla_expanded`] after the latents'
    /// `kv_b` product) rather than the absorbed one. The default keeps the absorbed form.
    fn mla_expands(&self, queries: usize, keys: usize) -> bool {
        let _ = (queries, keys);
        false
    }

    /// Index of the largest value per row (ties to the lower index): `[n, V]` -> u32 `[n]`.
    fn argmax(&self, x: &T<Self>) -> Result<T<Self>>;

    /// The k largest values per row, descending (ties to the lower index):
    /// `[n, V]` -> (values f32 `[n, k]`, ids u32 `[n, k]`).
    fn top_k(&self, x: &T<Self>, k: usize) -> Result<(T<Self>, T<Self>)>;

    /// Each row's sampling weights summed per [`sampling::WEIGHT_CHUNK`] ids, exactly as
    /// [`sampling::weight_sums`] computes them (the same bits: they feed the host's draw):
    /// x `[n, V]`, `top` `[n, k]` with each row's largest value in column 0 (the values
    /// [`Backend::top_k`] returns) -> f32 `[n, ceil(V / WEIGHT_CHUNK)]`. A sampler that draws
    /// from the whole row then downloads these and the best few logits instead of the row.
    /// The default computes them on the host.
    fn weight_sums(&self, x: &T<Self>, top: &T<Self>, spec: sampling::WeightSpec) -> Result<T<Self>> {
        const OP: &str = "weight_sums";
        let (s, ts) = (x.shape().to_vec(), top.shape().to_vec());
        if s.len() != 2 || ts.len() != 2 || ts[0] != s[0] || ts[1] == 0 {
            return Err(Error::Shape { op: OP, detail: format!("x {s:?} with top {ts:?}") });
        }
        let xv = self.download(x)?.into_f32()?;
        let tv = self.download(top)?.into_f32()?;
        let chunks = s[1].div_ceil(sampling::WEIGHT_CHUNK);
        let mut sums = Vec::with_capacity(s[0] * chunks);
        for r in 0..s[0] {
            let row = &xv[r * s[1]..(r + 1) * s[1]];
            sums.extend(sampling::weight_sums(row, tv[r * ts[1]], spec));
        }
        self.upload(HostTensor::F32(&sums, &[s[0], chunks]))
    }

    /// Whether [`Backend::weight_sums`] runs on the device, so that downloading its sums beats
    /// downloading the whole row (the default's sums are made on the host from a download).
    fn device_weight_sums(&self) -> bool {
        false
    }
}

/// [`Backend::norm_ropes_to_cache`] as `norm_ropes` and `write_rows_many`: the trait's default,
/// and what a backend falls back to where its one-launch form does not fit.
#[allow(clippy::too_many_arguments)]
pub fn norm_ropes_to_cache_separately<B: Backend + ?Sized>(
    b: &B,
    q: (&T<B>, &T<B>, f32),
    k: (&T<B>, &T<B>, f32),
    v: &T<B>,
    positions: &T<B>,
    spec: Rope,
    caches: (&T<B>, &T<B>),
    row0: usize,
) -> Result<T<B>> {
    let [qr, kr]: [T<B>; 2] = b
        .norm_ropes(&[q, k], positions, spec)?
        .try_into()
        .map_err(|_| Error::Shape { op: "norm_ropes_to_cache", detail: "not two outputs".into() })?;
    let n = kr.shape().first().copied().unwrap_or(0);
    let kr = kr.reshape(&[n, kr.numel() / n.max(1)])?;
    b.write_rows_many(&[(caches.0, &kr, row0, 0), (caches.1, v, row0, 0)])?;
    Ok(qr)
}

/// The row width `H * D` of [`Backend::norm_ropes_to_cache`]'s k `[n, H, D]` when a one-launch
/// form can write it and v straight into the caches: v f32 `[n, H * D]` and both caches f32
/// `[S, H * D]`. None sends a backend to [`norm_ropes_to_cache_separately`] (which also gives
/// the errors of bad shapes).
pub fn cache_row_width<S>(k: &Tensor<S>, v: &Tensor<S>, caches: (&Tensor<S>, &Tensor<S>)) -> Option<usize> {
    let s = k.shape();
    let width = s.iter().skip(1).product::<usize>();
    let fits = s.len() == 3
        && v.dtype() == DType::F32
        && v.shape() == [s[0], width]
        && [caches.0, caches.1]
            .iter()
            .all(|c| c.dtype() == DType::F32 && c.shape().len() == 2 && c.shape()[1] == width);
    fits.then_some(width)
}

/// `split_rope` of x `[n, 1, C]` and `write_rows_many` of its parts into `cache` `[S, C]` at
/// `row0`: [`Backend::split_rope_and_cache`]'s kv row as separate ops (its default's, and what
/// a backend falls back to where its one-launch form does not fit).
pub fn split_rope_into_cache<B: Backend + ?Sized>(
    b: &B,
    (x, a, norm): SplitInput<'_, B>,
    positions: &T<B>,
    spec: Rope,
    cache: &T<B>,
    row0: usize,
) -> Result<()> {
    let &[n, 1, c] = x.shape() else {
        return Err(Error::Shape {
            op: "split_rope_and_cache",
            detail: format!("x {:?}, not [n, 1, C]", x.shape()),
        });
    };
    let (first, rest) = b.split_rope(x, a, norm, positions, spec)?;
    let (first, rest) = (first.reshape(&[n, a])?, rest.reshape(&[n, c - a])?);
    b.write_rows_many(&[(cache, &first, row0, 0), (cache, &rest, row0, a)])
}

/// [`Backend::split_rope`] as its separate ops (two slices, the norm, the rotation): the trait's
/// default, and what a backend falls back to where its one-pass kernel does not fit.
pub fn split_rope_separately<B: Backend + ?Sized>(
    b: &B,
    x: &T<B>,
    a: usize,
    norm: Option<(&T<B>, f32)>,
    positions: &T<B>,
    spec: Rope,
) -> Result<(T<B>, T<B>)> {
    let c = x.shape().last().copied().unwrap_or(0);
    let first = b.slice_cols(x, 0, a)?;
    let first = match norm {
        Some((w, eps)) => b.rms_norm(&first, w, eps)?,
        None => first,
    };
    let rest = b.rope(&b.slice_cols(x, a, c.saturating_sub(a))?, positions, spec)?;
    Ok((first, rest))
}

/// [`Backend::attention_mla_expanded`] from other ops: every head's keys `[k_nope | k_rope]` and
/// values built with `write_rows` / `slice_cols`, then `attention_gqa` (one kv head per query
/// head). The trait's default, and a backend's fallback for widths its kernels do not take.
#[allow(clippy::too_many_arguments)]
pub fn attention_mla_expanded_by_gqa<B: Backend + ?Sized>(
    b: &B,
    q_nope: &T<B>,
    q_rope: &T<B>,
    kv: &T<B>,
    k_rope: &T<B>,
    pos0: usize,
    scale: f32,
    bf16: bool,
) -> Result<T<B>> {
    let check::MlaExpanded { t, heads, nope, r, dv, s } =
        check::attention_mla_expanded(q_nope.shape(), q_rope.shape(), kv.shape(), k_rope.shape(), pos0)?;
    let w = nope + r;
    let q = b.zeros(&[t, heads, w], DType::F32)?;
    b.write_rows(&q, q_nope, 0, 0)?;
    b.write_rows(&q, q_rope, 0, nope)?;
    let k = b.zeros(&[s, heads, w], DType::F32)?;
    b.write_rows(&k, &b.slice_cols(kv, 0, nope)?, 0, 0)?;
    let k_rows = k.reshape(&[s, heads * w])?;
    for h in 0..heads {
        b.write_rows(&k_rows, k_rope, 0, h * w + nope)?;
    }
    let v = b.slice_cols(kv, nope, dv)?;
    if bf16 {
        b.attention_gqa_bf16(&q, &k, &v, pos0, scale)
    } else {
        b.attention_gqa(&q, &k, &v, pos0, scale)
    }
}

/// Whether expanded MLA pays for `queries` new rows over `keys` cached ones (the rule behind the
/// CPU and CUDA backends' [`Backend::mla_expands`]): from 8 queries, with at most 16 keys per
/// query. The latents' kv_b product costs per key about what the absorbed form's two head
/// products cost per query, and each (query, key) pair then scores N + R wide instead of L + R
/// (GLM on the H100: ~0.03 µs per key against ~0.7 µs per query plus ~0.35 ns per pair; on the
/// CPU the 256-token prefill's attention went 1.0 -> 0.46 s over 4 layers).
pub fn mla_expansion_pays(queries: usize, keys: usize) -> bool {
    const MIN_QUERIES: usize = 8;
    const KEYS_PER_QUERY: usize = 16;
    queries >= MIN_QUERIES && keys <= KEYS_PER_QUERY * queries
}
