"""Engine benchmark: cascade-local's engine against a minimal raw llama.cpp loop, batching, time to first token.

On one GGUF (by default the real-width slice converted with the default recipe), in one run:

* prompt and generation tokens/s of the engine against a minimal loop over llama-cpp-python's low-level
  API (same model, context, threads, greedy sampler); runs alternate and the median of each is kept;
* aggregate generation tokens/s with 1, 4 and 8 sequences decoded together, relative to 1;
* time to first token of a one-shot prompt in a fresh process, start-up (imports, model load) included;
* prompt and generation tokens/s with ggml's extra CPU buffer types on (`all`: AMX where built, and weight
  repacking), repacking only (`repack`) and off (`none`), each in a child process with CASCADE_LOCAL_CPU_EXTRA
  set; a mode that kills its child (AMX on VMs that cannot run it) is reported as such, not fatal.
* the cost of one prompt snapshot (a sequence's state copied out after its prompt, as each chat turn
  and tool round does) and of restoring it, with the state's size.

    .venv/bin/python bench/engine_bench.py [--gguf FILE] [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert_bench import cpu_model, ensure_slice, meminfo_kb, slice_dir_name

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
PROMPT_TOKENS, GEN_TOKENS = 256, 128


def prompt_ids(n: int, offset: int = 0) -> list[int]:
    return [20 + (i * 7 + offset * 13) % 700 for i in range(n)]  # ids the fixture vocabulary has


def raw_loop(model, threads: int, n_ctx: int) -> tuple[float, float]:
    """Prompt and generation seconds of a minimal greedy loop on llama.cpp's low-level API."""
    import llama_cpp

    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch = n_ctx, 512, 512
    params.n_threads = params.n_threads_batch = threads
    params.no_perf = True
    ctx = llama_cpp.llama_init_from_model(model.model, params)
    batch = llama_cpp.llama_batch_init(512, 0, 1)
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
    try:
        def decode(tokens: list[int], pos: int) -> None:
            for i, t in enumerate(tokens):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, pos + i, 1
                batch.seq_id[i][0], batch.logits[i] = 0, i == len(tokens) - 1
            batch.n_tokens = len(tokens)
            assert llama_cpp.llama_decode(ctx, batch) == 0

        tokens = prompt_ids(PROMPT_TOKENS)
        started = time.perf_counter()
        decode(tokens, 0)
        token = llama_cpp.llama_sampler_sample(chain, ctx, -1)
        prompt_s = time.perf_counter() - started
        started = time.perf_counter()
        pos = len(tokens)
        for _ in range(GEN_TOKENS - 1):
            decode([token], pos)
            pos += 1
            token = llama_cpp.llama_sampler_sample(chain, ctx, -1)
        gen_s = time.perf_counter() - started
    finally:
        llama_cpp.llama_sampler_free(chain)
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
    return prompt_s, gen_s


def engine_run(model, threads: int, n_ctx: int) -> tuple[float, float]:
    """The same work through the engine: prompt seconds (to the first token), then the other tokens."""
    from cascade_local.engine import Engine, Request
    from cascade_local.sampling import SamplingParams

    engine = Engine(model, n_ctx=n_ctx, threads=threads)
    request = Request(prompt_ids(PROMPT_TOKENS), SamplingParams(temperature=0), max_tokens=GEN_TOKENS)
    try:
        started = time.perf_counter()
        first = None
        for event in engine.stream(request):
            if first is None:
                first = time.perf_counter()
            if event.kind == "done":
                result = event.result
        end = time.perf_counter()
    finally:
        engine.close()
    # Only count generations that really produced GEN_TOKENS (an early end of turn would flatter us).
    assert result.completion_tokens == GEN_TOKENS, result.completion_tokens
    prompt_s = result.prompt_seconds
    return prompt_s, end - started - prompt_s


def batch_throughput(model, threads: int, n_seq: int) -> float:
    from cascade_local.engine import Engine, Request
    from cascade_local.sampling import SamplingParams

    engine = Engine(model, n_ctx=max(2048, n_seq * 256), n_seq_max=n_seq, threads=threads)
    requests = [Request(prompt_ids(32, offset=i), SamplingParams(temperature=0), max_tokens=GEN_TOKENS)
                for i in range(n_seq)]
    engine.generate_many(requests[:1])  # warm up
    started = time.perf_counter()
    results = engine.generate_many(requests)
    wall = time.perf_counter() - started
    engine.close()
    # Includes each sequence's prompt; prompts are short so generation dominates.
    return sum(r.completion_tokens for r in results) / wall


def snapshot_cost(model, threads: int, n_ctx: int, repeats: int) -> tuple[float, float, int]:
    """Median seconds to snapshot a sequence after a PROMPT_TOKENS prompt and to restore it; the state's bytes."""
    from cascade_local.engine import Engine, PromptCache

    tokens = prompt_ids(PROMPT_TOKENS)
    with Engine(model, n_ctx=n_ctx, threads=threads) as engine:
        # The engine's own snapshot path, timed alone (a chat turn also evaluates the prompt around it).
        engine._evaluate(0, tokens, 0, len(tokens), logits_at_end=False)
        taken, restored = [], []
        for _ in range(repeats):
            started = time.perf_counter()
            state = engine._snapshot(0)
            taken.append(time.perf_counter() - started)
            started = time.perf_counter()
            done = engine._restore(0, PromptCache(list(tokens), state), [*tokens, tokens[0]])
            restored.append(time.perf_counter() - started)
            assert done == len(tokens)
    return statistics.median(taken), statistics.median(restored), len(state)


TTFT_CHILD = """
import sys, time
t0 = float(sys.argv[2])
from cascade_local.engine import Engine, Request
from cascade_local.llama_model import LoadedModel
from cascade_local.sampling import SamplingParams
model = LoadedModel(sys.argv[1])
engine = Engine(model, n_ctx=1024, threads=int(sys.argv[3]))
text = model.template.render([{"role": "user", "content": "What is the capital of France?"}], enable_thinking=False)
for event in engine.stream(Request(model.encode_prompt(text), SamplingParams(temperature=0), max_tokens=4)):
    print(time.time() - t0, flush=True)
    break
"""


def time_to_first_token(gguf: Path, threads: int) -> float:
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", TTFT_CHILD, str(gguf), repr(t0), str(threads)],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.split()[0])


EXTRA_MODES = {"all": "on", "repack": "repack", "none": "off"}


def extras_child(gguf: Path, threads: int, repeats: int) -> None:
    """In a child with CASCADE_LOCAL_CPU_EXTRA set: print the median prompt and generation tokens/s."""
    from cascade_local.llama_model import LoadedModel

    model = LoadedModel(gguf)
    engine_run(model, threads, 1024)  # warm-up
    runs = [engine_run(model, threads, 1024) for _ in range(repeats)]
    prompt_s, gen_s = statistics.median(p for p, _ in runs), statistics.median(g for _, g in runs)
    print(PROMPT_TOKENS / prompt_s, (GEN_TOKENS - 1) / gen_s)


def extras_rows(gguf: Path, threads: int, repeats: int) -> list[str]:
    """One row per CPU buffer-type mode, relative to `none` (everything in the plain CPU buffer)."""
    import signal

    measured: dict[str, tuple[float, float] | str] = {}
    for mode, value in EXTRA_MODES.items():
        env = {**os.environ, "CASCADE_LOCAL_CPU_EXTRA": value}
        done = subprocess.run([sys.executable, __file__, "--extras-child", "--gguf", str(gguf), "--threads",
                               str(threads), "--repeats", str(repeats)], capture_output=True, text=True, env=env)
        if done.returncode < 0:
            measured[mode] = f"crashed ({signal.Signals(-done.returncode).name}): this machine cannot run it"
        elif done.returncode != 0:
            measured[mode] = f"failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}"
        else:
            p, g = map(float, done.stdout.split()[-2:])
            measured[mode] = (p, g)
    base = measured["none"]
    rows = ["| CPU buffer types (CASCADE_LOCAL_CPU_EXTRA) | prompt tokens/s | generation tokens/s | prompt / none "
            "| generation / none |", "|---|--:|--:|--:|--:|"]
    for mode, value in EXTRA_MODES.items():
        got = measured[mode]
        if isinstance(got, str):
            rows.append(f"| {mode} ({value}) | {got} | | | |")
        elif isinstance(base, tuple):
            rows.append(f"| {mode} ({value}) | {got[0]:.1f} | {got[1]:.1f} | {got[0] / base[0]:.2f} "
                        f"| {got[1] / base[1]:.2f} |")
        else:
            rows.append(f"| {mode} ({value}) | {got[0]:.1f} | {got[1]:.1f} | | |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, help="model to measure (default: the slice, converted with q4-moe)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--extras-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--only-extras", action="store_true", help="measure only the CPU buffer-type modes")
    args = parser.parse_args()
    if args.extras_child:
        extras_child(args.gguf, args.threads, args.repeats)
        return
    gguf = args.gguf
    if gguf is None:
        src = OUT / slice_dir_name("MEM*E")
        ensure_slice(src, "MEM*E", seed=0)
        gguf = OUT / "slice-q4-moe.gguf"
        if not gguf.exists():
            subprocess.run([sys.executable, "-m", "cascade_local", "convert", str(src), "-o", str(gguf)], check=True,
                           stdout=subprocess.DEVNULL)

    header = (f"Engine benchmark, {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC; {os.cpu_count()} CPUs ({cpu_model()}), "
              f"{meminfo_kb('MemTotal') / 1e6:.1f} GB RAM; model {gguf.name} ({gguf.stat().st_size / 1e9:.2f} GB), "
              f"{args.threads} threads, median of {args.repeats}")
    extras = extras_rows(gguf, args.threads, args.repeats)
    if args.only_extras:
        text = "\n".join([header, "", *extras])
        print(text)
        (OUT / "engine_bench_extras.md").write_text(text + "\n")
        return

    from cascade_local.llama_model import LoadedModel

    model = LoadedModel(gguf)
    n_ctx = 1024
    raw_loop(model, args.threads, n_ctx)  # warm caches (weights paged in) before anything is timed
    raw, ours = [], []
    for _ in range(args.repeats):  # alternate, so drift in machine speed hits both alike
        raw.append(raw_loop(model, args.threads, n_ctx))
        ours.append(engine_run(model, args.threads, n_ctx))
    raw_p = PROMPT_TOKENS / statistics.median(p for p, _ in raw)
    raw_g = (GEN_TOKENS - 1) / statistics.median(g for _, g in raw)
    our_p = PROMPT_TOKENS / statistics.median(p for p, _ in ours)
    our_g = (GEN_TOKENS - 1) / statistics.median(g for _, g in ours)
    throughput = {n: batch_throughput(model, args.threads, n) for n in (1, 4, 8)}
    snap_s, restore_s, state_bytes = snapshot_cost(model, args.threads, n_ctx, args.repeats)
    ttft = [time_to_first_token(gguf, args.threads) for _ in range(args.repeats)]
    lines = [
        header,
        "",
        "| measure | raw llama.cpp loop | cascade-local engine | engine / raw |",
        "|---|--:|--:|--:|",
        f"| prompt tokens/s ({PROMPT_TOKENS} tokens) | {raw_p:.1f} | {our_p:.1f} | {our_p / raw_p:.3f} |",
        f"| generation tokens/s ({GEN_TOKENS} tokens) | {raw_g:.1f} | {our_g:.1f} | {our_g / raw_g:.3f} |",
        "",
        "| parallel sequences | aggregate generation tokens/s | vs 1 sequence |",
        "|--:|--:|--:|",
        *(f"| {n} | {tps:.1f} | {tps / throughput[1]:.2f} |" for n, tps in throughput.items()),
        "",
        "| prompt snapshot | state size | snapshot | restore |",
        "|---|--:|--:|--:|",
        f"| one sequence after {PROMPT_TOKENS} prompt tokens | {state_bytes / 1e6:.2f} MB | {snap_s * 1e3:.2f} ms "
        f"| {restore_s * 1e3:.2f} ms |",
        "",
        f"Time to first token, fresh process, start-up and model load included: median {statistics.median(ttft):.2f} s "
        f"(runs: {', '.join(f'{t:.2f}' for t in ttft)})",
        "",
        *extras,
    ]
    text = "\n".join(lines)
    print(text)
    OUT.mkdir(parents=True, exist_ok=True)  # absent when --gguf skipped building the slice
    (OUT / "engine_bench.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
