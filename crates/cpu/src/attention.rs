//! Causal attention (GQA, and MLA in the absorbed latent form), threads over (query row, head).
//!
//! Each (row, head) item computes its scores against every visible cache row, a max-subtracted
//! f32 softmax, and the weighted sum of values — the reference's math, with SIMD dot products.
//! Caches are read in place under the storage lock (no copy of a long KV cache per call).

use crate::gemv::dot;
use crate::isa::Isa;
use fp4moe_ops::reference::{HostBuf, HostStorage};
use fp4moe_ops::{Error, Result, Tensor};
use rayon::prelude::*;
use std::sync::RwLockReadGuard;

type HostT = Tensor<HostStorage>;

fn shape_err(op: &'static str, detail: String) -> Error {
    Error::Shape { op, detail }
}

/// Read access to an f32 tensor's values, checked against its shape.
struct F32View<'a>(RwLockReadGuard<'a, HostBuf>);

impl<'a> F32View<'a> {
    fn new(op: &'static str, t: &'a HostT) -> Result<Self> {
        let g = t.storage.read();
        match &*g {
            HostBuf::F32(v) if v.len() == t.numel() => Ok(F32View(g)),
            b => Err(shape_err(
                op,
                format!("expected f32 {:?}, storage holds {:?} x {}", t.shape(), b.dtype(), b.len()),
            )),
        }
    }
    fn get(&self) -> &[f32] {
        match &*self.0 {
            HostBuf::F32(v) => v,
            _ => unreachable!("checked in new"),
        }
    }
}

/// In place: `p = softmax(p)` (max-subtracted, then normalized by the sum).
fn softmax(p: &mut [f32]) {
    let m = p.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut sum = 0.0f32;
    for v in p.iter_mut() {
        *v = (*v - m).exp();
        sum += *v;
    }
    for v in p.iter_mut() {
        *v /= sum;
    }
}

/// `o += a * x`.
fn axpy(o: &mut [f32], a: f32, x: &[f32]) {
    for (ov, xv) in o.iter_mut().zip(x) {
        *ov += a * xv;
    }
}

pub(crate) fn gqa(isa: Isa, q: &HostT, k: &HostT, v: &HostT, pos0: usize, scale: f32) -> Result<HostT> {
    const OP: &str = "attention_gqa";
    let dims = fp4moe_ops::check::attention_gqa(q.shape(), k.shape(), v.shape(), pos0)?;
    let fp4moe_ops::check::Gqa { t: t_n, hq, hkv, d, dv, .. } = dims;
    let group = hq / hkv;
    let (qg, kg, vg) = (F32View::new(OP, q)?, F32View::new(OP, k)?, F32View::new(OP, v)?);
    let (qv, kv, vv) = (qg.get(), kg.get(), vg.get());
    let mut out = vec![0.0f32; t_n * hq * dv];
    out.par_chunks_mut(dv.max(1)).enumerate().for_each_init(Vec::new, |p, (idx, o)| {
        let (t, h) = (idx / hq, idx % hq);
        let kh = h / group;
        let len = pos0 + t + 1;
        let qh = &qv[idx * d..(idx + 1) * d];
        p.clear();
        p.extend((0..len).map(|j| dot(isa, qh, &kv[(j * hkv + kh) * d..(j * hkv + kh + 1) * d]) * scale));
        softmax(p);
        for (j, &pj) in p.iter().enumerate() {
            axpy(o, pj, &vv[(j * hkv + kh) * dv..(j * hkv + kh + 1) * dv]);
        }
    });
    Tensor::from_f32(out, &[t_n, hq, dv])
}

pub(crate) fn mla(
    isa: Isa,
    q_lat: &HostT,
    q_rope: &HostT,
    cache: &HostT,
    pos0: usize,
    scale: f32,
) -> Result<HostT> {
    const OP: &str = "attention_mla";
    let dims = fp4moe_ops::check::attention_mla(q_lat.shape(), q_rope.shape(), cache.shape(), pos0)?;
    let fp4moe_ops::check::Mla { t: t_n, heads, l, r, .. } = dims;
    let w = l + r;
    let (a, b, c) = (F32View::new(OP, q_lat)?, F32View::new(OP, q_rope)?, F32View::new(OP, cache)?);
    let (qlv, qrv, cv) = (a.get(), b.get(), c.get());
    let mut out = vec![0.0f32; t_n * heads * l];
    out.par_chunks_mut(l.max(1)).enumerate().for_each_init(Vec::new, |p, (idx, o)| {
        let t = idx / heads;
        let len = pos0 + t + 1;
        let qa = &qlv[idx * l..(idx + 1) * l];
        let qb = &qrv[idx * r..(idx + 1) * r];
        p.clear();
        p.extend((0..len).map(|j| {
            let row = &cv[j * w..(j + 1) * w];
            (dot(isa, qa, &row[..l]) + dot(isa, qb, &row[l..])) * scale
        }));
        softmax(p);
        for (j, &pj) in p.iter().enumerate() {
            axpy(o, pj, &cv[j * w..j * w + l]);
        }
    });
    Tensor::from_f32(out, &[t_n, heads, l])
}
