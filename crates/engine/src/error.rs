//! The engine's one error type. Every variant says what was wrong in words a user can act on;
//! the CLI prints them verbatim and the server maps them to 4xx/5xx.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file the engine needs could not be read or parsed.
    #[error("{}: {msg}", path.display())]
    File { path: PathBuf, msg: String },
    /// Encoding or decoding failed inside the tokenizer.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The tokenizer and the model cannot belong together.
    #[error("tokenizer does not match the model: {0}")]
    TokenizerMismatch(String),
    /// The chat template failed to parse or render (including `raise_exception` from the template).
    #[error("chat template: {0}")]
    Template(String),
    #[error("invalid sampling parameter: {0}")]
    InvalidSampling(String),
    #[error("invalid generation request: {0}")]
    InvalidRequest(String),
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("the prompt has {prompt} tokens, but the context limit is {limit} tokens")]
    PromptTooLong { prompt: usize, limit: usize },
    #[error(
        "the prompt ({prompt} tokens) plus max_tokens ({max_tokens}) exceeds the context limit of \
         {limit} tokens; lower max_tokens to at most {}",
        limit.saturating_sub(*prompt)
    )]
    ContextOverflow { prompt: usize, max_tokens: usize, limit: usize },
    #[error("token id {id} is outside the model's vocabulary of {vocab} tokens")]
    TokenOutOfRange { id: u32, vocab: usize },
    /// The model's forward pass failed.
    #[error("model: {0}")]
    Model(String),
    /// The model produced logits the sampler cannot use (wrong length, all NaN / -inf).
    #[error("model returned unusable logits: {0}")]
    BadLogits(String),
}

pub type Result<T> = std::result::Result<T, Error>;
