//! Writes this project's FP4 checkpoint: quantize once, then every load is a memory map.
//!
//! Output directory:
//! - safetensors weights (`model.safetensors`, or `model-0000k-of-0000n.safetensors` shards with
//!   `model.safetensors.index.json`). A quantized Linear `{m}` becomes `{m}.weight_packed` U8
//!   `[rows, cols/2]`, `{m}.weight_scales` U8 `[rows, cols/B]` and `{m}.tensor_scales` F32 `[G]`
//!   (the [`fp4::QuantMatrix`] layout, byte for byte). The routed experts of an MoE block are
//!   written pre-stacked as the modules `{prefix}.experts.gate_up` `[E*2I, H]` (per expert I gate
//!   rows then I up rows) and `{prefix}.experts.down` `[E*H, I]`, so the loader maps them without
//!   copying. Every other tensor is copied as stored;
//! - `config.json` as in the source, the tokenizer and generation files when present;
//! - [`FP4MOE_QUANT_FILE`]: format, block size, layout, tool version, source, modules quantized.
//!
//! Everything is written into a sibling `{out}.partial-…` directory that is renamed to `out` only
//! once complete, so an interrupted run never leaves a checkpoint that looks whole; on error the
//! partial directory is removed. Quantized tensors are buffered up to one shard
//! ([`WriteOptions::shard_bytes`]) at a time, so peak memory stays bounded for any model size.

use crate::error::{Error, Result};
use crate::loader::{
    self, Checkpoint, Dtype, FP4MOE_QUANT_FILE, LoadOptions, PACKED_SUFFIX, QuantPolicy, Quantization,
    SCALES_SUFFIX, STACKED_DOWN, STACKED_GATE_UP, TENSOR_SCALES_SUFFIX,
};
use fp4::{Bytes, Format, QuantMatrix};
use fp4moe_ops::HostWeight;
use serde_json::{Value, json};
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Version of the on-disk layout described in this module; bumped on any change to it.
pub const LAYOUT_VERSION: u64 = 1;

/// Non-weight files copied when present (tokenizer, chat template, generation defaults).
pub const COPIED_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
];

/// One unit of work: what to quantize and how it is laid out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanItem {
    /// A Linear `{module}.weight` `[rows, cols]`.
    Linear { module: String, shape: [usize; 2] },
    /// The routed experts of the MoE block `prefix`, written pre-stacked.
    Experts { prefix: String, n_experts: usize, inter: usize, hidden: usize },
}

impl PlanItem {
    pub fn name(&self) -> &str {
        match self {
            PlanItem::Linear { module, .. } => module,
            PlanItem::Experts { prefix, .. } => prefix,
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct WriteOptions {
    /// Replace an existing output directory.
    pub force: bool,
    /// Close a shard once it holds at least this many bytes (also the bound on buffered data).
    pub shard_bytes: usize,
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions { force: false, shard_bytes: 2 << 30 }
    }
}

/// Reported after each plan item.
#[derive(Debug, Clone, Copy)]
pub struct Progress<'a> {
    pub done: usize,
    pub total: usize,
    pub item: &'a str,
    /// Bytes of quantized data produced so far.
    pub bytes: u64,
}

#[derive(Debug, Clone, Default)]
pub struct WriteSummary {
    pub files: usize,
    pub tensors: usize,
    pub bytes: u64,
    pub quantized_modules: usize,
}

/// The default plan for `src`: every Linear and every expert block that
/// [`Checkpoint::policy_for`] would quantize under `opts`, with shapes read from the checkpoint.
/// Routed experts (per-expert modules or fused 3-D parameters) become [`PlanItem::Experts`].
pub fn default_plan(src: &Checkpoint, opts: &LoadOptions) -> Result<Vec<PlanItem>> {
    if let Quantization::Fp4moe { .. } = src.quantization() {
        return Err(Error::Unsupported {
            what: format!("quantizing {}", src.dir().display()),
            reason: "it is already an fp4moe checkpoint".into(),
        });
    }
    // Quantized when the policy says so and every width is whole blocks (what the loader's
    // policy does too; a narrower weight stays dense, so the written checkpoint runs the same).
    let quantizes = |module: &str, widths: &[usize]| match src.policy_for(opts, module) {
        QuantPolicy::Quantize(f) => widths.iter().all(|w| w % f.block() == 0),
        QuantPolicy::Keep => false,
    };
    // prefix -> (max expert index + 1, [inter, hidden])
    let mut experts: BTreeMap<String, (usize, [usize; 2])> = BTreeMap::new();
    let mut linears = Vec::new();
    for name in src.names() {
        if let Some(prefix) = name.strip_suffix(".experts.gate_up_proj") {
            let t = src.info(name)?;
            if let [e, two_i, h] = t.shape[..] {
                experts.insert(prefix.to_string(), (e, [two_i / 2, h]));
            }
            continue;
        }
        let Some(module) = name.strip_suffix(".weight") else { continue };
        if let Some((prefix, rest)) = module.split_once(".experts.")
            && let Some((idx, proj)) = rest.split_once('.')
            && let Ok(e) = idx.parse::<usize>()
        {
            let entry = experts.entry(prefix.to_string()).or_insert((0, [0, 0]));
            entry.0 = entry.0.max(e + 1);
            if proj == "gate_proj" && e == 0 {
                entry.1 = logical_shape(src, name)?;
            }
            continue;
        }
        if module.contains(".experts.") {
            continue;
        }
        if src.info(name)?.shape.len() == 2 {
            let shape = logical_shape(src, name)?;
            if quantizes(module, &[shape[1]]) {
                linears.push(PlanItem::Linear { module: module.to_string(), shape });
            }
        }
    }
    let mut plan: Vec<PlanItem> = experts
        .into_iter()
        .filter(|(prefix, (_, [inter, hidden]))| quantizes(&format!("{prefix}.experts"), &[*inter, *hidden]))
        .map(|(prefix, (n_experts, [inter, hidden]))| PlanItem::Experts { prefix, n_experts, inter, hidden })
        .collect();
    plan.extend(linears);
    Ok(plan)
}

/// `[rows, cols]` of a Linear weight tensor, dense or ModelOpt-packed (U8 `[rows, cols/2]`).
fn logical_shape(src: &Checkpoint, name: &str) -> Result<[usize; 2]> {
    let t = src.info(name)?;
    match (t.dtype, &t.shape[..]) {
        (Dtype::U8, &[r, c]) => Ok([r, 2 * c]),
        (_, &[r, c]) => Ok([r, c]),
        _ => Err(Error::Shape {
            name: name.to_string(),
            file: src.file_of(name).map(Path::to_path_buf).unwrap_or_default(),
            expected: vec![0, 0],
            got: t.shape.clone(),
        }),
    }
}

/// Writes `src` with the modules of `plan` quantized to `format` into `out_dir` (see the module
/// overview). Refuses an existing `out_dir` unless `opts.force`.
pub fn write_quantized(
    src: &Checkpoint,
    out_dir: &Path,
    format: Format,
    plan: &[PlanItem],
    opts: &WriteOptions,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<WriteSummary> {
    if out_dir.exists() {
        if !opts.force {
            return Err(Error::OutputExists { path: out_dir.to_path_buf() });
        }
        let same = |p: &Path| std::fs::canonicalize(p).ok();
        if same(out_dir) == same(src.dir()) {
            return Err(Error::Invalid(format!(
                "output directory {} is the source checkpoint; choose another",
                out_dir.display()
            )));
        }
    }
    let file_name = out_dir
        .file_name()
        .ok_or_else(|| Error::Invalid(format!("output path {} has no directory name", out_dir.display())))?;
    let parent = match out_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let stamp = unique_stamp();
    let partial = parent.join(format!("{}.partial-{stamp}", file_name.to_string_lossy()));
    std::fs::create_dir_all(&partial).map_err(|e| Error::io(&partial, e))?;

    let result = write_into(src, &partial, format, plan, opts, progress);
    let result = result.and_then(|summary| {
        if out_dir.exists() {
            // Move the old one aside first: a rename onto a non-empty directory fails, and a
            // delete-then-rename would leave nothing at `out_dir` if the rename then failed.
            let old = parent.join(format!("{}.old-{stamp}", file_name.to_string_lossy()));
            std::fs::rename(out_dir, &old).map_err(|e| Error::io(out_dir, e))?;
            std::fs::rename(&partial, out_dir).map_err(|e| Error::io(out_dir, e))?;
            std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
        } else {
            std::fs::rename(&partial, out_dir).map_err(|e| Error::io(out_dir, e))?;
        }
        Ok(summary)
    });
    if result.is_err() {
        // Best effort: the original error is the one worth reporting.
        let _ = std::fs::remove_dir_all(&partial);
    }
    result
}

fn unique_stamp() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{}-{nanos}", std::process::id())
}

/// One output tensor; data is owned (quantized) or a view of the source map (copied tensors).
struct OutTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Bytes,
}

impl safetensors::View for &OutTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Accumulates tensors and flushes a shard file whenever the buffer is full.
struct ShardWriter<'a> {
    dir: &'a Path,
    limit: usize,
    pending: BTreeMap<String, OutTensor>,
    pending_bytes: usize,
    /// Temporary shard files written so far, with their tensor names.
    shards: Vec<(PathBuf, Vec<String>)>,
    tensors: usize,
    bytes: u64,
}

impl ShardWriter<'_> {
    fn push(&mut self, name: String, t: OutTensor) -> Result<()> {
        if self.pending.contains_key(&name) {
            return Err(Error::Invalid(format!("tensor `{name}` would be written twice")));
        }
        self.pending_bytes += t.data.len();
        self.pending.insert(name, t);
        if self.pending_bytes >= self.limit { self.flush() } else { Ok(()) }
    }

    fn push_quant(&mut self, module: &str, q: &QuantMatrix) -> Result<()> {
        let ts: Vec<u8> = q.tensor_scales.iter().flat_map(|s| s.to_le_bytes()).collect();
        let block = q.format.block();
        self.push(
            format!("{module}.{PACKED_SUFFIX}"),
            OutTensor { dtype: Dtype::U8, shape: vec![q.rows, q.cols / 2], data: q.codes.clone() },
        )?;
        self.push(
            format!("{module}.{SCALES_SUFFIX}"),
            OutTensor { dtype: Dtype::U8, shape: vec![q.rows, q.cols / block], data: q.scales.clone() },
        )?;
        self.push(
            format!("{module}.{TENSOR_SCALES_SUFFIX}"),
            OutTensor { dtype: Dtype::F32, shape: vec![q.tensor_scales.len()], data: ts.into() },
        )
    }

    fn flush(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let path = self.dir.join(format!("shard-{}.tmp", self.shards.len()));
        let pending = std::mem::take(&mut self.pending);
        safetensors::serialize_to_file(pending.iter().map(|(n, t)| (n.as_str(), t)), None, &path)
            .map_err(|e| Error::Safetensors { path: path.clone(), reason: format!("writing: {e}") })?;
        sync_file(&path)?;
        self.tensors += pending.len();
        self.bytes += self.pending_bytes as u64;
        self.pending_bytes = 0;
        self.shards.push((path, pending.into_keys().collect()));
        Ok(())
    }
}

fn sync_file(path: &Path) -> Result<()> {
    std::fs::File::open(path).and_then(|f| f.sync_all()).map_err(|e| Error::io(path, e))
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|source| Error::Json { path: path.into(), source })?;
    std::fs::write(path, text + "\n").map_err(|e| Error::io(path, e))
}

/// Takes the FP4 matrix out of a loaded weight, insisting on the requested format.
fn expect_quant(name: &str, w: HostWeight, format: Format) -> Result<QuantMatrix> {
    match w {
        HostWeight::Quant(q) if q.format == format => Ok(q),
        HostWeight::Quant(q) => Err(Error::Unsupported {
            what: format!("writing `{name}` as {}", format.name()),
            reason: format!(
                "the source already stores it as {}; re-quantizing FP4 would add error (use that format)",
                q.format.name()
            ),
        }),
        HostWeight::Dense { .. } => Err(Error::Invalid(format!("`{name}` was not quantized"))),
    }
}

fn write_into(
    src: &Checkpoint,
    dir: &Path,
    format: Format,
    plan: &[PlanItem],
    opts: &WriteOptions,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<WriteSummary> {
    let policy = QuantPolicy::Quantize(format);
    let mut w = ShardWriter {
        dir,
        limit: opts.shard_bytes.max(1),
        pending: BTreeMap::new(),
        pending_bytes: 0,
        shards: Vec::new(),
        tensors: 0,
        bytes: 0,
    };
    // Source tensors replaced by quantized ones; everything else is copied.
    let mut consumed: BTreeSet<String> = BTreeSet::new();
    let mut quantized_modules = Vec::new();
    let mut stacked = Vec::new();
    let mut produced: u64 = 0;
    for (i, item) in plan.iter().enumerate() {
        match item {
            PlanItem::Linear { module, shape } => {
                let q = expect_quant(module, src.linear(module, *shape, policy)?, format)?;
                w.push_quant(module, &q)?;
                produced += q.nbytes() as u64;
                for s in ["weight", "weight_scale", "weight_scale_2", "input_scale"] {
                    consumed.insert(format!("{module}.{s}"));
                }
                quantized_modules.push(module.clone());
            }
            PlanItem::Experts { prefix, n_experts, inter, hidden } => {
                let (gu, down) = src.experts(prefix, *n_experts, [*inter, *hidden], policy)?;
                for (suffix, weight) in [(STACKED_GATE_UP, gu), (STACKED_DOWN, down)] {
                    let module = format!("{prefix}.{suffix}");
                    let q = expect_quant(&module, weight, format)?;
                    w.push_quant(&module, &q)?;
                    produced += q.nbytes() as u64;
                    quantized_modules.push(module);
                }
                let experts = format!("{prefix}.experts.");
                consumed.extend(src.names().filter(|n| n.starts_with(&experts)).map(str::to_string));
                stacked.push(json!({
                    "prefix": prefix, "n_experts": n_experts, "moe_intermediate": inter, "hidden": hidden,
                }));
            }
        }
        progress(Progress { done: i + 1, total: plan.len(), item: item.name(), bytes: produced });
    }
    for name in src.names().filter(|n| !consumed.contains(*n)) {
        let t = src.info(name)?;
        w.push(
            name.to_string(),
            OutTensor { dtype: t.dtype, shape: t.shape.clone(), data: src.bytes(name)? },
        )?;
    }
    w.flush()?;

    // Final shard names need the count, known only now.
    let n = w.shards.len();
    let mut weight_map = serde_json::Map::new();
    for (k, (tmp, names)) in w.shards.iter().enumerate() {
        let final_name = if n == 1 {
            loader::SINGLE_FILE.to_string()
        } else {
            format!("model-{:05}-of-{n:05}.safetensors", k + 1)
        };
        let path = dir.join(&final_name);
        std::fs::rename(tmp, &path).map_err(|e| Error::io(&path, e))?;
        for name in names {
            weight_map.insert(name.clone(), Value::String(final_name.clone()));
        }
    }
    if n > 1 {
        let index = json!({ "metadata": { "total_size": w.bytes }, "weight_map": weight_map });
        write_json(&dir.join(loader::INDEX_FILE), &index)?;
    }
    let config_src = src.config_path();
    let config_dst = dir.join(loader::CONFIG_FILE);
    std::fs::copy(&config_src, &config_dst).map_err(|e| Error::io(&config_src, e))?;
    for f in COPIED_FILES {
        let p = src.dir().join(f);
        if p.is_file() {
            std::fs::copy(&p, dir.join(f)).map_err(|e| Error::io(&p, e))?;
        }
    }
    let meta = json!({
        "format": format.name(),
        "block_size": format.block(),
        "layout_version": LAYOUT_VERSION,
        "layout": format!(
            "Linear {{m}}: {{m}}.{PACKED_SUFFIX} U8 [rows, cols/2], element 2j in the low nibble of byte j; \
             {{m}}.{SCALES_SUFFIX} U8 [rows, cols/{b}] {scale} block-scale codes; \
             {{m}}.{TENSOR_SCALES_SUFFIX} F32 [G], one per rows/G consecutive rows; \
             value = e2m1 * scale * tensor_scale. Experts pre-stacked: {{prefix}}.{STACKED_GATE_UP} \
             [E*2I, H] (per expert I gate rows then I up rows), {{prefix}}.{STACKED_DOWN} [E*H, I].",
            b = format.block(),
            scale = match format { Format::Mxfp4 => "E8M0", Format::Nvfp4 => "E4M3" },
        ),
        "tool": concat!(env!("CARGO_PKG_NAME"), " ", env!("CARGO_PKG_VERSION")),
        "source": std::fs::canonicalize(src.dir()).unwrap_or_else(|_| src.dir().to_path_buf()),
        "source_quantization": src.quantization().describe(),
        "quantized_modules": quantized_modules,
        "stacked_experts": stacked,
    });
    // Written last: with the rename, its presence at `out_dir` means the checkpoint is whole.
    write_json(&dir.join(FP4MOE_QUANT_FILE), &meta)?;
    Ok(WriteSummary {
        files: n,
        tensors: w.tensors,
        bytes: w.bytes,
        quantized_modules: quantized_modules.len(),
    })
}
