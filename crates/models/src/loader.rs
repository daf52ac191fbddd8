//! Typed, validated access to a checkpoint directory. The model files decide names and shapes;
//! this module finds the bytes, checks them, and hands back [`HostWeight`]s — memory-mapped and
//! zero-copy wherever the stored layout is already the one the backends take.
//!
//! # Layouts read
//! - `config.json` (kept as a [`serde_json::Value`]; [`Checkpoint::config_as`] deserializes it);
//! - weights: `model.safetensors`, or shards listed in `model.safetensors.index.json`, or else every
//!   `*.safetensors` in the directory. Each file is memory-mapped; its header is validated (offsets
//!   inside the file, sizes matching dtype × shape, no truncation) and a bad one is an error that
//!   names the file;
//! - dense BF16 / F16 / F32 tensors;
//! - ModelOpt NVFP4 (detected from `hf_quant_config.json`, or `quantization_config` with
//!   `quant_method: "modelopt"` in `config.json`): a Linear `{m}` is `{m}.weight` U8 `[rows, cols/2]`,
//!   `{m}.weight_scale` F8_E4M3 `[rows, cols/16]`, `{m}.weight_scale_2` F32 scalar (`input_scale` is
//!   ignored: weights only). `exclude_modules` (or `ignore`) patterns, `*` wildcards, are honoured by
//!   [`Checkpoint::policy_for`];
//! - this project's FP4 checkpoints (detected from [`FP4MOE_QUANT_FILE`], written by
//!   [`crate::checkpoint_writer`]): a Linear `{m}` is `{m}.weight_packed` U8 `[rows, cols/2]`,
//!   `{m}.weight_scales` U8 `[rows, cols/B]`, `{m}.tensor_scales` F32 `[G]` (the layout of
//!   [`fp4::QuantMatrix`]); stacked experts are stored pre-stacked as the modules
//!   `{prefix}.experts.gate_up` `[E*2I, H]` and `{prefix}.experts.down` `[E*H, I]`, so loading is a
//!   pure memory map.
//!
//! A module is read by what its tensors are, not by what the config claims: `weight_packed` means
//! this project's layout, a U8 `weight` with `weight_scale` means ModelOpt, a float `weight` dense.
//!
//! # API (stable; the model files build on it)
//! - [`Checkpoint::open`]`(dir)`; [`Checkpoint::config`], [`Checkpoint::config_as`],
//!   [`Checkpoint::config_key`], [`Checkpoint::model_type`], [`Checkpoint::dir`],
//!   [`Checkpoint::quantization`];
//! - tensors: [`Checkpoint::has`], [`Checkpoint::names`], [`Checkpoint::info`] (dtype, shape),
//!   [`Checkpoint::bytes`] (zero-copy), [`Checkpoint::tensor_f32`], [`Checkpoint::vector_f32`]
//!   (norms, biases; BF16/F16/F32), [`Checkpoint::scalar_f32`];
//! - weights: [`Checkpoint::linear`]`(module, [rows, cols], policy)` reads `{module}.weight` (or its
//!   quantized parts); [`Checkpoint::linear_concat`]`(modules, [rows_each, cols], policy)` stacks
//!   rows in the order given; [`Checkpoint::experts`]`(prefix, n_experts, [inter, hidden], policy)`
//!   returns `(gate_up [E*2I, H], down [E*H, I])` — per expert I gate rows then I up rows — from
//!   per-expert modules `{prefix}.experts.{e}.{gate,up,down}_proj`, from fused 3-D parameters
//!   `{prefix}.experts.gate_up_proj [E, 2I, H]` / `down_proj [E, H, I]`, or pre-stacked FP4;
//! - policy: [`QuantPolicy`] (`Keep` or `Quantize(format)`), [`LoadOptions::policy_for`] (default
//!   rules), [`Checkpoint::policy_for`] (the same plus the checkpoint's `exclude_modules`);
//!   [`apply_policy`] quantizes a dense [`HostWeight`] the model built itself (e.g. a split).
//!
//! Policy on a weight that is already FP4: it is returned as stored, whatever format the policy
//! names (re-quantizing FP4 to another FP4 format would add error for no gain). A dense weight
//! whose width is not a whole number of blocks stays dense under `Quantize` (with a warning).
//!
//! Quantize-on-load equals [`fp4::quantize`] of each module's weight (each stacked expert part is
//! quantized on its own, so NVFP4 keeps one tensor scale per part whatever the stored layout).

use crate::error::{Error, Result};
use fp4::{Bytes, Format, QuantMatrix};
use fp4moe_ops::{DenseDType, HostWeight};
use memmap2::Mmap;
use rayon::prelude::*;
pub use safetensors::Dtype;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const CONFIG_FILE: &str = "config.json";
pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";
pub const MODELOPT_QUANT_FILE: &str = "hf_quant_config.json";
/// Metadata of this project's FP4 checkpoints; its presence marks the format.
pub const FP4MOE_QUANT_FILE: &str = "fp4moe_quant.json";
/// Tensor-name suffixes of this project's FP4 Linear (`{module}.{suffix}`).
pub const PACKED_SUFFIX: &str = "weight_packed";
pub const SCALES_SUFFIX: &str = "weight_scales";
pub const TENSOR_SCALES_SUFFIX: &str = "tensor_scales";
/// Module names of pre-stacked experts under an MoE prefix (`{prefix}.{name}`).
pub const STACKED_GATE_UP: &str = "experts.gate_up";
pub const STACKED_DOWN: &str = "experts.down";
/// ModelOpt's NVFP4 group size; any other is not NVFP4.
const MODELOPT_GROUP: usize = 16;
/// Bytes of the little-endian u64 that opens every safetensors file.
const HEADER_LEN_BYTES: usize = 8;

/// What to do with a dense weight on load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantPolicy {
    /// Keep as stored (dense stays dense, zero-copy; FP4 stays FP4).
    Keep,
    /// Quantize dense weights to this format on load.
    Quantize(Format),
}

/// Which modules get quantized on load.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// Target format for quantize-on-load; `None` keeps every weight as stored.
    pub quant: Option<Format>,
    /// Also quantize embeddings, the router and `lm_head` (by default only projections and
    /// experts are: the rest is small, or, for the router, decides routing and is sensitive).
    pub quantize_all: bool,
}

impl LoadOptions {
    /// Default rules: attention and MLP projections (`*_proj`, `kv_a_proj_with_mqa`) and experts
    /// are quantized; embeddings, norms, the router `mlp.gate` and `lm_head` are not.
    pub fn policy_for(&self, module: &str) -> QuantPolicy {
        match self.quant {
            Some(f) if self.quantize_all || is_projection(module) => QuantPolicy::Quantize(f),
            _ => QuantPolicy::Keep,
        }
    }
}

fn is_projection(module: &str) -> bool {
    let last = module.rsplit('.').next().unwrap_or(module);
    last.ends_with("_proj")
        || last.ends_with("_proj_with_mqa")
        || module.contains(".experts.")
        || module.ends_with(".experts")
        || module.contains(".shared_experts")
}

/// How the checkpoint is quantized, as its metadata says.
#[derive(Debug, Clone)]
pub enum Quantization {
    /// Dense weights only.
    None,
    /// ModelOpt NVFP4; modules matching `exclude_modules` were left unquantized by the producer.
    ModelOpt { exclude_modules: Vec<String> },
    /// This project's FP4 checkpoint; `meta` is the parsed [`FP4MOE_QUANT_FILE`].
    Fp4moe { format: Format, meta: Value },
}

impl Quantization {
    /// Short description for logs and `ModelInfo::quantization`.
    pub fn describe(&self) -> String {
        match self {
            Quantization::None => "none".into(),
            Quantization::ModelOpt { .. } => "nvfp4 (modelopt)".into(),
            Quantization::Fp4moe { format, .. } => format!("{} (fp4moe)", format.name()),
        }
    }
}

/// Where one tensor lives.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    shard: usize,
    /// Absolute byte range within the shard file.
    start: usize,
    len: usize,
}

struct Shard {
    path: PathBuf,
    map: Arc<Mmap>,
}

/// An opened checkpoint directory: config, memory-mapped shards and the tensor index.
pub struct Checkpoint {
    dir: PathBuf,
    config: Value,
    shards: Vec<Shard>,
    tensors: BTreeMap<String, TensorInfo>,
    quant: Quantization,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("dir", &self.dir)
            .field("shards", &self.shards.len())
            .field("tensors", &self.tensors.len())
            .field("quant", &self.quant.describe())
            .finish()
    }
}

impl Checkpoint {
    /// Opens `dir`: reads `config.json` and the quantization metadata, maps and validates every
    /// weight file. Nothing is copied or converted yet.
    pub fn open(dir: impl AsRef<Path>) -> Result<Checkpoint> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.is_dir() {
            return Err(Error::MissingFile { path: dir, what: "checkpoint directory" });
        }
        let config_path = dir.join(CONFIG_FILE);
        if !config_path.is_file() {
            return Err(Error::MissingFile { path: config_path, what: "model config" });
        }
        let config = read_json(&config_path)?;
        if !config.is_object() {
            return Err(Error::Config { path: config_path, reason: "not a JSON object".into() });
        }
        let quant = detect_quantization(&dir, &config)?;
        let (files, index) = weight_files(&dir)?;

        let mut shards = Vec::with_capacity(files.len());
        let mut tensors: BTreeMap<String, TensorInfo> = BTreeMap::new();
        for (i, path) in files.iter().enumerate() {
            let (shard, list) = open_shard(path, i)?;
            shards.push(shard);
            for (name, info) in list {
                // With an index, the index decides which file holds a duplicated name.
                let keep = match &index {
                    Some(map) => map.get(&name).is_none_or(|f| f == path),
                    None => true,
                };
                if keep {
                    tensors.entry(name).or_insert(info);
                }
            }
        }
        if let Some(map) = &index {
            for (name, file) in map {
                if !tensors.contains_key(name) {
                    return Err(Error::BadIndex {
                        path: dir.join(INDEX_FILE),
                        reason: format!("lists tensor `{name}` in {}, which lacks it", file.display()),
                    });
                }
            }
        }
        Ok(Checkpoint { dir, config, shards, tensors, quant })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config(&self) -> &Value {
        &self.config
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join(CONFIG_FILE)
    }

    /// The config deserialized into a model's serde struct; a missing or mistyped key is an
    /// error naming the key (serde's message) and the file.
    pub fn config_as<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        T::deserialize(&self.config)
            .map_err(|e| Error::Config { path: self.config_path(), reason: e.to_string() })
    }

    /// A top-level config key, or an error naming it.
    pub fn config_key(&self, key: &str) -> Result<&Value> {
        self.config
            .get(key)
            .ok_or_else(|| Error::MissingConfigKey { path: self.config_path(), key: key.to_string() })
    }

    /// The HF `model_type`.
    pub fn model_type(&self) -> Result<&str> {
        self.config_key("model_type")?.as_str().ok_or_else(|| Error::Config {
            path: self.config_path(),
            reason: "`model_type` is not a string".into(),
        })
    }

    pub fn quantization(&self) -> &Quantization {
        &self.quant
    }

    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Dtype and shape of `name`, or an error naming it.
    pub fn info(&self, name: &str) -> Result<&TensorInfo> {
        self.tensors
            .get(name)
            .ok_or_else(|| Error::MissingTensor { name: name.to_string(), dir: self.dir.clone() })
    }

    /// The file that holds `name`.
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        self.tensors.get(name).map(|t| self.shards[t.shard].path.as_path())
    }

    /// Every weight file, in the order opened.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.shards.iter().map(|s| s.path.as_path())
    }

    /// Total bytes of tensor data.
    pub fn data_bytes(&self) -> usize {
        self.tensors.values().map(|t| t.len).sum()
    }

    /// The raw little-endian bytes of `name`, borrowed from the memory map (no copy).
    pub fn bytes(&self, name: &str) -> Result<Bytes> {
        let t = self.info(name)?;
        Ok(self.view(t))
    }

    fn view(&self, t: &TensorInfo) -> Bytes {
        let owner: Arc<dyn AsRef<[u8]> + Send + Sync> = self.shards[t.shard].map.clone();
        Bytes::from_owner(owner, t.start, t.len)
    }

    fn file_path(&self, name: &str) -> PathBuf {
        self.file_of(name).map(Path::to_path_buf).unwrap_or_else(|| self.dir.clone())
    }

    fn shape_err(&self, name: &str, expected: &[usize], got: &[usize]) -> Error {
        Error::Shape {
            name: name.to_string(),
            file: self.file_path(name),
            expected: expected.to_vec(),
            got: got.to_vec(),
        }
    }

    fn dtype_err(&self, name: &str, expected: &str, got: Dtype) -> Error {
        Error::DType {
            name: name.to_string(),
            file: self.file_path(name),
            expected: expected.to_string(),
            got: format!("{got:?}"),
        }
    }

    /// Info of `name`, checked to have exactly `shape`.
    fn info_shaped(&self, name: &str, shape: &[usize]) -> Result<&TensorInfo> {
        let t = self.info(name)?;
        if t.shape != shape {
            return Err(self.shape_err(name, shape, &t.shape));
        }
        Ok(t)
    }

    fn dense_dtype(&self, name: &str, t: &TensorInfo) -> Result<DenseDType> {
        match t.dtype {
            Dtype::F32 => Ok(DenseDType::F32),
            Dtype::BF16 => Ok(DenseDType::BF16),
            Dtype::F16 => Ok(DenseDType::F16),
            d => Err(self.dtype_err(name, "BF16, F16 or F32", d)),
        }
    }

    /// A dense tensor of exactly `shape` as f32 (BF16, F16 or F32 stored).
    pub fn tensor_f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let t = self.info_shaped(name, shape)?;
        let dtype = self.dense_dtype(name, t)?;
        Ok(dense_to_f32(&self.view(t), dtype))
    }

    /// A vector `[len]` (norm weight, bias) as f32.
    pub fn vector_f32(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        self.tensor_f32(name, &[len])
    }

    /// A scalar stored as shape `[]` or `[1]`.
    pub fn scalar_f32(&self, name: &str) -> Result<f32> {
        let t = self.info(name)?;
        if t.shape.iter().product::<usize>() != 1 || t.shape.len() > 1 {
            return Err(self.shape_err(name, &[], &t.shape));
        }
        let dtype = self.dense_dtype(name, t)?;
        Ok(dense_to_f32(&self.view(t), dtype)[0])
    }

    /// A dense 2-D tensor `[rows, cols]`, zero-copy.
    pub fn dense(&self, name: &str, shape: [usize; 2]) -> Result<HostWeight> {
        self.dense_as(name, &shape, shape)
    }

    /// A dense tensor stored with `stored` shape, viewed as the matrix `[rows, cols]` (same
    /// row-major bytes, e.g. `[E, N, K]` as `[E*N, K]`).
    fn dense_as(&self, name: &str, stored: &[usize], [rows, cols]: [usize; 2]) -> Result<HostWeight> {
        let t = self.info_shaped(name, stored)?;
        let dtype = self.dense_dtype(name, t)?;
        Ok(HostWeight::Dense { rows, cols, dtype, bytes: self.view(t) })
    }

    /// True if `module` (or a parent module) matches the checkpoint's `exclude_modules`.
    pub fn is_excluded(&self, module: &str) -> bool {
        match &self.quant {
            Quantization::ModelOpt { exclude_modules } => exclude_modules.iter().any(|p| {
                glob_match(p, module) || module.match_indices('.').any(|(i, _)| glob_match(p, &module[..i]))
            }),
            _ => false,
        }
    }

    /// [`LoadOptions::policy_for`], except that modules the quantizer of a pre-quantized
    /// checkpoint deliberately excluded stay as stored unless `quantize_all`.
    pub fn policy_for(&self, opts: &LoadOptions, module: &str) -> QuantPolicy {
        if !opts.quantize_all && self.is_excluded(module) {
            return QuantPolicy::Keep;
        }
        opts.policy_for(module)
    }

    /// The Linear `module` (`{module}.weight` and, if quantized, its scales) as a `[rows, cols]`
    /// weight, under `policy`.
    pub fn linear(&self, module: &str, shape: [usize; 2], policy: QuantPolicy) -> Result<HostWeight> {
        let w = self.linear_stored(module, shape)?;
        apply_policy(&format!("{module}.weight"), w, policy)
    }

    /// The Linear `module` exactly as stored.
    fn linear_stored(&self, module: &str, shape: [usize; 2]) -> Result<HostWeight> {
        if self.has(&format!("{module}.{PACKED_SUFFIX}")) {
            return self.fp4moe_linear(module, shape).map(HostWeight::Quant);
        }
        let wname = format!("{module}.weight");
        let t = self.info(&wname)?;
        if t.dtype == Dtype::U8 {
            return self.modelopt_linear(module, shape).map(HostWeight::Quant);
        }
        self.dense(&wname, shape)
    }

    fn modelopt_linear(&self, module: &str, [rows, cols]: [usize; 2]) -> Result<QuantMatrix> {
        let wname = format!("{module}.weight");
        let sname = format!("{module}.weight_scale");
        let s2name = format!("{module}.weight_scale_2");
        if cols % MODELOPT_GROUP != 0 {
            return Err(Error::fp4(
                &wname,
                fp4::Error::NotBlockMultiple {
                    what: "columns",
                    got: cols,
                    block: MODELOPT_GROUP,
                    format: Format::Nvfp4,
                },
            ));
        }
        let w = self.info_shaped(&wname, &[rows, cols / 2])?;
        let s = self.info(&sname)?;
        if !matches!(s.dtype, Dtype::F8_E4M3 | Dtype::U8) {
            return Err(self.dtype_err(&sname, "F8_E4M3", s.dtype));
        }
        if s.shape != [rows, cols / MODELOPT_GROUP] {
            return Err(self.shape_err(&sname, &[rows, cols / MODELOPT_GROUP], &s.shape));
        }
        let s2 = self.scalar_f32(&s2name)?;
        fp4::import::modelopt_nvfp4(rows, cols, self.view(w), self.view(s), s2)
            .map_err(|e| quant_err(module, "weight_scale", "weight_scale_2", e))
    }

    fn fp4moe_linear(&self, module: &str, [rows, cols]: [usize; 2]) -> Result<QuantMatrix> {
        let Quantization::Fp4moe { format, .. } = self.quant else {
            return Err(Error::QuantConfig {
                path: self.dir.join(FP4MOE_QUANT_FILE),
                reason: format!("`{module}.{PACKED_SUFFIX}` is present but the metadata file is missing"),
            });
        };
        let block = format.block();
        let pname = format!("{module}.{PACKED_SUFFIX}");
        if cols % block != 0 {
            return Err(Error::fp4(
                &pname,
                fp4::Error::NotBlockMultiple { what: "columns", got: cols, block, format },
            ));
        }
        let sname = format!("{module}.{SCALES_SUFFIX}");
        let tname = format!("{module}.{TENSOR_SCALES_SUFFIX}");
        let p = self.info_shaped(&pname, &[rows, cols / 2])?;
        let s = self.info_shaped(&sname, &[rows, cols / block])?;
        for (name, t) in [(&pname, p), (&sname, s)] {
            if t.dtype != Dtype::U8 {
                return Err(self.dtype_err(name, "U8", t.dtype));
            }
        }
        let ts = self.info(&tname)?;
        if ts.shape.len() != 1 {
            return Err(self.shape_err(&tname, &[1], &ts.shape));
        }
        let tensor_scales = self.tensor_f32(&tname, &ts.shape.clone())?;
        QuantMatrix::new(format, rows, cols, self.view(p), self.view(s), tensor_scales)
            .map_err(|e| quant_err(module, SCALES_SUFFIX, TENSOR_SCALES_SUFFIX, e))
    }

    /// The rows of several Linear modules `[rows_each, cols]` stacked in the order given
    /// (`[m0; m1; …]`), under `policy`. FP4 parts keep their own tensor scales (exact).
    pub fn linear_concat(
        &self,
        modules: &[String],
        [rows_each, cols]: [usize; 2],
        policy: QuantPolicy,
    ) -> Result<HostWeight> {
        let parts =
            in_order(modules.par_iter().map(|m| self.linear(m, [rows_each, cols], policy)).collect())?;
        concat_weights(modules, &parts)
    }

    /// The routed experts of the MoE block at `prefix` (e.g. `model.layers.3.mlp`):
    /// `(gate_up [E*2I, H], down [E*H, I])`, per expert I gate rows then I up rows.
    /// Reads per-expert modules, fused 3-D parameters, or pre-stacked FP4, whichever is stored.
    pub fn experts(
        &self,
        prefix: &str,
        n_experts: usize,
        [inter, hidden]: [usize; 2],
        policy: QuantPolicy,
    ) -> Result<(HostWeight, HostWeight)> {
        let gu_shape = [n_experts * 2 * inter, hidden];
        let down_shape = [n_experts * hidden, inter];
        let gu_mod = format!("{prefix}.{STACKED_GATE_UP}");
        let down_mod = format!("{prefix}.{STACKED_DOWN}");
        if self.has(&format!("{gu_mod}.{PACKED_SUFFIX}")) || self.has(&format!("{gu_mod}.weight")) {
            return Ok((
                self.stacked(&gu_mod, gu_shape, inter, policy)?,
                self.stacked(&down_mod, down_shape, hidden, policy)?,
            ));
        }
        let gu_fused = format!("{prefix}.experts.gate_up_proj");
        if self.has(&gu_fused) {
            let down_fused = format!("{prefix}.experts.down_proj");
            let gu = self.dense_as(&gu_fused, &[n_experts, 2 * inter, hidden], gu_shape)?;
            let down = self.dense_as(&down_fused, &[n_experts, hidden, inter], down_shape)?;
            return Ok((
                apply_policy_parts(&gu_fused, gu, inter, policy)?,
                apply_policy_parts(&down_fused, down, hidden, policy)?,
            ));
        }
        let expert = |e: usize, p: &str| format!("{prefix}.experts.{e}.{p}");
        let gate_up: Vec<String> =
            (0..n_experts).flat_map(|e| [expert(e, "gate_proj"), expert(e, "up_proj")]).collect();
        let down: Vec<String> = (0..n_experts).map(|e| expert(e, "down_proj")).collect();
        Ok((
            self.linear_concat(&gate_up, [inter, hidden], policy)?,
            self.linear_concat(&down, [hidden, inter], policy)?,
        ))
    }

    /// A pre-stacked module whose parts have `rows_per_part` rows each.
    fn stacked(
        &self,
        module: &str,
        shape: [usize; 2],
        rows_per_part: usize,
        policy: QuantPolicy,
    ) -> Result<HostWeight> {
        let w = self.linear_stored(module, shape)?;
        apply_policy_parts(&format!("{module}.weight"), w, rows_per_part, policy)
    }
}

/// Maps an fp4 validation error to the tensor that holds the bad value.
fn quant_err(module: &str, block_scales: &str, tensor_scales: &str, e: fp4::Error) -> Error {
    let suffix = match e {
        fp4::Error::BadScale { .. } => block_scales,
        fp4::Error::BadTensorScale { .. } => tensor_scales,
        _ => "weight",
    };
    Error::fp4(format!("{module}.{suffix}"), e)
}

/// Applies `policy` to a weight: a dense weight under `Quantize(f)` becomes FP4 exactly as
/// [`fp4::quantize`] would make it; anything else is returned as is. `name` is for errors.
///
/// A width that is not a whole number of blocks cannot be FP4 in this layout; such a weight
/// stays dense (with a warning) rather than failing the load, since the policy asks for
/// "quantized where possible". Every projection of the real models divides evenly; only tiny
/// test configs hit this.
pub fn apply_policy(name: &str, w: HostWeight, policy: QuantPolicy) -> Result<HostWeight> {
    match (quantizable(name, &w, policy), &w) {
        (Some(format), HostWeight::Dense { rows, cols, dtype, bytes }) => {
            let data = dense_to_f32(bytes, *dtype);
            quantize_f32(name, &data, *rows, *cols, format).map(HostWeight::Quant)
        }
        _ => Ok(w),
    }
}

/// The format to quantize `w` to, if `policy` asks for one and `w` is dense with a width the
/// format's block divides.
fn quantizable(name: &str, w: &HostWeight, policy: QuantPolicy) -> Option<Format> {
    let (QuantPolicy::Quantize(format), HostWeight::Dense { cols, .. }) = (policy, w) else {
        return None;
    };
    if cols % format.block() != 0 {
        tracing::warn!(
            "{name}: {cols} columns are not a multiple of the {} block ({}); kept dense",
            format.name(),
            format.block()
        );
        return None;
    }
    Some(format)
}

/// [`apply_policy`] for a stacked weight whose parts (experts, gate/up halves) have
/// `rows_per_part` rows: each part is quantized on its own, as if loaded module by module.
fn apply_policy_parts(
    name: &str,
    w: HostWeight,
    rows_per_part: usize,
    policy: QuantPolicy,
) -> Result<HostWeight> {
    let (Some(format), HostWeight::Dense { rows, cols, dtype, bytes }) = (quantizable(name, &w, policy), &w)
    else {
        return Ok(w);
    };
    if rows_per_part == 0 || rows % rows_per_part != 0 {
        return Err(Error::Invalid(format!(
            "{name}: {rows} rows do not split into parts of {rows_per_part}"
        )));
    }
    let part_bytes = rows_per_part * cols * dtype.size();
    let parts: Vec<QuantMatrix> = in_order(
        (0..rows / rows_per_part)
            .into_par_iter()
            .map(|p| {
                let data = dense_to_f32(&bytes[p * part_bytes..(p + 1) * part_bytes], *dtype);
                quantize_f32(&format!("{name}[part {p}]"), &data, rows_per_part, *cols, format)
            })
            .collect(),
    )?;
    let refs: Vec<&QuantMatrix> = parts.iter().collect();
    QuantMatrix::concat_rows(&refs).map(HostWeight::Quant).map_err(|e| Error::fp4(name, e))
}

/// The results of a parallel map, or the first error in item order: rayon's `collect` into a
/// `Result` returns whichever error it meets first in time, so with several bad items the
/// message changed from run to run.
fn in_order<T>(results: Vec<Result<T>>) -> Result<Vec<T>> {
    results.into_iter().collect()
}

/// Quantizes `data [rows, cols]`; identical to [`fp4::quantize`]. MXFP4 rows are independent,
/// so large matrices are quantized in parallel row chunks; NVFP4's tensor scale depends on the
/// whole matrix, so it runs in one piece (callers parallelize across matrices).
pub fn quantize_f32(
    name: &str,
    data: &[f32],
    rows: usize,
    cols: usize,
    format: Format,
) -> Result<QuantMatrix> {
    /// Elements per parallel chunk: large enough that scheduling is noise.
    const CHUNK_ELEMS: usize = 1 << 18;
    let chunk_rows = (CHUNK_ELEMS / cols.max(1)).max(1);
    if format == Format::Nvfp4 || rows <= chunk_rows || data.len() != rows * cols {
        return fp4::quantize(data, rows, cols, format).map(|q| q.matrix).map_err(|e| Error::fp4(name, e));
    }
    let parts: Vec<QuantMatrix> = data
        .par_chunks(chunk_rows * cols)
        .enumerate()
        .map(|(i, chunk)| {
            fp4::quantize(chunk, chunk.len() / cols, cols, format).map(|q| q.matrix).map_err(|e| match e {
                fp4::Error::NonFinite { row, col, value } => {
                    Error::fp4(name, fp4::Error::NonFinite { row: row + i * chunk_rows, col, value })
                }
                e => Error::fp4(name, e),
            })
        })
        .collect::<Result<_>>()?;
    let refs: Vec<&QuantMatrix> = parts.iter().collect();
    QuantMatrix::concat_rows(&refs).map_err(|e| Error::fp4(name, e))
}

/// Stacks the rows of `parts` (named by `names`, for errors).
fn concat_weights(names: &[String], parts: &[HostWeight]) -> Result<HostWeight> {
    let stack_err = |i: usize, why: &str| Error::Unsupported {
        what: format!("stacking `{}` with `{}`", names[0], names[i]),
        reason: why.to_string(),
    };
    match parts.first() {
        None => Err(Error::Invalid("no modules to stack".into())),
        Some(HostWeight::Quant(_)) => {
            let mut qs = Vec::with_capacity(parts.len());
            for (i, p) in parts.iter().enumerate() {
                match p {
                    HostWeight::Quant(q) => qs.push(q),
                    HostWeight::Dense { .. } => return Err(stack_err(i, "one is FP4, the other dense")),
                }
            }
            QuantMatrix::concat_rows(&qs).map(HostWeight::Quant).map_err(|e| Error::fp4(&names[0], e))
        }
        Some(HostWeight::Dense { cols, dtype, .. }) => {
            let (cols, dtype) = (*cols, *dtype);
            let mut out = Vec::with_capacity(parts.iter().map(HostWeight::nbytes).sum());
            let mut rows = 0;
            for (i, p) in parts.iter().enumerate() {
                match p {
                    HostWeight::Dense { rows: r, cols: c, dtype: d, bytes } if *c == cols && *d == dtype => {
                        out.extend_from_slice(bytes);
                        rows += r;
                    }
                    HostWeight::Dense { .. } => return Err(stack_err(i, "dtypes or widths differ")),
                    HostWeight::Quant(_) => return Err(stack_err(i, "one is dense, the other FP4")),
                }
            }
            Ok(HostWeight::Dense { rows, cols, dtype, bytes: out.into() })
        }
    }
}

/// Little-endian BF16/F16/F32 bytes to f32, in parallel for large tensors.
pub fn dense_to_f32(bytes: &[u8], dtype: DenseDType) -> Vec<f32> {
    const CHUNK: usize = 1 << 16;
    let sz = dtype.size();
    let mut out = vec![0.0f32; bytes.len() / sz];
    out.par_chunks_mut(CHUNK).zip(bytes.par_chunks(CHUNK * sz)).for_each(|(o, b)| {
        for (v, e) in o.iter_mut().zip(b.chunks_exact(sz)) {
            *v = match dtype {
                DenseDType::F32 => f32::from_le_bytes([e[0], e[1], e[2], e[3]]),
                DenseDType::BF16 => half::bf16::from_le_bytes([e[0], e[1]]).to_f32(),
                DenseDType::F16 => half::f16::from_le_bytes([e[0], e[1]]).to_f32(),
            };
        }
    });
    out
}

/// `*` matches any run of characters (dots included), `?` one character, as ModelOpt's
/// fnmatch-style `exclude_modules` do.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

pub(crate) fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|source| Error::Json { path: path.to_path_buf(), source })
}

fn detect_quantization(dir: &Path, config: &Value) -> Result<Quantization> {
    let ours = dir.join(FP4MOE_QUANT_FILE);
    if ours.exists() {
        let meta = read_json(&ours)?;
        let bad = |reason: String| Error::QuantConfig { path: ours.clone(), reason };
        let name =
            meta.get("format").and_then(Value::as_str).ok_or_else(|| bad("missing `format`".into()))?;
        let format =
            Format::parse(name).ok_or_else(|| bad(format!("format `{name}` is not one of mxfp4, nvfp4")))?;
        if let Some(b) = meta.get("block_size").and_then(Value::as_u64)
            && b as usize != format.block()
        {
            return Err(bad(format!("block_size {b} does not match {name} (block {})", format.block())));
        }
        let supported = crate::checkpoint_writer::LAYOUT_VERSION;
        if let Some(v) = meta.get("layout_version").and_then(Value::as_u64)
            && v > supported
        {
            return Err(bad(format!(
                "layout_version {v} is newer than this build reads ({supported}); upgrade fp4moe"
            )));
        }
        return Ok(Quantization::Fp4moe { format, meta });
    }
    let hf = dir.join(MODELOPT_QUANT_FILE);
    if hf.exists() {
        let v = read_json(&hf)?;
        let q = v.get("quantization").unwrap_or(&v);
        return parse_modelopt(&hf, q);
    }
    if let Some(qc) = config.get("quantization_config") {
        let path = dir.join(CONFIG_FILE);
        let method = qc.get("quant_method").and_then(Value::as_str).unwrap_or("");
        if method != "modelopt" {
            return Err(Error::QuantConfig {
                path,
                reason: format!(
                    "quantization_config.quant_method `{method}` is not supported \
                     (supported: modelopt NVFP4, or a dense checkpoint)"
                ),
            });
        }
        return parse_modelopt(&path, qc);
    }
    Ok(Quantization::None)
}

fn parse_modelopt(path: &Path, q: &Value) -> Result<Quantization> {
    let bad = |reason: String| Error::QuantConfig { path: path.to_path_buf(), reason };
    let algo =
        q.get("quant_algo").and_then(Value::as_str).ok_or_else(|| bad("missing `quant_algo`".into()))?;
    if !algo.eq_ignore_ascii_case("NVFP4") {
        return Err(bad(format!("quant_algo `{algo}` is not supported (supported: NVFP4)")));
    }
    if let Some(g) = q.get("group_size").and_then(Value::as_u64)
        && g as usize != MODELOPT_GROUP
    {
        return Err(bad(format!("group_size {g} is not NVFP4's {MODELOPT_GROUP}")));
    }
    let list = q.get("exclude_modules").or_else(|| q.get("ignore"));
    let exclude_modules = match list {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_str().map(str::to_string).ok_or_else(|| bad("exclude_modules: not a string".into()))
            })
            .collect::<Result<_>>()?,
        Some(_) => return Err(bad("exclude_modules is not a list".into())),
    };
    Ok(Quantization::ModelOpt { exclude_modules })
}

type IndexMap = BTreeMap<String, PathBuf>;

/// The weight files of `dir` and, when sharded, the index's tensor → file map.
fn weight_files(dir: &Path) -> Result<(Vec<PathBuf>, Option<IndexMap>)> {
    let index_path = dir.join(INDEX_FILE);
    if index_path.exists() {
        let v = read_json(&index_path)?;
        let bad = |reason: String| Error::BadIndex { path: index_path.clone(), reason };
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| bad("missing `weight_map` object".into()))?;
        let mut files: BTreeSet<PathBuf> = BTreeSet::new();
        let mut index = IndexMap::new();
        for (name, file) in map {
            let file = file.as_str().ok_or_else(|| bad(format!("`{name}`: file is not a string")))?;
            let rel = Path::new(file);
            // Shard names come from a file the user downloaded: keep them inside the directory.
            if rel.is_absolute() || rel.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
                return Err(bad(format!("`{name}`: shard path `{file}` leaves the checkpoint directory")));
            }
            let path = dir.join(rel);
            files.insert(path.clone());
            index.insert(name.clone(), path);
        }
        if let Some(path) = files.iter().find(|p| !p.is_file()) {
            return Err(Error::MissingFile { path: path.clone(), what: "shard listed in the index" });
        }
        let files = files.into_iter().collect();
        return Ok((files, Some(index)));
    }
    let single = dir.join(SINGLE_FILE);
    if single.exists() {
        return Ok((vec![single], None));
    }
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut files: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    if files.is_empty() {
        return Err(Error::NoWeights { dir: dir.to_path_buf() });
    }
    files.sort();
    Ok((files, None))
}

/// Maps one safetensors file and validates its header against the file size.
fn open_shard(path: &Path, index: usize) -> Result<(Shard, Vec<(String, TensorInfo)>)> {
    let bad = |reason: String| Error::Safetensors { path: path.to_path_buf(), reason };
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let size = file.metadata().map_err(|e| Error::io(path, e))?.len() as usize;
    if size < HEADER_LEN_BYTES {
        return Err(bad(format!("file is {size} bytes, too short for a header")));
    }
    // SAFETY: the map is read-only and the file is not modified by this process; the one risk,
    // another process truncating the file while mapped, is the same every mmap-based loader
    // (safetensors, llama.cpp) accepts.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let header_len = u64::from_le_bytes(map[..HEADER_LEN_BYTES].try_into().expect("8 bytes"));
    if header_len > (size - HEADER_LEN_BYTES) as u64 {
        return Err(bad(format!(
            "header length {header_len} exceeds the file size {size} (truncated or not safetensors)"
        )));
    }
    let (n, meta) = safetensors::SafeTensors::read_metadata(&map).map_err(|e| {
        bad(match e {
            safetensors::SafeTensorError::MetadataIncompleteBuffer => {
                format!("tensor data does not match the header ({size} bytes on disk: truncated?)")
            }
            e => format!("corrupt header: {e}"),
        })
    })?;
    let data_start = HEADER_LEN_BYTES + n;
    let mut list = Vec::new();
    for (name, info) in meta.tensors() {
        let (s, e) = info.data_offsets;
        let (start, end) = (data_start + s, data_start + e);
        // read_metadata checks this too; the check here keeps Bytes::from_owner's assert
        // unreachable whatever the crate version does.
        if end > size || start > end {
            return Err(bad(format!("tensor `{name}`: data offsets {s}..{e} lie outside the file")));
        }
        list.push((
            name,
            TensorInfo {
                dtype: info.dtype,
                shape: info.shape.clone(),
                shard: index,
                start,
                len: end - start,
            },
        ));
    }
    Ok((Shard { path: path.to_path_buf(), map: Arc::new(map) }, list))
}
