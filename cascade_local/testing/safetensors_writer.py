"""Writes sharded safetensors checkpoints one tensor at a time, as `save_pretrained` lays them out.

Values come from a callback per tensor, so a multi-gigabyte checkpoint is written without ever
holding more than one tensor in memory (and without torch).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cascade_local.convert.safetensors_file import DTYPES, f32_to_bf16


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # "BF16" or "F32"
    shape: tuple[int, ...]
    fill: Callable[[], np.ndarray]  # returns float32 values of `shape`

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize


def _encode(spec: TensorSpec) -> np.ndarray:
    values = np.asarray(spec.fill(), dtype=np.float32)
    if values.shape != spec.shape:
        raise ValueError(f"{spec.name}: fill gave {values.shape}, expected {spec.shape}")
    return f32_to_bf16(values) if spec.dtype == "BF16" else values.astype(DTYPES[spec.dtype])


def _shard_groups(specs: Sequence[TensorSpec], shard_bytes: int, min_shards: int) -> list[list[TensorSpec]]:
    target = min(shard_bytes, max(1, sum(s.nbytes for s in specs) // max(1, min_shards) + 1))
    groups: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if groups[-1] and size + spec.nbytes > target:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += spec.nbytes
    return groups


def write_shards(
    folder: Path, specs: Sequence[TensorSpec], shard_bytes: int = 2 << 30, min_shards: int = 2
) -> list[Path]:
    """Write `model-0000i-of-0000n.safetensors` files plus `model.safetensors.index.json`."""
    folder.mkdir(parents=True, exist_ok=True)
    groups = _shard_groups(specs, shard_bytes, min_shards)
    weight_map: dict[str, str] = {}
    paths: list[Path] = []
    for i, group in enumerate(groups, 1):
        shard_name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for spec in group:
            header[spec.name] = {"dtype": spec.dtype, "shape": list(spec.shape),
                                 "data_offsets": [offset, offset + spec.nbytes]}
            offset += spec.nbytes
            weight_map[spec.name] = shard_name
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data block starts 8-byte aligned, as safetensors writes it
        path = folder / shard_name
        with open(path, "wb") as fh:
            fh.write(len(blob).to_bytes(8, "little"))
            fh.write(blob)
            for spec in group:
                fh.write(_encode(spec).tobytes())
        paths.append(path)
    total = sum(s.nbytes for s in specs)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return paths
