//! The models, on any [`fp4moe_ops::Backend`], and the loader that turns checkpoints into
//! uploaded weights. (Skeleton: the contract below is what the engine and server build on.)

use std::any::Any;

/// What the engine needs to know about a loaded model.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// HF `model_type`: `qwen3_moe` or `glm4_moe_lite`.
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    /// Longest sequence the model accepts (config `max_position_embeddings`).
    pub max_position_embeddings: usize,
    /// Every end-of-sequence id the config lists.
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
    /// How the weights are held: `bf16`, `mxfp4`, `nvfp4` (plus details).
    pub quantization: String,
}

/// One sequence's state (KV cache on the device, and its length). Opaque to the engine.
pub struct Sequence {
    pub state: Box<dyn Any + Send + Sync>,
    /// Tokens already in the cache.
    pub len: usize,
    /// Tokens the cache can hold.
    pub capacity: usize,
}

/// A loaded model, backend-erased so the engine and server need no generics.
pub trait LanguageModel: Send + Sync {
    fn info(&self) -> &ModelInfo;
    /// A new, empty sequence whose cache holds `capacity` tokens.
    fn new_sequence(&self, capacity: usize) -> anyhow_free::Result<Sequence>;
    /// Appends `tokens` to each sequence and runs them in one batched forward (a prefill chunk
    /// or one decode token per sequence). Returns, per sequence, the logits `[vocab]` of its last
    /// new token, or of all its new tokens (`[n, vocab]` flattened) when `all_logits`.
    fn forward(
        &self,
        batch: &mut [(&mut Sequence, &[u32])],
        all_logits: bool,
    ) -> anyhow_free::Result<Vec<Vec<f32>>>;
}

/// Placeholder for the crate's typed error (the models work defines `Error`).
pub mod anyhow_free {
    pub type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;
}
