//! `fp4moe bench sampling`: the host's cost of picking a token from a whole logits row, per
//! sampling setting. A GPU step hands the host the whole row whenever the request cannot be
//! reduced on the device (temperature or top-p without top-k, any penalty; see
//! `Sampler::device_top_k`), and the CPU backend always does, so this time adds to every such
//! step.
//!
//! Two rows of Qwen3's vocabulary width: `peaked` (a few strong candidates over a normal
//! bulk, like a language model's logits) and `flat` (uniform over [-10, 10]: the worst case for
//! top-p, whose nucleus then holds most of the vocabulary).

use fp4moe_engine::{Sampler, SamplingParams};
use fp4moe_ops::conformance::Rng;
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Logits per row (Qwen3's and GLM's padded vocabularies are 151936 and 154880).
    #[arg(long, default_value_t = 151_936)]
    vocab: usize,
    /// Timed picks per setting and row (the median is reported).
    #[arg(long, default_value_t = 41)]
    repeats: usize,
}

#[derive(Serialize)]
struct Row {
    setting: &'static str,
    logits: &'static str,
    median_us: f64,
    min_us: f64,
}

/// The settings users reach for: the OpenAI API's defaults (temperature 1), the published
/// recommendations of both models, and the filters and penalties that keep a step on the host.
fn settings() -> Vec<(&'static str, SamplingParams)> {
    let p = |f: fn(&mut SamplingParams)| {
        let mut p = SamplingParams { seed: Some(1), ..SamplingParams::default() };
        f(&mut p);
        p
    };
    vec![
        ("greedy", SamplingParams::greedy()),
        ("temperature 1 (OpenAI default)", p(|_| {})),
        ("temperature 1, top-p 0.95 (GLM)", p(|p| p.top_p = 0.95)),
        (
            "t 0.6, top-k 20, top-p 0.95 (Qwen3)",
            p(|p| {
                p.temperature = 0.6;
                p.top_k = 20;
                p.top_p = 0.95;
            }),
        ),
        (
            "t 0.8, min-p 0.05",
            p(|p| {
                p.temperature = 0.8;
                p.min_p = 0.05;
            }),
        ),
        (
            "t 0.7, top-p 0.9, repetition 1.1",
            p(|p| {
                p.temperature = 0.7;
                p.top_p = 0.9;
                p.repetition_penalty = 1.1;
            }),
        ),
    ]
}

fn rows(vocab: usize) -> Vec<(&'static str, Vec<f32>)> {
    let mut rng = Rng::new(5);
    let mut peaked = rng.normals(vocab, 2.5);
    for i in 0..8 {
        let id = rng.below(vocab);
        peaked[id] = 12.0 + i as f32;
    }
    let flat = (0..vocab).map(|_| rng.range(-10.0, 10.0)).collect();
    vec![("peaked", peaked), ("flat", flat)]
}

pub fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.vocab > 0 && args.repeats > 0, "--vocab and --repeats must be positive");
    let mut out = Vec::new();
    println!("{:<38} {:<7} {:>11} {:>9}", "setting", "logits", "median µs", "min µs");
    for (name, params) in settings() {
        for (kind, row) in rows(args.vocab) {
            let mut s = Sampler::new(params.clone(), args.vocab)?;
            // A prompt's worth of seen tokens, so a penalty has work to do.
            s.observe_prompt(&(0..512u32).map(|i| i * 97 % args.vocab as u32).collect::<Vec<_>>());
            for _ in 0..3 {
                s.sample(&row)?;
            }
            let mut times: Vec<f64> = (0..args.repeats)
                .map(|_| {
                    let t = Instant::now();
                    let id = s.sample(&row);
                    let us = t.elapsed().as_secs_f64() * 1e6;
                    id.map(|_| us)
                })
                .collect::<Result<_, _>>()?;
            times.sort_by(f64::total_cmp);
            let r = Row { setting: name, logits: kind, median_us: times[times.len() / 2], min_us: times[0] };
            println!("{:<38} {:<7} {:>11.1} {:>9.1}", r.setting, r.logits, r.median_us, r.min_us);
            out.push(r);
        }
    }
    if let Some(path) = args.json {
        let report = serde_json::json!({ "vocab": args.vocab, "repeats": args.repeats, "rows": out });
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
