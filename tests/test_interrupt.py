"""Ctrl-C while llama.cpp loads a model: a real `cascade-local run` child sent SIGINT during the load.

llama.cpp calls back into Python while it loads (its log, the progress callback). A KeyboardInterrupt
raised inside a ctypes callback is printed as "Exception ignored" and lost, and the load went on.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cascade_local.convert import convert, uniform_recipe

from cascade_local.interrupt import deferred_interrupt
from cascade_local.testing.checkpoint_fixture import TINY_CONFIG, TINY_SCALES, write_checkpoint

CLI = [sys.executable, "-m", "cascade_local"]
VOCAB = 131_072  # the real vocabulary size: llama.cpp takes a while to build its tables, which gives a load to hit


@pytest.fixture(scope="module")
def slow_to_load(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny architecture with the real vocabulary and twice the layers (141 MB of f32)."""
    folder = tmp_path_factory.mktemp("big-vocab")
    cfg = dict(TINY_CONFIG, hybrid_override_pattern="MEM*E" * 2, num_hidden_layers=10, vocab_size=VOCAB)
    src = write_checkpoint(folder / "ckpt", cfg, seed=0, scales=TINY_SCALES, shard_bytes=50_000_000,
                           tokenizer_vocab=VOCAB)
    out = folder / "big-vocab.gguf"
    convert(src, out, uniform_recipe("f32"))
    return out


def interrupt_during_load(gguf: Path, delay: float) -> tuple[int, str]:
    """Starts `run`, waits for llama.cpp's first loader line, then `delay` s more, and sends SIGINT."""
    env = {**os.environ, "CASCADE_LOCAL_LLAMA_LOG": "1", "NO_COLOR": "1"}
    # An answer that never ends by itself: whenever the SIGINT lands (loading, or already answering on a fast
    # machine), the command is still running and must end with 130.
    child = subprocess.Popen([*CLI, "run", str(gguf), "Hello", "--max-tokens", "100000", "--ignore-eos", "--no-think",
                              "--ctx", "1024"],
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env)
    assert child.stderr is not None
    seen: list[str] = []
    try:
        for line in child.stderr:
            seen.append(line)
            if line.startswith("llama_model_loader"):
                break
        time.sleep(delay)
        child.send_signal(signal.SIGINT)
        _, rest = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    return child.returncode, "".join(seen) + rest


@pytest.mark.slow
def test_ctrl_c_stops_a_model_load_at_any_moment(slow_to_load):
    stopped_inside_the_load = 0
    for delay in (0.0, 0.02, 0.05, 0.1, 0.2):
        code, stderr = interrupt_during_load(slow_to_load, delay)
        assert "Exception ignored" not in stderr, stderr[-2000:]
        assert code == 130, (delay, stderr[-2000:])
        assert "interrupted" in stderr.splitlines()[-1]
        stopped_inside_the_load += "cancelled model load" in stderr
    # At least one SIGINT arrived while llama.cpp was loading and stopped it there (not after it).
    assert stopped_inside_the_load >= 1


def test_sigint_inside_a_deferred_block_is_raised_when_it_ends():
    with pytest.raises(KeyboardInterrupt), deferred_interrupt() as stop:
        signal.raise_signal(signal.SIGINT)  # what a Ctrl-C during a native call amounts to
        assert stop.requested  # the block goes on: a callback would have told llama.cpp to stop
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_deferred_block_without_sigint_changes_nothing():
    with deferred_interrupt() as stop:
        pass
    assert not stop.requested and signal.getsignal(signal.SIGINT) is signal.default_int_handler
