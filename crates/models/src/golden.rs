//! The golden checks (`testdata/golden`, produced by `tools/gen_golden.py` with transformers), as
//! functions every backend's tests call: the CPU and reference twins here, CUDA and wgpu in their
//! own crates, so one definition of "matches transformers" serves every device.
//!
//! Errors are relative: ‖a − e‖ / ‖e‖ over all logits of a sequence. Each check returns the
//! worst error it saw, or a message naming the fixture, sequence and position that failed.

use crate::{LanguageModel, LoadOptions, ReducedRow};
use fp4moe_ops::Backend;
use fp4moe_ops::reference::RefBackend;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Budget against transformers (float32 reference; ours differs by summation order only).
pub const GOLDEN_TOL: f64 = 1e-3;
/// Budget between two runs of the same weights through different cache / batch paths.
pub const PATH_TOL: f64 = 1e-4;
/// Budget against transformers with bf16 prefill activations
/// ([`crate::PrefillActivations::Bf16`]). The rounding itself (2^-9 relative per element) moves
/// the fixtures' logits by ~3e-3, but their random routers sit near ties, and where the
/// rounding picks another expert a sequence moves far more (GLM NVFP4's second sequence:
/// 2.9e-2; GLM's first moved 9.5e-2 while its routers also read bf16). So this bounds only gross
/// damage (a wrong path lands near 1); the closer check is against the reference twin in the
/// same mode.
pub const BF16_PREFILL_TOL: f64 = 0.3;
/// Budget between two backends with bf16 prefill activations. They round the same values, but
/// where their f32 values differ in the last bit (summation order) next to a bf16 rounding
/// boundary, one element rounds the other way: 2^-8 of it, up to ~4e-3 of a row at the
/// fixtures' hidden size of 64, and the layers after it carry that on (1.1e-3 seen between
/// the CPU backend and the reference).
pub const BF16_PREFILL_TWIN_TOL: f64 = 1e-2;

/// The checked-in fixtures: bf16 (Qwen3 sharded) and ModelOpt NVFP4 checkpoints of both models.
pub const FIXTURES: [&str; 4] = ["qwen3_moe", "glm4_moe_lite", "qwen3_moe_nvfp4", "glm4_moe_lite_nvfp4"];

/// `expected.json`: the token ids of each sequence and transformers' logits `[n, vocab]` for them.
#[derive(Debug, Deserialize)]
pub struct Expected {
    pub sequences: Vec<ExpectedSeq>,
}

#[derive(Debug, Deserialize)]
pub struct ExpectedSeq {
    pub ids: Vec<u32>,
    pub argmax: Vec<usize>,
    pub logits: Vec<Vec<f32>>,
}

/// The directory of fixture `name`: under `FP4MOE_GOLDEN_DIR` when set (a test binary run on
/// another machine, as on the GPU box), else the repository's `testdata/golden`.
pub fn fixture(name: &str) -> PathBuf {
    match std::env::var_os("FP4MOE_GOLDEN_DIR") {
        Some(dir) => PathBuf::from(dir).join(name),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/golden").join(name),
    }
}

pub fn expected(name: &str) -> Result<Expected, String> {
    let path = fixture(name).join("expected.json");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

pub fn rel_err(a: &[f32], e: &[f32]) -> f64 {
    if a.len() != e.len() {
        return f64::INFINITY;
    }
    let num: f64 = a.iter().zip(e).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum();
    let den: f64 = e.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

/// First index of the largest value (ties go to the lower index, as torch.argmax).
pub fn argmax(row: &[f32]) -> usize {
    row.iter().enumerate().fold(0, |best, (i, v)| if *v > row[best] { i } else { best })
}

/// Logits `[n, vocab]` (flattened) of one full-sequence forward.
pub fn forward_all(model: &dyn LanguageModel, ids: &[u32]) -> Result<Vec<f32>, String> {
    let mut seq = model.new_sequence(ids.len()).map_err(|e| e.to_string())?;
    let mut out = model.forward(&mut [(&mut seq, ids)], true).map_err(|e| e.to_string())?;
    if seq.len != ids.len() {
        return Err(format!("cache holds {} tokens after a forward of {}", seq.len, ids.len()));
    }
    out.pop().ok_or_else(|| "no logits returned".into())
}

/// Every sequence of `fixture` against transformers: error below [`GOLDEN_TOL`] and the same
/// argmax at every position.
pub fn check_against_golden(model: &dyn LanguageModel, fixture: &str, label: &str) -> Result<f64, String> {
    let exp = expected(fixture)?;
    let vocab = model.info().vocab_size;
    let mut worst = 0.0f64;
    for (s, seq) in exp.sequences.iter().enumerate() {
        let got = forward_all(model, &seq.ids)?;
        let want: Vec<f32> = seq.logits.iter().flatten().copied().collect();
        let err = rel_err(&got, &want);
        println!("{label}: sequence {s} ({} tokens): rel err {err:.3e}", seq.ids.len());
        if err >= GOLDEN_TOL {
            return Err(format!("{label} seq {s}: rel err {err:.3e} >= {GOLDEN_TOL:e}"));
        }
        for (p, row) in got.chunks(vocab).enumerate() {
            if argmax(row) != seq.argmax[p] {
                return Err(format!(
                    "{label} seq {s}: argmax {} at position {p}, want {}",
                    argmax(row),
                    seq.argmax[p]
                ));
            }
        }
        worst = worst.max(err);
    }
    Ok(worst)
}

/// Every sequence of `fixture` as one prefill chunk with bf16 activations, on `model` and on
/// `reference` (the reference twin on the same weights): within [`BF16_PREFILL_TWIN_TOL`] of the
/// reference (both round the same values at the same points), within [`BF16_PREFILL_TOL`] of
/// transformers, and not equal to `model`'s f32 run. Both models read f32 when called and again
/// after. Returns the worst errors (against the reference, against transformers).
pub fn check_bf16_prefill(
    model: &mut dyn LanguageModel,
    reference: &mut dyn LanguageModel,
    fixture: &str,
    label: &str,
) -> Result<(f64, f64), String> {
    use crate::PrefillActivations::{Bf16, F32};
    let exp = expected(fixture)?;
    let f32_runs: Vec<Vec<f32>> =
        exp.sequences.iter().map(|seq| forward_all(&*model, &seq.ids)).collect::<Result<_, _>>()?;
    let set = |m: &mut dyn LanguageModel, a| m.set_prefill_activations(a).map_err(|e| e.to_string());
    set(model, Bf16)?;
    set(reference, Bf16)?;
    let mut worst = (0.0f64, 0.0f64);
    for (s, (seq, f32_run)) in exp.sequences.iter().zip(&f32_runs).enumerate() {
        let got = forward_all(&*model, &seq.ids)?;
        let twin = forward_all(&*reference, &seq.ids)?;
        let want: Vec<f32> = seq.logits.iter().flatten().copied().collect();
        let (err, tf, moved) = (rel_err(&got, &twin), rel_err(&got, &want), rel_err(&got, f32_run));
        println!(
            "{label} bf16 prefill: sequence {s}: rel err {err:.3e} vs reference, {tf:.3e} vs transformers, \
             {moved:.3e} vs f32 prefill"
        );
        if err >= BF16_PREFILL_TWIN_TOL || tf >= BF16_PREFILL_TOL {
            return Err(format!(
                "{label} bf16 prefill seq {s}: rel err {err:.3e} vs reference (budget {BF16_PREFILL_TWIN_TOL:e}), \
                 {tf:.3e} vs transformers (budget {BF16_PREFILL_TOL:e})"
            ));
        }
        if moved == 0.0 && seq.ids.len() > 1 {
            return Err(format!("{label} bf16 prefill seq {s}: logits identical to the f32 prefill"));
        }
        worst = (worst.0.max(err), worst.1.max(tf));
    }
    set(model, F32)?;
    set(reference, F32)?;
    Ok(worst)
}

/// Token-by-token decode, a two-chunk prefill, and a batch of two sequences of different lengths
/// (prefilled together, then decoded together) all reproduce the one-shot forward within
/// [`PATH_TOL`].
pub fn check_paths(model: &dyn LanguageModel, fixture: &str) -> Result<f64, String> {
    let exp = expected(fixture)?;
    let vocab = model.info().vocab_size;
    let (a, b) = (&exp.sequences[0].ids, &exp.sequences[1].ids);
    let full_a = forward_all(model, a)?;
    let full_b = forward_all(model, b)?;
    let e = |r: crate::Result<Vec<Vec<f32>>>| r.map_err(|e| e.to_string());
    let mut worst = 0.0f64;
    let mut judge = |what: String, err: f64| {
        println!("{fixture}: {what}: rel err {err:.3e}");
        worst = worst.max(err);
        if err < PATH_TOL {
            Ok(())
        } else {
            Err(format!("{fixture}: {what}: rel err {err:.3e} >= {PATH_TOL:e}"))
        }
    };

    // Decode: one token per forward, last-token logits only.
    let mut seq = model.new_sequence(a.len()).map_err(|e| e.to_string())?;
    let mut stepped = Vec::new();
    for t in a {
        stepped.extend(e(model.forward(&mut [(&mut seq, std::slice::from_ref(t))], false))?.remove(0));
    }
    judge("token-by-token decode vs full forward".into(), rel_err(&stepped, &full_a))?;

    // The same steps reduced on the device (LanguageModel::forward_top_k): each step's best
    // (id, logit) pairs are those of the row above; steps alternate k = 1 and 5, and every third
    // is limited to the ids below the row's winner.
    let mut seq = model.new_sequence(a.len()).map_err(|e| e.to_string())?;
    for (i, t) in a.iter().enumerate() {
        let row = &stepped[i * vocab..(i + 1) * vocab];
        let best = argmax(row);
        let limit = if i % 3 == 1 && best > 0 { best } else { vocab };
        let k = if i % 2 == 0 { 1 } else { 5.min(limit) };
        let want: Vec<(u32, f32)> = fp4moe_ops::reference::top_k_indices(&row[..limit], k)
            .into_iter()
            .map(|j| (j as u32, row[j]))
            .collect();
        let got = model
            .forward_top_k(&mut [(&mut seq, std::slice::from_ref(t))], k, limit)
            .map_err(|e| e.to_string())?;
        let close =
            |g: &(u32, f32), w: &(u32, f32)| g.0 == w.0 && (g.1 - w.1).abs() <= 1e-5 * w.1.abs().max(1.0);
        if got.len() != 1 || got[0].len() != k || !got[0].iter().zip(&want).all(|(g, w)| close(g, w)) {
            return Err(format!(
                "{fixture}: top-{k} step {i} (ids below {limit}): got {got:?}, want {want:?}"
            ));
        }
    }
    if seq.len != a.len() {
        return Err(format!(
            "{fixture}: top-k decode left {} tokens in the cache, want {}",
            seq.len,
            a.len()
        ));
    }

    // The same steps reduced for a sampler that draws from the whole row
    // (LanguageModel::forward_reduced): the best 64 and the weight sums of the row above (sums
    // within 1e-4 of the host's: the rows of two runs may differ in their last bits), and the
    // chunks read back are the row's; odd steps are limited to the ids below 100 and ask for
    // no sums.
    let mut seq = model.new_sequence(a.len()).map_err(|e| e.to_string())?;
    for (i, t) in a.iter().enumerate() {
        let limit = if i % 2 == 1 { 100.min(vocab) } else { vocab };
        let row = &stepped[i * vocab..i * vocab + limit];
        let spec = (i % 2 == 0).then(|| fp4moe_ops::sampling::WeightSpec::new(0.8, 0.0));
        let got = model
            .forward_reduced(&mut [(&mut seq, std::slice::from_ref(t))], 64, limit, &[spec])
            .map_err(|e| e.to_string())?;
        let host = crate::HostRow::new(row.to_vec(), 64, spec);
        let [got] = &got[..] else { return Err(format!("{fixture}: reduced step {i}: {} rows", got.len())) };
        let near = |g: f32, w: f32, tol: f32| (g - w).abs() <= tol * w.abs().max(1.0);
        let top_ok = got.top().len() == host.top().len()
            && got.top().iter().zip(host.top()).all(|(g, w)| g.0 == w.0 && near(g.1, w.1, 1e-5));
        let total: f32 = host.weight_sums().map_or(0.0, |s| s.iter().sum());
        let sums_ok = match (got.weight_sums(), host.weight_sums()) {
            (Some(g), Some(w)) => {
                g.len() == w.len() && g.iter().zip(w).all(|(&g, &w)| (g - w).abs() <= 1e-4 * total)
            }
            (None, None) => true,
            _ => false,
        };
        let c = (i * 7919) % limit.div_ceil(16);
        let len = 16.min(limit - c * 16);
        let chunk = got.logits(c * 16, len).map_err(|e| e.to_string())?;
        let chunk_ok =
            chunk.len() == len && chunk.iter().zip(&row[c * 16..]).all(|(&g, &w)| near(g, w, 1e-5));
        if got.width() != limit || !top_ok || !sums_ok || !chunk_ok {
            return Err(format!(
                "{fixture}: reduced step {i} (ids below {limit}): len {} top {top_ok} sums {sums_ok} chunk {c} {chunk_ok}",
                got.width()
            ));
        }
    }

    // Chunked prefill: the second chunk attends to the first through the cache.
    let cut = a.len() / 2;
    let mut seq = model.new_sequence(a.len()).map_err(|e| e.to_string())?;
    let mut chunked = e(model.forward(&mut [(&mut seq, &a[..cut])], true))?.remove(0);
    chunked.extend(e(model.forward(&mut [(&mut seq, &a[cut..])], true))?.remove(0));
    judge("two-chunk prefill vs full forward".into(), rel_err(&chunked, &full_a))?;

    // Batch: both prompts but the last token in one forward, then both last tokens together.
    let mut sa = model.new_sequence(a.len()).map_err(|e| e.to_string())?;
    let mut sb = model.new_sequence(b.len()).map_err(|e| e.to_string())?;
    let (na, nb) = (a.len() - 1, b.len() - 1);
    let pre = e(model.forward(&mut [(&mut sa, &a[..na]), (&mut sb, &b[..nb])], true))?;
    let step = e(model.forward(&mut [(&mut sa, &a[na..]), (&mut sb, &b[nb..])], false))?;
    for (name, pre, step, full) in [("a", &pre[0], &step[0], &full_a), ("b", &pre[1], &step[1], &full_b)] {
        judge(format!("batched seq {name} prefill"), rel_err(pre, &full[..pre.len().min(full.len())]))?;
        judge(
            format!("batched seq {name} decode"),
            rel_err(step, &full[full.len().saturating_sub(vocab)..]),
        )?;
    }
    if (sa.len, sb.len) != (a.len(), b.len()) {
        return Err(format!(
            "{fixture}: batched caches hold {:?}, want {:?}",
            (sa.len, sb.len),
            (a.len(), b.len())
        ));
    }

    // The batch's last tokens again through forward_reduced, sequence a with weight sums and b
    // without (rows of one batch reduced apart): each row's best 5, a's sums and a chunk of b's
    // logits are those of the batched step above.
    let mut sa = model.new_sequence(a.len()).map_err(|e| e.to_string())?;
    let mut sb = model.new_sequence(b.len()).map_err(|e| e.to_string())?;
    e(model.forward(&mut [(&mut sa, &a[..na]), (&mut sb, &b[..nb])], false))?;
    let spec = fp4moe_ops::sampling::WeightSpec::new(1.5, 0.0);
    let k = 5.min(vocab);
    let rows = model
        .forward_reduced(&mut [(&mut sa, &a[na..]), (&mut sb, &b[nb..])], k, vocab, &[Some(spec), None])
        .map_err(|e| e.to_string())?;
    for (name, (got, (row, spec))) in
        ["a", "b"].iter().zip(rows.iter().zip([(&step[0], Some(spec)), (&step[1], None)]))
    {
        let host = crate::HostRow::new(row.clone(), k, spec);
        let mismatch = |what: &str| Err(format!("{fixture}: batched reduced step, seq {name}: {what}"));
        let near = |g: f32, w: f32| (g - w).abs() <= 1e-5 * w.abs().max(1.0);
        if got.top().len() != k
            || !got.top().iter().zip(host.top()).all(|(g, w)| g.0 == w.0 && near(g.1, w.1))
        {
            return mismatch(&format!("top {:?}, want {:?}", got.top(), host.top()));
        }
        match (got.weight_sums(), host.weight_sums()) {
            (Some(g), Some(w)) => {
                let total: f32 = w.iter().sum();
                if g.len() != w.len() || g.iter().zip(w).any(|(&g, &w)| (g - w).abs() > 1e-4 * total) {
                    return mismatch("weight sums");
                }
            }
            (None, None) => {}
            _ => return mismatch("weight sums where none were asked for, or none where they were"),
        }
        let chunk = got.logits(vocab / 2, 16.min(vocab - vocab / 2)).map_err(|e| e.to_string())?;
        if !chunk.iter().zip(&row[vocab / 2..]).all(|(&g, &w)| near(g, w)) {
            return mismatch("logits chunk");
        }
    }
    Ok(worst)
}

/// `model` against `reference` (the same weights, another backend or the dequantized twin) on
/// every sequence of `fixture`: error below [`GOLDEN_TOL`]. Returns the worst error.
pub fn check_same_logits(
    model: &dyn LanguageModel,
    reference: &dyn LanguageModel,
    fixture: &str,
    label: &str,
) -> Result<f64, String> {
    let mut worst = 0.0f64;
    for (s, seq) in expected(fixture)?.sequences.iter().enumerate() {
        let got = forward_all(model, &seq.ids)?;
        let want = forward_all(reference, &seq.ids)?;
        let err = rel_err(&got, &want);
        println!("{label}: seq {s}: rel err {err:.3e}");
        if err >= GOLDEN_TOL {
            return Err(format!("{label}: seq {s}: rel err {err:.3e} >= {GOLDEN_TOL:e}"));
        }
        worst = worst.max(err);
    }
    Ok(worst)
}

/// The whole golden suite on one backend (`make` builds a fresh one per model):
/// - every fixture as stored (bf16, ModelOpt NVFP4) against transformers, and its decode, chunked
///   and batched paths against its own full forward;
/// - both models quantized on load to MXFP4 and NVFP4 against the reference twin run on the same
///   weights dequantized, so the backend adds nothing beyond quantization error.
///
/// Returns one line per check with its worst error.
pub fn check_backend<B: Backend + 'static>(
    make: impl Fn() -> Result<B, String>,
    label: &str,
) -> Result<Vec<String>, String> {
    let load_on = |name: &str, opts: &LoadOptions| -> Result<Box<dyn LanguageModel>, String> {
        crate::load(make()?, &fixture(name), opts).map_err(|e| format!("loading {name} on {label}: {e}"))
    };
    let mut report = Vec::new();
    for name in FIXTURES {
        let mut model = load_on(name, &LoadOptions::default())?;
        let golden = check_against_golden(&*model, name, &format!("{name} {label}"))?;
        let paths = check_paths(&*model, name)?;
        let mut reference = crate::load(RefBackend, &fixture(name), &LoadOptions::default())
            .map_err(|e| format!("loading {name} on the reference: {e}"))?;
        let (bf16, bf16_tf) =
            check_bf16_prefill(&mut *model, &mut *reference, name, &format!("{name} {label}"))?;
        report.push(format!(
            "{name} {label}: vs transformers {golden:.3e}, cache/batch paths {paths:.3e}, bf16 prefill vs \
             reference {bf16:.3e} (vs transformers {bf16_tf:.3e})"
        ));
    }
    for name in ["qwen3_moe", "glm4_moe_lite"] {
        for format in [fp4::Format::Mxfp4, fp4::Format::Nvfp4] {
            let opts = LoadOptions { quant: Some(format), ..LoadOptions::default() };
            let model = load_on(name, &opts)?;
            let reference = crate::load_dequantized(RefBackend, &fixture(name), &opts)
                .map_err(|e| format!("loading {name} dequantized: {e}"))?;
            let tag = format!("{name} {} {label} vs reference on dequantized weights", format.name());
            let err = check_same_logits(&*model, &*reference, name, &tag)?;
            report.push(format!("{tag}: {err:.3e}"));
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rel_err_and_argmax_basics() {
        assert_eq!(rel_err(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
        assert!((rel_err(&[0.0, 0.0], &[3.0, 4.0]) - 1.0).abs() < 1e-12);
        assert_eq!(rel_err(&[1.0], &[1.0, 2.0]), f64::INFINITY, "a length mismatch never passes");
        assert_eq!(argmax(&[0.0, 3.0, 3.0, 1.0]), 1);
    }

    #[test]
    fn every_fixture_has_expected_logits() {
        for f in FIXTURES {
            let e = expected(f).unwrap();
            assert!(e.sequences.len() >= 2, "{f}");
            for s in &e.sequences {
                assert_eq!(s.logits.len(), s.ids.len(), "{f}");
                assert_eq!(s.argmax.len(), s.ids.len(), "{f}");
            }
        }
    }
}
