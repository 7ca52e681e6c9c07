"""Sensitivity sweep: which tensors deserve more bits, measured as KL divergence against the BF16 conversion.

Starting from a base recipe (the default, `q4-moe`), each variant moves one tensor class one step up the type
ladder (and, for the 8-bit dense classes, one step down), and the routed experts of the first and last MoE layers
are moved apart from the rest. Each variant is converted, evaluated with `cascade-local eval`'s machinery on the
same text against the BF16 reference (whose log-probabilities are computed once), and deleted. The table is
sorted by KL removed per GB added (for steps down: KL added per GB saved). The recipe the table suggests for a
size budget is then converted and measured too, not assumed from the sum of its parts.

    .venv/bin/python bench/sensitivity.py CHECKPOINT [--budget-gb 2.3] [--ctx 512] [--tokens 2048]

On the project's slice (`bench/out/slice-v2-MEM_x_E`, made by bench/convert_bench.py) it takes about 15 minutes on
2 cores and 2-3 GB of free disk beyond the checkpoint. On the real checkpoint (63 GB BF16) it needs the BF16
reference (63 GB) plus one variant (about 18 GB) at a time, and roughly 30 conversions-and-evaluations: plan on
a day on a desktop CPU, less with a GPU build.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert_bench import cpu_model  # noqa: E402

# Steps up (more bits) and down (fewer), among the 32-block types the model's rows allow.
UP = {"mxfp4": "q5_0", "q4_0": "q5_0", "iq4_nl": "q5_0", "q4_1": "q5_0", "q5_0": "q8_0", "q5_1": "q8_0",
      "q8_0": "bf16"}
DOWN = {"q8_0": "q5_1", "q5_1": "q4_1", "q5_0": "q4_0"}
EXPERTS = ("expert_up", "expert_down")


@dataclass
class Variant:
    name: str
    change: str
    raw: dict  # the recipe table, as models.toml would hold it
    size: int = 0
    kl: float = 0.0
    kl_p99: float = 0.0
    top1: float = 0.0
    seconds: float = 0.0


def base_table(recipe_name: str) -> dict:
    from cascade_local.registry import load_registry

    recipe = load_registry().recipe(recipe_name)
    table = {cls.value: _type_name(qtype) for cls, qtype in recipe.types.items()}
    if recipe.overrides:
        raise SystemExit(f"recipe {recipe_name} has layer overrides; start the sweep from a plain recipe")
    return table


def _type_name(qtype) -> str:
    from cascade_local.convert.recipes import TYPE_NAMES

    return next(name for name, t in TYPE_NAMES.items() if t == qtype)


def variants(base: dict) -> list[Variant]:
    out = []
    for cls, type_name in base.items():
        if type_name in UP:
            out.append(Variant(f"{cls} up", f"{cls}: {type_name} -> {UP[type_name]}", {**base, cls: UP[type_name]}))
        if type_name in DOWN and cls not in EXPERTS:
            out.append(Variant(f"{cls} down", f"{cls}: {type_name} -> {DOWN[type_name]}",
                               {**base, cls: DOWN[type_name]}))
    for position in ("first_moe", "last_moe"):
        ups = {cls: UP[base[cls]] for cls in EXPERTS if base[cls] in UP}
        if ups:
            raw = {**base, "override": [{"layers": [position], **ups}]}
            change = ", ".join(f"{cls}: {base[cls]} -> {t}" for cls, t in ups.items())
            out.append(Variant(f"experts {position} up", f"{change} ({position} only)", raw))
    return out


def measure(variant: Variant, checkpoint: Path, work: Path, reference, threads: int) -> None:
    from cascade_local.convert import convert, parse_recipe

    from cascade_local.quality import compare

    out = work / f"{variant.name.replace(' ', '-')}.gguf"
    started = time.perf_counter()
    out.unlink(missing_ok=True)
    convert(checkpoint, out, parse_recipe(variant.name, variant.raw), threads=threads)
    try:
        result = compare(out, reference, threads=threads)
    finally:
        variant.size = out.stat().st_size
        out.unlink(missing_ok=True)
    variant.kl, variant.kl_p99, variant.top1 = result.kl_mean, result.kl_p99, result.top1
    variant.seconds = time.perf_counter() - started
    print(f"[sensitivity] {variant.name}: {variant.size / 1e6:.0f} MB, KL {variant.kl:.4f} "
          f"({variant.seconds:.0f} s)", file=sys.stderr, flush=True)


def suggest(base: Variant, measured: list[Variant], budget: int) -> dict:
    """Greedy: take steps up by KL removed per GB added; when one does not fit the budget, pay for it with the
    cheapest steps down (KL added per GB saved), but only when the step up removes more KL than those steps add.
    Estimates assume the steps add up; the bench then measures the suggested recipe itself."""
    table = dict(base.raw)
    size = base.size
    overrides: list[dict] = []
    downs = sorted((v for v in measured if v.name.endswith(" down") and v.size < base.size),
                   key=lambda v: (v.kl - base.kl) / (base.size - v.size))
    ups = sorted((v for v in measured if v.name.endswith(" up") and v.size > base.size and v.kl < base.kl),
                 key=lambda v: (base.kl - v.kl) / (v.size - base.size), reverse=True)
    for up in ups:
        funding: list[Variant] = []
        short = size + (up.size - base.size) - budget
        for down in downs:
            if short <= 0:
                break
            funding.append(down)
            short -= base.size - down.size
        if short > 0 or base.kl - up.kl <= sum(d.kl - base.kl for d in funding):
            continue
        for step in [up, *funding]:
            downs = [d for d in downs if d is not step]
            if step.name.startswith("experts "):
                overrides.extend(step.raw["override"])
            else:
                cls = step.name.rsplit(" ", 1)[0]
                table[cls] = step.raw[cls]
            size += step.size - base.size
    if overrides:
        table["override"] = overrides
    return table


def toml_of(table: dict) -> str:
    lines = [f'{k} = "{v}"' for k, v in table.items() if k != "override"]
    for entry in table.get("override", []):
        lines.append("[[recipes.suggested.override]]")
        lines += [f"layers = {entry['layers']!r}".replace("'", '"')]
        lines += [f'{k} = "{v}"' for k, v in entry.items() if k != "layers"]
    return "\n".join(["[recipes.suggested]", *lines])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--recipe", default="q4-moe", help="the base recipe (default: q4-moe)")
    parser.add_argument("--budget-gb", type=float, help="size budget for the suggested recipe (default: the base "
                        "recipe's size, i.e. better at no extra size)")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "sensitivity")
    args = parser.parse_args()

    from cascade_local.convert import convert, uniform_recipe

    from cascade_local.quality import ReferenceLogits, default_text, reference_logits

    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    ref_path = args.work / f"reference-{args.checkpoint.name}-ctx{args.ctx}-{args.tokens}.npz"
    if ref_path.exists():
        reference = ReferenceLogits.load(ref_path)
    else:
        bf16 = args.work / "reference-bf16.gguf"
        if not bf16.exists():
            convert(args.checkpoint, bf16, uniform_recipe("bf16"), threads=args.threads)
        reference = reference_logits(bf16, default_text(), n_ctx=args.ctx, max_tokens=args.tokens,
                                     threads=args.threads)
        reference.save(ref_path)
        bf16.unlink()

    table = base_table(args.recipe)
    base = Variant(f"{args.recipe} (base)", "-", table)
    measure(base, args.checkpoint, args.work, reference, args.threads)
    measured = variants(table)
    for v in measured:
        measure(v, args.checkpoint, args.work, reference, args.threads)
    budget = int(args.budget_gb * 1e9) if args.budget_gb else base.size
    suggested = Variant("suggested", "see the recipe below", suggest(base, measured, budget))
    measure(suggested, args.checkpoint, args.work, reference, args.threads)

    def rate(v: Variant) -> float:
        delta = v.size - base.size
        return (base.kl - v.kl) / (delta / 1e9) if delta else 0.0

    rows = sorted(measured, key=lambda v: (v.name.endswith(" down"), -rate(v) if v.size > base.size else rate(v)))
    lines = [
        f"Sensitivity sweep, {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC; {len(os.sched_getaffinity(0))} CPUs "
        f"({cpu_model()}); checkpoint {args.checkpoint.name}; base recipe {args.recipe}; KL against BF16 on "
        f"{len(reference.logprobs)} scored tokens (ctx {args.ctx}); {time.perf_counter() - started:.0f} s in all",
        "",
        "| variant | change | size MB | Δ size MB | KL | Δ KL | KL removed per GB added | p99 KL | top-1 |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|",
        f"| {base.name} | - | {base.size / 1e6:.0f} | 0 | {base.kl:.4f} | 0 | - | {base.kl_p99:.3f} "
        f"| {100 * base.top1:.1f}% |",
    ]
    for v in [*rows, suggested]:
        per_gb = f"{rate(v):.3f}" if v is not suggested else "-"
        lines.append(f"| {v.name} | {v.change} | {v.size / 1e6:.0f} | {(v.size - base.size) / 1e6:+.0f} "
                     f"| {v.kl:.4f} | {v.kl - base.kl:+.4f} | {per_gb} | {v.kl_p99:.3f} | {100 * v.top1:.1f}% |")
    lines += ["", f"Suggested for a budget of {budget / 1e6:.0f} MB (measured above as `suggested`):", "",
              "```toml", toml_of(suggested.raw), "```"]
    text = "\n".join(lines)
    print(text)
    (args.work / "sensitivity.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
