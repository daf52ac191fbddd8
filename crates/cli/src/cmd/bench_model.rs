//! `fp4moe bench model`: a synthetic model of a real architecture (random FP4 weights of the real
//! shapes, all layers by default), timed on a 512-token prefill and batch-1 decode, and compared
//! with its bandwidth floor: the bytes one decode step must read (embedding row, attention,
//! router, the top-k experts routing picks, shared expert, lm_head, KV cache) divided by the
//! bandwidth of the memory the weights live in, measured in the same run: the host's read
//! bandwidth for the CPU backends, the device's (an elementwise add through the backend itself)
//! for GPU backends. `--profile` times every op by kind (see `fp4moe_ops::profile`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::Context;
use fp4moe_engine::{PickPaths, Sampler, SamplingParams};
use fp4moe_models::{Arch, LanguageModel, glm4_moe_lite, qwen3_moe};
use fp4moe_ops::profile::{OpStats, Profiled};
use fp4moe_ops::{Backend, DType};
use serde_json::json;

use super::run::{ActivationsArg, QuantArg, SYNTHETIC_WEIGHT_SEED, SyntheticArch};
use crate::backend::{BackendKind, OnBackend, dispatch};

/// `fp4moe bench model`
#[derive(clap::Args)]
#[command(after_help = "Example:\n  fp4moe bench model --synthetic qwen3-30b-a3b --json bench.json")]
pub struct Args {
    /// Architecture to build with random weights.
    #[arg(long, value_enum, default_value_t = SyntheticArch::DEFAULT)]
    pub synthetic: SyntheticArch,

    /// Decoder layers [default: all of the architecture's].
    #[arg(long)]
    pub layers: Option<usize>,

    /// Compute backend.
    #[arg(long, value_enum, default_value_t = BackendKind::Auto)]
    pub backend: BackendKind,

    /// FP4 format of the weights.
    #[arg(long, value_enum, default_value_t = QuantArg::Mxfp4)]
    pub quant: QuantArg,

    /// Prompt tokens of the timed prefill (one forward pass).
    #[arg(long, default_value_t = 512)]
    pub prefill: usize,

    /// What the prefill's products read: f32 (decode always does) or bf16.
    #[arg(long, value_enum, default_value_t = ActivationsArg::F32)]
    pub prefill_activations: ActivationsArg,

    /// Decode steps timed after the prefill (batch 1, greedy).
    #[arg(long, default_value_t = 32)]
    pub decode_tokens: usize,

    /// Size of the buffer the memory-bandwidth probe reads (MiB); far larger than any cache.
    #[arg(long, default_value_t = 1024)]
    pub bandwidth_mib: usize,

    /// Also time every op by kind (each op then waits for the device, so the run is slower than
    /// without; the table says where the time goes, not how fast an unprofiled run is).
    #[arg(long)]
    pub profile: bool,

    /// Sampling temperature of the decode steps (0 = greedy). Steps are picked as the engine
    /// picks them: from the device's top k (greedy, top-k up to 64), through weight sums made on
    /// the device (temperature, top-p, min-p without top-k, on a backend that makes them), or
    /// from the whole logits row sampled on the host.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,

    /// Top-k of the decode steps' sampling (0 = off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,

    /// Top-p of the decode steps' sampling (1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,

    /// Min-p of the decode steps' sampling (0 = off).
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,

    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,
}

/// Bytes one batch-1 decode step reads, by kind.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct DecodeBytes {
    pub embedding_row: u64,
    pub attention: u64,
    pub router: u64,
    pub routed_experts: u64,
    pub shared_experts: u64,
    pub dense_mlp: u64,
    pub norms: u64,
    pub lm_head: u64,
    pub kv_cache: u64,
}

impl DecodeBytes {
    pub fn total(&self) -> u64 {
        self.embedding_row
            + self.attention
            + self.router
            + self.routed_experts
            + self.shared_experts
            + self.dense_mlp
            + self.norms
            + self.lm_head
            + self.kv_cache
    }
}

/// How the synthetic model stores each kind of weight (see `fp4moe_models::synthetic`):
/// projections and experts FP4 (½ byte per element plus one scale byte per block), embeddings,
/// routers and lm_head bf16, norms and biases f32; the KV cache holds f32.
struct Storage {
    format: fp4::Format,
}

const BF16_BYTES: u64 = 2;
const F32_BYTES: u64 = 4;

impl Storage {
    /// Bytes of an FP4 `[rows, cols]` matrix (the per-tensor f32 scale is negligible).
    fn fp4(&self, rows: usize, cols: usize) -> u64 {
        let elems = (rows * cols) as u64;
        elems / 2 + elems / self.format.block() as u64
    }
}

/// Bytes a decode step reads at context length `ctx` (tokens in the cache, including the new one).
pub fn decode_bytes(
    arch: Arch,
    layers: Option<usize>,
    format: fp4::Format,
    ctx: usize,
) -> anyhow::Result<DecodeBytes> {
    let mut config = arch.config();
    if let Some(n) = layers {
        config["num_hidden_layers"] = json!(n);
    }
    let path = Path::new("<synthetic config>");
    let s = Storage { format };
    let mut b = DecodeBytes::default();
    match arch {
        Arch::Qwen3_30bA3b => {
            let c = qwen3_moe::Config::from_json(&config, path)?;
            let (h, d) = (c.hidden_size, c.head_dim);
            b.embedding_row = h as u64 * BF16_BYTES;
            b.lm_head = (c.vocab_size * h) as u64 * BF16_BYTES;
            b.norms = (h as u64) * F32_BYTES;
            for &sparse in &c.sparse {
                let q = c.num_heads * d;
                let kv = c.num_kv_heads * d;
                b.attention += s.fp4(q, h) + 2 * s.fp4(kv, h) + s.fp4(h, q);
                b.norms += (2 * h + 2 * d) as u64 * F32_BYTES;
                if sparse {
                    b.router += (c.num_experts * h) as u64 * BF16_BYTES;
                    b.routed_experts += c.top_k as u64 * 3 * s.fp4(c.moe_intermediate_size, h);
                } else {
                    let inter = c.intermediate_size.context("dense layer without intermediate_size")?;
                    b.dense_mlp += 3 * s.fp4(inter, h);
                }
                b.kv_cache += (ctx * c.cache_values_per_token()) as u64 * F32_BYTES;
            }
        }
        Arch::Glm47Flash => {
            let c = glm4_moe_lite::Config::from_json(&config, path)?;
            let h = c.hidden_size;
            let heads = c.num_heads;
            let qk = c.qk_nope_head_dim + c.qk_rope_head_dim;
            b.embedding_row = h as u64 * BF16_BYTES;
            b.lm_head = (c.vocab_size * h) as u64 * BF16_BYTES;
            b.norms = (h as u64) * F32_BYTES;
            for &sparse in &c.sparse {
                b.attention += match c.q_lora_rank {
                    Some(r) => s.fp4(r, h) + s.fp4(heads * qk, r) + r as u64 * F32_BYTES,
                    None => s.fp4(heads * qk, h),
                };
                b.attention += s.fp4(c.kv_lora_rank + c.qk_rope_head_dim, h)
                    + s.fp4(heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank)
                    + s.fp4(h, heads * c.v_head_dim)
                    + c.kv_lora_rank as u64 * F32_BYTES;
                b.norms += (2 * h) as u64 * F32_BYTES;
                if sparse {
                    b.router += (c.num_experts * h) as u64 * BF16_BYTES + c.num_experts as u64 * F32_BYTES;
                    b.routed_experts += c.top_k as u64 * 3 * s.fp4(c.moe_intermediate_size, h);
                    b.shared_experts += c.n_shared_experts as u64 * 3 * s.fp4(c.moe_intermediate_size, h);
                } else {
                    b.dense_mlp += 3 * s.fp4(c.intermediate_size, h);
                }
                b.kv_cache += (ctx * c.cache_values_per_token()) as u64 * F32_BYTES;
            }
        }
    }
    Ok(b)
}

/// Memory read bandwidth in GB/s: every core sums its share of a `bytes` buffer; best of
/// `reps`. The buffer is written first so its pages are real memory, not the shared zero page.
pub fn measure_read_bandwidth(bytes: usize, reps: usize) -> f64 {
    let words = (bytes / 8).max(1);
    let buf: Vec<u64> = (0..words as u64).collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = words.div_ceil(threads);
    let mut best = f64::INFINITY;
    for _ in 0..reps.max(1) {
        let start = Instant::now();
        std::thread::scope(|scope| {
            for part in buf.chunks(chunk) {
                scope.spawn(move || {
                    // Independent accumulators so the loop is bound by loads, not by one add chain.
                    let mut acc = [0u64; 8];
                    for block in part.chunks_exact(8) {
                        for (a, &x) in acc.iter_mut().zip(block) {
                            *a = a.wrapping_add(x);
                        }
                    }
                    std::hint::black_box(acc);
                });
            }
        });
        best = best.min(start.elapsed().as_secs_f64());
    }
    (words * 8) as f64 / best / 1e9
}

/// Peak resident memory of this process (VmHWM), if the platform reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Token ids for the prefill: spread over the vocabulary (a fixed LCG, so runs are comparable).
fn prompt_ids(n: usize, vocab: usize) -> Vec<u32> {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            ((x >> 33) % vocab as u64) as u32
        })
        .collect()
}

/// Device memory bandwidth in GB/s as the backend itself achieves it: `c = a + b` over f32
/// vectors far larger than any GPU cache (3 × 96 MiB moved per add), best of `reps`.
/// The device's bandwidth for GPU backends (their floor: the host's read bandwidth says nothing
/// about them), `None` on the CPU.
pub fn gpu_bandwidth<B: Backend>(b: &B) -> anyhow::Result<Option<f64>> {
    let name = b.name();
    let gpu = name.starts_with("cuda") || name.starts_with("wgpu");
    Ok(if gpu { Some(measure_device_bandwidth(b, 5)?) } else { None })
}

pub fn measure_device_bandwidth<B: Backend>(b: &B, reps: usize) -> anyhow::Result<f64> {
    const ELEMS: usize = 24 << 20;
    let x = b.zeros(&[ELEMS], DType::F32)?;
    let y = b.zeros(&[ELEMS], DType::F32)?;
    drop(b.add(&x, &y)?);
    b.synchronize()?;
    let mut best = f64::INFINITY;
    for _ in 0..reps.max(1) {
        let start = Instant::now();
        let z = b.add(&x, &y)?;
        b.synchronize()?;
        best = best.min(start.elapsed().as_secs_f64());
        drop(z);
    }
    Ok((3 * ELEMS * 4) as f64 / best / 1e9)
}

/// Builds the synthetic model on the chosen backend; measures the device's bandwidth first on a
/// GPU backend, and wraps the backend in [`Profiled`] when asked.
struct BuildForBench {
    arch: Arch,
    layers: Option<usize>,
    format: fp4::Format,
    profile: bool,
}

struct Built {
    model: Box<dyn LanguageModel>,
    backend: String,
    device_gbps: Option<f64>,
    stats: Option<Arc<Mutex<OpStats>>>,
    /// Device time per kernel, on backends that time kernels (wgpu with timestamps on).
    kernels: Option<Arc<Mutex<OpStats>>>,
    /// Host time blocked on the device, on backends that count it (wgpu).
    waits: Option<Arc<AtomicU64>>,
}

impl OnBackend for BuildForBench {
    type Output = Built;
    fn run<B: Backend + 'static>(self, backend: B) -> anyhow::Result<Built> {
        let name = backend.name();
        let device_gbps = gpu_bandwidth(&backend)?;
        let kernels = backend.kernel_stats();
        let waits = backend.host_waits();
        let (arch, layers, format) = (self.arch, self.layers, self.format);
        let (model, stats) = if self.profile {
            let p = Profiled::new(backend);
            let stats = p.stats();
            (fp4moe_models::synthetic(p, arch, layers, format, SYNTHETIC_WEIGHT_SEED)?, Some(stats))
        } else {
            (fp4moe_models::synthetic(backend, arch, layers, format, SYNTHETIC_WEIGHT_SEED)?, None)
        };
        Ok(Built { model, backend: name, device_gbps, stats, kernels, waits })
    }
}

/// Prompt tokens of the warm-up prefill: more than any backend's decode-path row limit, so the
/// prefill kernels run too.
const WARMUP_PREFILL: usize = 64;

/// Decode steps of the timed sequence run before the clock starts: op by op, then recording.
const FIRST_DECODE_STEPS: usize = 2;

struct Timings {
    prefill_s: f64,
    decode_s: f64,
    /// Seconds of the timed decode the host spent blocked on the device (where counted).
    decode_wait_s: Option<f64>,
    decode_steps: usize,
    /// Timed decode steps that replayed a recorded graph.
    graph_replays: u64,
    /// The untimed first decode steps (op by op, then recording).
    first_steps_ms: Vec<f64>,
    /// How the timed decode steps' tokens were picked.
    decode_picks: PickPaths,
    prefill_ops: Option<OpStats>,
    decode_ops: Option<OpStats>,
    prefill_kernels: Option<OpStats>,
    decode_kernels: Option<OpStats>,
}

fn take(stats: &Option<Arc<Mutex<OpStats>>>) -> Option<OpStats> {
    stats.as_ref().map(|s| std::mem::take(&mut *s.lock().unwrap_or_else(PoisonError::into_inner)))
}

/// Seed of the timed decode's sampler, fixed so two runs draw the same tokens.
const SAMPLING_SEED: u64 = 1;

/// The sampling setting in words, and where its picks are made.
fn sampling_name(p: &SamplingParams, reduces: bool) -> String {
    let place = match Sampler::new(p.clone(), 2).map(|s| (s.device_top_k(), s.device_weights())) {
        Ok((Some(_), _)) => "picked from the device's top k",
        Ok((None, Some(_))) if reduces => "drawn through the device's weight sums",
        _ => "whole logits row sampled on the host",
    };
    if p.is_greedy() {
        return format!("greedy, {place}");
    }
    format!("temperature {}, top-k {}, top-p {}, min-p {}, {place}", p.temperature, p.top_k, p.top_p, p.min_p)
}

fn time_model(
    model: &dyn LanguageModel,
    sampling: SamplingParams,
    prefill: usize,
    decode: usize,
    stats: &Option<Arc<Mutex<OpStats>>>,
    kernels: &Option<Arc<Mutex<OpStats>>>,
    waits: &Option<Arc<AtomicU64>>,
) -> anyhow::Result<Timings> {
    let info = model.info();
    let prompt = prompt_ids(prefill, info.vocab_size);
    // Warm-up, untimed: one short prefill and one decode step run every kernel once, so that
    // one-time costs (GPU kernels compile on first use) stay out of the figures.
    let warm = prefill.min(WARMUP_PREFILL);
    let mut seq = model.new_sequence(warm + 1)?;
    model.forward(&mut [(&mut seq, &prompt[..warm])], false)?;
    model.forward(&mut [(&mut seq, &prompt[..1])], false)?;
    drop(seq);
    let mut seq = model.new_sequence(prefill + FIRST_DECODE_STEPS + decode + 1)?;
    take(stats);
    take(kernels);
    // Over the whole vocabulary, so the routing follows the model's own output. A pick is
    // reduced on the device where the sampler allows it (greedy by default), as the engine does.
    let mut sampler = Sampler::new(sampling, info.vocab_size)?;
    let forward =
        |sampler: &mut Sampler, seq: &mut fp4moe_models::Sequence, tokens: &[u32]| -> anyhow::Result<u32> {
            if let (true, Some(w)) = (model.reduces_weights_on_device(), sampler.device_weights()) {
                let rows =
                    model.forward_reduced(&mut [(seq, tokens)], w.top, w.vocab_limit, &[Some(w.spec)])?;
                let row = rows.first().ok_or_else(|| anyhow::anyhow!("forward returned no row"))?;
                return Ok(sampler.sample_reduced(&**row)?);
            }
            let Some((k, limit)) = sampler.device_top_k() else {
                let rows = model.forward(&mut [(seq, tokens)], false)?;
                let row = rows.first().ok_or_else(|| anyhow::anyhow!("forward returned no logits"))?;
                return Ok(sampler.sample(row)?);
            };
            let picks = model.forward_top_k(&mut [(seq, tokens)], k, limit)?;
            let top = picks.first().ok_or_else(|| anyhow::anyhow!("forward returned no pick"))?;
            Ok(sampler.sample_top(top)?)
        };
    let start = Instant::now();
    let mut next = forward(&mut sampler, &mut seq, &prompt[..])?;
    let prefill_s = start.elapsed().as_secs_f64();
    let prefill_ops = take(stats);
    let prefill_kernels = take(kernels);
    // The sequence's first decode steps are untimed and reported apart: the first runs op by op,
    // the second records the decode graph on backends that record one (batch::DecodeGraph).
    let mut first_steps_ms = Vec::new();
    for _ in 0..FIRST_DECODE_STEPS {
        let start = Instant::now();
        next = forward(&mut sampler, &mut seq, &[next])?;
        first_steps_ms.push(start.elapsed().as_secs_f64() * 1e3);
    }
    take(stats);
    take(kernels);
    let replays = fp4moe_models::decode_graph_replays();
    let waited = || waits.as_ref().map(|w| w.load(Ordering::Relaxed));
    let waited0 = waited();
    let paths0 = sampler.paths();
    let start = Instant::now();
    for _ in 0..decode {
        next = forward(&mut sampler, &mut seq, &[next])?;
    }
    let decode_s = start.elapsed().as_secs_f64();
    let decode_wait_s = waited().zip(waited0).map(|(b, a)| (b - a) as f64 * 1e-9);
    let p = sampler.paths();
    let decode_picks = PickPaths {
        top_k: p.top_k - paths0.top_k,
        weight_sums: p.weight_sums - paths0.weight_sums,
        weight_sums_then_row: p.weight_sums_then_row - paths0.weight_sums_then_row,
        whole_row: p.whole_row - paths0.whole_row,
    };
    Ok(Timings {
        decode_picks,
        decode_wait_s,
        prefill_s,
        decode_s,
        decode_steps: decode,
        graph_replays: fp4moe_models::decode_graph_replays() - replays,
        first_steps_ms,
        prefill_ops,
        decode_ops: take(stats),
        prefill_kernels,
        decode_kernels: take(kernels),
    })
}

/// The per-op table of a profiled phase, per step (`steps` forwards), slowest first.
fn print_ops(phase: &str, ops: &OpStats, steps: usize) {
    let total = ops.total().as_secs_f64();
    println!(
        "\n{phase}: time by op, per step ({steps} steps, {:.3} ms per step)",
        1e3 * total / steps as f64
    );
    println!("{:<34} {:>9} {:>12} {:>7}", "op", "calls", "ms/step", "share");
    for (op, calls, t) in ops.sorted() {
        let t = t.as_secs_f64();
        println!(
            "{op:<34} {:>9} {:>12.3} {:>6.1}%",
            calls / steps as u64,
            1e3 * t / steps as f64,
            100.0 * t / total.max(f64::MIN_POSITIVE)
        );
    }
}

fn ops_json(ops: &Option<OpStats>, steps: usize) -> serde_json::Value {
    match ops {
        None => serde_json::Value::Null,
        Some(ops) => ops
            .sorted()
            .into_iter()
            .map(|(op, calls, t)| {
                json!({"op": op, "calls_per_step": calls as f64 / steps as f64,
                       "ms_per_step": 1e3 * t.as_secs_f64() / steps as f64})
            })
            .collect(),
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.prefill == 0 || args.decode_tokens == 0 {
        anyhow::bail!("--prefill and --decode-tokens must be at least 1");
    }
    let format = args.quant.format().context("bench model needs an FP4 format: --quant mxfp4 or nvfp4")?;
    let arch = args.synthetic.arch();

    // Before the model is built, so the probe buffer and the weights never compete for RAM.
    eprintln!("measuring memory read bandwidth ({} MiB buffer)...", args.bandwidth_mib);
    let mem_read_gbps = measure_read_bandwidth(args.bandwidth_mib << 20, 5);

    eprintln!("building synthetic {} ...", arch.name());
    let start = Instant::now();
    let built =
        dispatch(args.backend, BuildForBench { arch, layers: args.layers, format, profile: args.profile })?;
    let mut model = built.model;
    model.set_prefill_activations(args.prefill_activations.get())?;
    let build_s = start.elapsed().as_secs_f64();
    let info = model.info().clone();
    eprintln!(
        "built {} layers in {build_s:.1} s; timing prefill of {} tokens ...",
        info.num_layers, args.prefill
    );

    let sampling = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        min_p: args.min_p,
        seed: Some(SAMPLING_SEED),
        ..SamplingParams::default()
    };
    let t = time_model(
        model.as_ref(),
        sampling.clone(),
        args.prefill,
        args.decode_tokens,
        &built.stats,
        &built.kernels,
        &built.waits,
    )?;
    let prefill_tok_s = args.prefill as f64 / t.prefill_s;
    let decode_tok_s = t.decode_steps as f64 / t.decode_s;
    // The cache grows during the timed decode; the floor uses its mean length.
    let mean_ctx = args.prefill + FIRST_DECODE_STEPS + 1 + args.decode_tokens / 2;
    let bytes = decode_bytes(arch, args.layers, format, mean_ctx)?;
    // The weights live in device memory on a GPU backend: its bandwidth is the floor's.
    let (floor_gbps, floor_memory) = match built.device_gbps {
        Some(g) => (g, "device"),
        None => (mem_read_gbps, "host"),
    };
    let floor_decode_tok_s = floor_gbps * 1e9 / bytes.total() as f64;
    let peak_rss = peak_rss_bytes();

    println!(
        "model            synthetic {} ({}), {} layers, {}",
        arch.name(),
        info.model_type,
        info.num_layers,
        format.name()
    );
    println!("backend          {}{}", built.backend, if args.profile { " (profiled: slower)" } else { "" });
    println!("memory read      {mem_read_gbps:.1} GB/s (host)");
    if let Some(g) = built.device_gbps {
        println!("device bandwidth {g:.1} GB/s (c = a + b through the backend)");
    }
    println!(
        "prefill          {prefill_tok_s:.1} tok/s ({} tokens in {:.2} s; {:?} activations)",
        args.prefill, t.prefill_s, args.prefill_activations
    );
    println!(
        "decode (batch 1) {decode_tok_s:.2} tok/s ({} steps in {:.2} s; {})",
        t.decode_steps,
        t.decode_s,
        sampling_name(&sampling, model.reduces_weights_on_device())
    );
    let pk = t.decode_picks;
    if pk.weight_sums + pk.weight_sums_then_row + pk.whole_row > 0 {
        // A top-p cut past the device's best logits reads the whole row after all.
        println!(
            "decode picks     {} through weight sums, {} of them then the whole row; {} from the whole row",
            pk.weight_sums + pk.weight_sums_then_row,
            pk.weight_sums_then_row,
            pk.whole_row
        );
    }
    if let Some(w) = t.decode_wait_s {
        // Near zero: the host's recording (or its sampling) bounds the step, not the device.
        println!(
            "host waits       {:.2} ms per decode step ({:.0}% of it blocked on the device)",
            w * 1e3 / t.decode_steps as f64,
            100.0 * w / t.decode_s
        );
    }
    let first: Vec<String> = t.first_steps_ms.iter().map(|ms| format!("{ms:.1} ms")).collect();
    println!(
        "decode graph     {} of {} timed steps replayed (untimed first steps: {})",
        t.graph_replays,
        t.decode_steps,
        first.join(", ")
    );
    println!(
        "decode floor     {floor_decode_tok_s:.2} tok/s ({:.1} MB read per step / {floor_gbps:.1} GB/s {floor_memory})",
        bytes.total() as f64 / 1e6
    );
    println!("of floor         {:.0}%", 100.0 * decode_tok_s / floor_decode_tok_s);
    if let Some(rss) = peak_rss {
        println!("peak resident    {:.2} GiB", rss as f64 / (1u64 << 30) as f64);
    }
    if let Some(ops) = &t.prefill_ops {
        print_ops(&format!("prefill ({} tokens)", args.prefill), ops, 1);
    }
    if let Some(ops) = &t.decode_ops {
        print_ops("decode", ops, t.decode_steps);
    }
    if let Some(k) = &t.prefill_kernels {
        print_ops(&format!("prefill ({} tokens) GPU kernels (device timestamps)", args.prefill), k, 1);
    }
    if let Some(k) = &t.decode_kernels {
        print_ops("decode GPU kernels (device timestamps)", k, t.decode_steps);
    }

    if let Some(path) = &args.json {
        let out = json!({
            "model": arch.name(),
            "model_type": info.model_type,
            "layers": info.num_layers,
            "format": format.name(),
            "backend": format!("{:?}", args.backend).to_lowercase(),
            "decode_tok_s": decode_tok_s,
            "decode_sampling": sampling_name(&sampling, model.reduces_weights_on_device()),
            "decode_picks": t.decode_picks,
            "decode_graph_replays": t.graph_replays,
            "decode_host_wait_ms_per_step": t.decode_wait_s.map(|w| w * 1e3 / t.decode_steps as f64),
            "first_decode_steps_ms": t.first_steps_ms,
            "prefill_tok_s": prefill_tok_s,
            "prefill_activations": format!("{:?}", args.prefill_activations).to_lowercase(),
            "floor_decode_tok_s": floor_decode_tok_s,
            "fraction_of_floor": decode_tok_s / floor_decode_tok_s,
            "mem_read_gbps": mem_read_gbps,
            "device_gbps": built.device_gbps,
            "floor_memory": floor_memory,
            "backend_name": built.backend,
            "profiled": args.profile,
            "prefill_ops": ops_json(&t.prefill_ops, 1),
            "decode_ops": ops_json(&t.decode_ops, t.decode_steps),
            "prefill_kernels": ops_json(&t.prefill_kernels, 1),
            "decode_kernels": ops_json(&t.decode_kernels, t.decode_steps),
            "decode_bytes_per_step": bytes.total(),
            "decode_bytes": bytes,
            "prefill_tokens": args.prefill,
            "decode_tokens": t.decode_steps,
            "build_s": build_s,
            "peak_rss_bytes": peak_rss,
        });
        std::fs::write(path, serde_json::to_string_pretty(&out)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_bytes_of_full_qwen_match_hand_count() {
        // Per layer at MXFP4 (0.5 + 1/32 bytes per element): attention 4096·2048 + 2·512·2048
        // + 2048·4096 elements, experts 8 · 3 · 768·2048, router 128·2048 bf16.
        let q = |e: u64| e / 2 + e / 32;
        let b = decode_bytes(Arch::Qwen3_30bA3b, None, fp4::Format::Mxfp4, 0).unwrap();
        assert_eq!(b.attention, 48 * q(4096 * 2048 + 2 * 512 * 2048 + 2048 * 4096));
        assert_eq!(b.routed_experts, 48 * 8 * 3 * q(768 * 2048));
        assert_eq!(b.router, 48 * 128 * 2048 * 2);
        assert_eq!(b.lm_head, 151_936 * 2048 * 2);
        assert_eq!(b.kv_cache, 0);
        let with_ctx = decode_bytes(Arch::Qwen3_30bA3b, Some(2), fp4::Format::Mxfp4, 100).unwrap();
        assert_eq!(with_ctx.kv_cache, 2 * 100 * 2 * 4 * 128 * 4);
    }

    #[test]
    fn decode_bytes_of_glm_count_dense_layer_and_shared_expert() {
        let q = |e: u64| e / 2 + e / 16;
        let b = decode_bytes(Arch::Glm47Flash, Some(3), fp4::Format::Nvfp4, 10).unwrap();
        assert_eq!(b.dense_mlp, 3 * q(10240 * 2048), "layer 0 is dense");
        assert_eq!(b.routed_experts, 2 * 4 * 3 * q(1536 * 2048));
        assert_eq!(b.shared_experts, 2 * 3 * q(1536 * 2048));
        assert_eq!(b.kv_cache, 3 * 10 * (512 + 64) * 4);
    }

    #[test]
    fn bandwidth_probe_and_rss_report_plausible_values() {
        let gbps = measure_read_bandwidth(16 << 20, 2);
        assert!(gbps > 0.1 && gbps < 10_000.0, "{gbps}");
        if cfg!(target_os = "linux") {
            assert!(peak_rss_bytes().unwrap() > 1 << 20);
        }
    }
}
