"""Shared fixtures: the committed tiny checkpoint, its golden data, and GGUFs converted from it once."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cascade_local.convert import convert, uniform_recipe

TESTS = Path(__file__).resolve().parent
TINY = TESTS / "fixtures" / "tiny"
GOLDEN = TESTS / "golden"
CLI = [sys.executable, "-m", "cascade_local"]


@pytest.fixture(autouse=True)
def private_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test (and every command it runs) gets its own CASCADE_LOCAL_HOME: chats are logged there by default,
    and no test may write into the user's real folder."""
    folder = tmp_path / "cascade-home"
    monkeypatch.setenv("CASCADE_LOCAL_HOME", str(folder))
    monkeypatch.setenv("CASCADE_LOCAL_PROMPT_CACHE", str(tmp_path / "prompt-cache"))  # run's prompt states
    return folder


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    return TINY


@pytest.fixture
def tiny_copy(tmp_path: Path) -> Path:
    """A private copy of the tiny checkpoint that a test may damage."""
    dst = tmp_path / "tiny"
    shutil.copytree(TINY, dst)
    return dst


@pytest.fixture(scope="session")
def golden_logits() -> list[tuple[np.ndarray, np.ndarray]]:
    data = np.load(GOLDEN / "logits.npz")
    n = len([k for k in data.files if k.startswith("ids_")])
    return [(data[f"ids_{i}"], data[f"logits_{i}"]) for i in range(n)]


@pytest.fixture(scope="session")
def golden_tokens() -> list[dict]:
    return json.loads((GOLDEN / "tokens.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def golden_prompts() -> list[dict]:
    return json.loads((GOLDEN / "prompts.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory):
    """tiny_gguf(type) -> path of the tiny checkpoint converted to that type (converted once per session)."""
    cache: dict[str, Path] = {}
    folder = tmp_path_factory.mktemp("gguf")

    def get(type_name: str) -> Path:
        if type_name not in cache:
            out = folder / f"tiny-{type_name}.gguf"
            convert(TINY, out, uniform_recipe(type_name))
            cache[type_name] = out
        return cache[type_name]

    return get


@pytest.fixture
def llama_arch_gguf(tmp_path: Path) -> Path:
    """A valid GGUF of another architecture (llama), to check it is named and refused."""
    import gguf

    path = tmp_path / "llama.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def run_cli(*args: str, input: str | None = None, timeout: float = 120, env: dict | None = None,
            **kw) -> subprocess.CompletedProcess:
    """The real command in a child process, as a user runs it (stdout and stderr not terminals)."""
    full_env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200", **(env or {})}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, input=input, timeout=timeout,
                          env=full_env, **kw)
