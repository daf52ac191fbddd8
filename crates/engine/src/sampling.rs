//! Turning logits into the next token: penalties, then greedy or temperature sampling filtered
//! by top-k / min-p / top-p, drawn from a seeded PRNG so a seed reproduces a run exactly.
//!
//! The order of operations follows what HF transformers and vLLM do, so a user's settings mean
//! the same thing here: penalties on raw logits → temperature → min-p → top-k → top-p → draw.

use std::collections::{HashMap, HashSet};

use crate::error::{Error, Result};

/// How to pick tokens. `Default` is neutral (temperature 1, every filter and penalty off), matching
/// the OpenAI API's defaults; callers layer a model's `generation_config.json` on top.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// 0 picks the most likely token (greedy); higher values flatten the distribution.
    pub temperature: f32,
    /// Keep only the k most likely tokens; 0 = off.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability sums to at least top_p; 1 = off.
    pub top_p: f32,
    /// Drop tokens less likely than min_p × the most likely one; 0 = off.
    pub min_p: f32,
    /// HF-style: logits of tokens already in the prompt or output are divided (if positive) or
    /// multiplied (if negative) by this; 1 = off.
    pub repetition_penalty: f32,
    /// OpenAI-style: subtracted once from the logit of every token already generated; 0 = off.
    pub presence_penalty: f32,
    /// OpenAI-style: subtracted per occurrence of a token already generated; 0 = off.
    pub frequency_penalty: f32,
    /// Seed of the sampler's PRNG; `None` picks one from the clock (reported by [`Sampler::seed`]).
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
        }
    }
}

/// Largest temperature accepted: beyond this every distribution is uniform to f32 precision, so a
/// larger value is a typo rather than a wish.
pub const MAX_TEMPERATURE: f32 = 100.0;
/// OpenAI's documented range for presence and frequency penalties.
pub const MAX_ABS_PENALTY: f32 = 2.0;

impl SamplingParams {
    /// Greedy decoding: deterministic, no seed needed.
    pub fn greedy() -> Self {
        Self { temperature: 0.0, ..Self::default() }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// Rejects values that have no meaning, naming the parameter and its valid range.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidSampling(m));
        if !self.temperature.is_finite() || self.temperature < 0.0 || self.temperature > MAX_TEMPERATURE {
            return bad(format!(
                "temperature must be between 0 and {MAX_TEMPERATURE} (0 = greedy), got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad(format!(
                "repetition_penalty must be a positive number (1 = off), got {}",
                self.repetition_penalty
            ));
        }
        for (name, v) in
            [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)]
        {
            if !(-MAX_ABS_PENALTY..=MAX_ABS_PENALTY).contains(&v) {
                return bad(format!("{name} must be in [-{MAX_ABS_PENALTY}, {MAX_ABS_PENALTY}], got {v}"));
            }
        }
        Ok(())
    }
}

/// The sampling a checkpoint recommends: `generation_config.json` keys (`temperature`, `top_k`,
/// `top_p`, `min_p`, `repetition_penalty`; `do_sample: false` means greedy) over
/// [`SamplingParams::default`]. A missing file gives the defaults; keys it lacks keep theirs.
pub fn defaults_from_dir(dir: &std::path::Path) -> Result<SamplingParams> {
    let path = dir.join("generation_config.json");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(SamplingParams::default()),
        Err(e) => return Err(Error::File { path, msg: e.to_string() }),
    };
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::File { path: path.clone(), msg: format!("invalid JSON: {e}") })?;
    let mut p = SamplingParams::default();
    let f = |key: &str| v.get(key).and_then(serde_json::Value::as_f64).map(|x| x as f32);
    if let Some(t) = f("temperature") {
        p.temperature = t;
    }
    if let Some(k) = v.get("top_k").and_then(serde_json::Value::as_u64) {
        p.top_k = k as usize;
    }
    if let Some(x) = f("top_p") {
        p.top_p = x;
    }
    if let Some(x) = f("min_p") {
        p.min_p = x;
    }
    if let Some(x) = f("repetition_penalty") {
        p.repetition_penalty = x;
    }
    if v.get("do_sample").and_then(serde_json::Value::as_bool) == Some(false) {
        p.temperature = 0.0;
    }
    p.validate().map_err(|e| Error::File { path, msg: e.to_string() })?;
    Ok(p)
}

/// xoshiro256** (Blackman & Vigna): small, fast, and good enough for sampling; seeded through
/// splitmix64 so nearby seeds give unrelated streams. Our own so a seed means the same thing on
/// every platform and every version of every dependency.
#[derive(Debug, Clone)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        let mut x = seed;
        let mut splitmix = || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Self { s: [splitmix(), splitmix(), splitmix(), splitmix()] }
    }

    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// A seed from the clock for runs that did not ask for one (reported so they can be repeated).
pub fn clock_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    // One splitmix round so two runs started in the same microsecond still differ in most bits.
    Rng::new(nanos ^ u64::from(std::process::id())).next_u64()
}

/// First candidate count tried when top-p needs the distribution sorted: a confident model puts
/// nearly all mass in a handful of tokens, so sorting the whole vocabulary is usually wasted.
const TOP_P_FIRST_WINDOW: usize = 64;

/// Largest top-k a sampler asks the model to reduce to on the device (GPU backends run it as
/// k selection passes per 2048 logits, so a larger k costs more than reading the whole row).
pub const MAX_DEVICE_TOP_K: usize = 64;

/// Per-sequence sampler: parameters, PRNG state, and the token history penalties look at.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    seed: u64,
    rng: Rng,
    /// Ids ≥ this are never sampled: a model's embedding matrix is often padded beyond the
    /// tokenizer's vocabulary, and those rows are untrained.
    vocab_limit: usize,
    /// Tokens of the prompt and output (repetition penalty).
    seen: HashSet<u32>,
    /// Occurrences of each generated token (presence and frequency penalties).
    generated_counts: HashMap<u32, u32>,
    /// Reused per step; a vocabulary of logits is ~600 KB.
    scratch: Vec<f32>,
    candidates: Vec<(u32, f32)>,
}

impl Sampler {
    /// `vocab_limit`: number of token ids that may be produced (the tokenizer's vocabulary size).
    pub fn new(params: SamplingParams, vocab_limit: usize) -> Result<Self> {
        params.validate()?;
        let seed = params.seed.unwrap_or_else(clock_seed);
        Ok(Self {
            params,
            seed,
            rng: Rng::new(seed),
            vocab_limit,
            seen: HashSet::new(),
            generated_counts: HashMap::new(),
            scratch: Vec::new(),
            candidates: Vec::new(),
        })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The seed in use (the one asked for, or the one drawn from the clock).
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// `(k, vocab_limit)` when the next pick needs only the `k` largest of the first
    /// `vocab_limit` logits: greedy (k = 1), or top-k sampling with k up to
    /// [`MAX_DEVICE_TOP_K`], and no penalty moving any logit. The model can then reduce its
    /// logits on the device ([`fp4moe_models::LanguageModel::forward_top_k`]);
    /// [`Sampler::sample_top`] picks from what it returns.
    pub fn device_top_k(&self) -> Option<(usize, usize)> {
        let p = &self.params;
        if p.repetition_penalty != 1.0 || p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            return None;
        }
        let k = if p.is_greedy() { 1 } else { p.top_k };
        (1..=MAX_DEVICE_TOP_K).contains(&k).then_some((k, self.vocab_limit))
    }

    /// [`Sampler::sample`] from the best logits only: `top` holds at least the
    /// [`Sampler::device_top_k`] largest `(id, logit)`, most likely first (ties to the lower id,
    /// NaN ranked last). The same pick as from the whole row.
    pub fn sample_top(&mut self, top: &[(u32, f32)]) -> Result<u32> {
        let Some((k, limit)) = self.device_top_k() else {
            return Err(Error::InvalidSampling("a top-k pick for a sampler that needs every logit".into()));
        };
        let top = &top[..k.min(top.len())];
        if let Some(&(id, _)) = top.iter().find(|(id, _)| *id as usize >= limit) {
            return Err(Error::BadLogits(format!("top-k pick {id} past the vocabulary ({limit})")));
        }
        let key = |l: f32| if l.is_nan() { f32::NEG_INFINITY } else { l };
        let max = top.first().map_or(f32::NEG_INFINITY, |&(_, l)| key(l));
        if max == f32::NEG_INFINITY {
            return Err(Error::BadLogits("every logit is NaN or -inf".into()));
        }
        if self.params.is_greedy() {
            return Ok(top[0].0);
        }
        self.sample_from(max, top.iter().map(|&(id, l)| (id, key(l))))
    }

    /// Records prompt tokens for the repetition penalty.
    pub fn observe_prompt(&mut self, ids: &[u32]) {
        if self.params.repetition_penalty != 1.0 {
            self.seen.extend(ids.iter().copied());
        }
    }

    /// Records a generated token for the penalties.
    pub fn accept(&mut self, id: u32) {
        self.seen.insert(id);
        *self.generated_counts.entry(id).or_insert(0) += 1;
    }

    /// Picks the next token from `logits` (`[vocab]` of the model). Does not record it: call
    /// [`Sampler::accept`] with the token actually appended.
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        let n = logits.len().min(self.vocab_limit);
        if n == 0 {
            return Err(Error::BadLogits("empty logits".into()));
        }
        self.scratch.clear();
        // NaN would poison every comparison below; treat it as "never pick".
        self.scratch.extend(logits[..n].iter().map(|&l| if l.is_nan() { f32::NEG_INFINITY } else { l }));
        self.apply_penalties();

        if self.params.is_greedy() {
            return argmax(&self.scratch);
        }
        self.sample_filtered()
    }

    fn apply_penalties(&mut self) {
        let p = &self.params;
        let logits = &mut self.scratch;
        if p.repetition_penalty != 1.0 {
            for &id in &self.seen {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l = if *l > 0.0 { *l / p.repetition_penalty } else { *l * p.repetition_penalty };
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&id, &count) in &self.generated_counts {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * count as f32;
                }
            }
        }
    }

    fn sample_filtered(&mut self) -> Result<u32> {
        let max = self.scratch.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if max == f32::NEG_INFINITY {
            return Err(Error::BadLogits("every logit is NaN or -inf".into()));
        }
        let scratch = std::mem::take(&mut self.scratch);
        let picked = self.sample_from(max, scratch.iter().enumerate().map(|(id, &l)| (id as u32, l)));
        self.scratch = scratch;
        picked
    }

    /// Temperature, min-p, top-k and top-p over `(id, logit)` pairs (NaN already -inf) whose
    /// largest logit is `max`, then one draw.
    fn sample_from(&mut self, max: f32, logits: impl Iterator<Item = (u32, f32)>) -> Result<u32> {
        let p = self.params.clone();
        // Weights relative to the best token (which gets 1), so min-p is a plain threshold.
        let inv_t = 1.0 / p.temperature;
        let min_weight = p.min_p;
        self.candidates.clear();
        for (id, l) in logits {
            let w = ((l - max) * inv_t).exp();
            if w > 0.0 && w >= min_weight {
                self.candidates.push((id, w));
            }
        }
        let cands = &mut self.candidates;
        // Most likely first, ties broken by id, so selection is deterministic.
        let by_weight_desc = |a: &(u32, f32), b: &(u32, f32)| {
            b.1.partial_cmp(&a.1).unwrap_or(std::cmp::Ordering::Equal).then(a.0.cmp(&b.0))
        };
        if p.top_k > 0 {
            if p.top_k < cands.len() {
                cands.select_nth_unstable_by(p.top_k - 1, by_weight_desc);
                cands.truncate(p.top_k);
            }
            // In one order whichever side chose the k (the whole row here, or the device:
            // sample_top), so a seed draws the same token from either.
            cands.sort_unstable_by(by_weight_desc);
        }
        if p.top_p < 1.0 {
            let total: f64 = cands.iter().map(|c| f64::from(c.1)).sum();
            let target = f64::from(p.top_p) * total;
            let mut window = TOP_P_FIRST_WINDOW;
            loop {
                let full = window >= cands.len();
                if full {
                    cands.sort_unstable_by(by_weight_desc);
                } else {
                    cands.select_nth_unstable_by(window - 1, by_weight_desc);
                    cands[..window].sort_unstable_by(by_weight_desc);
                }
                let sorted = if full { cands.len() } else { window };
                let mut acc = 0.0f64;
                let cut = cands[..sorted].iter().position(|c| {
                    acc += f64::from(c.1);
                    acc >= target
                });
                match cut {
                    Some(i) => {
                        cands.truncate(i + 1);
                        break;
                    }
                    // Rounding can leave the full sum a hair below target: keep everything.
                    None if full => break,
                    None => window = window.saturating_mul(8),
                }
            }
        }
        let total: f64 = cands.iter().map(|c| f64::from(c.1)).sum();
        let mut u = self.rng.next_f64() * total;
        for &(id, w) in cands.iter() {
            u -= f64::from(w);
            if u < 0.0 {
                return Ok(id);
            }
        }
        // u landed on the rounding sliver past the last weight.
        Ok(cands.last().map(|c| c.0).unwrap_or(0))
    }
}

/// Index of the largest logit, lowest id on ties.
fn argmax(logits: &[f32]) -> Result<u32> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &l) in logits.iter().enumerate() {
        if l > f32::NEG_INFINITY && best.is_none_or(|(_, b)| l > b) {
            best = Some((i, l));
        }
    }
    best.map(|(i, _)| i as u32).ok_or_else(|| Error::BadLogits("every logit is NaN or -inf".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams { seed: Some(7), ..SamplingParams::default() };
        f(&mut p);
        p
    }

    #[test]
    fn validate_rejects_each_bad_value_by_name() {
        let cases: Vec<(SamplingParams, &str)> = vec![
            (params(|p| p.temperature = -0.1), "temperature"),
            (params(|p| p.temperature = f32::NAN), "temperature"),
            (params(|p| p.temperature = 1e6), "temperature"),
            (params(|p| p.top_p = 0.0), "top_p"),
            (params(|p| p.top_p = 1.5), "top_p"),
            (params(|p| p.min_p = -0.5), "min_p"),
            (params(|p| p.min_p = 2.0), "min_p"),
            (params(|p| p.repetition_penalty = 0.0), "repetition_penalty"),
            (params(|p| p.repetition_penalty = f32::INFINITY), "repetition_penalty"),
            (params(|p| p.presence_penalty = 3.0), "presence_penalty"),
            (params(|p| p.frequency_penalty = -2.5), "frequency_penalty"),
        ];
        for (p, name) in cases {
            let err = p.validate().expect_err(name).to_string();
            assert!(err.contains(name), "{err}");
            assert!(Sampler::new(p, 10).is_err());
        }
        params(|_| ()).validate().unwrap();
        SamplingParams::greedy().validate().unwrap();
    }

    #[test]
    fn rng_streams_are_reproducible_and_seed_dependent() {
        let a: Vec<u64> = (0..8).scan(Rng::new(1), |r, _| Some(r.next_u64())).collect();
        let b: Vec<u64> = (0..8).scan(Rng::new(1), |r, _| Some(r.next_u64())).collect();
        let c: Vec<u64> = (0..8).scan(Rng::new(2), |r, _| Some(r.next_u64())).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
        let mut r = Rng::new(3);
        let mean = (0..10_000).map(|_| r.next_f64()).sum::<f64>() / 10_000.0;
        assert!((mean - 0.5).abs() < 0.02, "mean {mean}");
    }

    #[test]
    fn greedy_picks_argmax_lowest_id_on_ties_and_skips_nan() {
        let mut s = Sampler::new(SamplingParams::greedy(), 5).unwrap();
        assert_eq!(s.sample(&[0.0, 3.0, f32::NAN, 3.0, 1.0]).unwrap(), 1);
        assert!(s.sample(&[f32::NAN; 5]).is_err());
    }

    #[test]
    fn vocab_limit_masks_padding_rows() {
        let mut s = Sampler::new(SamplingParams::greedy(), 3).unwrap();
        assert_eq!(s.sample(&[0.0, 1.0, 0.5, 9.0, 9.0]).unwrap(), 1);
    }

    #[test]
    fn seeded_sampling_is_reproducible() {
        let logits: Vec<f32> = (0..1000).map(|i| ((i * 7919) % 1000) as f32 / 200.0).collect();
        let run = |seed| {
            let mut s = Sampler::new(params(|p| p.seed = Some(seed)), logits.len()).unwrap();
            (0..50).map(|_| s.sample(&logits).unwrap()).collect::<Vec<_>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
    }

    /// Empirical frequencies over many draws, for checking the filters.
    fn histogram(p: SamplingParams, logits: &[f32], draws: usize) -> Vec<f64> {
        let mut s = Sampler::new(p, logits.len()).unwrap();
        let mut h = vec![0.0; logits.len()];
        for _ in 0..draws {
            h[s.sample(logits).unwrap() as usize] += 1.0 / draws as f64;
        }
        h
    }

    #[test]
    fn temperature_sampling_matches_softmax() {
        let logits = [0.0f32, 1.0, 2.0];
        let t = 2.0f32;
        let h = histogram(params(|p| p.temperature = t), &logits, 40_000);
        let z: f64 = logits.iter().map(|&l| f64::from(l / t).exp()).sum();
        for (i, &l) in logits.iter().enumerate() {
            let want = f64::from(l / t).exp() / z;
            assert!((h[i] - want).abs() < 0.015, "token {i}: {} vs {want}", h[i]);
        }
    }

    #[test]
    fn top_k_keeps_only_k_best() {
        let logits = [1.0f32, 5.0, 4.0, 3.0, 0.0];
        let h = histogram(params(|p| p.top_k = 2), &logits, 5_000);
        assert!(h[1] > 0.0 && h[2] > 0.0);
        assert_eq!(h[0] + h[3] + h[4], 0.0);
    }

    /// The pick from the k best logits (as a device reduces them) equals the pick from the
    /// whole row, draw for draw, with ties at the boundary and NaN in the row; without top-k,
    /// or with a penalty, the whole row is needed.
    #[test]
    fn sampling_from_the_best_logits_matches_the_whole_row() {
        let mut rng = Rng::new(7);
        let mut row: Vec<f32> = (0..1000).map(|_| (rng.next_f64() * 8.0) as f32).collect();
        row[3] = f32::NAN;
        row[10] = 9.0;
        row[20] = 9.0;
        let top = |k: usize, limit: usize| -> Vec<(u32, f32)> {
            let key = |v: f32| if v.is_nan() { f32::NEG_INFINITY } else { v };
            let mut ids: Vec<usize> = (0..limit).collect();
            ids.sort_by(|&a, &b| key(row[b]).partial_cmp(&key(row[a])).unwrap().then(a.cmp(&b)));
            ids[..k].iter().map(|&i| (i as u32, row[i])).collect()
        };
        for (temperature, top_k, top_p, min_p) in
            [(0.0, 0, 1.0, 0.0), (0.7, 20, 1.0, 0.0), (1.0, 5, 0.9, 0.0), (1.3, 64, 0.95, 0.05)]
        {
            let p = params(|p| {
                p.temperature = temperature;
                p.top_k = top_k;
                p.top_p = top_p;
                p.min_p = min_p;
                p.seed = Some(11);
            });
            let (mut whole, mut best) =
                (Sampler::new(p.clone(), 900).unwrap(), Sampler::new(p, 900).unwrap());
            let (k, limit) = best.device_top_k().expect("greedy / top-k without penalties");
            assert_eq!((k, limit), (top_k.max(1), 900));
            for draw in 0..300 {
                let want = whole.sample(&row).unwrap();
                assert_eq!(
                    best.sample_top(&top(k, limit)).unwrap(),
                    want,
                    "t {temperature} k {top_k} draw {draw}"
                );
            }
        }
        assert!(Sampler::new(params(|p| p.top_k = 0), 9).unwrap().device_top_k().is_none());
        assert!(
            Sampler::new(params(|p| p.top_k = MAX_DEVICE_TOP_K + 1), 9).unwrap().device_top_k().is_none()
        );
        let penalized = params(|p| {
            p.temperature = 0.0;
            p.presence_penalty = 0.5;
        });
        assert!(Sampler::new(penalized, 9).unwrap().device_top_k().is_none());
        let mut greedy = Sampler::new(SamplingParams::greedy(), 9).unwrap();
        assert!(matches!(greedy.sample_top(&[(2, f32::NAN)]), Err(Error::BadLogits(_))));
        assert!(matches!(greedy.sample_top(&[(9, 1.0)]), Err(Error::BadLogits(_))));
    }

    #[test]
    fn top_p_keeps_smallest_set_reaching_p() {
        // probabilities 0.5, 0.25, 0.125, 0.125 (ln-spaced logits)
        let l2 = std::f32::consts::LN_2;
        let logits = [3.0 * l2, 2.0 * l2, l2, l2];
        let h = histogram(params(|p| p.top_p = 0.7), &logits, 10_000);
        assert!(h[0] > 0.6 && h[1] > 0.25, "{h:?}");
        assert_eq!(h[2] + h[3], 0.0);
        // A flat distribution over a large vocabulary needs the window widened several times:
        // top-p 0.5 of 5000 equal tokens keeps exactly the 2500 lowest ids (ties break by id).
        let flat = vec![0.0f32; 5_000];
        let mut s = Sampler::new(params(|p| p.top_p = 0.5), flat.len()).unwrap();
        let draws: Vec<u32> = (0..2_000).map(|_| s.sample(&flat).unwrap()).collect();
        assert!(draws.iter().all(|&t| t < 2_500));
        assert!(draws.iter().any(|&t| t >= 8 * TOP_P_FIRST_WINDOW as u32), "window must widen");
        let mut confident = vec![0.0f32; 5_000];
        confident[4_999] = 20.0;
        let h = histogram(params(|p| p.top_p = 0.5), &confident, 200);
        assert!((h[4_999] - 1.0).abs() < 1e-9, "{}", h[4_999]);
    }

    #[test]
    fn min_p_drops_unlikely_tokens() {
        let l2 = std::f32::consts::LN_2;
        // relative weights 1, 0.5, 0.25
        let logits = [2.0 * l2, l2, 0.0];
        let h = histogram(params(|p| p.min_p = 0.4), &logits, 5_000);
        assert!(h[0] > 0.0 && h[1] > 0.0);
        assert_eq!(h[2], 0.0);
    }

    #[test]
    fn penalties_move_greedy_choice() {
        let logits = [2.0f32, 1.9, -1.0];
        let mut s = Sampler::new(
            params(|p| {
                p.temperature = 0.0;
                p.repetition_penalty = 1.1;
            }),
            3,
        )
        .unwrap();
        s.observe_prompt(&[0]);
        assert_eq!(s.sample(&logits).unwrap(), 1, "2.0/1.1 < 1.9");

        let mut s = Sampler::new(
            params(|p| {
                p.temperature = 0.0;
                p.presence_penalty = 0.5;
            }),
            3,
        )
        .unwrap();
        assert_eq!(s.sample(&logits).unwrap(), 0);
        s.accept(0);
        assert_eq!(s.sample(&logits).unwrap(), 1);

        let mut s = Sampler::new(
            params(|p| {
                p.temperature = 0.0;
                p.frequency_penalty = 0.06;
            }),
            3,
        )
        .unwrap();
        s.accept(0);
        assert_eq!(s.sample(&logits).unwrap(), 0, "one occurrence: 2.0 - 0.06 > 1.9");
        s.accept(0);
        assert_eq!(s.sample(&logits).unwrap(), 1, "two occurrences: 2.0 - 0.12 < 1.9");
        // Repetition penalty multiplies negative logits (pushes them further down).
        let mut s = Sampler::new(
            params(|p| {
                p.temperature = 0.0;
                p.repetition_penalty = 3.0;
            }),
            2,
        )
        .unwrap();
        s.observe_prompt(&[1]);
        assert_eq!(s.sample(&[-1.0, -0.5]).unwrap(), 0, "-0.5 * 3 < -1");
    }
    #[test]
    fn generation_config_defaults_layer_over_neutral_ones() {
        let dir = std::env::temp_dir().join(format!("fp4moe-engine-gencfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(defaults_from_dir(&dir).unwrap(), SamplingParams::default());
        let file = dir.join("generation_config.json");
        std::fs::write(&file, r#"{"do_sample": true, "temperature": 0.6, "top_k": 20, "top_p": 0.95}"#)
            .unwrap();
        let p = defaults_from_dir(&dir).unwrap();
        assert_eq!((p.temperature, p.top_k, p.top_p, p.min_p), (0.6, 20, 0.95, 0.0));
        std::fs::write(&file, r#"{"do_sample": false, "temperature": 0.6}"#).unwrap();
        assert!(defaults_from_dir(&dir).unwrap().is_greedy());
        std::fs::write(&file, r#"{"top_p": 7}"#).unwrap();
        let err = defaults_from_dir(&dir).unwrap_err().to_string();
        assert!(err.contains("generation_config.json") && err.contains("top_p"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
