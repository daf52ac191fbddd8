//! Tokenizer, chat template, sampling, generation (skeleton).
