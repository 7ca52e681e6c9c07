"""A small byte-level BPE tokenizer shaped like Nemotron-Cascade-2's (Tekken split regex, real special ids).

Trained with HF `tokenizers` on a fixed corpus, so it has real merges and real multi-byte tokens.
Needs the `tokenizers` package (a test dependency, not a runtime one).
"""

from __future__ import annotations

import json
from pathlib import Path

from cascade_local.convert.tokenizer import TEKKEN

# FACTS.md: ids of the real model's special tokens; gaps filled with Tekken-style placeholders.
SPECIAL_TOKENS: dict[int, str] = {
    0: "<unk>",
    1: "<s>",
    2: "</s>",
    10: "<|im_start|>",
    11: "<|im_end|>",
    12: "<think>",
    13: "</think>",
    14: "<tool_call>",
    15: "</tool_call>",
}
N_SPECIAL = 20

TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog. A model that thinks before it answers can use tools.
Nemotron-Cascade-2 is a hybrid of Mamba-2, attention and mixture-of-experts layers; only 3 billion
parameters are active for each token. Run it on your own desktop with llama.cpp and GGUF files.
def fibonacci(n: int) -> int:
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)

for i in range(10):
    print(f"{i}: {fibonacci(i)}")
{"id": 42, "prompt": "What is 2 + 2?", "answer": "4"}
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14159 2.71828 1e-5 -17 +42 12,345,678
Unicode: café naïve résumé Straße Ærø — “quotes” ‘single’ … ½ ¼ € £ ¥ © ®
Ελληνικά κείμενα, русский текст, 中文文本, 日本語のテキスト, 한국어 텍스트, עברית, العربية, हिन्दी
Emoji: 🙂 🚀 🔥 👍🏽 🇫🇷
Whitespace:   three spaces,\ttab,\n\nnew lines,    and trailing spaces   
<think>Let me think step by step.</think> The answer is 42.
Questions and answers; reasoning, summaries, translations and code reviews.
"""


def build_tokenizer_json(vocab_size: int = 1024) -> str:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = [SPECIAL_TOKENS.get(i, f"<SPECIAL_{i}>") for i in range(N_SPECIAL)]
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(TEKKEN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TRAINING_TEXT] * 4, trainer=trainer)
    for i, text in enumerate(specials):
        if tok.token_to_id(text) != i:
            raise RuntimeError(f"special token {text} landed at id {tok.token_to_id(text)}, not {i}")
    return tok.to_str(pretty=True)


def write_tokenizer_files(folder: Path, chat_template: str, vocab_size: int = 1024) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(build_tokenizer_json(vocab_size) + "\n", encoding="utf-8")
    added = {
        str(i): {"content": SPECIAL_TOKENS.get(i, f"<SPECIAL_{i}>"), "lstrip": False, "normalized": False,
                 "rstrip": False, "single_word": False, "special": True}
        for i in range(N_SPECIAL)
    }
    config = {
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        "bos_token": "<s>",
        "eos_token": "<|im_end|>",
        "unk_token": "<unk>",
        "pad_token": "<unk>",
        "clean_up_tokenization_spaces": False,
        "model_max_length": 262144,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": chat_template,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                  encoding="utf-8")
    special_map = {"bos_token": "<s>", "eos_token": "<|im_end|>", "unk_token": "<unk>", "pad_token": "<unk>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n", encoding="utf-8")
