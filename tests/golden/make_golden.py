"""Regenerate the tiny fixture checkpoint and the golden data the tests compare against.

Golden data comes from the reference implementations themselves: transformers' NemotronHForCausalLM
(logits, in float32), HF `tokenizers` (token ids) and transformers' `apply_chat_template` (prompts).
Needs the `reference` extra (torch, transformers); CI only reads the committed results.

    pip install -e '.[reference,test]'   # torch: `pip install torch==2.13.0` gives the CPU build
    python tests/golden/make_golden.py
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from cascade_local.testing.checkpoint_fixture import write_tiny_checkpoint

HERE = Path(__file__).resolve().parent
FIXTURE = HERE.parent / "fixtures" / "tiny"

CORPUS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    " leading space and trailing space ",
    "Numbers 0 1 12 123 1234 12345 3.14159 -42 1e-5 1,000,000",
    "café naïve résumé Straße Ærø — “quotes” ‘single’ …",
    "Ελληνικά κείμενα, русский текст, 中文文本, 日本語のテキスト, 한국어 텍스트",
    "עברית العربية हिन्दी",
    "Emoji 🙂🚀🔥 👍🏽 🇫🇷 and ZWJ 👨‍👩‍👧",
    "def f(x):\n    return x ** 2  # square\n\n\nprint(f(3))",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "tabs\tand\t\ttabs, newlines\n\n\n and   runs    of     spaces",
    "   \n\t  \r\n",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n",
    "<think>reasoning</think>answer<tool_call>\n<function=f>\n</function>\n</tool_call></s>",
    "<s>not-special-looking <unk> text</s>",
    "MixedCASE camelCase snake_case SCREAMING_CASE PascalCase iPhone",
    "URLs https://example.com/path?q=1&r=2#frag and emails a.b@c.org",
    "",
    "a",
    "\u00a0non-breaking\u2009thin\u200bzero-width",
]

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "stateful_python_code_exec",
            "description": "Call this function to execute Python code in a stateful Jupyter notebook environment.",
            "parameters": {
                "type": "object",
                "properties": {"code": {"type": "string", "description": "Code to execute"}},
                "required": ["code"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "City name"},
                    "unit": {"type": "string", "enum": ["c", "f"]},
                },
                "required": ["city"],
            },
        },
    },
]

CHATS: list[dict] = [
    {"name": "thinking_on", "messages": [{"role": "user", "content": "What is 2+2?"}],
     "kwargs": {"add_generation_prompt": True}},
    {"name": "thinking_off", "messages": [{"role": "user", "content": "What is 2+2?"}],
     "kwargs": {"add_generation_prompt": True, "enable_thinking": False}},
    {"name": "system_multi_turn", "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "7", "reasoning_content": "Small primes: 2, 3, 5, 7."},
        {"role": "user", "content": "Another?"},
    ], "kwargs": {"add_generation_prompt": True}},
    {"name": "keep_history_thinking", "messages": [
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "<think>\nSmall primes.\n</think>\n7"},
        {"role": "user", "content": "Another?"},
    ], "kwargs": {"add_generation_prompt": True, "truncate_history_thinking": False}},
    {"name": "inline_think_history", "messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "<think>\ngreeting\n</think>\nHello!"},
        {"role": "user", "content": "Bye"},
    ], "kwargs": {"add_generation_prompt": True, "enable_thinking": False}},
    {"name": "tools_call_and_response", "tools": TOOLS, "messages": [
        {"role": "system", "content": "Use tools when helpful."},
        {"role": "user", "content": "Compute 2**100."},
        {"role": "assistant", "content": "", "reasoning_content": "Use Python.",
         "tool_calls": [{"type": "function", "function": {"name": "stateful_python_code_exec",
                                                          "arguments": {"code": "print(2**100)"}}}]},
        {"role": "tool", "content": "1267650600228229401496703205376"},
    ], "kwargs": {"add_generation_prompt": True}},
    {"name": "tools_no_system", "tools": TOOLS, "messages": [{"role": "user", "content": "Weather in Paris?"}],
     "kwargs": {"add_generation_prompt": True, "enable_thinking": False}},
    {"name": "two_tool_responses", "tools": TOOLS[1:], "messages": [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": "Checking both.", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome", "unit": "c"}}},
        ]},
        {"role": "tool", "content": "18 C"},
        {"role": "tool", "content": "24 C"},
        {"role": "user", "content": "Thanks"},
    ], "kwargs": {"add_generation_prompt": True}},
    {"name": "no_generation_prompt", "messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
    ], "kwargs": {"add_generation_prompt": False}},
]


def logit_sequences(tok) -> list[list[int]]:
    rng = np.random.default_rng(1234)
    n_real = tok.get_vocab_size()
    texts = [
        "The quick brown fox jumps over the lazy dog. A model that thinks before it answers can use tools.",
        "def fibonacci(n: int) -> int:\n    if n < 2:\n        return n\n    return fibonacci(n - 1)",
        "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n<think>\nLet me think step by step.",
    ]
    seqs = [tok.encode(t, add_special_tokens=False).ids[:64] for t in texts]
    seqs.append([int(x) for x in rng.integers(20, n_real, size=64)])
    return seqs


def main() -> None:
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, NemotronHForCausalLM

    if FIXTURE.exists():
        shutil.rmtree(FIXTURE)
    write_tiny_checkpoint(FIXTURE, seed=0)

    tok = Tokenizer.from_file(str(FIXTURE / "tokenizer.json"))
    tokens = [{"text": t, "ids": tok.encode(t, add_special_tokens=False).ids} for t in CORPUS]
    (HERE / "tokens.json").write_text(json.dumps(tokens, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")

    hf_tok = AutoTokenizer.from_pretrained(FIXTURE)
    prompts = []
    for chat in CHATS:
        text = hf_tok.apply_chat_template(chat["messages"], tools=chat.get("tools"), tokenize=False, **chat["kwargs"])
        prompts.append({**chat, "expected": text})
    (HERE / "prompts.json").write_text(json.dumps(prompts, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")

    model = NemotronHForCausalLM.from_pretrained(FIXTURE, dtype=torch.float32).eval()
    seqs = logit_sequences(tok)
    arrays = {}
    top_p = []
    with torch.no_grad():
        for i, ids in enumerate(seqs):
            logits = model(torch.tensor([ids])).logits[0].float().numpy()
            arrays[f"ids_{i}"] = np.array(ids, dtype=np.int32)
            arrays[f"logits_{i}"] = logits.astype(np.float32)
            top_p.append(torch.softmax(torch.from_numpy(logits), -1).max(-1).values.mean().item())
    np.savez_compressed(HERE / "logits.npz", **arrays)
    print(f"sequences: {[len(s) for s in seqs]}, mean top-token probability per sequence: "
          f"{[round(p, 3) for p in top_p]}")


if __name__ == "__main__":
    main()
