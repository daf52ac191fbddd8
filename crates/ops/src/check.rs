//! The shape rules of the ops, written once. Every backend validates an op's inputs here before
//! it computes or enqueues anything, so a bad shape is the same error on every backend and never
//! reaches a kernel. Each check returns the dims the op goes on with.

use crate::{DType, Error, GroupedRouter, Result, Tensor};

fn shape_err(op: &'static str, detail: impl Into<String>) -> Error {
    Error::Shape { op, detail: detail.into() }
}

/// Dims of a GQA attention call: q `[t, hq, d]`, k `[s, hkv, d]`, v `[s, hkv, dv]`.
#[derive(Debug, Clone, Copy)]
pub struct Gqa {
    pub t: usize,
    pub hq: usize,
    pub hkv: usize,
    pub d: usize,
    pub dv: usize,
    pub s: usize,
}

/// [`crate::Backend::attention_gqa`]: the shapes above, `hq` a multiple of `hkv > 0`, and room
/// in the cache for the queries at `pos0`.
pub fn attention_gqa(q: &[usize], k: &[usize], v: &[usize], pos0: usize) -> Result<Gqa> {
    let ok = q.len() == 3
        && k.len() == 3
        && v.len() == 3
        && k[0] == v[0]
        && k[1] == v[1]
        && k[1] > 0
        && q[1].is_multiple_of(k[1])
        && q[2] == k[2]
        && k[0] >= pos0 + q[0];
    if !ok {
        return Err(shape_err("attention_gqa", format!("q {q:?}, k {k:?}, v {v:?}, pos0 {pos0}")));
    }
    Ok(Gqa { t: q[0], hq: q[1], hkv: k[1], d: q[2], dv: v[2], s: k[0] })
}

/// Dims of an MLA attention call: q_lat `[t, heads, l]`, q_rope `[t, heads, r]`, cache
/// `[s, l + r]`.
#[derive(Debug, Clone, Copy)]
pub struct Mla {
    pub t: usize,
    pub heads: usize,
    pub l: usize,
    pub r: usize,
    pub s: usize,
}

/// [`crate::Backend::attention_mla`]: the shapes above and room in the cache at `pos0`.
pub fn attention_mla(q_lat: &[usize], q_rope: &[usize], cache: &[usize], pos0: usize) -> Result<Mla> {
    let ok = q_lat.len() == 3
        && q_rope.len() == 3
        && cache.len() == 2
        && q_lat[..2] == q_rope[..2]
        && cache[1] == q_lat[2] + q_rope[2]
        && cache[0] >= pos0 + q_lat[0];
    if !ok {
        return Err(shape_err(
            "attention_mla",
            format!("q_lat {q_lat:?}, q_rope {q_rope:?}, cache {cache:?}, pos0 {pos0}"),
        ));
    }
    Ok(Mla { t: q_lat[0], heads: q_lat[1], l: q_lat[2], r: q_rope[2], s: cache[0] })
}

/// Dims of an expanded MLA attention call: q_nope `[t, heads, nope]`, q_rope `[t, heads, r]`,
/// kv `[s, heads, nope + dv]`, k_rope `[s, r]`.
#[derive(Debug, Clone, Copy)]
pub struct MlaExpanded {
    pub t: usize,
    pub heads: usize,
    pub nope: usize,
    pub r: usize,
    pub dv: usize,
    pub s: usize,
}

/// [`crate::Backend::attention_mla_expanded`]: the shapes above, `dv > 0`, and keys for the
/// queries at `pos0`.
pub fn attention_mla_expanded(
    q_nope: &[usize],
    q_rope: &[usize],
    kv: &[usize],
    k_rope: &[usize],
    pos0: usize,
) -> Result<MlaExpanded> {
    let ok = q_nope.len() == 3
        && q_rope.len() == 3
        && kv.len() == 3
        && k_rope.len() == 2
        && q_nope[..2] == q_rope[..2]
        && kv[1] == q_nope[1]
        && kv[2] > q_nope[2]
        && k_rope[0] == kv[0]
        && k_rope[1] == q_rope[2]
        && kv[0] >= pos0 + q_nope[0];
    if !ok {
        return Err(shape_err(
            "attention_mla_expanded",
            format!("q_nope {q_nope:?}, q_rope {q_rope:?}, kv {kv:?}, k_rope {k_rope:?}, pos0 {pos0}"),
        ));
    }
    let (t, heads, nope) = (q_nope[0], q_nope[1], q_nope[2]);
    Ok(MlaExpanded { t, heads, nope, r: q_rope[2], dv: kv[2] - nope, s: kv[0] })
}

/// [`crate::Backend::write_rows`]: both tensors viewed 2-D, the source inside the destination
/// at `(row0, col0)`, one dtype. Returns `([dst rows, dst cols], [src rows, src cols])`.
pub fn write_rows(
    dst: (&[usize], DType),
    src: (&[usize], DType),
    row0: usize,
    col0: usize,
) -> Result<([usize; 2], [usize; 2])> {
    const OP: &str = "write_rows";
    let (ds, ss) = (dst.0, src.0);
    if ds.is_empty() || ss.is_empty() {
        return Err(shape_err(OP, "scalar tensor"));
    }
    let c = ds[ds.len() - 1];
    let s = ds.iter().product::<usize>() / c.max(1);
    let sc = ss[ss.len() - 1];
    let n = ss.iter().product::<usize>() / sc.max(1);
    if row0 + n > s || col0 + sc > c || dst.1 != src.1 {
        return Err(shape_err(
            OP,
            format!(
                "src {ss:?} {:?} at ({row0}, {col0}) into dst {ds:?} {:?} (viewed [{s}, {c}])",
                src.1, dst.1
            ),
        ));
    }
    Ok(([s, c], [n, sc]))
}

/// [`crate::Backend::route_softmax`]: logits `[n, e]`, `0 < k <= e`. Returns `(n, e)`.
pub fn route_softmax(logits: &[usize], k: usize) -> Result<(usize, usize)> {
    if logits.len() != 2 || k == 0 || k > logits[1] {
        return Err(shape_err("route_softmax", format!("top-{k} of logits {logits:?}")));
    }
    Ok((logits[0], logits[1]))
}

/// [`crate::Backend::route_sigmoid_grouped`]: logits `[n, e]`, bias `[e]`, `e` split into
/// `n_group` equal groups, and enough experts in the kept groups for `k`. Returns `(n, e)`.
pub fn route_sigmoid_grouped(
    logits: &[usize],
    bias: &[usize],
    spec: GroupedRouter,
) -> Result<(usize, usize)> {
    let GroupedRouter { k, n_group, topk_group, .. } = spec;
    let ok = logits.len() == 2
        && bias == [logits[1]]
        && n_group > 0
        && logits[1].is_multiple_of(n_group)
        && topk_group > 0
        && topk_group <= n_group
        && k > 0
        && k <= topk_group * (logits[1] / n_group);
    if !ok {
        return Err(shape_err(
            "route_sigmoid_grouped",
            format!("{spec:?} on logits {logits:?}, bias {bias:?}"),
        ));
    }
    Ok((logits[0], logits[1]))
}

/// Dims of a MoE call (see [`moe`]).
#[derive(Debug, Clone, Copy)]
pub struct Moe {
    pub n: usize,
    pub h: usize,
    pub k: usize,
    pub inter: usize,
    pub shared_inter: Option<usize>,
}

/// [`crate::Backend::moe`]: x `[n, H]`, gate_up `[E * 2I, H]`, down `[E * H, I]` for `E > 0`
/// experts, ids and weights `[n, k]`, and the shared expert's gate_up `[2S, H]` and down
/// `[H, S]`.
pub fn moe(
    x: &[usize],
    gate_up: [usize; 2],
    down: [usize; 2],
    n_experts: usize,
    ids: &[usize],
    weights: &[usize],
    shared: Option<([usize; 2], [usize; 2])>,
) -> Result<Moe> {
    let bad = |d: String| Err(shape_err("moe", d));
    let [gu_rows, h] = gate_up;
    if x.len() != 2 || x[1] != h {
        return bad(format!("x {x:?} against gate_up [{gu_rows}, {h}]"));
    }
    if n_experts == 0 || !gu_rows.is_multiple_of(2 * n_experts) {
        return bad(format!("gate_up rows {gu_rows} are not 2I per expert for {n_experts} experts"));
    }
    let inter = gu_rows / (2 * n_experts);
    if down != [n_experts * h, inter] {
        return bad(format!("down {down:?}, expected [{}, {inter}]", n_experts * h));
    }
    let n = x[0];
    if ids.len() != 2 || ids[0] != n || weights != ids {
        return bad(format!("ids {ids:?} / weights {weights:?} for {n} tokens"));
    }
    let shared_inter = match shared {
        Some((g, d)) => {
            let [r, c] = g;
            if c != h || !r.is_multiple_of(2) || d != [h, r / 2] {
                return bad(format!("shared gate_up {g:?} / down {d:?} for H {h}"));
            }
            Some(r / 2)
        }
        None => None,
    };
    Ok(Moe { n, h, k: ids[1], inter, shared_inter })
}

/// [`crate::Backend::slice_rows`]: rows `start..start + len` inside the first dim. Returns the
/// elements per row.
pub fn slice_rows(shape: &[usize], start: usize, len: usize) -> Result<usize> {
    if shape.is_empty() || start + len > shape[0] {
        return Err(shape_err("slice_rows", format!("rows {start}..{} of {shape:?}", start + len)));
    }
    Ok(shape[1..].iter().product())
}

/// [`crate::Backend::slice_cols`]: columns `start..start + len` inside the last dim. Returns
/// `(rows, cols)` of the input viewed 2-D.
pub fn slice_cols(shape: &[usize], start: usize, len: usize) -> Result<(usize, usize)> {
    let Some(&c) = shape.last() else {
        return Err(shape_err("slice_cols", format!("columns {start}..{} of {shape:?}", start + len)));
    };
    if start + len > c {
        return Err(shape_err("slice_cols", format!("columns {start}..{} of {shape:?}", start + len)));
    }
    Ok((shape.iter().product::<usize>() / c.max(1), c))
}

/// [`crate::Backend::rope`] (and the rotation of [`crate::Backend::norm_rope`], named `op` in the
/// error): x `[n, H, D]` with positions `[n]`, and an even, non-empty run of dims inside the
/// head. Returns `D`.
pub fn rope(op: &'static str, x: &[usize], positions: &[usize], spec: crate::Rope) -> Result<usize> {
    if x.len() != 3 || positions != [x[0]] {
        return Err(shape_err(op, format!("x {x:?} (want [n, H, D]), positions {positions:?}")));
    }
    let d = x[2];
    if spec.dims == 0 || !spec.dims.is_multiple_of(2) || spec.offset + spec.dims > d {
        return Err(shape_err(op, format!("{spec:?} on head dim {d}")));
    }
    Ok(d)
}

/// [`crate::Backend::split_rope`]: x `[n, H, D]` split at 0 < a < D, the rotation valid on the
/// `D - a` columns after it, a norm weight (if any) `[a]`. Returns `[n, H, D]`.
pub fn split_rope(
    x: &[usize],
    a: usize,
    norm: Option<&[usize]>,
    positions: &[usize],
    spec: crate::Rope,
) -> Result<[usize; 3]> {
    const OP: &str = "split_rope";
    let &[n, h, d] = x else {
        return Err(shape_err(OP, format!("x {x:?} (want [n, H, D])")));
    };
    if a == 0 || a >= d {
        return Err(shape_err(OP, format!("split at {a} of x {x:?} (want 0 < a < D)")));
    }
    rope(OP, &[n, h, d - a], positions, spec)?;
    if let Some(w) = norm
        && w != [a]
    {
        return Err(shape_err(OP, format!("first part {a} wide with weight {w:?}")));
    }
    Ok([n, h, d])
}

/// [`crate::Backend::concat_rows`]: at least one part, all with the same trailing shape and
/// dtype. Returns `(elements per row, total rows)`.
pub fn concat_rows<S>(parts: &[&Tensor<S>]) -> Result<(usize, usize)> {
    const OP: &str = "concat_rows";
    let Some(first) = parts.first() else {
        return Err(shape_err(OP, "no parts"));
    };
    let (head, dtype) = (first.shape(), first.dtype());
    if head.is_empty() {
        return Err(shape_err(OP, "scalar part"));
    }
    let tail = &head[1..];
    for p in parts {
        let (s, dt) = (p.shape(), p.dtype());
        if s.is_empty() || &s[1..] != tail || dt != dtype {
            return Err(shape_err(OP, format!("{s:?} {dt:?} after {head:?} {dtype:?}")));
        }
    }
    Ok((tail.iter().product(), parts.iter().map(|p| p.shape()[0]).sum()))
}
