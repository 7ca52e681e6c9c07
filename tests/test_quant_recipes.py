"""Recipes: parsed from models.toml, resolved per layer, and quantized bit-identically to llama.cpp's quantizer."""

from __future__ import annotations

import ctypes
import re
from pathlib import Path

import gguf
import numpy as np
import pytest
from cascade_local.convert import Checkpoint, convert, load_imatrix, parse_recipe, uniform_recipe
from cascade_local.convert.imatrix import Imatrix
from cascade_local.convert.recipes import CONFIGURABLE
from cascade_local.convert.tensor_map import TensorClass, plan_tensors

from cascade_local.engine import Engine, Request
from cascade_local.errors import UsageError
from cascade_local.llama_log import quiet_llama
from cascade_local.llama_model import LoadedModel
from cascade_local.registry import load_registry
from cascade_local.sampling import SamplingParams

T = gguf.GGMLQuantizationType


def tensors(path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def llama_quantize(src, dst, types: dict[str, gguf.GGMLQuantizationType], imatrix: Imatrix | None = None) -> None:
    """llama.cpp's own quantizer, told each tensor's type exactly (tt_overrides) and given the same imatrix."""
    quiet_llama()
    import llama_cpp

    overrides = (llama_cpp.llama_model_tensor_override * (len(types) + 1))()
    keep = []
    for i, (name, qtype) in enumerate(types.items()):
        pattern = f"^{re.escape(name)}$".encode()
        keep.append(pattern)
        overrides[i].pattern = pattern
        overrides[i].type = int(qtype)
    overrides[len(types)].pattern = None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    params.nthread = 2
    params.tt_overrides = overrides
    if imatrix:
        data = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(imatrix.items()):
            flat = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
            keep += [name.encode(), flat]
            data[i].name = keep[-2]
            data[i].data = flat.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            data[i].size = flat.size
        data[len(imatrix)].name = None
        params.imatrix = data
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0


def synthetic_imatrix(ckpt_dir) -> Imatrix:
    """Positive importances for every quantizable tensor, one row per expert for stacked ones."""
    rng = np.random.default_rng(3)
    out: Imatrix = {}
    for t in plan_tensors(Checkpoint(ckpt_dir)):
        if t.cls is not TensorClass.F32_ONLY and len(t.shape) > 1:
            n = t.shape[0] if t.stacked else 1
            out[t.name] = rng.gamma(2.0, 1.0, size=(n, t.row_width)).astype(np.float32)
    return out


@pytest.mark.parametrize(
    ("recipe", "with_imatrix"),
    [("q4-moe", False), ("q4-moe", True), ("small", False), ("iq4_nl", True), ("q5_1", True)],
)
def test_bit_identical_to_llama_cpp_quantizer(tiny_dir, tiny_gguf, tmp_path, recipe, with_imatrix):
    chosen = load_registry().recipe(recipe) if "-" in recipe or recipe == "small" else uniform_recipe(recipe)
    imatrix = synthetic_imatrix(tiny_dir) if with_imatrix else None
    ours = tmp_path / "ours.gguf"
    convert(tiny_dir, ours, chosen, imatrix=imatrix)
    our_tensors = tensors(ours)
    quantized = {n: T(t.tensor_type) for n, t in our_tensors.items() if T(t.tensor_type) not in (T.F32,)}
    theirs = tmp_path / "llama.gguf"
    llama_quantize(tiny_gguf("bf16"), theirs, quantized, imatrix)
    their_tensors = tensors(theirs)
    assert set(their_tensors) == set(our_tensors)
    for name, ours_t in our_tensors.items():
        theirs_t = their_tensors[name]
        assert T(theirs_t.tensor_type) == T(ours_t.tensor_type), name
        assert np.array_equal(np.asarray(theirs_t.data).view(np.uint8), np.asarray(ours_t.data).view(np.uint8)), name


def test_imatrix_changes_the_result(tiny_dir, tmp_path):
    plain, guided = tmp_path / "plain.gguf", tmp_path / "guided.gguf"
    convert(tiny_dir, plain, uniform_recipe("q4_0"))
    convert(tiny_dir, guided, uniform_recipe("q4_0"), imatrix=synthetic_imatrix(tiny_dir))
    a, b = tensors(plain), tensors(guided)
    name = "blk.1.ffn_up_exps.weight"
    assert not np.array_equal(np.asarray(a[name].data), np.asarray(b[name].data))


def test_overrides_select_first_and_last_moe_layers(tiny_dir):
    from cascade_local.convert.hf_config import NemotronHConfig

    from cascade_local.testing.checkpoint_fixture import TINY_CONFIG

    cfg = NemotronHConfig.from_dict({**TINY_CONFIG, "hybrid_override_pattern": "MEME*MEME", "num_hidden_layers": 9})
    policy = load_registry().recipe("q5-moe").resolve(cfg)
    bumped = sorted({layer for (_, layer) in policy.by_layer})
    assert bumped == [1, 8]  # MoE layers are 1, 3, 6, 8: only the first and the last are raised
    assert policy.by_layer[(TensorClass.EXPERT_DOWN, 8)] == T.Q8_0
    assert policy.by_class[TensorClass.EXPERT_DOWN] == T.Q5_0

    ckpt = Checkpoint(tiny_dir)
    by_name = {t.name: load_registry().recipe("q4-moe").resolve(ckpt.config).type_for(t) for t in plan_tensors(ckpt)}
    assert by_name["blk.1.ffn_up_exps.weight"] == T.MXFP4 and by_name["token_embd.weight"] == T.Q8_0
    assert by_name["blk.0.ssm_a"] == T.F32 and by_name["blk.1.ffn_gate_inp.weight"] == T.F32


def test_every_shipped_recipe_is_complete_and_valid():
    registry = load_registry()
    assert {"q4-moe", "q5-moe", "q8", "small"} <= set(registry.recipes)
    assert registry.default_recipe == "q4-moe"
    for recipe in registry.recipes.values():
        assert set(recipe.types) == set(CONFIGURABLE)


FULL = {c.value: "q8_0" for c in CONFIGURABLE}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({**FULL, "expert_up": "q4_k"}, "recipe 'mine'.expert_up: unknown type 'q4_k'"),
        ({**FULL, "experts": "q4_0"}, "unknown tensor class 'experts'"),
        ({"expert_up": "q4_0"}, "no type given for token_embd, output, expert_down"),
        ({**FULL, "override": [{"layers": [], "expert_up": "q5_0"}]}, "`layers` must be a non-empty list"),
    ],
)
def test_bad_recipes_are_refused_clearly(raw, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        parse_recipe("mine", raw)


def test_bad_layer_selector_is_refused(tiny_dir):
    recipe = parse_recipe("mine", {**FULL, "override": [{"layers": ["middle"], "expert_up": "q5_0"}]})
    with pytest.raises(UsageError, match="selector 'middle'"):
        recipe.resolve(Checkpoint(tiny_dir).config)


def test_type_whose_block_does_not_divide_rows_is_refused(tiny_dir, tmp_path):
    # Q8_0 blocks are 32 wide; a model whose rows are 48 wide cannot use it. Fake it with a recipe
    # check on a planned tensor of such width.
    from cascade_local.convert.tensor_map import PlannedTensor, Transform

    policy = uniform_recipe("q8_0").resolve(Checkpoint(tiny_dir).config)
    odd = PlannedTensor("blk.0.ssm_in.weight", TensorClass.MAMBA_IN, 0, ("x",), (16, 48), Transform.NONE)
    with pytest.raises(UsageError, match="rows of 48 values, which Q8_0"):
        policy.type_for(odd)


def test_imatrix_formats_load_and_normalise(tmp_path):
    values = np.arange(1, 9, dtype=np.float32).reshape(2, 4)  # two experts, four columns
    counts = np.array([2.0, 0.0], dtype=np.float32)
    writer = gguf.GGUFWriter(tmp_path / "m.imatrix.gguf", "imatrix")
    writer.add_string("general.type", "imatrix")
    writer.add_tensor("blk.1.ffn_up_exps.weight.in_sum2", values)
    writer.add_tensor("blk.1.ffn_up_exps.weight.counts", counts.reshape(2, 1))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    loaded = load_imatrix(tmp_path / "m.imatrix.gguf")
    np.testing.assert_allclose(loaded["blk.1.ffn_up_exps.weight"], [[0.5, 1, 1.5, 2], [1, 1, 1, 1]])

    name = b"blk.0.ssm_in.weight"
    legacy = (np.int32(1).tobytes() + np.int32(len(name)).tobytes() + name + np.int32(4).tobytes()
              + np.int32(3).tobytes() + np.array([4, 8, 12], dtype=np.float32).tobytes() + np.int32(4).tobytes())
    (tmp_path / "m.dat").write_bytes(legacy)
    np.testing.assert_allclose(load_imatrix(tmp_path / "m.dat")["blk.0.ssm_in.weight"], [1, 2, 3])


@pytest.mark.parametrize("content", [b"", b"GGUF\x03\x00\x00\x00garbage", b"\xff\xff\xff\x7f" + b"\0" * 20])
def test_damaged_imatrix_is_a_clear_error(tmp_path, content):
    path = tmp_path / "bad.dat"
    path.write_bytes(content)
    with pytest.raises(UsageError, match=r"importance|not a llama\.cpp"):
        load_imatrix(path)


IMATRIX = Path(__file__).parent / "fixtures" / "imatrix"
GOLDEN = Path(__file__).parent / "golden"


def test_real_llama_imatrix_files_load_alike():
    from_gguf, from_dat = load_imatrix(IMATRIX / "tiny.imatrix.gguf"), load_imatrix(IMATRIX / "tiny.imatrix.dat")
    assert set(from_gguf) == set(from_dat) and "blk.1.ffn_up_exps.weight" in from_gguf
    assert from_gguf["blk.1.ffn_up_exps.weight"].shape == (8, 128)  # one row per expert
    for name in from_gguf:
        np.testing.assert_allclose(from_gguf[name].reshape(-1), from_dat[name].reshape(-1), rtol=1e-5)


@pytest.mark.parametrize("fmt", ["gguf", "dat"])
def test_imatrix_use_matches_llama_quantize_binary(tiny_dir, tmp_path, fmt):
    """Same bytes as llama.cpp's llama-quantize given the same imatrix file (its outputs are committed).

    The two formats round the stored means differently, so each has its own llama-quantize output."""
    ours = tmp_path / "ours.gguf"
    convert(tiny_dir, ours, uniform_recipe("q4_0"), imatrix=load_imatrix(IMATRIX / f"tiny.imatrix.{fmt}"))
    got, want = tensors(ours), tensors(GOLDEN / f"llama-quantize-q4_0-imatrix-{fmt}.gguf")
    assert set(got) == set(want)
    for name in want:
        assert T(got[name].tensor_type) == T(want[name].tensor_type), name
        got_bytes, want_bytes = np.asarray(got[name].data).view(np.uint8), np.asarray(want[name].data).view(np.uint8)
        assert np.array_equal(got_bytes, want_bytes), name


def test_imatrix_for_another_model_is_refused(tmp_path, tiny_dir):
    wrong = {"blk.1.ffn_up_exps.weight": np.ones((8, 64), np.float32)}
    with pytest.raises(UsageError, match="made for another model"):
        convert(tiny_dir, tmp_path / "x.gguf", uniform_recipe("q4_0"), imatrix=wrong)
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("recipe", ["q4-moe", "q5-moe", "q8", "small"])
def test_every_recipe_loads_generates_and_info_reports_its_types(tiny_dir, tmp_path, recipe):
    from cascade_local.gguf_info import read_gguf
    from cascade_local.model_summary import summarize

    chosen = load_registry().recipe(recipe)
    out = tmp_path / f"{recipe}.gguf"
    convert(tiny_dir, out, chosen)

    summary = {c.name: set(c.types) for c in summarize(read_gguf(out)).classes}
    ckpt = Checkpoint(tiny_dir)
    policy = chosen.resolve(ckpt.config)
    expected: dict[str, set[str]] = {}
    for t in plan_tensors(ckpt):
        expected.setdefault(t.cls.value, set()).add(policy.type_for(t).name)
    assert summary == expected

    # It runs: eight greedy tokens, loaded as the runtime loads (CPU buffer types this machine can run).
    with LoadedModel(out) as model, Engine(model, n_ctx=64, threads=2) as engine:
        result = engine.generate(Request([10, 20, 30, 40], SamplingParams(temperature=0, ignore_eos=True),
                                         max_tokens=8))
    assert result.completion_tokens == 8 and result.finish_reason == "length"
