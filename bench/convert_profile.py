"""Where a conversion's time goes: each stage of the converter timed on its own, one stage after another.

Walks the same tensors and 32 MB blocks as `cascade-local convert` and times, per block:

* read: copying the block out of the memory-mapped shard (the page faults are the disk read);
* widen: BF16 -> F32 as the converter did before the stages overlapped (`astype(uint32) << 16`), a whole block;
* stack: gathering the experts of one stacked tensor (the converter streams them expert by expert: no copy,
  so this is the per-block bookkeeping only);
* quantize: ggml's quantizer on the widened block (all threads);
* write: appending the encoded bytes to a file in the output folder, and the final fsync;
* and, not part of the total, the converter's encoder now: widening and quantizing in 256 KB pieces on
  every thread (`BlockEncoder`), on the same blocks.

`--quantize-only` instead prints the seconds the converter's encoder needs for every tensor with no I/O:
each block is copied into memory first (not timed), then encoded (timed), and the bytes are dropped.

The shard pages are dropped from the page cache first (fsync + posix_fadvise DONTNEED), as convert_bench.py
does. The output file is deleted at the end. The table goes to stdout.

    .venv/bin/python bench/convert_profile.py SLICE_DIR [--recipe q4-moe | --type q8_0] [--out-dir /tmp]
    .venv/bin/python bench/convert_profile.py SLICE_DIR --recipe q4-moe --quantize-only
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from cascade_local.convert import Checkpoint, Recipe, uniform_recipe
from cascade_local.convert.encode import BlockEncoder
from cascade_local.convert.pipeline import BLOCK_BYTES
from cascade_local.convert.policy import FLOAT_TYPES
from cascade_local.convert.safetensors_file import f32_to_bf16
from cascade_local.convert.tensor_map import TRANSFORMS, Transform, plan_tensors

from cascade_local.ggml import quantize_rows
from cascade_local.registry import load_registry

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert_bench import drop_page_cache


def choose_recipe(recipe_name: str | None, type_name: str | None) -> Recipe:
    return uniform_recipe(type_name) if type_name else load_registry().recipe(recipe_name or "q4-moe")


def quantize_only(src: Path, recipe: Recipe) -> float:
    """Seconds the converter's encoder takes for every block of the checkpoint, each already in memory."""
    ckpt = Checkpoint(src)
    planned = plan_tensors(ckpt)
    policy = recipe.resolve(ckpt.config)
    seconds = 0.0
    try:
        with BlockEncoder() as encoder:
            for tensor in planned:
                qtype = policy.type_for(tensor)
                for source in tensor.sources:
                    entry = ckpt.entry(source)
                    raw, dtype = ckpt.raw(source), entry.dtype
                    if tensor.transform is not Transform.NONE:
                        raw, dtype = TRANSFORMS[tensor.transform](ckpt.f32(source)), "F32"
                    rows = raw.reshape(-1, tensor.shape[-1])
                    step = max(1, BLOCK_BYTES // max(1, rows.shape[1] * rows.itemsize))
                    for first in range(0, rows.shape[0], step):
                        block = np.array(rows[first:first + step])
                        started = time.perf_counter()
                        encoder.encode(block, dtype, qtype)
                        seconds += time.perf_counter() - started
                    ckpt.release(source)
    finally:
        ckpt.close()
    return seconds


def profile(src: Path, recipe: Recipe, out_dir: Path) -> dict[str, float]:
    ckpt = Checkpoint(src)
    drop_page_cache(sorted(src.glob("*.safetensors")))
    planned = plan_tensors(ckpt)
    policy = recipe.resolve(ckpt.config)
    cost: dict[str, float] = defaultdict(float)
    out = out_dir / f".convert_profile.{os.getpid()}.bin"
    fused = 0.0
    started = time.perf_counter()
    try:
        with open(out, "wb") as fh, BlockEncoder() as encoder:
            for tensor in planned:
                qtype = policy.type_for(tensor)
                for source in tensor.sources:
                    t = time.perf_counter()
                    entry = ckpt.entry(source)
                    raw = ckpt.raw(source)
                    if tensor.transform is not Transform.NONE:
                        raw = TRANSFORMS[tensor.transform](ckpt.f32(source))
                    rows = raw.reshape(-1, tensor.shape[-1])
                    step = max(1, BLOCK_BYTES // max(1, rows.shape[1] * rows.itemsize))
                    cost["stack"] += time.perf_counter() - t
                    for first in range(0, rows.shape[0], step):
                        t0 = time.perf_counter()
                        block = np.array(rows[first:first + step])  # the page faults: the disk read
                        t1 = time.perf_counter()
                        cost["read"] += t1 - t0
                        if entry.dtype == "BF16" and qtype.name == "BF16":
                            data: np.ndarray = block
                        else:
                            values = (block.astype(np.uint32) << 16).view(np.float32) if block.dtype == np.uint16 \
                                else block.astype(np.float32)
                            t2 = time.perf_counter()
                            cost["widen"] += t2 - t1
                            t1 = t2
                            if qtype in FLOAT_TYPES:
                                data = values if qtype.name == "F32" else (
                                    values.astype(np.float16) if qtype.name == "F16" else f32_to_bf16(values))
                                cost["narrow (f16/bf16 output)"] += time.perf_counter() - t1
                            else:
                                data = quantize_rows(values, qtype)
                                t2 = time.perf_counter()
                                cost["quantize"] += t2 - t1
                                encoder.encode(block, entry.dtype, qtype)
                                fused += time.perf_counter() - t2
                        t3 = time.perf_counter()
                        fh.write(data.data.cast("B"))
                        cost["write"] += time.perf_counter() - t3
                        ckpt.release(source)
            t = time.perf_counter()
            fh.flush()
            os.fsync(fh.fileno())
            cost["write"] += time.perf_counter() - t
    finally:
        out.unlink(missing_ok=True)
        ckpt.close()
    cost["total"] = time.perf_counter() - started - fused
    cost["encoder now: widen + quantize in 256 KB pieces (not in total)"] = fused
    return cost


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--recipe")
    which.add_argument("--type")
    parser.add_argument("--out-dir", type=Path, default=Path("/tmp"))
    parser.add_argument("--quantize-only", action="store_true",
                        help="print only the encoder's seconds for every block, from memory")
    args = parser.parse_args()
    recipe = choose_recipe(args.recipe, args.type)
    if args.quantize_only:
        print(f"{quantize_only(args.src, recipe):.3f}")
        return 0
    cost = profile(args.src, recipe, args.out_dir)
    total = cost.pop("total")
    print(f"| stage ({args.type or args.recipe or 'q4-moe'}) | s | share |")
    print("|---|--:|--:|")
    for stage, seconds in cost.items():
        print(f"| {stage} | {seconds:.1f} | {seconds / total:.0%} |")
    print(f"| total | {total:.1f} | 100% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
