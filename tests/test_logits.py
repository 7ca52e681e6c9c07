"""The converted GGUF computes what transformers' NemotronHForCausalLM computes (golden logits)."""

from __future__ import annotations

import numpy as np
import pytest

from cascade_local.llama_model import LoadedModel
from cascade_local.logits import sequence_logits


def llama_logits(path, sequences) -> list[np.ndarray]:
    """The runtime's own logits: loaded as the runtime loads (CPU buffer types chosen for this machine)."""
    model = LoadedModel(path)
    try:
        return [got.astype(np.float64) for got in sequence_logits(model, [ids for ids, _ in sequences], threads=2)]
    finally:
        model.close()


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def kl_and_top1(golden, ours) -> tuple[float, float]:
    kls, agree = [], []
    for (_, ref), got in zip(golden, ours, strict=True):
        lp, lq = log_softmax(ref.astype(np.float64)), log_softmax(got)
        kls.append((np.exp(lp) * (lp - lq)).sum(-1))
        agree.append(ref.argmax(-1) == got.argmax(-1))
    return float(np.concatenate(kls).mean()), float(np.concatenate(agree).mean())


def test_golden_logits_are_not_near_uniform(golden_logits):
    # A KL test on near-uniform outputs would pass for almost any model.
    top = [np.exp(log_softmax(ref.astype(np.float64))).max(-1).mean() for _, ref in golden_logits]
    assert min(top) > 0.2
    assert sum(len(ids) for ids, _ in golden_logits) >= 100


def test_f32_matches_transformers_at_every_position(tiny_gguf, golden_logits):
    ours = llama_logits(tiny_gguf("f32"), golden_logits)
    for (ids, ref), got in zip(golden_logits, ours, strict=True):
        spread = ref.max(-1) - ref.min(-1)
        rel = np.abs(got - ref).max(-1) / spread
        assert rel.max() < 1e-3, f"sequence of {len(ids)} tokens: worst position {rel.argmax()} off by {rel.max():.2e}"


@pytest.mark.parametrize("type_name", ["f16", "bf16"])
def test_half_precision_kl(tiny_gguf, golden_logits, type_name):
    kl, top1 = kl_and_top1(golden_logits, llama_logits(tiny_gguf(type_name), golden_logits))
    assert kl < 1e-4, f"{type_name}: mean KL {kl:.2e}"
    assert top1 >= 0.98


def test_q8_0_kl_and_top1(tiny_gguf, golden_logits):
    kl, top1 = kl_and_top1(golden_logits, llama_logits(tiny_gguf("q8_0"), golden_logits))
    assert kl < 1e-2, f"q8_0: mean KL {kl:.2e}"
    assert top1 >= 0.95, f"q8_0: top-1 agreement {top1:.3f}"
