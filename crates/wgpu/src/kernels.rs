//! WGSL sources, their assembly into modules, and the pipeline cache.
//!
//! A module is `fp4::codegen::wgsl()` (the E2M1 table and scale decoders generated from the
//! Rust definition) + [`constants`] (launch-shape constants the host also uses) +
//! `common.wgsl` + the weight-access snippet of one [`WKind`] (for kernels that read a
//! weight) + the kernel file, with `N_TILE` filled in for tiled variants.

use crate::context::{Context, block_on};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

/// Launch-shape constants shared by the host (grid sizes) and the kernels.
pub(crate) mod shape {
    /// Threads of the 1-D elementwise and row kernels.
    pub const WG: u32 = 256;
    /// GEMV: threads per weight row (the default of [`super::Cache::gemv_lanes`]; a workgroup
    /// takes WG / lanes rows).
    pub const GEMV_LANES: u32 = 32;
    /// GEMV: activation rows sharing one read of the weights.
    pub const GEMV_MR: u32 = 4;
    /// Tiled GEMMs: activation (or sorted pair) rows per tile.
    pub const TILE_M: u32 = 64;
    // gemm.wgsl and moe_tile.wgsl give each thread rows ty + 16i, i < 4, in four accumulators.
    const _: () = assert!(TILE_M == 64);
    /// Attention: key positions per split-K chunk (= threads of the attention workgroup).
    pub const ATTN_CHUNK: u32 = 64;
    /// Transposed head products: weight words (8 columns each) per workgroup; the other
    /// WG / HEADT_WORDS threads split the rows (GLM at one token: 20 heads x 512 columns make
    /// 160 workgroups of 32 row groups).
    pub const HEADT_WORDS: u32 = 8;
    /// Attention: threads of a chunk's workgroup (a multiple of ATTN_CHUNK).
    pub const ATTN_THREADS: u32 = 256;
    /// Attention: longest query (key width, d1 + d2) staged in workgroup memory.
    pub const ATTN_QMAX: u32 = 1024;
    /// Tiled prefill attention (attn_tile): (query, head) rows per workgroup and keys per tile;
    /// each thread holds 8 rows of one value vector of at most ATTN_TILE_DV4 (dv <= 128).
    pub const ATTN_TILE_ROWS: u32 = 64;
    pub const ATTN_TILE_KEYS: u32 = 32;
    pub const ATTN_TILE_DV4: u32 = 32;
    /// attn_tile_wide: 32 rows, 64 keys, each thread 8 rows of two value vectors (dv <= 512, MLA).
    pub const ATTN_WIDE_ROWS: u32 = 32;
    pub const ATTN_WIDE_KEYS: u32 = 64;
    pub const ATTN_WIDE_DV4: u32 = 128;
    /// Tiled prefill attention: 16-byte vectors per staged key / query chunk.
    pub const ATTN_FT_DC: u32 = 8;
    /// Tiled prefill attention: vectors of the staging area (16 KiB; with the score tile ~26
    /// KiB of workgroup memory, within the 32 KiB of lavapipe and Metal): a query and a key
    /// chunk (rows padded by one vector), or one value sub-tile.
    pub const ATTN_FT_UNION: u32 = 1024;
    const _: () = {
        let pass = ATTN_THREADS / ATTN_FT_DC;
        // Eight output vectors per thread (attn_tile), sixteen (wide).
        assert!(ATTN_TILE_ROWS * ATTN_TILE_DV4 == 8 * ATTN_THREADS);
        assert!(ATTN_WIDE_ROWS * ATTN_WIDE_DV4 == 16 * ATTN_THREADS);
        // Two rows x four keys of scores per thread, two probability vectors per thread.
        assert!(ATTN_TILE_ROWS * ATTN_TILE_KEYS == 8 * ATTN_THREADS);
        assert!(ATTN_WIDE_ROWS * ATTN_WIDE_KEYS == 8 * ATTN_THREADS);
        // Staging: at most two passes of rows and of keys; chunks and value sub-tiles fit.
        assert!(ATTN_TILE_ROWS <= 2 * pass && ATTN_WIDE_KEYS <= 2 * pass && ATTN_TILE_KEYS >= pass);
        assert!(ATTN_WIDE_ROWS >= pass && ATTN_WIDE_ROWS <= ATTN_TILE_ROWS);
        assert!(ATTN_FT_UNION >= (ATTN_TILE_ROWS + ATTN_TILE_KEYS) * (ATTN_FT_DC + 1));
        assert!(ATTN_FT_UNION >= (ATTN_WIDE_ROWS + ATTN_WIDE_KEYS) * (ATTN_FT_DC + 1));
        assert!(ATTN_FT_UNION == ATTN_TILE_KEYS * ATTN_TILE_DV4 && ATTN_FT_UNION == 4 * ATTN_THREADS);
        // attn_tile_wide stages values in sub-tiles of whole 4-key steps; its score tile fits
        // attn_tile's.
        assert!((ATTN_FT_UNION / ATTN_WIDE_DV4).is_multiple_of(4));
        assert!(ATTN_WIDE_ROWS * (ATTN_WIDE_KEYS / 4 + 1) <= ATTN_TILE_ROWS * (ATTN_TILE_KEYS / 4 + 1));
    };
    /// Row kernels (norm.wgsl): elements of a row each thread holds in registers, so rows up
    /// to NORM_ROW_REGS x WG wide (2048, both models' hidden size) load in one unrolled pass.
    pub const NORM_ROW_REGS: u32 = 8;
    /// MoE sort and routers: most experts one workgroup can count (and rank).
    pub const MOE_MAX_EXPERTS: u32 = 1024;
    /// Sigmoid router: most expert groups.
    pub const ROUTER_MAX_GROUPS: u32 = 64;
    /// Top-k / argmax workgroup, and the row values each thread of `top_k_part` takes.
    pub const TOPK_WG: u32 = 256;
    pub const TOPK_REG: u32 = 8;
    /// Cooperative-matrix GEMM: subgroups per workgroup (coop_gemm.wgsl's 2 x 4 or 4 x 2 grid).
    pub const COOP_SUBGROUPS: u32 = 8;
    /// Cooperative-matrix GEMM: k step (one MXFP4 block, two NVFP4 blocks).
    pub const COOP_BK: u32 = 32;
    /// Cooperative-matrix GEMM: row stride of its f16 tiles in halves; 80 bytes put 8
    /// consecutive rows' 16-byte pieces on distinct banks.
    pub const COOP_STRIDE: u32 = COOP_BK + 8;
}

/// The adapter's cooperative matrices as the GEMM uses them: S x S x S f16 x f16 -> f32, and the
/// (fixed) subgroup size that makes a workgroup of [`shape::COOP_SUBGROUPS`] subgroups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Coop {
    pub s: u32,
    pub subgroup: u32,
}

impl Coop {
    /// Output columns of one workgroup tile (coop_gemm.wgsl's BN; 128 for S = 16): each subgroup
    /// owns 2S x 2S of TILE_M rows.
    pub fn n_tile(self) -> u32 {
        let sub_rows = shape::TILE_M / (2 * self.s);
        (shape::COOP_SUBGROUPS / sub_rows) * 2 * self.s
    }

    /// Threads that stage one k step (coop_gemm.wgsl's `fetch`: one A vector and half a B
    /// column's codes each).
    pub fn staging_threads(self) -> u32 {
        (shape::TILE_M * 4).max(self.n_tile() * 2)
    }

    /// Workgroup memory coop_gemm.wgsl declares: two f16 A tiles of TILE_M rows and one B tile
    /// of n_tile rows (row stride COOP_STRIDE halves), two S x S f32 accumulators per subgroup,
    /// and 3 words per tile row and per B column.
    pub fn workgroup_bytes(self) -> u32 {
        let astr = shape::COOP_STRIDE * 2;
        2 * shape::TILE_M * astr
            + self.n_tile() * astr
            + shape::COOP_SUBGROUPS * 2 * self.s * self.s * 4
            + 3 * 4 * (shape::TILE_M + self.n_tile())
    }
}

/// What module text depends on besides the variant: launch constants chosen per device.
#[derive(Debug, Clone, Copy)]
pub struct Consts {
    pub gemv_lanes: u32,
    pub coop: Option<Coop>,
}

fn constants(gemv_lanes: u32) -> String {
    use shape::*;
    let gemv_rows = WG / gemv_lanes;
    format!(
        "const WG: u32 = {WG}u;\nconst GEMV_ROWS: u32 = {gemv_rows}u;\nconst GEMV_LANES: u32 = {gemv_lanes}u;\n\
         const GEMV_MR: u32 = {GEMV_MR}u;\nconst TILE_M: u32 = {TILE_M}u;\nconst ATTN_CHUNK: u32 = {ATTN_CHUNK}u;\nconst ATTN_QMAX: u32 = {ATTN_QMAX}u;\nconst ATTN_TILE_ROWS: u32 = {ATTN_TILE_ROWS}u;\nconst ATTN_TILE_DV4: u32 = {ATTN_TILE_DV4}u;\nconst ATTN_WIDE_ROWS: u32 = {ATTN_WIDE_ROWS}u;\nconst ATTN_WIDE_DV4: u32 = {ATTN_WIDE_DV4}u;\nconst ATTN_TILE_KEYS: u32 = {ATTN_TILE_KEYS}u;\nconst ATTN_WIDE_KEYS: u32 = {ATTN_WIDE_KEYS}u;\nconst ATTN_FT_DC: u32 = {ATTN_FT_DC}u;\nconst ATTN_FT_UNION: u32 = {ATTN_FT_UNION}u;\nconst ATTN_THREADS: u32 = {ATTN_THREADS}u;\nconst HEADT_WORDS: u32 = {HEADT_WORDS}u;\n\
         const ROW_REGS: u32 = {NORM_ROW_REGS}u;\nconst MOE_MAX_EXPERTS: u32 = {MOE_MAX_EXPERTS}u;\nconst ROUTER_MAX_GROUPS: u32 = {ROUTER_MAX_GROUPS}u;\n\
         const TOPK_WG: u32 = {TOPK_WG}u;\nconst TOPK_REG: u32 = {TOPK_REG}u;\nconst COOP_SUBGROUPS: u32 = {COOP_SUBGROUPS}u;\nconst COOP_BK: u32 = {COOP_BK}u;\nconst COOP_STRIDE: u32 = {COOP_STRIDE}u;\n"
    )
}

/// How a kernel reads its weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WKind {
    Mxfp4,
    Nvfp4,
    F32,
    Bf16,
    F16,
}

impl WKind {
    /// The weight-access snippet; `dot`: with the decode-path dot products (`w_dot4`).
    fn snippet(self, dot: bool) -> String {
        let (quant, quant_dot) =
            (include_str!("../shaders/weight_quant.wgsl"), include_str!("../shaders/weight_quant_dot.wgsl"));
        let (dense, dense_dot) =
            (include_str!("../shaders/weight_dense.wgsl"), include_str!("../shaders/weight_dense_dot.wgsl"));
        let generic = include_str!("../shaders/weight_dot.wgsl");
        let with_dot =
            |base: &str, d: &str| if dot { format!("{base}{d}{generic}") } else { base.to_string() };
        let q = |f: fp4::Format, dec: &str| {
            with_dot(quant, quant_dot)
                .replace("BLOCK_SIZE", &f.block().to_string())
                .replace("SCALE_DECODE", dec)
        };
        let d = |at: &str, kind: u32| {
            with_dot(dense, dense_dot).replace("DENSE_AT", at).replace("DENSE_KIND", &kind.to_string())
        };
        match self {
            WKind::Mxfp4 => q(fp4::Format::Mxfp4, "fp4_e8m0"),
            WKind::Nvfp4 => q(fp4::Format::Nvfp4, "fp4_e4m3"),
            WKind::F32 => d("w_at_f32", 0),
            WKind::Bf16 => d("w_at_bf16", 1),
            WKind::F16 => d("w_at_f16", 2),
        }
    }
}

/// The kernel files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Src {
    Elementwise,
    Copy,
    Norm,
    Rope,
    Gemv,
    /// gemv.wgsl + gemv_multi.wgsl, reading up to three weights (weight_quant_multi.wgsl).
    GemvMulti,
    Gemm,
    HeadLinear,
    Embedding,
    Moe,
    MoeTile,
    MoeGemv,
    /// moe_gemv.wgsl + moe_gemv_shared.wgsl: the decode MoE products with the shared expert's,
    /// reading two weights (weight_quant_multi.wgsl).
    MoeGemvShared,
    Attention,
    Router,
    TopK,
    Split,
    CoopGemm,
}

impl Src {
    pub const ALL: [Src; 18] = [
        Src::Elementwise,
        Src::Copy,
        Src::Norm,
        Src::Rope,
        Src::Gemv,
        Src::GemvMulti,
        Src::Gemm,
        Src::HeadLinear,
        Src::Embedding,
        Src::Moe,
        Src::MoeTile,
        Src::MoeGemv,
        Src::MoeGemvShared,
        Src::Attention,
        Src::Router,
        Src::TopK,
        Src::Split,
        Src::CoopGemm,
    ];

    fn text(self) -> &'static str {
        match self {
            Src::Elementwise => include_str!("../shaders/elementwise.wgsl"),
            Src::Copy => include_str!("../shaders/copy.wgsl"),
            Src::Norm => include_str!("../shaders/norm.wgsl"),
            Src::Rope => include_str!("../shaders/rope.wgsl"),
            Src::Gemv => include_str!("../shaders/gemv.wgsl"),
            Src::GemvMulti => {
                concat!(include_str!("../shaders/gemv.wgsl"), include_str!("../shaders/gemv_multi.wgsl"))
            }
            Src::Gemm => include_str!("../shaders/gemm.wgsl"),
            Src::HeadLinear => include_str!("../shaders/head_linear.wgsl"),
            Src::Embedding => include_str!("../shaders/embedding.wgsl"),
            Src::Moe => include_str!("../shaders/moe.wgsl"),
            Src::MoeTile => include_str!("../shaders/moe_tile.wgsl"),
            Src::MoeGemv => include_str!("../shaders/moe_gemv.wgsl"),
            Src::MoeGemvShared => {
                concat!(
                    include_str!("../shaders/moe_gemv.wgsl"),
                    include_str!("../shaders/moe_gemv_shared.wgsl")
                )
            }
            Src::Attention => include_str!("../shaders/attention.wgsl"),
            Src::Router => include_str!("../shaders/router.wgsl"),
            Src::TopK => include_str!("../shaders/topk.wgsl"),
            Src::Split => include_str!("../shaders/split.wgsl"),
            Src::CoopGemm => include_str!("../shaders/coop_gemm.wgsl"),
        }
    }

    /// Whether the file reads a weight (and so needs a [`WKind`] snippet).
    pub fn reads_weight(self) -> bool {
        matches!(
            self,
            Src::Gemv
                | Src::GemvMulti
                | Src::Gemm
                | Src::HeadLinear
                | Src::Embedding
                | Src::MoeTile
                | Src::MoeGemv
                | Src::MoeGemvShared
                | Src::CoopGemm
        )
    }

    /// Weight kinds the file has variants for (FP4 only for the cooperative-matrix GEMM: dense
    /// weights there would need more than f16).
    pub fn weight_kinds(self) -> &'static [WKind] {
        const ALL: [WKind; 5] = [WKind::Mxfp4, WKind::Nvfp4, WKind::F32, WKind::Bf16, WKind::F16];
        match self {
            Src::CoopGemm | Src::GemvMulti | Src::MoeGemvShared => &ALL[..2],
            s if s.reads_weight() => &ALL,
            _ => &[],
        }
    }

    /// Whether the file uses the decode-path dot products of its weight (`w_dot4`).
    pub fn dots_weight(self) -> bool {
        matches!(self, Src::Gemv | Src::GemvMulti | Src::MoeGemv | Src::MoeGemvShared | Src::HeadLinear)
    }

    /// Whether the file reads up to three FP4 weights through weight_quant_multi.wgsl's `w_sel`.
    pub fn multi_weight(self) -> bool {
        matches!(self, Src::GemvMulti | Src::MoeGemvShared)
    }

    /// Whether the file has an `N_TILE` parameter.
    pub fn tiled(self) -> bool {
        matches!(self, Src::Gemm | Src::MoeTile)
    }
}

/// One compilable variant of a kernel file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Variant {
    pub src: Src,
    pub weight: Option<WKind>,
    pub n_tile: Option<u32>,
}

impl Variant {
    pub fn plain(src: Src) -> Variant {
        Variant { src, weight: None, n_tile: None }
    }

    /// The full WGSL text of this variant (a cooperative-matrix variant without `consts.coop`
    /// gets the NVIDIA shape, 16 x 16 matrices and 32-wide subgroups).
    pub fn source(&self, consts: Consts) -> String {
        let mut s = String::new();
        let coop = (self.src == Src::CoopGemm).then(|| consts.coop.unwrap_or(Coop { s: 16, subgroup: 32 }));
        if coop.is_some() {
            // Directives come before every declaration.
            s.push_str("enable f16;\nenable wgpu_cooperative_matrix;\n");
        }
        s.push_str(&fp4::codegen::wgsl());
        s.push_str(&constants(consts.gemv_lanes));
        s.push_str(include_str!("../shaders/common.wgsl"));
        if let Some(w) = self.weight {
            let snippet = w.snippet(self.src.dots_weight());
            if self.src.multi_weight() {
                s.push_str(&multi_weight_access(&snippet));
            } else {
                s.push_str(&snippet);
            }
        }
        let mut body = self.src.text().to_string();
        if let Some(c) = coop {
            body = body
                .replace("COOP_MAT", &format!("coop_mat{0}x{0}", c.s))
                .replace("COOP_SIZE", &c.s.to_string())
                .replace("COOP_THREADS", &format!("{}u", c.subgroup * shape::COOP_SUBGROUPS));
        }
        match self.n_tile {
            Some(nt) => s.push_str(&body.replace("N_TILE", &nt.to_string())),
            None => s.push_str(&body),
        }
        s
    }
}

/// An FP4 weight snippet with its access block (bindings and accessors) replaced by
/// weight_quant_multi.wgsl's, which reads one of three weights.
fn multi_weight_access(snippet: &str) -> String {
    const BEGIN: &str = "// BEGIN WEIGHT ACCESS";
    const END: &str = "// END WEIGHT ACCESS";
    match (snippet.find(BEGIN), snippet.find(END)) {
        (Some(b), Some(e)) => {
            format!(
                "{}{}{}",
                &snippet[..b],
                include_str!("../shaders/weight_quant_multi.wgsl"),
                &snippet[e + END.len()..]
            )
        }
        // Only FP4 snippets have the block (the multi-weight files have no other weight kinds).
        _ => snippet.to_string(),
    }
}

/// Every variant's full WGSL text, named, for the translation tests (`tests/msl.rs`); the
/// cooperative-matrix GEMM only with `coop` (it does not run on Metal: see
/// `context::pick_coop`).
pub fn all_sources(coop: Option<Coop>) -> Vec<(String, String)> {
    let consts = Consts { gemv_lanes: shape::GEMV_LANES, coop };
    let mut out = Vec::new();
    for src in Src::ALL {
        if src == Src::CoopGemm && coop.is_none() {
            continue;
        }
        let weights: Vec<Option<WKind>> = if src.reads_weight() {
            src.weight_kinds().iter().copied().map(Some).collect()
        } else {
            vec![None]
        };
        let tiles: Vec<Option<u32>> = if src.tiled() {
            crate::ops::PREFILL_TILES.iter().copied().map(Some).collect()
        } else {
            vec![None]
        };
        for &weight in &weights {
            for &n_tile in &tiles {
                let v = Variant { src, weight, n_tile };
                out.push((format!("{v:?}"), v.source(consts)));
            }
        }
    }
    out
}

/// A compiled entry point.
pub struct Kernel {
    /// Entry point, weight kind and tile, for per-kernel timings (`gemv:Mxfp4`, `gemm:Bf16:64`).
    pub name: String,
    pub pipeline: wgpu::ComputePipeline,
    pub layout: wgpu::BindGroupLayout,
}

pub struct Cache {
    /// Threads per weight row of the GEMV kernels: a power of two from 4 to WG,
    /// `FP4MOE_WGPU_GEMV_LANES` or [`shape::GEMV_LANES`].
    pub gemv_lanes: u32,
    /// wgpu's runtime checks in every kernel (see [`Cache::get`]).
    pub checks: bool,
    modules: Mutex<HashMap<Variant, Arc<wgpu::ShaderModule>>>,
    kernels: Mutex<HashMap<(Variant, &'static str), Arc<Kernel>>>,
}

impl Cache {
    pub fn new(checks: bool) -> Cache {
        let gemv_lanes = std::env::var("FP4MOE_WGPU_GEMV_LANES")
            .ok()
            .and_then(|v| v.parse::<u32>().ok())
            .filter(|l| l.is_power_of_two() && (4..=shape::WG).contains(l))
            .unwrap_or(shape::GEMV_LANES);
        Cache { gemv_lanes, checks, modules: Mutex::default(), kernels: Mutex::default() }
    }

    /// Weight rows per GEMV workgroup.
    pub fn gemv_rows(&self) -> u32 {
        shape::WG / self.gemv_lanes
    }

    /// The pipeline of `entry` in `variant`, compiled on first use. Compile errors (a kernel
    /// that the driver rejects) come back as device errors naming the entry point.
    pub fn get(
        &self,
        ctx: &Context,
        variant: Variant,
        entry: &'static str,
    ) -> fp4moe_ops::Result<Arc<Kernel>> {
        if let Some(k) = self.kernels.lock().unwrap_or_else(PoisonError::into_inner).get(&(variant, entry)) {
            return Ok(k.clone());
        }
        // A driver that rejects a kernel reports an internal error, the WGSL checks validation.
        let internal = ctx.device.push_error_scope(wgpu::ErrorFilter::Internal);
        let scope = ctx.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = {
            let mut mods = self.modules.lock().unwrap_or_else(PoisonError::into_inner);
            mods.entry(variant)
                .or_insert_with(|| {
                    let desc = wgpu::ShaderModuleDescriptor {
                        label: Some(entry),
                        source: wgpu::ShaderSource::Wgsl(
                            variant
                                .source(Consts { gemv_lanes: self.gemv_lanes, coop: ctx.caps.coop })
                                .into(),
                        ),
                    };
                    let checks = if self.checks {
                        wgpu::ShaderRuntimeChecks::checked()
                    } else {
                        wgpu::ShaderRuntimeChecks::unchecked()
                    };
                    // SAFETY: these are the project's own kernels, not user input. Their loops end
                    // (bounds from uniforms, no data-dependent exits), every index into a buffer or
                    // workgroup array is guarded or in range by construction, and no divisor is
                    // zero (the host rejects empty shapes before dispatching); the conformance
                    // suite runs them in both modes. Checked, naga adds a clamp to every index,
                    // a guard to every division and a counter to every loop, which also keeps the
                    // driver from unrolling the loops.
                    Arc::new(unsafe { ctx.device.create_shader_module_trusted(desc, checks) })
                })
                .clone()
        };
        let pipeline = ctx.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(entry),
            layout: None,
            module: &module,
            entry_point: Some(entry),
            // The cooperative-matrix GEMM writes all its workgroup memory before reading it; the
            // zeroing wgpu adds otherwise runs over its ~40 KiB in every workgroup.
            compilation_options: wgpu::PipelineCompilationOptions {
                zero_initialize_workgroup_memory: variant.src != Src::CoopGemm,
                ..Default::default()
            },
            cache: None,
        });
        let err = block_on(scope.pop());
        if let Some(e) = err.or(block_on(internal.pop())) {
            return Err(fp4moe_ops::Error::Device(format!(
                "compiling {entry} ({variant:?}): {}",
                crate::context::error_text(&e)
            )));
        }
        let layout = pipeline.get_bind_group_layout(0);
        let mut name = entry.to_string();
        if let Some(w) = variant.weight {
            name += &format!(":{w:?}");
        }
        if let Some(nt) = variant.n_tile {
            name += &format!(":{nt}");
        }
        let k = Arc::new(Kernel { name, pipeline, layout });
        self.kernels.lock().unwrap_or_else(PoisonError::into_inner).insert((variant, entry), k.clone());
        Ok(k)
    }
}
