//! Continuous batching. One OS thread owns the model and loops: admit queued jobs into the
//! running batch at token boundaries, build one batched forward (one new token for every decoding
//! sequence plus at most one prompt chunk), sample, stream, and drop finished or cancelled jobs.
//!
//! - The queue is a bounded channel: a full queue is a 429, never unbounded memory.
//! - Prompts are prefilled in chunks of `prefill_chunk` tokens, one chunk per step, so a long
//!   prompt delays running streams by one chunk's time per token, not by the whole prompt.
//! - A job whose client went away (its event receiver dropped) is removed at the next step and
//!   its KV cache freed.
//! - Batching never changes a sequence's tokens: each sequence has its own cache and sampler, and
//!   the batched ops compute rows independently (the equivalence test checks greedy runs).

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use fp4moe_engine::sampling::{Sampler, SamplingParams};
use fp4moe_engine::stop::StopStrings;
use fp4moe_engine::tokenizer::{StreamDecoder, Tokenizer};
use fp4moe_models::{LanguageModel, Sequence};
use tokio::sync::mpsc;

use crate::api::{FinishReason, Usage};
use crate::metrics::Metrics;

/// What a request handler hands the scheduler.
pub struct Job {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub events: mpsc::UnboundedSender<Event>,
    pub received: Instant,
}

/// What the scheduler streams back for one job.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Newly completed text (may be empty when a token only completed part of a character).
    Text(String),
    Done {
        finish_reason: FinishReason,
        usage: Usage,
    },
    Error(String),
}

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Most sequences in one forward step.
    pub max_batch: usize,
    /// Prompt tokens per prefill step.
    pub prefill_chunk: usize,
}

struct Active {
    job: Job,
    seq: Sequence,
    /// Prompt tokens already run through the model.
    prefilled: usize,
    /// The token to feed next while decoding.
    last: u32,
    sampler: Sampler,
    decoder: StreamDecoder,
    stops: StopStrings,
    generated: usize,
    first_token_at: Option<Instant>,
}

/// Runs the loop until every sender of `jobs` is gone and the batch is empty.
pub fn run(
    model: Arc<dyn LanguageModel>,
    tokenizer: Arc<Tokenizer>,
    stop_ids: Vec<u32>,
    config: SchedulerConfig,
    mut jobs: mpsc::Receiver<Job>,
    metrics: Arc<Metrics>,
) {
    let mut active: Vec<Active> = Vec::new();
    let mut open = true;
    loop {
        // Admit at a token boundary. Block only when there is nothing to run.
        while open && active.len() < config.max_batch {
            let next = if active.is_empty() { jobs.blocking_recv() } else { jobs.try_recv().ok() };
            let Some(job) = next else {
                // blocking_recv returning None means every sender is gone (shutdown).
                if active.is_empty() {
                    open = false;
                }
                break;
            };
            metrics.queue_depth.fetch_sub(1, Relaxed);
            match admit(model.as_ref(), job) {
                Ok(a) => active.push(a),
                Err((job, msg)) => {
                    metrics.requests_failed.fetch_add(1, Relaxed);
                    let _ = job.events.send(Event::Error(msg));
                }
            }
        }
        if active.is_empty() {
            if open {
                continue;
            }
            return;
        }
        metrics.running.store(active.len() as u64, Relaxed);

        // Cancelled jobs leave before they cost a forward step.
        active.retain(|a| {
            let gone = a.job.events.is_closed();
            if gone {
                metrics.requests_cancelled.fetch_add(1, Relaxed);
            }
            !gone
        });
        if active.is_empty() {
            continue;
        }

        // Plan the step: every decoding sequence feeds its last token; the first sequence still
        // in prefill feeds its next chunk.
        let mut chunk_owner = None;
        let plan: Vec<Vec<u32>> = active
            .iter()
            .enumerate()
            .map(|(i, a)| {
                if a.prefilled < a.job.prompt.len() {
                    if chunk_owner.is_none() {
                        chunk_owner = Some(i);
                        let end = (a.prefilled + config.prefill_chunk).min(a.job.prompt.len());
                        a.job.prompt[a.prefilled..end].to_vec()
                    } else {
                        Vec::new()
                    }
                } else {
                    vec![a.last]
                }
            })
            .collect();
        let mut batch: Vec<(&mut Sequence, &[u32])> = active
            .iter_mut()
            .zip(&plan)
            .filter(|(_, toks)| !toks.is_empty())
            .map(|(a, toks)| (&mut a.seq, toks.as_slice()))
            .collect();
        metrics.batch_size.observe(batch.len() as f64);
        let logits = match model.forward(&mut batch, false) {
            Ok(l) => l,
            Err(e) => {
                // A failed step fails every job in it; the server keeps serving new ones.
                let msg = format!("model forward failed: {e}");
                for a in active.drain(..) {
                    metrics.requests_failed.fetch_add(1, Relaxed);
                    let _ = a.job.events.send(Event::Error(msg.clone()));
                }
                continue;
            }
        };
        drop(batch);

        // Consume the logits in plan order.
        let mut logits = logits.into_iter();
        let mut finished = vec![false; active.len()];
        for (i, a) in active.iter_mut().enumerate() {
            if plan[i].is_empty() {
                continue;
            }
            let row = logits.next().expect("one logits row per planned sequence");
            if a.prefilled < a.job.prompt.len() {
                a.prefilled += plan[i].len();
                metrics.prompt_tokens.fetch_add(plan[i].len() as u64, Relaxed);
                if a.prefilled < a.job.prompt.len() {
                    continue;
                }
            }
            match step(a, &row, &tokenizer, &stop_ids, &metrics) {
                Ok(Some(reason)) => {
                    finish(a, reason, &tokenizer, &metrics);
                    finished[i] = true;
                }
                Ok(None) => {}
                Err(msg) => {
                    metrics.requests_failed.fetch_add(1, Relaxed);
                    let _ = a.job.events.send(Event::Error(msg));
                    finished[i] = true;
                }
            }
        }
        let mut i = 0;
        active.retain(|_| {
            i += 1;
            !finished[i - 1]
        });
    }
}

fn admit(model: &dyn LanguageModel, job: Job) -> Result<Active, (Job, String)> {
    let capacity = job.prompt.len() + job.max_tokens;
    let seq = match model.new_sequence(capacity) {
        Ok(s) => s,
        Err(e) => return Err((job, format!("cannot allocate a sequence of {capacity} tokens: {e}"))),
    };
    let vocab = model.info().vocab_size;
    let mut sampler = match Sampler::new(job.params.clone(), vocab) {
        Ok(s) => s,
        Err(e) => return Err((job, e.to_string())),
    };
    sampler.observe_prompt(&job.prompt);
    let stops = StopStrings::new(job.stop.clone());
    Ok(Active {
        job,
        seq,
        prefilled: 0,
        last: 0,
        sampler,
        decoder: StreamDecoder::new(),
        stops,
        generated: 0,
        first_token_at: None,
    })
}

/// Samples one token from `logits`, streams its text, and says whether the job is done.
fn step(
    a: &mut Active,
    logits: &[f32],
    tokenizer: &Tokenizer,
    stop_ids: &[u32],
    metrics: &Metrics,
) -> Result<Option<FinishReason>, String> {
    let id = a.sampler.sample(logits).map_err(|e| e.to_string())?;
    a.sampler.accept(id);
    a.last = id;
    a.generated += 1;
    metrics.generated_tokens.fetch_add(1, Relaxed);
    if a.first_token_at.is_none() {
        let now = Instant::now();
        a.first_token_at = Some(now);
        metrics.time_to_first_token.observe((now - a.job.received).as_secs_f64());
    }
    if stop_ids.contains(&id) {
        return Ok(Some(FinishReason::Stop));
    }
    let text = a.decoder.push(tokenizer, id).map_err(|e| e.to_string())?;
    let released = a.stops.push(&text);
    if !released.text.is_empty() {
        let _ = a.job.events.send(Event::Text(released.text));
    }
    if released.stopped {
        return Ok(Some(FinishReason::Stop));
    }
    if a.generated >= a.job.max_tokens {
        return Ok(Some(FinishReason::Length));
    }
    Ok(None)
}

fn finish(a: &mut Active, reason: FinishReason, tokenizer: &Tokenizer, metrics: &Metrics) {
    // Release what is still held: bytes of an unfinished character, or text that could have
    // begun a stop string (after a stop string matched, `stops` releases nothing more).
    let tail = a.decoder.flush(tokenizer).unwrap_or_default();
    let released = a.stops.push(&tail);
    let tail = if released.stopped { released.text } else { released.text + &a.stops.flush() };
    if !tail.is_empty() {
        let _ = a.job.events.send(Event::Text(tail));
    }
    let usage = Usage {
        prompt_tokens: a.job.prompt.len(),
        completion_tokens: a.generated,
        total_tokens: a.job.prompt.len() + a.generated,
    };
    metrics.requests_ok.fetch_add(1, Relaxed);
    metrics.request_latency.observe(a.job.received.elapsed().as_secs_f64());
    let _ = a.job.events.send(Event::Done { finish_reason: reason, usage });
}
