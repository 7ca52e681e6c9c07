"""The checkpoint reader fails with a CheckpointError, never anything else, on damaged input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cascade_local.convert import Checkpoint, load_config
from cascade_local.convert.hf_config import NemotronHConfig
from cascade_local.convert.safetensors_file import SafetensorsFile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cascade_local.errors import CheckpointError

SHARD = Path(__file__).parent / "fixtures" / "tiny" / "model-00003-of-00003.safetensors"


@settings(max_examples=200, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_shards_fail_cleanly(tmp_path, data):
    raw = bytearray(SHARD.read_bytes())
    header_end = 8 + int.from_bytes(raw[:8], "little")
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, header_end + 16))
        raw[at] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    path = tmp_path / "shard.safetensors"
    path.write_bytes(bytes(raw))
    try:
        shard = SafetensorsFile(path)
    except CheckpointError:
        return
    for name, entry in shard.entries.items():  # whatever parsed must be readable, in bounds
        assert shard.raw(name).nbytes == entry.nbytes
    shard.close()


def test_config_accepts_word_layer_types():
    raw = json.loads((Path(__file__).parent / "fixtures" / "tiny" / "config.json").read_text())
    del raw["hybrid_override_pattern"]
    raw["layers_block_type"] = ["mamba", "moe", "mamba", "attention", "moe"]
    assert NemotronHConfig.from_dict(raw).pattern == "MEM*E"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"hybrid_override_pattern": "MM*M", "num_hidden_layers": 4}, "no MoE layers"),
        ({"num_nextn_predict_layers": 1}, "multi-token-prediction"),
        ({"hidden_size": -5}, "hidden_size must be a positive integer"),
        ({"num_hidden_layers": 7}, "num_hidden_layers is 7 but the layer pattern has 5"),
        ({"mlp_hidden_act": "silu"}, "relu2 only"),
    ],
)
def test_config_problems_are_named(tiny_copy, change, message):
    path = tiny_copy / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(CheckpointError, match=message):
        load_config(tiny_copy)


def test_missing_key_is_named(tiny_copy):
    path = tiny_copy / "config.json"
    raw = json.loads(path.read_text())
    del raw["moe_intermediate_size"]
    path.write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="lacks the required key 'moe_intermediate_size'"):
        load_config(tiny_copy)


def test_unmapped_tensor_is_an_error_not_dropped(tiny_copy, tmp_path):
    import numpy as np
    from cascade_local.convert.tensor_map import plan_tensors

    from cascade_local.testing.safetensors_writer import TensorSpec, write_shards

    name = "backbone.layers.0.mixer.mystery.weight"
    [extra] = write_shards(tmp_path / "extra", [TensorSpec(name, "F32", (4,), lambda: np.ones(4, np.float32))],
                           min_shards=1)
    extra.rename(tiny_copy / "model-extra.safetensors")
    index_path = tiny_copy / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"][name] = "model-extra.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"does not map: backbone\.layers\.0\.mixer\.mystery\.weight"):
        plan_tensors(Checkpoint(tiny_copy))
