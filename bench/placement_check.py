"""The placement checks of tests/test_rpc.py, on any second device: a GPU (bench/gpu_check.sh) or an RPC server.

For each placement (experts on the device, the whole model on it, two sequences in one batch) it compares greedy
tokens and logits with a CPU-only run, and llama.cpp's logged buffer sizes on the device with the plan's. A GPU's
kernels round differently from the CPU's, so logits are reported as their largest difference, not required to be
equal (the RPC tests require bit equality: the server runs the same CPU kernels). Prints a Markdown table.

    python bench/placement_check.py MODEL.gguf                  # this build's first GPU
    python bench/placement_check.py MODEL.gguf --rpc HOST:PORT  # an RPC server's device
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np

from cascade_local.devices import gpu_devices, tensor_buft_overrides
from cascade_local.engine import Engine, Request
from cascade_local.llama_log import RECENT, quiet_llama
from cascade_local.llama_model import LoadedModel
from cascade_local.logits import sequence_logits
from cascade_local.placement import EXPERT_REGEX, GPU, MiB
from cascade_local.runtime import PlacementOptions, open_engine
from cascade_local.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0)
PROMPTS = [[1, 10, 20, 31, 45, 300, 17, 99, 5, 11], [1, 10, 700, 12, 33, 64, 128, 250, 9]]


def logged_mib(lines: list[str], device: str, what: str) -> float | None:
    found = [re.search(r"= +([\d.]+) MiB", line) for line in lines if f"{device}" in line and what in line]
    return float(found[-1].group(1)) if found and found[-1] else None


def greedy(engine: Engine) -> list[str]:
    return [r.content for r in engine.generate_many([Request(p, GREEDY, max_tokens=12) for p in PROMPTS])]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", type=Path)
    parser.add_argument("--rpc", default=None)
    args = parser.parse_args()
    quiet_llama()
    if args.rpc:
        from cascade_local.rpc import connect

        (device,) = connect([args.rpc])
        handle, name = device.handle, device.name
    else:
        gpu = gpu_devices()[0]
        handle, name = gpu.handle, gpu.name
    n_layers = 1 + max(int(m.group(1)) for m in (re.match(r"blk\.(\d+)\.", t) for t in _names(args.model)) if m)
    with LoadedModel(args.model) as model:
        reference = list(sequence_logits(model, PROMPTS))
    with Engine(LoadedModel(args.model), n_ctx=512, n_seq_max=2, owns_model=True) as engine:
        reference_tokens = greedy(engine)
    rows = []
    for label, overrides in [("experts on " + name, tensor_buft_overrides([(EXPERT_REGEX, GPU)], 0, [handle])),
                             ("whole model on " + name, tensor_buft_overrides([], n_layers + 1, [handle]))]:
        RECENT.clear()  # a ring of 400 lines: empty it so what follows is this load's log
        with LoadedModel(args.model, overrides=overrides) as model:
            lines = list(RECENT)
            got = list(sequence_logits(model, PROMPTS))
        diff = max(float(np.max(np.abs(a - b))) for a, b in zip(reference, got, strict=True))
        moved = sum("buffer type overridden to " + name in line for line in lines)
        size = logged_mib(lines, name, "model buffer size")
        rows.append(f"| {label} | {moved} tensors overridden | model {size} MiB | max abs logit diff {diff:.3g} |")
    # Two sequences in one batch, planned: the plan's figures against llama.cpp's.
    RECENT.clear()
    placement = PlacementOptions(rpc=(args.rpc,) if args.rpc else ())
    engine, plan = open_engine(str(args.model), ctx=256, parallel=2, placement=placement)
    with engine:
        lines = list(RECENT)
        tokens = greedy(engine)
    figures = [(what, logged_mib(lines, name, what), planned / MiB) for what, planned in
               [("model buffer size", plan.weights(GPU)), ("KV buffer size", plan.memory.kv),
                ("RS buffer size", plan.memory.state)]]
    checks = ", ".join(f"{what.split()[0]} logged {got} / planned {want:.2f} MiB" for what, got, want in figures)
    rows.append(f"| 2 sequences in one batch, planned for {name} | n_gpu_layers {plan.n_gpu_layers} | {checks} | "
                f"greedy tokens {'identical' if tokens == reference_tokens else 'DIFFERENT'} |")
    print(f"{args.model.name} on {name}")
    print("| placement | evidence | device buffers (llama.cpp's log) | against CPU-only |")
    print("|---|---|---|---|")
    print("\n".join(rows))


def _names(path: Path) -> list[str]:
    from cascade_local.gguf_info import read_gguf

    return [t.name for t in read_gguf(path).tensors]


if __name__ == "__main__":
    main()
