"""What this machine will do with the model: CPU and the instruction sets llama.cpp uses, its extra buffer types,
RAM, the llama.cpp build and its GPUs, the models folder, and whether the Hub answers. `cascade-local doctor`."""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cascade_local.cpu_extra import ENV, Verdict, cpu_features, cpu_model, system_info, verdict
from cascade_local.devices import gpu_devices, system_memory
from cascade_local.ggml import default_threads
from cascade_local.paths import models_dir

# The instruction sets worth naming, in the order llama.cpp's system info prints them.
SHOWN_FEATURES = ("SSE3", "AVX", "AVX2", "F16C", "FMA", "AVX_VNNI", "AVX512", "AVX512_VBMI", "AVX512_VNNI",
                  "AVX512_BF16", "AMX_INT8", "NEON", "ARM_FMA", "SVE", "DOTPROD", "MATMUL_INT8")
GPU_BACKENDS = ("CUDA", "HIP", "ROCm", "Vulkan", "Metal", "SYCL", "MUSA", "CANN", "OpenCL")
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"


@dataclass(frozen=True)
class GpuReport:
    name: str
    description: str
    free: int
    total: int


# What `--kv-type` offers, and what each costs per token relative to f16 (ggml's block sizes: 34 B per 32
# values for q8_0, 18 B for q4_0); quantized V needs flash attention, which the engine then turns on.
KV_TYPE_NOTES = ("f16 (default)", "q8_0 (53% of f16, flash attention)", "q4_0 (28% of f16, flash attention)")


@dataclass(frozen=True)
class MachineReport:
    cpu_model: str
    cores: int  # CPUs this process may run on
    features: list[str]  # instruction sets llama.cpp's CPU backend uses
    system_info: str
    cpu_extra_mode: str
    cpu_extra_reason: str
    cpu_extra_source: str
    extra_buffer_types: list[str]
    amx_in_use: bool
    repacking_in_use: bool
    ram_total: int | None
    ram_available: int | None
    llama_cpp_version: str
    backends: list[str]  # ggml backends in this build: CPU, CUDA, Vulkan, Metal, RPC...
    build: str  # "CPU-only", or the GPU backends
    rpc: bool  # llama.cpp's RPC backend is in the build: `--rpc` and `rpc-server` work
    gpus: list[GpuReport]
    gpu_present: str | None  # a GPU seen outside llama.cpp (driver files), for a CPU-only build
    rebuild_command: str | None  # how to rebuild llama-cpp-python for the GPU that is present
    models_dir: str
    models_bytes: int
    models_count: int
    hub: str  # "reachable", "unreachable: ...", or "not checked: ..."
    hub_endpoint: str
    kv_types: list[str] = field(default_factory=lambda: list(KV_TYPE_NOTES))  # --kv-type choices, with their cost
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def backend_names() -> list[str]:
    """The ggml backends registered in this build (CPU, CUDA, Vulkan, Metal, RPC...)."""
    from cascade_local.llama_log import quiet_llama

    quiet_llama()
    from cascade_local.devices import native

    count = native("ggml_backend_reg_count", ctypes.c_size_t)
    get = native("ggml_backend_reg_get", ctypes.c_void_p, ctypes.c_size_t)
    name = native("ggml_backend_reg_name", ctypes.c_char_p, ctypes.c_void_p)
    return [(name(get(i)) or b"?").decode() for i in range(count())]


def gpu_on_this_machine() -> str | None:
    """A GPU the system shows, whatever llama.cpp was built with: 'NVIDIA', 'AMD', 'Intel', 'Apple' or None."""
    if sys.platform == "darwin" and platform.machine() == "arm64":
        return "Apple"
    if Path("/proc/driver/nvidia/version").exists() or shutil.which("nvidia-smi"):
        return "NVIDIA"
    if Path("/dev/kfd").exists() or shutil.which("rocm-smi"):
        return "AMD"
    drm = Path("/sys/class/drm")
    vendors = {"0x10de": "NVIDIA", "0x1002": "AMD", "0x8086": "Intel"}
    if drm.is_dir():
        for vendor_file in sorted(drm.glob("card*/device/vendor")):
            try:
                found = vendors.get(vendor_file.read_text().strip())
            except OSError:
                continue
            if found:
                return found
    return None


def rebuild_command(gpu: str) -> str:
    """The command that rebuilds llama-cpp-python for that GPU in this environment (pip's cache would reuse
    the CPU-only wheel, hence --no-cache-dir)."""
    flags = {"NVIDIA": "-DGGML_CUDA=on", "AMD": "-DGGML_HIP=on", "Intel": "-DGGML_VULKAN=on",
             "Apple": "-DGGML_METAL=on"}[gpu] + " -DGGML_RPC=ON"  # keeps --rpc and rpc-server working
    return (f'CMAKE_ARGS="{flags}" {sys.executable} -m pip install --force-reinstall --no-deps --no-cache-dir '
            f"{LLAMA_CPP_PYTHON}")


def folder_size(path: Path) -> tuple[int, int]:
    """(bytes, GGUF files) under a folder; (0, 0) if it does not exist."""
    total = count = 0
    if not path.is_dir():
        return 0, 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += (Path(root) / name).stat().st_size
            except OSError:
                continue
            count += name.endswith(".gguf")
    return total, count


def hub_status(timeout: float = 3.0) -> tuple[str, str]:
    """(status, endpoint): whether the Hugging Face Hub answers, honouring HF_ENDPOINT and HF_HUB_OFFLINE."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "not checked: HF_HUB_OFFLINE is set", endpoint
    import httpx

    try:
        answer = httpx.head(f"{endpoint}/api/models", timeout=timeout, follow_redirects=True)
    except httpx.HTTPError as exc:
        return f"unreachable: {type(exc).__name__}", endpoint
    return ("reachable" if answer.status_code < 500 else f"unreachable: HTTP {answer.status_code}"), endpoint


def machine_report(*, check_hub: bool = True) -> MachineReport:
    found: Verdict = verdict()
    features = cpu_features()
    total, available = system_memory()
    backends = backend_names()
    gpu_backends = [b for b in backends if b in GPU_BACKENDS]
    gpus = [GpuReport(g.name, g.description, g.free, g.total) for g in gpu_devices()]
    present = gpu_on_this_machine()
    rebuild = rebuild_command(present) if present and not gpu_backends else None
    models = models_dir()
    size, count = folder_size(models)
    hub, endpoint = hub_status() if check_hub else ("not checked: --no-hub", "")
    notes = []
    if found.mode != "all":
        notes.append(f"set {ENV}=on to force every extra buffer type (only if the probe was wrong)")
    from cascade_local.rpc import rpc_supported

    rpc = rpc_supported()
    if not rpc:
        notes.append("no RPC backend in this build (--rpc, rpc-server): `make` builds llama-cpp-python with "
                     "-DGGML_RPC=ON")
    if gpu_backends and not gpus:
        notes.append(f"this build has {', '.join(gpu_backends)} but ggml found no usable GPU: check the driver")
    import llama_cpp

    return MachineReport(
        cpu_model=cpu_model(), cores=default_threads(),
        features=[f for f in SHOWN_FEATURES if f in features], system_info=system_info(),
        cpu_extra_mode=found.mode, cpu_extra_reason=found.reason, cpu_extra_source=found.source,
        extra_buffer_types=list(found.extras), amx_in_use=found.amx, repacking_in_use=found.repacking,
        ram_total=total, ram_available=available, llama_cpp_version=llama_cpp.__version__,
        backends=backends, build="CPU-only" if not gpu_backends else " + ".join(gpu_backends), rpc=rpc, gpus=gpus,
        gpu_present=present, rebuild_command=rebuild, models_dir=str(models), models_bytes=size,
        models_count=count, hub=hub, hub_endpoint=endpoint, notes=notes,
    )
