//! Errors as OpenAI error objects: `{"error": {"message", "type", "param", "code"}}`.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    /// The request field at fault, when one is.
    pub param: Option<String>,
    /// Seconds, for 429.
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>, param: Option<&str>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_owned),
            retry_after: None,
        }
    }
    pub fn unauthorized() -> Self {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            message: "missing or invalid API key (send `Authorization: Bearer <key>`)".into(),
            kind: "authentication_error",
            param: None,
            retry_after: None,
        }
    }
    pub fn overloaded(retry_after: u64) -> Self {
        ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: "the server's queue is full; retry later".into(),
            kind: "rate_limit_error",
            param: None,
            retry_after: Some(retry_after),
        }
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: message.into(),
            kind: "not_found_error",
            param: None,
            retry_after: None,
        }
    }
    pub fn internal(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            param: None,
            retry_after: None,
        }
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.into(),
            kind: "server_error",
            param: None,
            retry_after: None,
        }
    }

    /// An engine error: the request's fault (4xx) unless the model itself failed.
    pub fn from_engine(e: &fp4moe_engine::Error) -> Self {
        use fp4moe_engine::Error as E;
        let param = match e {
            E::InvalidSampling(_) => None,
            E::InvalidRequest(_) | E::ContextOverflow { .. } => Some("max_tokens"),
            E::EmptyPrompt | E::PromptTooLong { .. } | E::TokenOutOfRange { .. } | E::Tokenizer(_) => {
                Some("prompt")
            }
            E::Template(_) => Some("messages"),
            E::File { .. } | E::TokenizerMismatch(_) | E::Model(_) | E::BadLogits(_) => {
                return ApiError::internal(e.to_string());
            }
        };
        ApiError::bad_request(e.to_string(), param)
    }

    /// A body the server would not read: too large (413) or broken off.
    pub fn from_body(e: axum::extract::rejection::BytesRejection) -> Self {
        let status = e.status();
        let kind = if status.is_client_error() { "invalid_request_error" } else { "server_error" };
        ApiError { status, message: e.body_text(), kind, param: None, retry_after: None }
    }

    pub fn body(&self) -> serde_json::Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": null}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Engine(#[from] fp4moe_engine::Error),
    #[error("starting the scheduler thread: {0}")]
    Spawn(std::io::Error),
}
