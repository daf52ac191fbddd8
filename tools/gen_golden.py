#!/usr/bin/env python3
"""Generate the committed golden fixtures under testdata/golden/ and testdata/tokenizer/.

Run from the repository root with the pinned environment (tools/requirements-golden.txt):

    python3 tools/gen_golden.py

What it writes, and why each piece exists, is described in testdata/golden/README.md. In short:
tiny random-weight Hugging Face checkpoints of `qwen3_moe` and `glm4_moe_lite` (BF16), the float32
logits transformers computes from them, a ModelOpt-layout NVFP4 copy of the Qwen3 model with the
logits of its exactly dequantized weights, and two small byte-level BPE tokenizers that carry the
real Qwen3 / GLM-4.7-Flash chat templates.

Everything is deterministic: weights come from numpy's PCG64 with fixed seeds (independent of the
torch RNG), the BPE trainer is fed a fixed text, and every forward runs in float32 on the CPU.
Nothing is downloaded.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "testdata" / "golden"
TOKDIR = ROOT / "testdata" / "tokenizer"
TEMPLATES = TOKDIR / "templates"

# One vocabulary size per tokenizer; the model configs take theirs from the tokenizer so they can
# never disagree. Different sizes on purpose, so a test that mixes up the two fixtures fails.
QWEN_VOCAB = 384
GLM_VOCAB = 320

# Acceptance thresholds for a random draw (see `accept_or_retry`). A golden whose routing or argmax
# hinges on a near-tie would make a correct Rust implementation fail on float summation order.
MIN_ROUTER_MARGIN = 1e-3
MIN_ARGMAX_MARGIN = 1e-2
# The NVFP4 fixtures reuse the BF16 draw (no seed to retry), so they get a looser router bound;
# 1e-4 is still ~100x the float32 summation noise of these tiny models.
MIN_ROUTER_MARGIN_NVFP4 = 1e-4

E2M1_MAGNITUDES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=np.float32)
E4M3_MAX = 448.0
E2M1_MAX = 6.0
NVFP4_BLOCK = 16


# ----------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------

# Training text: written for this fixture. It mixes prose, code, numbers and chat-like lines so
# the learned merges look like a real byte-level BPE (spaces glued to words, digits split).
CORPUS = """
The quick brown fox jumps over the lazy dog. The dog sleeps in the sun, and the fox runs into the forest.
A mixture of experts model routes every token to a few experts. Each expert is a small feed forward network.
The router computes a score for every expert, keeps the top scores, and mixes the chosen experts' outputs.
Quantization stores each weight in four bits: a sign, two exponent bits and one mantissa bit.
Blocks of sixteen or thirty two values share one scale, so the memory traffic drops by a factor of four.
Hello world! Hello there. How are you today? I am fine, thank you. What is the weather like in Paris?
It is sunny in Paris and rainy in London. The temperature is 21 degrees, and tomorrow it will be 18.
def forward(self, hidden_states):
    residual = hidden_states
    hidden_states = self.norm(hidden_states)
    return residual + self.mlp(hidden_states)
fn main() { let x = 42; println!("{}", x + 1); }
for i in range(10): print(i * i)
User: Please write a short poem about the sea.
Assistant: The sea is wide, the sea is deep, it sings the sailors all to sleep.
User: Think step by step. What is 17 times 23?
Assistant: 17 times 20 is 340, and 17 times 3 is 51, so the answer is 391.
The attention layer compares every query with every key, and the softmax turns the scores into weights.
Rotary position embeddings rotate pairs of dimensions by an angle that grows with the position.
The latent cache keeps a compressed key and value per token, which saves a lot of memory for long prompts.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 2024 2025 3.14159 2.71828 1e-6 0.5 -1.25
Les experts choisissent les jetons. Die Experten wählen die Token. Los expertos eligen los tokens.
""".strip()

# Qwen2/Qwen3 and GLM-4 pre-tokenizer regexes (the published tokenizer.json values); GLM splits
# digit runs into groups of up to three, Qwen into single digits.
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
GLM_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)

# (content, special). Order = id order after the learned vocabulary, as in the real tokenizers,
# where all added tokens sit at the end of the id space. `special=False` tokens (think/tool tags)
# stay visible when decoding with skip_special_tokens, like the real Qwen3 tokenizer.
QWEN_ADDED = [
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
]
GLM_ADDED = [
    ("<|endoftext|>", True),
    ("[MASK]", True),
    ("[gMASK]", True),
    ("[sMASK]", True),
    ("<sop>", True),
    ("<eop>", True),
    ("<|system|>", True),
    ("<|user|>", True),
    ("<|assistant|>", True),
    ("<|observation|>", True),
    ("<think>", False),
    ("</think>", False),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<arg_key>", False),
    ("</arg_key>", False),
    ("<arg_value>", False),
    ("</arg_value>", False),
]


def build_tokenizer(vocab_size: int, split_regex: str, added: list[tuple[str, bool]]) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split_regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(added),
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator([CORPUS], trainer=trainer)
    learned = tok.get_vocab_size()
    if learned != vocab_size - len(added):
        raise SystemExit(f"BPE learned {learned} tokens, wanted {vocab_size - len(added)}: extend CORPUS")
    tok.add_tokens(
        [AddedToken(t, special=s, normalized=False, single_word=False, lstrip=False, rstrip=False)
         for t, s in added]
    )
    assert tok.get_vocab_size() == vocab_size
    return tok


def write_tokenizer(out: Path, tok: Tokenizer, added, cfg_extra: dict, template: str,
                    template_file: bool) -> dict[str, int]:
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t, _ in added}
    decoder = {
        str(ids[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": s}
        for t, s in added
    }
    cfg = {"added_tokens_decoder": decoder, **cfg_extra, "chat_template": template}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    if template_file:
        # Newer HF repos (GLM-4.7-Flash among them) ship the template as its own file.
        (out / "chat_template.jinja").write_text(template)
    return ids


CHAT_CASES = [
    {"name": "single_user_gen", "messages": [{"role": "user", "content": "Hello world"}],
     "add_generation_prompt": True},
    {"name": "system_user_gen_no_thinking",
     "messages": [{"role": "system", "content": "You are a helpful assistant."},
                  {"role": "user", "content": "What is 17 times 23?"}],
     "add_generation_prompt": True, "enable_thinking": False},
    {"name": "multi_turn_with_reasoning",
     "messages": [{"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "<think>\nThe user greets me.\n</think>\n\nHello! How are you?"},
                  {"role": "user", "content": "Fine, thanks."}],
     "add_generation_prompt": True},
    {"name": "tool_call_round_trip",
     "tools": [{"type": "function", "function": {
         "name": "get_weather", "description": "Get the weather for a city",
         "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}],
     "messages": [{"role": "user", "content": "Weather in Paris?"},
                  {"role": "assistant", "content": "",
                   "tool_calls": [{"type": "function",
                                   "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                  {"role": "tool", "content": "{\"temp\": 21}"}],
     "add_generation_prompt": True},
    {"name": "no_generation_prompt",
     "messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there."}],
     "add_generation_prompt": False},
]


def render_cases(out: Path, tok: Tokenizer, template: str) -> None:
    """Render each case with transformers' own chat-template machinery (Jinja2), then encode it.

    The Rust engine renders with minijinja; these are the strings and ids it must reproduce.
    """
    from transformers.utils.chat_template_utils import render_jinja_template

    cases = []
    for case in CHAT_CASES:
        kwargs = {k: v for k, v in case.items() if k not in ("name", "messages", "add_generation_prompt")}
        # The `tojson` filter here is transformers' (json.dumps, insertion order, ", "/": "
        # separators, no HTML escaping); minijinja's built-in differs, so the tools case pins it.
        rendered, _ = render_jinja_template(
            conversations=[case["messages"]], chat_template=template,
            add_generation_prompt=case["add_generation_prompt"], **kwargs,
        )
        text = rendered[0]
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids, skip_special_tokens=False) == text, f"round trip failed for {case['name']}"
        cases.append({**case, "rendered": text, "ids": ids})
    (out / "expected_render.json").write_text(json.dumps({"cases": cases}, indent=2, ensure_ascii=False) + "\n")


def make_tokenizers() -> dict:
    qwen_tpl = (TEMPLATES / "qwen3.jinja").read_text()
    glm_tpl = (TEMPLATES / "glm4_7_flash.jinja").read_text()

    qtok = build_tokenizer(QWEN_VOCAB, QWEN_SPLIT, QWEN_ADDED)
    qids = write_tokenizer(
        TOKDIR / "qwen3", qtok, QWEN_ADDED,
        {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
         "errors": "replace", "add_prefix_space": False, "clean_up_tokenization_spaces": False,
         "split_special_tokens": False, "model_max_length": 4096, "tokenizer_class": "Qwen2Tokenizer"},
        qwen_tpl, template_file=False,
    )
    render_cases(TOKDIR / "qwen3", qtok, qwen_tpl)

    gtok = build_tokenizer(GLM_VOCAB, GLM_SPLIT, GLM_ADDED)
    gids = write_tokenizer(
        TOKDIR / "glm", gtok, GLM_ADDED,
        {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "do_lower_case": False,
         "clean_up_tokenization_spaces": False, "remove_space": False, "model_max_length": 4096,
         "padding_side": "left", "tokenizer_class": "PreTrainedTokenizerFast"},
        glm_tpl, template_file=True,
    )
    render_cases(TOKDIR / "glm", gtok, glm_tpl)
    return {"qwen": (qtok, qids), "glm": (gtok, gids)}


# ----------------------------------------------------------------------------------------------
# Random weights
# ----------------------------------------------------------------------------------------------

def bf16_exact(a: np.ndarray) -> torch.Tensor:
    """float32 tensor whose values are exactly representable in bfloat16 (RNE rounding)."""
    return torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16).to(torch.float32)


def init_weights(model: torch.nn.Module, seed: int, bias_std: float = 0.0) -> None:
    """Overwrite every parameter/buffer with seeded values of a healthy scale.

    transformers' default init (std 0.02) gives near-zero logits and ties everywhere; here linear
    layers get std 1/sqrt(fan_in) so activations stay O(1), norms get weights near (but not) one so
    a missing norm weight is visible, and the GLM correction bias is large enough to move routing.
    """
    rng = np.random.Generator(np.random.PCG64(seed))
    state = model.state_dict()
    with torch.no_grad():
        for name in sorted(state):
            t = state[name]
            shape = tuple(t.shape)
            if name.endswith("e_score_correction_bias"):
                v = rng.normal(0.0, bias_std, shape)
            elif "norm" in name:
                v = 1.0 + rng.normal(0.0, 0.2, shape)
            elif name.endswith("embed_tokens.weight"):
                v = rng.normal(0.0, 1.0, shape)
            elif name.endswith("mlp.gate.weight"):
                # Router: logits of std ~2 so the softmax / sigmoid scores are well spread.
                v = rng.normal(0.0, 2.0 / np.sqrt(shape[-1]), shape)
            elif name.endswith("lm_head.weight"):
                v = rng.normal(0.0, 3.0 / np.sqrt(shape[-1]), shape)
            elif len(shape) >= 2:
                v = rng.normal(0.0, 1.0 / np.sqrt(shape[-1]), shape)
            else:
                raise SystemExit(f"no init rule for {name} {shape}")
            t.copy_(bf16_exact(v).to(t.dtype))


# ----------------------------------------------------------------------------------------------
# Router re-computation (to check margins and that the features under test actually matter)
# ----------------------------------------------------------------------------------------------

def capture_router_inputs(model, router_cls) -> tuple[list, list]:
    captured, handles = [], []
    for name, mod in model.named_modules():
        if isinstance(mod, router_cls):
            layer = int(name.split(".")[2])
            handles.append(mod.register_forward_hook(
                lambda m, args, out, layer=layer: captured.append((layer, args[0].detach().clone()))))
    return captured, handles


def qwen_route(x: torch.Tensor, w: torch.Tensor, top_k: int):
    logits = x.reshape(-1, x.shape[-1]).double() @ w.double().T
    probs = torch.softmax(logits, dim=-1)
    srt = probs.sort(dim=-1, descending=True)
    margin = (srt.values[:, top_k - 1] - srt.values[:, top_k]).min().item()
    idx = srt.indices[:, :top_k]
    wts = probs.gather(1, idx)
    wts = wts / wts.sum(-1, keepdim=True)
    return idx, wts, margin


def glm_route(x, w, bias, top_k, n_group, topk_group, scale, use_bias=True, use_groups=True):
    """Plain restatement of Glm4MoeLiteTopkRouter in float64, returning decision margins too."""
    scores = torch.sigmoid(x.reshape(-1, x.shape[-1]).double() @ w.double().T)
    choice = scores + (bias.double() if use_bias else 0.0)
    n_tok, n_exp = choice.shape
    margins = []
    if use_groups:
        grouped = choice.view(n_tok, n_group, n_exp // n_group)
        gscore = grouped.topk(2, dim=-1).values.sum(-1)
        gs = gscore.sort(dim=-1, descending=True)
        margins.append((gs.values[:, topk_group - 1] - gs.values[:, topk_group]).min().item())
        keep = torch.zeros_like(gscore, dtype=torch.bool)
        keep.scatter_(1, gs.indices[:, :topk_group], True)
        mask = keep.unsqueeze(-1).expand(-1, -1, n_exp // n_group).reshape(n_tok, n_exp)
        choice = choice.masked_fill(~mask, float("-inf"))
    cs = choice.sort(dim=-1, descending=True)
    margins.append((cs.values[:, top_k - 1] - cs.values[:, top_k]).min().item())
    idx = cs.indices[:, :top_k]
    wts = scores.gather(1, idx)
    wts = wts / (wts.sum(-1, keepdim=True) + 1e-20) * scale
    return idx, wts, min(margins)


def sets(idx: torch.Tensor) -> list[list[int]]:
    return [sorted(r) for r in idx.tolist()]


# ----------------------------------------------------------------------------------------------
# Forward + expected.json
# ----------------------------------------------------------------------------------------------

def load_f32(cls, path: Path):
    model, info = cls.from_pretrained(
        str(path), dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}  # missing/unexpected/mismatched keys, errors
    if bad:
        raise SystemExit(f"loading {path} was not clean: {bad}")
    return model.eval()


def run_sequences(model, sequences, router_cls):
    captured, handles = capture_router_inputs(model, router_cls)
    runs = []
    with torch.no_grad():
        for ids in sequences:
            captured.clear()
            out = model(input_ids=torch.tensor([ids]), use_cache=False, output_hidden_states=True)
            runs.append({
                "logits": out.logits[0].float(),
                "hidden_states": [h[0].float() for h in out.hidden_states],
                "router_inputs": sorted(list(captured), key=lambda c: c[0]),
            })
    for h in handles:
        h.remove()
    return runs


def argmax_margin(logits: torch.Tensor) -> float:
    top2 = logits.double().topk(2, dim=-1).values
    return (top2[:, 0] - top2[:, 1]).min().item()


def f32_list(t: torch.Tensor):
    # Shortest decimal that round-trips the float32 value (numpy's float32 str), so the file stays
    # small and parsing it back (to f64, then to f32) yields the identical f32.
    a = t.detach().to(torch.float32).numpy()
    if a.ndim == 0:
        return float(str(a))
    return [f32_list(torch.from_numpy(r)) for r in a] if a.ndim > 1 else [float(str(v)) for v in a]


def write_expected(path: Path, meta: dict, sequences, runs, routing) -> None:
    doc = {
        **meta,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__.split("+")[0],
        "compute": "float32 CPU forward of the checkpoint's weights upcast to float32, eager attention",
        "sequences": [],
    }
    for ids, run, route in zip(sequences, runs, routing):
        doc["sequences"].append({
            "ids": ids,
            "argmax": run["logits"].argmax(-1).tolist(),
            "logits": f32_list(run["logits"]),
            # layers+1 entries (transformers' convention): [0] embeddings, [i] for 1 <= i < layers the
            # output of layer i-1, [layers] the final-norm output (the last layer's raw output is
            # not included).
            "hidden_states": [f32_list(h) for h in run["hidden_states"]],
            "routing": route,
        })
    path.write_text(json.dumps(doc, separators=(",", ":")) + "\n")


# ----------------------------------------------------------------------------------------------
# Qwen3-MoE
# ----------------------------------------------------------------------------------------------

def qwen_config(tok_ids: dict[str, int]):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=QWEN_VOCAB,
        hidden_size=64,
        intermediate_size=128,  # unused (no dense layers) but present in the real config
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        # head_dim != hidden/heads (=16) on purpose: the real model has 128 with 2048/32 = 64.
        head_dim=32,
        hidden_act="silu",
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        tie_word_embeddings=False,
        attention_bias=False,
        use_sliding_window=False,
        decoder_sparse_step=1,
        moe_intermediate_size=32,
        num_experts_per_tok=2,
        num_experts=8,
        norm_topk_prob=True,
        mlp_only_layers=[],
        bos_token_id=tok_ids["<|endoftext|>"],
        eos_token_id=tok_ids["<|im_end|>"],
        pad_token_id=tok_ids["<|endoftext|>"],
    )


def make_qwen(tok: Tokenizer, tok_ids: dict[str, int]):
    from transformers import Qwen3MoeForCausalLM
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    cfg = qwen_config(tok_ids)
    text_ids = tok.encode("<|im_start|>user\nHello world<|im_end|>\n<|im_start|>assistant\n").ids
    rng = np.random.Generator(np.random.PCG64(1234))
    rand_ids = [0, QWEN_VOCAB - 1] + rng.integers(0, QWEN_VOCAB, 5).tolist()
    sequences = [text_ids, rand_ids]

    out = GOLDEN / "qwen3_moe"
    for attempt in range(50):
        seed = 1000 + attempt
        torch.manual_seed(seed)
        model = Qwen3MoeForCausalLM(cfg).to(torch.float32)
        init_weights(model, seed)
        model = model.to(torch.bfloat16)
        if out.exists():
            shutil.rmtree(out)
        # Small shards so the fixture exercises model.safetensors.index.json.
        model.save_pretrained(str(out), max_shard_size="100KB")
        gen = transformers.GenerationConfig(
            bos_token_id=tok_ids["<|endoftext|>"], pad_token_id=tok_ids["<|endoftext|>"],
            eos_token_id=[tok_ids["<|im_end|>"], tok_ids["<|endoftext|>"]])
        gen.save_pretrained(str(out))
        ref = load_f32(Qwen3MoeForCausalLM, out)
        runs = run_sequences(ref, sequences, Qwen3MoeTopKRouter)
        routing, router_margin = [], float("inf")
        for run in runs:
            per_layer = {}
            for layer, x in run["router_inputs"]:
                w = ref.model.layers[layer].mlp.gate.weight
                idx, wts, margin = qwen_route(x, w, cfg.num_experts_per_tok)
                router_margin = min(router_margin, margin)
                per_layer[str(layer)] = {"experts": idx.tolist(), "weights": f32_list(wts.float())}
            routing.append(per_layer)
        am = min(argmax_margin(r["logits"]) for r in runs)
        if router_margin >= MIN_ROUTER_MARGIN and am >= MIN_ARGMAX_MARGIN:
            break
        print(f"qwen3_moe seed {seed}: router margin {router_margin:.2e}, argmax margin {am:.2e}; retrying")
    else:
        raise SystemExit("no qwen3_moe seed met the margins")

    shards = sorted(p.name for p in out.glob("*.safetensors"))
    if len(shards) < 2 or not (out / "model.safetensors.index.json").exists():
        raise SystemExit(f"qwen3_moe was not sharded: {shards}")
    cache_err = check_cache_consistency(ref, sequences, "qwen3_moe")
    write_expected(out / "expected.json", {
        "model_type": "qwen3_moe", "seed": seed,
        "min_router_margin": router_margin, "min_argmax_margin": am,
        "hf_cached_decode_rel_err": cache_err,
    }, sequences, runs, routing)
    print(f"qwen3_moe: seed {seed}, shards {shards}, router margin {router_margin:.3e}, argmax margin {am:.3e}")
    return out, sequences, seed


# ----------------------------------------------------------------------------------------------
# GLM-4.7-Flash (glm4_moe_lite)
# ----------------------------------------------------------------------------------------------

GLM_BIAS_STD = 0.25


def glm_config(tok_ids: dict[str, int]):
    from transformers import Glm4MoeLiteConfig

    return Glm4MoeLiteConfig(
        vocab_size=GLM_VOCAB,
        hidden_size=64,
        intermediate_size=96,  # layer 0 (dense SwiGLU)
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,  # MLA: every head has its own expanded k/v
        n_shared_experts=1,
        n_routed_experts=16,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=1.8,
        norm_topk_prob=True,
        kv_lora_rank=32,
        q_lora_rank=48,
        qk_rope_head_dim=16,
        qk_nope_head_dim=24,
        v_head_dim=32,
        hidden_act="silu",
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        rope_interleave=True,
        mlp_layer_types=["dense", "sparse", "sparse"],
        tie_word_embeddings=False,
        attention_bias=False,
        bos_token_id=tok_ids["[gMASK]"],
        pad_token_id=tok_ids["<|endoftext|>"],
        eos_token_id=[tok_ids["<|endoftext|>"], tok_ids["<|user|>"], tok_ids["<|observation|>"]],
    )


def make_glm(tok: Tokenizer, tok_ids: dict[str, int]):
    from transformers import Glm4MoeLiteForCausalLM
    from transformers.models.glm4_moe_lite.modeling_glm4_moe_lite import Glm4MoeLiteTopkRouter

    cfg = glm_config(tok_ids)
    text_ids = tok.encode("[gMASK]<sop><|user|>Hello world<|assistant|><think>").ids
    rng = np.random.Generator(np.random.PCG64(4321))
    rand_ids = [GLM_VOCAB - 1, 0] + rng.integers(0, GLM_VOCAB, 6).tolist()
    sequences = [text_ids, rand_ids]

    out = GOLDEN / "glm4_moe_lite"
    for attempt in range(50):
        seed = 2000 + attempt
        torch.manual_seed(seed)
        model = Glm4MoeLiteForCausalLM(cfg).to(torch.float32)
        init_weights(model, seed, bias_std=GLM_BIAS_STD)
        model = model.to(torch.bfloat16)
        # The published checkpoint stores the correction bias as F32 (everything else BF16); keep
        # that layout. Its values are bf16-exact, so either dtype gives the same numbers.
        for mod in model.modules():
            if isinstance(mod, Glm4MoeLiteTopkRouter):
                mod.e_score_correction_bias.data = mod.e_score_correction_bias.data.to(torch.float32)
        if out.exists():
            shutil.rmtree(out)
        model.save_pretrained(str(out))
        ref = load_f32(Glm4MoeLiteForCausalLM, out)
        runs = run_sequences(ref, sequences, Glm4MoeLiteTopkRouter)
        routing, router_margin = [], float("inf")
        tokens = changed_by_bias = changed_by_groups = 0
        for run in runs:
            per_layer = {}
            for layer, x in run["router_inputs"]:
                gate = ref.model.layers[layer].mlp.gate
                args = (x, gate.weight, gate.e_score_correction_bias, cfg.num_experts_per_tok,
                        cfg.n_group, cfg.topk_group, cfg.routed_scaling_factor)
                idx, wts, margin = glm_route(*args)
                no_bias, _, _ = glm_route(*args, use_bias=False)
                no_groups, _, _ = glm_route(*args, use_groups=False)
                router_margin = min(router_margin, margin)
                sel = sets(idx)
                tokens += len(sel)
                changed_by_bias += sum(a != b for a, b in zip(sel, sets(no_bias)))
                changed_by_groups += sum(a != b for a, b in zip(sel, sets(no_groups)))
                per_layer[str(layer)] = {"experts": idx.tolist(), "weights": f32_list(wts.float()),
                                         "experts_without_bias": no_bias.tolist()}
            routing.append(per_layer)
        am = min(argmax_margin(r["logits"]) for r in runs)
        ok = (router_margin >= MIN_ROUTER_MARGIN and am >= MIN_ARGMAX_MARGIN
              and 0 < changed_by_bias < tokens and 0 < changed_by_groups < tokens)
        if ok:
            break
        print(f"glm4_moe_lite seed {seed}: router margin {router_margin:.2e}, argmax margin {am:.2e}, "
              f"bias changes {changed_by_bias}/{tokens}, groups change {changed_by_groups}/{tokens}; retrying")
    else:
        raise SystemExit("no glm4_moe_lite seed met the margins")

    # Our router restatement must agree with the transformers module it checks.
    for run, route in zip(runs, routing):
        for layer, x in run["router_inputs"]:
            with torch.no_grad():
                _, _, hf_idx = ref.model.layers[layer].mlp.gate(x)
            ours = route[str(layer)]["experts"]
            assert sets(hf_idx) == [sorted(r) for r in ours], f"router restatement disagrees, layer {layer}"

    cache_err = check_cache_consistency(ref, sequences, "glm4_moe_lite")
    write_expected(out / "expected.json", {
        "model_type": "glm4_moe_lite", "seed": seed, "hf_cached_decode_rel_err": cache_err,
        "min_router_margin": router_margin, "min_argmax_margin": am,
        "router_tokens": tokens, "selections_changed_by_correction_bias": changed_by_bias,
        "selections_changed_by_group_limit": changed_by_groups,
    }, sequences, runs, routing)
    print(f"glm4_moe_lite: seed {seed}, router margin {router_margin:.3e}, argmax margin {am:.3e}, "
          f"bias changes {changed_by_bias}/{tokens}, group limit changes {changed_by_groups}/{tokens}")
    return out, sequences, seed


# ----------------------------------------------------------------------------------------------
# NVFP4 (ModelOpt layout)
# ----------------------------------------------------------------------------------------------

def e2m1_codes(x: np.ndarray) -> np.ndarray:
    """Round float32 values to E2M1 codes: nearest, ties to even code, saturating at +-6."""
    a = np.minimum(np.abs(x), E2M1_MAX).astype(np.float64)
    d = np.abs(a[..., None] - E2M1_MAGNITUDES.astype(np.float64))
    dmin = d.min(-1, keepdims=True)
    idx = np.arange(8)
    tied = d == dmin
    even = np.where(tied & (idx % 2 == 0), idx, 99).min(-1)
    any_ = np.where(tied, idx, 99).min(-1)
    mag = np.where(even < 99, even, any_).astype(np.uint8)
    return mag | np.where(np.signbit(x), 8, 0).astype(np.uint8)


def e2m1_values(codes: np.ndarray) -> np.ndarray:
    v = E2M1_MAGNITUDES[codes & 7]
    return np.where(codes & 8, -v, v).astype(np.float32)


def check_e2m1_against_ml_dtypes() -> str:
    ties = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, 100.0, -0.25, -0.75, -2.5, -5.0, 0.0,
                     -0.0, 0.1, 5.9, -6.5], dtype=np.float32)
    rng = np.random.Generator(np.random.PCG64(7))
    xs = np.concatenate([ties, rng.normal(0, 3, 20000).astype(np.float32)])
    ours = e2m1_codes(xs)
    want = {0.25: 0.0, 0.75: 1.0, 1.25: 1.0, 2.5: 2.0, 5.0: 4.0, 7.0: 6.0}
    for x, v in want.items():
        assert e2m1_values(e2m1_codes(np.array([x], np.float32)))[0] == v, x
    try:
        import ml_dtypes
    except ImportError:
        return "ml_dtypes not installed: E2M1 rounding checked against DESIGN.md's tie cases only"
    theirs = xs.astype(ml_dtypes.float4_e2m1fn).view(np.uint8) & 0xF
    if not np.array_equal(ours, theirs):
        bad = np.nonzero(ours != theirs)[0][:5]
        raise SystemExit(f"E2M1 rounding disagrees with ml_dtypes at {xs[bad]}: {ours[bad]} vs {theirs[bad]}")
    return f"E2M1 rounding equals ml_dtypes {ml_dtypes.__version__} on {xs.size} values (incl. ties)"


def nvfp4_quantize(w: np.ndarray, s2: np.float32):
    """ModelOpt NVFP4 for one [out, in] matrix with a (possibly shared) tensor scale s2.

    Returns (packed u8 [out, in/2], e4m3 scales [out, in/16] as torch.float8_e4m3fn, dequantized f32).
    """
    out_f, in_f = w.shape
    blocks = w.reshape(out_f, in_f // NVFP4_BLOCK, NVFP4_BLOCK).astype(np.float32)
    bamax = np.abs(blocks).max(-1)
    scale_f32 = (bamax / (np.float32(E2M1_MAX) * s2)).astype(np.float32)
    scale_f32[scale_f32 == 0] = 1.0  # an all-zero block: any scale works, ModelOpt uses 1
    scale_e4m3 = torch.from_numpy(scale_f32).to(torch.float8_e4m3fn)
    scale_back = scale_e4m3.to(torch.float32).numpy()
    if not np.all(np.isfinite(scale_back)) or np.any(scale_back == 0):
        raise SystemExit("E4M3 block scale underflowed/overflowed")
    denom = (scale_back * s2).astype(np.float32)[..., None]
    codes = e2m1_codes((blocks / denom).astype(np.float32)).reshape(out_f, in_f)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)  # element 2j low nibble
    deq = ((e2m1_values(codes).reshape(out_f, in_f // NVFP4_BLOCK, NVFP4_BLOCK)
            * scale_back[..., None]) * s2).astype(np.float32).reshape(out_f, in_f)
    return packed, scale_e4m3, deq


def verify_nvfp4_file(path: Path, deq_tensors: dict, quantized: set) -> None:
    """Decode the written file independently of the quantizer (ml_dtypes tables when available)."""
    try:
        import ml_dtypes

        def fp4(codes):
            return codes.astype(np.uint8).view(ml_dtypes.float4_e2m1fn).astype(np.float32)
    except ImportError:
        fp4 = e2m1_values
    with safe_open(str(path), "pt") as st:
        for n in sorted(quantized):
            packed = st.get_tensor(n + ".weight").numpy()
            lo, hi = packed & 0xF, packed >> 4
            codes = np.stack([lo, hi], axis=-1).reshape(packed.shape[0], -1)
            sc = st.get_tensor(n + ".weight_scale").to(torch.float32).numpy()
            s2 = st.get_tensor(n + ".weight_scale_2").item()
            assert st.get_tensor(n + ".input_scale").item() > 0
            w = fp4(codes).reshape(codes.shape[0], -1, NVFP4_BLOCK) * sc[..., None]
            w = (w * np.float32(s2)).astype(np.float32).reshape(codes.shape)
            if not np.array_equal(w, deq_tensors[n + ".weight"].numpy()):
                raise SystemExit(f"{n}: file does not decode to the reference weights")


def check_cache_consistency(model, sequences, name: str) -> float:
    """Token-by-token decode through transformers' cache must reproduce the full forward."""
    worst = 0.0
    with torch.no_grad():
        for ids in sequences:
            full = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
            out = model(input_ids=torch.tensor([ids[:1]]), use_cache=True)
            steps, cache = [out.logits[0, -1]], out.cache
            for t in ids[1:]:
                out = model(input_ids=torch.tensor([[t]]), cache=cache, use_cache=True)
                steps.append(out.logits[0, -1])
                cache = out.cache
            inc = torch.stack(steps)
            worst = max(worst, (torch.linalg.norm(inc - full) / torch.linalg.norm(full)).item())
    if worst > 1e-5:
        raise SystemExit(f"{name}: cached decode differs from full forward by {worst}")
    return worst


def qwen_nvfp4_plan(cfg: dict):
    """ModelOpt-style plan for qwen3_moe: fused groups (sharing weight_scale_2) and exclude_modules."""
    # transformers 5 writes num_local_experts; published Qwen3 checkpoints say num_experts.
    n_experts = cfg.get("num_experts", cfg.get("num_local_experts"))
    groups = []
    for l in range(cfg["num_hidden_layers"]):
        a = f"model.layers.{l}.self_attn."
        groups.append([a + "q_proj", a + "k_proj", a + "v_proj"])
        groups.append([a + "o_proj"])
        for e in range(n_experts):
            m = f"model.layers.{l}.mlp.experts.{e}."
            groups.append([m + "gate_proj", m + "up_proj"])
            groups.append([m + "down_proj"])
    # A glob like the ones ModelOpt writes (e.g. "model.layers.0.self_attn*"): fnmatch-style, `*`
    # also matches dots; matched against the module name (tensor name without ".weight").
    return groups, ["lm_head", "model.layers.*.mlp.gate"]


def glm_nvfp4_plan(cfg: dict):
    """Mirrors the published GLM-4.7-Flash NVFP4 export: MLA projections other than o_proj stay
    BF16 and are listed one by one; the router (not an nn.Linear in transformers) is simply absent
    from exclude_modules yet not quantized."""
    groups, exclude = [], ["lm_head"]
    for l, kind in enumerate(cfg["mlp_layer_types"]):
        a = f"model.layers.{l}.self_attn."
        exclude += [a + n for n in ("kv_a_proj_with_mqa", "kv_b_proj", "q_a_proj", "q_b_proj")]
        groups.append([a + "o_proj"])
        mlps = [f"model.layers.{l}.mlp."] if kind == "dense" else (
            [f"model.layers.{l}.mlp.experts.{e}." for e in range(cfg["n_routed_experts"])]
            + [f"model.layers.{l}.mlp.shared_experts."])
        for m in mlps:
            groups.append([m + "gate_proj", m + "up_proj"])
            groups.append([m + "down_proj"])
    return groups, exclude


def make_nvfp4(src: Path, out_name: str, model_cls, router_cls, plan, sequences) -> None:
    e2m1_note = check_e2m1_against_ml_dtypes()
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                tensors[k] = st.get_tensor(k)
    cfg = json.loads((src / "config.json").read_text())
    groups, exclude = plan(cfg)
    quantized = {name for g in groups for name in g}
    missing = [n + ".weight" for n in quantized if n + ".weight" not in tensors]
    if missing:
        raise SystemExit(f"expected linears missing from {src}: {missing[:4]}")

    # input_scale is activation-calibration metadata (amax/(6*448)); the W4A16 reference below does
    # not quantize activations, so it only has to be a plausible positive scalar. Calibrated on the
    # golden sequences: each nn.Linear's own input, and the MoE block input for fused experts.
    ref = load_f32(model_cls, src)
    amax = {}

    def record(key):
        def hook(mod, args):
            amax[key] = max(amax.get(key, 0.0), args[0].abs().max().item())
        return hook

    hs = []
    for name, mod in ref.named_modules():
        if isinstance(mod, torch.nn.Linear) or name.endswith("mlp.experts"):
            hs.append(mod.register_forward_pre_hook(record(name)))
    run_sequences(ref, sequences, router_cls)
    for h in hs:
        h.remove()

    def input_amax(n: str) -> float:
        if n in amax:
            return amax[n]
        experts = n[: n.index("mlp.experts.") + len("mlp.experts")]
        return amax[experts]

    out_tensors, deq_tensors = {}, {}
    for k, v in tensors.items():
        base = k[: -len(".weight")] if k.endswith(".weight") else None
        if base in quantized:
            continue
        out_tensors[k] = v  # as stored (embeddings, norms, router, excluded linears, lm_head)
        deq_tensors[k] = v.to(torch.float32)
    for g in groups:
        ws = [tensors[n + ".weight"].to(torch.float32).numpy() for n in g]
        s2 = np.float32(max(np.abs(w).max() for w in ws) / np.float32(E2M1_MAX * E4M3_MAX))
        for n, w in zip(g, ws):
            packed, sc, deq = nvfp4_quantize(w, s2)
            in_scale = np.float32(input_amax(n) / (E2M1_MAX * E4M3_MAX))
            out_tensors[n + ".weight"] = torch.from_numpy(packed)  # [out, in/2] u8
            out_tensors[n + ".weight_scale"] = sc  # [out, in/16] F8_E4M3
            out_tensors[n + ".weight_scale_2"] = torch.tensor(s2, dtype=torch.float32)  # [] f32
            out_tensors[n + ".input_scale"] = torch.tensor(in_scale, dtype=torch.float32)  # [] f32
            deq_tensors[n + ".weight"] = torch.from_numpy(deq)

    out = GOLDEN / out_name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    save_file(dict(sorted(out_tensors.items())), str(out / "model.safetensors"), metadata={"format": "pt"})
    producer = {"name": "modelopt", "version": "0.37.0"}
    (out / "hf_quant_config.json").write_text(json.dumps({
        "producer": producer,
        "quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": None, "group_size": 16,
                         "exclude_modules": exclude},
    }, indent=4) + "\n")
    qcfg = dict(cfg)
    qcfg["quantization_config"] = {
        "config_groups": {"group_0": {
            "input_activations": {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16},
            "weights": {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16},
            "targets": ["Linear"]}},
        "ignore": exclude,
        "quant_algo": "NVFP4",
        "producer": producer,
        "quant_method": "modelopt",
    }
    (out / "config.json").write_text(json.dumps(qcfg, indent=2, sort_keys=True) + "\n")
    shutil.copy(src / "generation_config.json", out / "generation_config.json")
    verify_nvfp4_file(out / "model.safetensors", deq_tensors, quantized)

    # Reference: the same architecture with every quantized weight replaced by its exact
    # dequantized value, loaded through transformers from an f32 checkpoint (tmp, not committed).
    with tempfile.TemporaryDirectory() as tmp:
        save_file(deq_tensors, str(Path(tmp) / "model.safetensors"), metadata={"format": "pt"})
        shutil.copy(src / "config.json", Path(tmp) / "config.json")
        dq = load_f32(model_cls, Path(tmp))
        runs = run_sequences(dq, sequences, router_cls)
        cache_err = check_cache_consistency(dq, sequences, out_name)
    routing, router_margin = [], float("inf")
    for run in runs:
        per_layer = {}
        for layer, x in run["router_inputs"]:
            gate = dq.model.layers[layer].mlp.gate
            if cfg["model_type"] == "qwen3_moe":
                idx, wts, margin = qwen_route(x, gate.weight, cfg["num_experts_per_tok"])
            else:
                idx, wts, margin = glm_route(x, gate.weight, gate.e_score_correction_bias,
                                             cfg["num_experts_per_tok"], cfg["n_group"], cfg["topk_group"],
                                             cfg["routed_scaling_factor"])
            router_margin = min(router_margin, margin)
            per_layer[str(layer)] = {"experts": idx.tolist(), "weights": f32_list(wts.float())}
        routing.append(per_layer)
    am = min(argmax_margin(r["logits"]) for r in runs)
    if am < MIN_ARGMAX_MARGIN or router_margin < MIN_ROUTER_MARGIN_NVFP4:
        raise SystemExit(f"{out_name} reference has a near-tie: argmax {am}, router {router_margin}")
    bf16 = json.loads((src / "expected.json").read_text())
    rel = [float(torch.linalg.norm(r["logits"] - torch.tensor(b["logits"])) / torch.linalg.norm(torch.tensor(b["logits"])))
           for r, b in zip(runs, bf16["sequences"])]
    write_expected(out / "expected.json", {
        "model_type": cfg["model_type"], "quantization": "NVFP4 (ModelOpt layout), W4A16 reference",
        "source": f"{src.name} (same weights before quantization)",
        "e2m1_check": e2m1_note, "min_router_margin": router_margin, "min_argmax_margin": am,
        "hf_cached_decode_rel_err": cache_err, "rel_l2_vs_bf16_logits": rel,
    }, sequences, runs, routing)
    print(f"{out_name}: router margin {router_margin:.3e}, argmax margin {am:.3e}, rel L2 vs bf16 logits {['%.3f' % r for r in rel]}; {e2m1_note}")


# ----------------------------------------------------------------------------------------------
# Independent numpy restatement of both models, written from DESIGN.md (not from transformers).
# It must reproduce transformers' logits; if it does, the golden numbers mean what DESIGN says,
# and the Rust implementation (which follows DESIGN) has a fair target.
# ----------------------------------------------------------------------------------------------

def load_np(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint dir as float64 (NVFP4 linears decoded with ml_dtypes' tables)."""
    raw = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                raw[k] = st.get_tensor(k)
    out = {}
    for k, t in raw.items():
        if k.endswith((".weight_scale", ".weight_scale_2", ".input_scale")):
            continue
        if t.dtype == torch.uint8:
            import ml_dtypes

            base = k[: -len(".weight")]
            p = t.numpy()
            codes = np.stack([p & 0xF, p >> 4], axis=-1).reshape(p.shape[0], -1)
            vals = codes.view(ml_dtypes.float4_e2m1fn).astype(np.float64)
            sc = raw[base + ".weight_scale"].to(torch.float32).numpy().astype(np.float64)
            s2 = float(raw[base + ".weight_scale_2"])
            out[k] = (vals.reshape(p.shape[0], -1, NVFP4_BLOCK) * sc[..., None] * s2).reshape(codes.shape)
        else:
            out[k] = t.to(torch.float64).numpy()
    return out


def np_rms(x, w, eps):
    return w * (x / np.sqrt((x * x).mean(-1, keepdims=True) + eps))


def np_silu(x):
    return x / (1.0 + np.exp(-x))


def np_softmax(x, axis=-1):
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def np_causal_attention(q, k, v, scale):
    """q [H, T, D], k [H, T, D], v [H, T, Dv] -> [T, H*Dv]."""
    t = q.shape[1]
    s = np.einsum("htd,hsd->hts", q, k) * scale
    s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
    o = np.einsum("hts,hsd->htd", np_softmax(s), v)
    return o.transpose(1, 0, 2).reshape(t, -1)


def rope_neox(x, pos, theta):
    """Rotate-half RoPE over the last dim (pairs (i, i + d/2))."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
    ang = pos[:, None] * inv[None, :]  # [T, d/2]
    c, s = np.cos(ang), np.sin(ang)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1)


def rope_interleaved(x, pos, theta):
    """GPT-J RoPE: pairs (2i, 2i+1) rotated by frequency i, written back in place."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
    ang = pos[:, None] * inv[None, :]
    c, s = np.cos(ang), np.sin(ang)
    out = np.empty_like(x)
    out[..., 0::2] = x[..., 0::2] * c - x[..., 1::2] * s
    out[..., 1::2] = x[..., 1::2] * c + x[..., 0::2] * s
    return out


def np_swiglu(x, w, prefix):
    return np_silu(x @ w[prefix + "gate_proj.weight"].T) * (x @ w[prefix + "up_proj.weight"].T) \
        @ w[prefix + "down_proj.weight"].T


def np_qwen3_moe(w, cfg, ids):
    n_exp = cfg.get("num_experts", cfg.get("num_local_experts"))
    theta = cfg["rope_parameters"]["rope_theta"]
    nh, nkv, hd, eps = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"], cfg["rms_norm_eps"]
    x = w["model.embed_tokens.weight"][ids]
    t = len(ids)
    pos = np.arange(t, dtype=np.float64)
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}."
        h = np_rms(x, w[p + "input_layernorm.weight"], eps)
        q = (h @ w[p + "self_attn.q_proj.weight"].T).reshape(t, nh, hd)
        k = (h @ w[p + "self_attn.k_proj.weight"].T).reshape(t, nkv, hd)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(t, nkv, hd)
        q = rope_neox(np_rms(q, w[p + "self_attn.q_norm.weight"], eps).transpose(1, 0, 2), pos, theta)
        k = rope_neox(np_rms(k, w[p + "self_attn.k_norm.weight"], eps).transpose(1, 0, 2), pos, theta)
        rep = nh // nkv  # query head i reads kv head i // rep
        a = np_causal_attention(q, np.repeat(k, rep, 0), np.repeat(v.transpose(1, 0, 2), rep, 0), hd ** -0.5)
        x = x + a @ w[p + "self_attn.o_proj.weight"].T
        h = np_rms(x, w[p + "post_attention_layernorm.weight"], eps)
        probs = np_softmax(h @ w[p + "mlp.gate.weight"].T)
        moe = np.zeros_like(h)
        for i in range(t):
            top = np.argsort(-probs[i], kind="stable")[: cfg["num_experts_per_tok"]]
            wt = probs[i, top] / (probs[i, top].sum() if cfg["norm_topk_prob"] else 1.0)
            for e, g in zip(top, wt):
                moe[i] += g * np_swiglu(h[i: i + 1], w, f"{p}mlp.experts.{e}.")[0]
        assert n_exp == w[p + "mlp.gate.weight"].shape[0]
        x = x + moe
    x = np_rms(x, w["model.norm.weight"], eps)
    return x @ w["lm_head.weight"].T


def np_glm_router(h, w, p, cfg):
    scores = 1.0 / (1.0 + np.exp(-(h @ w[p + "mlp.gate.weight"].T)))  # [T, E]
    choice = scores + w[p + "mlp.gate.e_score_correction_bias"]  # selection only
    t, n = choice.shape
    g, tg, k = cfg["n_group"], cfg["topk_group"], cfg["num_experts_per_tok"]
    gs = np.sort(choice.reshape(t, g, n // g), -1)[..., -2:].sum(-1)  # group score = sum of its top 2
    experts, weights = [], []
    for i in range(t):
        keep = np.argsort(-gs[i], kind="stable")[:tg]
        masked = np.full(n, -np.inf)
        for gi in keep:
            masked[gi * (n // g):(gi + 1) * (n // g)] = choice[i, gi * (n // g):(gi + 1) * (n // g)]
        top = np.argsort(-masked, kind="stable")[:k]
        wt = scores[i, top]
        if cfg["norm_topk_prob"]:
            wt = wt / (wt.sum() + 1e-20)
        experts.append(top)
        weights.append(wt * cfg["routed_scaling_factor"])
    return experts, weights


def np_glm4_moe_lite(w, cfg, ids, absorbed: bool):
    theta = cfg["rope_parameters"]["rope_theta"]
    nh, eps = cfg["num_attention_heads"], cfg["rms_norm_eps"]
    nope, rope, vd, kvl = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"], cfg["kv_lora_rank"]
    x = w["model.embed_tokens.weight"][ids]
    t = len(ids)
    pos = np.arange(t, dtype=np.float64)
    scale = (nope + rope) ** -0.5
    mlp_types = cfg["mlp_layer_types"]
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}."
        h = np_rms(x, w[p + "input_layernorm.weight"], eps)
        qa = np_rms(h @ w[p + "self_attn.q_a_proj.weight"].T, w[p + "self_attn.q_a_layernorm.weight"], 1e-6)
        q = (qa @ w[p + "self_attn.q_b_proj.weight"].T).reshape(t, nh, nope + rope).transpose(1, 0, 2)
        q_nope, q_rot = q[..., :nope], rope_interleaved(q[..., nope:], pos, theta)
        ckv = h @ w[p + "self_attn.kv_a_proj_with_mqa.weight"].T  # [T, kvl + rope]
        lat = np_rms(ckv[:, :kvl], w[p + "self_attn.kv_a_layernorm.weight"], 1e-6)  # cached latent
        k_rot = rope_interleaved(ckv[:, kvl:], pos, theta)  # cached shared rope key
        wkv = w[p + "self_attn.kv_b_proj.weight"].reshape(nh, nope + vd, kvl)
        w_uk, w_uv = wkv[:, :nope, :], wkv[:, nope:, :]
        if absorbed:
            q_lat = np.einsum("htd,hdc->htc", q_nope, w_uk)  # q_nope mapped into the latent space
            s = (np.einsum("htc,sc->hts", q_lat, lat) + np.einsum("htr,sr->hts", q_rot, k_rot)) * scale
            s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
            o_lat = np.einsum("hts,sc->htc", np_softmax(s), lat)
            a = np.einsum("htc,hvc->thv", o_lat, w_uv).reshape(t, nh * vd)
        else:
            k_nope = np.einsum("hdc,sc->hsd", w_uk, lat)
            v = np.einsum("hvc,sc->hsv", w_uv, lat)
            k = np.concatenate([k_nope, np.broadcast_to(k_rot, (nh, t, rope))], -1)
            a = np_causal_attention(np.concatenate([q_nope, q_rot], -1), k, v, scale)
        x = x + a @ w[p + "self_attn.o_proj.weight"].T
        h = np_rms(x, w[p + "post_attention_layernorm.weight"], eps)
        if mlp_types[l] == "dense":
            x = x + np_swiglu(h, w, p + "mlp.")
            continue
        experts, weights = np_glm_router(h, w, p, cfg)
        moe = np_swiglu(h, w, p + "mlp.shared_experts.")  # shared expert: unweighted, every token
        for i in range(t):
            for e, g in zip(experts[i], weights[i]):
                moe[i] += g * np_swiglu(h[i: i + 1], w, f"{p}mlp.experts.{e}.")[0]
        x = x + moe
    x = np_rms(x, w["model.norm.weight"], eps)
    return x @ w["lm_head.weight"].T


def numpy_crosscheck(model_dir: Path) -> dict[str, float]:
    cfg = json.loads((model_dir / "config.json").read_text())
    w = load_np(model_dir)
    exp = json.loads((model_dir / "expected.json").read_text())
    variants = {"qwen3_moe": {"direct": lambda ids: np_qwen3_moe(w, cfg, ids)},
                "glm4_moe_lite": {"naive": lambda ids: np_glm4_moe_lite(w, cfg, ids, False),
                                  "absorbed": lambda ids: np_glm4_moe_lite(w, cfg, ids, True)}}[cfg["model_type"]]
    errs = {}
    for name, fn in variants.items():
        worst = 0.0
        for seq in exp["sequences"]:
            ours = fn(seq["ids"])
            want = np.array(seq["logits"], dtype=np.float64)
            worst = max(worst, float(np.linalg.norm(ours - want) / np.linalg.norm(want)))
            if not np.array_equal(ours.argmax(-1), np.array(seq["argmax"])):
                raise SystemExit(f"{model_dir.name}/{name}: numpy argmax differs from transformers")
        if worst > 1e-5:
            raise SystemExit(f"{model_dir.name}/{name}: numpy restatement differs from transformers by {worst}")
        errs[name] = worst
    print(f"{model_dir.name}: numpy restatement of DESIGN.md vs transformers, rel L2 {errs}")
    return errs


# ----------------------------------------------------------------------------------------------

def copy_tokenizer(src: Path, dst: Path) -> None:
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (src / f).exists():
            shutil.copy(src / f, dst / f)


def main() -> None:
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # same reduction order on every machine
    only = set(sys.argv[1:])  # optional subset: tokenizers qwen glm nvfp4

    GOLDEN.mkdir(parents=True, exist_ok=True)
    toks = make_tokenizers()
    if not only or "qwen" in only or "nvfp4" in only:
        qtok, qids = toks["qwen"]
        qdir, qseq, _ = make_qwen(qtok, qids)
        copy_tokenizer(TOKDIR / "qwen3", qdir)
        if not only or "nvfp4" in only:
            from transformers import Qwen3MoeForCausalLM
            from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

            make_nvfp4(qdir, "qwen3_moe_nvfp4", Qwen3MoeForCausalLM, Qwen3MoeTopKRouter, qwen_nvfp4_plan, qseq)
            copy_tokenizer(TOKDIR / "qwen3", GOLDEN / "qwen3_moe_nvfp4")
    if not only or "glm" in only or "nvfp4" in only:
        gtok, gids = toks["glm"]
        gdir, gseq, _ = make_glm(gtok, gids)
        copy_tokenizer(TOKDIR / "glm", gdir)
        if not only or "nvfp4" in only:
            from transformers import Glm4MoeLiteForCausalLM
            from transformers.models.glm4_moe_lite.modeling_glm4_moe_lite import Glm4MoeLiteTopkRouter

            make_nvfp4(gdir, "glm4_moe_lite_nvfp4", Glm4MoeLiteForCausalLM, Glm4MoeLiteTopkRouter,
                       glm_nvfp4_plan, gseq)
            copy_tokenizer(TOKDIR / "glm", GOLDEN / "glm4_moe_lite_nvfp4")

    for d in sorted(p for p in GOLDEN.iterdir() if p.is_dir()):
        numpy_crosscheck(d)
    for d in sorted(p for p in GOLDEN.iterdir() if p.is_dir()) + [TOKDIR / "qwen3", TOKDIR / "glm"]:
        for f in sorted(d.iterdir()):
            size = f.stat().st_size
            flag = "  <-- over 1 MB" if size > 1_000_000 else ""
            print(f"{f.relative_to(ROOT)}: {size} bytes{flag}")


if __name__ == "__main__":
    main()
