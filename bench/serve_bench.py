"""Serve benchmark: `cascade-local serve` against llama-cpp-python's own server on the same GGUF.

Both servers run on loopback, greedy (or seeded sampling), with the same threads, all at once: each measurement
alternates between them, so a shared machine's changing load hits both alike. Two measurements, each a ratio:

- Aggregate generation tokens/s at 1, 4 and 8 concurrent streaming clients (cascade-local with --parallel 8;
  the anchor decodes one request at a time).
- An agent-like session: 8 turns, each resending the whole conversation, behind a long system prompt. The time
  to the first streamed token of turns 2-8 shows prefix reuse. cascade-local's answers with the prefix cache
  are checked against its answers with `--cache-mem 0 --cache-size 0` (identical output). Each cascade-local
  server gets an empty prompt-state folder, so nothing from an earlier run is restored.

A model with random weights (the slice) writes tokens whose text is empty when greedy; pass --temperature 1 (and
the default --seed) there, so answers have text to compare and to resend.

    .venv/bin/python bench/serve_bench.py [--gguf FILE] [--threads N] [--max-tokens 32] [--temperature T]

Without --gguf the tiny test checkpoint is converted (q8_0): its numbers measure the servers' own overhead,
not the model. Prints a markdown table and writes it to bench/out/serve_bench.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert_bench import cpu_model

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
SYSTEM_WORDS = ("You are a careful assistant for a team of engineers. Answer briefly, cite the file you read, "
                "and say when you are unsure. ")


class Server:
    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None):
        self._log = log.open("wb")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, "NO_COLOR": "1", **(env or {})})

    def wait(self, url: str) -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited {self.proc.returncode}; see {self._log.name}")
            try:
                if httpx.get(f"{url}/v1/models", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise SystemExit(f"server did not start; see {self._log.name}")

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self._log.close()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PROMPT_TOKENS: list[int] = []  # prompt sizes as servers that send usage counted them


SAMPLING: dict = {"temperature": 0}


def stream(url: str, messages: list[dict], max_tokens: int) -> tuple[float, float, int, str]:
    """(seconds to the first token, total seconds, completion tokens, reasoning + answer) of one request."""
    body = {"messages": messages, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}, **SAMPLING}
    started = time.perf_counter()
    first, tokens, pieces, text = None, 0, 0, []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
                PROMPT_TOKENS.append(chunk["usage"]["prompt_tokens"])
            for choice in chunk.get("choices", []):
                delta = choice.get("delta", {})
                piece = (delta.get("reasoning_content") or "") + (delta.get("content") or "")
                # llama-cpp-python sends one chunk per token, with "content": "" for a token whose text is empty
                # (a model with random weights writes many): such a chunk is a token too. Its first chunk, the
                # role's, has no content key. cascade-local sends only text, after a role chunk with "".
                token_chunk = piece or ("content" in delta and "role" not in delta)
                if token_chunk:
                    first = first or time.perf_counter()
                    pieces += 1
                    text.append(piece)
    end = time.perf_counter()
    # llama-cpp-python's server sends no usage in streams; it sends one chunk per token, so count those.
    return (first or end) - started, end - started, tokens or pieces, "".join(text)


def throughput(url: str, clients: int, max_tokens: int) -> float:
    """Aggregate completion tokens/s of `clients` concurrent streams (two rounds each)."""
    prompts = [[{"role": "user", "content": f"Write about topic number {i}."}] for i in range(clients * 2)]
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda m: stream(url, m, max_tokens), prompts))
    return sum(r[2] for r in results) / (time.perf_counter() - started)


def session(url: str, turns: int, system_tokens: int, max_tokens: int, run: int) -> tuple[list[float], list[str]]:
    """Time to first token and answer of each turn of a conversation that is resent whole every time."""
    # About 4 characters a token in English with the real tokenizer; the table reports the count measured.
    # Each run's conversation differs from its first token, so no run reuses another's prompts.
    system = f"Session {run}. " + (SYSTEM_WORDS * (system_tokens // 20 + 1))[: system_tokens * 4]
    messages = [{"role": "system", "content": system}]
    ttft, answers = [], []
    for turn in range(turns):
        messages.append({"role": "user", "content": f"Step {turn + 1}: what should we check next?"})
        PROMPT_TOKENS.clear()
        first, _, _, text = stream(url, messages, max_tokens)
        ttft.append(first)
        answers.append(text)
        messages.append({"role": "assistant", "content": text})
    return ttft, answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, help="model (default: the tiny test checkpoint, converted to q8_0)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--system-tokens", type=int, default=1000)
    parser.add_argument("--ctx", type=int, default=4096, help="context per request")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (with --seed: "
                        "repeatable; a model with random weights writes only empty tokens when greedy)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each measurement; the best is kept "
                        "(a shared machine's load only ever slows a run down)")
    args = parser.parse_args()
    SAMPLING.update(temperature=args.temperature, seed=args.seed)
    OUT.mkdir(parents=True, exist_ok=True)
    gguf = args.gguf
    if gguf is None:
        from cascade_local.convert import convert, uniform_recipe

        gguf = OUT / "tiny-q8_0.gguf"
        if not gguf.exists():
            convert(ROOT / "tests" / "fixtures" / "tiny", gguf, uniform_recipe("q8_0"))
    parallel = max(args.clients)

    states = Path(tempfile.mkdtemp(prefix="serve-bench-states-"))  # no state from an earlier run is found

    def ours(cache: str) -> tuple[Server, str]:
        port = free_port()
        disk = ["--cache-size", "0"] if cache == "0" else []  # no prefix cache: neither in memory nor on disk
        server = Server([sys.executable, "-m", "cascade_local", "serve", str(gguf), "--port", str(port),
                         "--parallel", str(parallel), "--ctx", str(args.ctx), "--threads", str(args.threads),
                         "--cache-mem", cache, *disk], OUT / f"serve_bench-ours-{cache}.log",
                        env={"CASCADE_LOCAL_PROMPT_CACHE": str(states / cache)})
        return server, f"http://127.0.0.1:{port}"

    def anchor() -> tuple[Server, str]:
        port = free_port()
        server = Server([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
                         "--port", str(port), "--n_ctx", str(args.ctx), "--n_threads", str(args.threads),
                         "--n_threads_batch", str(args.threads), "--verbose", "False",
                         # queue concurrent requests instead of cutting the running one off
                         "--interrupt_requests", "False"],
                        OUT / "serve_bench-anchor.log")
        return server, f"http://127.0.0.1:{port}"

    # All three servers run at once and every measurement alternates between them, so that a change in the
    # machine's load (it is shared) hits each alike. An idle server uses no CPU.
    starts = {"cascade-local": lambda: ours("2GiB"), "llama-cpp-python": anchor,
              "cascade-local, no prefix cache": lambda: ours("0")}
    servers: dict[str, tuple[Server, str]] = {}
    results: dict[str, dict] = {label: {"tps": {}, "runs": []} for label in starts}
    try:
        for label, start in starts.items():
            servers[label] = start()
        for server, url in servers.values():
            server.wait(url)
        # Warm up with as many concurrent requests as the largest measurement: the first use of each sequence
        # (its KV cells and recurrent state touched for the first time, a batch shape not yet seen) is slower,
        # and a one-time cost is not what the rows measure.
        for _, url in servers.values():
            with ThreadPoolExecutor(parallel) as pool:
                list(pool.map(lambda i, url=url: stream(url, [{"role": "user", "content": f"warm up {i}"}], 4),
                              range(parallel)))
        for n in args.clients:
            for _ in range(args.repeat):
                for label in ("cascade-local", "llama-cpp-python"):
                    got = throughput(servers[label][1], n, args.max_tokens)
                    results[label]["tps"][n] = max(results[label]["tps"].get(n, 0.0), got)
        for r in range(args.repeat):
            for label, (_, url) in servers.items():
                results[label]["runs"].append(session(url, args.turns, args.system_tokens, args.max_tokens, r))
                results[label]["last_prompt"] = PROMPT_TOKENS[-1] if PROMPT_TOKENS else None
    finally:
        for server, _ in servers.values():
            server.stop()
    for row in results.values():
        row["ttft"] = [min(run[0][t] for run in row["runs"]) for t in range(args.turns)]
        row["answers"] = [run[1] for run in row["runs"]]

    ours_row, anchor_row = results["cascade-local"], results["llama-cpp-python"]
    nocache = results["cascade-local, no prefix cache"]
    lines = [f"Serve benchmark, {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC; {os.cpu_count()} CPUs ({cpu_model()}); "
             f"model {gguf.name} ({gguf.stat().st_size / 1e6:.1f} MB); "
             f"{'greedy' if not args.temperature else f'temperature {args.temperature}, seed {args.seed}'}, "
             f"--max-tokens {args.max_tokens}, "
             f"--threads {args.threads}; cascade-local --parallel {parallel}; best of {args.repeat} runs", "",
             "| concurrent clients | cascade-local tok/s | llama-cpp-python tok/s | ratio |", "|--:|--:|--:|--:|"]
    for n in args.clients:
        a, b = ours_row["tps"][n], anchor_row["tps"][n]
        lines.append(f"| {n} | {a:.1f} | {b:.1f} | {a / b:.2f} |")
    later = slice(1, None)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    lines += ["", f"Agent session: {args.turns} turns, a long system prompt (~{args.system_tokens * 4} characters; "
              f"the last turn's prompt was {ours_row['last_prompt']} tokens), the whole conversation resent each "
              f"turn; time to first token (ms); 1-minute load average {os.getloadavg()[0]:.2f} at the end", "",
              "| turn | cascade-local | cascade-local, no prefix cache | llama-cpp-python |", "|--:|--:|--:|--:|"]
    for t in range(args.turns):
        lines.append(f"| {t + 1} | {ours_row['ttft'][t] * 1e3:.1f} | {nocache['ttft'][t] * 1e3:.1f} | "
                     f"{anchor_row['ttft'][t] * 1e3:.1f} |")
    ratio = mean(ours_row["ttft"][later]) / mean(anchor_row["ttft"][later])
    same = ours_row["answers"] == nocache["answers"]
    lines += ["", f"Turns 2-{args.turns}: mean TTFT ratio cascade-local / llama-cpp-python = {ratio:.2f}; "
              f"answers with the prefix cache {'identical to' if same else 'DIFFERENT from'} those without it."]
    text = "\n".join(lines)
    print(text)
    (OUT / "serve_bench.md").write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
