//! The models crate's error type. Every variant carries enough context (file, tensor, key, index)
//! that the message alone tells a user what to fix; bad input is never a panic.

use std::path::PathBuf;

/// Errors from loading checkpoints and running models.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: {what} not found")]
    MissingFile { path: PathBuf, what: &'static str },
    #[error("{path}: not a valid safetensors file: {reason}")]
    Safetensors { path: PathBuf, reason: String },
    #[error("{path}: invalid shard index: {reason}")]
    BadIndex { path: PathBuf, reason: String },
    #[error("{dir}: no weights found (expected model.safetensors or model.safetensors.index.json)")]
    NoWeights { dir: PathBuf },
    #[error("tensor `{name}` not found in {dir}")]
    MissingTensor { name: String, dir: PathBuf },
    #[error("tensor `{name}` in {file}: expected shape {expected:?}, got {got:?}")]
    Shape { name: String, file: PathBuf, expected: Vec<usize>, got: Vec<usize> },
    #[error("tensor `{name}` in {file}: dtype {got} is not usable here (expected {expected})")]
    DType { name: String, file: PathBuf, expected: String, got: String },
    #[error("tensor `{name}`: {source}")]
    Fp4 {
        name: String,
        #[source]
        source: fp4::Error,
    },
    #[error("config {path}: missing key `{key}`")]
    MissingConfigKey { path: PathBuf, key: String },
    #[error("config {path}: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error("unknown model_type `{got}`; supported: {supported}")]
    UnknownModelType { got: String, supported: String },
    #[error("quantization config {path}: {reason}")]
    QuantConfig { path: PathBuf, reason: String },
    #[error("{what}: {reason}")]
    Unsupported { what: String, reason: String },
    #[error("token id {id} at position {position} is out of range (vocabulary size {vocab})")]
    TokenOutOfRange { id: u32, position: usize, vocab: usize },
    #[error("sequence of {len} tokens exceeds the limit of {max}")]
    ContextOverflow { len: usize, max: usize },
    #[error("output directory {path} already exists (pass force to replace it)")]
    OutputExists { path: PathBuf },
    /// A model-level check that fits no variant above; the message names what is wrong.
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Fp4Raw(#[from] fp4::Error),
    #[error(transparent)]
    Ops(#[from] fp4moe_ops::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An unknown `model_type`, listing what is supported.
    pub fn unknown_model_type(got: &str, supported: &[&str]) -> Error {
        Error::UnknownModelType { got: got.to_string(), supported: supported.join(", ") }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        Error::Io { path: path.into(), source }
    }

    pub(crate) fn fp4(name: impl Into<String>, source: fp4::Error) -> Error {
        Error::Fp4 { name: name.into(), source }
    }
}
