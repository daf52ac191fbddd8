//! Text ↔ token ids: a HF `tokenizer.json` through the `tokenizers` crate, or, for synthetic models
//! that have no tokenizer, a byte-level one (one token per byte plus a few specials). Also the
//! special tokens and chat template that ship next to a tokenizer, and incremental decoding for
//! streaming.

use std::collections::BTreeSet;
use std::path::Path;

use fp4moe_models::ModelInfo;
use serde_json::Value as Json;

use crate::error::{Error, Result};
use crate::template::ChatTemplate;

/// Special tokens of the byte-level tokenizer, with ids `256..`. The roles double as chat-template
/// markers; `<|eos|>` ends a turn and the sequence.
pub const BYTE_SPECIALS: [&str; 5] = ["<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>"];
const BYTE_BOS: u32 = 256;
const BYTE_EOS: u32 = 257;

/// The chat format of the byte-level tokenizer: role marker, content, `<|eos|>`.
const BYTE_CHAT_TEMPLATE: &str = "{{ bos_token }}\
{%- for m in messages %}\
{%- if m.role not in ['system', 'user', 'assistant'] %}{{ raise_exception('unknown role: ' ~ m.role) }}{% endif %}\
<|{{ m.role }}|>{{ m.content }}{{ eos_token }}\
{%- endfor %}\
{%- if add_generation_prompt %}<|assistant|>{% endif %}";

enum Kind {
    Hf(Box<tokenizers::Tokenizer>),
    Bytes,
}

/// A tokenizer with its special tokens and (optional) chat template.
pub struct Tokenizer {
    kind: Kind,
    /// One past the largest id the tokenizer can produce (ids may be sparse).
    vocab_size: usize,
    bos_token: Option<String>,
    eos_token: Option<String>,
    /// Every id that ends generation according to the tokenizer files (`eos_token`,
    /// `generation_config.json` `eos_token_id`). The model config may add more: see
    /// [`Tokenizer::stop_ids`].
    eos_ids: BTreeSet<u32>,
    chat_template: Option<ChatTemplate>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("kind", &if self.is_byte_level() { "byte-level" } else { "tokenizer.json" })
            .field("vocab_size", &self.vocab_size)
            .field("eos_ids", &self.eos_ids)
            .finish_non_exhaustive()
    }
}

fn read_json(path: &Path) -> Result<Option<Json>> {
    match std::fs::read_to_string(path) {
        Ok(s) => serde_json::from_str(&s)
            .map(Some)
            .map_err(|e| Error::File { path: path.to_owned(), msg: format!("invalid JSON: {e}") }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::File { path: path.to_owned(), msg: e.to_string() }),
    }
}

/// `tokenizer_config.json` writes special tokens either as a string or as an AddedToken object.
fn token_string(v: Option<&Json>) -> Option<String> {
    match v? {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

/// `eos_token_id` is a single id or a list.
fn id_list(v: Option<&Json>) -> Vec<u32> {
    match v {
        Some(Json::Number(n)) => n.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
        Some(Json::Array(a)) => a.iter().filter_map(|n| n.as_u64().map(|n| n as u32)).collect(),
        _ => Vec::new(),
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json` from a model directory, with `tokenizer_config.json` (special
    /// tokens, chat template), `chat_template.jinja` (preferred over the config's template, as in
    /// transformers) and `generation_config.json` (eos ids), each optional.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(Error::File {
                path,
                msg: "not found: the model directory needs the HF tokenizer file tokenizer.json".into(),
            });
        }
        let hf = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| Error::File { path: path.clone(), msg: format!("cannot load tokenizer: {e}") })?;
        let vocab_size = hf.get_vocab(true).values().map(|&id| id as usize + 1).max().unwrap_or(0);

        let config_path = dir.join("tokenizer_config.json");
        let config = read_json(&config_path)?.unwrap_or(Json::Null);
        let bos_token = token_string(config.get("bos_token"));
        let eos_token = token_string(config.get("eos_token"));

        let mut eos_ids = BTreeSet::new();
        if let Some(id) = eos_token.as_deref().and_then(|t| hf.token_to_id(t)) {
            eos_ids.insert(id);
        }
        let gen_path = dir.join("generation_config.json");
        if let Some(gen_config) = read_json(&gen_path)? {
            eos_ids.extend(id_list(gen_config.get("eos_token_id")));
        }

        let jinja_path = dir.join("chat_template.jinja");
        let template_source = if jinja_path.is_file() {
            Some(
                std::fs::read_to_string(&jinja_path)
                    .map_err(|e| Error::File { path: jinja_path.clone(), msg: e.to_string() })?,
            )
        } else {
            match config.get("chat_template") {
                Some(Json::String(s)) => Some(s.clone()),
                // A list of named templates: the one named "default", else the first.
                Some(Json::Array(list)) => {
                    let named = |want: Option<&str>| {
                        list.iter()
                            .find(|t| want.is_none_or(|w| t.get("name").and_then(Json::as_str) == Some(w)))
                    };
                    named(Some("default"))
                        .or_else(|| named(None))
                        .and_then(|t| t.get("template"))
                        .and_then(Json::as_str)
                        .map(str::to_owned)
                }
                _ => None,
            }
        };
        let chat_template = template_source
            .map(|src| {
                ChatTemplate::new(&src, bos_token.clone(), eos_token.clone()).map_err(|e| Error::File {
                    path: if jinja_path.is_file() { jinja_path.clone() } else { config_path.clone() },
                    msg: e.to_string(),
                })
            })
            .transpose()?;

        Ok(Self { kind: Kind::Hf(Box::new(hf)), vocab_size, bos_token, eos_token, eos_ids, chat_template })
    }

    /// The byte-level tokenizer for synthetic models: ids 0..256 are bytes, then
    /// [`BYTE_SPECIALS`]. Comes with a simple chat template over its role markers.
    pub fn byte_level() -> Self {
        let bos = BYTE_SPECIALS[(BYTE_BOS - 256) as usize].to_owned();
        let eos = BYTE_SPECIALS[(BYTE_EOS - 256) as usize].to_owned();
        let template = ChatTemplate::new(BYTE_CHAT_TEMPLATE, Some(bos.clone()), Some(eos.clone()))
            .expect("the built-in byte-level chat template parses (covered by a test)");
        Self {
            kind: Kind::Bytes,
            vocab_size: 256 + BYTE_SPECIALS.len(),
            bos_token: Some(bos),
            eos_token: Some(eos),
            eos_ids: BTreeSet::from([BYTE_EOS]),
            chat_template: Some(template),
        }
    }

    pub fn is_byte_level(&self) -> bool {
        matches!(self.kind, Kind::Bytes)
    }

    /// One past the largest token id this tokenizer can produce.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// The id of a token written as text (e.g. `<|im_end|>`), if the vocabulary has it.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        match &self.kind {
            Kind::Hf(t) => t.token_to_id(token),
            Kind::Bytes => BYTE_SPECIALS.iter().position(|s| *s == token).map(|i| 256 + i as u32),
        }
    }

    /// Every id that ends generation: the tokenizer files' eos ids plus the model config's.
    pub fn stop_ids(&self, info: &ModelInfo) -> Vec<u32> {
        let mut ids = self.eos_ids.clone();
        ids.extend(info.eos_token_ids.iter().copied());
        ids.into_iter().collect()
    }

    /// Checks that this tokenizer can drive `info`'s model: every id it produces must be a row of
    /// the model's embedding. (The model may be larger: checkpoints pad the vocabulary.)
    pub fn check_model(&self, info: &ModelInfo) -> Result<()> {
        if self.vocab_size > info.vocab_size {
            return Err(Error::TokenizerMismatch(format!(
                "the tokenizer has {} token ids but the {} model's vocabulary has only {}",
                self.vocab_size, info.model_type, info.vocab_size
            )));
        }
        Ok(())
    }

    /// Text to ids. `add_special_tokens` adds what the tokenizer's post-processor adds (BOS for
    /// some models) — true for raw prompts, false for chat-template output, which already
    /// contains its special tokens. Special-token strings in `text` become their ids.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        match &self.kind {
            Kind::Hf(t) => t
                .encode(text, add_special_tokens)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| Error::Tokenizer(e.to_string())),
            Kind::Bytes => {
                let mut ids = Vec::with_capacity(text.len() + 1);
                if add_special_tokens {
                    ids.push(BYTE_BOS);
                }
                let mut rest = text;
                while !rest.is_empty() {
                    // Special markers start with '<'; everything else is bytes.
                    let special = BYTE_SPECIALS.iter().position(|s| rest.starts_with(s));
                    match special {
                        Some(i) => {
                            ids.push(256 + i as u32);
                            rest = &rest[BYTE_SPECIALS[i].len()..];
                        }
                        None => {
                            let ch_len = rest.chars().next().map_or(1, char::len_utf8);
                            ids.extend(rest.as_bytes()[..ch_len].iter().map(|&b| u32::from(b)));
                            rest = &rest[ch_len..];
                        }
                    }
                }
                Ok(ids)
            }
        }
    }

    /// Ids to text. Incomplete UTF-8 (a token sequence cut inside a character) decodes to U+FFFD.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        match &self.kind {
            Kind::Hf(t) => t.decode(ids, skip_special_tokens).map_err(|e| Error::Tokenizer(e.to_string())),
            Kind::Bytes => {
                let mut bytes = Vec::with_capacity(ids.len());
                for &id in ids {
                    match id {
                        0..256 => bytes.push(id as u8),
                        _ if skip_special_tokens => {}
                        _ => match BYTE_SPECIALS.get(id as usize - 256) {
                            Some(s) => bytes.extend_from_slice(s.as_bytes()),
                            None => {
                                return Err(Error::Tokenizer(format!(
                                    "token id {id} is outside the byte-level vocabulary of {}",
                                    self.vocab_size
                                )));
                            }
                        },
                    }
                }
                Ok(String::from_utf8_lossy(&bytes).into_owned())
            }
        }
    }
}

/// Turns a stream of token ids into a stream of text that only ever contains complete
/// characters: a byte-level BPE token (or a byte token) may end in the middle of a UTF-8
/// sequence, and decoding one token at a time would print U+FFFD for it.
///
/// Decodes a small window of recent tokens twice (with and without the newest) and releases the
/// difference once it no longer ends in U+FFFD; decoding the window rather than the lone token
/// keeps tokenizers that drop a token's leading space at the start of a decode correct.
#[derive(Debug, Clone, Default)]
pub struct StreamDecoder {
    ids: Vec<u32>,
    /// Start of the window decoded for context.
    prefix_offset: usize,
    /// Tokens before this are already released as text.
    read_offset: usize,
}

impl StreamDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `id`; returns the text that became complete (possibly empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let full = tok.decode(&self.ids[self.prefix_offset..], true)?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') {
            let new = match full.strip_prefix(prefix.as_str()) {
                Some(new) => new.to_owned(),
                // The window decoded differently with one more token (rare normalizers): release
                // what follows the old length, on a character boundary.
                None => {
                    let mut at = prefix.len();
                    while !full.is_char_boundary(at) {
                        at += 1;
                    }
                    full[at..].to_owned()
                }
            };
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(new)
        } else {
            Ok(String::new())
        }
    }

    /// Releases what is still held at the end of the stream (including U+FFFD for bytes that
    /// never completed a character).
    pub fn flush(&mut self, tok: &Tokenizer) -> Result<String> {
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let full = tok.decode(&self.ids[self.prefix_offset..], true)?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(full.strip_prefix(prefix.as_str()).map(str::to_owned).unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_round_trips_text_and_specials() {
        let t = Tokenizer::byte_level();
        let text = "héllo <|user|>日本";
        let ids = t.encode(text, false).unwrap();
        assert_eq!(ids.len(), "héllo ".len() + 1 + "日本".len());
        assert_eq!(ids[6 + 1], 256 + 3, "<|user|> is one special id");
        assert_eq!(t.decode(&ids, false).unwrap(), text);
        assert_eq!(t.decode(&ids, true).unwrap(), "héllo 日本");
        assert_eq!(t.encode("a", true).unwrap(), vec![BYTE_BOS, 97]);
        assert!(t.decode(&[9999], false).is_err());
    }

    #[test]
    fn stream_decoder_holds_partial_utf8_until_complete() {
        let t = Tokenizer::byte_level();
        let text = "a€b日";
        let mut d = StreamDecoder::new();
        let mut pieces = Vec::new();
        for id in t.encode(text, false).unwrap() {
            pieces.push(d.push(&t, id).unwrap());
        }
        // '€' is 3 bytes: two empty pushes then the whole character.
        assert_eq!(pieces, vec!["a", "", "", "€", "b", "", "", "日"]);
        assert_eq!(d.flush(&t).unwrap(), "");
        // A dangling lead byte surfaces as U+FFFD only at the end.
        let mut d = StreamDecoder::new();
        assert_eq!(d.push(&t, 0xE2).unwrap(), "");
        assert_eq!(d.flush(&t).unwrap(), "\u{FFFD}");
    }

    #[test]
    fn check_model_rejects_a_larger_tokenizer() {
        let t = Tokenizer::byte_level();
        let mut info = ModelInfo {
            model_type: "qwen3_moe".into(),
            vocab_size: 1000,
            hidden_size: 8,
            num_layers: 1,
            max_position_embeddings: 64,
            eos_token_ids: vec![7],
            bos_token_id: None,
            quantization: "bf16".into(),
        };
        t.check_model(&info).unwrap();
        assert_eq!(t.stop_ids(&info), vec![7, BYTE_EOS]);
        info.vocab_size = 100;
        let err = t.check_model(&info).unwrap_err().to_string();
        assert!(err.contains("261") && err.contains("100"), "{err}");
    }

    #[test]
    fn missing_tokenizer_json_names_the_file() {
        let dir = std::env::temp_dir().join(format!("fp4moe-engine-notok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let err = Tokenizer::from_dir(&dir).unwrap_err().to_string();
        assert!(err.contains("tokenizer.json"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
