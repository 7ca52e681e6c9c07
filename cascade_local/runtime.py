"""From what the user typed to a ready engine: resolve the model, plan its placement, load, create the context."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cascade_local.engine import Engine
from cascade_local.llama_model import LoadedModel, check_architecture
from cascade_local.placement import Plan

if TYPE_CHECKING:
    from cascade_local.rpc import RpcDevice


@dataclass(frozen=True)
class PlacementOptions:
    """How to split the model between GPU and RAM; the llama.cpp spellings users know."""

    gpu_mem: str = "auto"  # auto | SIZE | 0
    cpu_moe: bool = False
    n_cpu_moe: int | None = None
    override_tensor: Sequence[str] = ()  # REGEX=DEVICE, as llama.cpp's -ot
    rpc: Sequence[str] = ()  # HOST:PORT of llama.cpp RPC servers, whose devices replace this machine's GPUs


def offload_devices(placement: PlacementOptions) -> list[RpcDevice] | None:
    """The RPC servers' devices for `placement.rpc` (checked reachable first), or None: this machine's GPUs."""
    if not placement.rpc:
        return None
    from cascade_local.rpc import check_override_devices, connect, parse_endpoints

    check_override_devices(placement.override_tensor)
    return connect([e for text in placement.rpc for e in parse_endpoints(text)])


def plan_for(spec: str | None, *, ctx: int, parallel: int, placement: PlacementOptions,
             devices: Sequence[RpcDevice] | None = None) -> Plan:
    """The plan, computed from the file's tensor table before anything is loaded (refuses what cannot fit).

    `devices`: the RPC devices to plan for (default: connect to `placement.rpc`, if any).
    """
    from cascade_local.devices import resolve_gpu_budget, system_memory
    from cascade_local.gguf_info import read_gguf
    from cascade_local.placement import parse_override, plan_placement
    from cascade_local.resolve import resolve_model

    overrides = [pair for text in placement.override_tensor for pair in parse_override(text)]
    if devices is None:
        devices = offload_devices(placement)
    budget = resolve_gpu_budget(placement.gpu_mem, rpc_devices=devices or ())
    path = resolve_model(spec)
    gguf = read_gguf(path)
    check_architecture(gguf.metadata, path)
    return plan_placement(gguf, gpu_bytes=budget.nbytes, ctx=ctx, parallel=parallel,
                          cpu_moe=placement.cpu_moe, n_cpu_moe=placement.n_cpu_moe, overrides=overrides,
                          ram_bytes=system_memory()[1], gpu_available=budget.available, gpu_name=budget.name)


def open_engine(spec: str | None, *, ctx: int = 8192, parallel: int = 1, threads: int | None = None,
                placement: PlacementOptions | None = None) -> tuple[Engine, Plan]:
    """Plan, then load the model with the plan's tensor overrides and create a context for `parallel` sequences.

    The engine owns the model: closing it (or leaving `with engine:`) frees the context, then the model.
    """
    from pathlib import Path

    from cascade_local.devices import plan_overrides, resolve_gpu_budget

    placement = placement or PlacementOptions()
    devices = offload_devices(placement)
    plan = plan_for(spec, ctx=ctx, parallel=parallel, placement=placement, devices=devices)
    handles = [d.handle for d in devices] if devices is not None else None
    # Each RPC device's share of the offloaded layers: its budget (per-server --gpu-mem) or its free memory.
    split = resolve_gpu_budget(placement.gpu_mem, rpc_devices=devices).shares if devices else None
    model = LoadedModel(Path(plan.path), overrides=plan_overrides(plan, handles, split))
    try:
        engine = Engine(model, n_ctx=plan.memory.n_ctx, n_seq_max=parallel, threads=threads, owns_model=True)
    except BaseException:  # no context (or Ctrl-C while creating it): the model is ours to free
        model.close()
        raise
    return engine, plan
