//! The reference twin of every op: plain, single-threaded, obviously-correct Rust.
//! Weights are decoded with [`fp4moe_ops::HostWeight::row_f32`](crate::HostWeight::row_f32)
//! (the `fp4` crate's decode) and all math is f32. Fast backends are tested against this.
//!
//! [`HostStorage`] is also the storage of the fast CPU backend, which delegates the ops it does
//! not accelerate to [`RefBackend`] (same storage, same weight type) and builds tensors with the
//! helpers on [`HostStorage`] and `Tensor<HostStorage>`.
//!
//! Where the trait leaves a choice open, this file fixes it and the conformance suite checks it:
//! - sums run sequentially in index order (a fast backend may reorder; tolerances allow for that);
//! - `linear` and `argmax` also accept leading dims (`[.., K]`), following the crate's shape convention;
//! - the sigmoid router returns its slots in descending *biased* score (ties to the lower id);
//! - the data-movement ops (`slice_*`, `concat_rows`, `write_rows`) work on every dtype.

use crate::{
    Backend, DType, Error, GroupedRouter, HeadLinear, HostData, HostTensor, HostWeight, LinearPath, MoePath,
    MoeWeights, Result, Rope, RopeStyle, Tensor,
};
use half::bf16;
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Host memory behind a tensor of the reference and CPU backends.
#[derive(Debug)]
pub struct HostStorage(pub RwLock<HostBuf>);

/// Typed host buffer.
#[derive(Debug, Clone, PartialEq)]
pub enum HostBuf {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    U32(Vec<u32>),
}

impl HostBuf {
    pub fn dtype(&self) -> DType {
        match self {
            HostBuf::F32(_) => DType::F32,
            HostBuf::BF16(_) => DType::BF16,
            HostBuf::U32(_) => DType::U32,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            HostBuf::F32(v) => v.len(),
            HostBuf::BF16(v) => v.len(),
            HostBuf::U32(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A zero-filled buffer of `n` elements.
    pub fn zeros(n: usize, dtype: DType) -> HostBuf {
        match dtype {
            DType::F32 => HostBuf::F32(vec![0.0; n]),
            DType::BF16 => HostBuf::BF16(vec![bf16::ZERO; n]),
            DType::U32 => HostBuf::U32(vec![0; n]),
        }
    }

    /// The values as f32 (bf16 widened exactly); u32 buffers are an error, not a numeric cast,
    /// because an index tensor read as activations is always a bug.
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        match self {
            HostBuf::F32(v) => Ok(v.clone()),
            HostBuf::BF16(v) => Ok(v.iter().map(|x| x.to_f32()).collect()),
            HostBuf::U32(_) => Err(shape_err("to_f32_vec", "expected f32 or bf16 data, got u32")),
        }
    }
}

impl HostStorage {
    pub fn new(buf: HostBuf) -> HostStorage {
        HostStorage(RwLock::new(buf))
    }
    pub fn f32(v: Vec<f32>) -> HostStorage {
        HostStorage::new(HostBuf::F32(v))
    }
    pub fn bf16(v: Vec<bf16>) -> HostStorage {
        HostStorage::new(HostBuf::BF16(v))
    }
    pub fn u32(v: Vec<u32>) -> HostStorage {
        HostStorage::new(HostBuf::U32(v))
    }

    /// Shared access. A panic in another thread while it held the lock leaves plain data
    /// behind (no invariants span the lock), so poisoning is ignored.
    pub fn read(&self) -> RwLockReadGuard<'_, HostBuf> {
        self.0.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Exclusive access (see [`HostStorage::read`] on poisoning).
    pub fn write(&self) -> RwLockWriteGuard<'_, HostBuf> {
        self.0.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// A copy of the values as f32 (see [`HostBuf::to_f32_vec`]).
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        self.read().to_f32_vec()
    }
}

/// Tensors of the host backends.
pub type HostT = Tensor<HostStorage>;

impl Tensor<HostStorage> {
    /// A tensor owning `buf`, checked against `shape`.
    pub fn from_buf(buf: HostBuf, shape: &[usize]) -> Result<HostT> {
        let n: usize = shape.iter().product();
        if buf.len() != n {
            return Err(shape_err("from_buf", format!("{} elements for shape {shape:?} ({n})", buf.len())));
        }
        let dtype = buf.dtype();
        Ok(Tensor::new(Arc::new(HostStorage::new(buf)), shape.to_vec(), dtype))
    }
    pub fn from_f32(v: Vec<f32>, shape: &[usize]) -> Result<HostT> {
        Tensor::from_buf(HostBuf::F32(v), shape)
    }
    pub fn from_u32(v: Vec<u32>, shape: &[usize]) -> Result<HostT> {
        Tensor::from_buf(HostBuf::U32(v), shape)
    }

    /// A checked copy of the buffer: its dtype and length must match the tensor's.
    pub fn host_buf(&self, op: &'static str) -> Result<HostBuf> {
        let buf = self.storage.read();
        check_buf(op, self, &buf)?;
        Ok(buf.clone())
    }

    /// The values of an f32 tensor (bf16 and u32 are errors: use [`Self::activations`]).
    pub fn f32_vec(&self, op: &'static str) -> Result<Vec<f32>> {
        let buf = self.storage.read();
        check_buf(op, self, &buf)?;
        match &*buf {
            HostBuf::F32(v) => Ok(v.clone()),
            other => Err(shape_err(op, format!("expected f32, got {:?}", other.dtype()))),
        }
    }

    /// The values of an f32 or bf16 tensor, as f32.
    pub fn activations(&self, op: &'static str) -> Result<Vec<f32>> {
        let buf = self.storage.read();
        check_buf(op, self, &buf)?;
        match &*buf {
            HostBuf::U32(_) => Err(shape_err(op, "expected f32 or bf16, got u32")),
            b => b.to_f32_vec(),
        }
    }

    /// The values of a u32 tensor.
    pub fn u32_vec(&self, op: &'static str) -> Result<Vec<u32>> {
        let buf = self.storage.read();
        check_buf(op, self, &buf)?;
        match &*buf {
            HostBuf::U32(v) => Ok(v.clone()),
            other => Err(shape_err(op, format!("expected u32, got {:?}", other.dtype()))),
        }
    }
}

fn check_buf(op: &'static str, t: &HostT, buf: &HostBuf) -> Result<()> {
    if buf.dtype() != t.dtype() {
        return Err(shape_err(op, format!("tensor says {:?}, storage holds {:?}", t.dtype(), buf.dtype())));
    }
    if buf.len() != t.numel() {
        return Err(shape_err(
            op,
            format!("shape {:?} needs {} elements, storage holds {}", t.shape(), t.numel(), buf.len()),
        ));
    }
    Ok(())
}

pub(crate) fn shape_err(op: &'static str, detail: impl Into<String>) -> Error {
    Error::Shape { op, detail: detail.into() }
}

/// `1 / theta^(2i/dims)` for `i < dims/2`, computed in f32 as transformers does
/// (`1.0 / (base ** (arange(0, dims, 2).float() / dims))`), so angles match to the last bit
/// wherever `powf` agrees with torch's `pow`.
pub fn rope_inv_freq(dims: usize, theta: f32) -> Vec<f32> {
    (0..dims / 2).map(|i| 1.0 / theta.powf((2 * i) as f32 / dims as f32)).collect()
}

/// Indices of the `k` largest values, descending, ties to the lower index. NaN ranks below
/// every number so that a NaN logit is never selected over a real one.
pub fn top_k_indices(row: &[f32], k: usize) -> Vec<usize> {
    let key = |v: f32| if v.is_nan() { f32::NEG_INFINITY } else { v };
    // Descending key, then ascending index (the tie rule): a total order, so selecting the k
    // first and sorting them gives what sorting the whole row would (a greedy step's 151936
    // logits need one pass, not a sort).
    // (partial_cmp: -0 and +0 are equal, as on the GPUs; no NaN is left to compare.)
    let order = |a: &usize, b: &usize| {
        key(row[*b]).partial_cmp(&key(row[*a])).unwrap_or(std::cmp::Ordering::Equal).then(a.cmp(b))
    };
    let k = k.min(row.len());
    if k == 1 {
        return vec![(1..row.len()).fold(0, |best, i| if order(&i, &best).is_lt() { i } else { best })];
    }
    let mut idx: Vec<usize> = (0..row.len()).collect();
    if k > 0 && k < idx.len() {
        idx.select_nth_unstable_by(k - 1, order);
    }
    idx.truncate(k);
    idx.sort_unstable_by(order);
    idx
}

/// `silu(g) = g * sigmoid(g)`, written as torch evaluates it.
pub fn silu(g: f32) -> f32 {
    g / (1.0 + (-g).exp())
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0.0f32, |s, (x, y)| s + x * y)
}

/// Softmax of one row in place: max-subtracted, f32.
fn softmax_row(row: &mut [f32]) {
    let m = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut sum = 0.0f32;
    for v in row.iter_mut() {
        *v = (*v - m).exp();
        sum += *v;
    }
    for v in row.iter_mut() {
        *v /= sum;
    }
}

/// Checks that an uploaded host weight's buffers match its declared shape, so that row decoding
/// can index without panicking.
fn check_weight(op: &'static str, w: &HostWeight) -> Result<()> {
    match w {
        HostWeight::Quant(q) => {
            let block = q.format.block();
            if !q.cols.is_multiple_of(block)
                || q.codes.len() != q.rows * q.cols / 2
                || q.scales.len() != q.rows * (q.cols / block)
                || q.tensor_scales.is_empty()
                || !q.rows.is_multiple_of(q.tensor_scales.len())
            {
                return Err(shape_err(
                    op,
                    format!(
                        "{} matrix [{}, {}] with {} code bytes, {} scale bytes, {} tensor scales",
                        q.format.name(),
                        q.rows,
                        q.cols,
                        q.codes.len(),
                        q.scales.len(),
                        q.tensor_scales.len()
                    ),
                ));
            }
        }
        HostWeight::Dense { rows, cols, dtype, bytes } => {
            if bytes.len() != rows * cols * dtype.size() {
                return Err(shape_err(
                    op,
                    format!("dense {dtype:?} [{rows}, {cols}] with {} bytes", bytes.len()),
                ));
            }
        }
    }
    Ok(())
}

/// Decodes one weight row into a reusable buffer.
struct RowReader<'a> {
    w: &'a HostWeight,
    buf: Vec<f32>,
}

impl<'a> RowReader<'a> {
    fn new(w: &'a HostWeight) -> Self {
        RowReader { w, buf: vec![0.0; w.shape()[1]] }
    }
    fn row(&mut self, r: usize) -> &[f32] {
        self.w.row_f32(r, &mut self.buf);
        &self.buf
    }
}

/// The reference backend: every op of [`Backend`] as plain loops over host memory.
#[derive(Debug, Default, Clone)]
pub struct RefBackend;

impl RefBackend {
    pub fn new() -> Self {
        RefBackend
    }
}

/// `y[m, :] = W · x[m, :]` for `x [M, K]`, `W [N, K]`: each weight row decoded once.
fn matmul_t(x: &[f32], m: usize, w: &HostWeight) -> Vec<f32> {
    let [n, k] = w.shape();
    let mut y = vec![0.0f32; m * n];
    let mut rr = RowReader::new(w);
    for j in 0..n {
        let row = rr.row(j);
        for i in 0..m {
            y[i * n + j] = dot(&x[i * k..(i + 1) * k], row);
        }
    }
    y
}

/// One SwiGLU expert on one token: rows `gu0..gu0+2I` of `gate_up` (gate then up) and rows
/// `d0..d0+H` of `down`; `bf16_act` (bf16 x, [`crate::Backend::moe`]): the intermediate rounded
/// to bf16 before `down` reads it.
fn expert(
    x: &[f32],
    gate_up: &HostWeight,
    gu0: usize,
    down: &HostWeight,
    d0: usize,
    i: usize,
    bf16_act: bool,
) -> Vec<f32> {
    let h = x.len();
    let mut gate = vec![0.0f32; i];
    let mut rr = RowReader::new(gate_up);
    for (j, g) in gate.iter_mut().enumerate() {
        *g = dot(rr.row(gu0 + j), x);
    }
    let mut act = vec![0.0f32; i];
    for (j, a) in act.iter_mut().enumerate() {
        let up = dot(rr.row(gu0 + i + j), x);
        *a = silu(gate[j]) * up;
        if bf16_act {
            *a = bf16::from_f32(*a).to_f32();
        }
    }
    let mut rd = RowReader::new(down);
    (0..h).map(|r| dot(rd.row(d0 + r), &act)).collect()
}

fn slice_cols_vec<E: Copy>(v: &[E], rows: usize, c: usize, start: usize, len: usize) -> Vec<E> {
    let mut out = Vec::with_capacity(rows * len);
    for r in 0..rows {
        out.extend_from_slice(&v[r * c + start..r * c + start + len]);
    }
    out
}

fn write_rows_vec<E: Copy>(dst: &mut [E], c: usize, src: &[E], sc: usize, row0: usize, col0: usize) {
    for (i, s) in src.chunks_exact(sc.max(1)).enumerate() {
        let d = (row0 + i) * c + col0;
        dst[d..d + sc].copy_from_slice(&s[..sc]);
    }
}

impl Backend for RefBackend {
    type Storage = HostStorage;
    type Weight = HostWeight;

    fn name(&self) -> String {
        "reference".into()
    }

    fn upload(&self, t: HostTensor<'_>) -> Result<HostT> {
        match t {
            HostTensor::F32(v, shape) => Tensor::from_f32(v.to_vec(), shape),
            HostTensor::U32(v, shape) => Tensor::from_u32(v.to_vec(), shape),
        }
    }

    fn zeros(&self, shape: &[usize], dtype: DType) -> Result<HostT> {
        Tensor::from_buf(HostBuf::zeros(shape.iter().product(), dtype), shape)
    }

    fn download(&self, t: &HostT) -> Result<HostData> {
        Ok(match t.host_buf("download")? {
            HostBuf::U32(v) => HostData::U32(v),
            b => HostData::F32(b.to_f32_vec()?),
        })
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn upload_weight(&self, w: &HostWeight) -> Result<HostWeight> {
        check_weight("upload_weight", w)?;
        Ok(w.clone())
    }

    fn weight_shape(&self, w: &HostWeight) -> [usize; 2] {
        w.shape()
    }

    /// The reference has one loop per op; it answers every path with it and lists only one.
    fn linear_paths(&self) -> Vec<LinearPath> {
        vec![LinearPath::Decode]
    }

    fn moe_paths(&self) -> Vec<MoePath> {
        vec![MoePath::Decode]
    }

    fn embedding(&self, table: &HostWeight, ids: &HostT) -> Result<HostT> {
        const OP: &str = "embedding";
        check_weight(OP, table)?;
        if ids.shape().len() != 1 {
            return Err(shape_err(OP, format!("ids must be [n], got {:?}", ids.shape())));
        }
        let ids = ids.u32_vec(OP)?;
        let [v, h] = table.shape();
        let mut out = vec![0.0f32; ids.len() * h];
        for (i, &id) in ids.iter().enumerate() {
            if id as usize >= v {
                return Err(shape_err(OP, format!("id {id} at {i} is out of range for {v} rows")));
            }
            table.row_f32(id as usize, &mut out[i * h..(i + 1) * h]);
        }
        Tensor::from_f32(out, &[ids.len(), h])
    }

    fn linear(&self, x: &HostT, w: &HostWeight, _path: LinearPath) -> Result<HostT> {
        const OP: &str = "linear";
        check_weight(OP, w)?;
        let [n, k] = w.shape();
        if x.shape().is_empty() || x.last_dim() != k {
            return Err(shape_err(OP, format!("x {:?} against weight [{n}, {k}]", x.shape())));
        }
        let xv = x.activations(OP)?;
        let m = x.rows();
        let mut shape = x.shape().to_vec();
        *shape.last_mut().expect("non-empty") = n;
        Tensor::from_f32(matmul_t(&xv, m, w), &shape)
    }

    fn head_linear(&self, x: &HostT, w: &HostWeight, spec: HeadLinear) -> Result<HostT> {
        const OP: &str = "head_linear";
        check_weight(OP, w)?;
        let HeadLinear { heads, rows_per_head, row_start, row_count, transpose } = spec;
        let [rows, k] = w.shape();
        if rows != heads * rows_per_head || row_start + row_count > rows_per_head {
            return Err(shape_err(OP, format!("{spec:?} against weight [{rows}, {k}]")));
        }
        let kx = if transpose { row_count } else { k };
        let s = x.shape();
        if s.len() != 3 || s[1] != heads || s[2] != kx {
            return Err(shape_err(OP, format!("x {s:?}, expected [M, {heads}, {kx}] for {spec:?}")));
        }
        let m = s[0];
        let xv = x.f32_vec(OP)?;
        let ky = if transpose { k } else { row_count };
        let mut y = vec![0.0f32; m * heads * ky];
        let mut rr = RowReader::new(w);
        for h in 0..heads {
            for r in 0..row_count {
                let row = rr.row(h * rows_per_head + row_start + r);
                for t in 0..m {
                    let xh = &xv[(t * heads + h) * kx..(t * heads + h + 1) * kx];
                    let yh = &mut y[(t * heads + h) * ky..(t * heads + h + 1) * ky];
                    if transpose {
                        // Rows accumulate in order r = 0, 1, …, the same order as a dot over r.
                        for (yk, wk) in yh.iter_mut().zip(row) {
                            *yk += wk * xh[r];
                        }
                    } else {
                        yh[r] = dot(row, xh);
                    }
                }
            }
        }
        Tensor::from_f32(y, &[m, heads, ky])
    }

    fn rms_norm(&self, x: &HostT, w: &HostT, eps: f32) -> Result<HostT> {
        const OP: &str = "rms_norm";
        let d = x.last_dim();
        if x.shape().is_empty() || w.shape() != [d] {
            return Err(shape_err(OP, format!("x {:?} with weight {:?}", x.shape(), w.shape())));
        }
        let mut xv = x.f32_vec(OP)?;
        let wv = w.f32_vec(OP)?;
        for row in xv.chunks_exact_mut(d.max(1)) {
            let ms = row.iter().fold(0.0f32, |s, v| s + v * v) / d as f32;
            let r = 1.0 / (ms + eps).sqrt();
            for (v, g) in row.iter_mut().zip(&wv) {
                *v = g * (*v * r);
            }
        }
        Tensor::from_f32(xv, x.shape())
    }

    fn rope(&self, x: &HostT, positions: &HostT, spec: Rope) -> Result<HostT> {
        const OP: &str = "rope";
        let s = x.shape();
        let d = crate::check::rope(OP, s, positions.shape(), spec)?;
        let mut xv = x.f32_vec(OP)?;
        let pos = positions.u32_vec(OP)?;
        let inv = rope_inv_freq(spec.dims, spec.theta);
        let half = spec.dims / 2;
        for (t, &p) in pos.iter().enumerate() {
            for head in xv[t * s[1] * d..(t + 1) * s[1] * d].chunks_exact_mut(d) {
                let r = &mut head[spec.offset..spec.offset + spec.dims];
                for (i, &f) in inv.iter().enumerate() {
                    let angle = p as f32 * f;
                    let (sin, cos) = angle.sin_cos();
                    let (ia, ib) = match spec.style {
                        RopeStyle::NeoX => (i, i + half),
                        RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                    };
                    let (a, b) = (r[ia], r[ib]);
                    r[ia] = a * cos - b * sin;
                    r[ib] = b * cos + a * sin;
                }
            }
        }
        Tensor::from_f32(xv, s)
    }

    fn softmax(&self, x: &HostT) -> Result<HostT> {
        const OP: &str = "softmax";
        if x.shape().is_empty() {
            return Err(shape_err(OP, "scalar input"));
        }
        let mut xv = x.f32_vec(OP)?;
        for row in xv.chunks_exact_mut(x.last_dim().max(1)) {
            softmax_row(row);
        }
        Tensor::from_f32(xv, x.shape())
    }

    fn add(&self, a: &HostT, b: &HostT) -> Result<HostT> {
        const OP: &str = "add";
        if a.shape() != b.shape() {
            return Err(shape_err(OP, format!("{:?} + {:?}", a.shape(), b.shape())));
        }
        let bv = b.f32_vec(OP)?;
        let mut av = a.f32_vec(OP)?;
        for (x, y) in av.iter_mut().zip(&bv) {
            *x += y;
        }
        Tensor::from_f32(av, a.shape())
    }

    fn silu_mul(&self, x: &HostT) -> Result<HostT> {
        const OP: &str = "silu_mul";
        let c = x.last_dim();
        if x.shape().is_empty() || !c.is_multiple_of(2) {
            return Err(shape_err(OP, format!("last dim of {:?} must be even", x.shape())));
        }
        let i = c / 2;
        let xv = x.f32_vec(OP)?;
        let mut out = Vec::with_capacity(xv.len() / 2);
        for row in xv.chunks_exact(c.max(1)) {
            out.extend((0..i).map(|j| silu(row[j]) * row[i + j]));
        }
        let mut shape = x.shape().to_vec();
        *shape.last_mut().expect("non-empty") = i;
        Tensor::from_f32(out, &shape)
    }

    fn slice_cols(&self, x: &HostT, start: usize, len: usize) -> Result<HostT> {
        const OP: &str = "slice_cols";
        let (_, c) = crate::check::slice_cols(x.shape(), start, len)?;
        let rows = x.rows();
        let buf = match x.host_buf(OP)? {
            HostBuf::F32(v) => HostBuf::F32(slice_cols_vec(&v, rows, c, start, len)),
            HostBuf::BF16(v) => HostBuf::BF16(slice_cols_vec(&v, rows, c, start, len)),
            HostBuf::U32(v) => HostBuf::U32(slice_cols_vec(&v, rows, c, start, len)),
        };
        let mut shape = x.shape().to_vec();
        *shape.last_mut().expect("non-empty") = len;
        Tensor::from_buf(buf, &shape)
    }

    fn slice_rows(&self, x: &HostT, start: usize, len: usize) -> Result<HostT> {
        const OP: &str = "slice_rows";
        crate::check::slice_rows(x.shape(), start, len)?;
        let s = x.shape();
        let per: usize = s[1..].iter().product();
        let (a, b) = (start * per, (start + len) * per);
        let buf = match x.host_buf(OP)? {
            HostBuf::F32(v) => HostBuf::F32(v[a..b].to_vec()),
            HostBuf::BF16(v) => HostBuf::BF16(v[a..b].to_vec()),
            HostBuf::U32(v) => HostBuf::U32(v[a..b].to_vec()),
        };
        let mut shape = s.to_vec();
        shape[0] = len;
        Tensor::from_buf(buf, &shape)
    }

    fn concat_rows(&self, parts: &[&HostT]) -> Result<HostT> {
        const OP: &str = "concat_rows";
        let (_, rows) = crate::check::concat_rows(parts)?;
        let first = parts[0];
        let mut out = HostBuf::zeros(0, first.dtype());
        for p in parts {
            match (&mut out, p.host_buf(OP)?) {
                (HostBuf::F32(o), HostBuf::F32(v)) => o.extend(v),
                (HostBuf::BF16(o), HostBuf::BF16(v)) => o.extend(v),
                (HostBuf::U32(o), HostBuf::U32(v)) => o.extend(v),
                _ => return Err(shape_err(OP, "storage dtype differs from tensor dtype")),
            }
        }
        let mut shape = first.shape().to_vec();
        shape[0] = rows;
        Tensor::from_buf(out, &shape)
    }

    fn cast(&self, x: &HostT, dtype: DType) -> Result<HostT> {
        const OP: &str = "cast";
        let buf = match (x.host_buf(OP)?, dtype) {
            (b @ HostBuf::F32(_), DType::F32) | (b @ HostBuf::BF16(_), DType::BF16) => b,
            // `bf16::from_f32` rounds to nearest even, as torch's `.to(torch.bfloat16)` does.
            (HostBuf::F32(v), DType::BF16) => HostBuf::BF16(v.iter().map(|&f| bf16::from_f32(f)).collect()),
            (HostBuf::BF16(v), DType::F32) => HostBuf::F32(v.iter().map(|b| b.to_f32()).collect()),
            (b, _) => return Err(shape_err(OP, format!("{:?} -> {dtype:?}", b.dtype()))),
        };
        Tensor::from_buf(buf, x.shape())
    }

    fn write_rows(&self, dst: &HostT, src: &HostT, row0: usize, col0: usize) -> Result<()> {
        const OP: &str = "write_rows";
        let ([_, c], [_, sc]) =
            crate::check::write_rows((dst.shape(), dst.dtype()), (src.shape(), src.dtype()), row0, col0)?;
        // Copy the source out first: dst and src may share storage.
        let sbuf = src.host_buf(OP)?;
        let mut guard = dst.storage.write();
        check_buf(OP, dst, &guard)?;
        match (&mut *guard, &sbuf) {
            (HostBuf::F32(d), HostBuf::F32(v)) => write_rows_vec(d, c, v, sc, row0, col0),
            (HostBuf::BF16(d), HostBuf::BF16(v)) => write_rows_vec(d, c, v, sc, row0, col0),
            (HostBuf::U32(d), HostBuf::U32(v)) => write_rows_vec(d, c, v, sc, row0, col0),
            _ => return Err(shape_err(OP, "dtype mismatch")),
        }
        Ok(())
    }

    fn route_softmax(&self, logits: &HostT, k: usize, renormalize: bool) -> Result<(HostT, HostT)> {
        const OP: &str = "route_softmax";
        crate::check::route_softmax(logits.shape(), k)?;
        let s = logits.shape();
        let (n, e) = (s[0], s[1]);
        let mut probs = logits.f32_vec(OP)?;
        let mut ids = Vec::with_capacity(n * k);
        let mut weights = Vec::with_capacity(n * k);
        for row in probs.chunks_exact_mut(e) {
            softmax_row(row);
            let sel = top_k_indices(row, k);
            let sum = sel.iter().fold(0.0f32, |a, &i| a + row[i]);
            for &i in &sel {
                ids.push(i as u32);
                weights.push(if renormalize { row[i] / sum } else { row[i] });
            }
        }
        Ok((Tensor::from_u32(ids, &[n, k])?, Tensor::from_f32(weights, &[n, k])?))
    }

    fn route_sigmoid_grouped(
        &self,
        logits: &HostT,
        bias: &HostT,
        spec: GroupedRouter,
    ) -> Result<(HostT, HostT)> {
        const OP: &str = "route_sigmoid_grouped";
        crate::check::route_sigmoid_grouped(logits.shape(), bias.shape(), spec)?;
        let s = logits.shape();
        let GroupedRouter { k, n_group, topk_group, renormalize, scale } = spec;
        let (n, e) = (s[0], s[1]);
        let per = e / n_group;
        let lv = logits.f32_vec(OP)?;
        let bv = bias.f32_vec(OP)?;
        let mut ids = Vec::with_capacity(n * k);
        let mut weights = Vec::with_capacity(n * k);
        for row in lv.chunks_exact(e) {
            let score: Vec<f32> = row.iter().map(|&x| sigmoid(x)).collect();
            let biased: Vec<f32> = score.iter().zip(&bv).map(|(s, b)| s + b).collect();
            let group_score: Vec<f32> = biased
                .chunks_exact(per)
                .map(|g| top_k_indices(g, 2).iter().fold(0.0f32, |a, &i| a + g[i]))
                .collect();
            let kept = top_k_indices(&group_score, topk_group);
            // Experts outside the kept groups are not candidates at all (rather than scored 0,
            // which could beat a negative biased score).
            let candidates: Vec<f32> = (0..e)
                .map(|i| if kept.contains(&(i / per)) { biased[i] } else { f32::NEG_INFINITY })
                .collect();
            let sel = top_k_indices(&candidates, k);
            let sum = sel.iter().fold(0.0f32, |a, &i| a + score[i]);
            for &i in &sel {
                ids.push(i as u32);
                let w = if renormalize { score[i] / (sum + 1e-20) } else { score[i] };
                weights.push(w * scale);
            }
        }
        Ok((Tensor::from_u32(ids, &[n, k])?, Tensor::from_f32(weights, &[n, k])?))
    }

    fn moe(
        &self,
        x: &HostT,
        ids: &HostT,
        weights: &HostT,
        experts: MoeWeights<'_, HostWeight>,
        _path: MoePath,
    ) -> Result<HostT> {
        const OP: &str = "moe";
        let MoeWeights { gate_up, down, n_experts, shared } = experts;
        check_weight(OP, gate_up)?;
        check_weight(OP, down)?;
        if let Some((sgu, sd)) = shared {
            check_weight(OP, sgu)?;
            check_weight(OP, sd)?;
        }
        let crate::check::Moe { n, h, k, inter, shared_inter: shared_i } = crate::check::moe(
            x.shape(),
            gate_up.shape(),
            down.shape(),
            n_experts,
            ids.shape(),
            weights.shape(),
            shared.map(|(g, d)| (g.shape(), d.shape())),
        )?;
        let xv = x.activations(OP)?;
        let bf16_act = x.dtype() == DType::BF16;
        let idv = ids.u32_vec(OP)?;
        let wv = weights.f32_vec(OP)?;
        if let Some(p) = idv.iter().position(|&e| e as usize >= n_experts) {
            return Err(shape_err(
                OP,
                format!("expert id {} at token {}, slot {} (>= {n_experts})", idv[p], p / k, p % k),
            ));
        }
        let mut out = vec![0.0f32; n * h];
        for t in 0..n {
            let xt = &xv[t * h..(t + 1) * h];
            let o = &mut out[t * h..(t + 1) * h];
            if let (Some((sgu, sd)), Some(si)) = (shared, shared_i) {
                o.copy_from_slice(&expert(xt, sgu, 0, sd, 0, si, bf16_act));
            }
            for slot in 0..k {
                let e = idv[t * k + slot] as usize;
                let y = expert(xt, gate_up, e * 2 * inter, down, e * h, inter, bf16_act);
                let wt = wv[t * k + slot];
                for (a, b) in o.iter_mut().zip(&y) {
                    *a += wt * b;
                }
            }
        }
        Tensor::from_f32(out, &[n, h])
    }

    fn attention_gqa(&self, q: &HostT, k: &HostT, v: &HostT, pos0: usize, scale: f32) -> Result<HostT> {
        const OP: &str = "attention_gqa";
        let dims = crate::check::attention_gqa(q.shape(), k.shape(), v.shape(), pos0)?;
        let crate::check::Gqa { t: t_n, hq, hkv, d, dv, .. } = dims;
        let group = hq / hkv;
        let (qv, kv, vv) = (q.f32_vec(OP)?, k.f32_vec(OP)?, v.f32_vec(OP)?);
        let mut out = vec![0.0f32; t_n * hq * dv];
        for t in 0..t_n {
            let len = pos0 + t + 1;
            for h in 0..hq {
                let kh = h / group;
                let qh = &qv[(t * hq + h) * d..(t * hq + h + 1) * d];
                let mut p: Vec<f32> = (0..len)
                    .map(|j| dot(qh, &kv[(j * hkv + kh) * d..(j * hkv + kh + 1) * d]) * scale)
                    .collect();
                softmax_row(&mut p);
                let o = &mut out[(t * hq + h) * dv..(t * hq + h + 1) * dv];
                for (j, &pj) in p.iter().enumerate() {
                    for (a, b) in o.iter_mut().zip(&vv[(j * hkv + kh) * dv..(j * hkv + kh + 1) * dv]) {
                        *a += pj * b;
                    }
                }
            }
        }
        Tensor::from_f32(out, &[t_n, hq, dv])
    }

    fn attention_mla(
        &self,
        q_lat: &HostT,
        q_rope: &HostT,
        cache: &HostT,
        pos0: usize,
        scale: f32,
    ) -> Result<HostT> {
        const OP: &str = "attention_mla";
        let dims = crate::check::attention_mla(q_lat.shape(), q_rope.shape(), cache.shape(), pos0)?;
        let crate::check::Mla { t: t_n, heads, l, r, .. } = dims;
        let w = l + r;
        let (qlv, qrv, cv) = (q_lat.f32_vec(OP)?, q_rope.f32_vec(OP)?, cache.f32_vec(OP)?);
        let mut out = vec![0.0f32; t_n * heads * l];
        for t in 0..t_n {
            let len = pos0 + t + 1;
            for h in 0..heads {
                let a = &qlv[(t * heads + h) * l..(t * heads + h + 1) * l];
                let b = &qrv[(t * heads + h) * r..(t * heads + h + 1) * r];
                let mut p: Vec<f32> = (0..len)
                    .map(|j| {
                        let row = &cv[j * w..(j + 1) * w];
                        (dot(a, &row[..l]) + dot(b, &row[l..])) * scale
                    })
                    .collect();
                softmax_row(&mut p);
                let o = &mut out[(t * heads + h) * l..(t * heads + h + 1) * l];
                for (j, &pj) in p.iter().enumerate() {
                    for (x, c) in o.iter_mut().zip(&cv[j * w..j * w + l]) {
                        *x += pj * c;
                    }
                }
            }
        }
        Tensor::from_f32(out, &[t_n, heads, l])
    }

    fn attention_mla_expanded(
        &self,
        q_nope: &HostT,
        q_rope: &HostT,
        kv: &HostT,
        k_rope: &HostT,
        pos0: usize,
        scale: f32,
        _bf16: bool,
    ) -> Result<HostT> {
        const OP: &str = "attention_mla_expanded";
        let dims = crate::check::attention_mla_expanded(
            q_nope.shape(),
            q_rope.shape(),
            kv.shape(),
            k_rope.shape(),
            pos0,
        )?;
        let crate::check::MlaExpanded { t: t_n, heads, nope, r, dv, .. } = dims;
        let w = nope + dv;
        let (qn, qr, kvv, krv) =
            (q_nope.f32_vec(OP)?, q_rope.f32_vec(OP)?, kv.f32_vec(OP)?, k_rope.f32_vec(OP)?);
        let mut out = vec![0.0f32; t_n * heads * dv];
        for t in 0..t_n {
            let len = pos0 + t + 1;
            for h in 0..heads {
                let a = &qn[(t * heads + h) * nope..(t * heads + h + 1) * nope];
                let b = &qr[(t * heads + h) * r..(t * heads + h + 1) * r];
                let row = |j: usize| &kvv[(j * heads + h) * w..(j * heads + h + 1) * w];
                let mut p: Vec<f32> = (0..len)
                    .map(|j| (dot(a, &row(j)[..nope]) + dot(b, &krv[j * r..(j + 1) * r])) * scale)
                    .collect();
                softmax_row(&mut p);
                let o = &mut out[(t * heads + h) * dv..(t * heads + h + 1) * dv];
                for (j, &pj) in p.iter().enumerate() {
                    for (x, c) in o.iter_mut().zip(&row(j)[nope..]) {
                        *x += pj * c;
                    }
                }
            }
        }
        Tensor::from_f32(out, &[t_n, heads, dv])
    }

    fn argmax(&self, x: &HostT) -> Result<HostT> {
        const OP: &str = "argmax";
        let s = x.shape();
        if s.is_empty() || x.last_dim() == 0 {
            return Err(shape_err(OP, format!("input {s:?}")));
        }
        let xv = x.f32_vec(OP)?;
        let ids: Vec<u32> =
            xv.chunks_exact(x.last_dim()).map(|row| top_k_indices(row, 1)[0] as u32).collect();
        Tensor::from_u32(ids, &s[..s.len() - 1])
    }

    fn top_k(&self, x: &HostT, k: usize) -> Result<(HostT, HostT)> {
        const OP: &str = "top_k";
        let s = x.shape();
        if s.len() != 2 || k > s[1] {
            return Err(shape_err(OP, format!("top-{k} of {s:?}")));
        }
        let xv = x.f32_vec(OP)?;
        let mut vals = Vec::with_capacity(s[0] * k);
        let mut ids = Vec::with_capacity(s[0] * k);
        for row in xv.chunks_exact(s[1].max(1)).take(s[0]) {
            for i in top_k_indices(row, k) {
                vals.push(row[i]);
                ids.push(i as u32);
            }
        }
        Ok((Tensor::from_f32(vals, &[s[0], k])?, Tensor::from_u32(ids, &[s[0], k])?))
    }
}
