//! Continuous batching. One OS thread owns the model and loops: admit queued jobs into the
//! running batch at token boundaries, run one batched forward (one new token for every decoding
//! sequence plus at most one prompt chunk), stream what each sequence produced, and drop finished
//! or cancelled jobs.
//!
//! Per-sequence logic (validation, KV cache, sampling, stop ids and strings, incremental
//! decoding) is the engine's [`SequenceState`]; this module only decides who runs in each step.
//!
//! - The queue is a bounded channel: a full queue is a 429, never unbounded memory.
//! - Prompts are prefilled in chunks of `prefill_chunk` tokens, and only one sequence prefills per
//!   step, so a long prompt delays running streams by one chunk's time per token, not by the
//!   whole prompt (and many new arrivals do not make one giant step).
//! - A job whose client went away (its event receiver dropped) is removed at the next step and
//!   its KV cache freed; a job cancelled while still queued never allocates one.
//! - Batching never changes a sequence's tokens: each sequence has its own cache and sampler, and
//!   the batched ops compute rows independently (the equivalence test checks greedy runs).

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use fp4moe_engine::{Request, SequenceState, Tokenizer, forward_batch};
use fp4moe_models::LanguageModel;
use tokio::sync::mpsc;

use crate::api::{FinishReason, Usage};
use crate::error::ApiError;
use crate::metrics::Metrics;

/// What a request handler hands the scheduler.
pub struct Job {
    pub prompt: Vec<u32>,
    pub request: Request,
    pub events: mpsc::UnboundedSender<Event>,
    pub received: Instant,
}

/// What the scheduler streams back for one job: any number of `Text`, then `Done` or `Error`.
#[derive(Debug, Clone)]
pub enum Event {
    /// Newly final text (never empty).
    Text(String),
    Done {
        finish_reason: FinishReason,
        usage: Usage,
    },
    Error(ApiError),
}

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Most sequences in one forward step.
    pub max_batch: usize,
    /// Prompt tokens per prefill step.
    pub prefill_chunk: usize,
    /// Prompt + completion limit per sequence.
    pub context_limit: usize,
}

struct Active {
    job: Job,
    state: SequenceState,
    started_decoding: bool,
}

/// Runs the loop until every sender of `jobs` is gone and the batch is empty.
pub fn run(
    model: Arc<dyn LanguageModel>,
    tokenizer: Arc<Tokenizer>,
    config: SchedulerConfig,
    mut jobs: mpsc::Receiver<Job>,
    metrics: Arc<Metrics>,
) {
    let mut active: Vec<Active> = Vec::new();
    let mut open = true;
    loop {
        // Admit at a token boundary. Block only when there is nothing to run.
        while open && active.len() < config.max_batch {
            let next = if active.is_empty() {
                metrics.running.store(0, Relaxed);
                jobs.blocking_recv()
            } else {
                match jobs.try_recv() {
                    Ok(job) => Some(job),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => None,
                }
            };
            let Some(job) = next else {
                // Every sender is gone: the server is shutting down. Finish what runs.
                open = false;
                break;
            };
            metrics.queue_depth.fetch_sub(1, Relaxed);
            if job.events.is_closed() {
                metrics.requests_cancelled.fetch_add(1, Relaxed);
                continue;
            }
            match SequenceState::new(
                model.as_ref(),
                tokenizer.clone(),
                job.prompt.clone(),
                &job.request,
                config.context_limit,
            ) {
                Ok(state) => active.push(Active { job, state, started_decoding: false }),
                // Counted as rejected by the handler, which turns this into the response.
                Err(e) => {
                    let _ = job.events.send(Event::Error(ApiError::from_engine(&e)));
                }
            }
        }

        // Cancelled jobs leave before they cost a forward step.
        active.retain(|a| {
            let gone = a.job.events.is_closed();
            if gone {
                metrics.requests_cancelled.fetch_add(1, Relaxed);
            }
            !gone
        });
        metrics.running.store(active.len() as u64, Relaxed);
        if active.is_empty() {
            if open {
                continue;
            }
            return;
        }

        // Every decoding sequence plus the first one still prefilling.
        let mut prefill_taken = false;
        let mut picked = Vec::with_capacity(active.len());
        let mut states: Vec<&mut SequenceState> = Vec::with_capacity(active.len());
        for (i, a) in active.iter_mut().enumerate() {
            if a.state.is_prefilling() {
                if prefill_taken {
                    continue;
                }
                prefill_taken = true;
            }
            picked.push(i);
            states.push(&mut a.state);
        }
        metrics.batch_size.observe(states.len() as f64);
        let result = forward_batch(model.as_ref(), &mut states, config.prefill_chunk);
        drop(states);

        let mut finished = vec![false; active.len()];
        match result {
            Ok(steps) => {
                for (&i, step) in picked.iter().zip(steps) {
                    let Some(step) = step else { continue };
                    let a = &mut active[i];
                    metrics.generated_tokens.fetch_add(1, Relaxed);
                    if !a.started_decoding {
                        a.started_decoding = true;
                        metrics.prompt_tokens.fetch_add(a.state.prompt_len() as u64, Relaxed);
                        metrics.time_to_first_token.observe(a.job.received.elapsed().as_secs_f64());
                    }
                    if !step.text.is_empty() {
                        let _ = a.job.events.send(Event::Text(step.text));
                    }
                    if let Some(reason) = step.finish {
                        finished[i] = true;
                        let usage = Usage::new(a.state.prompt_len(), a.state.generated().len());
                        metrics.requests_ok.fetch_add(1, Relaxed);
                        metrics.request_latency.observe(a.job.received.elapsed().as_secs_f64());
                        let _ = a.job.events.send(Event::Done { finish_reason: reason.into(), usage });
                    }
                }
            }
            Err(e) => {
                // A failed step fails the jobs that were in it; the others and the server go on.
                tracing::error!("batched forward failed: {e}");
                let err = ApiError::internal(format!("generation failed: {e}"));
                for &i in &picked {
                    finished[i] = true;
                    metrics.requests_failed.fetch_add(1, Relaxed);
                    let _ = active[i].job.events.send(Event::Error(err.clone()));
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
