//! The engine between a loaded model and a user: text in, streamed text out.
//!
//! - [`tokenizer`]: HF `tokenizer.json` (or a byte-level tokenizer for synthetic models), special
//!   tokens, and [`StreamDecoder`] which only ever releases complete characters.
//! - [`template`]: the checkpoint's Jinja chat template, rendered like transformers does.
//! - [`sampling`]: penalties, greedy / temperature / top-k / top-p / min-p, seeded PRNG.
//! - [`stop`]: stop strings over streamed text.
//! - [`generate`]: the per-sequence state machine ([`SequenceState`]), one batched round over
//!   many sequences ([`forward_batch`], what a continuous-batching server calls), and
//!   [`Generator`], which runs one prompt to completion with streaming and timing.
//!
//! Models are used only through [`fp4moe_models::LanguageModel`], so the engine is independent
//! of the backend and the architecture.

pub mod error;
pub mod generate;
pub mod sampling;
pub mod stop;
pub mod template;
pub mod tokenizer;

pub use error::{Error, Result};
pub use generate::{
    DEFAULT_PREFILL_CHUNK, FinishReason, Generation, Generator, Request, SequenceState, Stats, Step,
    context_limit, forward_batch,
};
pub use sampling::{DeviceWeights, PickPaths, Sampler, SamplingParams};
pub use stop::StopStrings;
pub use template::{ChatTemplate, Message, RenderOptions};
pub use tokenizer::{StreamDecoder, Tokenizer};
