"""`cascade-local doctor` on this machine: what it reports is checked against the system's own sources."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_cli

from cascade_local.machine_report import rebuild_command


class _Hub(http.server.BaseHTTPRequestHandler):
    def do_HEAD(self) -> None:
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def hub() -> Iterator[str]:
    """A stand-in Hub endpoint on loopback that answers like the real one does to a HEAD."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def meminfo(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def test_doctor_json_matches_the_machine(tmp_path: Path, tiny_gguf, hub: str):
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    shutil.copy(tiny_gguf("q8_0"), home / "models" / "tiny.gguf")
    done = run_cli("doctor", "--json", env={"CASCADE_LOCAL_HOME": str(home), "HF_ENDPOINT": hub})
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model_line = next(line for line in cpuinfo.splitlines() if line.startswith("model name"))
    assert report["cpu_model"] == model_line.split(":", 1)[1].strip()
    assert report["cores"] == len(os.sched_getaffinity(0))
    for feature in report["features"]:
        assert f"{feature} = 1" in report["system_info"]
    flags = next(line for line in cpuinfo.splitlines() if line.startswith("flags")).split()
    assert ("AVX2" in report["features"]) == ("avx2" in flags)
    assert report["amx_in_use"] == ("AMX" in report["extra_buffer_types"] and report["cpu_extra_mode"] == "all")
    assert report["repacking_in_use"] == ("CPU_REPACK" in report["extra_buffer_types"]
                                          and report["cpu_extra_mode"] in ("all", "repack"))
    assert report["ram_total"] == meminfo("MemTotal")
    assert 0 < report["ram_available"] <= report["ram_total"]
    import llama_cpp

    if not llama_cpp.llama_supports_gpu_offload():
        assert report["build"] == "CPU-only" and report["gpus"] == []
        assert [b for b in report["backends"] if b != "RPC"] == ["CPU"]
    # RPC is in the build exactly when llama-cpp-python shipped ggml's RPC library.
    shipped = any(p.name.startswith("libggml-rpc.") for p in (Path(llama_cpp.__file__).parent / "lib").iterdir())
    assert report["rpc"] == shipped == ("RPC" in report["backends"])
    assert report["models_dir"] == str(home / "models")
    assert (report["models_count"], report["models_bytes"]) == (1, tiny_gguf("q8_0").stat().st_size)
    assert (report["hub"], report["hub_endpoint"]) == ("reachable", hub)


def test_doctor_table_on_a_pipe(tmp_path: Path):
    env = {"CASCADE_LOCAL_HOME": str(tmp_path), "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"}
    done = run_cli("doctor", env=env)
    assert done.returncode == 0, done.stderr
    assert "\x1b[" not in done.stdout
    for label in ("CPU", "instruction sets", "AMX in use", "weight repacking", "RAM", "llama.cpp build",
                  "RPC backend", "models folder", "Hugging Face Hub"):
        assert label in done.stdout
    assert "unreachable: ConnectError" in done.stdout


def test_doctor_shows_a_forced_verdict(tmp_path: Path):
    env = {"CASCADE_LOCAL_HOME": str(tmp_path), "CASCADE_LOCAL_CPU_EXTRA": "off"}
    report = json.loads(run_cli("doctor", "--json", "--no-hub", env=env).stdout)
    assert (report["cpu_extra_mode"], report["amx_in_use"], report["repacking_in_use"]) == ("none", False, False)
    assert report["cpu_extra_source"] == "CASCADE_LOCAL_CPU_EXTRA" and report["hub"] == "not checked: --no-hub"
    assert any("CASCADE_LOCAL_CPU_EXTRA=on" in note for note in report["notes"])


def test_doctor_refresh_probes_again(tmp_path: Path):
    env = {"CASCADE_LOCAL_HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    first = json.loads(run_cli("doctor", "--json", "--no-hub", env=env).stdout)
    again = json.loads(run_cli("doctor", "--json", "--no-hub", env=env).stdout)
    fresh = json.loads(run_cli("doctor", "--json", "--no-hub", "--refresh", env=env).stdout)
    assert (first["cpu_extra_source"], again["cpu_extra_source"], fresh["cpu_extra_source"]) == (
        "probe", "cache", "probe")
    assert first["cpu_extra_mode"] == again["cpu_extra_mode"] == fresh["cpu_extra_mode"]


def test_rebuild_commands_name_the_backend_and_skip_the_cached_wheel():
    for gpu, flag in [("NVIDIA", "-DGGML_CUDA=on"), ("AMD", "-DGGML_HIP=on"), ("Intel", "-DGGML_VULKAN=on"),
                      ("Apple", "-DGGML_METAL=on")]:
        command = rebuild_command(gpu)
        # RPC stays in a GPU build: --rpc and rpc-server keep working after the rebuild.
        assert command.startswith(f'CMAKE_ARGS="{flag} -DGGML_RPC=ON" ') and "--no-cache-dir" in command
        assert "llama-cpp-python==0.3.36" in command
