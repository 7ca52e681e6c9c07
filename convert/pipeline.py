"""The converter: a Hugging Face Nemotron-H MoE checkpoint in, one GGUF out, in a single streaming pass.

The pipeline is fixed: plan every tensor (all names, shapes and types checked before a byte is
written), write metadata and the tensor table, then stream each tensor's rows from the memory-mapped
shards through its transform and encoder into the file. At most one block of rows is in memory.
"""

from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import gguf
import numpy as np

from cascade_local.errors import ConversionError, UsageError
from cascade_local.output_lock import output_lock

from .checkpoint import Checkpoint
from .encode import encode_rows
from .gguf_stream import GGUFStreamWriter
from .imatrix import Imatrix, rows_for
from .metadata import ARCH, size_label, write_general, write_hparams, write_sampling_defaults
from .policy import FLOAT_TYPES
from .recipes import Recipe
from .tensor_map import TRANSFORMS, PlannedTensor, TensorClass, Transform, plan_tensors
from .tokenizer import write_tokenizer

# Rows are read and encoded in blocks of about this many source bytes: big enough to amortise the
# per-call overhead of the quantizer, small enough that memory stays flat whatever the model size.
BLOCK_BYTES = 32 * 1024 * 1024


class ConversionProgress(Protocol):
    def start(self, total_bytes: int, n_tensors: int) -> None: ...
    def tensor(self, name: str) -> None: ...
    def advance(self, source_bytes: int) -> None: ...


class _NoProgress:
    def start(self, total_bytes: int, n_tensors: int) -> None:
        pass

    def tensor(self, name: str) -> None:
        pass

    def advance(self, source_bytes: int) -> None:
        pass


@dataclass(frozen=True)
class WrittenTensor:
    name: str
    cls: TensorClass
    qtype: gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    nbytes: int


@dataclass
class ConversionResult:
    path: Path
    policy: str
    tensors: list[WrittenTensor] = field(default_factory=list)
    source_bytes: int = 0
    file_bytes: int = 0
    seconds: float = 0.0

    @property
    def n_params(self) -> int:
        return sum(int(np.prod(t.shape)) for t in self.tensors)


def check_output(out: Path, force: bool) -> None:
    """Refuse before any work: an existing file without --force, a folder, an unwritable location."""
    if out.is_dir():
        raise UsageError(f"{out} is a folder; give a file name such as {out / 'model.gguf'}")
    if out.exists() and not force:
        raise UsageError(f"{out} already exists; pass --force to overwrite it")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"cannot write {out}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write {out}: folder {parent} is not writable")


def convert(
    src: Path,
    out: Path,
    recipe: Recipe,
    *,
    imatrix: Imatrix | None = None,
    force: bool = False,
    name: str | None = None,
    threads: int | None = None,
    progress: ConversionProgress | None = None,
) -> ConversionResult:
    """Convert checkpoint folder `src` to GGUF file `out` with tensor types chosen by `recipe`.

    `imatrix` (see `load_imatrix`) guides the quantizer for the types that use one. A second conversion to
    the same `out` waits for the first (saying so on stderr), then refuses or replaces its file as `force` says.
    """
    src, out = Path(src), Path(out)
    check_output(out, force)  # refuse at once what no waiting can fix
    with output_lock(out, f"conversion of {out}"):
        check_output(out, force)  # the job we waited for may have made it
        return _convert(src, out, recipe, imatrix=imatrix, name=name, threads=threads,
                        progress=progress or _NoProgress())


def _convert(src: Path, out: Path, recipe: Recipe, *, imatrix: Imatrix | None, name: str | None,
             threads: int | None, progress: ConversionProgress) -> ConversionResult:
    started = time.perf_counter()
    ckpt = Checkpoint(src)
    try:
        planned = plan_tensors(ckpt)
        policy = recipe.resolve(ckpt.config)
        types = [policy.type_for(t) for t in planned]
        importance = [_importance(imatrix, t, q) for t, q in zip(planned, types, strict=True)]
        writer = GGUFStreamWriter(out, ARCH)
        n_params = sum(t.n_elements for t in planned)
        n_expert_params = sum(t.n_elements for t in planned if t.stacked)
        # Only the folder's name: an absolute path would publish the user's directory layout in the file.
        write_general(writer.meta, name or src.resolve().name, src.resolve().name, policy.file_type,
                      policy.name, size_label(ckpt.config, n_params, n_expert_params))
        write_hparams(writer.meta, ckpt.config)
        write_sampling_defaults(writer.meta, src)
        write_tokenizer(writer.meta, src, ckpt.config.vocab_size)
        result = ConversionResult(out, policy.name)
        for tensor, qtype in zip(planned, types, strict=True):
            slot = writer.declare(tensor.name, tensor.shape, qtype)
            result.tensors.append(WrittenTensor(tensor.name, tensor.cls, qtype, tensor.shape, slot.nbytes))
        result.source_bytes = sum(ckpt.entry(s).nbytes for t in planned for s in t.sources)
        progress.start(result.source_bytes, len(planned))
        try:
            writer.begin()
            for tensor, qtype, rows in zip(planned, types, importance, strict=True):
                progress.tensor(tensor.name)
                _stream_tensor(ckpt, tensor, qtype, rows, writer, progress, threads)
            writer.finish()
        except BaseException as exc:
            writer.abort()
            if isinstance(exc, OSError):
                raise _disk_error(exc, out) from None
            raise
    finally:
        ckpt.close()
    result.file_bytes = out.stat().st_size
    result.seconds = time.perf_counter() - started
    return result


def _importance(imatrix: Imatrix | None, tensor: PlannedTensor, qtype: gguf.GGMLQuantizationType) -> np.ndarray | None:
    if qtype in FLOAT_TYPES:
        return None
    n_matrices = tensor.shape[0] if tensor.stacked else 1
    return rows_for(imatrix, tensor.name, n_matrices, tensor.row_width)


def _stream_tensor(
    ckpt: Checkpoint,
    tensor: PlannedTensor,
    qtype: gguf.GGMLQuantizationType,
    importance: np.ndarray | None,
    writer: GGUFStreamWriter,
    progress: ConversionProgress,
    threads: int | None,
) -> None:
    transform = TRANSFORMS[tensor.transform]
    per_source_shape = tensor.shape[1:] if tensor.stacked else tensor.shape
    for matrix, source in enumerate(tensor.sources):
        entry = ckpt.entry(source)
        weights = importance[matrix] if importance is not None else None
        if tensor.transform is Transform.NONE:
            raw, src_dtype = ckpt.raw(source), entry.dtype
        else:
            raw, src_dtype = transform(ckpt.f32(source)), "F32"
        rows = raw.reshape(-1, per_source_shape[-1])
        source_bytes_per_value = entry.nbytes // max(1, entry.n_elements)
        step = max(1, BLOCK_BYTES // max(1, rows.shape[1] * rows.itemsize))
        row_bytes = rows.shape[1] * source_bytes_per_value
        for first in range(0, rows.shape[0], step):
            block = rows[first : first + step]
            writer.write(encode_rows(block, src_dtype, qtype, threads, weights))
            progress.advance(block.size * source_bytes_per_value)
            # An embedding or output matrix is 0.7 GB by itself: drop its pages block by block.
            ckpt.release(source, first * row_bytes, (first + len(block)) * row_bytes)
        ckpt.release(source)


def _disk_error(exc: OSError, out: Path) -> ConversionError:
    if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return ConversionError(f"ran out of disk space writing {out} ({exc.strerror}); nothing was left behind")
    return ConversionError(f"writing {out} failed: {exc.strerror or exc}; nothing was left behind")
