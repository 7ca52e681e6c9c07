"""Tokenization of the converted GGUF equals HF `tokenizers` (the golden ids).

The runtime encodes prompts with the tokenizer.json embedded in the GGUF: exact on the whole corpus.
llama.cpp's own tokenizer, reading the same GGUF, is exact except where its built-in "tekken"
pre-tokenizer ignores combining marks; that divergence is pinned down here so a change either way shows.
"""

from __future__ import annotations

import json
import unicodedata

import pytest
from cascade_local.convert.tokenizer import (
    KNOWN_PRE_TOKENIZERS,
    TEKKEN,
    llama_pre_tokenizer,
    read_vocab,
    split_regex,
)

from cascade_local.errors import TokenizerError
from cascade_local.gguf_meta import read_metadata
from cascade_local.llama_model import LoadedModel
from cascade_local.tokenization import HF_JSON_KEY


@pytest.fixture(scope="module")
def model(tiny_gguf) -> LoadedModel:
    return LoadedModel(tiny_gguf("f32"))


def has_combining_mark(text: str) -> bool:
    return any(unicodedata.category(c).startswith("M") for c in text)


def test_runtime_tokenizer_matches_tokenizers_on_whole_corpus(model, golden_tokens):
    assert model.tokenizer.exact
    for case in golden_tokens:
        assert model.tokenizer.encode(case["text"], add_bos=False) == case["ids"], case["text"]


def test_llama_cpp_tokenizer_matches_except_combining_marks(model, golden_tokens):
    assert len(golden_tokens) >= 15
    mismatched = [case["text"] for case in golden_tokens if model.tokenize(case["text"]) != case["ids"]]
    marked = {c["text"] for c in golden_tokens if has_combining_mark(c["text"])}
    assert marked, "the corpus must exercise combining marks"
    assert set(mismatched) <= marked, sorted(set(mismatched) - marked)


def test_gguf_embeds_the_original_tokenizer_json(tiny_gguf, tiny_dir):
    embedded = read_metadata(tiny_gguf("f32"))[HF_JSON_KEY]
    assert embedded == (tiny_dir / "tokenizer.json").read_text(encoding="utf-8")


def test_detokenize_round_trips(model, golden_tokens):
    for case in golden_tokens:
        assert b"".join(model.piece(t) for t in case["ids"]).decode("utf-8") == case["text"]


def test_special_tokens_sit_at_the_published_ids(model):
    expected = {"<|im_start|>": 10, "<|im_end|>": 11, "<think>": 12, "</think>": 13, "<tool_call>": 14,
                "</tool_call>": 15}
    for text, tid in expected.items():
        assert model.tokenize(text) == [tid] == model.tokenizer.encode(text, add_bos=False)


def test_tekken_regex_maps_to_tekken(tiny_dir):
    tokenizer = json.loads((tiny_dir / "tokenizer.json").read_text())
    assert split_regex(tokenizer) == TEKKEN
    assert read_vocab(tiny_dir, 1024).pre == "tekken"


def test_unknown_regex_is_refused_naming_it():
    with pytest.raises(TokenizerError, match=r"no pre-tokenizer for .*Han"):
        llama_pre_tokenizer(r"\p{Han}+|\s+")


def test_every_known_regex_has_a_distinct_name():
    assert len(set(KNOWN_PRE_TOKENIZERS.values())) == len(KNOWN_PRE_TOKENIZERS)


def test_non_byte_level_tokenizer_is_refused(tiny_copy):
    path = tiny_copy / "tokenizer.json"
    tokenizer = json.loads(path.read_text())
    tokenizer["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁"}
    path.write_text(json.dumps(tokenizer))
    with pytest.raises(TokenizerError, match="Metaspace"):
        read_vocab(tiny_copy, 1024)
