"""Writes a GGUF file whose tensor data arrives in pieces. Knows nothing of Hugging Face.

gguf-py's `GGUFWriter` lays out the header, metadata and tensor table (its public API, used here),
but takes each tensor's data as one whole array: a stacked expert tensor of the real model is
1.3 GB in BF16. This class appends the data section itself, a piece at a time, at the offsets the
table promised (each tensor aligned to `general.alignment`), and refuses anything out of order.
The file is written under a unique temporary name beside it (two writers never share one) and
renamed only once complete.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import BinaryIO

import gguf
import numpy as np

from cascade_local.errors import ConversionError
from cascade_local.output_lock import temp_file

from .writeback import Writeback


def tensor_nbytes(shape: Sequence[int], qtype: gguf.GGMLQuantizationType) -> int:
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if shape[-1] % block_size:
        raise ValueError(f"row width {shape[-1]} is not a multiple of {qtype.name}'s block size {block_size}")
    n = 1
    for d in shape:
        n *= d
    return n // block_size * type_size


@dataclass(frozen=True)
class TensorSlot:
    name: str
    shape: tuple[int, ...]  # numpy order, outermost first
    qtype: gguf.GGMLQuantizationType
    nbytes: int


class _State(Enum):
    DECLARING = 1
    WRITING = 2
    DONE = 3
    FAILED = 4


class GGUFStreamWriter:
    """declare() every tensor, begin(), then write() each tensor's bytes in order, then finish()."""

    def __init__(self, path: Path, arch: str):
        self.path = Path(path)
        self.tmp_path: Path | None = None  # made unique in begin()
        self.meta = gguf.GGUFWriter(None, arch)  # metadata builder: add_* helpers, key names per arch
        self.slots: list[TensorSlot] = []
        self._state = _State.DECLARING
        self._fh: BinaryIO | None = None
        self._current = 0
        self._written_in_current = 0
        self.bytes_written = 0
        self._writeback = Writeback()

    @property
    def alignment(self) -> int:
        return self.meta.data_alignment

    def declare(self, name: str, shape: Sequence[int], qtype: gguf.GGMLQuantizationType) -> TensorSlot:
        self._expect(_State.DECLARING, "declare")
        slot = TensorSlot(name, tuple(int(d) for d in shape), qtype, tensor_nbytes(shape, qtype))
        self.meta.add_tensor_info(name, slot.shape, np.dtype(np.float32), slot.nbytes, raw_dtype=qtype)
        self.slots.append(slot)
        return slot

    def begin(self) -> None:
        """Writes header, metadata and tensor table to the temporary file."""
        self._expect(_State.DECLARING, "begin")
        self._state = _State.FAILED  # until proven otherwise
        self.tmp_path = temp_file(self.path)
        self.meta.write_header_to_file(self.tmp_path)
        self.meta.write_kv_data_to_file()
        self.meta.write_ti_data_to_file()
        self.meta.close()
        # Not append mode: copy_file_range refuses a destination opened with O_APPEND.
        self._fh = open(self.tmp_path, "r+b")  # noqa: SIM115 - closed in finish()/abort()
        self._fh.seek(0, os.SEEK_END)
        self._pad()
        self._state = _State.WRITING
        self._skip_empty()

    def write(self, data: np.ndarray | bytes | memoryview) -> None:
        """Append the next bytes of the current tensor; pieces must not cross into the next tensor."""
        self._expect(_State.WRITING, "write")
        buf = np.ascontiguousarray(data).data.cast("B") if isinstance(data, np.ndarray) else memoryview(data)
        self._check_room(len(buf))
        self._file().write(buf)
        self._advance(len(buf))

    def copy_range(self, fd: int, offset: int, length: int) -> None:
        """Like `write`, with the bytes at `offset` of open file `fd`: copied by the kernel, never mapped here.

        A BF16 checkpoint's bytes pass through unchanged; copy_file_range moves them from page cache to page
        cache without faulting them into this process and copying them again through a write().
        """
        self._expect(_State.WRITING, "write")
        self._check_room(length)
        fh = self._file()
        fh.flush()
        done = 0
        while done < length:
            try:
                n = os.copy_file_range(fd, fh.fileno(), length - done, offset + done)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                n = fh.write(os.pread(fd, min(length - done, 1 << 24), offset + done))
                fh.flush()
            if n == 0:
                raise ConversionError("a checkpoint shard ended early: was it truncated during the conversion?")
            done += n
        fh.seek(0, os.SEEK_END)  # the kernel moved the descriptor's position; the buffered file must follow
        self._advance(length)

    def _check_room(self, n_bytes: int) -> None:
        if self._current >= len(self.slots):
            raise ConversionError("internal error: more tensor data than declared")
        slot = self.slots[self._current]
        if self._written_in_current + n_bytes > slot.nbytes:
            raise ConversionError(f"internal error: {slot.name} received more than its {slot.nbytes} bytes")

    def _advance(self, n_bytes: int) -> None:
        fh = self._file()
        fh.flush()  # at most one piece (tens of MB) waits in the buffer; the kernel sees it at once
        self._writeback.written(fh.fileno(), fh.tell())
        slot = self.slots[self._current]
        self._written_in_current += n_bytes
        self.bytes_written += n_bytes
        if self._written_in_current == slot.nbytes:
            self._pad()
            self._current += 1
            self._written_in_current = 0
            self._skip_empty()

    def finish(self) -> None:
        """Flush to disk and move the file to its final name."""
        self._expect(_State.WRITING, "finish")
        if self._current != len(self.slots):
            raise ConversionError(f"internal error: tensor {self.slots[self._current].name} was never written")
        fh = self._file()
        fh.flush()
        os.fsync(fh.fileno())
        fh.close()
        assert self.tmp_path is not None
        os.replace(self.tmp_path, self.path)
        self._state = _State.DONE

    def abort(self) -> None:
        """Remove the partial file; safe to call in any state."""
        if self._fh is not None:
            with contextlib.suppress(OSError):
                self._fh.close()
        self.meta.close()
        if self._state is not _State.DONE and self.tmp_path is not None:
            self.tmp_path.unlink(missing_ok=True)
        self._state = _State.FAILED

    def _skip_empty(self) -> None:
        while self._current < len(self.slots) and self.slots[self._current].nbytes == 0:
            self._current += 1

    def _pad(self) -> None:
        fh = self._file()
        pad = -fh.tell() % self.alignment
        if pad:
            fh.write(b"\0" * pad)

    def _file(self) -> BinaryIO:
        if self._fh is None:
            raise ConversionError("internal error: the GGUF writer has no open file")
        return self._fh

    def _expect(self, state: _State, action: str) -> None:
        if self._state is not state:
            raise ConversionError(f"internal error: cannot {action} a GGUF writer in state {self._state.name}")
