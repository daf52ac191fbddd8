//! [`Profiled`]: any backend, with every op timed by kind.
//!
//! Each op waits for the device before it starts and after it is enqueued, so its wall time is
//! its host overhead plus its device time, with nothing of the neighbours' overlapped in. That
//! destroys the pipelining a real run has — the totals are slower than an unprofiled run — but
//! it answers "which op kind takes the time", which an end-to-end figure cannot.

use crate::{
    Backend, DType, GroupedRouter, HeadLinear, HostData, HostTensor, HostWeight, LinearPath, MoePath,
    MoeWeights, Result, Rope, T,
};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Calls and time per op kind (a linear is keyed by its weight shape too).
#[derive(Debug, Clone, Default)]
pub struct OpStats {
    pub by_op: BTreeMap<String, (u64, Duration)>,
}

impl OpStats {
    pub fn total(&self) -> Duration {
        self.by_op.values().map(|(_, t)| *t).sum()
    }

    /// `(op, calls, time)`, slowest first.
    pub fn sorted(&self) -> Vec<(String, u64, Duration)> {
        let mut v: Vec<_> = self.by_op.iter().map(|(k, (n, t))| (k.clone(), *n, *t)).collect();
        v.sort_by_key(|e| std::cmp::Reverse(e.2));
        v
    }
}

/// The wrapped backend and its shared statistics ([`Profiled::stats`] hands out the handle, which
/// stays valid after the backend moves into a model).
pub struct Profiled<B> {
    inner: B,
    stats: Arc<Mutex<OpStats>>,
}

impl<B: Backend> Profiled<B> {
    pub fn new(inner: B) -> Self {
        Profiled { inner, stats: Arc::default() }
    }

    pub fn stats(&self) -> Arc<Mutex<OpStats>> {
        self.stats.clone()
    }

    fn time<R>(&self, op: impl FnOnce() -> String, f: impl FnOnce() -> Result<R>) -> Result<R> {
        self.inner.synchronize()?;
        let start = Instant::now();
        let r = f()?;
        self.inner.synchronize()?;
        let dt = start.elapsed();
        let mut s = self.stats.lock().unwrap_or_else(PoisonError::into_inner);
        let e = s.by_op.entry(op()).or_default();
        e.0 += 1;
        e.1 += dt;
        Ok(r)
    }
}

fn rows(x: &[usize]) -> usize {
    x[..x.len().saturating_sub(1)].iter().product()
}

impl<B: Backend> Backend for Profiled<B> {
    type Storage = B::Storage;
    type Weight = B::Weight;

    fn name(&self) -> String {
        format!("{} (profiled)", self.inner.name())
    }
    fn upload(&self, t: HostTensor<'_>) -> Result<T<Self>> {
        self.time(|| "upload".into(), || self.inner.upload(t))
    }
    fn zeros(&self, shape: &[usize], dtype: DType) -> Result<T<Self>> {
        self.time(|| "zeros".into(), || self.inner.zeros(shape, dtype))
    }
    fn download(&self, t: &T<Self>) -> Result<HostData> {
        self.time(|| "download".into(), || self.inner.download(t))
    }
    fn synchronize(&self) -> Result<()> {
        self.inner.synchronize()
    }
    fn kernel_stats(&self) -> Option<Arc<Mutex<OpStats>>> {
        self.inner.kernel_stats()
    }
    fn host_waits(&self) -> Option<Arc<std::sync::atomic::AtomicU64>> {
        self.inner.host_waits()
    }
    fn upload_weight(&self, w: &HostWeight) -> Result<Self::Weight> {
        self.inner.upload_weight(w)
    }
    fn weight_shape(&self, w: &Self::Weight) -> [usize; 2] {
        self.inner.weight_shape(w)
    }
    fn linear_paths(&self) -> Vec<LinearPath> {
        self.inner.linear_paths()
    }
    fn moe_paths(&self) -> Vec<MoePath> {
        self.inner.moe_paths()
    }
    fn embedding(&self, table: &Self::Weight, ids: &T<Self>) -> Result<T<Self>> {
        self.time(|| "embedding".into(), || self.inner.embedding(table, ids))
    }
    fn linear(&self, x: &T<Self>, w: &Self::Weight, path: LinearPath) -> Result<T<Self>> {
        let [n, k] = self.inner.weight_shape(w);
        let m = rows(x.shape());
        self.time(|| format!("linear {n}x{k} m={m}"), || self.inner.linear(x, w, path))
    }
    fn head_linear(&self, x: &T<Self>, w: &Self::Weight, spec: HeadLinear) -> Result<T<Self>> {
        self.time(|| "head_linear".into(), || self.inner.head_linear(x, w, spec))
    }
    fn rms_norm(&self, x: &T<Self>, w: &T<Self>, eps: f32) -> Result<T<Self>> {
        self.time(|| "rms_norm".into(), || self.inner.rms_norm(x, w, eps))
    }
    fn add_rms_norm(&self, a: &T<Self>, b: &T<Self>, w: &T<Self>, eps: f32) -> Result<(T<Self>, T<Self>)> {
        self.time(|| "add_rms_norm".into(), || self.inner.add_rms_norm(a, b, w, eps))
    }
    fn rope(&self, x: &T<Self>, positions: &T<Self>, spec: Rope) -> Result<T<Self>> {
        self.time(|| "rope".into(), || self.inner.rope(x, positions, spec))
    }
    fn norm_rope(
        &self,
        x: &T<Self>,
        w: &T<Self>,
        eps: f32,
        positions: &T<Self>,
        spec: Rope,
    ) -> Result<T<Self>> {
        self.time(|| "norm_rope".into(), || self.inner.norm_rope(x, w, eps, positions, spec))
    }
    fn norm_ropes(
        &self,
        xs: &[(&T<Self>, &T<Self>, f32)],
        positions: &T<Self>,
        spec: Rope,
    ) -> Result<Vec<T<Self>>> {
        self.time(|| "norm_rope".into(), || self.inner.norm_ropes(xs, positions, spec))
    }
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
        self.time(
            || "norm_rope + cache write".into(),
            || self.inner.norm_ropes_to_cache(q, k, v, positions, spec, caches, row0),
        )
    }
    fn split_rope_and_cache(
        &self,
        x: crate::SplitInput<'_, Self>,
        to_cache: crate::SplitInput<'_, Self>,
        positions: &T<Self>,
        spec: Rope,
        cache: &T<Self>,
        row0: usize,
    ) -> Result<(T<Self>, T<Self>)> {
        self.time(
            || "split_rope x2 + cache write".into(),
            || self.inner.split_rope_and_cache(x, to_cache, positions, spec, cache, row0),
        )
    }
    fn split_rope(
        &self,
        x: &T<Self>,
        a: usize,
        norm: Option<(&T<Self>, f32)>,
        positions: &T<Self>,
        spec: Rope,
    ) -> Result<(T<Self>, T<Self>)> {
        self.time(|| "split_rope".into(), || self.inner.split_rope(x, a, norm, positions, spec))
    }
    fn softmax(&self, x: &T<Self>) -> Result<T<Self>> {
        self.time(|| "softmax".into(), || self.inner.softmax(x))
    }
    fn add(&self, a: &T<Self>, b: &T<Self>) -> Result<T<Self>> {
        self.time(|| "add".into(), || self.inner.add(a, b))
    }
    fn silu_mul(&self, x: &T<Self>) -> Result<T<Self>> {
        self.time(|| "silu_mul".into(), || self.inner.silu_mul(x))
    }
    fn slice_cols(&self, x: &T<Self>, start: usize, len: usize) -> Result<T<Self>> {
        self.time(|| "slice_cols".into(), || self.inner.slice_cols(x, start, len))
    }
    fn slice_rows(&self, x: &T<Self>, start: usize, len: usize) -> Result<T<Self>> {
        self.time(|| "slice_rows".into(), || self.inner.slice_rows(x, start, len))
    }
    fn concat_rows(&self, parts: &[&T<Self>]) -> Result<T<Self>> {
        self.time(|| "concat_rows".into(), || self.inner.concat_rows(parts))
    }
    fn cast(&self, x: &T<Self>, dtype: DType) -> Result<T<Self>> {
        self.time(|| "cast".into(), || self.inner.cast(x, dtype))
    }
    fn write_rows(&self, dst: &T<Self>, src: &T<Self>, row0: usize, col0: usize) -> Result<()> {
        self.time(|| "write_rows".into(), || self.inner.write_rows(dst, src, row0, col0))
    }
    fn write_rows_many(&self, writes: &[(&T<Self>, &T<Self>, usize, usize)]) -> Result<()> {
        self.time(|| "write_rows".into(), || self.inner.write_rows_many(writes))
    }
    fn route_softmax(&self, logits: &T<Self>, k: usize, renormalize: bool) -> Result<(T<Self>, T<Self>)> {
        self.time(|| "route_softmax".into(), || self.inner.route_softmax(logits, k, renormalize))
    }
    fn route_sigmoid_grouped(
        &self,
        logits: &T<Self>,
        bias: &T<Self>,
        spec: GroupedRouter,
    ) -> Result<(T<Self>, T<Self>)> {
        self.time(|| "route_sigmoid_grouped".into(), || self.inner.route_sigmoid_grouped(logits, bias, spec))
    }
    fn moe(
        &self,
        x: &T<Self>,
        ids: &T<Self>,
        weights: &T<Self>,
        experts: MoeWeights<'_, Self::Weight>,
        path: MoePath,
    ) -> Result<T<Self>> {
        let m = rows(x.shape());
        self.time(|| format!("moe m={m}"), || self.inner.moe(x, ids, weights, experts, path))
    }
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
        let m = rows(x.shape());
        self.time(
            || format!("moe + add_rms_norm m={m}"),
            || self.inner.moe_add_rms_norm(x, ids, weights, experts, path, r, w, eps),
        )
    }
    fn attention_gqa(
        &self,
        q: &T<Self>,
        k: &T<Self>,
        v: &T<Self>,
        pos0: usize,
        scale: f32,
    ) -> Result<T<Self>> {
        self.time(|| "attention_gqa".into(), || self.inner.attention_gqa(q, k, v, pos0, scale))
    }
    fn attention_mla(
        &self,
        q_lat: &T<Self>,
        q_rope: &T<Self>,
        cache: &T<Self>,
        pos0: usize,
        scale: f32,
    ) -> Result<T<Self>> {
        self.time(|| "attention_mla".into(), || self.inner.attention_mla(q_lat, q_rope, cache, pos0, scale))
    }
    fn attention_gqa_bf16(
        &self,
        q: &T<Self>,
        k: &T<Self>,
        v: &T<Self>,
        pos0: usize,
        scale: f32,
    ) -> Result<T<Self>> {
        self.time(|| "attention_gqa (bf16)".into(), || self.inner.attention_gqa_bf16(q, k, v, pos0, scale))
    }
    fn attention_mla_bf16(
        &self,
        q_lat: &T<Self>,
        q_rope: &T<Self>,
        cache: &T<Self>,
        pos0: usize,
        scale: f32,
    ) -> Result<T<Self>> {
        self.time(
            || "attention_mla (bf16)".into(),
            || self.inner.attention_mla_bf16(q_lat, q_rope, cache, pos0, scale),
        )
    }
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
        self.time(
            || format!("attention_mla_expanded{}", if bf16 { " (bf16)" } else { "" }),
            || self.inner.attention_mla_expanded(q_nope, q_rope, kv, k_rope, pos0, scale, bf16),
        )
    }
    fn mla_expands(&self, queries: usize, keys: usize) -> bool {
        self.inner.mla_expands(queries, keys)
    }
    fn argmax(&self, x: &T<Self>) -> Result<T<Self>> {
        self.time(|| "argmax".into(), || self.inner.argmax(x))
    }
    fn top_k(&self, x: &T<Self>, k: usize) -> Result<(T<Self>, T<Self>)> {
        self.time(|| "top_k".into(), || self.inner.top_k(x, k))
    }
    fn weight_sums(&self, x: &T<Self>, top: &T<Self>, spec: crate::sampling::WeightSpec) -> Result<T<Self>> {
        self.time(|| "weight_sums".into(), || self.inner.weight_sums(x, top, spec))
    }
    fn device_weight_sums(&self) -> bool {
        self.inner.device_weight_sums()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::RefBackend;

    #[test]
    fn profiled_backend_gives_the_inner_results_and_counts_each_op() {
        let p = Profiled::new(RefBackend);
        let stats = p.stats();
        let a = p.upload(HostTensor::F32(&[1.0, 2.0, 3.0], &[1, 3])).unwrap();
        let b = p.upload(HostTensor::F32(&[0.5, 0.5, 0.5], &[1, 3])).unwrap();
        let s = p.add(&a, &b).unwrap();
        let s = p.add(&s, &b).unwrap();
        assert_eq!(p.download(&s).unwrap().into_f32().unwrap(), vec![2.0, 3.0, 4.0]);
        let st = stats.lock().unwrap().clone();
        assert_eq!(st.by_op["add"].0, 2);
        assert_eq!(st.by_op["upload"].0, 2);
        assert_eq!(st.by_op["download"].0, 1);
        assert_eq!(st.sorted().len(), 3);
    }
}
