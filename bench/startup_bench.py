"""Start-up benchmark: how long `cascade-local --help` and `cascade-local CMD --help` take.

Each is run N times in a fresh process (`python -m cascade_local`); the median wall time and the median CPU
time (user + system) are reported, beside the time of `python -c "import typer, typer.rich_utils,
typer._adapters"` as a floor: what any command made with Typer 0.2x and rich help pays before it does anything
(Typer coerces the values of its eager options, --help included, through pydantic, which `typer._adapters`
imports). The load average is printed: on a busy machine the wall time is mostly waiting for a core, so the CPU
time is the figure to compare.

    .venv/bin/python bench/startup_bench.py [--runs 7]

To see what an import costs: `.venv/bin/python -X importtime -m cascade_local run --help 2>&1 >/dev/null | sort
-t'|' -k2 -n | tail`.

Prints a markdown table with the CPU and the date, and writes it to bench/out/startup_bench.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
COMMANDS = ["", "convert", "info", "plan", "chat", "run", "batch", "pull", "list", "rm", "doctor", "eval", "serve",
            "logs", "rpc-server", "cache"]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def timed(argv: list[str], runs: int) -> tuple[float, float]:
    """Median wall seconds and median CPU seconds (user + system) of `argv` over `runs` fresh processes.

    On a shared machine the wall time is mostly waiting for a core; the CPU time is what the start-up costs.
    """
    walls, cpus = [], []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       env={**os.environ, "COLUMNS": "100"})
        walls.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="runs per command (default 7)")
    args = parser.parse_args()
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    rows = [f"Start-up benchmark, {now}; {os.cpu_count()} CPUs ({cpu_model()}), load average at start {load}; "
            f"median of {args.runs} runs", "", "| command | wall s | CPU s |", "|---|--:|--:|"]
    wall, cpu = timed([sys.executable, "-c", "import typer, typer.rich_utils, typer._adapters"], args.runs)
    rows.append(f"| (floor: `import typer, typer.rich_utils, typer._adapters`) | {wall:.3f} | {cpu:.3f} |")
    for command in COMMANDS:
        wall, cpu = timed([sys.executable, "-m", "cascade_local", *([command] if command else []), "--help"],
                          args.runs)
        rows.append(f"| `cascade-local {command + ' ' if command else ''}--help` | {wall:.3f} | {cpu:.3f} |")
    text = "\n".join(rows)
    print(text)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "startup_bench.md").write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
