"""What pooling a device over llama.cpp's RPC costs per token: generation speed and the bytes that cross the socket.

Starts `cascade-local rpc-server` on loopback (the best case: no network latency or bandwidth limit), then decodes
the same greedy prompt with everything on the CPU, with the experts on the RPC device, and with the whole model on
it. Bytes are the server connection's TCP counters (`ss -ti`: bytes_received and bytes_acked on the server's
port), read around the generation; timings are wall clock around `generate` (the RPC backend computes
asynchronously, so the engine's own prompt/generation split would misattribute the wait).

    python bench/rpc_bench.py [MODEL.gguf]     # default: the tiny fixture converted to q8_0 in bench/out/

Client and server run one thread each: on one host they share the cores, and ggml's CPU threads spin while they
wait, so more threads than cores in all (here 2 + 2 on 2 cores) made the split placement 17-22 tokens/s
instead of 660-1,270.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from cascade_local.engine import Engine, Request
from cascade_local.rpc import RpcError, free_port, hello
from cascade_local.runtime import PlacementOptions, open_engine
from cascade_local.sampling import SamplingParams

ROOT = Path(__file__).resolve().parent.parent
PROMPT = [1, 10] + [20 + (i * 7) % 700 for i in range(62)]
N_GEN = 64
THREADS = 1  # each for the client and the server
GREEDY = SamplingParams(temperature=0, ignore_eos=True)  # always N_GEN tokens


def server_io(port: int) -> tuple[int, int]:
    """(bytes the server received, bytes it sent) on its connections, from the kernel's TCP counters."""
    out = subprocess.run(["ss", "-tinH", "state", "established", f"( sport = :{port} )"], capture_output=True,
                         text=True, check=True).stdout
    received = sum(int(n) for n in re.findall(r"bytes_received:(\d+)", out))
    sent = sum(int(n) for n in re.findall(r"bytes_acked:(\d+)", out))
    return received, sent


def main() -> None:
    if len(sys.argv) > 1:
        gguf = Path(sys.argv[1])
    else:
        from cascade_local.convert import convert, uniform_recipe

        gguf = ROOT / "bench/out/tiny-q8_0.gguf"
        if not gguf.exists():
            gguf.parent.mkdir(parents=True, exist_ok=True)
            convert(ROOT / "tests/fixtures/tiny", gguf, uniform_recipe("q8_0"))
    port = free_port()
    endpoint = f"127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "cascade_local", "rpc-server", "--port", str(port), "--threads",
                               str(THREADS)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            try:
                hello(endpoint, timeout=1)
                break
            except RpcError:
                time.sleep(0.2)
        rows = []
        placements = [
            ("CPU only", lambda: open_engine(str(gguf), ctx=512, threads=THREADS,
                                               placement=PlacementOptions(gpu_mem="0"))[0]),
            ("experts on RPC0 (loopback)", lambda: _experts_only(gguf, endpoint)),
            ("whole model on RPC0 (loopback)",
             lambda: open_engine(str(gguf), ctx=512, threads=THREADS, placement=PlacementOptions(rpc=(endpoint,)))[0]),
        ]
        for label, make in placements:
            engine = make()
            with engine:
                engine.generate(Request(PROMPT[:8], GREEDY, max_tokens=4))  # warm up
                # The same prompt twice, with 1 and with N_GEN tokens: the difference is N_GEN - 1 decode steps.
                short_s, short_io = _measured(engine, port, 1)
                full_s, full_io = _measured(engine, port, N_GEN)
            steps = N_GEN - 1
            received, sent = ((full - part) / steps / 1024 for full, part in zip(full_io, short_io, strict=True))
            rows.append(f"| {label} | {len(PROMPT) / short_s:.0f} | {steps / (full_s - short_s):.1f} | "
                        f"{received:.1f} | {sent:.1f} |")
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=30)
    print(f"{gguf.name}, prompt {len(PROMPT)} tokens, {N_GEN} generated, greedy, loopback, {THREADS} thread each")
    print("| placement | prompt tok/s (with 1st token) | generation tok/s | KiB sent per token | KiB back per token |")
    print("|---|--:|--:|--:|--:|")
    print("\n".join(rows))


def _measured(engine: Engine, port: int, n: int) -> tuple[float, tuple[int, int]]:
    before, started = server_io(port), time.perf_counter()
    engine.generate(Request(PROMPT, GREEDY, max_tokens=n))
    seconds, after = time.perf_counter() - started, server_io(port)
    return seconds, (after[0] - before[0], after[1] - before[1])


def _experts_only(gguf: Path, endpoint: str) -> Engine:
    """Experts on the RPC device, everything else on the CPU (n_gpu_layers 0): the split a big model uses."""
    from cascade_local.devices import tensor_buft_overrides
    from cascade_local.llama_model import LoadedModel
    from cascade_local.placement import EXPERT_REGEX, GPU
    from cascade_local.rpc import connect

    (device,) = connect([endpoint])
    model = LoadedModel(gguf, overrides=tensor_buft_overrides([(EXPERT_REGEX, GPU)], 0, [device.handle]))
    return Engine(model, n_ctx=512, n_seq_max=1, threads=THREADS, owns_model=True)


if __name__ == "__main__":
    main()
