//! Turning logits into the next token: penalties, then greedy or temperature sampling filtered
//! by top-k / min-p / top-p, drawn from a seeded PRNG so a seed reproduces a run exactly.
//!
//! The order of operations follows what HF transformers and vLLM do, so a user's settings mean
//! the same thing here: penalties on raw logits → temperature → min-p → top-k → top-p → draw.
//!
//! A pick over a whole row (151936 logits; every CPU step, and a GPU step whose request cannot
//! be reduced on the device) is a few passes over it, never a sort of it: weights from a
//! hand-written exponential the compiler vectorizes (`fp4moe_ops::sampling`, the one definition
//! of a weight), top-k from a best-so-far list, the top-p cut among the first 64 ranked tokens
//! or else from a histogram of scaled logits, and a draw through per-16-token partial sums.
//! `fp4moe bench sampling` times it; a test holds it to a plain definition (full sort, filters
//! in order) draw for draw.
//!
//! A GPU step needs none of that on the host when the model reduces the row where it is
//! ([`Sampler::device_top_k`]: the best k logits; [`Sampler::device_weights`]: those and the
//! per-16-token sums of the weights): [`Sampler::sample_reduced`] then draws the same token
//! from the downloaded few, reading one 16-token chunk of the row.

use std::collections::{HashMap, HashSet};

use fp4moe_models::ReducedRow;
use fp4moe_ops::sampling::{WEIGHT_CHUNK, WeightSpec, chunk_sum};
use rayon::prelude::*;

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

/// Largest top-k a sampler asks the model to reduce to on the device (GPU backends run it as
/// k selection passes per 2048 logits, so a larger k costs more than reading the whole row).
pub const MAX_DEVICE_TOP_K: usize = 64;

/// Largest top-k picked from a whole row by keeping the best so far in a sorted list (a larger k
/// collects the candidates and selects). Also the first try of a top-p cut without top-k: a
/// confident model puts nearly all its mass in a handful of tokens.
const LIST_TOP_K: usize = 64;

/// Whole-row picks a sampler makes after a top-p cut past the best tokens before it asks for a
/// reduced row again (rows whose cuts alternate would otherwise pay for both paths).
const WHOLE_ROW_BACKOFF: u32 = 8;

/// Buckets of scaled logit, over the candidates' range, for finding a top-p cut past the first
/// [`LIST_TOP_K`] tokens in one pass.
const TOP_P_BUCKETS: usize = 2048;

/// The largest logit of a row's best `(id, logit)` pairs (most likely first), checked: every id
/// below `limit`, and a number to pick (not NaN or -inf only).
fn top_max(top: &[(u32, f32)], limit: usize) -> Result<f32> {
    if let Some(&(id, _)) = top.iter().find(|(id, _)| *id as usize >= limit) {
        return Err(Error::BadLogits(format!("best logit {id} past the vocabulary ({limit})")));
    }
    let max = top.first().map_or(f32::NEG_INFINITY, |&(_, l)| if l.is_nan() { f32::NEG_INFINITY } else { l });
    if max == f32::NEG_INFINITY {
        return Err(Error::BadLogits("every logit is NaN or -inf".into()));
    }
    Ok(max)
}

/// The largest value of `row` (NaN never wins; -inf for an empty row or one without numbers),
/// over eight lanes so the compiler vectorizes it.
fn row_max(row: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = row.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (m, &l) in lanes.iter_mut().zip(c) {
            *m = if l > *m { l } else { *m };
        }
    }
    lanes.iter().chain(rest).fold(f32::NEG_INFINITY, |m, &l| if l > m { l } else { m })
}

/// Whether `a` ranks before `b`: the larger logit first, the lower id on ties.
fn ranks_before(a: (u32, f32), b: (u32, f32)) -> bool {
    a.1 > b.1 || (a.1 == b.1 && a.0 < b.0)
}

/// [`ranks_before`] as an ordering.
fn rank_order(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    if ranks_before(*a, *b) {
        std::cmp::Ordering::Less
    } else if ranks_before(*b, *a) {
        std::cmp::Ordering::Greater
    } else {
        std::cmp::Ordering::Equal
    }
}

/// The [`WEIGHT_CHUNK`] sums of `(id, weight)` pairs in increasing id order, as `(chunk, sum)`
/// for the chunks that hold any: the same values as the sums over a whole row with 0 for every
/// other token.
fn chunk_sums(by_id: &[(u32, f32)]) -> Vec<(usize, f64)> {
    let mut sums: Vec<(usize, f32)> = Vec::new();
    for &(id, w) in by_id {
        let c = id as usize / WEIGHT_CHUNK;
        match sums.last_mut() {
            Some((last, s)) if *last == c => *s += w,
            _ => sums.push((c, w)),
        }
    }
    sums.into_iter().map(|(c, s)| (c, f64::from(s))).collect()
}

/// The sum of chunk sums, in order.
fn total(sums: impl Iterator<Item = f64>) -> f64 {
    sums.sum()
}

/// Where a draw `u` in [0, total) lands among chunk sums: the chunk and what is left of `u` at
/// its start. Past the last sum (rounding): the last chunk with weight.
fn land(mut u: f64, sums: impl Iterator<Item = (usize, f64)>) -> Option<(usize, f64)> {
    let mut last = None;
    for (c, s) in sums {
        if s > 0.0 {
            last = Some((c, u));
        }
        if u < s {
            return Some((c, u));
        }
        u -= s;
    }
    last
}

/// Within the landed chunk's `(id, weight)` pairs (id order), the first weight that takes `u`
/// below 0, else (rounding) the last with weight.
fn land_in_chunk(mut u: f64, ws: impl Iterator<Item = (u32, f32)> + Clone) -> Option<u32> {
    ws.clone()
        .find(|&(_, w)| {
            u -= f64::from(w);
            w > 0.0 && u < 0.0
        })
        .or_else(|| ws.filter(|c| c.1 > 0.0).last())
        .map(|c| c.0)
}

/// What a whole-row pick needs a model to reduce on the device ([`Sampler::device_weights`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeviceWeights {
    /// How logits become weights (temperature, min-p).
    pub spec: WeightSpec,
    /// How many of the best logits the pick reads.
    pub top: usize,
    /// The ids that may be picked are those below this.
    pub vocab_limit: usize,
}

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
    /// Reused per step (a vocabulary of f32 is ~600 KB): the penalized logits, each token's
    /// weight, and their chunk sums.
    penalized: Vec<f32>,
    weights: Vec<f32>,
    sums: Vec<f64>,
    /// Whole-row picks to make before a top-p pick tries a reduced row again. A cut past the
    /// [`LIST_TOP_K`] best tokens makes a reduced row cost more than the whole one (the best
    /// tokens, the sums, and the row after all), so one sets this to [`WHOLE_ROW_BACKOFF`] and
    /// each later whole-row pick whose cut lies among the best counts it down. Either way the
    /// same token is drawn: this only picks the faster path.
    whole_row_picks: u32,
    paths: PickPaths,
}

/// How a sampler's picks were made, counted (benchmarks report it: the paths differ in cost).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PickPaths {
    /// From the best k logits reduced on the device ([`Sampler::sample_top`]).
    pub top_k: u64,
    /// Through weight sums made on the device ([`Sampler::sample_reduced`]).
    pub weight_sums: u64,
    /// The same, whose top-p cut lay past the best logits, so the row was read after all.
    pub weight_sums_then_row: u64,
    /// From the whole row on the host ([`Sampler::sample`]).
    pub whole_row: u64,
}

/// The candidates of one pick, as every path computes them ([`WeightSpec`] at the row's
/// largest logit): a token is a candidate when its weight is above 0 (x at least the floor);
/// candidates rank by logit (ties to the lower id).
#[derive(Clone, Copy)]
struct Scale {
    max: f32,
    spec: WeightSpec,
}

impl Scale {
    fn new(max: f32, p: &SamplingParams) -> Self {
        Self { max, spec: WeightSpec::new(p.temperature, p.min_p) }
    }

    fn x(self, l: f32) -> f32 {
        self.spec.x(l, self.max)
    }

    fn is_candidate(self, l: f32) -> bool {
        self.spec.is_candidate(l, self.max)
    }

    /// A candidate's weight, or 0 for a token that is not one.
    fn weight(self, l: f32) -> f32 {
        self.spec.weight(l, self.max)
    }
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
            penalized: Vec::new(),
            weights: Vec::new(),
            sums: Vec::new(),
            whole_row_picks: 0,
            paths: PickPaths::default(),
        })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// How the picks so far were made.
    pub fn paths(&self) -> PickPaths {
        self.paths
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
        if self.penalized() {
            return None;
        }
        let k = if self.params.is_greedy() { 1 } else { self.params.top_k };
        (1..=MAX_DEVICE_TOP_K).contains(&k).then_some((k, self.vocab_limit))
    }

    fn penalized(&self) -> bool {
        let p = &self.params;
        p.repetition_penalty != 1.0 || p.presence_penalty != 0.0 || p.frequency_penalty != 0.0
    }

    /// [`Sampler::sample`] from the best logits only: `top` holds at least the
    /// [`Sampler::device_top_k`] largest `(id, logit)`, most likely first (ties to the lower id,
    /// NaN ranked last). The same pick as from the whole row.
    pub fn sample_top(&mut self, top: &[(u32, f32)]) -> Result<u32> {
        self.paths.top_k += 1;
        let Some((k, limit)) = self.device_top_k() else {
            return Err(Error::InvalidSampling("a top-k pick for a sampler that needs every logit".into()));
        };
        let top = &top[..k.min(top.len())];
        let max = top_max(top, limit)?;
        if self.params.is_greedy() {
            return Ok(top[0].0);
        }
        let scale = Scale::new(max, &self.params);
        let k = top.iter().take_while(|c| scale.is_candidate(c.1)).count();
        self.sample_ranked(scale, top[..k].to_vec())
    }

    /// What the next pick needs of the row when it draws from the whole row without a penalty
    /// (temperature sampling without top-k, with any top-p and min-p): the model can then sum
    /// the weights on the device ([`fp4moe_models::LanguageModel::forward_reduced`]) and
    /// [`Sampler::sample_reduced`] draws from what it returns. `None` for pickers
    /// [`Sampler::device_top_k`] covers.
    pub fn device_weights(&self) -> Option<DeviceWeights> {
        let p = &self.params;
        let whole_row = p.top_k == 0 || p.top_k >= self.vocab_limit;
        let cut_among_best = p.top_p >= 1.0 || self.whole_row_picks == 0;
        (!self.penalized() && !p.is_greedy() && whole_row && cut_among_best).then(|| DeviceWeights {
            spec: WeightSpec::new(p.temperature, p.min_p),
            // Top-p looks for its cut among the best tokens; the draw needs only the maximum.
            top: if p.top_p < 1.0 { LIST_TOP_K } else { 1 },
            vocab_limit: self.vocab_limit,
        })
    }

    /// [`Sampler::sample`] from a row reduced on the device: its best logits (at least
    /// [`DeviceWeights::top`] of them, or all) and, for a [`Sampler::device_weights`] pick, its
    /// weight sums. The same pick as from the whole row: the top-p cut from the best logits (the whole
    /// row is read only when the cut lies past them), the draw through the sums and then the
    /// one 16-token chunk it lands in.
    pub fn sample_reduced(&mut self, row: &dyn ReducedRow) -> Result<u32> {
        if self.device_top_k().is_some() {
            return self.sample_top(row.top());
        }
        let (Some(want), Some(sums)) = (self.device_weights(), row.weight_sums()) else {
            return Err(Error::InvalidSampling("a reduced pick for a sampler that needs every logit".into()));
        };
        let n = row.width();
        let top = row.top();
        if sums.len() != n.div_ceil(WEIGHT_CHUNK) || top.len() < want.top.min(n) {
            return Err(Error::BadLogits(format!(
                "a reduced row of {n} logits with {} weight sums and the best {}",
                sums.len(),
                top.len()
            )));
        }
        let max = top_max(top, n)?;
        let scale = Scale::new(max, &self.params);
        let total = total(sums.iter().map(|&s| f64::from(s)));
        if self.params.top_p < 1.0 {
            // As sample_whole: the cut among the best candidates, else (when all of those are
            // candidates) past them, which takes the whole row.
            let target = f64::from(self.params.top_p) * total;
            let best: Vec<(u32, f32)> =
                top.iter().take(LIST_TOP_K).take_while(|c| scale.is_candidate(c.1)).copied().collect();
            if let Some(cut) = ranked_cut(scale, &best, 0.0, target) {
                self.paths.weight_sums += 1;
                return self.draw_kept(scale, &best[..=cut]);
            }
            if best.len() == LIST_TOP_K {
                self.paths.weight_sums_then_row += 1;
                let logits = row.logits(0, n).map_err(|e| Error::Model(e.to_string()))?;
                return self.sample_row(&logits);
            }
        }
        self.paths.weight_sums += 1;
        let u = self.rng.next_f64() * total;
        let (c, u) = land(u, sums.iter().map(|&s| f64::from(s)).enumerate())
            .ok_or_else(|| Error::BadLogits("no token has a weight above 0".into()))?;
        let start = c * WEIGHT_CHUNK;
        let chunk =
            row.logits(start, WEIGHT_CHUNK.min(n - start)).map_err(|e| Error::Model(e.to_string()))?;
        land_in_chunk(u, chunk.iter().enumerate().map(|(i, &l)| ((start + i) as u32, scale.weight(l))))
            .ok_or_else(|| Error::BadLogits("no token has a weight above 0".into()))
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
    ///
    /// What is drawn, on every path: with x = (logit - max) / temperature, the candidates are
    /// the tokens with x >= ln(min-p) and a weight e^x above 0, ranked by logit
    /// (ties to the lower id; NaN is never a candidate); top-k keeps the k first; top-p the
    /// shortest ranked prefix whose weights reach top-p x their sum; one uniform draw then
    /// walks the kept tokens in id order (weights summed per 16 consecutive ids, then in order).
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        self.paths.whole_row += 1;
        let n = logits.len().min(self.vocab_limit);
        if n == 0 {
            return Err(Error::BadLogits("empty logits".into()));
        }
        let mut penalized = std::mem::take(&mut self.penalized);
        let row = if self.penalized() {
            penalized.clear();
            penalized.extend_from_slice(&logits[..n]);
            self.apply_penalties(&mut penalized);
            &penalized[..]
        } else {
            &logits[..n]
        };
        let picked = self.sample_row(row);
        self.penalized = penalized;
        picked
    }

    fn apply_penalties(&self, logits: &mut [f32]) {
        let p = &self.params;
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

    fn sample_row(&mut self, row: &[f32]) -> Result<u32> {
        let max = row_max(row);
        if max == f32::NEG_INFINITY {
            return Err(Error::BadLogits("every logit is NaN or -inf".into()));
        }
        if self.params.is_greedy() {
            return Ok(row.iter().position(|&l| l == max).unwrap_or(0) as u32);
        }
        let scale = Scale::new(max, &self.params);
        let k = self.params.top_k;
        if k == 0 || k >= row.len() {
            return self.sample_whole(scale, row);
        }
        self.sample_ranked(scale, best_candidates(scale, row, k))
    }

    /// The pick from the ranked candidates that top-k keeps.
    fn sample_ranked(&mut self, scale: Scale, mut kept: Vec<(u32, f32)>) -> Result<u32> {
        if self.params.top_p < 1.0 {
            let target = f64::from(self.params.top_p)
                * total(chunk_sums(&by_id(scale, &kept)).into_iter().map(|c| c.1));
            if let Some(cut) = ranked_cut(scale, &kept, 0.0, target) {
                kept.truncate(cut + 1);
            }
        }
        self.draw_kept(scale, &kept)
    }

    /// One draw over the kept tokens (any order), as over a whole row whose other weights are 0.
    fn draw_kept(&mut self, scale: Scale, kept: &[(u32, f32)]) -> Result<u32> {
        let by_id = by_id(scale, kept);
        let sums = chunk_sums(&by_id);
        let u = self.rng.next_f64() * total(sums.iter().map(|c| c.1));
        land(u, sums.into_iter())
            .and_then(|(c, u)| {
                land_in_chunk(u, by_id.iter().copied().filter(|&(id, _)| id as usize / WEIGHT_CHUNK == c))
            })
            .ok_or_else(|| Error::BadLogits("no token has a weight above 0".into()))
    }

    /// The pick over a whole row (no top-k): weights and their chunk sums, the top-p cut
    /// (weights past it set to 0), the draw.
    fn sample_whole(&mut self, scale: Scale, row: &[f32]) -> Result<u32> {
        let mut weights = std::mem::take(&mut self.weights);
        let mut sums = std::mem::take(&mut self.sums);
        weights.resize(row.len(), 0.0);
        sums.resize(row.len().div_ceil(WEIGHT_CHUNK), 0.0);
        fill_weights(scale, row, &mut weights, &mut sums, None);
        if self.params.top_p < 1.0 {
            let target = f64::from(self.params.top_p) * total(sums.iter().copied());
            // Usually the cut lies among the first few ranked tokens: draw from those alone.
            let best = best_candidates(scale, row, LIST_TOP_K);
            let cut = ranked_cut(scale, &best, 0.0, target);
            self.whole_row_picks = if cut.is_none() && best.len() == LIST_TOP_K {
                WHOLE_ROW_BACKOFF
            } else {
                self.whole_row_picks.saturating_sub(1)
            };
            if let Some(cut) = cut {
                self.weights = weights;
                self.sums = sums;
                return self.draw_kept(scale, &best[..=cut]);
            }
            if best.len() < LIST_TOP_K {
                // Rounding left the whole sum a hair below the target: keep every candidate.
            } else if let Some(cut) = cut_past(scale, row, &weights, target) {
                fill_weights(scale, row, &mut weights, &mut sums, Some(cut));
            }
        }
        let u = self.rng.next_f64() * total(sums.iter().copied());
        let picked = land(u, sums.iter().copied().enumerate()).and_then(|(c, u)| {
            let start = c * WEIGHT_CHUNK;
            let ws = &weights[start..(start + WEIGHT_CHUNK).min(weights.len())];
            land_in_chunk(u, ws.iter().enumerate().map(|(i, &w)| ((start + i) as u32, w)))
        });
        self.weights = weights;
        self.sums = sums;
        picked.ok_or_else(|| Error::BadLogits("no token has a weight above 0".into()))
    }
}

/// Ids per piece of a whole-row pass. Pieces run on rayon's threads; their size is fixed (not
/// one per thread), so every sum adds in the same order and a seed picks the same token on any
/// machine.
const PIECE: usize = 8192;

/// Each token's weight and the [`WEIGHT_CHUNK`] sums of them; with `cut` (the last token top-p
/// keeps), the weights already filled in are set to 0 past it instead.
fn fill_weights(scale: Scale, row: &[f32], weights: &mut [f32], sums: &mut [f64], cut: Option<(u32, f32)>) {
    row.par_chunks(PIECE)
        .zip(weights.par_chunks_mut(PIECE))
        .zip(sums.par_chunks_mut(PIECE / WEIGHT_CHUNK))
        .enumerate()
        .for_each(|(p, ((r, w), s))| {
            match cut {
                // The weights are there already: only those past the cut change.
                Some(_) => {}
                None => {
                    for (wi, &l) in w.iter_mut().zip(r) {
                        *wi = scale.weight(l);
                    }
                }
            }
            if let Some((cut_id, cut_l)) = cut {
                let id0 = (p * PIECE) as u32;
                for (i, (wi, &l)) in w.iter_mut().zip(r).enumerate() {
                    if l < cut_l || (l == cut_l && id0 + i as u32 > cut_id) {
                        *wi = 0.0;
                    }
                }
            }
            for (si, c) in s.iter_mut().zip(w.chunks(WEIGHT_CHUNK)) {
                *si = f64::from(chunk_sum(c.iter().copied()));
            }
        });
}

/// `(id, weight)` of ranked candidates, in id order.
fn by_id(scale: Scale, ranked: &[(u32, f32)]) -> Vec<(u32, f32)> {
    let mut v: Vec<(u32, f32)> = ranked.iter().map(|&(id, l)| (id, scale.weight(l))).collect();
    v.sort_unstable_by_key(|c| c.0);
    v
}

/// The `k` best candidates of `row`, ranked: for a small k the best so far kept in a sorted
/// list (ids arrive in increasing order, so a logit equal to the worst kept one ranks after it
/// and is skipped), for a larger one all candidates collected and selected.
fn best_candidates(scale: Scale, row: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut list: Vec<(u32, f32)>;
    if k <= LIST_TOP_K {
        // The first piece's k best bound the row's k-th logit from below; every piece then
        // collects what reaches that bound (on a shuffled row, about k per piece).
        let first = &row[..row.len().min(PIECE)];
        let mut best: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
        for (i, &l) in first.iter().enumerate() {
            if (best.len() == k && l <= best[k - 1].1) || !scale.is_candidate(l) {
                continue;
            }
            let at = best.partition_point(|&(_, kept)| kept >= l);
            best.truncate(k - 1);
            best.insert(at, (i as u32, l));
        }
        let bound = if best.len() == k { best[k - 1].1 } else { f32::NEG_INFINITY };
        list = row
            .par_chunks(PIECE)
            .enumerate()
            .skip(1)
            .flat_map_iter(|(p, r)| {
                r.iter()
                    .enumerate()
                    .filter(move |&(_, &l)| l >= bound && scale.is_candidate(l))
                    .map(move |(i, &l)| ((p * PIECE + i) as u32, l))
            })
            .collect();
        list.extend_from_slice(&best);
    } else {
        list = row
            .par_iter()
            .enumerate()
            .filter(|(_, l)| scale.is_candidate(**l))
            .map(|(i, &l)| (i as u32, l))
            .collect();
        if list.len() > k {
            list.select_nth_unstable_by(k - 1, rank_order);
        }
    }
    list.sort_unstable_by(rank_order);
    list.truncate(k);
    list
}

/// The index in `ranked` where the ranked sum of weights, starting from `before`, first
/// reaches `target`.
fn ranked_cut(scale: Scale, ranked: &[(u32, f32)], before: f64, target: f64) -> Option<usize> {
    let mut acc = before;
    ranked.iter().position(|&(_, l)| {
        acc += f64::from(scale.weight(l));
        acc >= target
    })
}

/// The last token `(id, logit)` top-p keeps over a whole row when the cut lies past the
/// [`LIST_TOP_K`] best: a histogram of the scaled logits finds the bucket where the ranked sum
/// reaches the target and only that bucket is sorted (the buckets before it are summed per
/// bucket: the same tokens, added in another order). `None`: rounding left the whole sum a
/// hair below the target, so every candidate is kept.
fn cut_past(scale: Scale, row: &[f32], weights: &[f32], target: f64) -> Option<(u32, f32)> {
    // Buckets span the candidates' own range, so a flat row spreads over all of them.
    let lowest = row
        .par_chunks(PIECE)
        .zip(weights.par_chunks(PIECE))
        .map(|(r, w)| {
            // Eight lanes, so the compiler vectorizes it.
            let mut lanes = [f32::INFINITY; 8];
            for (r, w) in r.chunks(8).zip(w.chunks(8)) {
                for ((m, &l), &w) in lanes.iter_mut().zip(r).zip(w) {
                    *m = if w > 0.0 && l < *m { l } else { *m };
                }
            }
            lanes.into_iter().fold(f32::INFINITY, |a, b| if b < a { b } else { a })
        })
        .reduce(|| f32::INFINITY, |a, b| if b < a { b } else { a });
    let per_unit = TOP_P_BUCKETS as f32 / (-scale.x(lowest)).max(f32::MIN_POSITIVE);
    // Never smaller for a smaller logit.
    // Through i32: one instruction, where a float-to-usize conversion is a branchy sequence.
    let bucket = |l: f32| ((-scale.x(l) * per_unit) as i32).clamp(0, TOP_P_BUCKETS as i32 - 1) as usize;
    let pieces: Vec<Vec<f64>> = row
        .par_chunks(PIECE)
        .zip(weights.par_chunks(PIECE))
        .map(|(r, w)| {
            let mut h = vec![0.0f64; TOP_P_BUCKETS];
            for (&l, &w) in r.iter().zip(w) {
                if w > 0.0 {
                    h[bucket(l)] += f64::from(w);
                }
            }
            h
        })
        .collect();
    // Each bucket's pieces added in piece order.
    let mut masses = vec![0.0f64; TOP_P_BUCKETS];
    for h in &pieces {
        for (m, &v) in masses.iter_mut().zip(h) {
            *m += v;
        }
    }
    let mut before = 0.0f64;
    let b = masses.iter().position(|&mass| {
        let reached = before + mass >= target;
        if !reached {
            before += mass;
        }
        reached
    })?;
    let mut list: Vec<(u32, f32)> = row
        .par_chunks(PIECE)
        .zip(weights.par_chunks(PIECE))
        .enumerate()
        .flat_map_iter(|(p, (r, w))| {
            r.iter()
                .zip(w)
                .enumerate()
                .filter(move |&(_, (&l, &w))| w > 0.0 && bucket(l) == b)
                .map(move |(i, (&l, _))| ((p * PIECE + i) as u32, l))
        })
        .collect();
    list.sort_unstable_by(rank_order);
    let cut = ranked_cut(scale, &list, before, target).unwrap_or(list.len().saturating_sub(1));
    list.get(cut).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams { seed: Some(7), ..SamplingParams::default() };
        f(&mut p);
        p
    }

    fn filters(temperature: f32, top_k: usize, top_p: f32, min_p: f32, seed: u64) -> SamplingParams {
        SamplingParams { temperature, top_k, top_p, min_p, seed: Some(seed), ..SamplingParams::default() }
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
            let p = filters(temperature, top_k, top_p, min_p, 11);
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

    /// The definition of a pick written plainly (every candidate collected and fully sorted,
    /// the filters in order, weights laid out over the whole row), which the sampler's passes
    /// (best-so-far lists, the top-p histogram, chunked sums) must reproduce draw for draw.
    /// Shared with the sampler: [`Scale`] (what x and a candidate are), the weight function
    /// and the [`WEIGHT_CHUNK`] summation (f32 per chunk, then f64 in order).
    fn reference_pick(p: &SamplingParams, logits: &[f32], rng: &mut Rng) -> Option<u32> {
        let max = logits.iter().copied().filter(|l| !l.is_nan()).fold(f32::NEG_INFINITY, f32::max);
        if max == f32::NEG_INFINITY {
            return None;
        }
        if p.is_greedy() {
            return logits.iter().position(|&l| l == max).map(|i| i as u32);
        }
        let scale = Scale::new(max, p);
        let mut ranked: Vec<(u32, f32)> = (0..logits.len())
            .filter(|&i| scale.x(logits[i]) >= scale.spec.floor)
            .map(|i| (i as u32, logits[i]))
            .collect();
        ranked.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap().then(a.0.cmp(&b.0)));
        if p.top_k > 0 {
            ranked.truncate(p.top_k);
        }
        let dense = |kept: &[(u32, f32)]| {
            let mut w = vec![0.0f32; logits.len()];
            for &(id, l) in kept {
                w[id as usize] = fp4moe_ops::sampling::weight(scale.x(l));
            }
            w
        };
        let sums = |w: &[f32]| -> Vec<f64> {
            w.chunks(WEIGHT_CHUNK).map(|c| f64::from(c.iter().fold(0.0f32, |a, &v| a + v))).collect()
        };
        if p.top_p < 1.0 {
            let target = f64::from(p.top_p) * sums(&dense(&ranked)).iter().sum::<f64>();
            let mut acc = 0.0f64;
            if let Some(cut) = ranked.iter().position(|&(_, l)| {
                acc += f64::from(fp4moe_ops::sampling::weight(scale.x(l)));
                acc >= target
            }) {
                ranked.truncate(cut + 1);
            }
        }
        let w = dense(&ranked);
        let s = sums(&w);
        let mut u = rng.next_f64() * s.iter().sum::<f64>();
        let mut landed = None;
        for (c, &cs) in s.iter().enumerate() {
            if cs > 0.0 {
                landed = Some((c, u));
            }
            if u < cs {
                landed = Some((c, u));
                break;
            }
            u -= cs;
        }
        let (c, mut u) = landed?;
        let ids = c * WEIGHT_CHUNK..((c + 1) * WEIGHT_CHUNK).min(w.len());
        for i in ids.clone() {
            u -= f64::from(w[i]);
            if w[i] > 0.0 && u < 0.0 {
                return Some(i as u32);
            }
        }
        ids.rev().find(|&i| w[i] > 0.0).map(|i| i as u32)
    }

    /// Rows that reach every path: peaked and flat, ties (across the top-k and top-p cuts),
    /// NaN, -inf and +inf, cuts inside and past the first ranked tokens.
    fn test_rows() -> Vec<(&'static str, Vec<f32>)> {
        let mut rng = Rng::new(99);
        let mut u = move || rng.next_f64() as f32;
        let mut peaked: Vec<f32> = (0..3000).map(|_| (u() - 0.5) * 12.0).collect();
        for (i, v) in [(17, 9.0), (400, 8.5), (2999, 9.0), (5, 7.0)] {
            peaked[i] = v;
        }
        peaked[3] = f32::NAN;
        peaked[8] = f32::NEG_INFINITY;
        let flat: Vec<f32> = (0..2000).map(|_| (u() * 4.0).round() * 0.25).collect();
        let mut even = vec![1.5f32; 777];
        even[100] = f32::NAN;
        let mut inf = peaked.clone();
        inf[42] = f32::INFINITY;
        inf[77] = f32::INFINITY;
        let wide: Vec<f32> = (0..5000).map(|_| (u() - 0.5) * 400.0).collect();
        // Several of the whole-row passes' pieces, with the best tokens and ties in later ones.
        let mut long: Vec<f32> = (0..2 * PIECE + 1234).map(|_| (u() * 16.0).round() * 0.125).collect();
        for (i, v) in [(PIECE + 3, 4.0), (2 * PIECE + 7, 4.0), (PIECE - 1, 3.5), (17, f32::NAN)] {
            long[i] = v;
        }
        vec![
            ("peaked", peaked),
            ("flat ties", flat),
            ("equal", even),
            ("+inf", inf),
            ("wide", wide),
            ("long", long),
        ]
    }

    #[test]
    fn the_sampler_draws_what_the_definition_draws() {
        let mut checked = 0;
        for (name, row) in test_rows() {
            for temperature in [0.0, 0.3, 1.0, 2.5] {
                for top_k in [0, 1, 5, 64, 300, 1500] {
                    for (top_p, min_p) in [(1.0, 0.0), (0.5, 0.0), (0.95, 0.0), (0.9, 0.05), (1.0, 0.2)] {
                        let p = filters(temperature, top_k, top_p, min_p, 5);
                        let mut s = Sampler::new(p.clone(), row.len()).unwrap();
                        let mut rng = Rng::new(5);
                        for draw in 0..(if row.len() > PIECE { 4 } else { 20 }) {
                            let want = reference_pick(&p, &row, &mut rng).expect("rows have a number");
                            assert_eq!(
                                s.sample(&row).unwrap(),
                                want,
                                "{name}: t {temperature} k {top_k} p {top_p} min-p {min_p}, draw {draw}"
                            );
                            checked += 1;
                        }
                    }
                }
            }
        }
        assert!(checked > 2000);
    }

    /// The same over random settings across their whole ranges (temperatures from 0.001 to 100,
    /// any top-k, top-p and min-p) and random rows of random widths and spreads.
    #[test]
    fn random_settings_draw_what_the_definition_draws() {
        let mut rng = Rng::new(2024);
        for case in 0..300 {
            let n = 1 + (rng.next_u64() % 3000) as usize;
            let spread = [0.01, 1.0, 30.0, 3000.0][(rng.next_u64() % 4) as usize];
            let mut row: Vec<f32> = (0..n).map(|_| ((rng.next_f64() - 0.5) * spread) as f32).collect();
            if n > 10 && rng.next_f64() < 0.3 {
                row[(rng.next_u64() % n as u64) as usize] = f32::NAN;
            }
            let temperature = (10f64.powf(rng.next_f64() * 5.0 - 3.0) as f32).min(MAX_TEMPERATURE);
            let top_k = [0, 1, (rng.next_u64() % 100) as usize, (rng.next_u64() % 5000) as usize][case % 4];
            let top_p = if rng.next_f64() < 0.5 { 1.0 } else { (0.01 + rng.next_f64() * 0.99) as f32 };
            let min_p = if rng.next_f64() < 0.7 { 0.0 } else { rng.next_f64() as f32 };
            let p = filters(temperature, top_k, top_p, min_p, case as u64);
            let mut s = Sampler::new(p.clone(), n).unwrap();
            let mut reference = Rng::new(case as u64);
            for draw in 0..5 {
                let want = reference_pick(&p, &row, &mut reference);
                assert_eq!(
                    s.sample(&row).ok(),
                    want,
                    "case {case}: n {n} spread {spread} {p:?}, draw {draw}"
                );
            }
        }
    }

    /// A row reduced as a model reduces it on the device (the best 64, the weight sums, chunks
    /// read on request) gives the pick the whole row gives, draw for draw, on every setting the
    /// reduced path takes; and it is refused for the settings it cannot serve.
    #[test]
    fn a_reduced_row_draws_what_the_whole_row_draws() {
        let (mut checked, mut reduced_picks) = (0, 0);
        for (name, row) in test_rows() {
            for temperature in [0.0, 0.3, 1.0, 2.5] {
                for top_k in [0, 5, 300] {
                    for (top_p, min_p) in [(1.0, 0.0), (0.5, 0.0), (0.95, 0.0), (0.9, 0.05), (1.0, 0.2)] {
                        let p = filters(temperature, top_k, top_p, min_p, 7);
                        let mut whole = Sampler::new(p.clone(), row.len()).unwrap();
                        let mut reduced = Sampler::new(p.clone(), row.len()).unwrap();
                        for draw in 0..8 {
                            let want = whole.sample(&row).unwrap();
                            // As the engine asks a model: the k a top-k pick needs, or what a
                            // whole-row pick does; else (top-k past 64, or a top-p cut past the
                            // best last time) the whole row.
                            let dw = reduced.device_weights();
                            let k = reduced.device_top_k().map(|t| t.0).or(dw.map(|w| w.top));
                            let host = fp4moe_models::HostRow::new(
                                row.clone(),
                                k.unwrap_or(LIST_TOP_K),
                                dw.map(|w| w.spec),
                            );
                            let got = match k {
                                Some(_) => reduced.sample_reduced(&host),
                                None => {
                                    assert!(
                                        reduced.sample_reduced(&host).is_err(),
                                        "{name}: served without its row"
                                    );
                                    reduced.sample(&row)
                                }
                            };
                            reduced_picks += usize::from(k.is_some());
                            assert_eq!(
                                got.unwrap(),
                                want,
                                "{name}: t {temperature} k {top_k} p {top_p} min-p {min_p}, draw {draw}"
                            );
                            checked += 1;
                        }
                    }
                }
            }
        }
        assert!(checked > 1500 && reduced_picks > 1000, "{checked} picks, {reduced_picks} reduced");
    }

    #[test]
    fn top_p_keeps_smallest_set_reaching_p() {
        // probabilities 0.5, 0.25, 0.125, 0.125 (ln-spaced logits)
        let l2 = std::f32::consts::LN_2;
        let logits = [3.0 * l2, 2.0 * l2, l2, l2];
        let h = histogram(params(|p| p.top_p = 0.7), &logits, 10_000);
        assert!(h[0] > 0.6 && h[1] > 0.25, "{h:?}");
        assert_eq!(h[2] + h[3], 0.0);
        // A flat distribution puts the cut past the first ranked tokens (the histogram path):
        // top-p 0.5 of 5000 equal tokens keeps exactly the 2500 lowest ids (ties break by id).
        let flat = vec![0.0f32; 5_000];
        let mut s = Sampler::new(params(|p| p.top_p = 0.5), flat.len()).unwrap();
        let draws: Vec<u32> = (0..2_000).map(|_| s.sample(&flat).unwrap()).collect();
        assert!(draws.iter().all(|&t| t < 2_500));
        assert!(draws.iter().any(|&t| t >= 8 * LIST_TOP_K as u32), "the cut lies past the first tokens");
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
