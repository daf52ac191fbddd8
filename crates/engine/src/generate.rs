//! The generation loop, built from one per-sequence state machine so that a single streaming
//! completion (the CLI) and many interleaved ones (the server's continuous batching) run the same
//! code:
//!
//! ```text
//! SequenceState::new  (validate request, check context, allocate the KV cache)
//!   loop: next_input(chunk) → LanguageModel::forward over a batch → after_forward(logits)
//!         → prefill chunks yield nothing; afterwards each call samples one token (a Step)
//!   until the Step carries a FinishReason
//! ```
//! [`forward_batch`] does one such round for any number of sequences with one model call:
//! `forward_top_k` → `after_forward_top` when every sampler needs only the best logits (greedy,
//! top-k ≤ 64 without penalties: the model reduces them on the device); else `forward_reduced`
//! → `after_forward_reduced` when the rest draw from the whole row without penalties and the
//! model sums their weights on the device (the row stays there); else `forward`;
//! [`Generator`] drives one sequence to completion with streaming callbacks and timing.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Instant;

use fp4moe_models::{LanguageModel, ReducedRow, Sequence};

use crate::error::{Error, Result};
use crate::sampling::{DeviceWeights, Sampler, SamplingParams};
use crate::stop::StopStrings;
use crate::tokenizer::{StreamDecoder, Tokenizer};
use fp4moe_ops::sampling::WeightSpec;

/// Prompt tokens per forward during prefill: large enough that the batched (GEMM) kernels run at
/// speed, small enough that a long prompt does not stall other sequences in a server batch for
/// long, and that activations stay small.
pub const DEFAULT_PREFILL_CHUNK: usize = 512;

/// What to generate for one prompt.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Request {
    pub sampling: SamplingParams,
    /// Most tokens to generate (at least 1).
    pub max_tokens: usize,
    /// Generation ends when the text contains any of these; the stop string is not part of the
    /// output.
    pub stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens (vLLM's `ignore_eos`): fixed-length runs for
    /// benchmarks and tests. The eos token is then decoded like any other.
    pub ignore_eos: bool,
}

impl Request {
    pub fn new(sampling: SamplingParams, max_tokens: usize) -> Self {
        Self { sampling, max_tokens, stop: Vec::new(), ignore_eos: false }
    }

    pub fn validate(&self) -> Result<()> {
        self.sampling.validate()?;
        if self.max_tokens == 0 {
            return Err(Error::InvalidRequest("max_tokens must be at least 1".into()));
        }
        if self.stop.iter().any(String::is_empty) {
            return Err(Error::InvalidRequest("stop strings must not be empty".into()));
        }
        Ok(())
    }
}

/// Why a sequence stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model produced an end-of-sequence token.
    Eos,
    /// The text reached one of the request's stop strings.
    StopString,
    /// `max_tokens` tokens were generated.
    Length,
    /// The caller stopped it (client gone, Ctrl-C, callback said so).
    Cancelled,
}

impl FinishReason {
    /// The OpenAI API's `finish_reason`.
    pub fn openai(self) -> &'static str {
        match self {
            FinishReason::Eos | FinishReason::StopString => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// One sampled token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub token: u32,
    /// Text that became final with this token: complete characters only, stop-string prefixes
    /// held back, the stop string itself and special tokens never included. May be empty.
    pub text: String,
    /// Set on the sequence's last step.
    pub finish: Option<FinishReason>,
}

/// Longest context a request may use: the model's `max_position_embeddings`, or a smaller
/// user-given limit (which also bounds KV-cache memory).
pub fn context_limit(model: &dyn LanguageModel, user_limit: Option<usize>) -> usize {
    let max = model.info().max_position_embeddings;
    user_limit.map_or(max, |u| u.min(max))
}

/// One sequence being generated: its KV cache, sampler, output so far and stop conditions.
pub struct SequenceState {
    seq: Sequence,
    tokenizer: Arc<Tokenizer>,
    prompt: Vec<u32>,
    /// Tokens already fed to the model (prompt first, then generated tokens).
    fed: usize,
    sampler: Sampler,
    generated: Vec<u32>,
    max_tokens: usize,
    stop_ids: Vec<u32>,
    decoder: StreamDecoder,
    stops: StopStrings,
    text: String,
    finish: Option<FinishReason>,
}

impl SequenceState {
    /// Validates `request` against the model and `context_limit` and allocates a cache sized
    /// `prompt + max_tokens`. Every way a request can be wrong is an `Err` here, before any
    /// compute.
    pub fn new(
        model: &dyn LanguageModel,
        tokenizer: Arc<Tokenizer>,
        prompt: Vec<u32>,
        request: &Request,
        context_limit: usize,
    ) -> Result<Self> {
        request.validate()?;
        let info = model.info();
        if prompt.is_empty() {
            return Err(Error::EmptyPrompt);
        }
        if let Some(&id) = prompt.iter().find(|&&id| id as usize >= info.vocab_size) {
            return Err(Error::TokenOutOfRange { id, vocab: info.vocab_size });
        }
        // The prompt must leave room for at least one generated token.
        if prompt.len() >= context_limit {
            return Err(Error::PromptTooLong { prompt: prompt.len(), limit: context_limit });
        }
        if prompt.len() + request.max_tokens > context_limit {
            return Err(Error::ContextOverflow {
                prompt: prompt.len(),
                max_tokens: request.max_tokens,
                limit: context_limit,
            });
        }
        let seq =
            model.new_sequence(prompt.len() + request.max_tokens).map_err(|e| Error::Model(e.to_string()))?;
        let mut sampler =
            Sampler::new(request.sampling.clone(), tokenizer.vocab_size().min(info.vocab_size))?;
        sampler.observe_prompt(&prompt);
        Ok(Self {
            seq,
            stop_ids: if request.ignore_eos { Vec::new() } else { tokenizer.stop_ids(info) },
            tokenizer,
            prompt,
            fed: 0,
            sampler,
            generated: Vec::new(),
            max_tokens: request.max_tokens,
            decoder: StreamDecoder::new(),
            stops: StopStrings::new(request.stop.iter().cloned()),
            text: String::new(),
            finish: None,
        })
    }

    /// True until the whole prompt is in the cache.
    pub fn is_prefilling(&self) -> bool {
        self.fed < self.prompt.len()
    }

    pub fn is_finished(&self) -> bool {
        self.finish.is_some()
    }

    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finish
    }

    pub fn prompt_len(&self) -> usize {
        self.prompt.len()
    }

    /// Ids generated so far (including a final eos token, which counts as usage).
    pub fn generated(&self) -> &[u32] {
        &self.generated
    }

    /// Text released so far.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The sampler's seed (to repeat a run that did not set one).
    pub fn seed(&self) -> u64 {
        self.sampler.seed()
    }

    /// Stops the sequence; its next [`forward_batch`] round skips it.
    pub fn cancel(&mut self) {
        if self.finish.is_none() {
            self.finish = Some(FinishReason::Cancelled);
        }
    }

    /// What the next forward must append to this sequence: up to `prefill_chunk` prompt tokens
    /// while prefilling, else the last sampled token. `None` once finished.
    pub fn next_input(&mut self, prefill_chunk: usize) -> Option<(&mut Sequence, &[u32])> {
        if self.finish.is_some() {
            return None;
        }
        let input = if self.is_prefilling() {
            let end = (self.fed + prefill_chunk.max(1)).min(self.prompt.len());
            &self.prompt[self.fed..end]
        } else {
            // Every generated token but the newest is already in the cache.
            let start = self.fed - self.prompt.len();
            &self.generated[start..]
        };
        debug_assert!(!input.is_empty(), "a running sequence always has input");
        Some((&mut self.seq, input))
    }

    /// Records that a forward appended `consumed` tokens (the whole [`Self::next_input`]) and
    /// produced `logits` for the last of them. Returns the sampled step once the prompt is done.
    pub fn after_forward(&mut self, consumed: usize, logits: &[f32]) -> Result<Option<Step>> {
        self.after_forward_with(consumed, |s| s.sample(logits))
    }

    /// [`Self::after_forward`] for a forward reduced to the best logits `top`, most likely
    /// first ([`LanguageModel::forward_top_k`]; see [`Sampler::device_top_k`]).
    pub fn after_forward_top(&mut self, consumed: usize, top: &[(u32, f32)]) -> Result<Option<Step>> {
        self.after_forward_with(consumed, |s| s.sample_top(top))
    }

    /// [`Self::after_forward`] for a forward that left the row on the device
    /// ([`LanguageModel::forward_reduced`]; see [`Sampler::sample_reduced`]).
    pub fn after_forward_reduced(&mut self, consumed: usize, row: &dyn ReducedRow) -> Result<Option<Step>> {
        self.after_forward_with(consumed, |s| s.sample_reduced(row))
    }

    /// The `after_forward` steps with the sampler's pick `pick`, made once the prompt is done.
    fn after_forward_with(
        &mut self,
        consumed: usize,
        pick: impl FnOnce(&mut Sampler) -> Result<u32>,
    ) -> Result<Option<Step>> {
        self.fed += consumed;
        if self.is_prefilling() {
            return Ok(None);
        }
        self.check_running()?;
        let token = pick(&mut self.sampler)?;
        self.push(token).map(Some)
    }

    fn check_running(&self) -> Result<()> {
        match self.finish {
            Some(_) => Err(Error::InvalidRequest("step on a finished sequence".into())),
            None => Ok(()),
        }
    }

    /// Appends the chosen token and advances the output and stop conditions.
    fn push(&mut self, token: u32) -> Result<Step> {
        self.sampler.accept(token);
        self.generated.push(token);

        let (text, finish) = if self.stop_ids.contains(&token) {
            let (text, stopped) = self.release_rest()?;
            (text, Some(if stopped { FinishReason::StopString } else { FinishReason::Eos }))
        } else {
            let piece = self.decoder.push(&self.tokenizer, token)?;
            let released = self.stops.push(&piece);
            if released.stopped {
                (released.text, Some(FinishReason::StopString))
            } else if self.generated.len() >= self.max_tokens {
                let (rest, stopped) = self.release_rest()?;
                let reason = if stopped { FinishReason::StopString } else { FinishReason::Length };
                (released.text + &rest, Some(reason))
            } else {
                (released.text, None)
            }
        };
        self.text.push_str(&text);
        self.finish = finish;
        Ok(Step { token, text, finish })
    }

    /// End of stream: whatever the decoder and the stop-string checker still hold. The bool says
    /// whether a stop string completed inside it.
    fn release_rest(&mut self) -> Result<(String, bool)> {
        let tail = self.decoder.flush(&self.tokenizer)?;
        let released = self.stops.push(&tail);
        if released.stopped {
            return Ok((released.text, true));
        }
        Ok((released.text + &self.stops.flush(), false))
    }
}

/// One round for many sequences: feeds each running sequence its next input in a single
/// [`LanguageModel::forward`], then steps each. Returns, per state, the sampled step (`None` for
/// sequences still prefilling or already finished).
pub fn forward_batch(
    model: &dyn LanguageModel,
    states: &mut [&mut SequenceState],
    prefill_chunk: usize,
) -> Result<Vec<Option<Step>>> {
    let tops: Vec<Option<(usize, usize)>> = states.iter().map(|s| s.sampler.device_top_k()).collect();
    let weights: Vec<Option<DeviceWeights>> = states.iter().map(|s| s.sampler.device_weights()).collect();
    let mut fed: Vec<Option<usize>> = Vec::with_capacity(states.len());
    let mut batch: Vec<(&mut Sequence, &[u32])> = Vec::with_capacity(states.len());
    for state in states.iter_mut() {
        match state.next_input(prefill_chunk) {
            Some((seq, input)) => {
                fed.push(Some(input.len()));
                batch.push((seq, input));
            }
            None => fed.push(None),
        }
    }
    if batch.is_empty() {
        return Ok(vec![None; states.len()]);
    }
    // When every sequence fed needs only its best logits (greedy, top-k) of the same vocabulary,
    // the model reduces them on the device: the largest k any of them asks for.
    let tops: Vec<Option<(usize, usize)>> =
        tops.into_iter().zip(&fed).filter(|(_, n)| n.is_some()).map(|(t, _)| t).collect();
    if let Some(Some((_, limit))) = tops.first()
        && tops.iter().all(|t| t.is_some_and(|(_, l)| l == *limit))
    {
        let k = tops.iter().flatten().map(|&(k, _)| k).max().unwrap_or(1);
        let picks = model.forward_top_k(&mut batch, k, *limit).map_err(|e| Error::Model(e.to_string()))?;
        drop(batch);
        return step_each(states, &fed, picks, |state, n, top| state.after_forward_top(n, &top));
    }
    // When every sequence fed either needs its best logits or draws from its whole row without
    // penalties, and the model sums weights on the device, the row stays there.
    let weights: Vec<Option<DeviceWeights>> =
        weights.into_iter().zip(&fed).filter(|(_, n)| n.is_some()).map(|(w, _)| w).collect();
    let limits: Vec<Option<usize>> =
        tops.iter().zip(&weights).map(|(t, w)| t.map(|t| t.1).or(w.map(|w| w.vocab_limit))).collect();
    if model.reduces_weights_on_device()
        && let Some(Some(limit)) = limits.first()
        && limits.iter().all(|l| *l == Some(*limit))
    {
        let k = tops
            .iter()
            .flatten()
            .map(|&(k, _)| k)
            .chain(weights.iter().flatten().map(|w| w.top))
            .max()
            .unwrap_or(1);
        let specs: Vec<Option<WeightSpec>> = weights.iter().map(|w| w.map(|w| w.spec)).collect();
        let rows =
            model.forward_reduced(&mut batch, k, *limit, &specs).map_err(|e| Error::Model(e.to_string()))?;
        drop(batch);
        return step_each(states, &fed, rows, |state, n, row| state.after_forward_reduced(n, &*row));
    }
    let logits = model.forward(&mut batch, false).map_err(|e| Error::Model(e.to_string()))?;
    drop(batch);
    let vocab = model.info().vocab_size;
    step_each(states, &fed, logits, |state, n, row| {
        if row.len() != vocab {
            return Err(Error::BadLogits(format!(
                "a logits row has {} entries, expected {vocab}",
                row.len()
            )));
        }
        state.after_forward(n, &row)
    })
}

/// Steps each state that was fed (`fed[i]`: the tokens it consumed) with its result of the
/// forward, in order; `None` for the others.
fn step_each<R>(
    states: &mut [&mut SequenceState],
    fed: &[Option<usize>],
    results: Vec<R>,
    mut step: impl FnMut(&mut SequenceState, usize, R) -> Result<Option<Step>>,
) -> Result<Vec<Option<Step>>> {
    let want = fed.iter().flatten().count();
    if results.len() != want {
        return Err(Error::BadLogits(format!(
            "forward returned {} rows for a batch of {want}",
            results.len()
        )));
    }
    let mut results = results.into_iter();
    states
        .iter_mut()
        .zip(fed)
        .map(|(state, n)| match n {
            Some(n) => step(state, *n, results.next().expect("count checked above")),
            None => Ok(None),
        })
        .collect()
}

/// Timing of one generation.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Stats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    /// Start of prefill to the logits of the last prompt token.
    pub prefill_s: f64,
    /// Start of prefill to the first sampled token.
    pub time_to_first_token_s: f64,
    /// First sampled token to the last.
    pub decode_s: f64,
}

impl Stats {
    pub fn prompt_tok_s(&self) -> f64 {
        rate(self.prompt_tokens, self.prefill_s)
    }

    /// Tokens after the first (which prefill produced) per second of decoding.
    pub fn decode_tok_s(&self) -> f64 {
        rate(self.generated_tokens.saturating_sub(1), self.decode_s)
    }
}

fn rate(n: usize, secs: f64) -> f64 {
    if n == 0 || secs <= 0.0 { 0.0 } else { n as f64 / secs }
}

/// A finished generation.
#[derive(Debug, Clone)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub text: String,
    pub finish_reason: FinishReason,
    pub seed: u64,
    pub stats: Stats,
}

/// Runs one prompt to completion on a model, streaming steps to a callback.
pub struct Generator<'m> {
    model: &'m dyn LanguageModel,
    tokenizer: Arc<Tokenizer>,
    prefill_chunk: usize,
    context_limit: usize,
}

impl<'m> Generator<'m> {
    /// Fails if the tokenizer cannot drive the model (see [`Tokenizer::check_model`]).
    pub fn new(model: &'m dyn LanguageModel, tokenizer: Arc<Tokenizer>) -> Result<Self> {
        tokenizer.check_model(model.info())?;
        Ok(Self {
            model,
            tokenizer,
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
            context_limit: context_limit(model, None),
        })
    }

    /// Lowers the context limit below the model's (never raises it).
    pub fn with_context_limit(mut self, limit: Option<usize>) -> Self {
        self.context_limit = context_limit(self.model, limit);
        self
    }

    pub fn with_prefill_chunk(mut self, chunk: usize) -> Self {
        self.prefill_chunk = chunk.max(1);
        self
    }

    pub fn context_limit(&self) -> usize {
        self.context_limit
    }

    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    /// Prefills `prompt`, then decodes until a finish condition, calling `on_step` after every
    /// sampled token. `on_step` returning `Break` cancels (finish reason `Cancelled`).
    pub fn generate(
        &self,
        prompt: &[u32],
        request: &Request,
        mut on_step: impl FnMut(&Step) -> ControlFlow<()>,
    ) -> Result<Generation> {
        let mut state = SequenceState::new(
            self.model,
            self.tokenizer.clone(),
            prompt.to_vec(),
            request,
            self.context_limit,
        )?;
        let start = Instant::now();
        let mut stats = Stats { prompt_tokens: prompt.len(), ..Stats::default() };
        let mut first_token_at = None;
        let mut last_token_at = start;
        while !state.is_finished() {
            let was_prefilling = state.is_prefilling();
            let steps = forward_batch(self.model, &mut [&mut state], self.prefill_chunk)?;
            let Some(step) = steps.into_iter().next().flatten() else { continue };
            let now = Instant::now();
            if was_prefilling {
                // The sampling time inside this round is negligible next to a forward.
                stats.prefill_s = now.duration_since(start).as_secs_f64();
            }
            first_token_at.get_or_insert(now);
            last_token_at = now;
            if on_step(&step).is_break() {
                state.cancel();
            }
        }
        if let Some(first) = first_token_at {
            stats.time_to_first_token_s = first.duration_since(start).as_secs_f64();
            stats.decode_s = last_token_at.duration_since(first).as_secs_f64();
        }
        stats.generated_tokens = state.generated().len();
        Ok(Generation {
            tokens: state.generated().to_vec(),
            text: state.text().to_owned(),
            finish_reason: state.finish_reason().expect("loop ends only when finished"),
            seed: state.seed(),
            stats,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use fp4moe_models::ModelInfo;
    use std::sync::Mutex;

    /// A deterministic stand-in model. Its cache is the token history; the logits of a position
    /// favour `(hash of the whole history) % favoured_range`, so any mistake in what was fed (a
    /// dropped or repeated chunk) changes the output. Records every forward's batch shape.
    pub(crate) struct FakeModel {
        pub info: ModelInfo,
        pub favoured_range: u32,
        /// A token whose appearance in the history makes `eos` the favourite.
        pub eos_after: Option<u32>,
        pub calls: Mutex<Vec<Vec<usize>>>,
        /// Forwards that came through `forward_top_k`, and the logit it reports for every pick
        /// (None: the real ones).
        pub top_k_calls: Mutex<usize>,
        pub top_logit: Option<f32>,
        /// Whether it offers `forward_reduced` as a GPU model does, and the forwards through it.
        pub reduces: bool,
        pub reduced_calls: Mutex<usize>,
    }

    impl FakeModel {
        pub(crate) fn new(vocab: usize, ctx: usize) -> Self {
            Self {
                info: ModelInfo {
                    model_type: "fake".into(),
                    vocab_size: vocab,
                    hidden_size: 4,
                    num_layers: 1,
                    max_position_embeddings: ctx,
                    eos_token_ids: vec![257],
                    bos_token_id: None,
                    quantization: "none".into(),
                },
                favoured_range: 128,
                eos_after: None,
                calls: Mutex::new(Vec::new()),
                top_k_calls: Mutex::new(0),
                top_logit: None,
                reduces: false,
                reduced_calls: Mutex::new(0),
            }
        }

        fn logits(&self, history: &[u32]) -> Vec<f32> {
            let h = history.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &t| {
                (h ^ u64::from(t)).wrapping_mul(0x0000_0100_0000_01b3)
            });
            let mut l: Vec<f32> =
                (0..self.info.vocab_size).map(|i| ((i as u64 * 31 + h) % 7) as f32 * 0.1).collect();
            let fav = match self.eos_after {
                Some(t) if history.contains(&t) => 257,
                _ => (h % u64::from(self.favoured_range)) as usize,
            };
            l[fav] = 10.0;
            l
        }
    }

    impl LanguageModel for FakeModel {
        fn info(&self) -> &ModelInfo {
            &self.info
        }

        fn new_sequence(&self, capacity: usize) -> fp4moe_models::Result<Sequence> {
            Ok(Sequence { state: Box::new(Vec::<u32>::new()), len: 0, capacity })
        }

        fn forward(
            &self,
            batch: &mut [(&mut Sequence, &[u32])],
            all_logits: bool,
        ) -> fp4moe_models::Result<Vec<Vec<f32>>> {
            assert!(!all_logits);
            self.calls.lock().unwrap().push(batch.iter().map(|(_, t)| t.len()).collect());
            let mut out = Vec::new();
            for (seq, tokens) in batch.iter_mut() {
                if seq.len + tokens.len() > seq.capacity {
                    return Err(fp4moe_models::Error::Invalid("cache overflow".into()));
                }
                let hist = seq.state.downcast_mut::<Vec<u32>>().unwrap();
                hist.extend_from_slice(tokens);
                seq.len = hist.len();
                out.push(self.logits(hist));
            }
            Ok(out)
        }

        fn forward_top_k(
            &self,
            batch: &mut [(&mut Sequence, &[u32])],
            k: usize,
            vocab_limit: usize,
        ) -> fp4moe_models::Result<Vec<Vec<(u32, f32)>>> {
            *self.top_k_calls.lock().unwrap() += 1;
            let rows = self.forward(batch, false)?;
            Ok(rows
                .iter()
                .map(|row| {
                    let row = &row[..vocab_limit];
                    let mut ids: Vec<usize> = (0..row.len()).collect();
                    ids.sort_by(|&a, &b| row[b].partial_cmp(&row[a]).unwrap().then(a.cmp(&b)));
                    ids[..k].iter().map(|&i| (i as u32, self.top_logit.unwrap_or(row[i]))).collect()
                })
                .collect())
        }

        fn forward_reduced(
            &self,
            batch: &mut [(&mut Sequence, &[u32])],
            k: usize,
            vocab_limit: usize,
            specs: &[Option<fp4moe_ops::sampling::WeightSpec>],
        ) -> fp4moe_models::Result<Vec<Box<dyn ReducedRow + '_>>> {
            *self.reduced_calls.lock().unwrap() += 1;
            Ok(fp4moe_models::HostRow::reduce_all(self.forward(batch, false)?, k, vocab_limit, specs))
        }

        fn reduces_weights_on_device(&self) -> bool {
            self.reduces
        }
    }

    fn tok() -> Arc<Tokenizer> {
        Arc::new(Tokenizer::byte_level())
    }

    fn greedy(max_tokens: usize) -> Request {
        Request::new(SamplingParams::greedy(), max_tokens)
    }

    fn run(model: &FakeModel, prompt: &[u32], req: &Request, chunk: usize) -> Generation {
        Generator::new(model, tok())
            .unwrap()
            .with_prefill_chunk(chunk)
            .generate(prompt, req, |_| ControlFlow::Continue(()))
            .unwrap()
    }

    /// The server moves sequences between tasks and shares the tokenizer across threads.
    #[test]
    fn states_and_tokenizer_are_send_and_sync() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<SequenceState>();
        send_sync::<Tokenizer>();
        send_sync::<Request>();
    }

    /// Greedy and top-k requests without penalties take `forward_top_k` (the device's
    /// reduction), others the full logits; both pick the same tokens, and a pick whose logit
    /// says every logit was NaN fails as the host sampler does.
    #[test]
    fn greedy_and_top_k_requests_reduce_on_the_model_side() {
        let model = FakeModel::new(300, 1024);
        let prompt: Vec<u32> = (0..9).collect();
        let fast = run(&model, &prompt, &greedy(10), 4);
        assert!(*model.top_k_calls.lock().unwrap() >= 10, "top-k forwards not taken for greedy");
        *model.top_k_calls.lock().unwrap() = 0;
        // A penalty too small to move the favourite (10.0 against at most 0.6) needs the logits.
        let mut p = SamplingParams::greedy();
        p.repetition_penalty = 1.0001;
        let full = run(&model, &prompt, &Request::new(p, 10), 4);
        assert_eq!(*model.top_k_calls.lock().unwrap(), 0, "a penalized request took the top-k forward");
        assert_eq!(fast.tokens, full.tokens);

        // Top-k sampling takes it too; plain temperature sampling needs every logit.
        let mut p =
            SamplingParams { temperature: 0.8, top_k: 20, seed: Some(3), ..SamplingParams::default() };
        run(&model, &prompt, &Request::new(p.clone(), 4), 4);
        assert!(*model.top_k_calls.lock().unwrap() >= 4, "top-k forwards not taken");
        *model.top_k_calls.lock().unwrap() = 0;
        p.top_k = 0;
        run(&model, &prompt, &Request::new(p, 4), 4);
        assert_eq!(*model.top_k_calls.lock().unwrap(), 0, "a full-vocabulary request took the top-k forward");

        let nan = FakeModel { top_logit: Some(f32::NAN), ..FakeModel::new(300, 1024) };
        let err = Generator::new(&nan, tok())
            .unwrap()
            .generate(&prompt, &greedy(3), |_| ControlFlow::Continue(()))
            .unwrap_err();
        assert!(matches!(err, Error::BadLogits(_)), "{err}");
    }

    /// Temperature and top-p sampling without top-k take `forward_reduced` when the model sums
    /// weights on the device, and draw what the whole row draws; a penalty still needs the row.
    #[test]
    fn whole_row_samplers_reduce_where_the_model_sums_weights() {
        let prompt: Vec<u32> = (0..9).collect();
        for (top_p, min_p) in [(1.0, 0.0), (0.9, 0.0), (0.5, 0.1)] {
            let p = SamplingParams {
                temperature: 1.3,
                top_p,
                min_p,
                seed: Some(11),
                ..SamplingParams::default()
            };
            let req = Request::new(p.clone(), 12);
            let full = run(&FakeModel::new(300, 1024), &prompt, &req, 4);
            let model = FakeModel { reduces: true, ..FakeModel::new(300, 1024) };
            let reduced = run(&model, &prompt, &req, 4);
            assert_eq!(reduced.tokens, full.tokens, "top-p {top_p} min-p {min_p}");
            assert!(*model.reduced_calls.lock().unwrap() >= 12, "reduced forwards not taken");
            let penalized = SamplingParams { presence_penalty: 0.5, ..p };
            let model = FakeModel { reduces: true, ..FakeModel::new(300, 1024) };
            run(&model, &prompt, &Request::new(penalized, 4), 4);
            assert_eq!(
                *model.reduced_calls.lock().unwrap(),
                0,
                "a penalized request took the reduced forward"
            );
        }
    }

    #[test]
    fn chunked_prefill_gives_the_same_tokens_as_one_chunk() {
        let model = FakeModel::new(300, 1024);
        let prompt: Vec<u32> = (0..37).map(|i| i * 3 % 256).collect();
        let whole = run(&model, &prompt, &greedy(12), 1000);
        for chunk in [1, 5, 36, 37] {
            model.calls.lock().unwrap().clear();
            let g = run(&model, &prompt, &greedy(12), chunk);
            assert_eq!(g.tokens, whole.tokens, "chunk {chunk}");
            let calls = model.calls.lock().unwrap();
            let prefill_calls = prompt.len().div_ceil(chunk);
            assert_eq!(calls.len(), prefill_calls + 11, "chunk {chunk}: then one forward per decode token");
            assert!(calls[prefill_calls..].iter().all(|c| c == &vec![1]));
        }
        assert_eq!(whole.finish_reason, FinishReason::Length);
        assert_eq!(whole.tokens.len(), 12);
        assert_eq!(whole.stats.generated_tokens, 12);
    }

    #[test]
    fn eos_stops_and_is_counted_but_not_shown() {
        let mut model = FakeModel::new(300, 1024);
        model.eos_after = Some(b'!' as u32);
        let g =
            run(&model, b"hi!".iter().map(|&b| u32::from(b)).collect::<Vec<_>>().as_slice(), &greedy(50), 8);
        assert_eq!(g.finish_reason, FinishReason::Eos);
        assert_eq!(g.tokens, vec![257]);
        assert_eq!(g.text, "");
    }

    #[test]
    fn ignore_eos_generates_exactly_max_tokens() {
        let mut model = FakeModel::new(300, 1024);
        model.eos_after = Some(b'!' as u32);
        let mut request = greedy(20);
        request.ignore_eos = true;
        let g = run(&model, b"hi!".iter().map(|&b| u32::from(b)).collect::<Vec<_>>().as_slice(), &request, 8);
        assert_eq!(g.finish_reason, FinishReason::Length);
        assert_eq!(g.tokens.len(), 20);
        assert_eq!(g.tokens[0], 257, "the eos token was the favourite and is kept");
    }

    #[test]
    fn stop_string_ends_generation_and_is_cut_from_text() {
        let model = FakeModel::new(300, 1024);
        let prompt = [1u32, 2, 3];
        let free = run(&model, &prompt, &greedy(40), 8);
        let full =
            String::from_utf8_lossy(&free.tokens.iter().map(|&t| t as u8).collect::<Vec<_>>()).into_owned();
        // Stop on two characters from the middle of the unconstrained output.
        let cut = full.char_indices().nth(10).unwrap().0;
        let stop: String = full[cut..].chars().take(2).collect();
        let mut req = greedy(40);
        req.stop = vec![stop.clone()];
        let mut streamed = String::new();
        let g = Generator::new(&model, tok())
            .unwrap()
            .generate(&prompt, &req, |s| {
                streamed.push_str(&s.text);
                ControlFlow::Continue(())
            })
            .unwrap();
        assert_eq!(g.finish_reason, FinishReason::StopString);
        let expected = &full[..full.find(&stop).unwrap()];
        assert_eq!(g.text, expected);
        assert_eq!(streamed, expected, "streamed pieces add up to the final text");
    }

    #[test]
    fn callback_break_cancels() {
        let model = FakeModel::new(300, 1024);
        let mut n = 0;
        let g = Generator::new(&model, tok())
            .unwrap()
            .generate(&[5], &greedy(100), |_| {
                n += 1;
                if n == 3 { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }
            })
            .unwrap();
        assert_eq!(g.finish_reason, FinishReason::Cancelled);
        assert_eq!(g.tokens.len(), 3);
    }

    #[test]
    fn bad_requests_fail_before_any_forward() {
        let model = FakeModel::new(300, 16);
        let g = Generator::new(&model, tok()).unwrap();
        let fails = |prompt: &[u32], req: &Request| {
            g.generate(prompt, req, |_| ControlFlow::Continue(())).unwrap_err()
        };
        assert!(matches!(fails(&[], &greedy(4)), Error::EmptyPrompt));
        assert!(matches!(fails(&[1; 16], &greedy(4)), Error::PromptTooLong { prompt: 16, limit: 16 }));
        let e = fails(&[1; 10], &greedy(7));
        assert!(matches!(e, Error::ContextOverflow { .. }));
        assert!(e.to_string().contains("at most 6"), "{e}");
        assert!(matches!(fails(&[300], &greedy(4)), Error::TokenOutOfRange { id: 300, vocab: 300 }));
        assert!(matches!(fails(&[1], &greedy(0)), Error::InvalidRequest(_)));
        let mut req = greedy(4);
        req.sampling.top_p = 0.0;
        assert!(matches!(fails(&[1], &req), Error::InvalidSampling(_)));
        let mut req = greedy(4);
        req.stop = vec![String::new()];
        assert!(matches!(fails(&[1], &req), Error::InvalidRequest(_)));
        assert!(model.calls.lock().unwrap().is_empty());
        // A user limit lowers the model's, never raises it.
        assert_eq!(Generator::new(&model, tok()).unwrap().with_context_limit(Some(8)).context_limit(), 8);
        assert_eq!(Generator::new(&model, tok()).unwrap().with_context_limit(Some(99)).context_limit(), 16);
        // The prompt plus max_tokens exactly filling the context is allowed.
        run(&model, &[1; 10], &greedy(6), 4);
    }

    #[test]
    fn tokenizer_larger_than_model_vocab_is_rejected() {
        let model = FakeModel::new(200, 64);
        let err = Generator::new(&model, tok()).err().unwrap();
        assert!(matches!(err, Error::TokenizerMismatch(_)), "{err}");
    }

    #[test]
    fn seeded_sampling_reproduces_and_batching_matches_solo() {
        let model = FakeModel::new(300, 1024);
        let req = |seed| {
            let mut r = Request::new(
                SamplingParams { temperature: 0.9, top_p: 0.95, seed: Some(seed), ..Default::default() },
                20,
            );
            r.stop.clear();
            r
        };
        let a = run(&model, &[1, 2, 3], &req(9), 2);
        let b = run(&model, &[1, 2, 3], &req(9), 2);
        assert_eq!(a.tokens, b.tokens);
        assert_eq!(a.seed, 9);

        // Three sequences with different prompts and lengths advanced together give the same
        // tokens as each alone (the server's batching equivalence, at the engine level).
        let prompts: [&[u32]; 3] = [&[1, 2, 3], &[9; 7], &[4]];
        let solo: Vec<Vec<u32>> = prompts.iter().map(|p| run(&model, p, &req(9), 2).tokens).collect();
        let mut states: Vec<SequenceState> = prompts
            .iter()
            .map(|p| SequenceState::new(&model, tok(), p.to_vec(), &req(9), 1024).unwrap())
            .collect();
        model.calls.lock().unwrap().clear();
        while states.iter().any(|s| !s.is_finished()) {
            let mut refs: Vec<&mut SequenceState> = states.iter_mut().collect();
            forward_batch(&model, &mut refs, 2).unwrap();
        }
        let batched: Vec<Vec<u32>> = states.iter().map(|s| s.generated().to_vec()).collect();
        assert_eq!(batched, solo);
        assert_eq!(
            model.calls.lock().unwrap()[0],
            vec![2, 2, 1],
            "prefill chunks and decode share a forward"
        );
    }
}
