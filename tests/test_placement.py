"""The placement planner and `cascade-local plan`: GPU paths on synthetic device sizes, llama.cpp's own numbers
for the tiny model, the ctypes overrides through a real load, and the estimate against measured RSS."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import run_cli
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from cascade_local.errors import CascadeError, UsageError
from cascade_local.gguf_info import GGUFFile, TensorInfo, read_gguf
from cascade_local.placement import (
    CPU,
    EXPERT_REGEX,
    GPU,
    GiB,
    MiB,
    ModelShape,
    PlanError,
    context_memory,
    expert_layers_regex,
    parse_override,
    parse_size,
    plan_placement,
    smallest_budget,
)

ANSI = re.compile(r"\x1b\[")
Q = GGMLQuantizationType
FULL_PATTERN = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"  # Nemotron-Cascade-2's 52 layers
FULL_EXPERT_LAYERS = [i for i, c in enumerate(FULL_PATTERN) if c == "E"]


# -- a synthetic nemotron_h_moe with the real widths: a tensor table only, no file ------------------------------------


def synthetic_model(pattern: str = FULL_PATTERN, qtype: Q = Q.Q8_0) -> GGUFFile:
    """The GGUF header the converter writes for Nemotron-Cascade-2 (widths from its config), without weights."""
    n_embd, vocab, n_exp, n_ff, n_ff_sh = 2688, 131072, 128, 1856, 3712
    d_inner, d_state, n_group, n_ssm_head, n_head, n_kv, hd = 4096, 128, 8, 64, 32, 2, 128
    xbc = d_inner + 2 * n_group * d_state
    tensors: list[TensorInfo] = []

    def add(name: str, shape: tuple[int, ...], ttype: Q = qtype) -> None:
        block, size = GGML_QUANT_SIZES[ttype]
        n = 1
        for d in shape:
            n *= d
        offset = tensors[-1].offset + tensors[-1].nbytes if tensors else 0
        tensors.append(TensorInfo(name, shape, ttype, offset, n // block * size))

    add("token_embd.weight", (n_embd, vocab))
    for il, kind in enumerate(pattern):
        b = f"blk.{il}."
        add(b + "attn_norm.weight", (n_embd,), Q.F32)
        if kind == "M":
            add(b + "ssm_in.weight", (n_embd, 2 * d_inner + 2 * n_group * d_state + n_ssm_head))
            add(b + "ssm_conv1d.weight", (4, xbc), Q.F32)
            add(b + "ssm_conv1d.bias", (xbc,), Q.F32)
            for name in ("ssm_dt.bias", "ssm_a", "ssm_d"):
                add(b + name, (1, n_ssm_head) if name != "ssm_dt.bias" else (n_ssm_head,), Q.F32)
            add(b + "ssm_norm.weight", (d_inner // n_group, n_group), Q.F32)
            add(b + "ssm_out.weight", (d_inner, n_embd))
        elif kind == "E":
            add(b + "ffn_gate_inp.weight", (n_embd, n_exp), Q.F32)
            add(b + "exp_probs_b.bias", (n_exp,), Q.F32)
            add(b + "ffn_up_exps.weight", (n_embd, n_ff, n_exp))
            add(b + "ffn_down_exps.weight", (n_ff, n_embd, n_exp))
            add(b + "ffn_up_shexp.weight", (n_embd, n_ff_sh))
            add(b + "ffn_down_shexp.weight", (n_ff_sh, n_embd))
        else:
            add(b + "attn_q.weight", (n_embd, n_head * hd))
            add(b + "attn_k.weight", (n_embd, n_kv * hd))
            add(b + "attn_v.weight", (n_embd, n_kv * hd))
            add(b + "attn_output.weight", (n_head * hd, n_embd))
    add("output_norm.weight", (n_embd,), Q.F32)
    add("output.weight", (n_embd, vocab))
    a = "nemotron_h_moe."
    meta = {
        "general.architecture": "nemotron_h_moe", a + "vocab_size": vocab, a + "context_length": 262144,
        a + "embedding_length": n_embd, a + "block_count": len(pattern),
        a + "feed_forward_length": [n_ff if c == "E" else 0 for c in pattern],
        a + "attention.head_count": n_head, a + "attention.head_count_kv": [n_kv if c == "*" else 0 for c in pattern],
        a + "attention.key_length": hd, a + "attention.value_length": hd, a + "ssm.conv_kernel": 4,
        a + "ssm.inner_size": d_inner, a + "ssm.state_size": d_state, a + "ssm.time_step_rank": n_ssm_head,
        a + "ssm.group_count": n_group, a + "expert_count": n_exp, a + "expert_used_count": 6,
        a + "expert_feed_forward_length": n_ff, a + "expert_shared_feed_forward_length": n_ff_sh,
    }
    size = tensors[-1].offset + tensors[-1].nbytes
    return GGUFFile(Path("synthetic.gguf"), 3, size, 32, 0, meta, tensors)


FULL = synthetic_model()
SHAPE = ModelShape.from_gguf(FULL)
EXPERT_LAYER_BYTES = sum(t.nbytes for t in FULL.tensors if t.name.startswith("blk.1.ffn_") and "_exps" in t.name)
EXPERT_TENSOR_BYTES = EXPERT_LAYER_BYTES // 2


def gpu_plan(gpu_bytes: int, ctx: int = 32768, parallel: int = 4, **kw):
    return plan_placement(FULL, gpu_bytes=gpu_bytes, ctx=ctx, parallel=parallel, gpu_available=True,
                          gpu_name="test GPU", **kw)


def dense_gpu_bytes(gguf: GGUFFile = FULL) -> int:
    """Everything but the experts and the input embedding, which llama.cpp keeps in host memory."""
    return sum(t.nbytes for t in gguf.tensors if not re.search(EXPERT_REGEX, t.name) and t.name != "token_embd.weight")


# -- sizes and overrides as typed ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("8GiB", 8 << 30), ("8GB", 8 * 10**9), ("8000MiB", 8000 << 20), ("0", 0), ("8 GiB", 8 << 30),
    ("1.5gib", 3 << 29), ("8G", 8 << 30), ("512k", 512 << 10), ("123", 123), ("2TB", 2 * 10**12),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["8 parsecs", "", "GiB", "-1GiB", "eight", "8GiBs", "nan", "inf", "1e9"])
def test_parse_size_refuses(text):
    with pytest.raises(UsageError, match=r"cannot read .* as a memory size"):
        parse_size(text)


def test_parse_override():
    regex = r"blk\.(1|4)\.ffn_(up|down)_exps\.weight"
    assert parse_override(regex + "=CPU") == [(regex, CPU)]
    assert parse_override("output=CUDA0,token_embd=cpu") == [("output", GPU), ("token_embd", CPU)]
    assert parse_override("exps=CUDA_Host") == [("exps", CPU)]  # pinned host memory is RAM
    assert parse_override("exps=Vulkan0") == [("exps", GPU)]


@pytest.mark.parametrize(("text", "message"), [
    ("blk.1.ffn", "write REGEX=DEVICE"), ("=CPU", "write REGEX=DEVICE"), ("blk=", "write REGEX=DEVICE"),
    ("blk=CU DA", "not a device"), ("blk.(1=CPU", "not a valid regular expression"),
])
def test_parse_override_refuses(text, message):
    with pytest.raises(UsageError, match=message):
        parse_override(text)


def test_expert_regex_names_whole_layers_only():
    pattern = re.compile(expert_layers_regex([1, 3]))
    assert [t.name for t in FULL.tensors if pattern.search(t.name)] == [
        "blk.1.ffn_up_exps.weight", "blk.1.ffn_down_exps.weight", "blk.3.ffn_up_exps.weight",
        "blk.3.ffn_down_exps.weight"]  # and not blk.13 nor blk.31


# -- the model's memory, as llama.cpp sizes it -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def heads_gguf(tmp_path_factory) -> Path:
    """Nemotron-Cascade-2's attention and Mamba widths, its 131,072-token vocabulary, and little else (3 layers,
    n_embd 64, 8 small experts): what sizes the KV cache, the Mamba state and the logits, as llama.cpp sees it."""
    from cascade_local.convert import convert, uniform_recipe

    from cascade_local.testing.checkpoint_fixture import TINY_SCALES, real_config, write_checkpoint

    cfg = {**real_config(), "hidden_size": 64, "hybrid_override_pattern": "M*E", "num_hidden_layers": 3,
           "n_routed_experts": 8, "moe_intermediate_size": 64, "moe_shared_expert_intermediate_size": 96}
    folder = tmp_path_factory.mktemp("heads")
    out = folder / "heads.gguf"
    convert(write_checkpoint(folder / "ckpt", cfg, seed=3, scales=TINY_SCALES, shard_bytes=256 << 20), out,
            uniform_recipe("q8_0"))
    return out


def test_full_model_shape(heads_gguf):
    assert SHAPE.attention_layers == [i for i, c in enumerate(FULL_PATTERN) if c == "*"]
    assert len(SHAPE.recurrent_layers) == 23 and len(SHAPE.attention_layers) == 6
    # One attention and one Mamba layer at the real widths, as llama.cpp sizes them: many cells and sequences,
    # so that its MiB rounded to 0.01 pin the bytes per cell (exactly) and per sequence (to ~80 bytes).
    n_cells, n_seq = 65536, 64
    kv_per_layer = _llama_context_log(heads_gguf, n_cells, 1)["kv"] * MiB / n_cells
    state_per_layer = _llama_context_log(heads_gguf, 256 * n_seq, n_seq)["rs"] * MiB / n_seq
    assert SHAPE.kv_bytes_per_cell == 6 * round(kv_per_layer)  # 6 KiB per token
    assert SHAPE.state_bytes_per_seq == pytest.approx(23 * state_per_layer, rel=1e-4)  # 47.6 MiB per sequence


@pytest.mark.parametrize(("ctx", "parallel"), [(1000, 3), (100, 3), (4097, 1), (32768, 4)])
def test_context_padding_follows_llama_cpp(heads_gguf, ctx, parallel):
    shape = ModelShape.from_gguf(read_gguf(heads_gguf))
    m = context_memory(shape, ctx, parallel)
    log = _llama_context_log(heads_gguf, ctx * parallel, parallel)  # what llama.cpp makes of the plain product
    assert (m.n_ctx, m.n_ctx_seq, m.n_seq_max) == (log["n_ctx"], log["n_ctx_seq"], parallel)
    assert m.kv / MiB == pytest.approx(log["kv"], abs=0.01) and m.state / MiB == pytest.approx(log["rs"], abs=0.01)
    # The full model has 6 such attention layers: 32768 tokens in each of 4 sequences take 768 MiB.
    full = context_memory(SHAPE, ctx, parallel)
    assert full.kv == pytest.approx(6 * log["kv"] * MiB, abs=6 * 0.005 * MiB)


def _llama_context_log(path: Path, n_ctx: int, n_seq: int, n_ubatch: int = 512,
                       n_outputs_max: int | None = None) -> dict[str, float]:
    """MiB sizes, and the context sizes, from llama.cpp's own log lines at context creation."""
    import llama_cpp.llama_cpp as lib

    from cascade_local.llama_log import RECENT, quiet_llama

    quiet_llama()
    RECENT.clear()
    mp = lib.llama_model_default_params()
    model = lib.llama_model_load_from_file(str(path).encode(), mp)
    assert model
    cp = lib.llama_context_default_params()
    cp.n_ctx, cp.n_seq_max, cp.n_ubatch = n_ctx, n_seq, n_ubatch
    if n_outputs_max is not None:
        cp.n_outputs_max = n_outputs_max
    ctx = lib.llama_init_from_model(model, cp)
    assert ctx
    lines = list(RECENT)
    lib.llama_free(ctx)
    lib.llama_model_free(model)

    def value(pattern: str, pick: Callable[[list[float]], float] = lambda hits: hits[-1]) -> float:
        hits = [float(m.group(1)) for line in lines if (m := re.search(pattern, line))]
        assert hits, (pattern, lines[-20:])
        return pick(hits)

    return {"kv": value(r"llama_kv_cache: size = +([\d.]+) MiB"),
            "rs": value(r"llama_memory_recurrent: size = +([\d.]+) MiB"),
            "compute": value(r"CPU compute buffer size = +([\d.]+) MiB"),
            "output": value(r"output buffer size = +([\d.]+) MiB"),
            "n_ctx": value(r"llama_context: n_ctx += (\d+)"),
            "n_ctx_seq": value(r"llama_context: n_ctx_seq += (\d+)"),
            # The most logits rows of any graph it reserves memory for.
            "n_outputs": value(r"graph_reserve: reserving a graph .*n_outputs = +(\d+)", max)}


def test_n_outputs_max_shrinks_the_reserved_logits(heads_gguf):
    shape = ModelShape.from_gguf(read_gguf(heads_gguf))
    full, few = context_memory(shape, 8192, 4), context_memory(shape, 8192, 4, n_outputs_max=4)
    log_full = _llama_context_log(heads_gguf, full.n_ctx, 4)
    log_few = _llama_context_log(heads_gguf, few.n_ctx, 4, n_outputs_max=4)
    # The rows llama.cpp reserves logits for: a whole micro-batch by default, one per sequence when asked.
    assert (full.n_outputs, few.n_outputs) == (log_full["n_outputs"], log_few["n_outputs"]) == (512, 4)
    # By default 512 rows of 131,072 logits (256 MiB) are the compute buffer's peak, in llama.cpp's log too.
    assert full.compute == full.logits_peak and abs(full.compute / MiB - log_full["compute"]) < 1.0
    assert log_full["compute"] - log_few["compute"] > 180  # asking for 4 rows frees most of it


@pytest.mark.parametrize(("ctx", "parallel"), [(4096, 1), (1024, 4), (8192, 4)])
def test_tiny_memory_matches_llama_cpp_log(tiny_gguf, ctx, parallel):
    path = tiny_gguf("q8_0")
    shape = ModelShape.from_gguf(read_gguf(path))
    m = context_memory(shape, ctx, parallel)
    log = _llama_context_log(path, m.n_ctx, parallel)
    assert m.kv / MiB == pytest.approx(log["kv"], abs=0.01)
    assert m.state / MiB == pytest.approx(log["rs"], abs=0.01)
    assert m.output / MiB == pytest.approx(log["output"], abs=0.01)
    assert abs(m.compute / MiB - log["compute"]) < 1.0  # the fitted formula; see placement's module doc


# -- where tensors go -------------------------------------------------------------------------------------------------


def test_budget_zero_puts_everything_on_the_cpu():
    plan = gpu_plan(0)
    assert plan.mode == CPU and plan.why_cpu == "--gpu-mem 0" and plan.n_gpu_layers == 0 and plan.overrides == ()
    assert {t.device for t in plan.tensors} == {CPU} and plan.need(GPU) == 0
    m = plan.memory
    assert plan.need(CPU) == FULL.tensors[-1].offset + FULL.tensors[-1].nbytes + m.kv + m.state + m.compute + m.output


def test_cpu_only_build_says_so_and_ignores_gpu_overrides():
    plan = plan_placement(FULL, gpu_bytes=8 * GiB, ctx=4096, gpu_available=False, overrides=[("output", GPU)])
    assert plan.mode == CPU and {t.device for t in plan.tensors} == {CPU}
    assert plan.verdict.startswith("CPU-only build: everything on the CPU")
    assert any("GPU overrides ignored" in n for n in plan.notes)


def test_huge_budget_puts_everything_but_the_input_layer_on_the_gpu():
    plan = gpu_plan(1 << 40)
    on_cpu = [t.name for t in plan.tensors if t.device == CPU]
    assert on_cpu == ["token_embd.weight"]  # llama.cpp's input layer stays in host memory
    assert plan.overrides == () and plan.n_gpu_layers == 53 and plan.expert_copy == 0
    assert plan.expert_layers(GPU) == FULL_EXPERT_LAYERS and "all experts on the GPU" in plan.verdict
    m = plan.memory
    assert plan.need(GPU) == sum(t.nbytes for t in plan.tensors if t.device == GPU) + m.kv + m.state + m.compute


def test_in_between_fills_whole_expert_layers_in_order():
    m = context_memory(SHAPE, 32768, 4, n_outputs_max=4)  # one row of logits per sequence, as planned
    base = dense_gpu_bytes() + m.kv + m.state + m.compute + EXPERT_TENSOR_BYTES  # + one expert copy (op_offload)
    budget = smallest_budget(base + 5 * EXPERT_LAYER_BYTES)
    plan = gpu_plan(budget)
    assert plan.expert_layers(GPU) == [1, 3, 6, 8, 10]
    assert plan.expert_layers(CPU) == FULL_EXPERT_LAYERS[5:]
    assert plan.overrides == ((expert_layers_regex(FULL_EXPERT_LAYERS[5:]), CPU),)
    assert plan.override_args()[0].startswith(r"blk\.(13|15|17|20|") and plan.override_args()[0].endswith("=CPU")
    assert plan.expert_copy == EXPERT_TENSOR_BYTES
    assert plan.need(GPU) + plan.headroom_gpu <= budget  # headroom respected
    assert gpu_plan(budget - 1).expert_layers(GPU) == [1, 3, 6, 8]  # one byte less: one layer less
    assert "experts of 5 of 23 MoE layers on the GPU (1, 3, 6, 8, 10)" in plan.verdict


def test_an_8gib_gpu_holds_the_dense_part_and_three_expert_layers():
    # Q8_0 at 4 × 32768 tokens: dense 1.86 GiB + KV 768 MiB + state 190 MiB + compute 118 MiB (logits reserved for
    # one row per sequence, not 512: 256 MiB less) + one expert copy 647 MiB = 3.54 GiB; 8 GiB less 666 MiB
    # headroom leaves 3.81 GiB: three expert layers of 1.26 GiB (two with llama.cpp's default n_outputs_max).
    plan = gpu_plan(8 * GiB)
    assert plan.expert_layers(GPU) == [1, 3, 6]
    assert plan.need(GPU) + plan.headroom_gpu <= 8 * GiB < plan.need(GPU) + plan.headroom_gpu + EXPERT_LAYER_BYTES


def test_kv_cache_and_state_take_room_from_experts():
    layers = [len(gpu_plan(12 * GiB, ctx=ctx, parallel=p).expert_layers(GPU)) for ctx, p in
              [(4096, 1), (65536, 4), (262144, 4)]]
    assert layers[0] > layers[1] > layers[2]


def test_cpu_moe_keeps_every_expert_on_the_cpu():
    plan = gpu_plan(1 << 40, cpu_moe=True)
    assert plan.expert_layers(GPU) == [] and plan.expert_layers(CPU) == FULL_EXPERT_LAYERS
    assert plan.overrides == ((EXPERT_REGEX, CPU),)
    assert {t.why for t in plan.tensors if re.search(EXPERT_REGEX, t.name)} == {"--cpu-moe"}
    assert plan.expert_copy == EXPERT_TENSOR_BYTES


def test_n_cpu_moe_keeps_the_first_layers_on_the_cpu():
    plan = gpu_plan(1 << 40, n_cpu_moe=7)  # llama.cpp: blk.i for i < 7, i.e. expert layers 1, 3 and 6
    assert plan.expert_layers(CPU) == [1, 3, 6]
    assert plan.expert_layers(GPU) == FULL_EXPERT_LAYERS[3:]
    assert [r for r, _ in plan.overrides] == [rf"blk\.{i}" + EXPERT_REGEX for i in range(7)]


def test_raw_overrides_win():
    plan = gpu_plan(1 << 40, cpu_moe=True, overrides=[(r"blk\.1\.ffn_up_exps", GPU), (r"^output\.", CPU)])
    device = {t.name: t.device for t in plan.tensors}
    assert device["blk.1.ffn_up_exps.weight"] == GPU and device["blk.1.ffn_down_exps.weight"] == CPU
    assert device["output.weight"] == CPU and device["output_norm.weight"] == GPU
    # llama.cpp takes the first matching pattern: the raw overrides come first.
    assert plan.overrides[:2] == ((r"blk\.1\.ffn_up_exps", GPU), (r"^output\.", CPU))
    assert plan.overrides[2] == (EXPERT_REGEX, CPU)


# -- refusals -------------------------------------------------------------------------------------------------------


def test_budget_too_small_for_the_dense_part_says_how_much_is_needed():
    m = context_memory(SHAPE, 256, 1, n_outputs_max=1)
    need = dense_gpu_bytes() + m.kv + m.state + m.compute + EXPERT_TENSOR_BYTES
    with pytest.raises(PlanError, match="too small for the dense part") as err:
        gpu_plan(1 * GiB, ctx=256, parallel=1)
    needed = float(re.search(r"needs a budget of at least ([\d.]+) GiB", str(err.value)).group(1))
    assert needed == pytest.approx(smallest_budget(need) / GiB, abs=0.005)
    assert "--gpu-mem 0" in str(err.value) and err.value.exit_code == 2
    assert gpu_plan(smallest_budget(need), ctx=256, parallel=1).expert_layers(GPU) == []  # that budget works
    with pytest.raises(PlanError, match="too small for the dense part"):
        gpu_plan(smallest_budget(need) - 1, ctx=256, parallel=1)


@pytest.mark.parametrize("model", ["experts pinned to the GPU", "dense model"])
def test_budget_too_small_with_no_expert_left_to_place(model):
    # Nothing is flexible and nothing is on the CPU: the op_offload copy has no candidate and is 0.
    if model == "dense model":
        gguf = synthetic_model("MM*MM")
        args = {}
    else:
        gguf, args = FULL, {"overrides": parse_override("exps=CUDA0")}
    with pytest.raises(PlanError, match="too small for the dense part") as err:
        plan_placement(gguf, gpu_bytes=1 * MiB, ctx=256, gpu_available=True, **args)
    m = context_memory(ModelShape.from_gguf(gguf), 256, 1, n_outputs_max=1)
    pinned = sum(t.nbytes for t in gguf.tensors if re.search(EXPERT_REGEX, t.name))
    need = dense_gpu_bytes(gguf) + pinned + m.kv + m.state + m.compute
    needed, unit = re.search(r"needs a budget of at least ([\d.]+) (GiB|MiB)", str(err.value)).groups()
    assert float(needed) == pytest.approx(smallest_budget(need) / (GiB if unit == "GiB" else MiB), abs=0.005)
    plan = plan_placement(gguf, gpu_bytes=smallest_budget(need), ctx=256, gpu_available=True, **args)
    assert plan.expert_copy == 0 and plan.weights(CPU) == sum(t.nbytes for t in gguf.tensors
                                                             if t.name == "token_embd.weight")


def test_context_too_large_for_the_gpu_names_the_largest_that_fits():
    with pytest.raises(PlanError) as err:
        gpu_plan(4 * GiB, ctx=1_000_000, parallel=4)
    largest = int(re.search(r"largest --ctx that fits with --parallel 4 is (\d+)", str(err.value)).group(1))
    assert largest % 256 == 0 and largest > 0
    gpu_plan(4 * GiB, ctx=largest, parallel=4)  # fits
    with pytest.raises(PlanError):
        gpu_plan(4 * GiB, ctx=largest + 1, parallel=4)
    assert "fewer --parallel" in str(err.value)


def test_context_too_large_for_ram_names_the_largest_that_fits():
    ram = 40 * GiB
    with pytest.raises(PlanError, match="available RAM") as err:
        plan_placement(FULL, gpu_bytes=0, ctx=4_000_000, parallel=1, gpu_available=False, ram_bytes=ram)
    largest = int(re.search(r"is (\d+)", str(err.value)).group(1))
    plan = plan_placement(FULL, gpu_bytes=0, ctx=largest, parallel=1, gpu_available=False, ram_bytes=ram)
    assert plan.need(CPU) + plan.headroom_cpu <= ram


def test_weights_larger_than_ram_are_refused():
    with pytest.raises(PlanError, match="not enough RAM"):
        plan_placement(FULL, gpu_bytes=0, ctx=4096, gpu_available=False, ram_bytes=8 * GiB)


@pytest.mark.parametrize(("kw", "message"), [
    ({"ctx": 0}, "--ctx must be at least 1"), ({"parallel": 0}, "--parallel must be between 1 and 256"),
    ({"parallel": 257}, "--parallel must be"), ({"n_cpu_moe": -1}, "--n-cpu-moe"),
    ({"ctx": 1 << 31, "parallel": 4}, "more tokens than llama.cpp can address"),
])
def test_bad_arguments(kw, message):
    args = {"gpu_bytes": 0, "ctx": 4096, "parallel": 1, "gpu_available": False, **kw}
    with pytest.raises(UsageError, match=message):
        plan_placement(FULL, **args)


# -- the ctypes overrides through a real load ---------------------------------------------------------------------


def test_buft_overrides_reach_llama_cpp(tiny_gguf):
    import llama_cpp.llama_cpp as lib

    from cascade_local.devices import buffer_type_name, tensor_buft_overrides
    from cascade_local.llama_log import RECENT, quiet_llama

    quiet_llama()
    RECENT.clear()
    holder = tensor_buft_overrides([(r"blk\.\d+\.ffn_(up|down)_exps\.weight", CPU)])
    assert buffer_type_name(holder.array[0].buft) == "CPU" and holder.array[1].pattern is None
    params = lib.llama_model_default_params()
    holder.apply(params)
    model = lib.llama_model_load_from_file(str(tiny_gguf("q8_0")).encode(), params)
    assert model
    try:
        moved = [line for line in RECENT if "buffer type overridden" in line]
        assert sorted(line.split()[1] for line in moved) == [
            "blk.1.ffn_down_exps.weight", "blk.1.ffn_up_exps.weight",
            "blk.4.ffn_down_exps.weight", "blk.4.ffn_up_exps.weight"]
        assert all(line.endswith("overridden to CPU") for line in moved)
    finally:
        lib.llama_model_free(model)


def test_devices_on_this_build():
    from cascade_local.devices import gpu_devices, gpu_offload_supported, resolve_gpu_budget, system_memory

    total, available = system_memory()
    assert total and available and 0 < available <= total
    budget = resolve_gpu_budget("auto")
    if gpu_offload_supported():
        assert budget.available == bool(gpu_devices())
    else:
        assert not budget.available and budget.source == "CPU-only build" and gpu_devices() == []
    assumed = resolve_gpu_budget("auto", assume_gpu="6GiB")
    assert assumed.available and assumed.nbytes == 6 * GiB
    assert resolve_gpu_budget("2GiB", assume_gpu="6GiB").nbytes == 2 * GiB


# -- the command --------------------------------------------------------------------------------------------------


def test_plan_table_on_this_build(tiny_gguf):
    result = run_cli("plan", str(tiny_gguf("q8_0")), "--ctx", "4096", "--parallel", "2")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for row in ("token_embd", "expert_up", "KV cache (8192 cells, f16)", "Mamba state (2 sequences, f32)",
                "compute buffers", "headroom", "total", "n_ctx=8192 n_seq_max=2", "verdict"):
        assert row in out, row
    from cascade_local.devices import gpu_offload_supported

    if not gpu_offload_supported():
        assert "CPU-only build: everything on the CPU" in out and "n_gpu_layers=0" in out
    assert not ANSI.search(out + result.stderr)


def test_plan_ctx_has_the_same_floor_as_the_commands_that_load():
    """plan --ctx 1 was planned while run, chat, batch and serve refuse under 256 tokens."""
    for command in (["plan"], ["run", "Hi"]):
        result = run_cli(command[0], "some-model.gguf", *command[1:], "--ctx", "100", input="")
        assert result.returncode == 1, (command, result.stderr)
        assert "--ctx must be at least 256 tokens, or auto (got 100)" in result.stderr


@pytest.mark.parametrize("extra", [[], ["--assume-gpu", "1GiB"]])
def test_plan_verdict_gives_the_tables_ram_total(tiny_gguf, extra):
    """The verdict's RAM once looked like a disagreement with the table (66 MiB against a 1.46 GiB total): it
    leaves out the headroom, so it now also gives the table's total, with headroom."""
    result = run_cli("plan", str(tiny_gguf("q8_0")), "--ctx", "4096", *extra, env={"COLUMNS": "300"})
    assert result.returncode == 0, result.stderr
    total = re.search(r"^\s*total\s.*?([\d.]+ [KMG]iB)\s*$", result.stdout, re.M).group(1)  # the RAM column
    verdict = next(line for line in result.stdout.splitlines() if line.startswith("verdict"))
    assert f"{total} with headroom" in verdict, (total, verdict)


def test_plan_json_with_an_assumed_gpu(tiny_gguf):
    result = run_cli("plan", str(tiny_gguf("q8_0")), "--assume-gpu", "2GiB", "--ctx", "4096", "--parallel", "4",
                     "--n-cpu-moe", "2", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["mode"] == GPU and data["gpu"]["budget"] == 2 * GiB
    assert data["gpu_source"].startswith("--assume-gpu, a planning aid")
    assert data["llama"]["n_ctx"] == 16384 and data["llama"]["n_seq_max"] == 4
    assert data["expert_layers"] == {"gpu": [4], "cpu": [1]}
    assert data["llama"]["tensor_buft_overrides"][0] == {"pattern": r"blk\.0" + EXPERT_REGEX, "device": CPU}
    assert {c["class"] for c in data["classes"]} >= {"expert_up", "token_embd", "attn_qkv"}
    assert data["memory"]["kv_device"] == GPU and data["verdict"].startswith("fits:")


def test_plan_table_with_an_assumed_gpu_shows_the_overrides(tiny_gguf):
    result = run_cli("plan", str(tiny_gguf("q8_0")), "--gpu-mem", "1GiB", "--assume-gpu", "8GiB", "--cpu-moe",
                     "--override-tensor", r"blk\.4\.ffn_up_exps=CUDA0")
    assert result.returncode == 0, result.stderr
    assert r"blk\.4\.ffn_up_exps=CUDA0" in result.stdout and EXPERT_REGEX + "=CPU" in result.stdout
    assert "1.00 GiB of an assumed GPU (--assume-gpu, a planning aid" in result.stdout


@pytest.mark.parametrize(("args", "code", "message"), [
    (["--gpu-mem", "8 parsecs"], 1, "cannot read '8 parsecs' as a memory size"),
    (["--override-tensor", "blk.1"], 1, "write REGEX=DEVICE"),
    (["--parallel", "0"], 1, "--parallel must be between 1 and 256"),
    (["--ctx", "0"], 1, "--ctx must be at least 256 tokens"),
    (["--assume-gpu", "8GiB", "--gpu-mem", "200MiB"], 2, "too small for the dense part"),
    (["--ctx", "1000000000", "--parallel", "4"], 2, "largest --ctx that fits"),
    # Every expert pinned to the GPU and no room for the dense part: once a max() of an empty list (issue 16).
    (["--assume-gpu", "1MiB", "--gpu-mem", "1MiB", "-ot", "exps=CUDA0"], 2, "too small for the dense part"),
])
def test_plan_errors(tiny_gguf, args, code, message):
    result = run_cli("plan", str(tiny_gguf("q8_0")), *args)
    assert result.returncode == code, result.stderr
    assert result.stdout == "" and message in result.stderr and result.stderr.startswith("error:")
    assert "Traceback" not in result.stderr and not ANSI.search(result.stderr)


def test_plan_missing_model(tmp_path):
    result = run_cli("plan", str(tmp_path / "nope.gguf"))
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_plan_help_has_an_example():
    result = run_cli("plan", "--help")
    assert result.returncode == 0 and "Example: cascade-local plan" in result.stdout
    assert "--assume-gpu" not in result.stdout  # a planning aid, not a user option


# -- the estimate against measured memory ---------------------------------------------------------------------------

# Loads with load_mode NONE, so the weights are read into anonymous memory and all count in RSS (mmap'd pages only
# count once touched). Then a prompt of one full n_ubatch with logits for its last token only, as a chat prefill
# asks: that runs the compute graph over its whole batch (asking logits for every token would also grow the logits
# output buffer to n_ubatch rows, 256 MiB on the real vocabulary, which a generation loop never does).
RSS_PROBE = r"""
import json, sys
import llama_cpp.llama_cpp as lib
from cascade_local.llama_log import quiet_llama

def rss():
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS:"))

path, n_ctx, n_seq, n_ubatch = sys.argv[1], *map(int, sys.argv[2:5])
quiet_llama()
lib.llama_backend_init()
before = rss()
mp = lib.llama_model_default_params()
mp.load_mode = lib.LLAMA_LOAD_MODE_NONE
# Extra CPU buffer types only where this machine runs them (AMX faults on some Intel VMs): see cpu_extra.
from cascade_local.cpu_extra import process_verdict
mp.use_extra_bufts = process_verdict().mode == "all"
model = lib.llama_model_load_from_file(path.encode(), mp)
cp = lib.llama_context_default_params()
cp.n_ctx, cp.n_seq_max, cp.n_ubatch = n_ctx, n_seq, n_ubatch
cp.n_outputs_max = n_seq  # as the engine (and so the plan) has it: one row of logits per sequence
cp.n_threads = cp.n_threads_batch = 2
ctx = lib.llama_init_from_model(model, cp)
n = lib.llama_n_ubatch(ctx)
n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model))
batch = lib.llama_batch_init(n, 0, 1)
for i in range(n):
    batch.token[i], batch.pos[i], batch.n_seq_id[i] = 3 + i % (n_vocab - 3), i, 1
    batch.seq_id[i][0], batch.logits[i] = 0, i == n - 1
batch.n_tokens = n
assert lib.llama_decode(ctx, batch) == 0
print(json.dumps({"rss_growth": rss() - before}))
"""


def measure(path: Path, ctx: int, parallel: int) -> tuple[int, int]:
    """(estimate, measured RSS growth) in bytes for a CPU-only plan of `path`."""
    plan = plan_placement(read_gguf(path), gpu_bytes=0, ctx=ctx, parallel=parallel, gpu_available=False)
    m = plan.memory
    result = subprocess.run([sys.executable, "-c", RSS_PROBE, str(path), str(m.n_ctx), str(parallel),
                             str(m.n_ubatch)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return plan.need(CPU), json.loads(result.stdout)["rss_growth"]


def test_estimate_against_rss_on_the_tiny_model(tiny_gguf):
    estimate, measured = measure(tiny_gguf("q8_0"), 4096, 4)
    print(f"tiny: estimate {estimate / MiB:.1f} MiB, measured {measured / MiB:.1f} MiB")
    # A few MiB of llama.cpp's own bookkeeping (vocabulary, graph, threads) dominate a model this small.
    assert abs(measured - estimate) < 8 * MiB


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("CASCADE_LOCAL_SLICE_GGUF"),
                    reason="set CASCADE_LOCAL_SLICE_GGUF to a GGUF of bench/out/slice-v2-MEM_x_E")
def test_estimate_against_rss_on_the_slice():
    estimate, measured = measure(Path(os.environ["CASCADE_LOCAL_SLICE_GGUF"]), 32768, 4)
    print(f"slice: estimate {estimate / MiB:.1f} MiB, measured {measured / MiB:.1f} MiB")
    assert abs(measured - estimate) <= 0.15 * measured


def test_plan_errors_are_cascade_errors():
    assert issubclass(PlanError, CascadeError) and PlanError.exit_code == 2


@pytest.mark.parametrize(("parallel", "n_ubatch"), [(1, 512), (16, 512), (64, 512), (64, 1024)])
def test_compute_counts_the_mamba_states_of_many_sequences(heads_gguf, parallel, n_ubatch):
    # serve --parallel N reserves logits for N rows only, and then a Mamba layer's scan, which returns the state of
    # every sequence in the micro-batch (2 MiB each at the real widths), is the compute buffer's peak.
    shape = ModelShape.from_gguf(read_gguf(heads_gguf))
    m = context_memory(shape, 2048, parallel, n_outputs_max=parallel, n_ubatch=n_ubatch)
    log = _llama_context_log(heads_gguf, m.n_ctx, parallel, n_outputs_max=parallel, n_ubatch=n_ubatch)
    assert m.compute / MiB == pytest.approx(log["compute"], rel=0.05)


def test_the_engine_reserves_one_row_of_logits_per_sequence(heads_gguf):
    from cascade_local.engine import Engine
    from cascade_local.llama_log import RECENT, quiet_llama
    from cascade_local.llama_model import LoadedModel

    quiet_llama()
    RECENT.clear()
    shape = ModelShape.from_gguf(read_gguf(heads_gguf))
    planned = context_memory(shape, 1024, 4, n_outputs_max=4)
    with Engine(LoadedModel(heads_gguf), n_ctx=planned.n_ctx, n_seq_max=4, owns_model=True) as engine:
        lines = list(RECENT)
        # Not the default whole batch: 512 rows of this vocabulary would be 256 MiB more.
        rows = [int(m.group(1)) for line in lines if (m := re.search(r"graph_reserve: .*n_outputs = +(\d+)", line))]
        assert max(rows) == 4
        compute = [float(m.group(1)) for line in lines if (m := re.search(r"CPU compute buffer size = +([\d.]+)",
                                                                           line))]
        assert planned.compute / MiB == pytest.approx(compute[-1], rel=0.05)
        with pytest.raises(ValueError, match="5 rows of logits"):  # refused, where llama.cpp would abort
            engine._fill([(0, 20 + i, i, True) for i in range(5)])
