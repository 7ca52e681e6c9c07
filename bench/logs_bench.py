"""History benchmark: `cascade-local logs` on a database of 1,000 conversations.

Fills a fresh $CASCADE_LOCAL_HOME/history.db through the library (ConversationLog, as chats write it: 1,000
conversations of 1 to 8 questions, each answer with reasoning, about 9,000 messages), then times the real command
in a fresh process: the list, the list of 1,000, a full-text search, and `show`. Each is run 5 times; the median
wall time is reported (process start-up and imports included) beside the time of the query alone.

    .venv/bin/python bench/logs_bench.py [--conversations 1000]

Prints a markdown table with the CPU and the date, and writes it to bench/out/logs_bench.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert_bench import cpu_model

from cascade_local.conversation import TurnSettings
from cascade_local.engine import Result
from cascade_local.history import ConversationLog, HistoryStore, connect

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
WORDS = ["tide", "photosynthesis", "search", "revolution", "interest", "tectonics", "handshake", "hole",
         "vaccine", "theorem", "inflation", "collection", "cycle", "cryptography", "jazz", "volcano",
         "prime", "matrix", "kernel", "gradient", "entropy", "protein", "orbit"]


def fill(path: Path, n: int, rng: random.Random) -> int:
    db = connect(path)
    messages_written = 0
    for _ in range(n):
        log, messages = ConversationLog(db, model="/models/cascade2-q4.gguf"), []
        for _ in range(rng.randint(1, 8)):
            messages.append({"role": "user", "content": " ".join(rng.choices(WORDS, k=12)) + "?"})
            messages.append({"role": "assistant", "content": " ".join(rng.choices(WORDS, k=120)),
                             "reasoning_content": " ".join(rng.choices(WORDS, k=200))})
            log.sync(messages, system=None, settings=TurnSettings(),
                     result=Result(completion_tokens=320, reasoning_tokens=200, finish_reason="stop"))
        messages_written += len(messages)
    db.close()
    return messages_written


def timed(args: list[str], env: dict[str, str], runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "cascade_local", *args], env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def query_time(fn, runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as home:
        path = Path(home) / "history.db"
        start = time.perf_counter()
        n_messages = fill(path, args.conversations, random.Random(0))
        fill_s = time.perf_counter() - start
        env = {**os.environ, "CASCADE_LOCAL_HOME": home, "NO_COLOR": "1"}
        store = HistoryStore(connect(path))
        cases = [
            ("logs (20 most recent)", ["logs"], lambda: store.summaries()),
            (f"logs -n {args.conversations}", ["logs", "-n", str(args.conversations)],
             lambda: store.summaries(limit=args.conversations)),
            ('logs --search "prime orbit"', ["logs", "--search", "prime orbit"],
             lambda: store.summaries(search="prime orbit")),
            ("logs show 500", ["logs", "show", "500"], lambda: store.get(500)),
        ]
        rows = [(name, timed(cli, env), query_time(fn)) for name, cli, fn in cases]
        size = path.stat().st_size + sum(p.stat().st_size for p in Path(home).glob("history.db-*"))
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"logs benchmark, {now}, {os.cpu_count()} CPUs ({cpu_model()})", "",
             f"{args.conversations} conversations, {n_messages} messages, {size / 1e6:.1f} MB; filled through "
             f"ConversationLog (one transaction per message) in {fill_s:.1f} s "
             f"({n_messages / fill_s:.0f} messages/s)", "",
             "| command | wall, median of 5 (process start included) | query alone |",
             "|---|--:|--:|"]
    lines += [f"| `{name}` | {wall:.3f} s | {query * 1000:.1f} ms |" for name, wall, query in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "logs_bench.md").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
