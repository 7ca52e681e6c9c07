"""models.toml: the shipped registry, sampling defaults, and a user file that extends it."""

from __future__ import annotations

import pytest

from cascade_local.errors import CascadeError, ModelNotFoundError, UsageError
from cascade_local.registry import load_registry


def test_default_model_and_its_sampling():
    registry = load_registry()
    entry = registry.get(None)
    assert entry.hf_repo == "nvidia/Nemotron-Cascade-2-30B-A3B"
    assert entry.sampling_defaults(thinking=True) == {"temperature": 1.0, "top_p": 0.95}
    assert entry.sampling_defaults(thinking=False) == {"temperature": 0.6, "top_p": 0.95}


def test_user_file_adds_models_and_recipes(tmp_path):
    user = tmp_path / "models.toml"
    user.write_text('default_recipe = "mine"\n[recipes.mine]\n' + "".join(
        f'{c} = "q8_0"\n' for c in ["expert_up", "expert_down", "shared_up", "shared_down", "mamba_in", "mamba_out",
                                    "attn_qkv", "attn_out", "token_embd", "output"])
                    + '[models.other]\nhf_repo = "someone/other"\n')
    registry = load_registry(user)
    assert registry.recipe(None).name == "mine"
    assert registry.get("other").hf_repo == "someone/other"
    assert "q4-moe" in registry.recipes and registry.get(None).name == "nemotron-cascade-2"


def test_unknown_names_list_the_known_ones():
    registry = load_registry()
    with pytest.raises(ModelNotFoundError, match="known: nemotron-cascade-2"):
        registry.get("nope")
    with pytest.raises(UsageError, match="known: q4-moe, q5-moe, q8, small"):
        registry.recipe("nope")


def test_broken_user_file_is_named(tmp_path):
    user = tmp_path / "models.toml"
    user.write_text("[models.x\n")
    with pytest.raises(CascadeError, match="is not valid TOML"):
        load_registry(user)
