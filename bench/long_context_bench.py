"""Long-context benchmark (issue 12): prompt speed at depth, read once / ask many, memory against the planner.

* **pp512 at depth** (as llama-bench's `-d`): 512 prompt tokens evaluated after DEPTH tokens already in the
  sequence, by cascade-local's engine and by a minimal raw loop on llama-cpp-python's low-level API (same model,
  context size, batch and threads), and their ratio. The engine reads one sequence up to the deepest depth once
  and hands its state to the raw loop's context at each depth (untimed); then the --repeats chunks of 512 that
  follow the depth are timed in both (their median), alternating between the two and which of them goes first.
  With --fill-states DIR the state at each depth is kept in DIR and later runs start from it (a 128k fill takes
  about 50 minutes on 2 cores); the timed chunks are read for real either way.
* **read once, ask many**: a document of --doc-tokens tokens, then --questions questions, each a fresh
  `cascade-local run -f doc.txt QUESTION` process sharing one prompt-state folder. Time to first token is the
  run's own prompt_seconds (`--json`); the first question evaluates the document, the others restore it. The
  answers are compared with the same questions asked with `--cache-size 0` (a full evaluation). Also the state
  file's size per 1,000 tokens.
* **KV type**: KL divergence of q8_0 and q4_0 KV caches against f16 over the next-token distributions of the
  last --kl-window positions of a --kl-tokens prompt, and how often the likeliest token agrees.
* **memory**: for each --mem-ctx, a child process loads the model and creates a context of that size; the RSS it
  adds is set beside the planner's estimate of the context's memory (KV cache, Mamba state, compute, output).

Defaults are small, for a shared 2-core machine: the depths, document and contexts fit the tiny fixture (trained
length 4096). For the real-width slice, pass e.g. `--depths 0,8192,32768,131072 --doc-tokens 32768
--mem-ctx 32768,131072,262144`.

    .venv/bin/python bench/long_context_bench.py --gguf model.gguf [--threads 2]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "cascade_local"]
SENTENCE = "The ledger of the harbour lists barrels of oil, wine and salt, and the ships that carried them. "
QUESTIONS = ["How many kinds of barrel are listed?", "What did the ships carry?", "Name one cargo.",
             "Which ledger is this?", "Summarize the document.", "What is the harbour?", "Give one word."]


def ids(n: int) -> list[int]:
    return [20 + (i * 7) % 700 for i in range(n)]  # ids every vocabulary here has


CHUNK = 512


class RawLoop:
    """A minimal prompt loop on llama-cpp-python's low-level API: what the engine is measured against."""

    def __init__(self, model, n_ctx: int, threads: int):
        import llama_cpp

        self._lib = llama_cpp
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = n_ctx, CHUNK, CHUNK
        params.n_threads = params.n_threads_batch = threads
        params.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(model.model, params)
        self.batch = llama_cpp.llama_batch_init(CHUNK, 0, 1)

    def evaluate(self, tokens: list[int], first: int, end: int) -> None:
        b = self.batch
        for start in range(first, end, CHUNK):
            chunk = tokens[start : min(end, start + CHUNK)]
            for i, t in enumerate(chunk):
                b.token[i], b.pos[i], b.n_seq_id[i] = t, start + i, 1
                b.seq_id[i][0], b.logits[i] = 0, start + i == end - 1
            b.n_tokens = len(chunk)
            assert self._lib.llama_decode(self.ctx, b) == 0

    def close(self) -> None:
        self._lib.llama_batch_free(self.batch)
        self._lib.llama_free(self.ctx)


def chunk_reader(reader, tokens: list[int]):
    """reader(start) evaluates the 512 tokens from `start`, an Engine's sequence 0 or a RawLoop, logits at the end."""
    if isinstance(reader, RawLoop):
        return lambda start: reader.evaluate(tokens, start, start + CHUNK)
    return lambda start: reader._evaluate(0, tokens, start, start + CHUNK, logits_at_end=True)


def take_state(ctx, state: bytes) -> None:
    """Sequence 0 of a llama_context becomes exactly the state given (read up to the same depth elsewhere)."""
    import ctypes

    import llama_cpp

    llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(ctx), 0, -1, -1)
    src = ctypes.cast(ctypes.c_char_p(state), ctypes.POINTER(ctypes.c_uint8))
    assert llama_cpp.llama_state_seq_set_data(ctx, src, len(state), 0) == len(state)


class FillStates:
    """Sequence states at each depth kept on disk between runs, keyed on the model file and the depth.

    The tokens up to a depth are the same in every run (`ids`), so a state read once serves every later run.
    """

    def __init__(self, folder: Path | None, gguf: Path):
        self.folder = folder
        st = gguf.stat()
        self.key = f"{gguf.name}-{st.st_size}-{st.st_mtime_ns}"

    def _path(self, depth: int) -> Path:
        assert self.folder is not None
        return self.folder / f"{self.key}-depth{depth}.state"

    def load(self, depth: int) -> bytes | None:
        if self.folder is None or depth == 0 or not self._path(depth).exists():
            return None
        return self._path(depth).read_bytes()

    def save(self, depth: int, state: bytes) -> None:
        if self.folder is None or depth == 0:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        partial = self._path(depth).with_suffix(".partial")
        partial.write_bytes(state)
        partial.replace(self._path(depth))


def pp_at_depths(gguf: Path, depths: list[int], threads: int, repeats: int, share_fill: bool = True,
                 fill_states: Path | None = None,
                 engine_outputs: int | None = None, control: bool = False,
                 engine_first: bool = False) -> list[tuple[list[float], list[float]]]:
    """(engine, raw loop) seconds for each chunk of 512 prompt tokens at each depth, both in one pass.

    One sequence is read up to the deepest depth once (a fresh context per depth would read 128k tokens again
    for every sample: hours on a desktop CPU); at each depth the next `repeats` chunks are timed in both,
    alternating, so that a change in the machine's load hits both alike. With `share_fill` only the engine reads
    the untimed tokens up to each depth, and the raw loop's context is given the engine's sequence state there
    (llama_state_seq_set_data): the same state, read once instead of twice; without it both read them.
    `fill_states` keeps each depth's state on disk for later runs (see FillStates); `engine_outputs` sets the
    engine context's reserved output rows (its default is one per sequence; the raw loop's llama.cpp default).
    `control` times a second raw loop in the engine's place (the engine still fills, untimed): how far two
    identical contexts differ on this machine, the noise floor of the ratio. `engine_first` creates the engine's
    context before the raw loop's. On this VM two contexts in one process have differed by up to 17% at 128k
    whatever they were (two raw loops included), so deep rows are also measured with each context alone
    (`alone_rows`).
    """
    from cascade_local.engine import Engine
    from cascade_local.llama_model import LoadedModel

    end = max(depths) + repeats * CHUNK
    tokens, n_ctx = ids(end), end + 256
    states = FillStates(fill_states, gguf)
    out, done = [], 0
    with contextlib.ExitStack() as stack:
        model = LoadedModel(gguf)
        stack.callback(model.close)
        if not engine_first:
            raw = RawLoop(model, n_ctx, threads)
            stack.callback(raw.close)
        engine = stack.enter_context(Engine(model, n_ctx=n_ctx, threads=threads, n_outputs_max=engine_outputs))
        if engine_first:
            raw = RawLoop(model, n_ctx, threads)
            stack.callback(raw.close)
        twin = RawLoop(model, n_ctx, threads) if control else None
        if twin is not None:
            stack.callback(twin.close)
        loops = (raw,) if twin is None else (raw, twin)
        runners = (chunk_reader(engine if twin is None else twin, tokens), chunk_reader(raw, tokens))
        for depth in depths:
            if (state := states.load(depth)) is not None:
                take_state(engine.ctx, state)
            else:
                engine._evaluate(0, tokens, done, depth, logits_at_end=False)
                if fill_states is not None or (share_fill and depth > done):
                    state = engine._snapshot(0)
                    states.save(depth, state)
            for loop in loops:  # the raw loops are handed the engine's state, or read up to the depth themselves
                if state is not None:
                    take_state(loop.ctx, state)
                else:
                    loop.evaluate(tokens, done, depth)
            times: tuple[list[float], list[float]] = ([], [])
            for i, start in enumerate(range(depth, depth + repeats * CHUNK, CHUNK)):
                # which goes first alternates too: the second may find the weights warmer in the caches
                for which in (0, 1) if i % 2 == 0 else (1, 0):
                    started = time.perf_counter()
                    runners[which](start)
                    times[which].append(time.perf_counter() - started)
            out.append(times)
            done = depth + repeats * CHUNK
            if twin is not None:  # the twin read the timed chunks in the engine's place; the engine fills on
                engine._evaluate(0, tokens, depth, done, logits_at_end=False)
    return out


def depth_rows(gguf: Path, depths: list[int], threads: int, repeats: int, fill_states: Path | None = None,
               engine_outputs: int | None = None, control: bool = False, engine_first: bool = False) -> list[str]:
    if any(b - a < repeats * CHUNK for a, b in itertools.pairwise(depths)) or depths != sorted(depths):
        raise SystemExit(f"--depths must rise by at least {repeats * CHUNK} (--repeats x 512)")
    pp_at_depths(gguf, [0], threads, 1)  # warm-up: page cache, first-call costs
    rows = ["| depth | engine pp512 tok/s | raw loop pp512 tok/s | ratio | ratio of each chunk: median (range) |",
            "|---:|---:|---:|---:|:--|"]
    timed = pp_at_depths(gguf, depths, threads, repeats, fill_states=fill_states, engine_outputs=engine_outputs,
                         control=control, engine_first=engine_first)
    for depth, (engine_s, raw_s) in zip(depths, timed, strict=True):
        e, r = CHUNK / statistics.median(engine_s), CHUNK / statistics.median(raw_s)
        # The same chunk read by both, one right after the other: a drift in the machine's speed over the
        # minutes a deep row takes cancels in these, not in the medians' ratio.
        pairs = sorted(b / a for a, b in zip(engine_s, raw_s, strict=True))
        rows.append(f"| {depth} | {e:.1f} | {r:.1f} | {e / r:.3f} "
                    f"| {statistics.median(pairs):.3f} ({pairs[0]:.3f}-{pairs[-1]:.3f}) |")
    return rows


def ask(gguf: Path, doc: Path, question: str, threads: int, env: dict, *extra: str) -> dict:
    # Thinking off: a fixed-length answer whatever the model thinks (a run cut off while reasoning exits 3).
    args = [*CLI, "run", str(gguf), "-f", str(doc), question, "--json", "--no-think", "--temperature", "0",
            "--max-tokens", "16", "--threads", str(threads), "--cache-min-tokens", "256", *extra]
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=3600)
    # Exit 3: the token limit came while the model was reasoning (a random-weight model may open a thought even
    # with thinking off); the JSON result is still written, and its timings are what is measured.
    if done.returncode not in (0, 3):
        raise SystemExit(f"run failed: {done.stderr.strip()}")
    return json.loads(done.stdout)


def read_once_rows(gguf: Path, doc_tokens: int, questions: int, threads: int, check: int | None = None) -> list[str]:
    from cascade_local.llama_model import LoadedModel
    from cascade_local.prompt_store import entries

    with LoadedModel(gguf) as model:  # a document of about doc_tokens tokens with this model's tokenizer
        per = len(model.tokenize(SENTENCE))
    with tempfile.TemporaryDirectory() as tmp:
        doc = Path(tmp) / "doc.txt"
        doc.write_text(SENTENCE * max(1, doc_tokens // per))
        env = {**os.environ, "CASCADE_LOCAL_PROMPT_CACHE": str(Path(tmp) / "states")}
        asked = [ask(gguf, doc, QUESTIONS[i % len(QUESTIONS)], threads, env) for i in range(questions)]
        # Each check is a full evaluation of the document: `check` picks the last ones only, to save time.
        checked = list(range(1, questions))[-check:] if check else list(range(1, questions))
        fresh = {i: ask(gguf, doc, QUESTIONS[i % len(QUESTIONS)], threads, env, "--cache-size", "0")
                 for i in checked}
        states = entries(Path(tmp) / "states")
        state_bytes = max((e.nbytes for e in states), default=0)
        state_tokens = max((e.n_tokens for e in states), default=0)
    first = asked[0]["timings"]["prompt_seconds"]
    rows = ["| question | prompt tokens | cached | time to first token s | vs first | same answer as full "
            "(—: not checked) |",
            "|---:|---:|---:|---:|---:|:--|"]
    for i, a in enumerate(asked):
        same = "—" if i not in fresh else str((a["content"], a["reasoning"]) == (fresh[i]["content"],
                                                                                fresh[i]["reasoning"]))
        ttft = a["timings"]["prompt_seconds"]
        rows.append(f"| {i + 1} | {a['usage']['prompt_tokens']} | {a['usage']['cached_tokens']} | {ttft:.3f} | "
                    f"{ttft / first:.3f} | {same} |")
    if state_tokens:
        rows.append(f"\nstate file: {state_bytes} bytes for {state_tokens} tokens, "
                    f"{state_bytes / state_tokens * 1000 / 2**20:.2f} MiB per 1k tokens")
    return rows


def kv_logits(gguf: Path, kv_type: str, n: int, window: int, threads: int):
    """Log-probabilities at the last `window` positions of an n-token prompt, with a `kv_type` KV cache."""
    import ctypes

    import numpy as np

    from cascade_local.engine import Engine
    from cascade_local.llama_model import LoadedModel

    tokens, rows = ids(n), []
    with Engine(LoadedModel(gguf), n_ctx=n + 256, threads=threads, kv_type=kv_type, owns_model=True,
                n_outputs_max=512) as engine:  # logits of every position of a batch
        vocab = engine.model.n_vocab
        for first in range(0, n, engine.n_batch):
            chunk = tokens[first : first + engine.n_batch]
            engine._fill([(0, t, first + i, first + i >= n - window) for i, t in enumerate(chunk)])
            engine._decode()
            for i in range(len(chunk)):
                if first + i >= n - window:
                    ptr = engine._lib.llama_get_logits_ith(engine.ctx, i)
                    rows.append(np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)),
                                                      (vocab,)).astype(np.float64))
    logits = np.stack(rows)
    return logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)


def kl_rows(gguf: Path, n: int, window: int, threads: int) -> list[str]:
    import numpy as np

    ref = kv_logits(gguf, "f16", n, window, threads)
    rows = ["| KV type | mean KL vs f16 (nats) | max KL | top-1 agreement |", "|:--|---:|---:|---:|"]
    for kv_type in ("q8_0", "q4_0"):
        got = kv_logits(gguf, kv_type, n, window, threads)
        kl = (np.exp(ref) * (ref - got)).sum(axis=1)
        agree = float((ref.argmax(axis=1) == got.argmax(axis=1)).mean())
        rows.append(f"| {kv_type} | {kl.mean():.2e} | {kl.max():.2e} | {agree:.3f} |")
    return rows


def rss_kib() -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))


def alone_child(gguf: Path, kind: str, depth: int, threads: int, repeats: int, fill_states: Path) -> None:
    """One context only (the engine's or the raw loop's), given the saved state at `depth`; prints chunk seconds."""
    from cascade_local.engine import Engine
    from cascade_local.llama_model import LoadedModel

    state = FillStates(fill_states, gguf).load(depth)
    if state is None:
        raise SystemExit(f"no state for depth {depth} in {fill_states}: run with --fill-states first")
    end = depth + repeats * CHUNK
    tokens, n_ctx = ids(end), end + 256
    with contextlib.ExitStack() as stack:
        model = LoadedModel(gguf)
        stack.callback(model.close)
        if kind == "engine":
            reader = stack.enter_context(Engine(model, n_ctx=n_ctx, threads=threads))
        else:
            reader = RawLoop(model, n_ctx, threads)
            stack.callback(reader.close)
        run = chunk_reader(reader, tokens)
        take_state(reader.ctx, state)
        seconds = []
        for start in range(depth, end, CHUNK):
            started = time.perf_counter()
            run(start)
            seconds.append(time.perf_counter() - started)
    print(json.dumps(seconds))


def alone_rows(gguf: Path, depths: list[int], threads: int, repeats: int, rounds: int, fill_states: Path) -> list[str]:
    """Each context alone in its own process, engine and raw loop alternating, `rounds` processes of each."""
    rows = ["| depth | engine pp512 tok/s | raw loop pp512 tok/s | ratio | processes "
            "| per process: engine / raw tok/s |", "|---:|---:|---:|---:|---:|:--|"]
    for depth in depths:
        per_kind: dict[str, list[list[float]]] = {"engine": [], "raw": []}
        for i in range(2 * rounds):
            kind = ("engine", "raw", "raw", "engine")[i % 4]  # each goes first in every other pair
            done = subprocess.run([sys.executable, __file__, "--alone-child", kind, "--gguf", str(gguf),
                                   "--threads", str(threads), "--repeats", str(repeats), "--depths", str(depth),
                                   "--fill-states", str(fill_states)], capture_output=True, text=True, timeout=3600)
            if done.returncode != 0:
                raise SystemExit(f"{kind} process failed: {done.stderr.strip()[-500:]}")
            per_kind[kind].append(json.loads(done.stdout.strip().splitlines()[-1]))
        e = CHUNK / statistics.median(t for run in per_kind["engine"] for t in run)
        r = CHUNK / statistics.median(t for run in per_kind["raw"] for t in run)
        each = ", ".join(f"{CHUNK / statistics.median(a):.1f} / {CHUNK / statistics.median(b):.1f}"
                         for a, b in zip(per_kind["engine"], per_kind["raw"], strict=True))
        rows.append(f"| {depth} | {e:.1f} | {r:.1f} | {e / r:.3f} | {rounds} + {rounds} | {each} |")
    return rows


def memory_child(gguf: Path, ctx: int, threads: int) -> None:
    import re

    from cascade_local.engine import Engine, Request
    from cascade_local.llama_log import RECENT, quiet_llama
    from cascade_local.llama_model import LoadedModel

    quiet_llama()
    model = LoadedModel(gguf)
    before = rss_kib()
    RECENT.clear()
    with Engine(model, n_ctx=ctx, threads=threads, owns_model=True) as engine:
        # What llama.cpp allocated, from its log: KV cache, Mamba state, compute and output buffers.
        sizes = [float(m.group(1)) for line in RECENT if (m := re.search(
            r"(?:llama_kv_cache: size|llama_memory_recurrent: size|compute buffer size|output buffer size) "
            r"= +([\d.]+) MiB", line))]
        # One full micro-batch touches the compute buffer. Pages of the KV cache and of the attention mask beyond
        # the cells in use are never touched, so RSS stays below the allocation until the context fills.
        engine.generate(Request(ids(min(512, ctx - 8)), max_tokens=1))
        print(json.dumps({"rss_added": (rss_kib() - before) * 1024, "allocated": sum(sizes) * 2**20}))


def memory_rows(gguf: Path, contexts: list[int], threads: int) -> list[str]:
    from cascade_local.gguf_info import read_gguf
    from cascade_local.placement import fmt_bytes, plan_placement

    rows = ["| context | planner: KV + state + compute + output | llama.cpp allocated (its log) | allocated / "
            "planned | RSS added after 512 tokens | RSS / planned |", "|---:|---:|---:|---:|---:|---:|"]
    gguf_file = read_gguf(gguf)
    for ctx in contexts:
        m = plan_placement(gguf_file, ctx=ctx, gpu_bytes=0, gpu_available=False, n_batch=512, n_outputs_max=1).memory
        planned = m.kv + m.state + m.compute + m.output
        done = subprocess.run([sys.executable, __file__, "--memory-child", str(ctx), "--gguf", str(gguf),
                               "--threads", str(threads)], capture_output=True, text=True, timeout=3600)
        if done.returncode != 0:
            rows.append(f"| {ctx} | {fmt_bytes(planned)} | failed: {done.stderr.strip()[-200:]} | |")
            continue
        got = json.loads(done.stdout.strip().splitlines()[-1])
        added, allocated = got["rss_added"], got["allocated"]
        rows.append(f"| {ctx} | {fmt_bytes(planned)} | {fmt_bytes(allocated)} | {allocated / planned:.3f} | "
                    f"{fmt_bytes(added)} | {added / planned:.3f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, required=True, help="the model to measure")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--depths", default="0,1024,2048", help="comma-separated depths for pp512")
    parser.add_argument("--doc-tokens", type=int, default=3000)
    parser.add_argument("--questions", type=int, default=5)
    parser.add_argument("--check", type=int, help="compare only the last N questions with a full evaluation "
                        "(default: every question after the first)")
    parser.add_argument("--mem-ctx", default="1024,4096", help="comma-separated contexts for the memory rows")
    parser.add_argument("--kl-tokens", type=int, default=3072, help="prompt length for the KV-type KL rows")
    parser.add_argument("--kl-window", type=int, default=256, help="last positions whose distributions are compared")
    parser.add_argument("--only-kl", action="store_true", help="measure only the KV-type KL rows")
    parser.add_argument("--only-memory", action="store_true", help="measure only the context memory rows")
    parser.add_argument("--only-depth", action="store_true", help="measure only pp512 at depth")
    parser.add_argument("--fill-states", type=Path, help="keep the state at each depth in this folder and start "
                        "later runs from it (only the untimed reading up to each depth is skipped)")
    parser.add_argument("--engine-outputs", type=int, help="output rows the engine's context reserves "
                        "(default one per sequence; llama.cpp's own default is the batch size)")
    parser.add_argument("--control", action="store_true", help="time a second raw loop in the engine's column: "
                        "how far two identical contexts differ here (the ratio's noise floor)")
    parser.add_argument("--engine-first", action="store_true", help="create the engine's context before the "
                        "raw loop's (the default is after)")
    parser.add_argument("--alone", type=int, metavar="ROUNDS", help="pp512 at depth with each context alone in its "
                        "own process, engine and raw loop alternating, ROUNDS processes of each (needs --fill-states "
                        "holding every depth): no second context in the process to share caches and memory with")
    parser.add_argument("--alone-child", choices=["engine", "raw"], help=argparse.SUPPRESS)
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.gguf, args.memory_child, args.threads)
        return
    if args.alone_child:
        alone_child(args.gguf, args.alone_child, int(args.depths), args.threads, args.repeats, args.fill_states)
        return
    sys.path.insert(0, str(ROOT))

    def section(lines: list[str]) -> None:  # each as it is measured: a long run shows its results as it goes
        print("\n".join(lines) + "\n", flush=True)

    if args.only_kl:
        section([f"## KV type: KL against f16 ({args.kl_tokens}-token prompt, last {args.kl_window} positions)",
                 *kl_rows(args.gguf, args.kl_tokens, args.kl_window, args.threads)])
        return
    import datetime as dt

    sys.path.insert(0, str(ROOT / "bench"))
    from convert_bench import cpu_model

    when = f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC"
    section([f"# long-context bench: {args.gguf.name}, {args.threads} threads; {when}, {os.cpu_count()} CPUs "
             f"({cpu_model()}), 1-minute load average {os.getloadavg()[0]:.1f} at the start"])
    if not args.only_depth:
        section(["## context memory", *memory_rows(args.gguf, [int(c) for c in args.mem_ctx.split(",")],
                                                   args.threads)])
        if args.only_memory:
            return
        section([f"## read once, ask many ({args.doc_tokens} tokens, {args.questions} questions)",
                 *read_once_rows(args.gguf, args.doc_tokens, args.questions, args.threads, args.check)])
    if args.alone:
        if args.fill_states is None:
            raise SystemExit("--alone needs --fill-states")
        section(["## pp512 at depth, each context alone in its own process",
                 *alone_rows(args.gguf, [int(d) for d in args.depths.split(",")], args.threads, args.repeats,
                             args.alone, args.fill_states)])
        return
    section(["## pp512 at depth", *depth_rows(args.gguf, [int(d) for d in args.depths.split(",")], args.threads,
                                              args.repeats, args.fill_states, args.engine_outputs,
                                              args.control, args.engine_first)])
    if not args.only_depth:
        section([f"## KV type: KL against f16 ({args.kl_tokens}-token prompt, last {args.kl_window} positions)",
                 *kl_rows(args.gguf, args.kl_tokens, args.kl_window, args.threads)])
    section([f"(1-minute load average {os.getloadavg()[0]:.1f} at the end)"])


if __name__ == "__main__":
    main()
