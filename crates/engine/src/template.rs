//! Chat templates: the Jinja template a HF checkpoint ships (`tokenizer_config.json`
//! `chat_template` or `chat_template.jinja`), rendered with minijinja the way transformers'
//! `apply_chat_template` renders it, so the prompt the model sees is the one it was trained on.
//!
//! What transformers provides and templates rely on: `trim_blocks` / `lstrip_blocks`, the
//! `raise_exception` function, a `tojson` that writes like Python's `json.dumps` (", " and ": "
//! separators, no HTML escaping), Python string/dict methods (`.startswith`, `.strip`, `.split`,
//! `.items()`, … from minijinja-contrib's pycompat), and the variables `messages`, `bos_token`,
//! `eos_token`, `add_generation_prompt` and template-specific switches such as Qwen3's
//! `enable_thinking`.

use std::collections::BTreeMap;

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, ErrorKind};
use serde::Serialize;

use crate::error::{Error, Result};

const NAME: &str = "chat";

/// One chat message. The server may pass richer OpenAI messages (tool calls, content parts) to
/// [`ChatTemplate::render`] as any serializable value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into() }
    }
}

/// Switches for one rendering.
#[derive(Debug, Clone, Default)]
pub struct RenderOptions {
    /// End with the header of an assistant turn, so the model continues as the assistant.
    pub add_generation_prompt: bool,
    /// Qwen3-style thinking switch; left undefined when `None` (templates test `is defined`).
    pub enable_thinking: Option<bool>,
    /// OpenAI-style tool definitions, passed as `tools` when given.
    pub tools: Option<serde_json::Value>,
}

/// A compiled chat template with the tokenizer's special-token strings.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

/// `{{ raise_exception("...") }}`: templates reject conversations they cannot format.
fn raise_exception(msg: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

/// serde_json formatter with Python's `json.dumps` default separators.
struct PythonSeparators;

impl serde_json::ser::Formatter for PythonSeparators {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first { Ok(()) } else { w.write_all(b", ") }
    }
    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first { Ok(()) } else { w.write_all(b", ") }
    }
    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=indent)`, unescaped (unlike
/// minijinja's HTML-safe one, which would turn `<` in tool arguments into `\u003c`).
fn tojson(value: &Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    // Python-only switches that do not change our output's meaning; accepted so templates run.
    let _: Option<Value> = kwargs.get("ensure_ascii")?;
    let _: Option<Value> = kwargs.get("separators")?;
    let _: Option<Value> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let mut out = Vec::new();
    let res = match indent {
        Some(n) => {
            let pad = " ".repeat(n);
            let fmt = serde_json::ser::PrettyFormatter::with_indent(pad.as_bytes());
            value.serialize(&mut serde_json::Serializer::with_formatter(&mut out, fmt))
        }
        None => value.serialize(&mut serde_json::Serializer::with_formatter(&mut out, PythonSeparators)),
    };
    res.map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    Ok(Value::from_safe_string(String::from_utf8(out).expect("serde_json writes UTF-8")))
}

impl ChatTemplate {
    /// Compiles `source`. Fails with the template's syntax error.
    pub fn new(source: &str, bos_token: Option<String>, eos_token: Option<String>) -> Result<Self> {
        let mut env = Environment::new();
        // transformers renders with these two on; whitespace-sensitive templates depend on it.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, source.to_owned()).map_err(|e| Error::Template(format!("{e:#}")))?;
        Ok(Self { env, bos_token, eos_token })
    }

    /// Renders `messages` (anything serializing to a list of `{role, content, ...}` maps).
    pub fn render<M: Serialize>(&self, messages: &[M], opts: &RenderOptions) -> Result<String> {
        let mut ctx: BTreeMap<&str, Value> = BTreeMap::new();
        ctx.insert("messages", Value::from_serialize(messages));
        ctx.insert("add_generation_prompt", Value::from(opts.add_generation_prompt));
        if let Some(t) = &self.bos_token {
            ctx.insert("bos_token", Value::from(t.as_str()));
        }
        if let Some(t) = &self.eos_token {
            ctx.insert("eos_token", Value::from(t.as_str()));
        }
        if let Some(on) = opts.enable_thinking {
            ctx.insert("enable_thinking", Value::from(on));
        }
        if let Some(tools) = &opts.tools {
            ctx.insert("tools", Value::from_serialize(tools));
        }
        let template = self.env.get_template(NAME).map_err(|e| Error::Template(format!("{e:#}")))?;
        template.render(Value::from(ctx)).map_err(|e| {
            // A template's own raise_exception message is the useful part; keep the location too.
            let detail = match e.detail() {
                Some(d) if e.kind() == ErrorKind::InvalidOperation => d.to_owned(),
                _ => format!("{e:#}"),
            };
            Error::Template(detail)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A trimmed Qwen3-style template exercising what real templates use: reverse slicing,
    /// namespace, string methods, `is defined`, tojson, raise_exception and trim/lstrip blocks.
    const QWEN_LIKE: &str = r#"{%- if tools %}
<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools>
{% endif %}
{%- set ns = namespace(last_user=-1) %}
{%- for m in messages[::-1] %}
    {%- if m.role == "user" and ns.last_user == -1 %}{% set ns.last_user = messages|length - 1 - loop.index0 %}{% endif %}
{%- endfor %}
{%- for m in messages %}
    {%- if m.role not in ["system", "user", "assistant"] %}{{ raise_exception("Unexpected role: " ~ m.role) }}{% endif %}
    {%- set content = m.content %}
    {%- if m.role == "assistant" and "</think>" in content %}
        {%- set content = content.split("</think>")[-1].lstrip("\n") %}
    {%- endif %}
<|im_start|>{{ m.role }}
{{ content.strip() }}{% if m.content.startswith("!") %} (bang){% endif %}<|im_end|>
{% endfor %}
{%- if add_generation_prompt %}
<|im_start|>assistant
{% if enable_thinking is defined and enable_thinking is false %}<think>

</think>

{% endif %}
{%- endif %}"#;

    fn qwen() -> ChatTemplate {
        ChatTemplate::new(QWEN_LIKE, None, Some("<|im_end|>".into())).unwrap()
    }

    #[test]
    fn renders_history_and_generation_prompt() {
        let msgs = [Message::new("user", " hi "), Message::new("assistant", "<think>x</think>\nhello")];
        let out = qwen().render(&msgs, &RenderOptions { add_generation_prompt: true, ..Default::default() });
        assert_eq!(
            out.unwrap(),
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn enable_thinking_false_inserts_empty_think_block() {
        let msgs = [Message::new("user", "!q")];
        let opts = RenderOptions { add_generation_prompt: true, enable_thinking: Some(false), tools: None };
        let out = qwen().render(&msgs, &opts).unwrap();
        assert!(out.contains("!q (bang)<|im_end|>"), "{out}");
        assert!(out.ends_with("<|im_start|>assistant\n<think>\n\n</think>\n\n"), "{out:?}");
        let on = RenderOptions { enable_thinking: Some(true), ..opts };
        assert!(!qwen().render(&msgs, &on).unwrap().contains("<think>"));
    }

    #[test]
    fn raise_exception_becomes_a_template_error_with_its_message() {
        let err = qwen().render(&[Message::new("tool", "x")], &RenderOptions::default()).unwrap_err();
        assert!(err.to_string().contains("Unexpected role: tool"), "{err}");
    }

    #[test]
    fn tojson_writes_like_python_json_dumps() {
        let tools = serde_json::json!([{"name": "f", "args": ["<a>", 1]}]);
        let opts = RenderOptions { tools: Some(tools), ..Default::default() };
        let out = qwen().render(&[Message::new("user", "x")], &opts).unwrap();
        assert!(out.starts_with("<tools>{\"name\": \"f\", \"args\": [\"<a>\", 1]}</tools>\n"), "{out}");
        let t = ChatTemplate::new("{{ messages[0] | tojson(indent=2) }}", None, None).unwrap();
        let out = t.render(&[Message::new("user", "x")], &RenderOptions::default()).unwrap();
        // Keys in insertion order, as Python dicts keep them.
        assert_eq!(out, "{\n  \"role\": \"user\",\n  \"content\": \"x\"\n}");
    }

    #[test]
    fn syntax_errors_are_reported_at_compile_time() {
        assert!(matches!(ChatTemplate::new("{% for %}", None, None), Err(Error::Template(_))));
    }

    #[test]
    fn byte_level_template_round_trips_through_the_byte_tokenizer() {
        let tok = crate::Tokenizer::byte_level();
        let t = tok.chat_template().unwrap();
        let out = t
            .render(
                &[Message::new("system", "be brief"), Message::new("user", "hi")],
                &RenderOptions { add_generation_prompt: true, ..Default::default() },
            )
            .unwrap();
        assert_eq!(out, "<|bos|><|system|>be brief<|eos|><|user|>hi<|eos|><|assistant|>");
        let ids = tok.encode(&out, false).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), out);
        assert!(t.render(&[Message::new("robot", "x")], &RenderOptions::default()).is_err());
    }
}
