//! The op trait on wgpu: each op checks shapes and dtypes on the host (the same rules as the
//! reference), allocates its output and records its kernels; nothing here waits for the GPU
//! except `download` and `synchronize`.

use crate::kernels::{Kernel, Src, Variant, WKind, shape};
use crate::weight::WgpuWeight;
use crate::{GpuBuf, WgpuBackend};
use fp4moe_ops::{
    Backend, DType, Error, GroupedRouter, HeadLinear, HostData, HostTensor, HostWeight, LinearPath, MoePath,
    MoeWeights, Result, Rope, RopeStyle, SplitInput, Tensor,
};
use std::sync::Arc;

type GT = Tensor<GpuBuf>;

fn shape_err(op: &'static str, detail: impl Into<String>) -> Error {
    Error::Shape { op, detail: detail.into() }
}

fn unsupported(op: &'static str, what: impl Into<String>) -> Error {
    Error::Unsupported { op, backend: "wgpu".into(), what: what.into() }
}

fn u(v: usize) -> u32 {
    v as u32
}

/// One 2-D strided copy of copy.wgsl (in elements).
struct Copy2d<'a> {
    src: &'a wgpu::Buffer,
    dst: &'a wgpu::Buffer,
    rows: usize,
    cols: usize,
    src_off: usize,
    src_stride: usize,
    dst_off: usize,
    dst_stride: usize,
}

impl<'a> Copy2d<'a> {
    /// The copy of `write_rows(dst, src, row0, col0)`.
    fn write_rows((dst, src, row0, col0): (&'a GT, &'a GT, usize, usize)) -> Result<Self> {
        let ([_, c], [n, sc]) = fp4moe_ops::check::write_rows(
            (dst.shape(), dst.dtype()),
            (src.shape(), src.dtype()),
            row0,
            col0,
        )?;
        Ok(Copy2d {
            src: &src.storage.buf,
            dst: &dst.storage.buf,
            rows: n,
            cols: sc,
            src_off: 0,
            src_stride: sc,
            dst_off: row0 * c + col0,
            dst_stride: c,
        })
    }

    /// The same buffers, nothing copied (the unused second copy of a dispatch).
    fn empty(&self) -> Self {
        Copy2d { rows: 0, ..*self }
    }

    fn words(&self) -> [u32; 6] {
        [self.rows, self.cols, self.src_off, self.src_stride, self.dst_off, self.dst_stride].map(u)
    }
}

/// copy.wgsl's `P`: the first copy, the second copy (8 words each), words per row (copy16).
fn copy_params(a: &Copy2d<'_>, words_per_row: usize, b: &Copy2d<'_>) -> [u32; 20] {
    let mut p = [0; 20];
    p[..6].copy_from_slice(&a.words());
    p[8..14].copy_from_slice(&b.words());
    p[16] = u(words_per_row);
    p
}

/// Bindings 11-16 of weight_quant_multi.wgsl beside routed chunk `c` (weight 0): the shared
/// expert's weight `sw` as weight 1 and `c` again as weight 2 (unread); none without `sw`.
fn shared_bindings<'a>(
    c: &'a crate::weight::Chunk,
    sw: Option<&'a WgpuWeight>,
) -> impl Iterator<Item = (u32, &'a wgpu::Buffer)> {
    sw.into_iter().flat_map(move |sw| {
        let again = c.bindings().map(|(i, buf)| (i + 6, buf));
        sw.chunks[0].bindings().map(|(i, buf)| (i + 3, buf)).chain(again)
    })
}

/// norm.wgsl's `P` (its comments say which kernel reads what); fields a kernel does not read
/// stay zero.
#[derive(Debug, Clone, Copy, Default)]
struct NormP {
    rows: usize,
    d: usize,
    eps: f32,
    heads: usize,
    rope: Option<Rope>,
    rows0: usize,
    eps1: f32,
    heads1: usize,
    split: usize,
    normed: bool,
    cache_off: usize,
    cache_stride: usize,
    d1: usize,
    split1: usize,
    normed1: bool,
    moe_k: usize,
    moe_identity: bool,
    moe_shared: bool,
    moe_sh_off: usize,
}

impl NormP {
    /// A plain row kernel's: `rows` rows of `d`.
    fn rows(rows: usize, d: usize, eps: f32) -> NormP {
        NormP { rows, d, eps, ..Default::default() }
    }

    fn words(&self) -> [u32; 24] {
        let (offset, dims, inter) =
            self.rope.map_or((0, 0, false), |r| (r.offset, r.dims, r.style == RopeStyle::Interleaved));
        let b = u32::from;
        [
            u(self.rows),
            u(self.d),
            self.eps.to_bits(),
            u(self.heads),
            u(offset),
            u(dims),
            b(inter),
            u(self.rows0),
            self.eps1.to_bits(),
            u(self.heads1),
            u(self.split),
            b(self.normed),
            u(self.cache_off),
            u(self.cache_stride),
            u(self.d1),
            u(self.split1),
            b(self.normed1),
            u(self.moe_k),
            b(self.moe_identity),
            b(self.moe_shared),
            u(self.moe_sh_off),
            0,
            0,
            0,
        ]
    }
}

/// Workgroups for `n` items of `per` each: x up to the per-dimension limit, then y.
fn grid(n: usize, per: u32) -> [u32; 3] {
    let groups = n.div_ceil(per as usize);
    let x = groups.min(MAX_GROUPS_PER_DIM);
    [x as u32, groups.div_ceil(x.max(1)) as u32, 1]
}

const MAX_GROUPS_PER_DIM: usize = 65535;
/// topk.wgsl's two-dispatch top-k: row values per chunk (one workgroup), and the largest k it
/// serves (larger k take one workgroup per row).
const TOPK_CHUNK: usize = (shape::TOPK_WG * shape::TOPK_REG) as usize;
const TOPK_MAX: usize = 64;

fn expect(op: &'static str, t: &GT, dtype: DType) -> Result<()> {
    if t.dtype() != dtype {
        return Err(shape_err(op, format!("expected {dtype:?}, got {:?}", t.dtype())));
    }
    Ok(())
}

fn tensor_bytes(shape: &[usize], dtype: DType) -> u64 {
    let n: usize = shape.iter().product();
    match dtype {
        DType::BF16 => n.div_ceil(2) as u64 * 4,
        _ => (n * dtype.size()) as u64,
    }
}

/// What `moe` has before its combine (`WgpuBackend::moe_experts_out`).
enum MoeStage {
    /// The output itself (nothing to combine).
    Done(GT),
    Combine(MoeOut),
}

/// The routed experts' outputs y `[pairs, h]` (rows in sorted order with `pos`, else in pair
/// order) and the shared expert's output `[n, h]`: what norm.wgsl's `moe_term` sums.
struct MoeOut {
    n: usize,
    h: usize,
    k: usize,
    y: GpuBuf,
    pos: Option<GpuBuf>,
    shared: Option<SharedOut>,
}

/// Where the shared expert's output is.
enum SharedOut {
    Tensor(GT),
    /// In y's rows after the routed pairs' (`moe_gemv_shared.wgsl`).
    InY,
}

impl MoeOut {
    /// norm.wgsl's MoE fields.
    fn params(&self) -> NormP {
        NormP {
            moe_k: self.k,
            moe_identity: self.pos.is_none(),
            moe_shared: self.shared.is_some(),
            moe_sh_off: match self.shared {
                Some(SharedOut::InY) => self.n * self.k * self.h,
                _ => 0,
            },
            ..Default::default()
        }
    }

    /// Bindings 11-14 (an unread pos or shared output binds y).
    fn binds<'a>(&'a self, weights: &'a GT) -> Vec<(u32, &'a wgpu::Buffer)> {
        vec![
            (11, &*self.y),
            (12, self.pos.as_deref().unwrap_or(&*self.y)),
            (13, &weights.storage.buf),
            (
                14,
                match &self.shared {
                    Some(SharedOut::Tensor(t)) => &t.storage.buf,
                    _ => &*self.y,
                },
            ),
        ]
    }
}

impl WgpuBackend {
    /// A tensor with unspecified contents (a pooled buffer): every kernel writing it covers it.
    fn alloc(&self, shape: &[usize], dtype: DType) -> GT {
        let buf = self.pool.take(&self.ctx.device, tensor_bytes(shape, dtype));
        Tensor::new(Arc::new(buf), shape.to_vec(), dtype)
    }

    fn scratch(&self, words: usize) -> GpuBuf {
        self.pool.take(&self.ctx.device, (words.max(1) * 4) as u64)
    }

    /// `norm_rope` of one or two inputs `(x [n, H, D], w [D], eps)` at the same positions in one
    /// dispatch (norm.wgsl's `norm_rope`; one input binds itself as the second, with no rows).
    /// With `to_cache` (k cache, v, v cache, first element written), the second result goes
    /// into the k cache and v into the v cache from that element (`norm_rope_cache`), and the
    /// k cache stands in for the second result.
    fn norm_rope_launch<const N: usize>(
        &self,
        xs: [(&GT, &GT, f32); N],
        positions: &GT,
        spec: Rope,
        to_cache: Option<(&GT, &GT, &GT, usize)>,
    ) -> Result<[GT; N]> {
        const OP: &str = "norm_rope";
        let mut d = 0;
        for (x, w, _) in xs {
            d = fp4moe_ops::check::rope(OP, x.shape(), positions.shape(), spec)?;
            if w.shape() != [d] || x.last_dim() != xs[0].0.last_dim() {
                return Err(shape_err(OP, format!("x {:?} with weight {:?}", x.shape(), w.shape())));
            }
            expect(OP, x, DType::F32)?;
            expect(OP, w, DType::F32)?;
        }
        expect(OP, positions, DType::U32)?;
        let mut outs = xs.map(|(x, _, _)| self.alloc(x.shape(), DType::F32));
        if let Some((kc, _, _, _)) = to_cache {
            outs[N - 1] = kc.clone();
        }
        let rows = |x: &GT| x.shape()[0] * x.shape()[1];
        let (first, second) = (xs[0], xs[N - 1]);
        let rows0 = rows(first.0);
        let total = if N == 1 { rows0 } else { rows0 + rows(second.0) };
        if total == 0 {
            return Ok(outs);
        }
        let inv = self.inv_freq(spec.dims, spec.theta);
        let params = NormP {
            rows: total,
            d,
            eps: first.2,
            heads: first.0.shape()[1],
            rope: Some(spec),
            rows0,
            eps1: second.2,
            heads1: second.0.shape()[1],
            cache_off: to_cache.map_or(0, |c| c.3),
            ..Default::default()
        };
        let mut b = vec![
            (1, &first.0.storage.buf),
            (2, &first.1.storage.buf),
            (3, &outs[0].storage.buf),
            (4, &positions.storage.buf),
            (5, &*inv),
            (8, &second.0.storage.buf),
            (9, &second.1.storage.buf),
            (10, &outs[N - 1].storage.buf),
        ];
        let entry = match to_cache {
            Some((_, v, vc, _)) => {
                b.extend([(15, &vc.storage.buf), (16, &v.storage.buf)]);
                "norm_rope_cache"
            }
            None => "norm_rope",
        };
        self.dispatch(&self.k(Src::Norm, entry)?, &params.words(), &b, grid(total, 1))?;
        Ok(outs)
    }

    /// `split_rope` of x in one dispatch (norm.wgsl's `split_rope`), and of `second` `[n, 1, C]`
    /// in the same one, its two parts written into rows `row0..` of its cache as they lie
    /// there. Without a second input x's bindings stand in for its own.
    fn split_rope_launch(
        &self,
        (x, a, norm): SplitInput<'_, Self>,
        second: Option<(SplitInput<'_, Self>, &GT, usize)>,
        positions: &GT,
        spec: Rope,
    ) -> Result<(GT, GT)> {
        const OP: &str = "split_rope";
        expect(OP, positions, DType::U32)?;
        let check = |x: &GT, a: usize, norm: Option<(&GT, f32)>| -> Result<[usize; 3]> {
            expect(OP, x, DType::F32)?;
            if let Some((w, _)) = norm {
                expect(OP, w, DType::F32)?;
            }
            fp4moe_ops::check::split_rope(x.shape(), a, norm.map(|(w, _)| w.shape()), positions.shape(), spec)
        };
        let [n, h, d] = check(x, a, norm)?;
        let first = self.alloc(&[n, h, a], DType::F32);
        let rest = self.alloc(&[n, h, d - a], DType::F32);
        let mut p = NormP {
            rows: n * h,
            d,
            eps: norm.map_or(0.0, |(_, eps)| eps),
            heads: h,
            rope: Some(spec),
            rows0: n * h,
            split: a,
            normed: norm.is_some(),
            ..Default::default()
        };
        // Without a norm the weight binding is unread; x stands in for it.
        let w = norm.map_or(&x.storage.buf, |(w, _)| &w.storage.buf);
        let mut b = vec![
            (1, &x.storage.buf),
            (2, w),
            (3, &first.storage.buf),
            (4, &positions.storage.buf),
            (10, &rest.storage.buf),
        ];
        match second {
            Some(((xc, ac, normc), cache, row0)) => {
                let [nc, hc, c] = check(xc, ac, normc)?;
                let ([_, cw], _) = fp4moe_ops::check::write_rows(
                    (cache.shape(), cache.dtype()),
                    (&[nc * hc, c], DType::F32),
                    row0,
                    0,
                )?;
                p.rows += nc * hc;
                p.d1 = c;
                p.split1 = ac;
                p.normed1 = normc.is_some();
                p.eps1 = normc.map_or(0.0, |(_, eps)| eps);
                p.heads1 = hc;
                p.cache_off = row0 * cw;
                p.cache_stride = cw;
                let wc = normc.map_or(&xc.storage.buf, |(w, _)| &w.storage.buf);
                b.extend([(8, &xc.storage.buf), (9, wc), (15, &cache.storage.buf)]);
            }
            None => b.extend([(8, &x.storage.buf), (9, w), (15, &rest.storage.buf)]),
        }
        if p.rows == 0 {
            return Ok((first, rest));
        }
        let inv = self.inv_freq(spec.dims, spec.theta);
        b.push((5, &*inv));
        self.dispatch(&self.k(Src::Norm, "split_rope")?, &p.words(), &b, grid(p.rows, 1))?;
        Ok((first, rest))
    }

    fn k(&self, src: Src, entry: &'static str) -> Result<Arc<Kernel>> {
        self.kernels.get(&self.ctx, Variant::plain(src), entry)
    }

    fn kw(&self, src: Src, entry: &'static str, w: WKind, n_tile: Option<u32>) -> Result<Arc<Kernel>> {
        self.kernels.get(&self.ctx, Variant { src, weight: Some(w), n_tile }, entry)
    }

    /// Every kernel variant this backend can run, compiled now (tests, and to keep pipeline
    /// creation out of timed regions).
    pub fn compile_all(&self) -> Result<()> {
        let entries: &[(Src, &[&'static str])] = &[
            (Src::Elementwise, &["add", "silu_mul", "round_bf16", "to_bf16", "from_bf16"]),
            (Src::Copy, &["copy32", "copy16"]),
            (
                Src::Norm,
                &[
                    "rms_norm",
                    "add_rms_norm",
                    "norm_rope",
                    "norm_rope_cache",
                    "split_rope",
                    "softmax",
                    "moe_combine",
                    "moe_add_rms_norm",
                ],
            ),
            (Src::Rope, &["rope"]),
            (Src::Moe, &["moe_count", "moe_offsets", "moe_scatter"]),
            (Src::Attention, &["attn_chunk", "attn_merge", "attn_tile", "attn_tile_wide"]),
            (Src::Router, &["route_softmax", "route_sigmoid"]),
            (Src::TopK, &["top_k", "top_k_part", "top_k_final"]),
            (Src::Split, &["split"]),
        ];
        for (src, names) in entries {
            for n in *names {
                self.k(*src, n)?;
            }
        }
        for w in [WKind::Mxfp4, WKind::Nvfp4, WKind::F32, WKind::Bf16, WKind::F16] {
            self.kw(Src::Gemv, "gemv", w, None)?;
            if w.is_fp4() {
                self.kw(Src::GemvMulti, "gemv_multi", w, None)?;
                self.kw(Src::MoeGemvShared, "moe_gate_up_gemv_sh", w, None)?;
                self.kw(Src::MoeGemvShared, "moe_down_gemv_sh", w, None)?;
            }
            self.kw(Src::HeadLinear, "head_linear", w, None)?;
            self.kw(Src::HeadLinear, "head_linear_t", w, None)?;
            self.kw(Src::Embedding, "embedding", w, None)?;
            self.kw(Src::MoeGemv, "moe_gate_up_gemv", w, None)?;
            self.kw(Src::MoeGemv, "moe_down_gemv", w, None)?;
            if self.ctx.caps.coop.is_some() && w.is_fp4() {
                self.kw(Src::CoopGemm, "coop_gemm", w, None)?;
            }
            self.kw(Src::Gemm, "gemm_heads_t", w, Some(HEADS_T_TILE))?;
            for nt in PREFILL_TILES {
                self.kw(Src::Gemm, "gemm", w, Some(nt))?;
                self.kw(Src::MoeTile, "moe_gate_up_tile", w, Some(nt))?;
                self.kw(Src::MoeTile, "moe_down_tile", w, Some(nt))?;
            }
        }
        Ok(())
    }

    /// A tensor as f32 (bf16 widened by a kernel); u32 is an error.
    fn as_f32(&self, op: &'static str, x: &GT) -> Result<GT> {
        match x.dtype() {
            DType::F32 => Ok(x.clone()),
            DType::BF16 => self.cast(x, DType::F32),
            DType::U32 => Err(shape_err(op, "expected f32 or bf16, got u32")),
        }
    }

    /// `dst[dst_off + i*dst_stride + j] = src[src_off + i*src_stride + j]` (elements).
    #[allow(clippy::too_many_arguments)]
    fn copy2d(&self, dtype: DType, c: &Copy2d<'_>) -> Result<()> {
        if dtype == DType::BF16 {
            if c.rows == 0 || c.cols == 0 {
                return Ok(());
            }
            let wpr = c.cols / 2 + 1;
            let params = copy_params(c, wpr, &c.empty());
            let binds = [(1, c.src), (2, c.dst), (3, c.src), (4, c.dst)];
            self.dispatch(&self.k(Src::Copy, "copy16")?, &params, &binds, grid(c.rows * wpr, shape::WG))
        } else {
            self.copy32(c, &c.empty())
        }
    }

    /// Two 4-byte-element copies in one dispatch (copy.wgsl's `copy32`), `b` after `a`.
    fn copy32(&self, a: &Copy2d<'_>, b: &Copy2d<'_>) -> Result<()> {
        let n = a.rows * a.cols + b.rows * b.cols;
        if n == 0 {
            return Ok(());
        }
        let binds = [(1, a.src), (2, a.dst), (3, b.src), (4, b.dst)];
        self.dispatch(&self.k(Src::Copy, "copy32")?, &copy_params(a, 0, b), &binds, grid(n, shape::WG))
    }

    /// Shared part of the two attention ops (see attention.wgsl).
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        q1: &GT,
        q2: Option<&GT>,
        kb: &GT,
        vb: &GT,
        dims: AttnDims,
        pos0: usize,
        scale: f32,
    ) -> Result<GT> {
        let AttnDims { t_n, hq, group, d1, d2, dv, k_row, k_head, v_row, v_head } = dims;
        let out = self.alloc(&[t_n, hq, dv], DType::F32);
        if t_n == 0 || hq == 0 {
            return Ok(out);
        }
        if d1 + d2 > shape::ATTN_QMAX as usize {
            return Err(unsupported(
                "attention",
                format!("keys of {} elements (at most {})", d1 + d2, shape::ATTN_QMAX),
            ));
        }
        let q2b = q2.unwrap_or(q1);
        // attention.wgsl's `P`.
        let params = |t_base: usize, n_chunks: usize, t_count: usize, vec: u32| {
            let (kr, kh, vr, vh) = (u(k_row), u(k_head), u(v_row), u(v_head));
            let (bits, chunks, count) = (scale.to_bits(), u(n_chunks), u(t_count));
            [
                u(t_base),
                u(hq),
                u(group),
                u(d1),
                u(d2),
                u(dv),
                u(pos0),
                bits,
                kr,
                kh,
                vr,
                vh,
                chunks,
                count,
                vec,
            ]
        };
        // MLA: the values are the first dv entries of the key rows (one latent cache).
        let shared_v =
            Arc::ptr_eq(&kb.storage, &vb.storage) && (v_row, v_head) == (k_row, k_head) && dv <= d1 + d2;
        let vec4_all = [d1, d2, dv, k_row, k_head, v_row, v_head].iter().all(|v| v % 4 == 0);
        if let Some((entry, rows)) = attn_tile_kernel(t_n, dv).filter(|_| vec4_all) {
            let blocks = (t_n * group).div_ceil(rows);
            if blocks <= MAX_GROUPS_PER_DIM {
                let params = params(0, 0, t_n, 1 + u32::from(shared_v));
                let binds = [
                    (3, &kb.storage.buf),
                    (7, &vb.storage.buf),
                    (8, &q1.storage.buf),
                    (9, &q2b.storage.buf),
                    (6, &out.storage.buf),
                ];
                let grid = [u(blocks), u(hq / group), 1];
                self.dispatch(&self.k(Src::Attention, entry)?, &params, &binds, grid)?;
                return Ok(out);
            }
        }
        let vec = [d1, d2, k_row, k_head].iter().all(|v| v % 4 == 0);
        let chunks = (pos0 + t_n).div_ceil(shape::ATTN_CHUNK as usize);
        let per_query = hq * chunks * (dv + 2);
        let slice = (ATTN_SCRATCH_WORDS / per_query.max(1)).clamp(1, t_n.min(MAX_GROUPS_PER_DIM));
        let part = self.scratch(slice * per_query);
        let kc = self.k(Src::Attention, "attn_chunk")?;
        let km = self.k(Src::Attention, "attn_merge")?;
        let mut t0 = 0;
        while t0 < t_n {
            let tc = slice.min(t_n - t0);
            let params = params(t0, chunks, tc, u32::from(vec));
            let binds = [
                (1, &q1.storage.buf),
                (2, &q2b.storage.buf),
                (3, &kb.storage.buf),
                (4, &vb.storage.buf),
                (5, &*part),
            ];
            self.dispatch(&kc, &params, &binds, [u(chunks), u(hq), u(tc)])?;
            let cols = dv.div_ceil(shape::ATTN_CHUNK as usize);
            self.dispatch(&km, &params, &[(5, &*part), (6, &out.storage.buf)], [u(cols), u(hq), u(tc)])?;
            t0 += tc;
        }
        Ok(out)
    }

    /// `out[m, n] = x[m, :] · W[n, :]` on cooperative matrices (x f32 `[m, k]`).
    fn coop_linear(&self, x: &GT, w: &WgpuWeight, out: &GT, m: usize) -> Result<()> {
        let (n, k) = (w.rows, w.cols);
        let gx = m.div_ceil(shape::TILE_M as usize);
        if gx > MAX_GROUPS_PER_DIM {
            return Err(unsupported("linear", format!("{m} rows in one prefill GEMM")));
        }
        let (kern, bn) = self.coop_kernel(w.kind)?;
        let a = self.coop_split(&x.storage.buf, m, k)?;
        for c in &w.chunks {
            let p = CoopParams {
                mode: MODE_LINEAR,
                m,
                n: c.rows,
                k,
                kv: a.kv,
                n_off: c.row0,
                y_stride: n,
                topk: 1,
                ..Default::default()
            };
            self.coop_dispatch(
                &kern,
                &a,
                &out.storage.buf,
                None,
                c,
                p,
                [u(gx), u(c.rows.div_ceil(bn as usize)), 1],
            )?;
        }
        Ok(())
    }

    /// moe.wgsl's sort of the (token, slot) pairs by expert: `sorted`, `pos` and the tile table.
    fn moe_sort(
        &self,
        ids: &GT,
        params: &[u32],
        pairs: usize,
        experts: usize,
        out: [&GpuBuf; 3],
    ) -> Result<()> {
        let [sorted, pos, tiles] = out;
        let chunks = grid(pairs, shape::WG);
        let rows = self.scratch(pairs.div_ceil(shape::WG as usize) * experts);
        let b = [(1, &ids.storage.buf), (5, &*rows)];
        self.dispatch(&self.k(Src::Moe, "moe_count")?, params, &b, chunks)?;
        let b = [(4, &**tiles), (5, &*rows)];
        self.dispatch(&self.k(Src::Moe, "moe_offsets")?, params, &b, [1, 1, 1])?;
        let b = [(1, &ids.storage.buf), (2, &**sorted), (3, &**pos), (5, &*rows)];
        self.dispatch(&self.k(Src::Moe, "moe_scatter")?, params, &b, chunks)
    }

    /// Everything of `moe` but the combine: checks, the shared expert and the routed experts'
    /// outputs, or the whole output where no combine is needed (no tokens, no slots).
    fn moe_experts_out(
        &self,
        x: &GT,
        ids: &GT,
        weights: &GT,
        experts: MoeWeights<'_, WgpuWeight>,
        path: MoePath,
    ) -> Result<MoeStage> {
        const OP: &str = "moe";
        let MoeWeights { gate_up, down, n_experts, shared } = experts;
        let dims = |w: &WgpuWeight| [w.rows, w.cols];
        let fp4moe_ops::check::Moe { n, h, inter, .. } = fp4moe_ops::check::moe(
            x.shape(),
            dims(gate_up),
            dims(down),
            n_experts,
            ids.shape(),
            weights.shape(),
            shared.map(|(g, d)| (dims(g), dims(d))),
        )?;
        // bf16 x is exactly its f32 values; the kernels read f32. The intermediate is then
        // rounded to bf16 (Backend::moe).
        let bf16_act = x.dtype() == DType::BF16;
        let x = &self.as_f32(OP, x)?;
        expect(OP, ids, DType::U32)?;
        expect(OP, weights, DType::F32)?;
        if n_experts > shape::MOE_MAX_EXPERTS as usize {
            return Err(unsupported(OP, format!("{n_experts} experts")));
        }
        let k = ids.shape()[1];
        if n == 0 || h == 0 {
            return Ok(MoeStage::Done(self.alloc(&[n, h], DType::F32)));
        }
        let path = match path {
            MoePath::Auto => self.config.moe_path(n),
            p => p,
        };
        // The shared expert in the decode products' dispatches: FP4 weights of the routed
        // experts' kind, each in one buffer, and an adapter with room for two weights' buffers.
        let one = |w: &WgpuWeight| w.kind == gate_up.kind && w.chunks.len() == 1;
        let inter_sh = match shared {
            Some((sgu, sd))
                if k > 0
                    && path == MoePath::Decode
                    && self.multi_gemv
                    && gate_up.kind.is_fp4()
                    && [gate_up, down, sgu, sd].into_iter().all(one) =>
            {
                sgu.rows / 2
            }
            _ => 0,
        };
        let shared_out = match shared {
            Some((sgu, sd)) if inter_sh == 0 => {
                let g = self.linear(x, sgu, LinearPath::Auto)?;
                let a = self.silu_mul(&g)?;
                if bf16_act {
                    self.round_bf16(&a.storage.buf, a.numel())?;
                }
                Some(self.linear(&a, sd, LinearPath::Auto)?)
            }
            _ => None,
        };
        if k == 0 {
            // No routed experts: the output is the shared expert alone (or zeros).
            return Ok(MoeStage::Done(match shared_out {
                Some(so) => so,
                None => self.zeros(&[n, h], DType::F32)?,
            }));
        }
        let pairs = n * k;
        let (y, pos) =
            self.moe_experts(x, ids, &experts, MoeDims { pairs, k, h, inter, inter_sh, bf16_act }, path)?;
        let shared = match shared_out {
            Some(t) => Some(SharedOut::Tensor(t)),
            None => (inter_sh > 0).then_some(SharedOut::InY),
        };
        Ok(MoeStage::Combine(MoeOut { n, h, k, y, pos, shared }))
    }

    /// The first `n` f32 values of `buf` rounded to bf16 in place (still f32): the MoE's
    /// intermediate with bf16 x (Backend::moe).
    fn round_bf16(&self, buf: &wgpu::Buffer, n: usize) -> Result<()> {
        let k = self.k(Src::Elementwise, "round_bf16")?;
        self.dispatch(&k, &[u(n), 0, 0, 0], &[(3, buf)], grid(n, shape::WG))
    }

    /// Runs the two expert GEMMs of one MoE path over every chunk of the stacked weights.
    #[allow(clippy::too_many_arguments)]
    fn moe_experts(
        &self,
        x: &GT,
        ids: &GT,
        experts: &MoeWeights<'_, WgpuWeight>,
        dims: MoeDims,
        path: MoePath,
    ) -> Result<(GpuBuf, Option<GpuBuf>)> {
        const OP: &str = "moe";
        let MoeDims { pairs, k, h, inter, inter_sh, bf16_act } = dims;
        let e_n = experts.n_experts;
        // The shared expert's rows of act and y follow the routed pairs' when it is folded in.
        let sh_tokens = if inter_sh > 0 { pairs / k } else { 0 };
        let act_len = pairs * inter + sh_tokens * inter_sh;
        let act = self.scratch(act_len);
        // Between the gate/up and down dispatches of every path.
        let round_act = || if bf16_act { self.round_bf16(&act, act_len) } else { Ok(()) };
        let y = self.scratch((pairs + sh_tokens) * h);
        let max_tiles = pairs.div_ceil(shape::TILE_M as usize) + e_n;
        let params = |e_lo: usize, e_hi: usize, row0: usize| {
            [pairs, k, h, inter, e_lo, e_hi, row0, e_n, max_tiles, 0, 0, inter_sh].map(u)
        };
        // Experts covered by a chunk: chunks hold whole experts (see weight.rs).
        let span = |w: &WgpuWeight, c: &crate::weight::Chunk, per: usize| -> Result<(usize, usize)> {
            if !c.row0.is_multiple_of(per) || (!c.rows.is_multiple_of(per) && c.row0 + c.rows != w.rows) {
                return Err(unsupported(
                    OP,
                    format!(
                        "a weight chunk of rows {}..{} splits an expert of {per} rows",
                        c.row0,
                        c.row0 + c.rows
                    ),
                ));
            }
            Ok((c.row0 / per, (c.row0 + c.rows).div_ceil(per)))
        };
        let (gu, dn) = (experts.gate_up, experts.down);
        match path {
            MoePath::Decode => {
                let rows = self.kernels.gemv_rows() as usize;
                // Folded in, the shared expert's weight binds as weight 1 of
                // weight_quant_multi.wgsl (weight 2 binds the routed one again, unread); its
                // caller checked that every weight is one chunk.
                let shared = experts.shared.filter(|_| inter_sh > 0);
                let (src, entries) = match shared {
                    Some(_) => (Src::MoeGemvShared, ["moe_gate_up_gemv_sh", "moe_down_gemv_sh"]),
                    None => (Src::MoeGemv, ["moe_gate_up_gemv", "moe_down_gemv"]),
                };
                let kg = self.kw(src, entries[0], gu.kind, None)?;
                for c in &gu.chunks {
                    let (lo, hi) = span(gu, c, 2 * inter)?;
                    let mut b = vec![(1, &x.storage.buf), (2, &ids.storage.buf), (3, &*act)];
                    b.extend(c.bindings());
                    b.extend(shared_bindings(c, shared.map(|s| s.0)));
                    let g = [u(inter.max(inter_sh).div_ceil(rows)), 1, u(pairs + sh_tokens)];
                    self.dispatch(&kg, &params(lo, hi, c.row0), &b, g)?;
                }
                round_act()?;
                let kd = self.kw(src, entries[1], dn.kind, None)?;
                for c in &dn.chunks {
                    let (lo, hi) = span(dn, c, h)?;
                    let mut b = vec![(1, &*act), (2, &ids.storage.buf), (3, &*y)];
                    b.extend(c.bindings());
                    b.extend(shared_bindings(c, shared.map(|s| s.1)));
                    let g = [u(h.div_ceil(rows)), 1, u(pairs + sh_tokens)];
                    self.dispatch(&kd, &params(lo, hi, c.row0), &b, g)?;
                }
                Ok((y, None))
            }
            MoePath::Prefill { n_tile } => {
                let tiles_kind = self.tiles(OP, n_tile, &[gu.kind, dn.kind])?;
                let sorted = self.scratch(pairs);
                let pos = self.scratch(pairs);
                let tiles = self.scratch(3 * max_tiles);
                self.moe_sort(ids, &params(0, e_n, 0), pairs, e_n, [&sorted, &pos, &tiles])?;
                let nt = match tiles_kind {
                    Tiles::Simt(nt) => nt,
                    Tiles::Coop => {
                        // Gate/up reads token rows through `sorted`; down reads act in sorted order.
                        let coop = |mode, n, (e_lo, e_hi), row0, k, kv| CoopParams {
                            mode,
                            m: pairs,
                            n,
                            k,
                            kv,
                            topk: dims.k,
                            e_lo,
                            e_hi,
                            row0,
                            max_tiles,
                            ..Default::default()
                        };
                        let sort = Some((&sorted, &tiles));
                        let (kg, bn) = self.coop_kernel(gu.kind)?;
                        let xs = self.coop_split(&x.storage.buf, x.rows(), h)?;
                        for c in &gu.chunks {
                            let p = coop(MODE_GATE_UP, inter, span(gu, c, 2 * inter)?, c.row0, h, xs.kv);
                            let g = [u(max_tiles), u(inter.div_ceil(bn as usize / 2)), 1];
                            self.coop_dispatch(&kg, &xs, &act, sort, c, p, g)?;
                        }
                        round_act()?;
                        let (kd, bn) = self.coop_kernel(dn.kind)?;
                        let acts = self.coop_split(&act, pairs, inter)?;
                        for c in &dn.chunks {
                            let p = coop(MODE_DOWN, h, span(dn, c, h)?, c.row0, inter, acts.kv);
                            let g = [u(max_tiles), u(h.div_ceil(bn as usize)), 1];
                            self.coop_dispatch(&kd, &acts, &y, sort, c, p, g)?;
                        }
                        return Ok((y, Some(pos)));
                    }
                };
                let kg = self.kw(Src::MoeTile, "moe_gate_up_tile", gu.kind, Some(nt))?;
                for c in &gu.chunks {
                    let (lo, hi) = span(gu, c, 2 * inter)?;
                    let mut b = vec![(1, &x.storage.buf), (2, &*sorted), (3, &*tiles), (4, &*act)];
                    b.extend(c.bindings());
                    let g = [u(max_tiles), u(inter.div_ceil(nt as usize)), 1];
                    self.dispatch(&kg, &params(lo, hi, c.row0), &b, g)?;
                }
                round_act()?;
                let kd = self.kw(Src::MoeTile, "moe_down_tile", dn.kind, Some(nt))?;
                for c in &dn.chunks {
                    let (lo, hi) = span(dn, c, h)?;
                    // The down GEMM reads act in sorted order already: no `sorted` binding.
                    let mut b = vec![(1, &*act), (3, &*tiles), (4, &*y)];
                    b.extend(c.bindings());
                    let g = [u(max_tiles), u(h.div_ceil(nt as usize)), 1];
                    self.dispatch(&kd, &params(lo, hi, c.row0), &b, g)?;
                }
                Ok((y, Some(pos)))
            }
            MoePath::Auto => Err(unsupported(OP, "Auto must be resolved before dispatch")),
        }
    }
}

/// N tiles of the f32 prefill GEMMs (`LinearPath::Prefill` / `MoePath::Prefill`).
pub(crate) const PREFILL_TILES: [u32; 2] = [32, 64];

/// The prefill path id of the cooperative-matrix GEMMs (coop_gemm.wgsl; their real tile is
/// [`crate::Coop::n_tile`]: 128 columns with 16 x 16 matrices). Dense weights, which need more
/// than f16, take the f32 tiles of [`SIMT_FALLBACK_TILE`] there.
pub(crate) const COOP_N_TILE: u32 = 128;
const SIMT_FALLBACK_TILE: u32 = 64;

/// coop_gemm.wgsl's `p.mode`.
const MODE_LINEAR: usize = 0;
const MODE_GATE_UP: usize = 1;
const MODE_DOWN: usize = 2;
const MODE_HEADS: usize = 3;
/// coop_gemm.wgsl's `P` (see there for each field).
#[derive(Debug, Clone, Copy, Default)]
struct CoopParams {
    mode: usize,
    m: usize,
    n: usize,
    k: usize,
    kv: usize,
    n_off: usize,
    y_stride: usize,
    topk: usize,
    e_lo: usize,
    e_hi: usize,
    row0: usize,
    max_tiles: usize,
    heads: usize,
    head_rows: usize,
    head_row0: usize,
}

impl CoopParams {
    fn words(self) -> [u32; 16] {
        let CoopParams {
            mode,
            m,
            n,
            k,
            kv,
            n_off,
            y_stride,
            topk,
            e_lo,
            e_hi,
            row0,
            max_tiles,
            heads,
            head_rows,
            head_row0,
        } = self;
        [
            mode, m, n, k, kv, n_off, y_stride, topk, e_lo, e_hi, row0, max_tiles, heads, head_rows,
            head_row0, 0,
        ]
        .map(u)
    }
}

/// Dense weights with at most this many rows take the GEMV at any row count (see `linear`).
const DENSE_GEMV_MAX_ROWS: usize = 256;

/// `head_linear` with more rows than this takes a tile GEMM: the cooperative matrices without
/// transpose (where the adapter has them), the f32 tiles transposed (a 64-row tile would mostly
/// hold padding below it).
const HEAD_LINEAR_SMALL_M: usize = 4;

/// Column tile of the transposed per-head product at prefill (gemm_heads_t).
const HEADS_T_TILE: u32 = 64;

/// Tile choices when the caller gives none: the cooperative-matrix GEMMs where the adapter has
/// them.
pub(crate) fn default_config(coop: bool) -> fp4moe_ops::KernelConfig {
    let mut c = fp4moe_ops::KernelConfig::default();
    if coop {
        c.linear_n_tile = COOP_N_TILE as usize;
        c.moe_n_tile = COOP_N_TILE as usize;
    }
    c
}

/// Activations as split.wgsl leaves them for coop_gemm.wgsl: two f16 terms `[rows, kv]` of
/// 8-half vectors and the row factors.
struct Split {
    hi: GpuBuf,
    lo: GpuBuf,
    rf: GpuBuf,
    kv: usize,
}

/// How one prefill product runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tiles {
    /// f32 SIMT tiles of this many columns (gemm.wgsl, moe_tile.wgsl).
    Simt(u32),
    /// Cooperative matrices (split.wgsl + coop_gemm.wgsl).
    Coop,
}

impl WKind {
    fn is_fp4(self) -> bool {
        matches!(self, WKind::Mxfp4 | WKind::Nvfp4)
    }
}

/// Words of scratch one attention dispatch may use for its per-chunk partials; longer prefills
/// are dispatched in query slices.
const ATTN_SCRATCH_WORDS: usize = 16 << 20;

fn tile_variant(op: &'static str, n_tile: usize) -> Result<u32> {
    PREFILL_TILES
        .iter()
        .copied()
        .find(|&t| t as usize == n_tile)
        .ok_or_else(|| unsupported(op, format!("prefill tile {n_tile} (have {PREFILL_TILES:?})")))
}

impl WgpuBackend {
    /// Prefill path ids this adapter runs: the f32 tiles, and the cooperative matrices if any.
    fn prefill_tiles(&self) -> impl Iterator<Item = u32> {
        PREFILL_TILES.into_iter().chain(self.ctx.caps.coop.map(|_| COOP_N_TILE))
    }

    /// The prefill tiles of `n_tile` for weights of these kinds.
    fn tiles(&self, op: &'static str, n_tile: usize, kinds: &[WKind]) -> Result<Tiles> {
        if n_tile != COOP_N_TILE as usize {
            return tile_variant(op, n_tile).map(Tiles::Simt);
        }
        if self.ctx.caps.coop.is_none() {
            return Err(unsupported(
                op,
                format!("prefill tile {n_tile}: the adapter has no cooperative matrices"),
            ));
        }
        Ok(if kinds.iter().all(|k| k.is_fp4()) { Tiles::Coop } else { Tiles::Simt(SIMT_FALLBACK_TILE) })
    }

    /// split.wgsl: f32 rows `[rows, k]` as two f16 terms `[rows, kv * 8]` and row factors.
    fn coop_split(&self, x: &wgpu::Buffer, rows: usize, k: usize) -> Result<Split> {
        let kv = k.div_ceil(shape::COOP_BK as usize) * shape::COOP_BK as usize / 8;
        let (hi, lo, rf) = (self.scratch(rows * kv * 4), self.scratch(rows * kv * 4), self.scratch(rows));
        let b = [(1, x), (2, &*hi), (3, &*lo), (4, &*rf)];
        self.dispatch(&self.k(Src::Split, "split")?, &[rows, k, kv, 0].map(u), &b, grid(rows, 1))?;
        Ok(Split { hi, lo, rf, kv })
    }

    /// One coop_gemm.wgsl dispatch over weight chunk `c`; `sort`: the MoE paths' `sorted` and
    /// tile table.
    #[allow(clippy::too_many_arguments)]
    fn coop_dispatch(
        &self,
        kern: &Arc<Kernel>,
        a: &Split,
        y: &wgpu::Buffer,
        sort: Option<(&GpuBuf, &GpuBuf)>,
        c: &crate::weight::Chunk,
        p: CoopParams,
        groups: [u32; 3],
    ) -> Result<()> {
        let unused = self.scratch(1);
        let (sorted, tiles) = sort.unwrap_or((&unused, &unused));
        let mut b = vec![(1, &*a.hi), (2, &*a.lo), (3, &*a.rf), (4, y), (5, &**sorted), (6, &**tiles)];
        b.extend(c.coop_bindings());
        self.dispatch(kern, &p.words(), &b, groups)
    }

    fn coop_kernel(&self, kind: WKind) -> Result<(Arc<Kernel>, u32)> {
        let c = self.ctx.caps.coop.ok_or_else(|| unsupported("coop_gemm", "no cooperative matrices"))?;
        Ok((self.kw(Src::CoopGemm, "coop_gemm", kind, None)?, c.n_tile()))
    }
}

/// Routers stage every expert's score in workgroup memory (router.wgsl).
fn router_experts(op: &'static str, e: usize) -> Result<()> {
    if e > shape::MOE_MAX_EXPERTS as usize {
        return Err(unsupported(op, format!("{e} experts (at most {})", shape::MOE_MAX_EXPERTS)));
    }
    Ok(())
}

/// Queries from which attention takes the tiled kernels: below it, the split-K chunks spread a
/// long context over more workgroups.
const ATTN_TILE_MIN_QUERIES: usize = 16;

/// The tiled prefill attention kernel for value rows of `dv` and its (query, head) rows per
/// workgroup, or None where the split-K chunks serve.
fn attn_tile_kernel(t_n: usize, dv: usize) -> Option<(&'static str, usize)> {
    if t_n < ATTN_TILE_MIN_QUERIES || dv == 0 {
        None
    } else if dv <= 4 * shape::ATTN_TILE_DV4 as usize {
        Some(("attn_tile", shape::ATTN_TILE_ROWS as usize))
    } else if dv <= 4 * shape::ATTN_WIDE_DV4 as usize {
        Some(("attn_tile_wide", shape::ATTN_WIDE_ROWS as usize))
    } else {
        None
    }
}

struct AttnDims {
    t_n: usize,
    hq: usize,
    group: usize,
    d1: usize,
    d2: usize,
    dv: usize,
    k_row: usize,
    k_head: usize,
    v_row: usize,
    v_head: usize,
}

#[derive(Clone, Copy)]
struct MoeDims {
    pairs: usize,
    k: usize,
    h: usize,
    inter: usize,
    /// The shared expert's intermediate size when its products run in the routed ones'
    /// dispatches (`moe_gemv_shared.wgsl`), else 0.
    inter_sh: usize,
    /// bf16 x: the intermediate is rounded to bf16 before the down products (as the reference).
    bf16_act: bool,
}

impl Backend for WgpuBackend {
    type Storage = GpuBuf;
    type Weight = WgpuWeight;

    fn name(&self) -> String {
        format!("wgpu:{}", self.ctx.caps.adapter)
    }

    fn upload(&self, t: HostTensor<'_>) -> Result<GT> {
        let (bytes, shape, dtype) = match t {
            HostTensor::F32(v, s) => (crate::bytes_of_f32(v), s, DType::F32),
            HostTensor::U32(v, s) => (crate::bytes_of_u32(v), s, DType::U32),
        };
        let n: usize = shape.iter().product();
        if bytes.len() != n * 4 {
            return Err(shape_err("upload", format!("{} elements for shape {shape:?}", bytes.len() / 4)));
        }
        let out = self.alloc(shape, dtype);
        self.write_buffer(&out.storage, bytes);
        Ok(out)
    }

    fn zeros(&self, shape: &[usize], dtype: DType) -> Result<GT> {
        let out = self.alloc(shape, dtype);
        self.clear(&out.storage);
        Ok(out)
    }

    fn download(&self, t: &GT) -> Result<HostData> {
        let (n, dtype) = (t.numel(), t.dtype());
        self.read_back_with(&t.storage, tensor_bytes(t.shape(), dtype), |bytes| {
            let words = || bytes.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
            match dtype {
                DType::F32 => HostData::F32(words().map(f32::from_bits).collect()),
                DType::U32 => HostData::U32(words().collect()),
                DType::BF16 => HostData::F32(
                    bytes
                        .chunks_exact(2)
                        .take(n)
                        .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                        .collect(),
                ),
            }
        })
    }

    fn synchronize(&self) -> Result<()> {
        self.wait()
    }

    fn kernel_stats(&self) -> Option<Arc<std::sync::Mutex<fp4moe_ops::profile::OpStats>>> {
        WgpuBackend::kernel_stats(self)
    }

    fn host_waits(&self) -> Option<Arc<std::sync::atomic::AtomicU64>> {
        Some(self.waited.clone())
    }

    fn upload_weight(&self, w: &HostWeight) -> Result<WgpuWeight> {
        self.upload_weight_impl(w)
    }

    fn weight_shape(&self, w: &WgpuWeight) -> [usize; 2] {
        [w.rows, w.cols]
    }

    fn linear_paths(&self) -> Vec<LinearPath> {
        let mut v = vec![LinearPath::Decode];
        v.extend(self.prefill_tiles().map(|t| LinearPath::Prefill { n_tile: t as usize }));
        v
    }

    fn moe_paths(&self) -> Vec<MoePath> {
        let mut v = vec![MoePath::Decode];
        v.extend(self.prefill_tiles().map(|t| MoePath::Prefill { n_tile: t as usize }));
        v
    }

    fn embedding(&self, table: &WgpuWeight, ids: &GT) -> Result<GT> {
        const OP: &str = "embedding";
        if ids.shape().len() != 1 {
            return Err(shape_err(OP, format!("ids must be [n], got {:?}", ids.shape())));
        }
        expect(OP, ids, DType::U32)?;
        let (n, h) = (ids.shape()[0], table.cols);
        let out = self.alloc(&[n, h], DType::F32);
        let k = self.kw(Src::Embedding, "embedding", table.kind, None)?;
        for c in &table.chunks {
            let mut b = vec![(1, &ids.storage.buf), (2, &out.storage.buf)];
            b.extend(c.bindings());
            self.dispatch(&k, &[n, h, c.row0, c.rows].map(u), &b, grid(n * h, shape::WG))?;
        }
        Ok(out)
    }

    fn linear(&self, x: &GT, w: &WgpuWeight, path: LinearPath) -> Result<GT> {
        const OP: &str = "linear";
        let (n, k) = (w.rows, w.cols);
        if x.shape().is_empty() || x.last_dim() != k {
            return Err(shape_err(OP, format!("x {:?} against weight [{n}, {k}]", x.shape())));
        }
        let x = self.as_f32(OP, x)?;
        let m = x.rows();
        let mut shape = x.shape().to_vec();
        *shape.last_mut().expect("non-empty") = n;
        let out = self.alloc(&shape, DType::F32);
        let path = match path {
            LinearPath::Auto => match self.config.linear_path(m) {
                // Dense weights never take the cooperative matrices, and with few output rows
                // (the routers: 64 or 128) the f32 tile GEMM has a handful of workgroups (16 for
                // a 128-row router at 512 tokens: 1.2 ms on the H100), while the GEMV reads the
                // small weight from cache once per GEMV_MR activation rows.
                LinearPath::Prefill { .. }
                    if !w.kind.is_fp4()
                        && n <= DENSE_GEMV_MAX_ROWS
                        && m.div_ceil(shape::GEMV_MR as usize) <= MAX_GROUPS_PER_DIM =>
                {
                    LinearPath::Decode
                }
                p => p,
            },
            p => p,
        };
        let path = match path {
            LinearPath::Prefill { n_tile } => match self.tiles(OP, n_tile, &[w.kind])? {
                Tiles::Coop => {
                    self.coop_linear(&x, w, &out, m)?;
                    return Ok(out);
                }
                Tiles::Simt(nt) => LinearPath::Prefill { n_tile: nt as usize },
            },
            p => p,
        };
        let kernel = match path {
            LinearPath::Prefill { n_tile } => {
                self.kw(Src::Gemm, "gemm", w.kind, Some(tile_variant(OP, n_tile)?))?
            }
            _ => self.kw(Src::Gemv, "gemv", w.kind, None)?,
        };
        for c in &w.chunks {
            // gemv.wgsl's P (12 words; its gemv_multi fields unused).
            let params = [m, c.rows, k, c.row0, n, 0, 0, 0, 0, 0, 0, 0].map(u);
            let mut b = vec![(1, &x.storage.buf), (2, &out.storage.buf)];
            b.extend(c.bindings());
            let groups = match path {
                LinearPath::Prefill { n_tile } => {
                    let gx = m.div_ceil(shape::TILE_M as usize);
                    if gx > MAX_GROUPS_PER_DIM {
                        return Err(unsupported(OP, format!("{m} rows in one prefill GEMM")));
                    }
                    [u(gx), u(c.rows.div_ceil(n_tile)), 1]
                }
                _ => {
                    let [gx, gy, _] = grid(c.rows, self.kernels.gemv_rows());
                    [gx, gy, u(m.div_ceil(shape::GEMV_MR as usize))]
                }
            };
            self.dispatch(&kernel, &params, &b, groups)?;
        }
        Ok(out)
    }

    fn linears(&self, x: &GT, ws: &[&WgpuWeight], path: LinearPath) -> Result<Vec<GT>> {
        const OP: &str = "linears";
        let separate = || ws.iter().map(|w| self.linear(x, w, path)).collect();
        let Some(w0) = ws.first() else { return Ok(Vec::new()) };
        let (k, m) = (w0.cols, x.rows());
        let decode = match path {
            LinearPath::Auto => matches!(self.config.linear_path(m), LinearPath::Decode),
            p => p == LinearPath::Decode,
        };
        let one_kernel = (2..=3).contains(&ws.len())
            && decode
            && self.multi_gemv
            && x.last_dim() == k
            && !x.shape().is_empty()
            && ws.iter().all(|w| w.kind == w0.kind && w.kind.is_fp4() && w.cols == k && w.chunks.len() == 1);
        if !one_kernel {
            return separate();
        }
        let x = self.as_f32(OP, x)?;
        let outs: Vec<GT> = ws
            .iter()
            .map(|w| {
                let mut shape = x.shape().to_vec();
                *shape.last_mut().expect("non-empty") = w.rows;
                self.alloc(&shape, DType::F32)
            })
            .collect();
        let rows_per = self.kernels.gemv_rows() as usize;
        let n = |i: usize| ws.get(i).map_or(0, |w| w.rows);
        let (b0, b1) = (n(0).div_ceil(rows_per), n(1).div_ceil(rows_per));
        let blocks = b0 + b1 + n(2).div_ceil(rows_per);
        let params = [m, n(0), k, 0, n(0), n(1), n(2), b0, b1, 0, 0, 0].map(u);
        // A third weight and output that are absent bind the second's (no rows read them).
        let last = ws.len() - 1;
        let mut b = vec![(1, &x.storage.buf), (2, &outs[0].storage.buf), (3, &outs[1].storage.buf)];
        b.push((4, &outs[last].storage.buf));
        for (i, slot) in [0, 1, last].into_iter().enumerate() {
            b.extend(ws[slot].chunks[0].bindings().map(|(bi, buf)| (bi + 3 * i as u32, buf)));
        }
        let [gx, gy, _] = grid(blocks, 1);
        let groups = [gx, gy, u(m.div_ceil(shape::GEMV_MR as usize))];
        self.dispatch(&self.kw(Src::GemvMulti, "gemv_multi", w0.kind, None)?, &params, &b, groups)?;
        Ok(outs)
    }

    fn head_linear(&self, x: &GT, w: &WgpuWeight, spec: HeadLinear) -> Result<GT> {
        const OP: &str = "head_linear";
        let HeadLinear { heads, rows_per_head, row_start, row_count, transpose } = spec;
        let (rows, k) = (w.rows, w.cols);
        if rows != heads * rows_per_head || row_start + row_count > rows_per_head {
            return Err(shape_err(OP, format!("{spec:?} against weight [{rows}, {k}]")));
        }
        let kx = if transpose { row_count } else { k };
        let s = x.shape();
        if s.len() != 3 || s[1] != heads || s[2] != kx {
            return Err(shape_err(OP, format!("x {s:?}, expected [M, {heads}, {kx}] for {spec:?}")));
        }
        expect(OP, x, DType::F32)?;
        if w.chunks.len() != 1 {
            return Err(unsupported(OP, "a weight split over several storage bindings"));
        }
        let m = s[0];
        let ky = if transpose { k } else { row_count };
        let out = self.alloc(&[m, heads, ky], DType::F32);
        let gx = m.div_ceil(shape::TILE_M as usize);
        let coop = self.ctx.caps.coop.is_some() && w.kind.is_fp4() && gx <= MAX_GROUPS_PER_DIM;
        if !transpose && m > HEAD_LINEAR_SMALL_M && coop {
            let (kern, bn) = self.coop_kernel(w.kind)?;
            let a = self.coop_split(&x.storage.buf, m * heads, k)?;
            let (head_rows, head_row0) = (rows_per_head, row_start);
            let p = CoopParams {
                mode: MODE_HEADS,
                m,
                n: row_count,
                k,
                kv: a.kv,
                y_stride: row_count,
                topk: 1,
                heads,
                head_rows,
                head_row0,
                ..Default::default()
            };
            let groups = [u(gx), u(row_count.div_ceil(bn as usize)), u(heads)];
            self.coop_dispatch(&kern, &a, &out.storage.buf, None, &w.chunks[0], p, groups)?;
            return Ok(out);
        }
        if transpose && m > HEAD_LINEAR_SMALL_M && gx <= MAX_GROUPS_PER_DIM {
            // The f32 tile GEMM with the reduction over the weight's rows (gemm.wgsl); the
            // GEMV-shaped kernel below re-reads each weight row once per token.
            let nt = HEADS_T_TILE;
            let kern = self.kw(Src::Gemm, "gemm_heads_t", w.kind, Some(nt))?;
            let mut b = vec![(1, &x.storage.buf), (2, &out.storage.buf)];
            b.extend(w.chunks[0].bindings());
            let params = [m, k, row_count, 0, heads * k, heads, rows_per_head, row_start].map(u);
            let groups = [u(gx), u(k.div_ceil(nt as usize)), u(heads)];
            self.dispatch(&kern, &params, &b, groups)?;
            return Ok(out);
        }
        let entry = if transpose { "head_linear_t" } else { "head_linear" };
        let kern = self.kw(Src::HeadLinear, entry, w.kind, None)?;
        let mut b = vec![(1, &x.storage.buf), (2, &out.storage.buf)];
        b.extend(w.chunks[0].bindings());
        let params = [m, heads, rows_per_head, row_start, row_count, k, 0, 0].map(u);
        let groups = if transpose {
            grid(m * heads * k.div_ceil(8 * shape::HEADT_WORDS as usize), 1)
        } else {
            grid(m * heads * row_count, self.kernels.gemv_rows())
        };
        self.dispatch(&kern, &params, &b, groups)?;
        Ok(out)
    }

    fn rms_norm(&self, x: &GT, w: &GT, eps: f32) -> Result<GT> {
        const OP: &str = "rms_norm";
        let d = x.last_dim();
        if x.shape().is_empty() || w.shape() != [d] {
            return Err(shape_err(OP, format!("x {:?} with weight {:?}", x.shape(), w.shape())));
        }
        expect(OP, x, DType::F32)?;
        expect(OP, w, DType::F32)?;
        let out = self.alloc(x.shape(), DType::F32);
        let rows = x.rows();
        let b = [(1, &x.storage.buf), (2, &w.storage.buf), (3, &out.storage.buf)];
        self.dispatch(
            &self.k(Src::Norm, "rms_norm")?,
            &NormP::rows(rows, d, eps).words(),
            &b,
            grid(rows, 1),
        )?;
        Ok(out)
    }

    fn add_rms_norm(&self, a: &GT, b: &GT, w: &GT, eps: f32) -> Result<(GT, GT)> {
        const OP: &str = "add_rms_norm";
        let d = a.last_dim();
        if a.shape().is_empty() || a.shape() != b.shape() || w.shape() != [d] {
            return Err(shape_err(
                OP,
                format!("{:?} + {:?} with weight {:?}", a.shape(), b.shape(), w.shape()),
            ));
        }
        for t in [a, b, w] {
            expect(OP, t, DType::F32)?;
        }
        let sum = self.alloc(a.shape(), DType::F32);
        let out = self.alloc(a.shape(), DType::F32);
        let rows = a.rows();
        let binds = [
            (1, &a.storage.buf),
            (2, &w.storage.buf),
            (3, &out.storage.buf),
            (6, &b.storage.buf),
            (7, &sum.storage.buf),
        ];
        self.dispatch(
            &self.k(Src::Norm, "add_rms_norm")?,
            &NormP::rows(rows, d, eps).words(),
            &binds,
            grid(rows, 1),
        )?;
        Ok((sum, out))
    }

    fn rope(&self, x: &GT, positions: &GT, spec: Rope) -> Result<GT> {
        const OP: &str = "rope";
        let s = x.shape();
        let d = fp4moe_ops::check::rope(OP, s, positions.shape(), spec)?;
        expect(OP, x, DType::F32)?;
        expect(OP, positions, DType::U32)?;
        let out = self.alloc(s, DType::F32);
        let inv = self.inv_freq(spec.dims, spec.theta);
        let inter = u32::from(spec.style == RopeStyle::Interleaved);
        let params = [u(s[0]), u(s[1]), u(d), u(spec.offset), u(spec.dims), inter, 0, 0];
        let b = [(1, &x.storage.buf), (2, &positions.storage.buf), (3, &*inv), (4, &out.storage.buf)];
        self.dispatch(&self.k(Src::Rope, "rope")?, &params, &b, grid(x.numel(), shape::WG))?;
        Ok(out)
    }

    fn norm_rope(&self, x: &GT, w: &GT, eps: f32, positions: &GT, spec: Rope) -> Result<GT> {
        let [y] = self.norm_rope_launch([(x, w, eps)], positions, spec, None)?;
        Ok(y)
    }

    fn norm_ropes(&self, xs: &[(&GT, &GT, f32)], positions: &GT, spec: Rope) -> Result<Vec<GT>> {
        match *xs {
            [a, b] => Ok(self.norm_rope_launch([a, b], positions, spec, None)?.into()),
            _ => xs.iter().map(|&(x, w, eps)| self.norm_rope(x, w, eps, positions, spec)).collect(),
        }
    }

    fn norm_ropes_to_cache(
        &self,
        q: (&GT, &GT, f32),
        k: (&GT, &GT, f32),
        v: &GT,
        positions: &GT,
        spec: Rope,
        caches: (&GT, &GT),
        row0: usize,
    ) -> Result<GT> {
        // No cache that is also read or is the other cache (a buffer bound read-only and
        // writable in one dispatch is an error); otherwise the separate ops.
        let cs = [caches.0, caches.1];
        let reads = [q.0, q.1, k.0, k.1, v, positions];
        let aliased = Arc::ptr_eq(&caches.0.storage, &caches.1.storage)
            || cs.iter().any(|c| reads.iter().any(|r| Arc::ptr_eq(&c.storage, &r.storage)));
        let width = fp4moe_ops::cache_row_width(k.0, v, caches).filter(|_| !aliased);
        let Some(width) = width else {
            return fp4moe_ops::norm_ropes_to_cache_separately(self, q, k, v, positions, spec, caches, row0);
        };
        // Checked as the writes they replace.
        Copy2d::write_rows((caches.0, &k.0.reshape(&[v.shape()[0], width])?, row0, 0))?;
        Copy2d::write_rows((caches.1, v, row0, 0))?;
        let [y, _] =
            self.norm_rope_launch([q, k], positions, spec, Some((caches.0, v, caches.1, row0 * width)))?;
        Ok(y)
    }

    fn split_rope(
        &self,
        x: &GT,
        a: usize,
        norm: Option<(&GT, f32)>,
        positions: &GT,
        spec: Rope,
    ) -> Result<(GT, GT)> {
        self.split_rope_launch((x, a, norm), None, positions, spec)
    }

    fn split_rope_and_cache(
        &self,
        x: SplitInput<'_, Self>,
        to_cache: SplitInput<'_, Self>,
        positions: &GT,
        spec: Rope,
        cache: &GT,
        row0: usize,
    ) -> Result<(GT, GT)> {
        // The cache is written through its own binding: none of the inputs may be it. A kv row
        // of several heads is the default's error.
        let (xc, _, normc) = to_cache;
        let reads = [Some(x.0), x.2.map(|n| n.0), Some(xc), normc.map(|n| n.0), Some(positions)];
        let aliased = reads.iter().flatten().any(|t| Arc::ptr_eq(&t.storage, &cache.storage));
        if aliased || xc.shape().len() != 3 || xc.shape()[1] != 1 {
            let parts = self.split_rope(x.0, x.1, x.2, positions, spec)?;
            fp4moe_ops::split_rope_into_cache(self, to_cache, positions, spec, cache, row0)?;
            return Ok(parts);
        }
        self.split_rope_launch(x, Some((to_cache, cache, row0)), positions, spec)
    }

    fn softmax(&self, x: &GT) -> Result<GT> {
        const OP: &str = "softmax";
        if x.shape().is_empty() {
            return Err(shape_err(OP, "scalar input"));
        }
        expect(OP, x, DType::F32)?;
        let out = self.alloc(x.shape(), DType::F32);
        let (rows, d) = (x.rows(), x.last_dim());
        let b = [(1, &x.storage.buf), (3, &out.storage.buf)];
        self.dispatch(&self.k(Src::Norm, "softmax")?, &NormP::rows(rows, d, 0.0).words(), &b, grid(rows, 1))?;
        Ok(out)
    }

    fn add(&self, a: &GT, b: &GT) -> Result<GT> {
        const OP: &str = "add";
        if a.shape() != b.shape() {
            return Err(shape_err(OP, format!("{:?} + {:?}", a.shape(), b.shape())));
        }
        expect(OP, a, DType::F32)?;
        expect(OP, b, DType::F32)?;
        let out = self.alloc(a.shape(), DType::F32);
        let n = a.numel();
        let binds = [(1, &a.storage.buf), (2, &b.storage.buf), (3, &out.storage.buf)];
        self.dispatch(&self.k(Src::Elementwise, "add")?, &[u(n), 0, 0, 0], &binds, grid(n, shape::WG))?;
        Ok(out)
    }

    fn silu_mul(&self, x: &GT) -> Result<GT> {
        const OP: &str = "silu_mul";
        let c = x.last_dim();
        if x.shape().is_empty() || !c.is_multiple_of(2) {
            return Err(shape_err(OP, format!("last dim of {:?} must be even", x.shape())));
        }
        expect(OP, x, DType::F32)?;
        let mut shape = x.shape().to_vec();
        *shape.last_mut().expect("non-empty") = c / 2;
        let out = self.alloc(&shape, DType::F32);
        let n = out.numel();
        let binds = [(1, &x.storage.buf), (3, &out.storage.buf)];
        let params = [u(n), u(c / 2), 0, 0];
        self.dispatch(&self.k(Src::Elementwise, "silu_mul")?, &params, &binds, grid(n, shape::WG))?;
        Ok(out)
    }

    fn slice_cols(&self, x: &GT, start: usize, len: usize) -> Result<GT> {
        let (_, c) = fp4moe_ops::check::slice_cols(x.shape(), start, len)?;
        let mut shape = x.shape().to_vec();
        *shape.last_mut().expect("non-empty") = len;
        let out = self.alloc(&shape, x.dtype());
        self.copy2d(
            x.dtype(),
            &Copy2d {
                src: &x.storage.buf,
                dst: &out.storage.buf,
                rows: x.rows(),
                cols: len,
                src_off: start,
                src_stride: c,
                dst_off: 0,
                dst_stride: len,
            },
        )?;
        Ok(out)
    }

    fn slice_rows(&self, x: &GT, start: usize, len: usize) -> Result<GT> {
        fp4moe_ops::check::slice_rows(x.shape(), start, len)?;
        let s = x.shape();
        let per: usize = s[1..].iter().product();
        let mut shape = s.to_vec();
        shape[0] = len;
        let out = self.alloc(&shape, x.dtype());
        self.copy2d(
            x.dtype(),
            &Copy2d {
                src: &x.storage.buf,
                dst: &out.storage.buf,
                rows: len,
                cols: per,
                src_off: start * per,
                src_stride: per,
                dst_off: 0,
                dst_stride: per,
            },
        )?;
        Ok(out)
    }

    fn concat_rows(&self, parts: &[&GT]) -> Result<GT> {
        let (per, rows) = fp4moe_ops::check::concat_rows(parts)?;
        let (first, dtype) = (parts[0], parts[0].dtype());
        let mut shape = first.shape().to_vec();
        shape[0] = rows;
        let out = self.alloc(&shape, dtype);
        let mut r0 = 0;
        for p in parts {
            let n = p.shape()[0];
            self.copy2d(
                dtype,
                &Copy2d {
                    src: &p.storage.buf,
                    dst: &out.storage.buf,
                    rows: n,
                    cols: per,
                    src_off: 0,
                    src_stride: per,
                    dst_off: r0 * per,
                    dst_stride: per,
                },
            )?;
            r0 += n;
        }
        Ok(out)
    }

    fn cast(&self, x: &GT, dtype: DType) -> Result<GT> {
        const OP: &str = "cast";
        let n = x.numel();
        match (x.dtype(), dtype) {
            (DType::F32, DType::F32) | (DType::BF16, DType::BF16) => {
                let out = self.alloc(x.shape(), dtype);
                self.copy2d(
                    dtype,
                    &Copy2d {
                        src: &x.storage.buf,
                        dst: &out.storage.buf,
                        rows: 1,
                        cols: n,
                        src_off: 0,
                        src_stride: n,
                        dst_off: 0,
                        dst_stride: n,
                    },
                )?;
                Ok(out)
            }
            (DType::F32, DType::BF16) => {
                let out = self.alloc(x.shape(), dtype);
                let b = [(1, &x.storage.buf), (5, &out.storage.buf)];
                let k = self.k(Src::Elementwise, "to_bf16")?;
                self.dispatch(&k, &[u(n), 0, 0, 0], &b, grid(n.div_ceil(2), shape::WG))?;
                Ok(out)
            }
            (DType::BF16, DType::F32) => {
                let out = self.alloc(x.shape(), dtype);
                let b = [(4, &x.storage.buf), (3, &out.storage.buf)];
                let k = self.k(Src::Elementwise, "from_bf16")?;
                self.dispatch(&k, &[u(n), 0, 0, 0], &b, grid(n, shape::WG))?;
                Ok(out)
            }
            (from, to) => Err(shape_err(OP, format!("{from:?} -> {to:?}"))),
        }
    }

    fn write_rows(&self, dst: &GT, src: &GT, row0: usize, col0: usize) -> Result<()> {
        // A buffer cannot be bound for reading and writing in one dispatch: copy an aliasing
        // source out first (shapes are checked after, before anything is written to dst).
        let tmp;
        let src = if Arc::ptr_eq(&dst.storage, &src.storage) {
            tmp = self.slice_rows(&src.reshape(&[src.numel()])?, 0, src.numel())?.reshape(src.shape())?;
            &tmp
        } else {
            src
        };
        self.copy2d(dst.dtype(), &Copy2d::write_rows((dst, src, row0, col0))?)
    }

    fn write_rows_many(&self, writes: &[(&GT, &GT, usize, usize)]) -> Result<()> {
        let separate = || writes.iter().try_for_each(|&(d, s, r, c)| self.write_rows(d, s, r, c));
        let &[w0, w1] = writes else { return separate() };
        let aliased =
            [w0, w1].iter().any(|w| [w0, w1].iter().any(|d| Arc::ptr_eq(&d.0.storage, &w.1.storage)));
        if aliased || [w0, w1].iter().any(|w| w.0.dtype() == DType::BF16) {
            return separate();
        }
        self.copy32(&Copy2d::write_rows(w0)?, &Copy2d::write_rows(w1)?)
    }

    fn route_softmax(&self, logits: &GT, k: usize, renormalize: bool) -> Result<(GT, GT)> {
        const OP: &str = "route_softmax";
        fp4moe_ops::check::route_softmax(logits.shape(), k)?;
        let s = logits.shape();
        expect(OP, logits, DType::F32)?;
        let (n, e) = (s[0], s[1]);
        router_experts(OP, e)?;
        let ids = self.alloc(&[n, k], DType::U32);
        let wts = self.alloc(&[n, k], DType::F32);
        let params = [u(n), u(e), u(k), u32::from(renormalize), 0, 0, 0, 0];
        let b = [(1, &logits.storage.buf), (3, &ids.storage.buf), (4, &wts.storage.buf)];
        self.dispatch(&self.k(Src::Router, "route_softmax")?, &params, &b, grid(n, 1))?;
        Ok((ids, wts))
    }

    fn route_sigmoid_grouped(&self, logits: &GT, bias: &GT, spec: GroupedRouter) -> Result<(GT, GT)> {
        const OP: &str = "route_sigmoid_grouped";
        fp4moe_ops::check::route_sigmoid_grouped(logits.shape(), bias.shape(), spec)?;
        let s = logits.shape();
        let GroupedRouter { k, n_group, topk_group, renormalize, scale } = spec;
        if n_group > shape::ROUTER_MAX_GROUPS as usize {
            return Err(unsupported(OP, format!("{n_group} expert groups")));
        }
        router_experts(OP, s[1])?;
        expect(OP, logits, DType::F32)?;
        expect(OP, bias, DType::F32)?;
        let (n, e) = (s[0], s[1]);
        let ids = self.alloc(&[n, k], DType::U32);
        let wts = self.alloc(&[n, k], DType::F32);
        let params =
            [u(n), u(e), u(k), u32::from(renormalize), u(n_group), u(topk_group), scale.to_bits(), 0];
        let b =
            [(1, &logits.storage.buf), (2, &bias.storage.buf), (3, &ids.storage.buf), (4, &wts.storage.buf)];
        self.dispatch(&self.k(Src::Router, "route_sigmoid")?, &params, &b, grid(n, 1))?;
        Ok((ids, wts))
    }

    fn moe(
        &self,
        x: &GT,
        ids: &GT,
        weights: &GT,
        experts: MoeWeights<'_, WgpuWeight>,
        path: MoePath,
    ) -> Result<GT> {
        let m = match self.moe_experts_out(x, ids, weights, experts, path)? {
            MoeStage::Done(out) => return Ok(out),
            MoeStage::Combine(m) => m,
        };
        let out = self.alloc(&[m.n, m.h], DType::F32);
        let params = NormP { rows: m.n, d: m.h, ..m.params() };
        let mut b = m.binds(weights);
        b.push((3, &out.storage.buf));
        self.dispatch(&self.k(Src::Norm, "moe_combine")?, &params.words(), &b, grid(m.n * m.h, shape::WG))?;
        Ok(out)
    }

    #[allow(clippy::too_many_arguments)]
    fn moe_add_rms_norm(
        &self,
        x: &GT,
        ids: &GT,
        weights: &GT,
        experts: MoeWeights<'_, WgpuWeight>,
        path: MoePath,
        r: &GT,
        w: &GT,
        eps: f32,
    ) -> Result<(GT, GT)> {
        const OP: &str = "moe_add_rms_norm";
        // Rows the norm holds in registers and a residual of the output's shape; otherwise the
        // two ops.
        let h = x.last_dim();
        let fits = h <= shape::NORM_ROW_REGS as usize * shape::WG as usize
            && r.shape() == x.shape()
            && w.shape() == [h]
            && r.dtype() == DType::F32
            && w.dtype() == DType::F32;
        if !fits {
            return self.add_rms_norm(r, &self.moe(x, ids, weights, experts, path)?, w, eps);
        }
        let m = match self.moe_experts_out(x, ids, weights, experts, path)? {
            MoeStage::Done(out) => return self.add_rms_norm(r, &out, w, eps),
            MoeStage::Combine(m) => m,
        };
        if m.n != r.rows() {
            return Err(shape_err(OP, format!("residual {:?} for {} tokens", r.shape(), m.n)));
        }
        let sum = self.alloc(r.shape(), DType::F32);
        let out = self.alloc(r.shape(), DType::F32);
        let params = NormP { rows: m.n, d: m.h, eps, ..m.params() };
        let mut b = m.binds(weights);
        b.extend([(1, &r.storage.buf), (2, &w.storage.buf), (3, &out.storage.buf), (7, &sum.storage.buf)]);
        self.dispatch(&self.k(Src::Norm, "moe_add_rms_norm")?, &params.words(), &b, grid(m.n, 1))?;
        Ok((sum, out))
    }

    fn attention_gqa(&self, q: &GT, k: &GT, v: &GT, pos0: usize, scale: f32) -> Result<GT> {
        const OP: &str = "attention_gqa";
        let dims = fp4moe_ops::check::attention_gqa(q.shape(), k.shape(), v.shape(), pos0)?;
        for t in [q, k, v] {
            expect(OP, t, DType::F32)?;
        }
        let fp4moe_ops::check::Gqa { t: t_n, hq, hkv, d, dv, .. } = dims;
        let dims = AttnDims {
            t_n,
            hq,
            group: hq / hkv,
            d1: d,
            d2: 0,
            dv,
            k_row: hkv * d,
            k_head: d,
            v_row: hkv * dv,
            v_head: dv,
        };
        self.attention(q, None, k, v, dims, pos0, scale)
    }

    fn attention_mla(&self, q_lat: &GT, q_rope: &GT, cache: &GT, pos0: usize, scale: f32) -> Result<GT> {
        const OP: &str = "attention_mla";
        let dims = fp4moe_ops::check::attention_mla(q_lat.shape(), q_rope.shape(), cache.shape(), pos0)?;
        for t in [q_lat, q_rope, cache] {
            expect(OP, t, DType::F32)?;
        }
        let fp4moe_ops::check::Mla { t: t_n, heads, l, r, .. } = dims;
        let w = l + r;
        let dims = AttnDims {
            t_n,
            hq: heads,
            group: heads,
            d1: l,
            d2: r,
            dv: l,
            k_row: w,
            k_head: 0,
            v_row: w,
            v_head: 0,
        };
        self.attention(q_lat, Some(q_rope), cache, cache, dims, pos0, scale)
    }

    fn argmax(&self, x: &GT) -> Result<GT> {
        const OP: &str = "argmax";
        let s = x.shape();
        if s.is_empty() || x.last_dim() == 0 {
            return Err(shape_err(OP, format!("input {s:?}")));
        }
        let (_, ids) = self.top_k(&x.reshape(&[x.rows(), x.last_dim()])?, 1)?;
        ids.reshape(&s[..s.len() - 1])
    }

    fn top_k(&self, x: &GT, k: usize) -> Result<(GT, GT)> {
        const OP: &str = "top_k";
        let s = x.shape();
        if s.len() != 2 || k > s[1] {
            return Err(shape_err(OP, format!("top-{k} of {s:?}")));
        }
        expect(OP, x, DType::F32)?;
        let vals = self.alloc(&[s[0], k], DType::F32);
        let ids = self.alloc(&[s[0], k], DType::U32);
        let b = [(1, &x.storage.buf), (2, &vals.storage.buf), (3, &ids.storage.buf)];
        if !(1..=TOPK_MAX).contains(&k) || s[0] == 0 {
            self.dispatch(&self.k(Src::TopK, "top_k")?, &[u(s[0]), u(s[1]), u(k), 0], &b, grid(s[0], 1))?;
            return Ok((vals, ids));
        }
        // Two dispatches (topk.wgsl): each chunk's k best, then the row's.
        let parts = s[1].div_ceil(TOPK_CHUNK);
        let pk = self.alloc(&[s[0], parts, k], DType::F32);
        let pi = self.alloc(&[s[0], parts, k], DType::U32);
        let params = [u(s[0]), u(s[1]), u(k), u(parts)];
        let b = [(1, &x.storage.buf), (4, &pk.storage.buf), (5, &pi.storage.buf)];
        self.dispatch(&self.k(Src::TopK, "top_k_part")?, &params, &b, grid(s[0] * parts, 1))?;
        let b = [
            (1, &x.storage.buf),
            (2, &vals.storage.buf),
            (3, &ids.storage.buf),
            (4, &pk.storage.buf),
            (5, &pi.storage.buf),
        ];
        self.dispatch(&self.k(Src::TopK, "top_k_final")?, &params, &b, grid(s[0], 1))?;
        Ok((vals, ids))
    }
}
