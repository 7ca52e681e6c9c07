"""`cascade-local eval`: KL divergence, top-1 agreement and perplexity against a reference, on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from cascade_local.errors import UsageError
from cascade_local.quality import EvalError, ReferenceLogits, compare, default_text, reference_logits

TEXT = default_text()


@pytest.fixture(scope="module")
def f32_reference(tiny_gguf) -> ReferenceLogits:
    return reference_logits(tiny_gguf("f32"), TEXT, n_ctx=128, max_tokens=1024, threads=2)


def test_a_file_against_itself_is_kl_zero(tiny_gguf, f32_reference):
    result = compare(tiny_gguf("f32"), f32_reference, threads=2)
    assert result.chunks == 8 and result.tokens_scored == 8 * (128 - 1 - 64)
    assert result.kl_mean == 0.0 and result.kl_max == 0.0 and result.top1 == 1.0
    assert result.ppl_model == result.ppl_reference > 1.0


def test_q8_0_against_f32_is_a_small_positive_kl(tiny_gguf, f32_reference):
    result = compare(tiny_gguf("q8_0"), f32_reference, threads=2)
    assert 1e-5 < result.kl_mean < 2e-2
    assert result.kl_median <= result.kl_p99 <= result.kl_max
    assert result.top1 > 0.9
    assert result.ppl_model == pytest.approx(result.ppl_reference, rel=0.05)
    coarser = compare(tiny_gguf("q4_0"), f32_reference, threads=2)
    assert coarser.kl_mean > result.kl_mean  # 4 bits lose more than 8


def test_saved_logits_round_trip(tiny_gguf, f32_reference, tmp_path: Path):
    path = tmp_path / "ref.npz"
    f32_reference.save(path)
    back = ReferenceLogits.load(path)
    assert (back.source, back.n_ctx, back.vocab) == (f32_reference.source, 128, f32_reference.vocab)
    assert np.array_equal(back.tokens, f32_reference.tokens) and np.array_equal(back.logprobs, f32_reference.logprobs)
    assert compare(tiny_gguf("q8_0"), back, threads=2) == compare(tiny_gguf("q8_0"), f32_reference, threads=2)
    assert [p.name for p in tmp_path.iterdir()] == ["ref.npz"]  # no partial file left


def test_the_command_saves_and_reuses_the_reference(tiny_gguf, tmp_path: Path):
    saved = tmp_path / "ref.npz"
    first = run_cli("eval", str(tiny_gguf("q8_0")), "--reference", str(tiny_gguf("f32")), "--ctx", "128",
                    "--tokens", "512", "--save-logits", str(saved), "--json", "--threads", "2")
    assert first.returncode == 0, first.stderr
    assert "reference: chunk 4/4" in first.stderr and saved.exists()
    again = run_cli("eval", str(tiny_gguf("q8_0")), "--reference", str(saved), "--json", "--threads", "2")
    assert again.returncode == 0, again.stderr
    assert "reference: chunk" not in again.stderr  # the reference was not run again
    assert json.loads(again.stdout) == json.loads(first.stdout)
    table = run_cli("eval", str(tiny_gguf("q8_0")), "--reference", str(saved))
    assert "mean KL divergence" in table.stdout and "\x1b[" not in table.stdout


def test_mismatched_vocabularies_are_refused(tiny_gguf, llama_arch_gguf, f32_reference):
    with pytest.raises(EvalError, match="different vocabularies"):
        compare(llama_arch_gguf, f32_reference)
    done = run_cli("eval", str(llama_arch_gguf), "--reference", str(tiny_gguf("f32")), "--ctx", "128")
    assert done.returncode == 2 and "different vocabularies" in done.stderr and "Traceback" not in done.stderr


def test_bad_input_is_one_line(tiny_gguf, tmp_path: Path):
    with pytest.raises(UsageError, match="less than one chunk"):
        reference_logits(tiny_gguf("f32"), "too short", n_ctx=128)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"PK\x03\x04 not really a zip")
    done = run_cli("eval", str(tiny_gguf("q8_0")), "--reference", str(junk))
    assert done.returncode == 2 and "cannot read reference logits" in done.stderr
    missing = run_cli("eval", str(tiny_gguf("q8_0")), "--reference", str(tmp_path / "nope.gguf"))
    assert missing.returncode == 1 and "does not exist" in missing.stderr
    assert "Traceback" not in done.stderr and "Traceback" not in missing.stderr


def test_the_default_text_covers_several_domains():
    for sample in ("def binary_search", "#include <stdio.h>", "Σ", "Le marché", "सुबह", "春天", "喫茶店"):
        assert sample in TEXT
