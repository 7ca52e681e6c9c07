"""How many CPUs this process may run on: its affinity mask, capped by its cgroup's CPU quota.

os.cpu_count() counts the machine's CPUs. A container given 2 CPUs of a 64-core host (cgroup v2
`cpu.max` "200000 100000", or v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`) would otherwise start 64
ggml threads that spin on 2 CPUs' worth of time and get throttled.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

PROC = Path("/proc/self")


def available_cpus(proc: Path = PROC, affinity: int | None = None) -> int:
    """CPUs the scheduler lets this process use (affinity), at most its cgroup quota rounded down; at least 1.

    Rounded down because a thread more than the quota allows only waits for its share of time.
    """
    if affinity is None:
        affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cgroup_cpu_quota(proc)
    if quota is not None:
        affinity = min(affinity, math.floor(quota))
    return max(1, affinity)


def cgroup_cpu_quota(proc: Path = PROC) -> float | None:
    """The tightest CPU quota, in CPUs, on this process's cgroup and its ancestors; None if there is none."""
    quotas = [quota for folder, version in _cpu_cgroups(proc) for quota in [_quota(folder, version)]
              if quota is not None]
    return min(quotas, default=None)


def parse_cpu_max(text: str) -> float | None:
    """cgroup v2 `cpu.max`: "QUOTA PERIOD" in microseconds, or "max PERIOD" for no limit."""
    parts = text.split()
    try:
        quota, period = (parts[0], int(parts[1])) if len(parts) == 2 else (parts[0], 100_000)
        return None if quota == "max" or period <= 0 else int(quota) / period
    except (ValueError, IndexError):
        return None


def parse_cfs(quota_text: str, period_text: str) -> float | None:
    """cgroup v1 `cpu.cfs_quota_us` (-1: no limit) over `cpu.cfs_period_us`."""
    try:
        quota, period = int(quota_text), int(period_text)
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _quota(folder: Path, version: int) -> float | None:
    try:
        if version == 2:
            return parse_cpu_max((folder / "cpu.max").read_text())
        return parse_cfs((folder / "cpu.cfs_quota_us").read_text(), (folder / "cpu.cfs_period_us").read_text())
    except OSError:
        return None


def _cpu_cgroups(proc: Path) -> Iterator[tuple[Path, int]]:
    """(folder, cgroup version) for this process's cgroup and each ancestor, in every hierarchy with the cpu controller.

    /proc/self/cgroup names the process's cgroup in each hierarchy; /proc/self/mountinfo says where
    each hierarchy is mounted and which cgroup its mount shows (in a container, often the container's).
    """
    try:
        cgroup_lines = (proc / "cgroup").read_text().splitlines()
        mount_lines = (proc / "mountinfo").read_text().splitlines()
    except OSError:
        return
    v2_path, v1_path = None, None
    for line in cgroup_lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            v2_path = path
        elif "cpu" in controllers.split(","):
            v1_path = path
    for line in mount_lines:
        left, _, right = line.partition(" - ")
        fields, kind = left.split(), right.split()
        if len(fields) < 5 or len(kind) < 3:
            continue
        root, mount = fields[3], Path(fields[4])
        if kind[0] == "cgroup2" and v2_path is not None:
            path, version = v2_path, 2
        elif kind[0] == "cgroup" and "cpu" in kind[2].split(",") and v1_path is not None:
            path, version = v1_path, 1
        else:
            continue
        # The process's cgroup relative to what the mount shows; outside it, only the mount's own limit is visible.
        inside = path[len(root):] if root == "/" or path == root or path.startswith(root + "/") else ""
        folder = mount / inside.strip("/")
        while True:
            yield folder, version
            if folder == mount or mount not in folder.parents:
                break
            folder = folder.parent
