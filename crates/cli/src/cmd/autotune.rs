//! `fp4moe autotune`: times every linear and MoE path a backend lists on a model's real shapes and
//! token counts, and writes the [`KernelConfig`] that picks the fastest: the decode/prefill
//! crossovers and the prefill N tiles. Results are checked in per card under
//! `crates/cuda/configs/` (the CUDA backend embeds them and picks one by device name; only the
//! H100 has one, from this command, and other cards use it); another file can be selected at run
//! time with `FP4MOE_CUDA_CONFIG=<path>`.
//!
//! Weights are random NVFP4 codes of the real shapes (timing does not depend on values), so no
//! checkpoint is needed.

use std::path::PathBuf;
use std::time::Instant;

use fp4::{Format, QuantMatrix};
use fp4moe_ops::{Backend, HostTensor, HostWeight, KernelConfig, LinearPath, MoePath, MoeWeights};

use crate::backend::{BackendKind, OnBackend, dispatch};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Model {
    #[value(name = "glm-4.7-flash")]
    Glm47Flash,
    #[value(name = "qwen3-30b-a3b")]
    Qwen3,
}

#[derive(clap::Args)]
#[command(
    after_help = "Example:\n  fp4moe autotune --backend cuda --model qwen3-30b-a3b --out crates/cuda/configs/h100.json"
)]
pub struct Args {
    /// Compute backend to tune.
    #[arg(long, value_enum, default_value_t = BackendKind::Cuda)]
    pub backend: BackendKind,
    /// Model whose shapes are timed.
    #[arg(long, value_enum)]
    pub model: Model,
    /// Where to write the config JSON.
    #[arg(long, default_value = "crates/cuda/configs/h100.json")]
    pub out: PathBuf,
    /// Timed repetitions per variant (median reported).
    #[arg(long, default_value_t = 5)]
    pub reps: usize,
}

/// The shapes of one model: linear layers `(K, N)` and the routed MoE block.
struct Shapes {
    linear: Vec<(usize, usize)>,
    experts: usize,
    top_k: usize,
    hidden: usize,
    inter: usize,
    shared_inter: Option<usize>,
}

fn shapes(m: Model) -> Shapes {
    match m {
        Model::Glm47Flash => Shapes {
            linear: vec![(2048, 768), (768, 5120), (2048, 576), (5120, 2048)],
            experts: 64,
            top_k: 4,
            hidden: 2048,
            inter: 1536,
            shared_inter: Some(1536),
        },
        Model::Qwen3 => Shapes {
            linear: vec![(2048, 4096), (2048, 512), (4096, 2048)],
            experts: 128,
            top_k: 8,
            hidden: 2048,
            inter: 768,
            shared_inter: None,
        },
    }
}

/// Token counts at which decode and prefill paths compete, and prefill sizes for the N tile.
const CROSSOVER_TOKENS: [usize; 6] = [1, 2, 4, 8, 16, 32];
const PREFILL_TOKENS: [usize; 2] = [512, 2048];

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn f(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    }
}

fn random_nvfp4(rng: &mut Rng, rows: usize, cols: usize) -> anyhow::Result<HostWeight> {
    let codes: Vec<u8> = (0..rows * cols / 2).map(|_| rng.next() as u8).collect();
    // E4M3 codes 0x18..0x1F: block scales near 1/64, like real checkpoints' magnitudes.
    let scales: Vec<u8> = (0..rows * cols / 16).map(|_| 0x18 + (rng.next() % 8) as u8).collect();
    Ok(HostWeight::Quant(QuantMatrix::new(
        Format::Nvfp4,
        rows,
        cols,
        codes.into(),
        scales.into(),
        vec![1.0],
    )?))
}

/// Median wall time of `f` (each run synchronized), after one warm-up run.
fn time<B: Backend>(b: &B, reps: usize, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    f()?;
    b.synchronize()?;
    let mut v = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        f()?;
        b.synchronize()?;
        v.push(t.elapsed().as_secs_f64());
    }
    v.sort_by(|a, c| a.total_cmp(c));
    Ok(v[v.len() / 2])
}

struct Tune {
    model: Model,
    reps: usize,
}

impl OnBackend for Tune {
    type Output = KernelConfig;

    fn run<B: Backend + 'static>(self, b: B) -> anyhow::Result<KernelConfig> {
        let s = shapes(self.model);
        let mut rng = Rng(0x5eed_1234_abcd_0001);
        let prefill_lin: Vec<LinearPath> =
            b.linear_paths().into_iter().filter(|p| matches!(p, LinearPath::Prefill { .. })).collect();
        let prefill_moe: Vec<MoePath> =
            b.moe_paths().into_iter().filter(|p| matches!(p, MoePath::Prefill { .. })).collect();
        let mut cfg = KernelConfig::default();

        // ---- linear: total time over the model's shapes per (path, tokens).
        let weights: Vec<B::Weight> = s
            .linear
            .iter()
            .map(|&(k, n)| b.upload_weight(&random_nvfp4(&mut rng, n, k)?).map_err(Into::into))
            .collect::<anyhow::Result<_>>()?;
        let lin_total = |path: LinearPath, m: usize, rng: &mut Rng| -> anyhow::Result<f64> {
            let mut total = 0.0;
            for (w, &(k, _)) in weights.iter().zip(&s.linear) {
                let x: Vec<f32> = (0..m * k).map(|_| rng.f()).collect();
                let xt = b.upload(HostTensor::F32(&x, &[m, k]))?;
                total += time(&b, self.reps, || Ok(b.linear(&xt, w, path).map(|_| ())?))?;
            }
            Ok(total)
        };
        let mut best_tile = (f64::INFINITY, cfg.linear_n_tile);
        for &p in &prefill_lin {
            let LinearPath::Prefill { n_tile } = p else { continue };
            let t: f64 =
                PREFILL_TOKENS.iter().map(|&m| lin_total(p, m, &mut rng)).sum::<anyhow::Result<f64>>()?;
            eprintln!("linear {p:?}: {:.1} us over {PREFILL_TOKENS:?} tokens", t * 1e6);
            if t < best_tile.0 {
                best_tile = (t, n_tile);
            }
        }
        cfg.linear_n_tile = best_tile.1;
        cfg.linear_decode_max_rows = 0;
        for m in CROSSOVER_TOKENS {
            let dec = lin_total(LinearPath::Decode, m, &mut rng)?;
            let pre = lin_total(LinearPath::Prefill { n_tile: cfg.linear_n_tile }, m, &mut rng)?;
            eprintln!("linear M={m}: decode {:.1} us, prefill {:.1} us", dec * 1e6, pre * 1e6);
            if dec <= pre && cfg.linear_decode_max_rows + 1 >= m / 2 {
                cfg.linear_decode_max_rows = m;
            }
        }
        cfg.linear_decode_max_rows = cfg.linear_decode_max_rows.max(1);

        // ---- MoE block.
        let (e, h, i) = (s.experts, s.hidden, s.inter);
        let gu = b.upload_weight(&random_nvfp4(&mut rng, e * 2 * i, h)?)?;
        let dn = b.upload_weight(&random_nvfp4(&mut rng, e * h, i)?)?;
        let shared = match s.shared_inter {
            Some(si) => Some((
                b.upload_weight(&random_nvfp4(&mut rng, 2 * si, h)?)?,
                b.upload_weight(&random_nvfp4(&mut rng, h, si)?)?,
            )),
            None => None,
        };
        let moe_time = |path: MoePath, n: usize, rng: &mut Rng| -> anyhow::Result<f64> {
            let x: Vec<f32> = (0..n * h).map(|_| rng.f()).collect();
            let mut ids = Vec::with_capacity(n * s.top_k);
            for _ in 0..n {
                let start = (rng.next() % e as u64) as usize;
                // Distinct experts per token, spread over all of them.
                ids.extend((0..s.top_k).map(|j| ((start + j * (e / s.top_k)) % e) as u32));
            }
            let w = vec![1.0 / s.top_k as f32; n * s.top_k];
            let xt = b.upload(HostTensor::F32(&x, &[n, h]))?;
            let it = b.upload(HostTensor::U32(&ids, &[n, s.top_k]))?;
            let wt = b.upload(HostTensor::F32(&w, &[n, s.top_k]))?;
            time(&b, self.reps, || {
                let ew = MoeWeights {
                    gate_up: &gu,
                    down: &dn,
                    n_experts: e,
                    shared: shared.as_ref().map(|(a, c)| (a, c)),
                };
                Ok(b.moe(&xt, &it, &wt, ew, path).map(|_| ())?)
            })
        };
        let mut best_tile = (f64::INFINITY, cfg.moe_n_tile);
        for &p in &prefill_moe {
            let MoePath::Prefill { n_tile } = p else { continue };
            let t: f64 =
                PREFILL_TOKENS.iter().map(|&n| moe_time(p, n, &mut rng)).sum::<anyhow::Result<f64>>()?;
            eprintln!("moe {p:?}: {:.1} us over {PREFILL_TOKENS:?} tokens", t * 1e6);
            if t < best_tile.0 {
                best_tile = (t, n_tile);
            }
        }
        cfg.moe_n_tile = best_tile.1;
        cfg.moe_decode_max_tokens = 0;
        for n in CROSSOVER_TOKENS {
            let dec = moe_time(MoePath::Decode, n, &mut rng)?;
            let pre = moe_time(MoePath::Prefill { n_tile: cfg.moe_n_tile }, n, &mut rng)?;
            eprintln!("moe tokens={n}: decode {:.1} us, prefill {:.1} us", dec * 1e6, pre * 1e6);
            if dec <= pre && cfg.moe_decode_max_tokens + 1 >= n / 2 {
                cfg.moe_decode_max_tokens = n;
            }
        }
        cfg.moe_decode_max_tokens = cfg.moe_decode_max_tokens.max(1);
        eprintln!("tuned on {}: {cfg:?}", b.name());
        Ok(cfg)
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let cfg = dispatch(args.backend, Tune { model: args.model, reps: args.reps })?;
    let text = serde_json::to_string_pretty(&cfg)? + "\n";
    std::fs::write(&args.out, &text).map_err(|e| anyhow::anyhow!("writing {}: {e}", args.out.display()))?;
    println!("{text}");
    Ok(())
}
