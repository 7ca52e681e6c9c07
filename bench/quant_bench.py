"""Quantization benchmark: cascade-local's one-pass recipes against llama.cpp's two-step quantization.

For each target (the tiny test fixture and/or a real-width slice), in one run and on one machine:

* reference: our BF16 GGUF (`cascade-local convert --type bf16`); its logits are what KL is measured against;
* baseline: llama.cpp's usual path, that BF16 GGUF then `llama_model_quantize` to Q4_K_M (two steps,
  an intermediate file as big as the checkpoint); also its MXFP4_MOE and Q4_0 ftypes the same way;
* ours: each recipe, straight from the safetensors checkpoint in one pass;
* optionally llama.cpp's own two steps end to end: its `convert_hf_to_gguf.py --outtype bf16` (set
  LLAMA_CPP_CONVERT and LLAMA_CPP_PYTHON as for bench/convert_bench.py), then `llama_model_quantize` to
  MXFP4_MOE and Q4_K_M. The rows above take our BF16 as their first step, which is 4-5x faster than llama.cpp's.

Every conversion runs in its own child process (wall time, peak RSS from wait4). Quality: mean KL
divergence of each GGUF's next-token distribution from the BF16 GGUF's, and top-1 agreement, over
fixed token sequences (320 positions), computed by llama.cpp itself. Sizes are tensor bytes, so bits
per weight are comparable across files. Ratios are to the Q4_K_M baseline measured in the same run.

    .venv/bin/python bench/quant_bench.py [--targets tiny slice] [--recipes q4-moe q5-moe q8 small] [--slice-dir DIR]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import gguf
from cascade_local.convert.hf_config import NemotronHConfig
from cascade_local.convert.tensor_map import TensorClass

from cascade_local.registry import load_registry
from cascade_local.testing.checkpoint_fixture import real_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert_bench import (
    cpu_model,
    drop_page_cache,
    ensure_slice,
    llama_cpp_bf16_command,
    meminfo_kb,
    run_child,
    slice_dir_name,
)

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
SEQUENCES, SEQ_LEN, TOKEN_RANGE = 4, 80, (20, 779)  # ids the fixture tokenizer really has

LLAMA_FTYPES = {"Q4_K_M": 15, "MXFP4_MOE": 38, "Q4_0": 2}

QUANTIZE_CHILD = """
import ctypes, sys
from cascade_local.llama_log import quiet_llama
quiet_llama()
import llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = int(sys.argv[3])
params.nthread = 0
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params)))
"""

# Prints one JSON line: tensor bytes, parameters, and (unless it is the reference) KL and top-1
# agreement against the reference logits saved by the reference run.
QUALITY_CHILD = """
import json, sys
import numpy as np, gguf
from cascade_local.llama_model import LoadedModel
from cascade_local.logits import sequence_logits
path, ref_path, n_seq, seq_len, lo, hi = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7])
reader = gguf.GGUFReader(path)
tensor_bytes = sum(int(t.n_bytes) for t in reader.tensors)
params = sum(int(t.n_elements) for t in reader.tensors)
rng = np.random.default_rng(7)
# Loaded as the runtime loads, so the CPU buffer types are the ones this machine can run.
model = LoadedModel(path)
sequences = [[int(x) for x in rng.integers(lo, hi, size=seq_len)] for _ in range(n_seq)]
logits = np.concatenate(list(sequence_logits(model, sequences, threads=2)))
from collections import defaultdict
from cascade_local.model_summary import tensor_class
types = defaultdict(set)
for t in reader.tensors:
    types[tensor_class(t.name)].add(t.tensor_type.name)
result = {"tensor_bytes": tensor_bytes, "params": params, "types": {k: "/".join(sorted(v)) for k, v in types.items()}}
def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))
if ref_path == "-":
    np.save(sys.argv[7], logits)
    result["top_p"] = float(np.exp(log_softmax(logits.astype(np.float64))).max(-1).mean())
else:
    ref = np.load(ref_path).astype(np.float64)
    lp, lq = log_softmax(ref), log_softmax(logits.astype(np.float64))
    result["kl"] = float((np.exp(lp) * (lp - lq)).sum(-1).mean())
    result["top1"] = float((ref.argmax(-1) == logits.argmax(-1)).mean())
    result["top_p"] = float(np.exp(lp).max(-1).mean())
print(json.dumps(result))
"""


@dataclass
class Row:
    name: str
    wall: float
    rss: int
    intermediate: int
    tensor_bytes: int = 0
    params: int = 0
    kl: float | None = None
    top1: float | None = None
    types: dict[str, str] | None = None  # tensor class -> types used, as `info` reports them


def log(message: str) -> None:
    print(f"[quant_bench] {message}", file=sys.stderr, flush=True)


def timed(cmd: list[str], log_path: Path, what: str) -> tuple[float, int]:
    wall, rss, code, output = run_child(cmd, log_path)
    if code != 0:
        raise SystemExit(f"error: {what} failed (exit {code}):\n{output[-2000:]}")
    return wall, rss


def quality(gguf: Path, ref: Path | None, work: Path) -> dict:
    cmd = [sys.executable, "-c", QUALITY_CHILD, str(gguf), str(ref) if ref else "-", str(SEQUENCES), str(SEQ_LEN),
           *map(str, TOKEN_RANGE), str(work / "ref_logits.npy")]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"error: evaluating {gguf.name} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def shards(src: Path) -> list[Path]:
    return sorted(src.glob("*.safetensors"))


LLAMA_OWN = "llama.cpp convert_hf_to_gguf.py + quantize"


def second_step(label: str, name: str, bf16: Path, first: tuple[float, int], ftype_name: str, work: Path) -> Row:
    """llama.cpp's quantize of a BF16 GGUF made by a first step that took `first` (wall s, peak RSS): one row."""
    log(f"{label}: {name}: BF16 GGUF -> {ftype_name}")
    out = work / f"{bf16.stem}-{ftype_name}.gguf"
    drop_page_cache([bf16])
    wall, rss = timed([sys.executable, "-c", QUANTIZE_CHILD, str(bf16), str(out), str(LLAMA_FTYPES[ftype_name])],
                      work / f"{bf16.stem}-{ftype_name}.log", f"llama_model_quantize {ftype_name}")
    q = quality(out, work / "ref_logits.npy", work)
    out.unlink()
    return Row(f"{name} {ftype_name}", first[0] + wall, max(first[1], rss), bf16.stat().st_size, q["tensor_bytes"],
               q["params"], q["kl"], q["top1"], q["types"])


def run_target(label: str, src: Path, recipes: list[str], work: Path) -> list[Row]:
    work.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "cascade_local", "convert", str(src), "--force"]
    bf16 = work / "bf16.gguf"
    log(f"{label}: reference BF16 GGUF")
    drop_page_cache(shards(src))
    bf16_wall, bf16_rss = timed([*cli, "-o", str(bf16), "--type", "bf16"], work / "bf16.log", "BF16 conversion")
    ref = quality(bf16, None, work)
    rows = [Row("cascade-local --type bf16 (reference)", bf16_wall, bf16_rss, 0, ref["tensor_bytes"], ref["params"])]
    for ftype_name in LLAMA_FTYPES:
        rows.append(second_step(label, "llama.cpp two-step", bf16, (bf16_wall, bf16_rss), ftype_name, work))
    llama_bf16 = work / "llama-convert-bf16.gguf"
    if (llama_cmd := llama_cpp_bf16_command(src, llama_bf16)) is not None:
        log(f"{label}: llama.cpp convert_hf_to_gguf.py BF16")
        drop_page_cache(shards(src))
        first = timed(llama_cmd, work / "llama-convert-bf16.log", "convert_hf_to_gguf.py")
        for ftype_name in ("MXFP4_MOE", "Q4_K_M"):
            rows.append(second_step(label, LLAMA_OWN, llama_bf16, first, ftype_name, work))
        llama_bf16.unlink()
    for recipe in recipes:
        log(f"{label}: cascade-local --recipe {recipe}")
        out = work / f"ours-{recipe}.gguf"
        drop_page_cache(shards(src))
        wall, rss = timed([*cli, "-o", str(out), "--recipe", recipe], work / f"ours-{recipe}.log", f"recipe {recipe}")
        q = quality(out, work / "ref_logits.npy", work)
        rows.append(Row(f"cascade-local --recipe {recipe}", wall, rss, 0, q["tensor_bytes"], q["params"], q["kl"],
                        q["top1"], q["types"]))
        out.unlink()
    bf16.unlink()
    log(f"{label}: reference top-token probability averages {ref.get('top_p', 0):.2f}")
    return rows


def against_two_steps(rows: list[Row]) -> list[str]:
    """Each recipe's wall time over llama.cpp's two steps to MXFP4_MOE (the same types as q4-moe), both ways."""
    ours_first = next(r for r in rows if r.name == "llama.cpp two-step MXFP4_MOE")
    own = next((r for r in rows if r.name == f"{LLAMA_OWN} MXFP4_MOE"), None)
    lines = ["", "Wall time against llama.cpp's two steps to MXFP4_MOE:", "",
             "| recipe | wall s | vs our BF16 + quantize | vs convert_hf_to_gguf.py + quantize |", "|---|--:|--:|--:|"]
    for r in rows:
        if r.name.startswith("cascade-local --recipe"):
            vs_own = f"{r.wall / own.wall:.2f}" if own else "not run"
            lines.append(f"| {r.name} | {r.wall:.1f} | {r.wall / ours_first.wall:.2f} | {vs_own} |")
    return lines


def table(label: str, rows: list[Row]) -> list[str]:
    base = next(r for r in rows if r.name.endswith("Q4_K_M"))
    lines = [f"**{label}**", "",
             "| step | size MB | bits/weight | size vs Q4_K_M | mean KL | top-1 | wall s | wall vs Q4_K_M "
             "| peak RSS GB | RSS vs Q4_K_M | intermediate GB |",
             "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        kl = f"{r.kl:.2e}" if r.kl is not None else "-"
        top1 = f"{100 * r.top1:.1f}%" if r.top1 is not None else "-"
        lines.append(
            f"| {r.name} | {r.tensor_bytes / 1e6:.1f} | {8 * r.tensor_bytes / r.params:.2f} "
            f"| {r.tensor_bytes / base.tensor_bytes:.2f} | {kl} | {top1} | {r.wall:.1f} | {r.wall / base.wall:.2f} "
            f"| {r.rss / 1e9:.2f} | {r.rss / base.rss:.2f} | {r.intermediate / 1e9:.2f} |")
    classes = ["expert_up", "expert_down", "shared_up", "shared_down", "mamba_in", "mamba_out", "attn_qkv",
               "attn_out", "token_embd", "output"]
    lines += ["", "Types chosen per tensor class:", "", "| step | " + " | ".join(classes) + " |",
              "|---|" + "---|" * len(classes)]
    for r in rows:
        if r.types:
            lines.append(f"| {r.name} | " + " | ".join(r.types.get(c, "-") for c in classes) + " |")
    return lines + against_two_steps(rows)


def projected_full_model(recipes: list[str]) -> list[str]:
    """Each recipe's size on the real model, from the published config's per-class parameter counts."""
    cfg = NemotronHConfig.from_dict(real_config())
    h = cfg.hidden_size
    n_moe, n_mamba, n_attn = len(cfg.layers_of("E")), len(cfg.layers_of("M")), len(cfg.layers_of("*"))
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    params = {
        TensorClass.EXPERT_UP: n_moe * cfg.n_routed_experts * cfg.moe_intermediate_size * h,
        TensorClass.EXPERT_DOWN: n_moe * cfg.n_routed_experts * cfg.moe_intermediate_size * h,
        TensorClass.SHARED_UP: n_moe * cfg.moe_shared_expert_intermediate_size * h,
        TensorClass.SHARED_DOWN: n_moe * cfg.moe_shared_expert_intermediate_size * h,
        TensorClass.MAMBA_IN: n_mamba * cfg.mamba_in_proj_dim * h,
        TensorClass.MAMBA_OUT: n_mamba * cfg.mamba_d_inner * h,
        TensorClass.ATTN_QKV: n_attn * (q + 2 * kv) * h,
        TensorClass.ATTN_OUT: n_attn * q * h,
        TensorClass.TOKEN_EMBD: cfg.vocab_size * h,
        TensorClass.OUTPUT: cfg.vocab_size * h,
    }
    small = (n_mamba * (cfg.mamba_conv_dim * (cfg.conv_kernel + 1) + 3 * cfg.mamba_num_heads + cfg.mamba_d_inner)
             + n_moe * cfg.n_routed_experts * (h + 1) + (cfg.n_layers + 1) * h)
    total = sum(params.values()) + small

    def bits(qtype: gguf.GGMLQuantizationType) -> float:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        return 8 * size / block

    registry = load_registry()
    lines = [f"**Projected on the full model** ({total / 1e9:.2f} B parameters; llama.cpp's Q4_K_M file: 24.7 GB)", "",
             "| recipe | size GB | bits/weight | size vs 24.7 GB |", "|---|--:|--:|--:|"]
    for name in recipes:
        policy = registry.recipe(name).resolve(cfg)
        moe_layers = cfg.layers_of("E")
        total_bits = 32.0 * small
        for cls, count in params.items():
            if cls in (TensorClass.EXPERT_UP, TensorClass.EXPERT_DOWN):
                per_layer = count / len(moe_layers)
                total_bits += sum(per_layer * bits(policy.by_layer.get((cls, i), policy.by_class[cls]))
                                  for i in moe_layers)
            else:
                total_bits += count * bits(policy.by_class[cls])
        lines.append(f"| {name} | {total_bits / 8e9:.1f} | {total_bits / total:.2f} | {total_bits / 8e9 / 24.7:.2f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", nargs="+", default=["tiny", "slice"], choices=["tiny", "slice"])
    parser.add_argument("--recipes", nargs="+", default=["q4-moe", "q5-moe", "q8", "small"])
    parser.add_argument("--pattern", default="MEM*E", help="layer pattern of the slice")
    parser.add_argument("--slice-dir", type=Path, default=None,
                        help="an existing slice checkpoint to use (default: bench/out/slice-<pattern>)")
    args = parser.parse_args()
    header = (f"Quantization benchmark, {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC; {os.cpu_count()} CPUs "
              f"({cpu_model()}), {meminfo_kb('MemTotal') / 1e6:.1f} GB RAM; KL over {SEQUENCES * SEQ_LEN} positions")
    lines = [header, ""]
    for target in args.targets:
        if target == "tiny":
            src = ROOT / "tests" / "fixtures" / "tiny"
        else:
            src = args.slice_dir or OUT / slice_dir_name(args.pattern)
            ensure_slice(src, args.pattern, seed=0)
        rows = run_target(target, src, args.recipes, OUT / f"quant-{target}")
        lines += [*table(f"{target}: {src.name}", rows), ""]
    lines += projected_full_model(args.recipes)
    text = "\n".join(lines)
    print(text)
    (OUT / "quant_bench.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
