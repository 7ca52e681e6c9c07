"""Thread count: the CPUs this process may use (affinity, cgroup quota), not the machine's CPU count.

The cgroup cases run on /proc and /sys files written here, laid out as the kernel lays them out.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cascade_local.cpus import available_cpus, cgroup_cpu_quota, parse_cfs, parse_cpu_max


def fake_proc(tmp_path: Path, cgroup: str, mounts: list[tuple[str, Path, str, str]]) -> Path:
    """A /proc/self with `cgroup` and a mountinfo of (root, mount point, fs type, super options) lines."""
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "cgroup").write_text(cgroup)
    lines = [f"{30 + i} 25 0:{40 + i} {root} {mount} rw,nosuid,nodev,noexec,relatime shared:9 - {fs} {fs} {opts}"
             for i, (root, mount, fs, opts) in enumerate(mounts)]
    lines.insert(0, "25 1 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw")
    (proc / "mountinfo").write_text("\n".join(lines) + "\n")
    return proc


def write(folder: Path, **files: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name.replace("__", ".")).write_text(text + "\n")


def test_cgroup_v2_quota_of_a_container(tmp_path):
    root = tmp_path / "sys/fs/cgroup"
    write(root, cpu__max="150000 100000")
    proc = fake_proc(tmp_path, "0::/\n", [("/", root, "cgroup2", "rw,nsdelegate")])
    assert cgroup_cpu_quota(proc) == 1.5
    assert available_cpus(proc, affinity=8) == 1  # 1.5 CPUs of time: a second thread would only wait
    assert available_cpus(proc, affinity=1) == 1


def test_cgroup_v2_the_tightest_ancestor_wins(tmp_path):
    root = tmp_path / "sys/fs/cgroup"
    write(root, cpu__max="max 100000")
    write(root / "jobs.slice", cpu__max="300000 100000")
    write(root / "jobs.slice/build.scope", cpu__max="max 100000")
    proc = fake_proc(tmp_path, "0::/jobs.slice/build.scope\n", [("/", root, "cgroup2", "rw")])
    assert available_cpus(proc, affinity=16) == 3


def test_cgroup_v1_cfs_quota(tmp_path):
    cpu = tmp_path / "sys/fs/cgroup/cpu,cpuacct"
    write(cpu, cpu__cfs_quota_us="-1", cpu__cfs_period_us="100000")
    write(cpu / "docker/abc", cpu__cfs_quota_us="400000", cpu__cfs_period_us="100000")
    cgroup = "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n"
    mounts = [("/", tmp_path / "sys/fs/cgroup/memory", "cgroup", "rw,memory"), ("/", cpu, "cgroup", "rw,cpu,cpuacct")]
    proc = fake_proc(tmp_path, cgroup, mounts)
    assert cgroup_cpu_quota(proc) == 4.0
    assert available_cpus(proc, affinity=64) == 4 and available_cpus(proc, affinity=2) == 2


def test_a_container_sees_its_own_cgroup_at_the_mount_root(tmp_path):
    """Without a cgroup namespace, /proc/self/cgroup names the host's path, and the mount shows that cgroup."""
    cpu = tmp_path / "sys/fs/cgroup/cpu"
    write(cpu, cpu__cfs_quota_us="200000", cpu__cfs_period_us="100000")
    proc = fake_proc(tmp_path, "3:cpu:/kubepods/pod1/c1\n", [("/kubepods/pod1/c1", cpu, "cgroup", "rw,cpu")])
    assert available_cpus(proc, affinity=32) == 2


def test_no_limit_hybrid_layout_as_on_this_machine(tmp_path):
    base = tmp_path / "sys/fs/cgroup"
    write(base / "cpu", cpu__cfs_quota_us="-1", cpu__cfs_period_us="100000")
    write(base / "unified")  # the v2 hierarchy without the cpu controller: no cpu.max
    proc = fake_proc(tmp_path, "1:cpu:/\n0::/\n", [("/", base / "cpu", "cgroup", "rw,cpu"),
                                                     ("/", base / "unified", "cgroup2", "rw,nsdelegate")])
    assert cgroup_cpu_quota(proc) is None
    assert available_cpus(proc, affinity=6) == 6


@pytest.mark.parametrize("text", ["", "max", "garbage 100000", "100000 0", "max 100000"])
def test_unreadable_or_unlimited_cpu_max_means_no_quota(text):
    assert parse_cpu_max(text) is None


def test_cfs_parsing():
    assert parse_cfs("250000", "100000") == 2.5
    assert parse_cfs("-1", "100000") is None and parse_cfs("x", "100000") is None


def test_missing_proc_files_fall_back_to_the_affinity(tmp_path):
    assert available_cpus(tmp_path / "nowhere", affinity=3) == 3


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity (Linux)")
def test_the_engine_uses_the_cpus_the_process_may_run_on(tiny_gguf):
    """A child pinned to one CPU: the engine's context runs one thread (os.cpu_count() would say all)."""
    code = (
        "import os, sys\n"
        "os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
        "import llama_cpp\n"
        "from cascade_local.engine import Engine\n"
        "from cascade_local.ggml import default_threads\n"
        "from cascade_local.llama_model import LoadedModel\n"
        "with LoadedModel(sys.argv[1]) as model, Engine(model, n_ctx=256) as engine:\n"
        "    print(default_threads(), llama_cpp.llama_n_threads(engine.ctx), os.cpu_count())\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tiny_gguf("f32"))], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.split()[:2] == ["1", "1"], out.stdout
