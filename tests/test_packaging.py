"""The distribution installs as designed: `cascade_local.convert`, and no top-level `convert` module.

Both ways a user gets the code are checked: the editable install the tests run from, and a wheel
built from this tree and installed into a fresh virtual environment.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = (
    "import importlib.util, cascade_local.convert as c; "
    "print(c.__name__); print(importlib.util.find_spec('convert') is None)"
)


def probe(python: str, cwd: Path) -> list[str]:
    result = subprocess.run([python, "-c", PROBE], capture_output=True, text=True, cwd=cwd, check=True)
    return result.stdout.split()


def test_editable_install_imports_convert_under_the_package(tmp_path):
    assert probe(sys.executable, tmp_path) == ["cascade_local.convert", "True"]


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_runs_the_converter(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(ROOT)],
                   check=True, capture_output=True, text=True)
    [wheel] = dist.glob("cascade_local-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(wheel)], capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr[-2000:]
    python = str(venv / "bin" / "python")
    assert probe(python, tmp_path) == ["cascade_local.convert", "True"]
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    assert not (Path(site) / "convert").exists()
    assert (Path(site) / "cascade_local" / "models.toml").exists()
    assert (Path(site) / "cascade_local" / "templates" / "nemotron-cascade-2.jinja").exists()
    assert (Path(site) / "cascade_local" / "py.typed").exists()  # PEP 561: type checkers read our annotations
    assert (Path(site) / "cascade_local" / "server" / "app.py").exists()  # `serve` ships its package
    out = tmp_path / "tiny.gguf"
    run = subprocess.run([str(venv / "bin" / "cascade-local"), "convert", str(ROOT / "tests/fixtures/tiny"),
                          "-o", str(out), "--type", "q8_0"], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str(out) and out.read_bytes()[:4] == b"GGUF"
