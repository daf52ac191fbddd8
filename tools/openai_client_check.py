#!/usr/bin/env python3
"""Checks an fp4moe server with the official `openai` Python client: one non-streaming and one
streaming chat completion, each checked for shape, text, finish reason and usage.

    python3 tools/openai_client_check.py --base-url http://127.0.0.1:8000/v1 [--api-key KEY]

Exits 0 when both calls pass, 1 (with the reason on stderr) otherwise. The Rust test
`crates/server/tests/openai_client.rs` starts a server and runs this.
"""

import argparse
import sys

import openai


def fail(msg: str) -> None:
    print(f"openai_client_check: FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", required=True, help="server URL ending in /v1")
    ap.add_argument("--api-key", default="none", help="sent as the bearer token")
    ap.add_argument("--model", default=None, help="model id (default: the first /v1/models entry)")
    ap.add_argument("--max-tokens", type=int, default=8)
    args = ap.parse_args()

    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0, timeout=60)
    models = client.models.list().data
    if not models:
        fail("/v1/models lists no model")
    model = args.model or models[0].id
    messages = [{"role": "user", "content": "Say hello."}]

    whole = client.chat.completions.create(
        model=model, messages=messages, max_tokens=args.max_tokens, temperature=0, seed=1
    )
    if whole.object != "chat.completion" or len(whole.choices) != 1:
        fail(f"unexpected non-streaming response: {whole}")
    choice = whole.choices[0]
    text = choice.message.content or ""
    if choice.message.role != "assistant" or choice.finish_reason not in ("stop", "length"):
        fail(f"unexpected choice: {choice}")
    u = whole.usage
    if u is None or u.prompt_tokens < 1 or not 1 <= u.completion_tokens <= args.max_tokens:
        fail(f"bad usage: {u}")
    if u.total_tokens != u.prompt_tokens + u.completion_tokens:
        fail(f"usage does not add up: {u}")

    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=args.max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage, ids = [], None, None, set()
    for chunk in stream:
        ids.add(chunk.id)
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                pieces.append(c.delta.content)
            if c.finish_reason:
                finish = c.finish_reason
    streamed = "".join(pieces)
    if len(ids) != 1:
        fail(f"chunks of one stream carry {len(ids)} ids")
    # Greedy: the stream must say exactly what the whole response said.
    if streamed != text:
        fail(f"streamed text {streamed!r} != non-streamed {text!r}")
    if finish != choice.finish_reason:
        fail(f"streamed finish_reason {finish} != {choice.finish_reason}")
    if usage is None or usage.completion_tokens != u.completion_tokens or usage.prompt_tokens != u.prompt_tokens:
        fail(f"streamed usage {usage} != {u}")

    print(
        f"openai_client_check: ok (openai {openai.__version__}, model {model}, "
        f"{u.prompt_tokens}+{u.completion_tokens} tokens, finish {finish}, text {text!r})"
    )


if __name__ == "__main__":
    main()
