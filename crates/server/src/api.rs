//! OpenAI request and response bodies, and the validation that turns a request into a job.
//!
//! Unknown fields are ignored (clients send many), but a known field of the wrong type is a 400
//! naming it, as is any value outside what this server can honour.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::ApiError;

/// `stop`: one string or a list of strings.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Sampling and length fields shared by both endpoints.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct CommonParams {
    pub model: Option<String>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub seed: Option<u64>,
    /// vLLM's extension: generate exactly `max_tokens`, past any end-of-sequence token.
    #[serde(default)]
    pub ignore_eos: bool,
    pub n: Option<i64>,
    pub stop: Option<Stop>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
}

/// Message content: a string, or a list of parts of which the text parts are used.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessage>,
    #[serde(flatten)]
    pub common: CommonParams,
    /// Qwen3's thinking switch, as vLLM accepts it: `{"chat_template_kwargs": {"enable_thinking": false}}`.
    #[serde(default)]
    pub chat_template_kwargs: Option<Value>,
}

/// `prompt`: a string, a list with one string, or a list of token ids.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub prompt: Prompt,
    #[serde(flatten)]
    pub common: CommonParams,
}

/// Parses a JSON body into `T`. Syntax errors quote serde's message (with the position); a
/// known field of the wrong type is a 400 naming that field (serde's own message names only the
/// expected type).
pub fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}"), None))?;
    let Some(object) = value.as_object() else {
        return Err(ApiError::bad_request("invalid request body: expected a JSON object", None));
    };
    T::deserialize(&value).map_err(|e| match culprit::<T>(object) {
        Some(field) => ApiError::bad_request(format!("invalid `{field}`: {e}"), Some(field)),
        None => ApiError::bad_request(format!("invalid request body: {e}"), None),
    })
}

/// The field at fault: the one whose removal makes the body parse, else a required field whose
/// removal leaves only its own absence to complain about. Runs only on a failed parse, so the
/// extra work never touches a good request.
fn culprit<T: serde::de::DeserializeOwned>(object: &serde_json::Map<String, Value>) -> Option<&str> {
    let without = |key: &str| {
        let mut rest = object.clone();
        rest.remove(key);
        T::deserialize(&Value::Object(rest))
    };
    let keys = || object.keys().map(String::as_str);
    keys().find(|&k| without(k).is_ok()).or_else(|| {
        keys().find(|&k| without(k).is_err_and(|e| e.to_string().contains(&format!("missing field `{k}`"))))
    })
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Usage { prompt_tokens, completion_tokens, total_tokens: prompt_tokens + completion_tokens }
    }
}

/// Why generation ended, in OpenAI's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Stop,
    Length,
}

impl From<fp4moe_engine::FinishReason> for FinishReason {
    fn from(r: fp4moe_engine::FinishReason) -> Self {
        use fp4moe_engine::FinishReason as E;
        match r {
            E::Eos | E::StopString => FinishReason::Stop,
            // The scheduler drops cancelled jobs without a response; a cut-short one is "length".
            E::Length | E::Cancelled => FinishReason::Length,
        }
    }
}
