"""What this machine offers llama.cpp: GPUs and their free memory, system RAM, and buffer types for tensor overrides.

The planner's only contact with llama.cpp (`cascade_local.placement` stays pure arithmetic). ggml's device API is
reached through the library llama-cpp-python already loaded (`llama_cpp.llama_cpp._lib`): opening libggml a second
time by path would map another copy, whose CPU buffer type would not compare equal to the one llama.cpp checks.
Signatures are declared on private function objects (`_lib[name]`, not `_lib.name`), so nobody else's change.
"""

from __future__ import annotations

import ctypes
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

from cascade_local.errors import ModelLoadError, UsageError
from cascade_local.placement import CPU, Plan, parse_size

# enum ggml_backend_dev_type (ggml-backend.h)
DEVICE_TYPES = {0: "CPU", 1: "GPU", 2: "IGPU", 3: "ACCEL", 4: "META"}
GPU_TYPES = (1, 2)  # the devices llama.cpp offloads layers to


def native(name: str, restype: Any, *argtypes: Any) -> Any:
    """A function of the llama.cpp/ggml libraries llama-cpp-python loaded, with the signature given here."""
    import llama_cpp.llama_cpp as lib

    f = lib._lib[name]  # a fresh function object: its signature is ours alone
    f.restype, f.argtypes = restype, list(argtypes)
    return f


@cache
def _ggml() -> dict[str, Any]:
    fn = native
    p, size = ctypes.c_void_p, ctypes.c_size_t
    return {
        "dev_count": fn("ggml_backend_dev_count", size),
        "dev_get": fn("ggml_backend_dev_get", p, size),
        "dev_type": fn("ggml_backend_dev_type", ctypes.c_int, p),
        "dev_name": fn("ggml_backend_dev_name", ctypes.c_char_p, p),
        "dev_description": fn("ggml_backend_dev_description", ctypes.c_char_p, p),
        "dev_memory": fn("ggml_backend_dev_memory", None, p, ctypes.POINTER(size), ctypes.POINTER(size)),
        "dev_buffer_type": fn("ggml_backend_dev_buffer_type", p, p),
        "cpu_buffer_type": fn("ggml_backend_cpu_buffer_type", p),
        "buft_name": fn("ggml_backend_buft_name", ctypes.c_char_p, p),
        "dev_by_type": fn("ggml_backend_dev_by_type", p, ctypes.c_int),
        "dev_backend_reg": fn("ggml_backend_dev_backend_reg", p, p),
        "reg_get_proc_address": fn("ggml_backend_reg_get_proc_address", p, p, ctypes.c_char_p),
    }


def gpu_offload_supported() -> bool:
    """Whether this llama-cpp-python build has a GPU backend (CUDA, Metal, Vulkan...)."""
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


@dataclass(frozen=True)
class GpuDevice:
    index: int  # in ggml's device list
    name: str  # CUDA0, Vulkan0...: the name llama.cpp's --override-tensor uses
    description: str
    free: int
    total: int
    handle: int  # ggml_backend_dev_t


def gpu_devices() -> list[GpuDevice]:
    """The GPUs ggml sees, with free and total memory as their backend reports it; [] on a CPU-only build."""
    if not gpu_offload_supported():
        return []
    g = _ggml()
    out = []
    for i in range(g["dev_count"]()):
        dev = g["dev_get"](i)
        if not dev or g["dev_type"](dev) not in GPU_TYPES:
            continue
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        g["dev_memory"](dev, ctypes.byref(free), ctypes.byref(total))
        out.append(GpuDevice(i, (g["dev_name"](dev) or b"?").decode(), (g["dev_description"](dev) or b"").decode(),
                             free.value, total.value, dev))
    return out


def system_memory() -> tuple[int | None, int | None]:
    """(total, available) RAM in bytes: /proc/meminfo's MemTotal and MemAvailable, else sysconf (total only)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in fh if line.split()[1:2]}
        return info.get("MemTotal"), info.get("MemAvailable", info.get("MemFree"))
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), None
    except (ValueError, OSError, AttributeError):
        return None, None


@dataclass(frozen=True)
class GpuBudget:
    """What the planner may put on a GPU: `available` false means no GPU (CPU-only build, or none found)."""

    available: bool
    nbytes: int
    name: str | None
    source: str  # how the budget was set, for the plan's notes
    shares: tuple[int, ...] = ()  # with several RPC devices: each one's part of nbytes (llama.cpp's layer split)


def resolve_gpu_budget(gpu_mem: str = "auto", assume_gpu: str | None = None,
                       rpc_devices: Sequence[Any] = ()) -> GpuBudget:
    """`--gpu-mem auto|SIZE` (and the planning aid `--assume-gpu SIZE`) -> the GPU budget to plan with.

    auto: the free memory of the first GPU as ggml reports it. SIZE: that much (0: CPU only). `assume_gpu`
    pretends a GPU with that much free memory exists, for planning on a machine without one; nothing is loaded.
    `rpc_devices` (rpc.RpcDevice, from `--rpc`) replace this machine's GPUs: their reported free memory (the
    server host's RAM), summed over the servers, counts like a GPU's.
    """
    if rpc_devices:
        return _rpc_budget(gpu_mem, rpc_devices)
    wanted = None if gpu_mem.strip().lower() == "auto" else parse_size(gpu_mem)
    if assume_gpu is not None:
        free = parse_size(assume_gpu)
        return GpuBudget(True, free if wanted is None else wanted, "an assumed GPU",
                         "--assume-gpu, a planning aid: no GPU was asked")
    if not gpu_offload_supported():
        return GpuBudget(False, 0, None, "CPU-only build")
    gpus = gpu_devices()
    if not gpus:
        return GpuBudget(False, 0, None, "no GPU found")
    first = gpus[0]
    label = f"{first.name} ({first.description})" if first.description else first.name
    if wanted is None:
        return GpuBudget(True, first.free, label, "free memory reported by the GPU")
    return GpuBudget(True, wanted, label, "--gpu-mem")


def _rpc_budget(gpu_mem: str, rpc_devices: Sequence[Any]) -> GpuBudget:
    """The pool of RPC devices: `--gpu-mem` is auto, one SIZE for the pool, or SIZE,SIZE... one per server."""
    label = ", ".join(f"{d.name} ({d.endpoint})" for d in rpc_devices)
    free = tuple(int(d.free) for d in rpc_devices)
    if gpu_mem.strip().lower() == "auto":
        # ggml's CPU device reports all of RAM as free
        source = "the RPC servers' total RAM, which a CPU backend reports as free: cap it with --gpu-mem" \
            if all(d.free == d.total for d in rpc_devices) else "free memory reported by the RPC servers"
        return GpuBudget(True, sum(free), label, source, free)
    sizes = tuple(parse_size(part) for part in gpu_mem.split(","))
    if len(sizes) == 1:  # one budget for the pool, divided as llama.cpp divides layers: by free memory
        return GpuBudget(True, sizes[0], label, "--gpu-mem", free)
    if len(sizes) != len(rpc_devices):
        raise UsageError(f"--gpu-mem {gpu_mem} gives {len(sizes)} budgets for {len(rpc_devices)} RPC devices: give "
                         "one for all, or one per server in --rpc order")
    if 0 in sizes:
        raise UsageError(f"--gpu-mem {gpu_mem}: a server with a budget of 0 has nothing to do; leave it out of --rpc")
    return GpuBudget(True, sum(sizes), label, "--gpu-mem, per server", sizes)


# -- tensor_buft_overrides for llama_model_params --------------------------------------------------------------------


class TensorBuftOverride(ctypes.Structure):
    """struct llama_model_tensor_buft_override { const char * pattern; ggml_backend_buffer_type_t buft; }.

    llama-cpp-python 0.3.36 declares the field in llama_model_params as a void pointer and ships no
    structure for it, so it is declared here.
    """

    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


@dataclass
class BuftOverrides:
    """A NULL-terminated override array and everything it points to; keep this object alive while loading.

    `devices` (ggml_backend_dev_t handles) become llama_model_params.devices, the devices llama.cpp offloads to,
    in place of every GPU ggml registered; an RPC device (`cascade_local.rpc`) is used only when listed here.
    """

    array: ctypes.Array[TensorBuftOverride]  # the last one {NULL, NULL}
    patterns: list[bytes]
    n_gpu_layers: int
    devices: tuple[int, ...] | None = None  # None: llama.cpp's default, every GPU ggml registered
    split: tuple[int, ...] | None = None  # llama_model_params.tensor_split, one share per device; None: free memory
    _device_array: ctypes.Array[ctypes.c_void_p] | None = None  # the NULL-terminated copy llama.cpp reads
    _split_array: ctypes.Array[ctypes.c_float] | None = None

    @property
    def pointer(self) -> ctypes.c_void_p:
        return ctypes.cast(self.array, ctypes.c_void_p)

    def apply(self, params: Any) -> None:
        """Set `tensor_buft_overrides`, `n_gpu_layers` and `devices` on a `llama_model_params`.

        Refuses (ModelLoadError) an override whose buffer belongs to a device llama.cpp will not use: llama.cpp
        would abort the process when creating the context ("pre-allocated tensor in a buffer that cannot run").
        """
        self.check_targets()
        params.tensor_buft_overrides = self.pointer
        params.n_gpu_layers = self.n_gpu_layers
        if self.devices is not None:
            self._device_array = (ctypes.c_void_p * (len(self.devices) + 1))(*self.devices, None)
            params.devices = ctypes.cast(self._device_array, ctypes.c_void_p)
        if self.split:
            import llama_cpp

            # llama.cpp reads llama_max_devices() floats; the shares are proportions, bytes are as good as any.
            size = max(int(llama_cpp.llama_max_devices()), len(self.split))
            self._split_array = (ctypes.c_float * size)(*(float(s) for s in self.split))
            params.tensor_split = self._split_array

    def check_targets(self) -> None:
        g = _ggml()
        offload = self.devices if self.devices is not None else tuple(d.handle for d in gpu_devices())
        allowed = {cpu_buffer_type(), *(buft for _, buft in extra_buffer_types())}
        allowed |= {g["dev_buffer_type"](dev) for dev in offload}
        for pattern, buft in _entries(self):
            if buft not in allowed:
                raise ModelLoadError(f"the tensor override {pattern.decode()} names the buffer "
                                     f"{buffer_type_name(buft)}, whose device is not among the devices this model "
                                     "is loaded on")


def cpu_buffer_type() -> int:
    return _buffer_type(_ggml()["cpu_buffer_type"](), "CPU")


def gpu_buffer_type() -> int:
    """The buffer type of the first GPU (what CUDA0 means to llama.cpp's --override-tensor)."""
    gpus = gpu_devices()
    if not gpus:
        raise ModelLoadError("a tensor override names a GPU, but this llama-cpp-python build has no GPU device "
                             "(`cascade-local doctor` shows the build and the command to rebuild it for a GPU)")
    return _buffer_type(_ggml()["dev_buffer_type"](gpus[0].handle), gpus[0].name)


def _buffer_type(pointer: int | None, device: str) -> int:
    """A c_void_p result: an int, or None for NULL, which would silently mean "no override" to llama.cpp."""
    if not pointer:
        raise ModelLoadError(f"llama.cpp has no buffer type for {device}")
    return pointer


def buffer_type_name(buft: int) -> str:
    return (_ggml()["buft_name"](buft) or b"?").decode()


def extra_buffer_types() -> list[tuple[str, int]]:
    """The CPU device's extra buffer types, in llama.cpp's order of preference: [(name, buft)].

    These are what `use_extra_bufts` lets llama.cpp put weights in: AMX (Intel, when the build has it) and
    CPU_REPACK (weights re-laid for the SIMD kernels). They come from the CPU backend's own registry entry.
    """
    g = _ggml()
    cpu = g["dev_by_type"](0)
    if not cpu:
        return []
    address = g["reg_get_proc_address"](g["dev_backend_reg"](cpu), b"ggml_backend_dev_get_extra_bufts")
    if not address:
        return []
    get_extra = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)(address)
    array = ctypes.cast(get_extra(cpu), ctypes.POINTER(ctypes.c_void_p))
    out: list[tuple[str, int]] = []
    while array and array[len(out)]:
        buft = array[len(out)]
        out.append((buffer_type_name(buft), buft))
    return out


def tensor_buft_overrides(overrides: Sequence[tuple[str, str]], n_gpu_layers: int = 0,
                          devices: Sequence[int] | None = None, split: Sequence[int] | None = None) -> BuftOverrides:
    """[(regex, 'CPU' or 'GPU')] -> the NULL-terminated array llama_model_params.tensor_buft_overrides takes.

    `devices`: the devices to offload to (llama_model_params.devices), e.g. an RPC server's; 'GPU' then means
    the first of them. None: every GPU ggml registered, and 'GPU' is the first GPU.
    """
    patterns = [regex.encode() for regex, _ in overrides]
    array = (TensorBuftOverride * (len(overrides) + 1))()
    cpu = gpu = None
    for i, ((_, device), pattern) in enumerate(zip(overrides, patterns, strict=True)):
        if device == CPU:
            cpu = cpu or cpu_buffer_type()
            array[i] = TensorBuftOverride(pattern, cpu)
        else:
            gpu = gpu or (_ggml()["dev_buffer_type"](devices[0]) if devices else gpu_buffer_type())
            array[i] = TensorBuftOverride(pattern, gpu)
    array[len(overrides)] = TensorBuftOverride(None, None)
    return BuftOverrides(array, patterns, n_gpu_layers, tuple(devices) if devices is not None else None,
                         tuple(split) if split else None)


def _entries(overrides: BuftOverrides | None) -> list[tuple[bytes, int]]:
    if overrides is None:
        return []
    return [(e.pattern, e.buft) for e in overrides.array if e.pattern is not None]


def _name_patterns(names: Sequence[str]) -> list[str]:
    """Exact-name regexes, one per tensor kind (`blk.N.ffn_up_exps.weight` for every listed N in one pattern)."""
    layers: dict[str, list[str]] = {}
    for name in names:
        match = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
        if match:
            layers.setdefault(match.group(2), []).append(match.group(1))
        else:
            layers.setdefault(name, [])
    patterns = []
    for rest, ids in layers.items():
        if ids:
            patterns.append(rf"^blk\.({'|'.join(ids)})\.{re.escape(rest)}$")
        else:
            patterns.append(rf"^{re.escape(rest)}$")
    return patterns


def with_forced_buffer(base: BuftOverrides | None, names: Sequence[str], buft: int) -> BuftOverrides:
    """`base` with the named tensors sent to `buft` first, except those `base` places off the CPU.

    A tensor `base` does not name stays on the CPU only when no layer is offloaded (n_gpu_layers == 0);
    with layers offloaded it is left to llama.cpp, which may put it on the GPU.
    """
    entries = _entries(base)
    cpu = cpu_buffer_type() if entries else 0
    n_gpu_layers = base.n_gpu_layers if base is not None else 0

    def on_cpu(name: str) -> bool:
        for pattern, target in entries:
            if re.search(pattern.decode(), name):
                return target == cpu
        return n_gpu_layers == 0

    chosen = [name for name in names if on_cpu(name)]
    forced = [p.encode() for p in _name_patterns(chosen)]
    array = (TensorBuftOverride * (len(forced) + len(entries) + 1))()
    for i, (pattern, target) in enumerate([(p, buft) for p in forced] + entries):
        array[i] = TensorBuftOverride(pattern, target)
    array[len(forced) + len(entries)] = TensorBuftOverride(None, None)
    return BuftOverrides(array, forced + [p for p, _ in entries], n_gpu_layers,
                         base.devices if base is not None else None, base.split if base is not None else None)


def plan_overrides(plan: Plan, devices: Sequence[int] | None = None,
                   split: Sequence[int] | None = None) -> BuftOverrides:
    """The overrides and n_gpu_layers of a plan, ready for `BuftOverrides.apply(model_params)`.

    `devices`: the offload devices the plan was made for (RPC servers'), None for this machine's GPUs; `split`:
    each device's share of the offloaded layers (per-server budgets), None for llama.cpp's split by free memory.
    """
    return tensor_buft_overrides(plan.overrides, plan.n_gpu_layers, devices, split)


__all__ = [
    "BuftOverrides", "GpuBudget", "GpuDevice", "buffer_type_name", "cpu_buffer_type", "extra_buffer_types",
    "gpu_devices", "gpu_offload_supported", "plan_overrides", "resolve_gpu_budget", "system_memory",
    "tensor_buft_overrides", "with_forced_buffer",
]
