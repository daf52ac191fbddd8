//! Times the CUDA backend's MoE layers and decode GEMVs on the two models' real shapes, against
//! the bandwidth and tensor-core floors given on the command line (measured in the same device
//! call by tools/bench_torch_moe.py). Weights are random NVFP4 codes (no host quantization, so
//! setup is quick); timing is wall time over many enqueued calls after warm-up, one synchronize
//! at the end, median of 5 batches.
//!
//! `bench_layers [copy_bytes_per_s] [bf16_flops_per_s] [--decode]` prints one JSON object per line;
//! `--decode` times only the one-token shapes; `--moe-only LAYER:TOKENS` (e.g.
//! `qwen3-30b-a3b:8192`) only that MoE layer at that token count, for profilers; `--rows R`
//! only prefill tiles of R rows, `--x f32|bf16` only that activation type (after the two
//! ceilings, which are read as the first two numbers); `--linear-tiles` only the prefill of
//! narrow and common linears at each tile height (0: the backend's pick).

use fp4::{Format, QuantMatrix};
use fp4moe_cuda::CudaBackend;
use fp4moe_ops::{Backend, HostTensor, HostWeight, LinearPath, MoePath, MoeWeights};
use std::time::Instant;

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

/// Random NVFP4 matrix: random codes, block scales around 1/64 (E4M3 codes 0x18..0x1F).
fn random_nvfp4(rng: &mut Rng, rows: usize, cols: usize) -> HostWeight {
    let codes: Vec<u8> = (0..rows * cols / 2).map(|_| rng.next() as u8).collect();
    let scales: Vec<u8> = (0..rows * cols / 16).map(|_| 0x18 + (rng.next() % 8) as u8).collect();
    let q =
        QuantMatrix::new(Format::Nvfp4, rows, cols, codes.into(), scales.into(), vec![1.0]).expect("valid");
    HostWeight::Quant(q)
}

fn time<F: FnMut()>(b: &CudaBackend, reps: usize, mut f: F) -> f64 {
    for _ in 0..3 {
        f();
    }
    b.synchronize().expect("sync");
    let mut v = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        for _ in 0..reps {
            f();
        }
        b.synchronize().expect("sync");
        v.push(t.elapsed().as_secs_f64() / reps as f64);
    }
    v.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    v[2]
}

fn main() {
    let args: Vec<f64> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let copy_bw = args.first().copied().unwrap_or(3.0e12);
    let tc_rate = args.get(1).copied().unwrap_or(780e12);
    let decode_only = std::env::args().any(|a| a == "--decode");
    let argv: Vec<String> = std::env::args().collect();
    let flag = |f: &str| argv.iter().position(|a| a == f).and_then(|i| argv.get(i + 1)).cloned();
    let moe_only = flag("--moe-only");
    let only_rows: Option<usize> = flag("--rows").and_then(|r| r.parse().ok());
    let only_x = flag("--x");
    let b = match CudaBackend::new() {
        Ok(b) => b,
        Err(e) => {
            println!("{{\"skipped\": \"{e}\"}}");
            return;
        }
    };
    b.warm_up().expect("compile");
    let dev = b.device_name().to_string();
    let mut rng = Rng(0x1234_5678_9abc_def1);
    // Prefill tiles of the narrow linears (k/v, MLA's down-projections) and of o / q against each
    // tile height (`--linear-tiles`): which one the backend should pick.
    if std::env::args().any(|a| a == "--linear-tiles") {
        for (n_out, kk) in [(512usize, 2048usize), (576, 2048), (768, 2048), (2048, 4096), (4096, 2048)] {
            let w = b.upload_weight(&random_nvfp4(&mut rng, n_out, kk)).expect("upload");
            for m in [512usize, 2048] {
                let x: Vec<f32> = (0..m * kk).map(|_| rng.f()).collect();
                let xt = b.upload(HostTensor::F32(&x, &[m, kk])).expect("upload");
                let xt = b.cast(&xt, fp4moe_ops::DType::BF16).expect("cast");
                for rows in std::iter::once(0).chain(fp4moe_cuda::GEMM_BLOCK_ROWS) {
                    let forced;
                    let bb = if rows == 0 {
                        &b
                    } else {
                        forced = b.with_gemm_block_rows(rows);
                        &forced
                    };
                    let path = LinearPath::Prefill { n_tile: 128 };
                    let t = time(bb, 10, || {
                        bb.linear(&xt, &w, path).expect("linear");
                    });
                    let flops = 2.0 * (m * n_out * kk) as f64;
                    println!(
                        "{{\"bench\": \"linear_tiles\", \"n\": {n_out}, \"k\": {kk}, \"m\": {m}, \"tile_rows\": {rows}, \"seconds\": {t:.4e}, \"tflops\": {:.1}}}",
                        flops / t / 1e12
                    );
                }
            }
        }
        return;
    }
    // (name, experts, top-k, hidden, inter, shared inter)
    let layers = [
        ("qwen3-30b-a3b", 128usize, 8usize, 2048usize, 768usize, 0usize),
        ("glm-4.7-flash", 64, 4, 2048, 1536, 1536),
    ];
    for (name, e, k, h, i, si) in layers {
        if moe_only.as_ref().is_some_and(|o| !o.starts_with(&format!("{name}:"))) {
            continue;
        }
        let gu = b.upload_weight(&random_nvfp4(&mut rng, e * 2 * i, h)).expect("upload");
        let dn = b.upload_weight(&random_nvfp4(&mut rng, e * h, i)).expect("upload");
        let shared = if si > 0 {
            Some((
                b.upload_weight(&random_nvfp4(&mut rng, 2 * si, h)).expect("upload"),
                b.upload_weight(&random_nvfp4(&mut rng, h, si)).expect("upload"),
            ))
        } else {
            None
        };
        let per_expert = (2 * i * h + h * i) as f64 * 0.5625; // NVFP4: 4.5 bits per element
        let shared_bytes = (3 * si * h) as f64 * 0.5625;
        // `--moe-only LAYER:TOKENS` takes any token count; otherwise decode, a short and a long prefill.
        let counts = match moe_only.as_ref().and_then(|o| o.strip_prefix(&format!("{name}:"))) {
            Some(n) => vec![n.parse::<usize>().expect("--moe-only LAYER:TOKENS")],
            None => vec![1usize, 512, 8192],
        };
        for n in counts {
            if decode_only && n > 1 {
                continue;
            }
            let x: Vec<f32> = (0..n * h).map(|_| rng.f()).collect();
            // Random distinct experts per token.
            let mut ids = Vec::with_capacity(n * k);
            for _ in 0..n {
                let mut s: Vec<u32> = Vec::new();
                while s.len() < k {
                    let c = (rng.next() % e as u64) as u32;
                    if !s.contains(&c) {
                        s.push(c);
                    }
                }
                ids.extend(s);
            }
            let used = {
                let mut u = ids.clone();
                u.sort();
                u.dedup();
                u.len()
            };
            let wts: Vec<f32> = (0..n * k).map(|_| 1.0 / k as f32).collect();
            let xt = b.upload(HostTensor::F32(&x, &[n, h])).expect("upload");
            let it = b.upload(HostTensor::U32(&ids, &[n, k])).expect("upload");
            let wt = b.upload(HostTensor::F32(&wts, &[n, k])).expect("upload");
            let bytes = used as f64 * per_expert + shared_bytes;
            let flops = 2.0 * (n * k * 3 * h * i + n * 3 * h * si) as f64;
            // The copy figure counts bytes read + written, i.e. DRAM traffic; weights are only read.
            let floor_bw = bytes / copy_bw;
            let floor_tc = flops / tc_rate;
            let paths: Vec<MoePath> =
                if n == 1 { vec![MoePath::Decode] } else { b.moe_paths()[1..].to_vec() };
            // Prefill paths on each GEMM tile height (the backend picks one by rows per expert).
            let runs: Vec<(MoePath, Option<usize>)> = paths
                .iter()
                .flat_map(|&p| match p {
                    MoePath::Prefill { .. } => b
                        .moe_block_rows()
                        .iter()
                        .filter(|&&r| only_rows.is_none_or(|o| o == r))
                        .map(|&r| (p, Some(r)))
                        .collect(),
                    _ => vec![(p, None)],
                })
                .collect();
            // Prefill also with bf16 x (one term for gate/up, where f32 takes two).
            let xt_bf16 = b.cast(&xt, fp4moe_ops::DType::BF16).expect("cast");
            let runs: Vec<(MoePath, Option<usize>, bool)> = runs
                .into_iter()
                .flat_map(|(p, r)| {
                    let bf16 = if n > 1 { vec![false, true] } else { vec![false] };
                    let only_x = only_x.clone();
                    bf16.into_iter()
                        .filter(move |&x| {
                            only_x.as_deref().is_none_or(|o| o == if x { "bf16" } else { "f32" })
                        })
                        .map(move |x| (p, r, x))
                })
                .collect();
            for (path, rows, bf16) in runs {
                let reps = if n == 1 { 200 } else { 5 };
                let bb = match rows {
                    Some(r) => b.with_gemm_block_rows(r),
                    None => b.with_config(b.config()),
                };
                let t = time(&bb, reps, || {
                    let ew = MoeWeights {
                        gate_up: &gu,
                        down: &dn,
                        n_experts: e,
                        shared: shared.as_ref().map(|(a, c)| (a, c)),
                    };
                    bb.moe(if bf16 { &xt_bf16 } else { &xt }, &it, &wt, ew, path).expect("moe");
                });
                let rows = rows.map_or("null".to_string(), |r| r.to_string());
                println!(
                    "{{\"bench\": \"moe\", \"device\": \"{dev}\", \"layer\": \"{name}\", \"tokens\": {n}, \"path\": \"{path:?}\", \"tile_rows\": {rows}, \"x\": \"{}\", \"seconds\": {t:.4e}, \"weight_bytes\": {bytes:.0}, \"flops\": {flops:.0}, \"bw_floor_s\": {floor_bw:.4e}, \"tc_floor_s\": {floor_tc:.4e}, \"x_bw_floor\": {:.2}, \"x_tc_floor\": {:.2}, \"gbps\": {:.0}, \"tflops\": {:.1}}}",
                    if bf16 { "bf16" } else { "f32" },
                    t / floor_bw,
                    t / floor_tc,
                    bytes / t / 1e9,
                    flops / t / 1e12
                );
            }
        }
    }
    // Decode GEMV and prefill GEMM on single linear shapes (N, K).
    if moe_only.is_some() {
        return;
    }
    for (n_out, kk) in [(4096usize, 2048usize), (2048, 4096), (512, 2048), (151936, 2048)] {
        let w = b.upload_weight(&random_nvfp4(&mut rng, n_out, kk)).expect("upload");
        let bytes = (n_out * kk) as f64 * 0.5625;
        for (m, path) in [
            (1usize, LinearPath::Decode),
            (2048, LinearPath::Prefill { n_tile: 256 }),
            (2048, LinearPath::Prefill { n_tile: 128 }),
        ] {
            if m > 1 && (n_out > 8192 || decode_only) {
                continue;
            }
            for bf16 in [false, true] {
                if m == 1 && bf16 {
                    continue;
                }
                let x: Vec<f32> = (0..m * kk).map(|_| rng.f()).collect();
                let mut xt = b.upload(HostTensor::F32(&x, &[m, kk])).expect("upload");
                if bf16 {
                    xt = b.cast(&xt, fp4moe_ops::DType::BF16).expect("cast");
                }
                let t = time(&b, if m == 1 { 200 } else { 10 }, || {
                    b.linear(&xt, &w, path).expect("linear");
                });
                let flops = 2.0 * (m * n_out * kk) as f64;
                println!(
                    "{{\"bench\": \"linear\", \"device\": \"{dev}\", \"n\": {n_out}, \"k\": {kk}, \"m\": {m}, \"x\": \"{}\", \"path\": \"{path:?}\", \"seconds\": {t:.4e}, \"gbps\": {:.0}, \"x_bw_floor\": {:.2}, \"tflops\": {:.1}}}",
                    if bf16 { "bf16" } else { "f32" },
                    bytes / t / 1e9,
                    t / (bytes / copy_bw),
                    flops / t / 1e12
                );
            }
        }
    }
}
