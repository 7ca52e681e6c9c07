"""Extra CPU buffer types (AMX, repacking) are used only where a child process saw them run.

This machine is one of the two kinds (AMD without AMX, or an Intel VM where AMX faults). The other kind's path
runs here too, by forcing the verdict: every forced mode loads and gives the same greedy tokens.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from gguf import GGMLQuantizationType as T

from cascade_local import cpu_extra
from cascade_local.cpu_extra import decide, probe_buffer_type, repackable, verdict
from cascade_local.devices import (
    BuftOverrides,
    TensorBuftOverride,
    cpu_buffer_type,
    extra_buffer_types,
    with_forced_buffer,
)
from cascade_local.engine import Engine, Request
from cascade_local.errors import UsageError
from cascade_local.gguf_info import TensorInfo
from cascade_local.llama_log import RECENT
from cascade_local.llama_model import LoadedModel
from cascade_local.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0)


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(cpu_extra.ENV, raising=False)
    cpu_extra.process_verdict.cache_clear()
    yield tmp_path / "cache" / "cascade-local"
    cpu_extra.process_verdict.cache_clear()


# -- the probe -------------------------------------------------------------------------------------------------


def test_the_probe_product_is_a_real_matrix_product():
    """The probe cannot pass vacuously: its product in the plain CPU buffer equals numpy's, within Q8_0 rounding."""
    from cascade_local.ggml_probe import buffer_type_by_name, matmul

    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 256)).astype(np.float32)
    x = rng.standard_normal((32, 256)).astype(np.float32)
    got = matmul(buffer_type_by_name("CPU"), T.Q8_0, w, x)
    want = x @ w.T
    assert np.abs(got - want).max() < 0.02 * np.abs(want).max()
    assert np.abs(got).max() > 1.0  # not zeros


def test_the_probe_of_this_build_ends_in_a_verdict(fresh_cache: Path):
    found = verdict()
    extras = tuple(name for name, _ in extra_buffer_types())
    assert found.source == "probe" and found.extras == extras and set(found.results) == set(extras)
    assert (found.mode, found.reason) == decide(extras, found.results)
    if "AMX" not in extras and "CPU_REPACK" in extras:
        assert found.results["CPU_REPACK"] == "ok" and found.mode == "all"


def test_a_child_killed_by_sigill_is_reported_as_such():
    crash = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGILL)"]
    assert probe_buffer_type("AMX", command=crash) == f"killed by {signal.SIGILL.name}"
    silent = [sys.executable, "-c", "import sys; sys.exit(3)"]
    assert probe_buffer_type("AMX", command=silent).startswith("exited 3 without an answer")


def test_a_probe_that_cannot_start_counts_as_a_failure(tmp_path):
    not_executable = tmp_path / "python"
    not_executable.write_text("")
    said = probe_buffer_type("AMX", command=[str(not_executable), "-m", "cascade_local.ggml_probe", "AMX"])
    assert said.startswith("the probe could not start:")
    assert decide(("CPU_REPACK",), {"CPU_REPACK": said})[0] == "none"


def test_decisions():
    assert decide(("AMX", "CPU_REPACK"), {"AMX": "ok", "CPU_REPACK": "ok"})[0] == "all"
    mode, reason = decide(("AMX", "CPU_REPACK"), {"AMX": "killed by SIGILL", "CPU_REPACK": "ok"})
    assert mode == "repack" and "AMX: killed by SIGILL" in reason
    assert decide(("AMX", "CPU_REPACK"), {"AMX": "killed by SIGILL", "CPU_REPACK": "killed by SIGSEGV"})[0] == "none"
    assert decide(("AMX",), {"AMX": "killed by SIGILL"})[0] == "none"
    assert decide((), {})[0] == "all"


# -- the cache of the verdict ----------------------------------------------------------------------------------


def test_the_verdict_is_cached_per_machine_and_build(fresh_cache: Path, monkeypatch: pytest.MonkeyPatch):
    probes: list[str] = []
    real = cpu_extra.probe_buffer_type
    monkeypatch.setattr(cpu_extra, "probe_buffer_type", lambda name, **kw: probes.append(name) or real(name))
    first = verdict()
    assert first.source == "probe" and probes == list(first.extras)
    path = cpu_extra.cache_path()
    assert path.parent == fresh_cache and json.loads(path.read_text())["mode"] == first.mode
    second = verdict()
    assert second.source == "cache" and (second.mode, second.results) == (first.mode, first.results)
    assert probes == list(first.extras)  # no second probe
    # Another CPU, kernel or llama.cpp build is another key: probed again.
    monkeypatch.setattr(cpu_extra, "cache_key", lambda: "another-build")
    assert verdict().source == "probe" and len(probes) == 2 * len(first.extras)
    # A damaged cache file is probed again and rewritten, never trusted.
    cpu_extra.cache_path().write_text("{not json")
    assert verdict().source == "probe"
    assert json.loads(cpu_extra.cache_path().read_text())["mode"] == first.mode


def test_a_cached_failure_is_obeyed_without_probing(fresh_cache: Path, monkeypatch: pytest.MonkeyPatch):
    """What an AMX VM's cache holds: the verdict is read back, and no child is started."""
    path = cpu_extra.cache_path()
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"mode": "repack", "reason": "AMX: killed by SIGILL", "extras": ["AMX", "CPU_REPACK"],
                                "results": {"AMX": "killed by SIGILL", "CPU_REPACK": "ok"}}))
    monkeypatch.setattr(cpu_extra, "probe_buffer_type", lambda name, **kw: pytest.fail("probed despite the cache"))
    found = verdict()
    assert (found.mode, found.source, found.amx, found.repacking) == ("repack", "cache", False, True)


def test_the_environment_overrides_the_probe(fresh_cache: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(cpu_extra, "probe_buffer_type", lambda name, **kw: pytest.fail("probed despite the override"))
    for value, mode in [("off", "none"), ("repack", "repack"), ("on", "all"), ("OFF", "none")]:
        monkeypatch.setenv(cpu_extra.ENV, value)
        found = verdict()
        assert (found.mode, found.source) == (mode, cpu_extra.ENV)
    monkeypatch.setenv(cpu_extra.ENV, "maybe")
    with pytest.raises(UsageError, match="CASCADE_LOCAL_CPU_EXTRA=maybe is not one of auto, on, repack, off"):
        verdict()


def test_a_bad_override_is_one_line_on_the_command_line(tiny_gguf):
    done = run_cli("run", str(tiny_gguf("q8_0")), "hi", "--max-tokens", "2", env={cpu_extra.ENV: "maybe"})
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "CASCADE_LOCAL_CPU_EXTRA=maybe is not one of" in done.stderr


# -- loading in each mode ----------------------------------------------------------------------------------------


def _safe_modes() -> list[str]:
    """Every mode this machine can run in-process: `all` only where the machine's own verdict allows it."""
    cpu_extra.process_verdict.cache_clear()
    return ["none", "repack"] + (["all"] if verdict().mode == "all" else [])


def _load(path: Path, mode: str, monkeypatch: pytest.MonkeyPatch) -> tuple[list[int], list[str]]:
    monkeypatch.setenv(cpu_extra.ENV, {"all": "on", "repack": "repack", "none": "off"}[mode])
    cpu_extra.process_verdict.cache_clear()
    RECENT.clear()
    model = LoadedModel(path)
    log = list(RECENT)
    assert model.cpu_extra.mode == mode
    engine = Engine(model, n_ctx=512, threads=2)
    try:
        tokens = model.encode_prompt(model.template.render([{"role": "user", "content": "Tell me a story"}]))
        result = engine.generate(Request(tokens, GREEDY, max_tokens=24))
        return [result.completion_tokens, hash(result.reasoning + "|" + result.content)], log
    finally:
        engine.close()
        model.close()


def _repack_buffer(log: list[str]) -> str | None:
    sizes = [line.split("=")[-1].strip() for line in log if "CPU_REPACK model buffer size" in line]
    return sizes[0] if sizes else None


@pytest.mark.parametrize("type_name", ["q4_0", "q8_0"])
def test_every_mode_gives_the_same_greedy_tokens(tiny_gguf, type_name, fresh_cache, monkeypatch):
    path = tiny_gguf(type_name)
    runs = {mode: _load(path, mode, monkeypatch) for mode in _safe_modes()}
    outputs = {mode: out for mode, (out, _) in runs.items()}
    assert len({tuple(o) for o in outputs.values()}) == 1, outputs
    assert _repack_buffer(runs["none"][1]) is None
    if type_name == "q4_0" and "CPU_REPACK" in verdict().extras and "AVX2" in cpu_extra.cpu_features():
        # Repacking kept: the Q4_0 weights are sent to the repack buffer by name, and run there.
        assert any("overridden to CPU_REPACK" in line for line in runs["repack"][1])
        assert _repack_buffer(runs["repack"][1]) is not None
        if "all" in runs and "AMX" not in verdict().extras:
            # Without AMX in the build, `repack` places exactly what llama.cpp's default places.
            assert _repack_buffer(runs["repack"][1]) == _repack_buffer(runs["all"][1])


# -- which tensors go to the repack buffer -----------------------------------------------------------------------


def _tensor(name: str, shape: tuple[int, ...], qtype: T) -> TensorInfo:
    return TensorInfo(name, shape, qtype, 0, 0)


def test_repackable_follows_ggml_rules():
    tensors = [
        _tensor("token_embd.weight", (256, 1024), T.Q4_0),  # a lookup, not a product
        _tensor("output.weight", (256, 1024), T.Q4_0),
        _tensor("blk.1.ffn_up_exps.weight", (256, 64, 8), T.MXFP4),
        _tensor("blk.0.ssm_in.weight", (256, 100), T.Q4_0),  # rows not a multiple of 8
        _tensor("blk.0.attn_q.weight", (256, 256), T.Q8_0),  # no x86 layout
        _tensor("blk.0.attn_norm.weight", (256,), T.F32),
    ]
    assert repackable(tensors, {"AVX2", "AVX512"}) == ["output.weight", "blk.1.ffn_up_exps.weight"]
    assert repackable(tensors, {"SSE3"}) == []


def _overrides(entries: list[tuple[str, int]], n_gpu_layers: int) -> BuftOverrides:
    array = (TensorBuftOverride * (len(entries) + 1))()
    for i, (pattern, buft) in enumerate(entries):
        array[i] = TensorBuftOverride(pattern.encode(), buft)
    array[len(entries)] = TensorBuftOverride(None, None)
    return BuftOverrides(array, [p.encode() for p, _ in entries], n_gpu_layers)


def test_forced_buffer_never_takes_a_tensor_off_the_gpu():
    cpu, gpu, repack = cpu_buffer_type(), 0xD00D, 0xBEEF  # the GPU and repack values are never dereferenced here
    names = ["blk.1.ffn_up_exps.weight", "blk.4.ffn_up_exps.weight", "blk.1.ffn_up_shexp.weight", "output.weight"]
    base = _overrides([(r"blk\.4\.", gpu), (r"_exps", cpu)], n_gpu_layers=99)
    merged = with_forced_buffer(base, names, repack)
    entries = [(e.pattern.decode(), e.buft) for e in merged.array if e.pattern is not None]
    # Only the expert the plan keeps on the CPU is forced; blk.4 stays on the GPU; unnamed tensors are left
    # to llama.cpp (layers are offloaded); the plan's own entries follow, unchanged.
    assert entries == [(r"^blk\.(1)\.ffn_up_exps\.weight$", repack), (r"blk\.4\.", gpu), (r"_exps", cpu)]
    assert merged.n_gpu_layers == 99
    cpu_only = with_forced_buffer(None, names, repack)
    got = [e.pattern.decode() for e in cpu_only.array if e.pattern is not None]
    assert got == [r"^blk\.(1|4)\.ffn_up_exps\.weight$", r"^blk\.(1)\.ffn_up_shexp\.weight$", r"^output\.weight$"]
