//! OpenAI-compatible HTTP server (skeleton).
