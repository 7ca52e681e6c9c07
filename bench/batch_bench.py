"""Batch benchmark: `cascade-local batch` over the same items with --parallel 1 and --parallel 4.

Runs the real command in a fresh process for each setting, greedy, with a fixed number of new tokens
per item, and reads the job's own timing from its summary line (model load excluded; the wall time
with start-up and load is reported beside it). A one-item run first pages the weights in, so that
the first timed setting does not pay for the disk.

    .venv/bin/python bench/batch_bench.py [--gguf FILE] [--items 16] [--max-tokens 64] [--threads N]

Prints a markdown table and writes it to bench/out/batch_bench.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert_bench import cpu_model, meminfo_kb

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
TOPICS = ["the tides", "photosynthesis", "binary search", "the French revolution", "compound interest",
          "plate tectonics", "TCP handshakes", "black holes", "vaccines", "the Pythagorean theorem",
          "inflation", "garbage collection", "the water cycle", "public-key cryptography", "jazz", "volcanoes"]
SUMMARY_SECONDS = re.compile(r"tokens in ([0-9.]+) s")


def write_input(path: Path, n: int) -> None:
    lines = [json.dumps({"id": i + 1, "prompt": f"Explain {TOPICS[i % len(TOPICS)]} in three sentences."})
             for i in range(n)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def run_batch(gguf: Path, items: Path, out: Path, parallel: int, max_tokens: int, threads: int
              ) -> tuple[float, float, int, int]:
    """(job seconds from the summary, wall seconds, items answered, completion tokens) of one fresh run."""
    cmd = [sys.executable, "-m", "cascade_local", "batch", str(items), "-o", str(out), "-m", str(gguf),
           "--max-tokens", str(max_tokens), "--temperature", "0", "--parallel", str(parallel), "--force",
           "--threads", str(threads)]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "NO_COLOR": "1"})
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"batch --parallel {parallel} failed ({done.returncode}):\n{done.stderr}")
    match = SUMMARY_SECONDS.search(done.stderr)
    if match is None:
        raise SystemExit(f"no summary line in the output of batch --parallel {parallel}:\n{done.stderr}")
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines() if line]
    answered = [r for r in records if r["error"] is None]
    return float(match.group(1)), wall, len(answered), sum(r["usage"]["completion_tokens"] for r in answered)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, default=OUT / "slice-q4-moe.gguf", help="model (default: %(default)s)")
    parser.add_argument("--items", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--parallel", type=int, nargs="+", default=[1, 4])
    # Explicit: left unset, llama.cpp's context default is 4 threads, whatever the machine has.
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="CPU threads (default: all cores)")
    args = parser.parse_args()
    if not args.gguf.is_file():
        raise SystemExit(f"{args.gguf} does not exist; make it with bench/engine_bench.py or cascade-local convert")

    work = OUT / "batch_bench"
    work.mkdir(parents=True, exist_ok=True)
    items = work / "items.jsonl"
    write_input(items, args.items)
    warm = work / "warm.jsonl"
    write_input(warm, 1)
    run_batch(args.gguf, warm, work / "warm-out.jsonl", 1, 4, args.threads)  # page the weights in

    load_before = os.getloadavg()[0]  # the machine may be shared: say how busy it was
    rows = {}
    for parallel in args.parallel:
        rows[parallel] = run_batch(args.gguf, items, work / f"out-p{parallel}.jsonl", parallel, args.max_tokens,
                                   args.threads)
    base = rows[args.parallel[0]]
    lines = [
        f"Batch benchmark, {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC; {os.cpu_count()} CPUs ({cpu_model()}), "
        f"{meminfo_kb('MemTotal') / 1e6:.1f} GB RAM; model {args.gguf.name} ({args.gguf.stat().st_size / 1e9:.2f} GB); "
        f"`cascade-local batch` over {args.items} items, --max-tokens {args.max_tokens} --temperature 0 "
        f"--threads {args.threads}; 1-minute load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after",
        "",
        f"| --parallel | items/s | aggregate tokens/s | speed-up vs {args.parallel[0]} | job s | wall s (with load) |",
        "|--:|--:|--:|--:|--:|--:|",
    ]
    for parallel, (seconds, wall, answered, tokens) in rows.items():
        lines.append(f"| {parallel} | {answered / seconds:.2f} | {tokens / seconds:.1f} | "
                     f"{(tokens / seconds) / (base[3] / base[0]):.2f} | {seconds:.1f} | {wall:.1f} |")
    text = "\n".join(lines)
    print(text)
    (OUT / "batch_bench.md").write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
