//! `fp4moe bench kernels`: times ops at the two models' shapes against the memory-bandwidth floor.
//!
//! For each op and token count T the command warms up, then takes the median of several timed
//! runs. Weights are replicated until the copies exceed [`ROTATE_BYTES`] (well past any
//! last-level cache) and the runs rotate through them, so what is timed is a read from memory,
//! not from cache. The bandwidth is measured first (on the CPU a large buffer read by every
//! thread, best of several; on a GPU backend c = a + b on the device), and `floor_us` is the
//! bytes an op must move divided by it: the weights it reads (for MoE only the distinct experts
//! its tokens are routed to, plus the shared one) and its activations in and out. Routing is
//! random with a fixed seed.
//!
//! The op code is generic over [`Backend`], so every backend runs the same benchmark.
//!
//! `time_us` is wall time with a wait after each run, so on a GPU it includes the submit and
//! wait latency (tens of µs on wgpu); `min_us` is the fastest run. Where the backend times its kernels on the device
//! ([`Backend::kernel_stats`]: wgpu with `FP4MOE_WGPU_TIMESTAMPS=1`), `device_us` is their
//! summed device time per run as well.
//!
//! `chain_add` is a chain of [`CHAIN_OPS`] dependent one-row adds: what one op costs where the
//! work is nothing, which bounds a decode step of ~1000 small ops. Its `host_us` is the time the
//! host spends recording each op (before the wait), its `time_us` the whole chain per op.

use crate::backend::{BackendKind, OnBackend, dispatch};
use fp4moe_ops::conformance::{Rng, WeightKind, random_weight};
use fp4moe_ops::profile::OpStats;
use fp4moe_ops::{Backend, HostTensor, HostWeight, LinearPath, MoePath, MoeWeights, T};
use serde::Serialize;
use std::cell::Cell;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// Backend to measure.
    #[arg(long, value_enum, default_value = "cpu")]
    backend: BackendKind,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Token counts (rows) to time each op at.
    #[arg(long, value_delimiter = ',', default_value = "1,8,64,512")]
    tokens: Vec<usize>,
    /// A fast smoke run (CI): fewer shapes, T = 1 and 64 unless --tokens is given, fewer repeats.
    #[arg(long)]
    quick: bool,
    /// Fixed seed for weights, inputs and routing.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Only the ops whose name contains one of these (e.g. `moe,linear_nvfp4_4096x2048`).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Timed runs per op (default: 9, or 27 for small ops; 3 / 9 with --quick).
    #[arg(long)]
    repeats: Option<usize>,
}

/// Weight copies are added until they hold at least this many bytes (4x a 32 MiB L3).
const ROTATE_BYTES: usize = 128 << 20;
/// Seconds of warm-up runs before an op is timed (see [`Bench::time`]).
const WARMUP_SECS: f64 = 0.3;
/// Dependent ops in one run of the op chain.
const CHAIN_OPS: usize = 1000;
/// Bytes read to measure memory bandwidth (quick mode reads a quarter).
const BANDWIDTH_BYTES: usize = 1 << 30;

/// One measured op.
#[derive(Serialize, Clone)]
struct Row {
    name: String,
    tokens: usize,
    time_us: f64,
    /// Fastest run: on a shared or clock-changing GPU the median can carry interference.
    min_us: f64,
    floor_us: f64,
    gbps: f64,
    gflops: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    device_us: Option<f64>,
    /// Host seconds per op spent recording it (chain rows only), in µs.
    #[serde(skip_serializing_if = "Option::is_none")]
    host_us: Option<f64>,
}

#[derive(Serialize)]
struct Report {
    backend: String,
    mem_read_gbps: f64,
    results: Vec<Row>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let kind = args.backend;
    dispatch(kind, Job(args))
}

struct Job(Args);

impl OnBackend for Job {
    type Output = ();
    fn run<B: Backend + 'static>(self, b: B) -> anyhow::Result<()> {
        let args = self.0;
        let tokens: Vec<usize> =
            if args.quick && args.tokens == [1, 8, 64, 512] { vec![1, 64] } else { args.tokens };
        let bw = match super::bench_model::gpu_bandwidth(&b)? {
            Some(gbps) => {
                println!(
                    "backend {}  device bandwidth {gbps:.1} GB/s (c = a + b through the backend)",
                    b.name()
                );
                gbps
            }
            None => {
                let gbps = measure_read_gbps(if args.quick { BANDWIDTH_BYTES / 4 } else { BANDWIDTH_BYTES });
                println!(
                    "backend {}  memory read bandwidth {gbps:.1} GB/s (best of several full-buffer reads)",
                    b.name()
                );
                gbps
            }
        };
        let kernels = b.kernel_stats();
        println!(
            "{:<34} {:>6} {:>11} {:>11} {:>11} {:>7} {:>8} {:>9}{}",
            "name",
            "tokens",
            "time_us",
            "min_us",
            "floor_us",
            "ratio",
            "GB/s",
            "GFLOP/s",
            if kernels.is_some() { "  device_us" } else { "" }
        );
        let mut bench = Bench {
            b: &b,
            bw,
            only: args.only,
            repeats: args.repeats,
            quick: args.quick,
            rng: Rng::new(args.seed),
            rows: Vec::new(),
            kernels,
            device_s: Cell::new(None),
        };
        bench.chain()?;
        let linears: &[(WeightKind, usize, usize)] = if args.quick {
            &[(WeightKind::Mxfp4, 2048, 768), (WeightKind::Nvfp4, 2048, 768)]
        } else {
            &LINEAR_SHAPES
        };
        for &(kind, k, n) in linears {
            bench.linear(kind, k, n, &tokens)?;
        }
        if !args.quick {
            // lm_head (bf16, read every decoded token; a prefill needs only its last row) and
            // the routers.
            let decode_tokens: Vec<usize> = tokens.iter().copied().filter(|&t| t <= 8).collect();
            bench.linear(WeightKind::Bf16, 2048, 151936, &decode_tokens)?;
            bench.linear(WeightKind::Bf16, 2048, 128, &tokens)?;
            bench.linear(WeightKind::Bf16, 2048, 64, &tokens)?;
        }
        bench.moe("moe_qwen3", 128, 8, 2048, 768, false, &tokens)?;
        bench.moe("moe_glm", 64, 4, 2048, 1536, true, &tokens)?;
        if let Some(path) = args.json {
            let report = Report { backend: b.name(), mem_read_gbps: bw, results: bench.rows };
            std::fs::write(&path, serde_json::to_string_pretty(&report)?)
                .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
            eprintln!("wrote {}", path.display());
        }
        Ok(())
    }
}

/// (weight kind, in K, out N) of every FP4 linear of both models, in MXFP4 and NVFP4.
const LINEAR_SHAPES: [(WeightKind, usize, usize); 22] = {
    const S: [(usize, usize); 11] = [
        (2048, 768),  // GLM q_a_proj; Qwen expert gate/up (per half)
        (768, 5120),  // GLM q_b_proj
        (2048, 576),  // GLM kv_a_proj_with_mqa
        (512, 8960),  // GLM kv_b_proj
        (5120, 2048), // GLM o_proj
        (2048, 1536), // GLM expert gate/up (per half)
        (1536, 2048), // GLM expert down
        (768, 2048),  // Qwen expert down
        (2048, 4096), // Qwen q_proj
        (2048, 512),  // Qwen k_proj / v_proj
        (4096, 2048), // Qwen o_proj
    ];
    let mut out = [(WeightKind::Mxfp4, 0, 0); 22];
    let mut i = 0;
    while i < 11 {
        out[2 * i] = (WeightKind::Mxfp4, S[i].0, S[i].1);
        out[2 * i + 1] = (WeightKind::Nvfp4, S[i].0, S[i].1);
        i += 1;
    }
    out
};

fn kind_name(k: WeightKind) -> &'static str {
    match k {
        WeightKind::Mxfp4 => "mxfp4",
        WeightKind::Nvfp4 => "nvfp4",
        WeightKind::F32 => "f32",
        WeightKind::Bf16 => "bf16",
    }
}

/// Best-of-several read bandwidth of a `bytes`-sized buffer, every thread reading its share.
fn measure_read_gbps(bytes: usize) -> f64 {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let n = bytes / 8;
    let per = n.div_ceil(threads);
    let mut buf = vec![0u64; n];
    // Written by the threads that later read it (first touch places pages near them).
    std::thread::scope(|s| {
        for (ti, c) in buf.chunks_mut(per).enumerate() {
            s.spawn(move || {
                for (i, v) in c.iter_mut().enumerate() {
                    *v = ((ti * per + i) as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                }
            });
        }
    });
    let mut best = 0.0f64;
    for _ in 0..5 {
        let t0 = Instant::now();
        let s = std::thread::scope(|s| {
            let hs: Vec<_> = buf
                .chunks(per)
                .map(|c| {
                    s.spawn(move || {
                        // Eight independent lanes, so the loop is bound by loads, not adds.
                        let mut acc = [0u64; 8];
                        for w in c.chunks_exact(8) {
                            for l in 0..8 {
                                acc[l] = acc[l].wrapping_add(w[l]);
                            }
                        }
                        acc.iter().fold(0u64, |a, b| a ^ b)
                    })
                })
                .collect();
            hs.into_iter().fold(0u64, |a, h| a ^ h.join().unwrap_or(0))
        });
        let dt = t0.elapsed().as_secs_f64();
        std::hint::black_box(s);
        best = best.max(bytes as f64 / dt / 1e9);
    }
    best
}

/// The same weight in freshly allocated memory.
fn deep_copy(w: &HostWeight) -> anyhow::Result<HostWeight> {
    Ok(match w {
        HostWeight::Quant(q) => HostWeight::Quant(fp4::QuantMatrix::new(
            q.format,
            q.rows,
            q.cols,
            q.codes.to_vec().into(),
            q.scales.to_vec().into(),
            q.tensor_scales.clone(),
        )?),
        HostWeight::Dense { rows, cols, dtype, bytes } => {
            HostWeight::Dense { rows: *rows, cols: *cols, dtype: *dtype, bytes: bytes.to_vec().into() }
        }
    })
}

struct Bench<'a, B: Backend> {
    b: &'a B,
    bw: f64,
    /// `--only`: name filters (empty: every op).
    only: Vec<String>,
    /// `--repeats`.
    repeats: Option<usize>,
    quick: bool,
    rng: Rng,
    rows: Vec<Row>,
    /// The backend's per-kernel device times, when it keeps them.
    kernels: Option<Arc<Mutex<OpStats>>>,
    /// Device seconds per run of the last [`Bench::time`], when kernels are timed.
    device_s: Cell<Option<f64>>,
}

impl<B: Backend> Bench<'_, B> {
    fn repeats(&self, est_bytes: usize) -> usize {
        if let Some(r) = self.repeats {
            return r.max(1);
        }
        let base = if self.quick { 3 } else { 9 };
        // Small ops are noisy: more repeats when one run is short.
        if est_bytes < (8 << 20) { base * 3 } else { base }
    }

    /// Median and fastest seconds of `f(i)` over the repeats, after warm-up runs: at least two,
    /// and for [`WARMUP_SECS`] (a GPU that idled while the host prepared the op runs at low
    /// clocks for a while; seen on the H100 through Vulkan as 3x slower medians).
    fn time(
        &self,
        reps: usize,
        mut f: impl FnMut(usize) -> anyhow::Result<()>,
    ) -> anyhow::Result<(f64, f64)> {
        let t0 = Instant::now();
        let mut i = 0;
        while i < 2 || t0.elapsed().as_secs_f64() < WARMUP_SECS {
            f(i)?;
            self.b.synchronize()?;
            i += 1;
        }
        let device = || {
            self.kernels
                .as_ref()
                .map(|k| std::mem::take(&mut *k.lock().unwrap_or_else(PoisonError::into_inner)))
        };
        device();
        let mut ts = Vec::with_capacity(reps);
        for r in 0..reps {
            let t0 = Instant::now();
            f(i + r)?;
            self.b.synchronize()?;
            ts.push(t0.elapsed().as_secs_f64());
        }
        self.device_s.set(device().map(|d| d.total().as_secs_f64() / reps as f64));
        ts.sort_by(f64::total_cmp);
        Ok((ts[ts.len() / 2], ts[0]))
    }

    fn wanted(&self, name: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|f| name.contains(f.as_str()))
    }

    fn record(&mut self, name: String, tokens: usize, (secs, min): (f64, f64), bytes: f64, flops: f64) {
        let floor = bytes / (self.bw * 1e9);
        let row = Row {
            name,
            tokens,
            time_us: secs * 1e6,
            min_us: min * 1e6,
            floor_us: floor * 1e6,
            gbps: bytes / secs / 1e9,
            gflops: flops / secs / 1e9,
            device_us: self.device_s.take().map(|d| d * 1e6),
            host_us: None,
        };
        println!(
            "{:<34} {:>6} {:>11.1} {:>11.1} {:>11.1} {:>7.2} {:>8.1} {:>9.1}{}",
            row.name,
            row.tokens,
            row.time_us,
            row.min_us,
            row.floor_us,
            row.time_us / row.floor_us,
            row.gbps,
            row.gflops,
            row.device_us.map_or(String::new(), |d| format!(" {d:>10.1}"))
        );
        self.rows.push(row);
    }

    /// [`CHAIN_OPS`] dependent adds of one 2048-wide row, timed per op: the whole chain with the
    /// wait, and the host's recording alone.
    fn chain(&mut self) -> anyhow::Result<()> {
        let name = "chain_add";
        if !self.wanted(name) {
            return Ok(());
        }
        let h = 2048;
        let a = self.b.upload(HostTensor::F32(&self.rng.normals(h, 1.0), &[1, h]))?;
        let d = self.b.upload(HostTensor::F32(&self.rng.normals(h, 1.0), &[1, h]))?;
        let mut host = Vec::new();
        let (secs, min) = self.time(self.repeats(0), |_| {
            let t0 = Instant::now();
            let mut x = self.b.add(&a, &d)?;
            for _ in 1..CHAIN_OPS {
                x = self.b.add(&x, &d)?;
            }
            host.push(t0.elapsed().as_secs_f64());
            drop(x);
            Ok(())
        })?;
        let reps = self.repeats(0).min(host.len());
        let mut timed = host.split_off(host.len() - reps);
        timed.sort_by(f64::total_cmp);
        let per = CHAIN_OPS as f64;
        self.record(name.to_string(), 1, (secs / per, min / per), (12 * h) as f64, h as f64);
        let host_us = timed[timed.len() / 2] / per * 1e6;
        println!("{:<34} {:>6} {host_us:>11.1}  (host recording per op, median)", "", "");
        if let Some(row) = self.rows.last_mut() {
            row.host_us = Some(host_us);
        }
        Ok(())
    }

    /// Uploads copies of `host` until they exceed [`ROTATE_BYTES`] (at least one). Each copy
    /// owns its bytes: host backends keep the host buffers, and shared ones would stay cached.
    fn copies(&self, host: &HostWeight) -> anyhow::Result<Vec<B::Weight>> {
        let n = ROTATE_BYTES.div_ceil(host.nbytes().max(1)).clamp(1, 64);
        (0..n).map(|_| Ok(self.b.upload_weight(&deep_copy(host)?)?)).collect()
    }

    fn linear(&mut self, kind: WeightKind, k: usize, n: usize, tokens: &[usize]) -> anyhow::Result<()> {
        // Drawn even when filtered out, so the ops that run see the same weights either way.
        let host = random_weight(&mut self.rng, kind, n, k).map_err(anyhow::Error::msg)?;
        let name = format!("linear_{}_{k}x{n}", kind_name(kind));
        if !self.wanted(&name) {
            return Ok(());
        }
        let ws = self.copies(&host)?;
        for &t in tokens {
            let x = self.b.upload(HostTensor::F32(&self.rng.normals(t * k, 1.0), &[t, k]))?;
            let bytes = (host.nbytes() + 4 * t * (k + n)) as f64;
            let secs = self.time(self.repeats(host.nbytes()), |i| {
                let y = self.b.linear(&x, &ws[i % ws.len()], LinearPath::Auto)?;
                drop(y);
                Ok(())
            })?;
            self.record(name.clone(), t, secs, bytes, 2.0 * (t * n * k) as f64);
        }
        Ok(())
    }

    /// MoE with `e` experts of intermediate `inter`, top-`k` random routing, hidden `h`.
    #[allow(clippy::too_many_arguments)]
    fn moe(
        &mut self,
        name: &str,
        e: usize,
        k: usize,
        h: usize,
        inter: usize,
        shared: bool,
        tokens: &[usize],
    ) -> anyhow::Result<()> {
        if !self.wanted(name) {
            return Ok(());
        }
        let kind = WeightKind::Mxfp4;
        let gu_host = random_weight(&mut self.rng, kind, e * 2 * inter, h).map_err(anyhow::Error::msg)?;
        let d_host = random_weight(&mut self.rng, kind, e * h, inter).map_err(anyhow::Error::msg)?;
        // One copy of all experts is already far larger than any cache, and random routing
        // changes the experts touched every run.
        let gu = self.b.upload_weight(&gu_host)?;
        let d = self.b.upload_weight(&d_host)?;
        let expert_bytes = (gu_host.nbytes() + d_host.nbytes()) / e;
        let sh = if shared {
            let sg = random_weight(&mut self.rng, kind, 2 * inter, h).map_err(anyhow::Error::msg)?;
            let sd = random_weight(&mut self.rng, kind, h, inter).map_err(anyhow::Error::msg)?;
            Some((sg.nbytes() + sd.nbytes(), self.b.upload_weight(&sg)?, self.b.upload_weight(&sd)?))
        } else {
            None
        };
        let shared_bytes = sh.as_ref().map_or(0, |s| s.0);
        for &t in tokens {
            // Several routings, rotated like weight copies; each token picks k distinct experts.
            let sets = 8;
            let mut routes: Vec<(T<B>, T<B>)> = Vec::with_capacity(sets);
            let mut distinct_sum = 0usize;
            for _ in 0..sets {
                let mut ids = Vec::with_capacity(t * k);
                let mut seen = vec![false; e];
                for _ in 0..t {
                    for id in self.rng.distinct(e, k) {
                        seen[id] = true;
                        ids.push(id as u32);
                    }
                }
                distinct_sum += seen.iter().filter(|s| **s).count();
                let wts: Vec<f32> = (0..t * k).map(|_| self.rng.range(0.05, 0.3)).collect();
                routes.push((
                    self.b.upload(HostTensor::U32(&ids, &[t, k]))?,
                    self.b.upload(HostTensor::F32(&wts, &[t, k]))?,
                ));
            }
            let distinct = distinct_sum as f64 / sets as f64;
            let x = self.b.upload(HostTensor::F32(&self.rng.normals(t * h, 1.0), &[t, h]))?;
            let bytes = distinct * expert_bytes as f64 + shared_bytes as f64 + (8 * t * h) as f64;
            let per_expert_flops = 2.0 * (3 * inter * h) as f64;
            let flops = per_expert_flops * (t * k + if shared { t } else { 0 }) as f64;
            let experts = MoeWeights {
                gate_up: &gu,
                down: &d,
                n_experts: e,
                shared: sh.as_ref().map(|(_, g, dd)| (g, dd)),
            };
            let secs = self.time(self.repeats(bytes as usize), |i| {
                let (ids, wts) = &routes[i % sets];
                drop(self.b.moe(&x, ids, wts, experts, MoePath::Auto)?);
                Ok(())
            })?;
            self.record(name.to_string(), t, secs, bytes, flops);
        }
        Ok(())
    }
}
