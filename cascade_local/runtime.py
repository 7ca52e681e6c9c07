"""From what the user typed to a ready engine: resolve the model, plan its placement, load, create the context."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

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


def parse_ctx(text: str | int | None, minimum: int = 256) -> int | None:
    """`--ctx`: 'auto' (None: sized to the prompt, see `open_engine`) or a number of tokens, at least `minimum`."""
    from cascade_local.errors import UsageError

    if text is None or str(text).strip().lower() == "auto":
        return None
    try:
        value = int(str(text).strip())
    except ValueError:
        raise UsageError(f"--ctx {text!r}: write auto or a number of tokens, such as 32768") from None
    if value < minimum:
        raise UsageError(f"--ctx must be at least {minimum} tokens, or auto (got {value})")
    return value


def offload_devices(placement: PlacementOptions) -> list[RpcDevice] | None:
    """The RPC servers' devices for `placement.rpc` (checked reachable first), or None: this machine's GPUs."""
    if not placement.rpc:
        return None
    from cascade_local.rpc import check_override_devices, connect, parse_endpoints

    check_override_devices(placement.override_tensor)
    return connect([e for text in placement.rpc for e in parse_endpoints(text)])


def plan_for(spec: str | None, *, ctx: int | None, parallel: int, placement: PlacementOptions,
             kv_type: str = "f16", need: int | None = None, devices: Sequence[RpcDevice] | None = None) -> Plan:
    """The plan, computed from the file's tensor table before anything is loaded (refuses what cannot fit).

    `ctx` None is `--ctx auto`: sized to `need` tokens (prompt and generation) when given, else with room to
    grow (chat, serve), within what fits and the model's trained length (`placement.plan_auto`).
    `devices`: the RPC devices to plan for (default: connect to `placement.rpc`, if any).
    """
    from cascade_local.devices import resolve_gpu_budget, system_memory
    from cascade_local.gguf_info import read_gguf
    from cascade_local.placement import CTX_PAD, parse_override, plan_auto, plan_placement
    from cascade_local.resolve import resolve_model

    overrides = [pair for text in placement.override_tensor for pair in parse_override(text)]
    if devices is None:
        devices = offload_devices(placement)
    budget = resolve_gpu_budget(placement.gpu_mem, rpc_devices=devices or ())
    path = resolve_model(spec)
    gguf = read_gguf(path)
    check_architecture(gguf.metadata, path)
    args: dict[str, Any] = dict(gpu_bytes=budget.nbytes, parallel=parallel, cpu_moe=placement.cpu_moe,
                                n_cpu_moe=placement.n_cpu_moe, overrides=overrides, ram_bytes=system_memory()[1],
                                gpu_available=budget.available, gpu_name=budget.name, kv_type=kv_type)
    if ctx is not None:
        return plan_placement(gguf, ctx=ctx, **args)
    return plan_auto(gguf, need=need or CTX_PAD, room=need is None, **args)


def open_engine(spec: str | None, *, ctx: int | None = 8192, parallel: int = 1, threads: int | None = None,
                placement: PlacementOptions | None = None, kv_type: str = "f16",
                prompt_tokens: Callable[[LoadedModel], int] | None = None, max_tokens: int = 0,
                ) -> tuple[Engine, Plan]:
    """Plan, then load the model with the plan's tensor overrides and create a context for `parallel` sequences.

    `ctx` None is `--ctx auto`. With `prompt_tokens` (a function of the loaded model, which can tokenize) the
    context is the prompt plus `max_tokens`, capped at the trained length; without, room to grow. The weights
    are loaded with the plan for the smallest context, and again only if the sized plan places them otherwise.
    The engine owns the model: closing it (or leaving `with engine:`) frees the context, then the model.
    """
    from pathlib import Path

    from cascade_local.devices import plan_overrides, resolve_gpu_budget
    from cascade_local.placement import CTX_PAD, PlanError, trained_context

    placement = placement or PlacementOptions()
    devices = offload_devices(placement)
    handles = [d.handle for d in devices] if devices is not None else None
    # Each RPC device's share of the offloaded layers: its budget (per-server --gpu-mem) or its free memory.
    split = resolve_gpu_budget(placement.gpu_mem, rpc_devices=devices).shares if devices else None
    sized = ctx is not None or prompt_tokens is None
    plan = plan_for(spec, ctx=ctx if sized else CTX_PAD, parallel=parallel, placement=placement, kv_type=kv_type,
                    devices=devices)
    model = LoadedModel(Path(plan.path), overrides=plan_overrides(plan, handles, split))
    try:
        if not sized:
            assert prompt_tokens is not None
            from cascade_local.gguf_info import read_gguf

            prompt = prompt_tokens(model)
            trained = trained_context(read_gguf(Path(plan.path))) or prompt + max_tokens + 1
            if prompt + 1 > trained:
                raise PlanError(f"the prompt is {prompt} tokens, more than the model's trained context of "
                                f"{trained}: shorten the input")
            need = min(prompt + max_tokens + 1, trained)
            loaded = (plan.overrides, plan.n_gpu_layers)
            plan = plan_for(str(plan.path), ctx=None, parallel=parallel, placement=placement, kv_type=kv_type,
                            need=need, devices=devices)
            if (plan.overrides, plan.n_gpu_layers) != loaded:  # a larger context moved weights off the GPU
                model.close()
                model = LoadedModel(Path(plan.path), overrides=plan_overrides(plan, handles, split))
        engine = Engine(model, n_ctx=plan.memory.n_ctx, n_seq_max=parallel, threads=threads, owns_model=True,
                        kv_type=kv_type)
    except BaseException:  # no context (or Ctrl-C while creating it): the model is ours to free
        model.close()
        raise
    return engine, plan
