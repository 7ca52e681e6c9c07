"""Two jobs writing the same output: real conversions and pulls in child processes, overlapping on purpose.

To make the overlap certain, job A is paused (SIGSTOP) once its temporary file exists, that is while it
holds the output's lock in the middle of writing; job B starts then, and A resumes once B has said it waits.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from cascade_local.convert import convert, uniform_recipe
from conftest import CLI

from cascade_local.registry import load_registry
from cascade_local.testing.checkpoint_fixture import TINY_CONFIG, TINY_SCALES, write_checkpoint


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory) -> Path:
    """About 54 MB: a conversion writes for a few tenths of a second, long enough to be caught mid-way."""
    cfg = {**TINY_CONFIG, "hidden_size": 512, "hybrid_override_pattern": "MEMEME", "num_hidden_layers": 6,
           "n_routed_experts": 32, "moe_intermediate_size": 256, "moe_shared_expert_intermediate_size": 256}
    return write_checkpoint(tmp_path_factory.mktemp("small") / "small", cfg, seed=1, scales=TINY_SCALES,
                            shard_bytes=64 << 20)


@pytest.fixture(scope="module")
def reference(small_checkpoint, tmp_path_factory) -> bytes:
    """The bytes of one conversion made alone."""
    out = tmp_path_factory.mktemp("ref") / "ref.gguf"
    convert(small_checkpoint, out, uniform_recipe("q8_0"))
    return out.read_bytes()


def start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "NO_COLOR": "1", **(env or {})})


def pause_once_writing(proc: subprocess.Popen, folder: Path, timeout: float = 60) -> None:
    """SIGSTOP `proc` as soon as a temporary `.partial` file shows up anywhere under `folder`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.name.endswith(".partial") for p in folder.rglob(".*")):
            proc.send_signal(signal.SIGSTOP)
            return
        assert proc.poll() is None, f"job A ended before it was caught writing: {proc.communicate()}"
        time.sleep(0.002)
    raise AssertionError("job A never started writing")


def wait_for_line(proc: subprocess.Popen, text: str, timeout: float = 60) -> str | None:
    """Reads `proc`'s stderr until a line holding `text`; None if the process ends first (without waiting)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            return None
        if text in line:
            return line.strip()
    raise AssertionError(f"no {text!r} on stderr in {timeout} s")


def leftovers(folder: Path, keep: set[str]) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name not in keep)


@pytest.mark.parametrize("force", [False, True])
def test_two_overlapping_conversions_to_one_output(small_checkpoint, reference, tmp_path, force):
    out = tmp_path / "o.gguf"
    extra = ["--force"] if force else []
    a = start("convert", str(small_checkpoint), "-o", str(out), "--type", "q8_0")
    try:
        pause_once_writing(a, tmp_path)
        b = start("convert", str(small_checkpoint), "-o", str(out), "--type", "q8_0", *extra)
        try:
            said = wait_for_line(b, "waiting")
        finally:
            a.send_signal(signal.SIGCONT)
        _, a_err = a.communicate(timeout=120)
        _, b_err = b.communicate(timeout=120)
    finally:
        for p in (a, locals().get("b")):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    assert out.read_bytes() == reference, "the output is not one conversion's bytes"
    umask = os.umask(0o022)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # an ordinary file, not a private temporary one
    assert a.returncode == 0, a_err
    assert said == f"another conversion of {out} is running; waiting"
    if force:  # B waited, then replaced A's file with its own, whole
        assert b.returncode == 0, b_err
    else:  # B waited, then found the file A made
        assert b.returncode == 1 and "already exists; pass --force" in b_err, b_err
    assert leftovers(tmp_path, {"o.gguf"}) == []


def test_two_overlapping_pulls_of_one_model(small_checkpoint, tmp_path):
    alone = tmp_path / "alone.gguf"
    convert(small_checkpoint, alone, load_registry().recipe("q8"), name="small")  # what one pull makes
    home = tmp_path / "home"
    home.mkdir()
    env = {"CASCADE_LOCAL_HOME": str(home)}
    args = ("pull", str(small_checkpoint), "--recipe", "q8")
    a = start(*args, env=env)
    try:
        pause_once_writing(a, home)
        b = start(*args, env=env)
        try:
            said = wait_for_line(b, "waiting")
        finally:
            a.send_signal(signal.SIGCONT)
        a_out, a_err = a.communicate(timeout=120)
        b_out, b_err = b.communicate(timeout=120)
    finally:
        for p in (a, locals().get("b")):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    model = home / "models" / "small" / "small-q8.gguf"
    assert model.read_bytes() == alone.read_bytes(), "the model is not one conversion's bytes"
    assert a.returncode == 0 and b.returncode == 0, (a_err, b_err)
    assert said == "another pull of small (q8) is running; waiting"
    assert a_out.strip() == b_out.strip() == str(model)  # B found A's model and used it
    assert leftovers(home, {"models", "small", "small-q8.gguf"}) == []


def test_ctrl_c_while_waiting_and_while_writing_leaves_nothing(small_checkpoint, tmp_path):
    out = tmp_path / "o.gguf"
    a = start("convert", str(small_checkpoint), "-o", str(out), "--type", "q8_0")
    b = None
    try:
        pause_once_writing(a, tmp_path)
        b = start("convert", str(small_checkpoint), "-o", str(out), "--type", "q8_0")
        assert wait_for_line(b, "waiting")
        b.send_signal(signal.SIGINT)
        _, b_err = b.communicate(timeout=60)
        a.send_signal(signal.SIGINT)  # delivered when A resumes, in the middle of writing
        a.send_signal(signal.SIGCONT)
        _, a_err = a.communicate(timeout=60)
    finally:
        for p in (a, b):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    assert b.returncode == 130 and "Traceback" not in b_err, b_err
    assert a.returncode == 130 and "Traceback" not in a_err, a_err
    assert leftovers(tmp_path, set()) == []
