"""A Hugging Face checkpoint folder: config, shard index and lazily mapped tensors. Knows nothing of GGUF."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cascade_local.errors import CheckpointError

from .hf_config import NemotronHConfig, load_config
from .safetensors_file import SafetensorsFile, TensorEntry, to_f32

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class Checkpoint:
    """Opens every shard's header up front (cheap) so a missing or corrupt shard fails before any output."""

    def __init__(self, folder: Path):
        folder = Path(folder)
        if not folder.is_dir():
            raise CheckpointError(f"{folder} is not a folder; give the checkpoint folder (with config.json)")
        self.folder = folder
        self.config: NemotronHConfig = load_config(folder)
        self._shards: dict[str, SafetensorsFile] = {}
        self._where: dict[str, str] = {}
        for shard_name, names in self._shard_layout().items():
            shard = SafetensorsFile(folder / shard_name)
            self._shards[shard_name] = shard
            for name in names if names is not None else shard.entries:
                if name not in shard.entries:
                    raise CheckpointError(f"{INDEX_NAME} places {name} in {shard_name}, but that shard lacks it")
                self._where[name] = shard_name

    def _shard_layout(self) -> dict[str, list[str] | None]:
        index_path = self.folder / INDEX_NAME
        if index_path.exists():
            try:
                weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
                raise CheckpointError(f"{index_path} is not a valid safetensors index") from None
            layout: dict[str, list[str] | None] = {}
            for name, shard_name in weight_map.items():
                if not isinstance(shard_name, str) or "/" in shard_name or shard_name.startswith("."):
                    raise CheckpointError(f"{INDEX_NAME} names an invalid shard {shard_name!r}")
                names = layout.setdefault(shard_name, [])
                assert names is not None
                names.append(name)
            return layout
        if (self.folder / SINGLE_NAME).exists():
            return {SINGLE_NAME: None}
        raise CheckpointError(f"{self.folder} has no {SINGLE_NAME} or {INDEX_NAME}")

    @property
    def tensor_names(self) -> list[str]:
        return list(self._where)

    @property
    def total_bytes(self) -> int:
        return sum(self.entry(n).nbytes for n in self._where)

    def has(self, name: str) -> bool:
        return name in self._where

    def entry(self, name: str) -> TensorEntry:
        return self._shards[self._shard_of(name)].entries[name]

    def _shard_of(self, name: str) -> str:
        try:
            return self._where[name]
        except KeyError:
            raise CheckpointError(f"the checkpoint lacks tensor {name}") from None

    def raw(self, name: str) -> np.ndarray:
        """Stored elements, memory-mapped (BF16 as uint16 bit patterns)."""
        return self._shards[self._shard_of(name)].raw(name)

    def f32(self, name: str) -> np.ndarray:
        return to_f32(self.raw(name), self.entry(name).dtype)

    def release(self, name: str, first_byte: int = 0, end_byte: int | None = None) -> None:
        self._shards[self._shard_of(name)].release(name, first_byte, end_byte)

    def file_span(self, name: str, first_byte: int = 0, end_byte: int | None = None) -> tuple[int, int, int]:
        return self._shards[self._shard_of(name)].file_span(name, first_byte, end_byte)

    def prefetch(self, name: str, first_byte: int = 0, end_byte: int | None = None) -> None:
        self._shards[self._shard_of(name)].prefetch(name, first_byte, end_byte)

    def close(self) -> None:
        for shard in self._shards.values():
            shard.close()
