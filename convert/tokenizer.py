"""A Hugging Face `tokenizer.json` as GGUF vocabulary metadata, for llama.cpp's byte-level BPE.

llama.cpp does not run the checkpoint's split regex: it picks a built-in pre-tokenizer by name
(`tokenizer.ggml.pre`). llama.cpp's own converter guesses that name from a hash of sample
tokenizations (which needs transformers); we read the regex itself and map it to the name whose
built-in regex llama.cpp documents as equivalent, refusing any regex we cannot vouch for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from cascade_local.errors import TokenizerError

TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|"
    r"\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"

# Split regex in tokenizer.json -> llama.cpp pre-tokenizer with the same behaviour (llama-vocab.cpp).
KNOWN_PRE_TOKENIZERS: dict[str, str] = {TEKKEN: "tekken", LLAMA3: "llama-bpe", QWEN2: "qwen2", GPT2: "gpt-2"}

# llama.cpp's converter treats these added tokens as control tokens even when not flagged special.
def _looks_special(text: str) -> bool:
    return (text.startswith("<|") and text.endswith("|>")) or text in ("<pad>", "<mask>")


@dataclass(frozen=True)
class GGUFVocab:
    pre: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str]


def split_regex(tokenizer: dict[str, Any]) -> str:
    """The single split regex of a byte-level pre-tokenizer (GPT-2's, when ByteLevel splits by itself)."""
    pre = tokenizer.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    regexes: list[str] = []
    byte_level = False
    for part in parts:
        kind = part.get("type")
        if kind == "Split":
            pattern = part.get("pattern", {})
            if "Regex" not in pattern or part.get("invert") or part.get("behavior") != "Isolated":
                raise TokenizerError(f"tokenizer.json: unsupported Split pre-tokenizer {json.dumps(part)[:200]}")
            regexes.append(pattern["Regex"])
        elif kind == "ByteLevel":
            byte_level = True
            if part.get("use_regex", True):
                regexes.append(GPT2)
        else:
            raise TokenizerError(f"tokenizer.json: unsupported pre-tokenizer {kind!r}")
    if not byte_level:
        raise TokenizerError("tokenizer.json: only byte-level BPE tokenizers are supported")
    if len(regexes) != 1:
        raise TokenizerError(f"tokenizer.json: expected one split regex, found {len(regexes)}")
    return regexes[0]


def llama_pre_tokenizer(regex: str) -> str:
    try:
        return KNOWN_PRE_TOKENIZERS[regex]
    except KeyError:
        shown = regex if len(regex) <= 80 else regex[:77] + "..."
        raise TokenizerError(
            f"tokenizer.json splits text with a regex llama.cpp has no pre-tokenizer for ({shown!r}); "
            f"known: {', '.join(sorted(KNOWN_PRE_TOKENIZERS.values()))}"
        ) from None


def read_vocab(folder: Path, n_vocab: int) -> GGUFVocab:
    path = folder / "tokenizer.json"
    try:
        tokenizer = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TokenizerError(f"{folder} has no tokenizer.json") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"cannot read {path}: {exc}") from None
    model = tokenizer.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise TokenizerError(f"tokenizer.json: model type {model.get('type')!r} is not a BPE vocabulary")
    pre = llama_pre_tokenizer(split_regex(tokenizer))

    by_id: dict[int, str] = {}
    for text, tid in model["vocab"].items():
        by_id[tid] = text
    added: dict[int, dict[str, Any]] = {t["id"]: t for t in tokenizer.get("added_tokens", [])}
    for tid, tok in added.items():
        by_id[tid] = tok["content"]
    if by_id and max(by_id) >= n_vocab:
        raise TokenizerError(f"tokenizer.json has token id {max(by_id)}, beyond the model's vocab_size {n_vocab}")

    tokens: list[str] = []
    types: list[int] = []
    for tid in range(n_vocab):
        if tid not in by_id:
            tokens.append(f"[PAD{tid}]")
            types.append(gguf.TokenType.UNUSED)
        elif tid in added:
            tokens.append(by_id[tid])
            special = added[tid].get("special") or _looks_special(by_id[tid])
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[tid])
            types.append(gguf.TokenType.NORMAL)

    merges = model.get("merges") or []
    if merges and isinstance(merges[0], list):
        if any(" " in s for pair in merges for s in pair):
            raise TokenizerError("tokenizer.json: merges containing spaces cannot be stored in GGUF")
        merges = [f"{a} {b}" for a, b in merges]
    return GGUFVocab(pre, tokens, [int(t) for t in types], list(merges))


def add_flags(folder: Path, tokenizer_config: dict[str, Any], tokenizer: dict[str, Any]) -> dict[str, bool]:
    """add_bos/add_eos as transformers applies them: tokenizer_config.json first, else the post-processor."""
    flags: dict[str, bool] = {}
    post = tokenizer.get("post_processor") or {}
    single = [p.get("SpecialToken", {}).get("id") for p in post.get("single", [])] if post else []
    single = [s for s in single if s]
    for kind in ("bos", "eos"):
        key = f"add_{kind}_token"
        if isinstance(tokenizer_config.get(key), bool):
            flags[kind] = tokenizer_config[key]
        elif post.get("type") == "TemplateProcessing":
            flags[kind] = bool(single) and (single[0] if kind == "bos" else single[-1]) == tokenizer_config.get(
                f"{kind}_token"
            )
        else:
            flags[kind] = False
    return flags


def write_tokenizer(meta: gguf.GGUFWriter, folder: Path, n_vocab: int) -> GGUFVocab:
    """All tokenizer.* metadata: vocabulary, merges, special ids, add-BOS/EOS flags, chat template."""
    vocab = read_vocab(folder, n_vocab)
    tokenizer_text = (folder / "tokenizer.json").read_text(encoding="utf-8")
    tokenizer = json.loads(tokenizer_text)
    config_path = folder / "tokenizer_config.json"
    try:
        tokenizer_config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"cannot read {config_path}: {exc}") from None

    meta.add_tokenizer_model("gpt2")
    meta.add_tokenizer_pre(vocab.pre)
    meta.add_token_list(vocab.tokens)
    meta.add_token_types(vocab.token_types)
    meta.add_token_merges(vocab.merges)

    special = gguf.SpecialVocab(folder, load_merges=False, n_vocab=n_vocab)
    for kind, tid in special.special_token_ids.items():
        handler = getattr(meta, f"add_{kind}_token_id", None)
        if handler is not None:
            handler(tid)
    flags = add_flags(folder, tokenizer_config, tokenizer)
    meta.add_add_bos_token(flags["bos"])
    meta.add_add_eos_token(flags["eos"])
    # llama.cpp's built-in pre-tokenizers only approximate some regexes (its "tekken" ignores combining
    # marks, so Devanagari or Thai words split differently). The original travels with the model so
    # cascade-local's runtime can tokenize exactly as the reference does; llama.cpp ignores this key.
    meta.add_string(gguf.Keys.Tokenizer.HF_JSON, tokenizer_text)
    template = tokenizer_config.get("chat_template")
    if isinstance(template, str):
        meta.add_chat_template(template)
    elif special.chat_template is not None:
        meta.add_chat_template(special.chat_template)
    return vocab
