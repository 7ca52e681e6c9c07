"""Where each tensor of a GGUF goes (GPU or CPU) and how much memory each side needs, decided before loading.

Pure arithmetic over the GGUF's tensor table and hyper-parameters: nothing here calls llama.cpp (the device
queries and the ctypes side live in `cascade_local.devices`). The memory model follows llama.cpp as vendored in
llama-cpp-python 0.3.36, read from its source and checked against its own log lines:

- Context. `ctx` is per sequence: `parallel` sequences of `ctx` tokens each. llama.cpp is given
  `n_ctx = ctx * parallel`, `n_seq_max = parallel` and its default `kv_unified = false`; it pads `n_ctx` and the
  per-sequence size `n_ctx_seq = n_ctx / n_seq_max` to multiples of 256 (llama-context.cpp).
- KV cache (llama-kv-cache.cpp): attention layers only (head_count_kv > 0; in nemotron_h_moe 6 of 52), K and V in
  f16: `n_ctx_seq * n_seq_max` cells (one stream per sequence) * head_count_kv * (key_length + value_length) * 2 B.
  So the cache holds the total context, `ctx * parallel` cells, whether or not the streams are unified.
- Mamba state (llama-memory-recurrent.cpp): one row per sequence (`max(1, n_seq_max)` rows) in every Mamba layer
  (head_count_kv == 0 and feed_forward_length == 0; MoE layers have neither), f32:
  conv `(d_conv - 1) * (d_inner + 2 * n_group * d_state)` + ssm `d_state * d_inner` values per row.
- Compute buffer (fitted to llama.cpp's "compute buffer size" log on the tiny fixture and on the real-width slice,
  at n_ubatch 64..2048 and contexts 4096..262144; flash attention on, which `auto` picks on CPU and CUDA). ggml's
  allocator has two peaks: inside a layer, while the attention mask is alive, and at the logits, after it:
      mask   = n_ctx_seq * n_ubatch * 2 B                       (f16 KQ mask, only with attention layers)
      layers = n_ubatch * 4 B * max(MoE, Mamba, attention widths per token, see `ModelShape.act_floats`)
      mamba  = n_ubatch * 4 B * ((xbc + d_inner + n_head) + xbc + 2 * d_inner + 16 * n_head + 4 * n_embd)
               + min(n_seq_max, n_ubatch) * 4 B * (d_state * d_inner + 2 * conv state)
      (ssm_scan returns the state of every sequence in the micro-batch; the per-token part is fitted on two
      models with the real Mamba widths, n_embd 64 and 2688, at n_ubatch 512 and 1024, to within 4%)
      logits = n_outputs * n_vocab * 4 B + n_ubatch * 20 * n_embd B
      compute = max(mask + max(layers, mamba), logits)
  `n_outputs` is llama.cpp's worst case, `min(n_ubatch, n_outputs_max)`, and `n_outputs_max` defaults to n_batch:
  with the 131,072-token vocabulary the reserved logits alone are 256 MiB at n_ubatch 512. Measured on the slice,
  n_ubatch 512 unless said: ctx 4096 281.0 MiB (formula 282.3), 32768 271.8 (282.3), 131072 271.8 (282.3),
  229376 301.0 (309.5), 262144 333.0 (341.5); n_ubatch 128 69.9 (72.6), 2048 1119.1 (1129.0). One outlier:
  ctx 65536 320.5 (282.3), where the allocator's placement leaves a hole; the headroom covers it. On the tiny
  model the formula is within 1 MiB of the log. The `mamba` term matters when many sequences share a context
  (serve --parallel) and the logits are reserved for one row per sequence: on the slice, n_ubatch 512, 8 / 16 /
  32 / 64 sequences took 87.0 / 104.1 / 138.4 / 206.9 MiB (formula 90.2 / 107.3 / 141.6 / 210.1; without the
  term it said 87.5 for all four), and at n_ubatch 1024, 64 sequences 276.8 (283.2).
  Plus the output buffer, `n_seq_max * n_vocab * 4 B`, in host memory.
- GPU offload (llama-model.cpp, llama-model-loader.cpp): `token_embd` is the input layer, which llama.cpp always
  keeps in host memory. With every layer offloaded (`n_gpu_layers` = all), KV cache, Mamba state and the compute
  buffer are on the GPU. When expert tensors stay on the CPU, ggml's scheduler still runs their matrix products on
  the GPU for batches of 32 tokens or more (`op_offload`), copying the weight into the GPU compute buffer; the plan
  reserves the largest CPU-resident expert tensor for that copy (read from ggml-backend.cpp; not measured here).
- Headroom: 5% of each memory budget plus 256 MiB, never planned into.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cascade_local.errors import CascadeError, UsageError
from cascade_local.gguf_info import GGUFFile, TensorInfo
from cascade_local.model_summary import CLASS_ORDER, tensor_class

CPU, GPU = "CPU", "GPU"
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

DEFAULT_CTX = 8192
DEFAULT_PARALLEL = 1
DEFAULT_UBATCH = 512  # llama.cpp's defaults
DEFAULT_BATCH = 2048
MAX_SEQ = 256  # LLAMA_MAX_SEQ
MAX_N_CTX = (1 << 32) - 1  # n_ctx is a uint32_t
CTX_PAD = 256  # llama.cpp pads n_ctx and n_ctx_seq to this

# KV cache element types (llama.cpp's --cache-type-k/-v): bytes per block, elements per block (ggml's type traits).
KV_TYPES = {"f16": (2, 1), "q8_0": (34, 32), "q4_0": (18, 32)}
DEFAULT_KV_TYPE = "f16"
# `--ctx auto` for chat and serve, whose prompts are not known in advance: room to grow up to this many tokens.
AUTO_ROOM = 32768

HEADROOM_FRACTION = 0.05
HEADROOM_FIXED = 256 * MiB

# llama.cpp's LLM_FFN_EXPS_REGEX: what its --cpu-moe and --n-cpu-moe move to the CPU.
EXPERT_REGEX = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"
_EXPERT = re.compile(EXPERT_REGEX)
_INPUT = re.compile(r"^(token_embd|token_types|position_embd)\.")  # llama.cpp's input layer: always host memory
_LAYER = re.compile(r"^blk\.(\d+)\.")

# A context with expert weights on the CPU copies each one to the GPU for batches of this many tokens or more.
OP_OFFLOAD_MIN_BATCH = 32


class PlanError(CascadeError):
    """The model does not fit as asked (GPU budget, RAM, context length); the message says what would fit."""

    exit_code = 2


# -- parsing what users type ---------------------------------------------------------------------------------------

_UNITS = {
    "": 1, "b": 1,
    "k": KiB, "kib": KiB, "kb": 1000,
    "m": MiB, "mib": MiB, "mb": 1000**2,
    "g": GiB, "gib": GiB, "gb": 1000**3,
    "t": 1 << 40, "tib": 1 << 40, "tb": 1000**4,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")


def parse_size(text: str) -> int:
    """'8GiB' -> 8589934592. Units: B, KiB/MiB/GiB/TiB (and K/M/G/T, binary), kB/MB/GB/TB (decimal); '0' is zero."""
    match = _SIZE.match(text)
    unit = match and _UNITS.get(match.group(2).lower())
    if not match or unit is None:
        raise UsageError(f"cannot read '{text}' as a memory size: write a number and a unit, such as 8GiB, 8GB, "
                         "8000MiB or 0")
    return round(float(match.group(1)) * unit)


_DEVICE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


def parse_override(text: str) -> list[tuple[str, str]]:
    """llama.cpp's `--override-tensor` syntax: 'REGEX=DEVICE[,REGEX=DEVICE...]' -> [(regex, 'CPU' or 'GPU')].

    DEVICE is a llama.cpp buffer type name: CPU (and pinned host buffers such as CUDA_Host) mean the CPU; any other
    (CUDA0, ROCm0, Vulkan0, Metal, GPU...) means the GPU. Like llama.cpp, commas separate overrides.
    """
    pairs = []
    for item in text.split(","):
        regex, eq, device = item.partition("=")
        if not eq or not regex or not device:
            raise UsageError(f"--override-tensor '{text}': write REGEX=DEVICE, for example "
                             r"'blk\.(0|1)\.ffn_(up|down)_exps=CPU'")
        if not _DEVICE.match(device):
            raise UsageError(f"--override-tensor '{item}': '{device}' is not a device; use CPU, or a GPU name "
                             "such as CUDA0")
        try:
            re.compile(regex)
        except re.error as exc:
            raise UsageError(f"--override-tensor '{item}': '{regex}' is not a valid regular expression ({exc})") \
                from None
        is_cpu = device.upper() == "CPU" or device.lower().endswith("_host")
        pairs.append((regex, CPU if is_cpu else GPU))
    return pairs


def fmt_bytes(n: int | float) -> str:
    """Binary units, as llama.cpp logs them and GPUs are sold: 8589934592 -> '8.00 GiB'."""
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


# -- the model's shape -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """The hyper-parameters that size llama.cpp's buffers, read from GGUF metadata (`{arch}.*` keys)."""

    n_layer: int
    n_embd: int
    n_vocab: int
    n_head: int
    n_head_kv: tuple[int, ...]  # per layer; 0 on layers without attention
    n_ff: tuple[int, ...]  # per layer; 0 on layers without a feed-forward part
    head_dim_k: int
    head_dim_v: int
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_exp: int = 0
    ssm_d_conv: int = 0
    ssm_d_inner: int = 0
    ssm_d_state: int = 0
    ssm_n_group: int = 0
    ssm_n_head: int = 0

    @classmethod
    def from_gguf(cls, gguf: GGUFFile) -> ModelShape:
        meta, arch = gguf.metadata, gguf.architecture
        if not arch:
            raise PlanError(f"{gguf.path} has no general.architecture; cannot size its memory")

        def get(key: str, default: Any = 0) -> Any:
            return meta.get(f"{arch}.{key}", default)

        n_layer = int(get("block_count"))
        n_embd = int(get("embedding_length"))
        if n_layer < 1 or n_embd < 1:
            raise PlanError(f"{gguf.path} lacks {arch}.block_count or {arch}.embedding_length; "
                            "cannot size its memory")

        def per_layer(key: str, default: int) -> tuple[int, ...]:
            value = get(key, default)
            values = [int(v) for v in value] if isinstance(value, list) else [int(value)] * n_layer
            if len(values) != n_layer:
                raise PlanError(f"{gguf.path}: {arch}.{key} has {len(values)} entries for {n_layer} layers")
            return tuple(values)

        heads = get("attention.head_count", 0)
        n_head = int(max(heads, default=0) if isinstance(heads, list) else heads or 0)
        embd = next((t for t in gguf.tensors if t.name == "token_embd.weight"), None)
        tokens = meta.get("tokenizer.ggml.tokens")
        n_vocab = int(get("vocab_size", 0)) or (len(tokens) if isinstance(tokens, list) else 0) or \
            (embd.shape[1] if embd is not None and len(embd.shape) > 1 else 0)
        head_dim = n_embd // n_head if n_head else 0
        return cls(
            n_layer=n_layer, n_embd=n_embd, n_vocab=n_vocab, n_head=n_head,
            n_head_kv=per_layer("attention.head_count_kv", n_head), n_ff=per_layer("feed_forward_length", 0),
            head_dim_k=int(get("attention.key_length", head_dim)),
            head_dim_v=int(get("attention.value_length", head_dim)),
            n_expert=int(get("expert_count")), n_expert_used=int(get("expert_used_count")),
            n_ff_exp=int(get("expert_feed_forward_length")),
            ssm_d_conv=int(get("ssm.conv_kernel")), ssm_d_inner=int(get("ssm.inner_size")),
            ssm_d_state=int(get("ssm.state_size")), ssm_n_group=int(get("ssm.group_count")),
            ssm_n_head=int(get("ssm.time_step_rank")),
        )

    @property
    def attention_layers(self) -> list[int]:
        return [il for il in range(self.n_layer) if self.n_head_kv[il] > 0]

    @property
    def recurrent_layers(self) -> list[int]:
        """Layers with a Mamba state: llama.cpp's filter for nemotron_h is 'recurrent and no feed-forward'."""
        if not self.ssm_d_inner:
            return []
        return [il for il in range(self.n_layer) if self.n_head_kv[il] == 0 and self.n_ff[il] == 0]

    @property
    def kv_bytes_per_cell(self) -> int:
        """K and V of one token in every attention layer, f16."""
        return self.kv_bytes(DEFAULT_KV_TYPE)

    def kv_bytes(self, kv_type: str) -> int:
        """K and V of one token in every attention layer, in `kv_type` (f16, q8_0, q4_0), as ggml_row_size counts."""
        size, block = KV_TYPES[kv_type]
        return sum(self.n_head_kv[il] * ((self.head_dim_k + self.head_dim_v) // block) * size
                   for il in self.attention_layers)

    @property
    def state_bytes_per_seq(self) -> int:
        """One sequence's Mamba state in every Mamba layer, f32: llama_hparams::n_embd_r() + n_embd_s()."""
        conv = max(self.ssm_d_conv - 1, 0) * (self.ssm_d_inner + 2 * self.ssm_n_group * self.ssm_d_state)
        ssm = self.ssm_d_state * self.ssm_d_inner
        return (conv + ssm) * 4 * len(self.recurrent_layers)

    @property
    def scan_bytes_per_seq(self) -> int:
        """What one sequence adds to a Mamba layer's peak: its ssm state (ssm_scan returns every sequence's) and
        its conv state twice (read and written), f32."""
        if not self.ssm_d_inner:
            return 0
        conv = max(self.ssm_d_conv - 1, 0) * (self.ssm_d_inner + 2 * self.ssm_n_group * self.ssm_d_state)
        return (self.ssm_d_state * self.ssm_d_inner + 2 * conv) * 4

    @property
    def mamba_act_floats(self) -> int:
        """Per-token values alive in a Mamba layer beside the states (fitted: see the module doc)."""
        if not self.ssm_d_inner:
            return 0
        xbc = self.ssm_d_inner + 2 * self.ssm_n_group * self.ssm_d_state
        return (xbc + self.ssm_d_inner + self.ssm_n_head) + xbc + 2 * self.ssm_d_inner + 16 * self.ssm_n_head \
            + 4 * self.n_embd

    @property
    def act_floats(self) -> int:
        """The widest per-token activations any one layer keeps alive at once (f32 values); see the module doc."""
        xbc = self.ssm_d_inner + 2 * self.ssm_n_group * self.ssm_d_state
        candidates = [
            self.n_expert_used * (2 * self.n_ff_exp + self.n_embd) + 2 * self.n_embd,  # MoE: gathered input, up, act
            (xbc + self.ssm_d_inner + self.ssm_n_head) + xbc + 2 * self.ssm_d_inner if self.ssm_d_inner else 0,
            2 * self.n_head * self.head_dim_k + 2 * max(self.n_head_kv, default=0) * self.head_dim_k + self.n_embd,
            2 * max(self.n_ff, default=0) + self.n_embd,
        ]
        return max(candidates)


# -- context memory --------------------------------------------------------------------------------------------------


def _pad(n: int, to: int = CTX_PAD) -> int:
    return -(-n // to) * to


@dataclass(frozen=True)
class ContextMemory:
    """What one llama.cpp context needs besides the weights, for `parallel` sequences of `ctx` tokens."""

    n_ctx: int  # as llama.cpp will round it: n_ctx_seq * n_seq_max
    n_ctx_seq: int
    n_seq_max: int
    n_ubatch: int  # as llama.cpp will clamp it
    n_outputs: int  # logits rows the compute buffer is reserved for
    kv: int
    state: int
    mask: int
    layer_peak: int
    logits_peak: int
    output: int  # the logits output buffer, in host memory
    kv_type: str = DEFAULT_KV_TYPE
    mamba_peak: int = 0  # a Mamba layer's activations plus the states of every sequence in the micro-batch

    @property
    def compute(self) -> int:
        return max(self.mask + max(self.layer_peak, self.mamba_peak), self.logits_peak)

    def small_batch_compute(self, shape: ModelShape) -> int:
        """The CPU's share when the layers run on the GPU: token embeddings, and experts for batches under 32."""
        return self.n_ubatch * shape.n_embd * 4 + min(self.n_ubatch, OP_OFFLOAD_MIN_BATCH) * shape.act_floats * 4


def context_memory(shape: ModelShape, ctx: int, parallel: int, *, n_ubatch: int = DEFAULT_UBATCH,
                   n_batch: int = DEFAULT_BATCH, n_outputs_max: int | None = None,
                   kv_type: str = DEFAULT_KV_TYPE) -> ContextMemory:
    """KV cache, Mamba state, compute and output buffers as llama.cpp sizes them (kv_unified off, flash attention)."""
    n_ctx_seq = _pad(_pad(ctx * parallel) // parallel)
    n_ctx = n_ctx_seq * parallel
    batch = min(n_batch, n_ctx)  # with causal attention the batch is limited by the context
    ubatch = min(n_ubatch, batch)
    n_outputs = min(ubatch, n_outputs_max or batch)
    return ContextMemory(
        n_ctx=n_ctx, n_ctx_seq=n_ctx_seq, n_seq_max=parallel, n_ubatch=ubatch, n_outputs=n_outputs,
        kv=n_ctx * shape.kv_bytes(kv_type),
        state=max(1, parallel) * shape.state_bytes_per_seq,
        mask=n_ctx_seq * ubatch * 2 if shape.attention_layers else 0,
        layer_peak=ubatch * shape.act_floats * 4,
        logits_peak=n_outputs * shape.n_vocab * 4 + ubatch * 20 * shape.n_embd,
        output=parallel * shape.n_vocab * 4, kv_type=kv_type,
        mamba_peak=ubatch * shape.mamba_act_floats * 4 + min(parallel, ubatch) * shape.scan_bytes_per_seq,
    )


def headroom(capacity: int) -> int:
    return int(capacity * HEADROOM_FRACTION) + HEADROOM_FIXED


def smallest_budget(need: int) -> int:
    """The smallest memory budget whose room after headroom holds `need` bytes."""
    budget = int((need + HEADROOM_FIXED) / (1 - HEADROOM_FRACTION))
    while budget - headroom(budget) < need:
        budget += 1
    while budget > 0 and budget - 1 - headroom(budget - 1) >= need:
        budget -= 1
    return budget


# -- the plan --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorPlacement:
    name: str
    cls: str
    nbytes: int
    layer: int | None
    device: str
    why: str


@dataclass(frozen=True)
class ClassTotal:
    cls: str
    tensors: int
    gpu: int
    cpu: int


@dataclass(frozen=True)
class Plan:
    """Where every tensor goes and what each device needs; `overrides` and `n_gpu_layers` are what llama.cpp gets.

    `ctx` is per sequence; llama.cpp's context gets `n_ctx` (= ctx * parallel, padded) and `n_seq_max` = parallel.
    Sizes are bytes. `gpu_budget` is 0 when nothing goes to a GPU.
    """

    path: str
    architecture: str | None
    mode: str  # GPU: layers offloaded, CPU: everything on the CPU
    why_cpu: str | None  # why everything is on the CPU ("CPU-only build: ...", "--gpu-mem 0")
    gpu_budget: int
    gpu_name: str | None
    ram_available: int | None
    ctx: int
    parallel: int
    memory: ContextMemory
    tensors: tuple[TensorPlacement, ...] = field(repr=False)
    compute_gpu: int
    compute_cpu: int
    expert_copy: int  # GPU compute room for one CPU-resident expert tensor (op_offload)
    overrides: tuple[tuple[str, str], ...]
    n_gpu_layers: int
    notes: tuple[str, ...] = ()

    # -- totals ------------------------------------------------------------------------------------------------

    def weights(self, device: str) -> int:
        return sum(t.nbytes for t in self.tensors if t.device == device)

    @property
    def kv_device(self) -> str:
        return GPU if self.mode == GPU else CPU

    def need(self, device: str) -> int:
        """Bytes this device must hold (without headroom)."""
        total = self.weights(device) + (self.compute_gpu + self.expert_copy if device == GPU else self.compute_cpu)
        if device == self.kv_device:
            total += self.memory.kv + self.memory.state
        if device == CPU:
            total += self.memory.output
        return total

    @property
    def headroom_gpu(self) -> int:
        return headroom(self.gpu_budget) if self.mode == GPU else 0

    @property
    def headroom_cpu(self) -> int:
        return headroom(self.ram_available) if self.ram_available is not None else 0

    def class_totals(self) -> list[ClassTotal]:
        rows = []
        for cls in CLASS_ORDER:
            members = [t for t in self.tensors if t.cls == cls]
            if members:
                rows.append(ClassTotal(cls, len(members), sum(t.nbytes for t in members if t.device == GPU),
                                       sum(t.nbytes for t in members if t.device == CPU)))
        return rows

    def expert_layers(self, device: str) -> list[int]:
        """Layers whose expert tensors are (all) on `device`."""
        layers: dict[int, set[str]] = {}
        for t in self.tensors:
            if t.layer is not None and _EXPERT.search(t.name):
                layers.setdefault(t.layer, set()).add(t.device)
        return sorted(il for il, devices in layers.items() if devices == {device})

    @property
    def verdict(self) -> str:
        # The RAM figure with its headroom is the table's total, so the two lines never seem to disagree. (What
        # is available has its own row above.)
        ram = f"{fmt_bytes(self.need(CPU))} of RAM, {fmt_bytes(self.need(CPU) + self.headroom_cpu)} with headroom"
        if self.mode == CPU:
            return f"{self.why_cpu}: everything on the CPU, {ram}"
        gpu_experts, cpu_experts = self.expert_layers(GPU), self.expert_layers(CPU)
        if not cpu_experts:
            experts = "all experts on the GPU"
        elif not gpu_experts:
            experts = "all experts in RAM"
        else:
            n = len(gpu_experts) + len(cpu_experts)
            experts = f"experts of {len(gpu_experts)} of {n} MoE layers on the GPU ({_ranges(gpu_experts)}), " \
                      "the rest in RAM"
        return (f"fits: {fmt_bytes(self.need(GPU))} on the GPU (of {fmt_bytes(self.gpu_budget)}, "
                f"{fmt_bytes(self.headroom_gpu)} kept free), {ram}; {experts}")

    def override_args(self, gpu_device: str = "CUDA0") -> list[str]:
        """The overrides as llama.cpp's `--override-tensor` values (GPU written as CUDA0, or the device planned for)."""
        return [f"{regex}={'CPU' if device == CPU else gpu_device}" for regex, device in self.overrides]

    def to_dict(self) -> dict[str, Any]:
        m = self.memory
        return {
            "path": self.path, "architecture": self.architecture, "mode": self.mode, "why_cpu": self.why_cpu,
            "gpu": {"name": self.gpu_name, "budget": self.gpu_budget, "need": self.need(GPU),
                    "headroom": self.headroom_gpu},
            "ram": {"available": self.ram_available, "need": self.need(CPU), "headroom": self.headroom_cpu},
            "ctx": self.ctx, "parallel": self.parallel,
            "llama": {"n_ctx": m.n_ctx, "n_ctx_seq": m.n_ctx_seq, "n_seq_max": m.n_seq_max, "n_ubatch": m.n_ubatch,
                      "n_outputs_max": m.n_outputs, "kv_unified": False, "n_gpu_layers": self.n_gpu_layers,
                      "tensor_buft_overrides": [{"pattern": r, "device": d} for r, d in self.overrides]},
            "memory": {"kv_cache": m.kv, "kv_device": self.kv_device, "mamba_state": m.state,
                       "compute_gpu": self.compute_gpu, "expert_copy_gpu": self.expert_copy,
                       "compute_cpu": self.compute_cpu, "output_cpu": m.output},
            "classes": [{"class": c.cls, "tensors": c.tensors, "gpu": c.gpu, "cpu": c.cpu}
                        for c in self.class_totals()],
            "expert_layers": {"gpu": self.expert_layers(GPU), "cpu": self.expert_layers(CPU)},
            "notes": list(self.notes), "verdict": self.verdict,
            "tensors": [{"name": t.name, "class": t.cls, "bytes": t.nbytes, "device": t.device, "why": t.why}
                        for t in self.tensors],
        }


def _ranges(layers: list[int]) -> str:
    """[1, 2, 3, 7] -> '1-3, 7'."""
    out: list[str] = []
    for il in layers:
        if out and out[-1].split("-")[-1] == str(il - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{il}"
        else:
            out.append(str(il))
    return ", ".join(out)


def expert_layers_regex(layers: Iterable[int]) -> str:
    r"""[3, 4] -> 'blk\.(3|4)\.ffn_(up|down|gate|gate_up)_(ch|)exps': one pattern, so llama.cpp tests one per tensor."""
    return rf"blk\.({'|'.join(str(il) for il in sorted(layers))})" + EXPERT_REGEX


# -- planning --------------------------------------------------------------------------------------------------------


@dataclass
class _Shortfall:
    device: str
    need: int
    have: int
    parts: dict[str, int]


def plan_placement(gguf: GGUFFile, *, gpu_bytes: int, ctx: int, parallel: int = DEFAULT_PARALLEL,
                   cpu_moe: bool = False, n_cpu_moe: int | None = None, overrides: Sequence[tuple[str, str]] = (),
                   ram_bytes: int | None = None, gpu_available: bool, gpu_name: str | None = None,
                   n_ubatch: int = DEFAULT_UBATCH, n_batch: int = DEFAULT_BATCH,
                   n_outputs_max: int | None = None, kv_type: str = DEFAULT_KV_TYPE) -> Plan:
    """Place every tensor of `gguf` on the GPU or the CPU for `parallel` sequences of `ctx` tokens each.

    Dense tensors go to the GPU first (token_embd stays in host memory, as llama.cpp keeps it), then the expert
    tensors of whole layers, in layer order, while they fit in `gpu_bytes` minus headroom. `overrides` (regex,
    'CPU'/'GPU') win over everything, then `cpu_moe` / `n_cpu_moe` (llama.cpp's meanings). `ram_bytes` is the RAM
    available (None: unknown, not checked). With no GPU (`gpu_available` false) or `gpu_bytes` 0, everything is on
    the CPU. `n_ubatch`, `n_batch` and `n_outputs_max` are the llama_context_params the engine will use;
    `n_outputs_max` None is the engine's choice, one row of logits per sequence (`parallel`). llama.cpp's own
    default (n_batch) would reserve logits for a whole micro-batch (256 MiB at n_ubatch 512 on this vocabulary).
    Raises UsageError for impossible arguments and PlanError when it does not fit, saying what would.
    """
    _check_args(ctx, parallel, n_cpu_moe, gpu_bytes, n_ubatch, n_batch, n_outputs_max)
    check_kv_type(kv_type)
    shape = ModelShape.from_gguf(gguf)
    fixed = tuple(overrides)

    def plan_for(ctx: int) -> tuple[Plan, _Shortfall | None]:
        return _plan(gguf, shape, ctx=ctx, gpu_bytes=gpu_bytes, parallel=parallel, cpu_moe=cpu_moe,
                     n_cpu_moe=n_cpu_moe, overrides=fixed, ram_bytes=ram_bytes, gpu_available=gpu_available,
                     gpu_name=gpu_name, n_ubatch=n_ubatch, n_batch=n_batch, n_outputs_max=n_outputs_max,
                     kv_type=kv_type)

    plan, short = plan_for(ctx)
    if short is None:
        return plan
    short_small = plan_for(1)[1]
    if short_small is not None:  # not even the smallest context fits: the context is not the problem
        raise _too_small(short if short.device == short_small.device else short_small, plan)
    low, high = 1, _pad(ctx) // CTX_PAD - 1  # in units of 256 tokens: llama.cpp pads ctx to these
    while low < high:
        mid = (low + high + 1) // 2
        if plan_for(mid * CTX_PAD)[1] is None:
            low = mid
        else:
            high = mid - 1
    largest = low * CTX_PAD
    where = "the GPU budget" if short.device == GPU else "the available RAM"
    raise PlanError(
        f"--ctx {ctx} with --parallel {parallel} does not fit in {where}: the {fmt_bytes(plan.memory.kv)} KV cache "
        f"and {fmt_bytes(plan.memory.state)} of Mamba state bring the {short.device} to {fmt_bytes(short.need)} "
        f"with headroom, more than its {fmt_bytes(short.have)}. The largest --ctx that fits with "
        f"--parallel {parallel} is {largest}" + (" (or use fewer --parallel sequences)" if parallel > 1 else ""))


def check_kv_type(kv_type: str) -> None:
    if kv_type not in KV_TYPES:
        raise UsageError(f"--kv-type {kv_type!r} is not a KV cache type: use one of {', '.join(KV_TYPES)}")


def trained_context(gguf: GGUFFile) -> int:
    """The model's trained context length per sequence ({arch}.context_length); 0 when the file does not say."""
    return int(gguf.metadata.get(f"{gguf.architecture}.context_length", 0) or 0)


def plan_auto(gguf: GGUFFile, *, need: int, room: bool = False, **kwargs: Any) -> Plan:
    """`--ctx auto`: the plan for a context of `need` tokens per sequence (prompt plus generation).

    With `room` (chat, serve: prompts not known yet) the context grows up to AUTO_ROOM tokens while it fits.
    Never beyond the model's trained length. Raises PlanError with the arithmetic when `need` cannot fit:
    tokens needed, memory needed and available, and how far a q8_0 KV cache would get.
    `kwargs` are plan_placement's.
    """
    trained = trained_context(gguf) or MAX_N_CTX
    if need > trained:
        raise PlanError(f"this needs a context of {need} tokens (prompt and --max-tokens), more than the "
                        f"model's trained context of {trained}: shorten the input")
    target = max(need, min(AUTO_ROOM, trained)) if room else need
    target = min(max(target, CTX_PAD), trained)
    if _fits(gguf, target, kwargs):
        return plan_placement(gguf, ctx=target, **kwargs)
    try:
        plan_placement(gguf, ctx=need, **kwargs)
    except PlanError as exc:
        raise _auto_refusal(gguf, need, exc, kwargs) from None
    # The need fits but not all the room to grow: the largest context between the two.
    low, high = need, target
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if _fits(gguf, mid, kwargs) else (low, mid - 1)
    return plan_placement(gguf, ctx=low, **kwargs)


def _fits(gguf: GGUFFile, ctx: int, kwargs: dict[str, Any]) -> bool:
    try:
        plan_placement(gguf, ctx=ctx, **kwargs)
    except PlanError:
        return False
    return True


def _largest_fit(gguf: GGUFFile, upto: int, kwargs: dict[str, Any]) -> int:
    """The largest context (a multiple of 256, at most `upto`) that fits; 0 if none does."""
    low, high = 0, upto // CTX_PAD
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if _fits(gguf, mid * CTX_PAD, kwargs) else (low, mid - 1)
    return low * CTX_PAD


def _auto_refusal(gguf: GGUFFile, need: int, exc: PlanError, kwargs: dict[str, Any]) -> PlanError:
    """The refusal of `--ctx auto`, with the numbers: needed, available, and what --kv-type q8_0 would reach."""
    shape = ModelShape.from_gguf(gguf)
    kv_type = kwargs.get("kv_type", DEFAULT_KV_TYPE)
    parallel = kwargs.get("parallel", DEFAULT_PARALLEL)
    kv = context_memory(shape, need, parallel, kv_type=kv_type).kv
    trained = trained_context(gguf) or MAX_N_CTX
    largest = _largest_fit(gguf, trained, kwargs)
    text = (f"a context of {need} tokens (prompt and --max-tokens) does not fit: its {kv_type} KV cache alone is "
            f"{fmt_bytes(kv)} ({exc}). The largest context that fits is {largest} tokens")
    if kv_type == DEFAULT_KV_TYPE:
        q8 = _largest_fit(gguf, trained, {**kwargs, "kv_type": "q8_0"})
        text += f"; with --kv-type q8_0 it would be {q8}"
    return PlanError(text)


def context_room(gguf: GGUFFile, **kwargs: Any) -> dict[str, int]:
    """The context arithmetic `plan` shows: trained length, KV bytes per token, the largest context that fits
    (with the asked KV type and with q8_0). `kwargs` are plan_placement's, without ctx."""
    trained = trained_context(gguf) or MAX_N_CTX
    kv_type = kwargs.get("kv_type", DEFAULT_KV_TYPE)
    return {"trained": trained, "kv_bytes_per_token": ModelShape.from_gguf(gguf).kv_bytes(kv_type),
            "largest": _largest_fit(gguf, trained, kwargs),
            "largest_q8_0": _largest_fit(gguf, trained, {**kwargs, "kv_type": "q8_0"})}


def _check_args(ctx: int, parallel: int, n_cpu_moe: int | None, gpu_bytes: int, n_ubatch: int, n_batch: int,
                n_outputs_max: int | None) -> None:
    if ctx < 1:
        raise UsageError(f"--ctx must be at least 1 (got {ctx})")
    if not 1 <= parallel <= MAX_SEQ:
        raise UsageError(f"--parallel must be between 1 and {MAX_SEQ}, llama.cpp's limit (got {parallel})")
    if _pad(ctx * parallel) > MAX_N_CTX:
        raise UsageError(f"--ctx {ctx} × --parallel {parallel} is more tokens than llama.cpp can address "
                         f"(at most {MAX_N_CTX} in all)")
    if n_cpu_moe is not None and n_cpu_moe < 0:
        raise UsageError(f"--n-cpu-moe must be 0 or more (got {n_cpu_moe})")
    if gpu_bytes < 0:
        raise UsageError("the GPU memory budget cannot be negative")
    if n_ubatch < 1 or n_batch < 1 or (n_outputs_max is not None and n_outputs_max < 1):
        raise UsageError("batch sizes and n_outputs_max must be at least 1")


def _too_small(short: _Shortfall, plan: Plan) -> PlanError:
    parts = ", ".join(f"{name} {fmt_bytes(n)}" for name, n in short.parts.items() if n)
    if short.device == GPU:
        return PlanError(
            f"a GPU budget of {fmt_bytes(plan.gpu_budget)} is too small for the dense part of this model: with "
            f"--ctx {plan.ctx} and --parallel {plan.parallel} it needs a budget of at least {fmt_bytes(short.need)} "
            f"({parts}). Give it that much (--gpu-mem), or --gpu-mem 0 to run on the CPU only")
    return PlanError(
        f"not enough RAM: this plan needs {fmt_bytes(short.need)} of RAM ({parts}) and even the smallest context "
        f"does not fit in the {fmt_bytes(short.have)} available. Free some memory, offload more to a GPU, "
        "or use a smaller quantization")


def _plan(gguf: GGUFFile, shape: ModelShape, *, ctx: int, gpu_bytes: int, parallel: int, cpu_moe: bool,
          n_cpu_moe: int | None, overrides: tuple[tuple[str, str], ...], ram_bytes: int | None,
          gpu_available: bool, gpu_name: str | None, n_ubatch: int, n_batch: int,
          n_outputs_max: int | None, kv_type: str = DEFAULT_KV_TYPE) -> tuple[Plan, _Shortfall | None]:
    mem = context_memory(shape, ctx, parallel, n_ubatch=n_ubatch, n_batch=n_batch,
                         n_outputs_max=n_outputs_max or parallel, kv_type=kv_type)
    notes: list[str] = []
    why_cpu = None if gpu_available else "CPU-only build"
    if why_cpu is None and gpu_bytes == 0:
        why_cpu = "--gpu-mem 0"
    if why_cpu and any(device == GPU for _, device in overrides):
        notes.append("GPU overrides ignored: nothing goes to a GPU in this plan")
    if ctx > int(gguf.metadata.get(f"{gguf.architecture}.context_length", 0) or ctx):
        notes.append(f"--ctx {ctx} is beyond the model's trained context length")

    fixed = _fixed_devices(gguf, why_cpu, overrides, cpu_moe, n_cpu_moe)
    if why_cpu:
        placed = [TensorPlacement(t.name, tensor_class(t.name), t.nbytes, layer, CPU, why)
                  for t, layer, _, why in fixed]
        plan = Plan(str(gguf.path), gguf.architecture, CPU, why_cpu, 0, None, ram_bytes, ctx, parallel, mem,
                    tuple(placed), 0, mem.compute, 0, (), 0, tuple(notes))
        return plan, _check_ram(plan)

    # GPU: fixed tensors and context memory first, then whole layers' experts while they fit under the headroom.
    budget = gpu_bytes - headroom(gpu_bytes)
    base = sum(t.nbytes for t, _, device, _ in fixed if device == GPU) + mem.kv + mem.state + mem.compute
    flexible: dict[int, list[TensorInfo]] = {}
    for t, layer, device, _ in fixed:
        if device is None and layer is not None:
            flexible.setdefault(layer, []).append(t)
    cpu_experts = [t.nbytes for t, _, device, _ in fixed if device == CPU and _EXPERT.search(t.name)]
    copy = max(cpu_experts, default=0)
    if base + copy + sum(t.nbytes for group in flexible.values() for t in group) <= budget:
        gpu_layers = set(flexible)
    else:  # some experts stay on the CPU: keep room for the copy of one of them (op_offload)
        # Both lists may be empty (a dense model, or -ot pinning every expert to the GPU): then nothing is copied.
        copy = max(cpu_experts + [t.nbytes for group in flexible.values() for t in group], default=0)
        gpu_layers, used = set(), base + copy
        for layer in sorted(flexible):
            used += sum(t.nbytes for t in flexible[layer])
            if used > budget:
                break
            gpu_layers.add(layer)
    placed = []
    for t, layer, device, why in fixed:
        if device is None:
            device = GPU if layer in gpu_layers else CPU
            why = "expert layer fits the GPU" if device == GPU else "expert layer over the GPU budget"
        placed.append(TensorPlacement(t.name, tensor_class(t.name), t.nbytes, layer, device, why))
    cpu_layers = sorted(set(flexible) - gpu_layers)
    # Raw overrides first: llama.cpp takes the first pattern that matches, so theirs win.
    final = [*overrides]
    if cpu_moe:
        final.append((EXPERT_REGEX, CPU))
    elif n_cpu_moe:
        final.extend((rf"blk\.{il}" + EXPERT_REGEX, CPU) for il in range(min(n_cpu_moe, shape.n_layer)))
    if cpu_layers:
        final.append((expert_layers_regex(cpu_layers), CPU))
    any_cpu_expert = any(p.device == CPU and _EXPERT.search(p.name) for p in placed)
    plan = Plan(str(gguf.path), gguf.architecture, GPU, None, gpu_bytes, gpu_name, ram_bytes, ctx, parallel, mem,
                tuple(placed), mem.compute, mem.small_batch_compute(shape), copy if any_cpu_expert else 0,
                tuple(final), shape.n_layer + 1, tuple(notes))
    need = plan.need(GPU)
    if need > budget:
        enough = smallest_budget(need)
        return plan, _Shortfall(GPU, enough, gpu_bytes, {
            "dense weights": plan.weights(GPU), "KV cache and Mamba state": mem.kv + mem.state,
            "compute buffers": plan.compute_gpu + plan.expert_copy, "headroom": headroom(enough)})
    return plan, _check_ram(plan)


def _fixed_devices(gguf: GGUFFile, why_cpu: str | None, overrides: tuple[tuple[str, str], ...], cpu_moe: bool,
                   n_cpu_moe: int | None) -> list[tuple[TensorInfo, int | None, str | None, str]]:
    """Each tensor with its layer, its device where the rules fix it (None: the planner decides) and why."""
    compiled = [(re.compile(regex), device, regex) for regex, device in overrides]
    out = []
    for t in gguf.tensors:
        match = _LAYER.match(t.name)
        layer = int(match.group(1)) if match else None
        hit = next(((dev, regex) for pattern, dev, regex in compiled if pattern.search(t.name)), None)
        expert = bool(_EXPERT.search(t.name)) and layer is not None
        if why_cpu:
            device, why = CPU, why_cpu
        elif hit:
            device, why = hit[0], f"--override-tensor {hit[1]}"
        elif expert and cpu_moe:
            device, why = CPU, "--cpu-moe"
        elif expert and n_cpu_moe is not None and layer is not None and layer < n_cpu_moe:
            device, why = CPU, f"--n-cpu-moe {n_cpu_moe}"
        elif expert:
            device, why = None, "expert"
        elif _INPUT.match(t.name):
            device, why = CPU, "input layer (llama.cpp keeps it in host memory)"
        else:
            device, why = GPU, "dense"
        out.append((t, layer, device, why))
    return out


def _check_ram(plan: Plan) -> _Shortfall | None:
    if plan.ram_available is None:
        return None
    need = plan.need(CPU)
    if need + plan.headroom_cpu <= plan.ram_available:
        return None
    m = plan.memory
    in_ram = plan.kv_device == CPU
    return _Shortfall(CPU, need + plan.headroom_cpu, plan.ram_available, {
        "weights": plan.weights(CPU), "KV cache and Mamba state": (m.kv + m.state) if in_ram else 0,
        "compute and output buffers": plan.compute_cpu + m.output, "headroom": plan.headroom_cpu})


# -- several offload devices ----------------------------------------------------------------------------------------


def layer_devices(n_layer: int, n_gpu_layers: int, shares: Sequence[int]) -> list[int | None]:
    """The offload device of each layer and of the output layer (index n_layer); None: the CPU.

    llama.cpp's split (llama-model.cpp, split mode 'layer', no tensor_split): cumulative shares of the devices'
    free memory, normalised in float32, and layer `il` goes to the first device whose split point is above
    (il - i_gpu_start) / act_gpu_layers.
    """
    import numpy as np

    if not shares:
        return [None] * (n_layer + 1)
    points = np.cumsum(np.asarray(shares, dtype=np.float32), dtype=np.float32)
    points = (points / points[-1]).astype(np.float32)
    start = max(n_layer + 1 - n_gpu_layers, 0)
    active = min(n_gpu_layers, n_layer + 1)
    out: list[int | None] = []
    for il in range(n_layer + 1):
        if il < start or il - start >= active:
            out.append(None)
        else:
            out.append(int(np.searchsorted(points, np.float32((il - start) / active), side="right")))
    return out


@dataclass(frozen=True)
class DeviceShare:
    """What one of several offload devices holds under a plan: its layers, weights, KV cache and Mamba state."""

    index: int
    layers: tuple[int, ...]  # repeating layers (the output layer is n_layer)
    weights: int
    kv: int
    state: int


def split_by_device(plan: Plan, shape: ModelShape, shares: Sequence[int]) -> list[DeviceShare]:
    """The plan's offloaded part divided between devices as llama.cpp divides it (see `layer_devices`).

    Tensors an override sends to the GPU go to the first device, as `devices.tensor_buft_overrides` sends them.
    """
    where = layer_devices(shape.n_layer, plan.n_gpu_layers, shares)
    weights = [0] * len(shares)
    for t in plan.tensors:
        if t.device != GPU:
            continue
        device = 0 if t.why.startswith("--override-tensor") else where[shape.n_layer if t.layer is None else t.layer]
        weights[device or 0] += t.nbytes
    m = plan.memory
    per_recurrent = shape.state_bytes_per_seq // max(len(shape.recurrent_layers), 1) * max(1, m.n_seq_max)
    out = []
    for i in range(len(shares)):
        mine = tuple(il for il in range(shape.n_layer) if where[il] == i)
        kv = sum(m.n_ctx * shape.n_head_kv[il] * (shape.head_dim_k + shape.head_dim_v) * 2
                 for il in mine if il in shape.attention_layers)
        state = per_recurrent * sum(1 for il in mine if il in shape.recurrent_layers)
        out.append(DeviceShare(i, mine, weights[i], kv if plan.kv_device == GPU else 0,
                               state if plan.kv_device == GPU else 0))
    return out


__all__ = [
    "CPU", "DEFAULT_CTX", "DEFAULT_PARALLEL", "EXPERT_REGEX", "GPU", "ContextMemory", "DeviceShare", "ModelShape",
    "Plan", "PlanError", "TensorPlacement", "context_memory", "fmt_bytes", "layer_devices", "parse_override",
    "parse_size", "plan_placement", "smallest_budget", "split_by_device",
]
