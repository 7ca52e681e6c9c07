"""`cascade-local plan`: where each tensor would go and what memory each device needs, before loading anything."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any

import typer

from cascade_local.cli import options
from cascade_local.cli.console import out_console

if TYPE_CHECKING:
    from rich.table import Table

    from cascade_local.placement import Plan



def plan(
    model: str = typer.Argument(..., help="A .gguf file, or a model name from the registry."),
    gpu_mem: str = typer.Option("auto", "--gpu-mem", help="GPU memory to plan for: auto (what the GPU reports "
                                "free), a size such as 8GiB, 8GB or 8000MiB, or 0 for the CPU only; with "
                                "several --rpc servers, one size each is allowed (4GiB,2GiB)."),
    ctx: str = typer.Option("auto", "--ctx", metavar="auto|N", help="Context length of each sequence, in tokens; "
                            "auto: as chat and serve size it (room to grow, within what fits)."),
    prompt_tokens: int | None = typer.Option(None, "--prompt-tokens", min=1, help="With --ctx auto: size the "
                                             "context as run does, for a prompt of N tokens plus --max-tokens."),
    max_tokens: int = typer.Option(4096, "--max-tokens", min=1, help="Generation room, with --prompt-tokens."),
    kv_type: str = typer.Option("f16", "--kv-type", metavar="f16|q8_0|q4_0", help="KV cache type to plan for."),
    parallel: int = typer.Option(1, "--parallel", help="Sequences decoded together, each with --ctx tokens."),
    cpu_moe: bool = typer.Option(False, "--cpu-moe", help="Keep all expert weights on the CPU (llama.cpp's "
                                 "--cpu-moe)."),
    n_cpu_moe: int | None = typer.Option(None, "--n-cpu-moe", help="Keep the expert weights of the first N layers "
                                         "on the CPU (llama.cpp's --n-cpu-moe)."),
    override_tensor: list[str] = typer.Option([], "--override-tensor", "-ot", help="REGEX=DEVICE, as llama.cpp's -ot: "
                                              "tensors matching REGEX go to CPU or the GPU (CUDA0...). These win "
                                              "over everything else. Repeatable."),
    rpc: str | None = options.RPC,
    json_: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
    assume_gpu: str | None = typer.Option(None, "--assume-gpu", hidden=True, help="Planning aid: plan as if a GPU "
                                          "with this much free memory existed. Nothing is loaded."),
) -> None:
    """Plan where each tensor goes (GPU or RAM) and the memory each needs, from the GGUF's tensor table alone.

    Dense tensors go to the GPU first, then the experts of whole layers while they fit; the rest stay in RAM.
    The plan counts the KV cache (attention layers only), the Mamba state of each sequence, the compute
    buffers and headroom, and prints the tensor overrides llama.cpp will receive. A budget too small for
    the dense part, or a context that does not fit, is refused with exit code 2 and what would fit.

    Example: cascade-local plan model.gguf --gpu-mem 8GiB --ctx 32768 --parallel 4
    """
    from cascade_local.devices import resolve_gpu_budget, system_memory
    from cascade_local.gguf_info import read_gguf
    from cascade_local.placement import (
        CTX_PAD,
        GPU,
        ModelShape,
        _ranges,
        context_room,
        fmt_bytes,
        parse_override,
        plan_auto,
        plan_placement,
        split_by_device,
        trained_context,
    )
    from cascade_local.resolve import resolve_model
    from cascade_local.runtime import parse_ctx

    fixed = parse_ctx(ctx)  # at least 256 tokens, as run, chat, batch and serve require; checked before any file
    overrides = [pair for text in override_tensor for pair in parse_override(text)]
    from cascade_local.runtime import PlacementOptions, offload_devices

    rpc_devices = offload_devices(PlacementOptions(override_tensor=override_tensor, rpc=(rpc,) if rpc else ())) or []
    budget = resolve_gpu_budget(gpu_mem, assume_gpu, rpc_devices)
    gguf = read_gguf(resolve_model(model))
    args: dict[str, Any] = dict(gpu_bytes=budget.nbytes, parallel=parallel, cpu_moe=cpu_moe, n_cpu_moe=n_cpu_moe,
                                overrides=overrides, ram_bytes=system_memory()[1], gpu_available=budget.available,
                                gpu_name=budget.name, kv_type=kv_type)
    if fixed is not None:
        result = plan_placement(gguf, ctx=fixed, **args)
    elif prompt_tokens is not None:
        need = min(prompt_tokens + max_tokens + 1, max(trained_context(gguf), prompt_tokens + 1))
        result = plan_auto(gguf, need=need, **args)
    else:
        result = plan_auto(gguf, need=CTX_PAD, room=True, **args)
    room = {**context_room(gguf, **args), "auto": fixed is None}
    shares = split_by_device(result, ModelShape.from_gguf(gguf), budget.shares) \
        if rpc_devices and result.mode == GPU else []
    if json_:
        payload = {**result.to_dict(), "gpu_source": budget.source, "context": room,
                   "rpc": [{"endpoint": d.endpoint, "device": d.name, "free": d.free, "total": d.total}
                           for d in rpc_devices],
                   "devices": [{"device": rpc_devices[s.index].name, "endpoint": rpc_devices[s.index].endpoint,
                                "layers": list(s.layers), "weights": s.weights, "kv_cache": s.kv,
                                "mamba_state": s.state} for s in shares]}
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
        return
    out_console.print(_table(result, "+".join(d.name for d in rpc_devices) or "GPU"))
    grid = _settings(result, budget.source, room, rpc_devices[0].name if rpc_devices else "CUDA0")
    for s in shares:  # the pool, divided as llama.cpp divides the offloaded layers
        d = rpc_devices[s.index]
        grid.add_row(d.name, f"{d.endpoint}: layers {_ranges(list(s.layers)) or 'none'}, weights "
                     f"{fmt_bytes(s.weights)}, KV {fmt_bytes(s.kv)}, Mamba state {fmt_bytes(s.state)}")
    out_console.print(grid)


def _cell(n: int) -> str:
    from cascade_local.placement import fmt_bytes

    return fmt_bytes(n) if n else "—"


def _table(plan: Plan, device: str = "GPU") -> Table:
    from rich import box
    from rich.table import Table

    from cascade_local.placement import CPU, GPU

    m = plan.memory
    table = Table(title=f"{plan.parallel} sequence{'s' * (plan.parallel > 1)} × ctx {plan.ctx}", box=box.SIMPLE,
                  title_justify="left", show_footer=True)
    table.add_column("class", footer="total")
    table.add_column("tensors", justify="right")
    table.add_column(device, justify="right", footer=_cell(plan.need(GPU) + plan.headroom_gpu))
    table.add_column("RAM", justify="right", footer=_cell(plan.need(CPU) + plan.headroom_cpu))
    for c in plan.class_totals():
        table.add_row(c.cls, str(c.tensors), _cell(c.gpu), _cell(c.cpu))
    table.add_section()
    kv_gpu = plan.kv_device == GPU
    rows = [
        (f"KV cache ({m.n_ctx} cells, {m.kv_type})", m.kv if kv_gpu else 0, 0 if kv_gpu else m.kv),
        (f"Mamba state ({m.n_seq_max} sequence{'s' * (m.n_seq_max > 1)}, f32)", m.state if kv_gpu else 0,
         0 if kv_gpu else m.state),
        (f"compute buffers (n_ubatch {m.n_ubatch})", plan.compute_gpu, plan.compute_cpu),
        ("expert weight copy (GPU batches ≥ 32)", plan.expert_copy, 0),
        ("output buffer (logits)", 0, m.output),
        ("headroom", plan.headroom_gpu, plan.headroom_cpu),
    ]
    for name, gpu, cpu in rows:
        if gpu or cpu:
            table.add_row(name, "", _cell(gpu), _cell(cpu))
    return table


def _settings(plan: Plan, source: str, room: dict, gpu_device: str = "CUDA0") -> Table:
    from rich.table import Table
    from rich.text import Text

    from cascade_local.placement import GPU, fmt_bytes

    m = plan.memory
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    ram = fmt_bytes(plan.ram_available) + " available" if plan.ram_available is not None else "unknown"
    gpu = f"{fmt_bytes(plan.gpu_budget)} of {plan.gpu_name} ({source})" if plan.mode == GPU else plan.why_cpu
    grid.add_row("GPU", gpu or source)
    grid.add_row("RAM", ram)
    grid.add_row("llama.cpp", f"n_gpu_layers={plan.n_gpu_layers} n_ctx={m.n_ctx} n_seq_max={m.n_seq_max} "
                              f"n_ubatch={m.n_ubatch} kv_unified=false")
    grid.add_row("context", f"{plan.ctx} tokens per sequence ({'--ctx auto' if room['auto'] else '--ctx'}); "
                            f"trained length {room['trained']}; KV cache {room['kv_bytes_per_token']} B per token "
                            f"({plan.memory.kv_type}); largest that fits {room['largest']}, with --kv-type q8_0 "
                            f"{room['largest_q8_0']}")
    grid.add_row("overrides", Text("\n".join(plan.override_args(gpu_device)) or "none"))
    for note in plan.notes:
        grid.add_row("note", note)
    grid.add_row("verdict", plan.verdict)
    return grid
