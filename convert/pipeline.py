"""The converter: a Hugging Face Nemotron-H MoE checkpoint in, one GGUF out, in a single streaming pass.

The pipeline is fixed: plan every tensor (all names, shapes and types checked before a byte is
written), write metadata and the tensor table, then stream each tensor's rows from the memory-mapped
shards through its transform and encoder into the file. Reading, encoding and writing overlap (a
read-ahead thread, the encoder's threads, a writer thread; see overlap.py), with a few blocks of rows
in memory at most.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import gguf
import numpy as np

from cascade_local.errors import ConversionError, UsageError
from cascade_local.output_lock import output_lock

from .checkpoint import Checkpoint
from .encode import BlockEncoder
from .gguf_stream import GGUFStreamWriter
from .imatrix import Imatrix, rows_for
from .metadata import ARCH, size_label, write_general, write_hparams, write_sampling_defaults
from .overlap import BlockWriter, ReadAhead
from .policy import FLOAT_TYPES
from .recipes import Recipe
from .tensor_map import TRANSFORMS, PlannedTensor, TensorClass, Transform, plan_tensors
from .tokenizer import write_tokenizer

# Rows are read and encoded in blocks of about this many source bytes: big enough to amortise the
# per-call overhead of the quantizer, small enough that memory stays flat whatever the model size.
BLOCK_BYTES = 32 * 1024 * 1024
# The read-ahead thread reads and maps this far ahead of the encoder (pages that count in this process's
# memory until their block is written and released), and this many encoded blocks may wait for the writer:
# the bounds that keep peak memory flat.
READ_AHEAD_BYTES = 4 * BLOCK_BYTES
WRITE_QUEUE_BLOCKS = 3


class ConversionProgress(Protocol):
    """`advance` reports source bytes once their block is written; it is called from the writer thread."""

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
            _stream_tensors(ckpt, planned, types, importance, writer, progress, threads)
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


@dataclass(frozen=True)
class _Block:
    """Rows [first, end) of one source matrix of one planned tensor: the unit read, encoded and written."""

    tensor: int  # index into the planned tensors
    matrix: int  # which source of the tensor (an expert, for stacked tensors)
    first: int
    end: int
    row_bytes: int  # source bytes per row, as stored
    last_of_source: bool

    @property
    def source_bytes(self) -> tuple[int, int]:
        return self.first * self.row_bytes, self.end * self.row_bytes


def _plan_blocks(ckpt: Checkpoint, planned: list[PlannedTensor]) -> list[_Block]:
    """Every tensor's rows cut into blocks of about BLOCK_BYTES, in file order."""
    blocks = []
    for index, tensor in enumerate(planned):
        for matrix, source in enumerate(tensor.sources):
            entry = ckpt.entry(source)
            width = tensor.shape[-1]
            n_rows = entry.n_elements // width if width else 0
            # A transformed tensor is encoded from its F32 values, so its blocks are counted in F32.
            itemsize = entry.nbytes // max(1, entry.n_elements) if tensor.transform is Transform.NONE else 4
            step = max(1, BLOCK_BYTES // max(1, width * itemsize))
            row_bytes = width * (entry.nbytes // max(1, entry.n_elements))
            starts = list(range(0, n_rows, step))
            for first in starts:
                end = min(first + step, n_rows)
                blocks.append(_Block(index, matrix, first, end, row_bytes, first == starts[-1]))
    return blocks


def _stream_tensors(
    ckpt: Checkpoint,
    planned: list[PlannedTensor],
    types: list[gguf.GGMLQuantizationType],
    importance: list[np.ndarray | None],
    writer: GGUFStreamWriter,
    progress: ConversionProgress,
    threads: int | None,
) -> None:
    """Read, encode and write every block, the three stages at once (see overlap.py)."""
    blocks = _plan_blocks(ckpt, planned)

    def source_of(block: _Block) -> str:
        return planned[block.tensor].sources[block.matrix]

    def read_ahead(i: int) -> None:
        ckpt.prefetch(source_of(blocks[i]), *blocks[i].source_bytes)

    def written(block: _Block) -> Callable[[], None]:
        def done() -> None:
            source = source_of(block)
            first_byte, end_byte = block.source_bytes
            progress.advance(end_byte - first_byte)
            # An embedding or output matrix is 0.7 GB by itself: drop its pages block by block.
            ckpt.release(source, first_byte, end_byte)
            if block.last_of_source:
                ckpt.release(source)
        return done

    def write(item: np.ndarray | tuple[int, int, int]) -> None:
        if isinstance(item, tuple):
            writer.copy_range(*item)
        else:
            writer.write(item)

    sizes = [b.source_bytes[1] - b.source_bytes[0] for b in blocks]
    rows: np.ndarray | None = None
    src_dtype = ""
    with (BlockEncoder(threads) as encoder,
          ReadAhead(read_ahead, sizes, READ_AHEAD_BYTES) as reader,
          BlockWriter(write, WRITE_QUEUE_BLOCKS) as block_writer):
        for block, size in zip(blocks, sizes, strict=True):
            tensor, source = planned[block.tensor], source_of(block)
            if block.first == 0:
                if block.matrix == 0:
                    progress.tensor(tensor.name)
                if tensor.transform is Transform.NONE:
                    raw, src_dtype = ckpt.raw(source), ckpt.entry(source).dtype
                else:
                    raw, src_dtype = TRANSFORMS[tensor.transform](ckpt.f32(source)), "F32"
                rows = raw.reshape(-1, tensor.shape[-1])
            assert rows is not None
            weights = importance[block.tensor]
            data: np.ndarray | tuple[int, int, int]
            if _passes_through(tensor, src_dtype, types[block.tensor]):
                data = ckpt.file_span(source, *block.source_bytes)  # the writer copies these bytes as they are
            else:
                data = encoder.encode(rows[block.first : block.end], src_dtype, types[block.tensor],
                                      weights[block.matrix] if weights is not None else None)
            reader.consumed(size)
            block_writer.put(data, written(block))
        block_writer.finish()


def _passes_through(tensor: PlannedTensor, src_dtype: str, qtype: gguf.GGMLQuantizationType) -> bool:
    """Whether the tensor's stored bytes are its GGUF bytes (BF16 to BF16, F16 to F16, F32 to F32)."""
    return tensor.transform is Transform.NONE and src_dtype == qtype.name and qtype.name in ("BF16", "F16", "F32")


def _disk_error(exc: OSError, out: Path) -> ConversionError:
    if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return ConversionError(f"ran out of disk space writing {out} ({exc.strerror}); nothing was left behind")
    return ConversionError(f"writing {out} failed: {exc.strerror or exc}; nothing was left behind")
