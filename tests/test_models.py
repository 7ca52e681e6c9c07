"""pull / list / rm / resolve against a pre-populated Hugging Face cache, offline (the real library, no network)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import TINY, run_cli

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_repo(hf_home: Path, repo: str, files: dict[str, Path]) -> None:
    """Lay files out as huggingface-hub's cache does after a download (refs/main -> snapshots/<commit>/)."""
    base = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    snapshot = base / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for name, source in files.items():
        shutil.copyfile(source, snapshot / name)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(COMMIT)


@pytest.fixture
def env(tmp_path, tiny_gguf) -> dict[str, str]:
    home, hf_home = tmp_path / "home", tmp_path / "hf"
    home.mkdir()
    hub_repo(hf_home, "test/tiny-nemotron", {p.name: p for p in TINY.iterdir()})
    hub_repo(hf_home, "test/tiny-nemotron-gguf", {"tiny-q8_0.gguf": tiny_gguf("q8_0")})
    (home / "models.toml").write_text(
        '[models.tiny-hub]\nhf_repo = "test/tiny-nemotron"\nrecipe = "q8"\n'
        'gguf = [{ repo = "test/tiny-nemotron-gguf", file = "tiny-q8_0.gguf" }]\n'
        '[models.not-cached]\nhf_repo = "test/never-downloaded"\n'
    )
    return {"CASCADE_LOCAL_HOME": str(home), "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}


def test_pull_converts_from_the_hub_cache_then_list_info_chat_rm(env):
    pulled = run_cli("pull", "tiny-hub", env=env)
    assert pulled.returncode == 0, pulled.stderr
    path = Path(pulled.stdout.strip())
    assert path.name == "tiny-hub-q8.gguf" and path.read_bytes()[:4] == b"GGUF"

    listed = run_cli("list", "--json", env=env)
    assert [(m["name"], m["variant"]) for m in json.loads(listed.stdout)] == [("tiny-hub", "q8")]
    assert "nemotron_h_moe" in run_cli("info", "tiny-hub", env=env).stdout

    chat = run_cli("chat", "tiny-hub", "--max-tokens", "3", "--no-think", input="Hi\n/exit\n", env=env)
    assert chat.returncode == 0, chat.stderr

    again = run_cli("pull", "tiny-hub", env=env)  # already there: nothing fetched or converted again
    assert again.returncode == 0 and Path(again.stdout.strip()).stat().st_mtime == path.stat().st_mtime

    removed = run_cli("rm", "tiny-hub", env=env)
    assert removed.returncode == 0 and not path.exists()
    assert run_cli("list", "--json", env=env).stdout.strip() == "[]"


def test_pull_prebuilt_gguf(env):
    pulled = run_cli("pull", "tiny-hub", "--gguf", env=env)
    assert pulled.returncode == 0, pulled.stderr
    assert Path(pulled.stdout.strip()).name == "tiny-hub-gguf.gguf"


def test_pull_of_something_never_downloaded_offline_says_what_to_do(env):
    result = run_cli("pull", "not-cached", env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    message = " ".join(result.stderr.split())
    assert "test/never-downloaded" in message
    assert "give its path in place of the model name (/path/to/model.gguf;" in message
    assert "no prebuilt GGUF is known" in run_cli("pull", "not-cached", "--gguf", env=env).stderr


def test_pull_imports_a_checkpoint_folder(env, tmp_path):
    folder = tmp_path / "my-checkpoint"
    shutil.copytree(TINY, folder)
    result = run_cli("pull", str(folder), "--recipe", "small", env=env)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).name == "my-checkpoint-small.gguf"
    assert "my-checkpoint" in run_cli("list", env=env).stdout


def test_rm_unknown_and_chat_unknown_name_list_what_exists(env):
    result = run_cli("rm", "ghost", env=env)
    assert result.returncode == 2 and "no local model 'ghost'" in result.stderr
    chat = run_cli("chat", "ghost", input="", env=env)
    assert chat.returncode == 2 and "known:" in chat.stderr and "tiny-hub" in chat.stderr
