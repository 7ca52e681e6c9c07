"""Bad input to `cascade-local convert`: one clear line, a non-zero exit, and nothing left at the output."""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import CLI, run_cli

from cascade_local.testing.checkpoint_fixture import TINY_CONFIG, TINY_SCALES, write_checkpoint


def assert_clean_failure(result: subprocess.CompletedProcess, out: Path, code: int, match: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == code, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and match in lines[0], lines[0]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert not out.exists()
    if out.parent.exists():  # no temporary file, folder or lock file left beside the output
        assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def convert(src: Path, out: Path, *extra: str, **kw) -> subprocess.CompletedProcess:
    return run_cli("convert", str(src), "-o", str(out), *extra, **kw)


def test_missing_config(tiny_copy, tmp_path):
    (tiny_copy / "config.json").unlink()
    out = tmp_path / "o.gguf"
    assert_clean_failure(convert(tiny_copy, out), out, 2, "has no config.json")


def test_invalid_config(tiny_copy, tmp_path):
    (tiny_copy / "config.json").write_text("{not json")
    out = tmp_path / "o.gguf"
    assert_clean_failure(convert(tiny_copy, out), out, 2, "is not valid JSON")


def test_other_architecture(tiny_copy, tmp_path):
    cfg = json.loads((tiny_copy / "config.json").read_text())
    cfg.update(architectures=["LlamaForCausalLM"], model_type="llama")
    (tiny_copy / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "o.gguf"
    assert_clean_failure(convert(tiny_copy, out), out, 2, "unsupported architecture LlamaForCausalLM")


def test_missing_shard(tiny_copy, tmp_path):
    (tiny_copy / "model-00002-of-00003.safetensors").unlink()
    out = tmp_path / "o.gguf"
    assert_clean_failure(convert(tiny_copy, out), out, 2, "model-00002-of-00003.safetensors is missing")


def test_truncated_shard(tiny_copy, tmp_path):
    shard = tiny_copy / "model-00003-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    out = tmp_path / "o.gguf"
    assert_clean_failure(convert(tiny_copy, out), out, 2, "corrupt or truncated")


@pytest.mark.parametrize("damage", ["length", "json"])
def test_corrupt_shard_header(tiny_copy, tmp_path, damage):
    shard = tiny_copy / "model-00001-of-00003.safetensors"
    data = bytearray(shard.read_bytes())
    if damage == "length":
        data[:8] = (1 << 62).to_bytes(8, "little")
    else:
        data[8:20] = b"\xff\xfe garbage!!"
    shard.write_bytes(bytes(data))
    out = tmp_path / "o.gguf"
    assert_clean_failure(convert(tiny_copy, out), out, 2, "corrupt or truncated")


def test_missing_tensor(tiny_copy, tmp_path):
    index_path = tiny_copy / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"]["backbone.layers.3.mixer.k_proj.weight"]
    index_path.write_text(json.dumps(index))
    out = tmp_path / "o.gguf"
    assert_clean_failure(convert(tiny_copy, out), out, 2, "lacks tensor backbone.layers.3.mixer.k_proj.weight")


def test_wrong_shape(tiny_copy, tmp_path):
    name = "backbone.layers.1.mixer.experts.3.up_proj.weight"
    index = json.loads((tiny_copy / "model.safetensors.index.json").read_text())
    shard = tiny_copy / index["weight_map"][name]
    data = shard.read_bytes()
    before = f'"{name}":{{"dtype":"BF16","shape":[64,128]'.encode()
    assert before in data
    shard.write_bytes(data.replace(before, before.replace(b"[64,128]", b"[128,64]")))
    out = tmp_path / "o.gguf"
    assert_clean_failure(convert(tiny_copy, out), out, 2, "has shape [128, 64], but config.json implies [64, 128]")


def test_output_folder_missing(tiny_dir, tmp_path):
    out = tmp_path / "no" / "such" / "o.gguf"
    result = convert(tiny_dir, out)
    assert result.returncode == 1 and "does not exist" in result.stderr and not out.exists()


def test_unwritable_output(tiny_dir):
    out = Path("/proc/cascade-local-test.gguf")
    result = convert(tiny_dir, out)
    # A location that cannot be written is the user's choice to change, like an unwritable folder: exit 1.
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().startswith("error: cannot write in /proc")
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()


def test_existing_output_needs_force(tiny_dir, tmp_path):
    out = tmp_path / "o.gguf"
    out.write_bytes(b"precious")
    result = convert(tiny_dir, out)
    assert result.returncode == 1 and "already exists; pass --force" in result.stderr
    assert out.read_bytes() == b"precious"
    forced = convert(tiny_dir, out, "--force")
    assert forced.returncode == 0 and out.read_bytes()[:4] == b"GGUF"


def test_disk_full_midway(tiny_dir, tmp_path):
    out = tmp_path / "o.gguf"
    limit = 600_000  # the finished file is ~1.6 MB: the limit hits while tensor data streams

    def cap_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = convert(tiny_dir, out, "--type", "bf16", preexec_fn=cap_file_size)
    assert_clean_failure(result, out, 2, "ran out of disk space")


def test_unknown_type(tiny_dir, tmp_path):
    out = tmp_path / "o.gguf"
    result = convert(tiny_dir, out, "--type", "q3_x")
    assert_clean_failure(result, out, 1, "--type: unknown type 'q3_x'")


@pytest.fixture(scope="module")
def medium_checkpoint(tmp_path_factory) -> Path:
    """Big enough (~200 MB) that a conversion is still running when we interrupt it."""
    cfg = {**TINY_CONFIG, "hidden_size": 1024, "hybrid_override_pattern": "MEMEME", "num_hidden_layers": 6,
           "n_routed_experts": 32, "moe_intermediate_size": 512, "moe_shared_expert_intermediate_size": 512}
    folder = tmp_path_factory.mktemp("medium")
    return write_checkpoint(folder, cfg, seed=1, scales=TINY_SCALES, shard_bytes=64 << 20)


def test_ctrl_c_midway_leaves_nothing(medium_checkpoint, tmp_path):
    out = tmp_path / "o.gguf"
    proc = subprocess.Popen([*CLI, "convert", str(medium_checkpoint), "-o", str(out), "--type", "q8_0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    partial = None
    while time.monotonic() < deadline and not (partial and partial.exists() and partial.stat().st_size > 20_000_000):
        partial = next(tmp_path.glob(".o.gguf.*.partial"), None)  # the writer's own unique temporary name
        time.sleep(0.01)
    assert partial is not None and partial.exists(), "conversion never started writing"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "interrupted" in stderr
    assert list(tmp_path.iterdir()) == []  # no output, temporary file or lock file
