"""One small quantized matrix product through ggml, with the weights in a chosen CPU buffer type.

Run as a child process (`python -m cascade_local.ggml_probe BUFFER_TYPE`): an extra buffer type that
the CPU advertises but the machine cannot run (ggml's AMX path on VMs that do not deliver tile state)
kills the process with SIGILL, and the parent must survive that to decide. The product goes through the
same ggml build llama.cpp loads models with, on the same code path: the weights are packed by the
buffer type's own `set_tensor`, and the CPU backend dispatches the product to the buffer type's kernel.
Each product is checked against the same one with the weights in a plain CPU buffer.
"""

from __future__ import annotations

import ctypes
import json
import sys
from dataclasses import dataclass
from functools import cache
from typing import Any

import gguf
import numpy as np

from cascade_local.ggml import quantize_rows

GGMLType = gguf.GGMLQuantizationType
# The weight types each extra buffer type is known to take for a 2-D product: AMX takes Q4_0 and Q8_0 (the
# types of this project's dense tensors), the repack buffer Q4_0 and MXFP4 (this project's expert type).
PROBE_TYPES: dict[str, tuple[GGMLType, ...]] = {
    "AMX": (GGMLType.Q8_0, GGMLType.Q4_0),
    "CPU_REPACK": (GGMLType.Q4_0, GGMLType.MXFP4),
}
DEFAULT_PROBE_TYPES = (GGMLType.Q8_0, GGMLType.Q4_0)
# K and N satisfy every kernel's tiling (AMX wants N % 32 == 0); M = 1 is a decode step (AMX's VNNI path) and
# M = 32 a prompt batch (AMX's tile path, where the faults happen).
K, N, BATCHES = 256, 64, (1, 32)


class _InitParams(ctypes.Structure):
    """struct ggml_init_params, passed by value to ggml_init."""

    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


@cache
def _ggml() -> dict[str, Any]:
    from cascade_local.llama_log import quiet_llama

    quiet_llama()
    from cascade_local.devices import native as fn

    p, size, i64 = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64
    return {
        "tensor_overhead": fn("ggml_tensor_overhead", size),
        "graph_overhead": fn("ggml_graph_overhead", size),
        "init": fn("ggml_init", p, _InitParams),
        "free": fn("ggml_free", None, p),
        "new_tensor_2d": fn("ggml_new_tensor_2d", p, p, ctypes.c_int, i64, i64),
        "mul_mat": fn("ggml_mul_mat", p, p, p, p),
        "new_graph": fn("ggml_new_graph", p, p),
        "build_forward_expand": fn("ggml_build_forward_expand", None, p, p),
        "alloc_ctx_tensors_from_buft": fn("ggml_backend_alloc_ctx_tensors_from_buft", p, p, p),
        "buffer_free": fn("ggml_backend_buffer_free", None, p),
        "tensor_set": fn("ggml_backend_tensor_set", None, p, p, size, size),
        "tensor_get": fn("ggml_backend_tensor_get", None, p, p, size, size),
        "cpu_init": fn("ggml_backend_cpu_init", p),
        "cpu_set_n_threads": fn("ggml_backend_cpu_set_n_threads", None, p, ctypes.c_int),
        "backend_free": fn("ggml_backend_free", None, p),
        "graph_compute": fn("ggml_backend_graph_compute", ctypes.c_int, p, p),
    }


def buffer_type_by_name(name: str) -> int:
    """'CPU' or the name of one of the CPU device's extra buffer types (AMX, CPU_REPACK...)."""
    from cascade_local.devices import cpu_buffer_type, extra_buffer_types

    if name == "CPU":
        return cpu_buffer_type()
    for buft_name, buft in extra_buffer_types():
        if buft_name == name:
            return buft
    raise LookupError(f"this llama.cpp build has no CPU buffer type named {name}")


def matmul(buft: int, qtype: GGMLType, weights: np.ndarray, x: np.ndarray, threads: int = 1) -> np.ndarray:
    """weights (N x K, quantized to qtype and stored in buffer type `buft`) times x (M x K) -> M x N."""
    g = _ggml()
    n, k = weights.shape
    m = x.shape[0]
    packed = quantize_rows(weights, qtype)
    x32 = np.ascontiguousarray(x, dtype=np.float32)
    overhead = g["tensor_overhead"]()
    ctx_w = g["init"](_InitParams(overhead * 4, None, True))
    ctx_x = g["init"](_InitParams(overhead * 8 + g["graph_overhead"](), None, True))
    backend = buf_w = buf_x = None
    try:
        w = g["new_tensor_2d"](ctx_w, int(qtype), k, n)
        a = g["new_tensor_2d"](ctx_x, int(GGMLType.F32), k, m)
        out = g["mul_mat"](ctx_x, w, a)
        graph = g["new_graph"](ctx_x)
        g["build_forward_expand"](graph, out)
        buf_w = g["alloc_ctx_tensors_from_buft"](ctx_w, buft)
        from cascade_local.devices import cpu_buffer_type

        buf_x = g["alloc_ctx_tensors_from_buft"](ctx_x, cpu_buffer_type())
        if not buf_w or not buf_x:
            raise RuntimeError("ggml could not allocate the probe's buffers")
        g["tensor_set"](w, packed.ctypes.data, 0, packed.nbytes)
        g["tensor_set"](a, x32.ctypes.data, 0, x32.nbytes)
        backend = g["cpu_init"]()
        g["cpu_set_n_threads"](backend, threads)
        status = g["graph_compute"](backend, graph)
        if status != 0:
            raise RuntimeError(f"ggml_backend_graph_compute returned status {status}")
        result = np.empty((m, n), dtype=np.float32)
        g["tensor_get"](out, result.ctypes.data, 0, result.nbytes)
        return result
    finally:
        if backend:
            g["backend_free"](backend)
        for buf in (buf_w, buf_x):
            if buf:
                g["buffer_free"](buf)
        g["free"](ctx_x)
        g["free"](ctx_w)


@dataclass(frozen=True)
class ProbeResult:
    buffer_type: str
    ok: bool
    detail: str  # what ran, or what went wrong


def probe(buffer_type: str, threads: int = 2) -> ProbeResult:
    """Run each probe type's product in `buffer_type` and compare it with the plain CPU buffer's result."""
    rng = np.random.default_rng(0)
    cpu = buffer_type_by_name("CPU")
    target = buffer_type_by_name(buffer_type)
    ran = []
    for qtype in PROBE_TYPES.get(buffer_type, DEFAULT_PROBE_TYPES):
        weights = rng.standard_normal((N, K)).astype(np.float32)
        for m in BATCHES:
            x = rng.standard_normal((m, K)).astype(np.float32)
            want = matmul(cpu, qtype, weights, x, threads)
            got = matmul(target, qtype, weights, x, threads)
            # Kernels may sum in another order or round activations differently; garbage is far off.
            err = float(np.abs(got - want).max() / max(float(np.abs(want).max()), 1e-6))
            if not np.isfinite(err) or err > 0.02:
                return ProbeResult(buffer_type, False, f"{qtype.name} x {m} rows differs from the CPU result "
                                                       f"(relative error {err:.3g})")
            ran.append(f"{qtype.name}x{m}")
    return ProbeResult(buffer_type, True, "ran " + ", ".join(ran))


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m cascade_local.ggml_probe BUFFER_TYPE", file=sys.stderr)
        return 2
    try:
        result = probe(argv[0])
    except (LookupError, RuntimeError, ValueError) as exc:
        result = ProbeResult(argv[0], False, str(exc))
    print(json.dumps({"buffer_type": result.buffer_type, "ok": result.ok, "detail": result.detail}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
