"""Which experts the router picks, per layer, counted from llama.cpp's eval callback (opt-in).

During decode ggml's scheduler offers every named tensor to `cb_eval`; the router's choice is
`ffn_moe_topk-<layer>`, an int32 [k, n_tokens] view. Asking for a tensor makes the scheduler stop and
hand it over, which costs time, so this is only installed when statistics are wanted.
"""

from __future__ import annotations

import ctypes
import re
from collections.abc import Iterator

import numpy as np

TOPK_NAME = re.compile(rb"^ffn_moe_topk-(\d+)$")
GGML_MAX_DIMS, GGML_MAX_SRC, GGML_MAX_OP_PARAMS, GGML_MAX_NAME = 4, 10, 64, 64


class _GGMLTensor(ctypes.Structure):
    """struct ggml_tensor (ggml.h); its layout is checked against ggml_get_name at first use."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
        ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * GGML_MAX_SRC),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * GGML_MAX_NAME),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


class ExpertStats:
    """Counts of router picks: `counts[layer][expert]`, accumulated over every decoded token."""

    def __init__(self, n_expert: int):
        import llama_cpp.llama_cpp as llama_cpp_lib

        self.n_expert = n_expert
        self.counts: dict[int, np.ndarray] = {}
        lib = llama_cpp_lib._lib
        lib.ggml_get_name.restype = ctypes.c_char_p
        lib.ggml_get_name.argtypes = [ctypes.c_void_p]
        lib.ggml_nbytes.restype = ctypes.c_size_t
        lib.ggml_nbytes.argtypes = [ctypes.c_void_p]
        lib.ggml_backend_tensor_get.restype = None
        lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
        self._lib = lib
        self._layout_checked = False
        # A reference must outlive the context: a collected ctypes callback crashes the process.
        self.callback = llama_cpp_lib.ggml_backend_sched_eval_callback(self._on_tensor)

    def _on_tensor(self, tensor: int, ask: bool, _user: int) -> bool:
        name = self._lib.ggml_get_name(tensor)
        match = TOPK_NAME.match(name or b"")
        if ask:
            return match is not None
        if match is None:
            return True
        t = _GGMLTensor.from_address(tensor)
        if not self._layout_checked:
            if t.name.split(b"\0")[0] != name or t.ne[0] <= 0:
                raise RuntimeError("ggml_tensor layout differs from this build; expert statistics unavailable")
            self._layout_checked = True
        k, n_tokens, stride = int(t.ne[0]), int(t.ne[1]), int(t.nb[1])
        raw = (ctypes.c_uint8 * self._lib.ggml_nbytes(tensor))()
        self._lib.ggml_backend_tensor_get(tensor, raw, 0, len(raw))
        ids = np.frombuffer(raw, dtype=np.uint8)
        rows = [np.frombuffer(ids[i * stride : i * stride + 4 * k].tobytes(), dtype=np.int32) for i in range(n_tokens)]
        layer = int(match.group(1))
        counts = self.counts.setdefault(layer, np.zeros(self.n_expert, dtype=np.int64))
        for row in rows:
            np.add.at(counts, row, 1)
        return True

    def layers(self) -> Iterator[tuple[int, np.ndarray]]:
        yield from sorted(self.counts.items())

    def reset(self) -> None:
        self.counts.clear()
