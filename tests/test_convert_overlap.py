"""The converter's stages overlap (read-ahead, encoder, writer threads) without giving up a guarantee:
same bytes, bounded memory, errors raised once in the caller, no thread left running."""

from __future__ import annotations

import errno
import itertools
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
from cascade_local.convert import convert, pipeline, uniform_recipe
from cascade_local.convert.checkpoint import Checkpoint
from cascade_local.convert.encode import CHUNK_VALUES, BlockEncoder, encode_rows
from cascade_local.convert.gguf_stream import GGUFStreamWriter
from cascade_local.convert.overlap import BlockWriter, ReadAhead

from cascade_local.errors import ConversionError

T = gguf.GGMLQuantizationType
STAGE_THREADS = ("read-ahead", "block-writer", "encode")


def stage_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(STAGE_THREADS)]


def test_next_block_is_read_while_the_previous_one_is_written(tiny_dir, tmp_path, monkeypatch):
    """The regression: reading, encoding and writing took turns. Here the first write waits until the
    converter has gone on to the next source; done one after another, it never would."""
    writing, read_on = threading.Event(), threading.Event()
    read_during_write: list[bool] = []
    original_write, original_raw = GGUFStreamWriter.write, Checkpoint.raw

    def slow_write(self, data):
        if not writing.is_set():
            writing.set()
            read_during_write.append(read_on.wait(5))
        return original_write(self, data)

    def raw(self, name):
        if writing.is_set():
            read_on.set()
        return original_raw(self, name)

    monkeypatch.setattr(GGUFStreamWriter, "write", slow_write)
    monkeypatch.setattr(Checkpoint, "raw", raw)
    out = tmp_path / "o.gguf"
    convert(tiny_dir, out, uniform_recipe("q8_0"), threads=2)
    assert read_during_write == [True], "the next source was only read after the previous block was written"
    assert out.read_bytes()[:4] == b"GGUF"


def test_encoded_blocks_waiting_for_the_writer_are_bounded(tiny_dir, tmp_path, monkeypatch):
    """Memory stays flat: with a slow disk the encoder waits instead of piling up blocks."""
    counts = {"encoded": 0, "written": 0, "most_waiting": 0}
    lock = threading.Lock()
    original_encode, original_write = BlockEncoder.encode, GGUFStreamWriter.write

    def encode(self, *args, **kwargs):
        data = original_encode(self, *args, **kwargs)
        with lock:
            counts["encoded"] += 1
            counts["most_waiting"] = max(counts["most_waiting"], counts["encoded"] - counts["written"])
        return data

    def write(self, data):
        time.sleep(0.01)  # a slow disk
        original_write(self, data)
        with lock:
            counts["written"] += 1

    monkeypatch.setattr(BlockEncoder, "encode", encode)
    monkeypatch.setattr(GGUFStreamWriter, "write", write)
    convert(tiny_dir, tmp_path / "o.gguf", uniform_recipe("q8_0"), threads=2)
    # The queue, the block being written and the block being handed over.
    assert 2 <= counts["most_waiting"] <= pipeline.WRITE_QUEUE_BLOCKS + 2, counts
    assert counts["encoded"] == counts["written"]


@pytest.mark.parametrize("src_dtype", ["BF16", "F16", "F32"])
@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0, T.MXFP4, T.IQ4_NL, T.Q5_1])
def test_block_encoder_bytes_equal_whole_block_quantization(src_dtype, qtype):
    """Cache-sized pieces on several threads give the bytes of one whole-block quantization, for row counts
    and widths that do not divide the pieces, with and without an importance matrix."""
    rng = np.random.default_rng(3)
    for width in (2688, 96):
        n_rows = 3 * (CHUNK_VALUES // width) + 5
        values = rng.standard_normal((n_rows, width), dtype=np.float32)
        raw = {"BF16": (values.view(np.uint32) >> 16).astype(np.uint16), "F16": values.astype(np.float16),
               "F32": values}[src_dtype]
        importance = rng.uniform(0.1, 2.0, width).astype(np.float32)
        for weights in (None, importance):
            expected = encode_rows(raw, src_dtype, qtype, 1, weights)
            for threads in (1, 2, 3):
                with BlockEncoder(threads) as encoder:
                    got = encoder.encode(raw, src_dtype, qtype, weights)
                assert np.array_equal(got, expected), (width, threads, weights is not None)


def test_read_ahead_runs_ahead_within_its_window():
    sizes, window = [10] * 20, 30
    requested: list[tuple[int, int]] = []  # (range, bytes consumed when it was requested)
    consumed = 0
    three = threading.Event()

    def read(i):
        requested.append((i, consumed))
        if len(requested) == 3:
            three.set()

    with ReadAhead(read, sizes, window) as reader:
        assert three.wait(5), "nothing was read ahead of the encoder"
        for size in sizes:
            time.sleep(0.002)
            consumed += size
            reader.consumed(size)
        deadline = time.monotonic() + 5
        while len(requested) < len(sizes) and time.monotonic() < deadline:
            time.sleep(0.01)
    assert [i for i, _ in requested] == list(range(len(sizes)))
    for i, at in requested:
        assert sum(sizes[: i + 1]) <= at + window or i == 0, (i, at)


def test_block_writer_raises_a_failed_write_in_the_caller():
    written = []

    def write(data):
        if len(written) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(data)

    with pytest.raises(OSError) as failure, BlockWriter(write, depth=2) as writer:
        for i in range(100):
            writer.put(np.full(4, i), lambda: None)
        writer.finish()
    assert failure.value.errno == errno.ENOSPC
    assert len(written) == 2
    assert stage_threads() == []


def test_block_writer_stops_when_the_caller_fails():
    written = []
    release = threading.Event()

    def write(data):
        release.wait(5)
        written.append(data)

    with pytest.raises(KeyboardInterrupt), BlockWriter(write, depth=4) as writer:
        for i in range(4):
            writer.put(np.full(4, i), lambda: None)
        release.set()
        raise KeyboardInterrupt  # as Ctrl-C would, with blocks still queued
    assert len(written) <= 2  # the one being written, perhaps one more: not the whole queue
    assert stage_threads() == []


def test_failed_write_mid_conversion_leaves_no_file_and_no_thread(tiny_dir, tmp_path, monkeypatch):
    original_write = GGUFStreamWriter.write
    calls = []

    def write(self, data):
        calls.append(1)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        original_write(self, data)

    monkeypatch.setattr(GGUFStreamWriter, "write", write)
    with pytest.raises(ConversionError, match="ran out of disk space"):
        convert(tiny_dir, tmp_path / "o.gguf", uniform_recipe("q8_0"), threads=2)
    assert list(Path(tmp_path).iterdir()) == []
    assert stage_threads() == []


@pytest.mark.parametrize("kernel_copy", [True, False])
def test_copy_range_writes_the_file_bytes(tmp_path, monkeypatch, kernel_copy):
    """BF16 passes through by copy_file_range; where the kernel refuses (another filesystem), by pread."""
    if not kernel_copy:
        def refuse(*args):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        monkeypatch.setattr("os.copy_file_range", refuse)
    source = tmp_path / "shard.bin"
    payload = np.random.default_rng(5).integers(0, 256, 1000, dtype=np.uint8).tobytes()
    source.write_bytes(payload)
    writer = GGUFStreamWriter(tmp_path / "x.gguf", "nemotron_h_moe")
    writer.declare("a", (3, 32), T.F32)
    writer.declare("b", (2, 32), T.F32)
    writer.begin()
    with open(source, "rb") as fh:
        writer.copy_range(fh.fileno(), 100, 200)
        writer.copy_range(fh.fileno(), 300, 184)  # the rest of a, continuing where the first copy ended
        writer.write(np.arange(64, dtype=np.float32))
    writer.finish()
    got = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(tmp_path / "x.gguf").tensors}
    assert got["a"].tobytes() == payload[100:484]
    assert np.array_equal(got["b"].reshape(-1), np.arange(64, dtype=np.float32))


def test_copy_range_from_a_shard_that_ends_early_is_an_error(tmp_path):
    source = tmp_path / "shard.bin"
    source.write_bytes(b"\1" * 200)  # truncated under the converter: 184 bytes asked from offset 100
    writer = GGUFStreamWriter(tmp_path / "x.gguf", "nemotron_h_moe")
    writer.declare("a", (3, 32), T.F32)
    writer.begin()
    with open(source, "rb") as fh, pytest.raises(ConversionError, match="ended early"):
        writer.copy_range(fh.fileno(), 100, 384)
    writer.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard.bin"]


# A fresh process converts first (its encoder threads are the first to reach llama.cpp), then loads the result,
# which makes llama.cpp log through the callback those threads installed.
CONVERT_THEN_LOAD = """
import ctypes, sys, tempfile
from pathlib import Path
from cascade_local.convert import convert, uniform_recipe
assert "llama_cpp" not in sys.modules
with tempfile.TemporaryDirectory() as folder:
    out = Path(folder) / "tiny.gguf"
    convert(Path(sys.argv[1]), out, uniform_recipe("q8_0"), threads=4)
    import llama_cpp
    from cascade_local import llama_log
    from cascade_local.llama_model import LoadedModel
    held = llama_cpp.llama_log_callback()
    llama_cpp.llama_log_get(ctypes.byref(held), ctypes.byref(ctypes.c_void_p()))
    print(ctypes.cast(held, ctypes.c_void_p).value == ctypes.cast(llama_log._callback, ctypes.c_void_p).value)
    with LoadedModel(out):
        pass
    print(len(llama_log.RECENT) > 0)
"""


def test_a_process_that_converts_first_keeps_llama_cpps_log_callback_alive(tiny_dir):
    """The overlap was once reverted for this: encoder threads each installed a log callback, llama.cpp kept one
    that Python had collected, and the next log line crashed the process (a segfault in later tests)."""
    for _ in range(8):  # the race, where it existed, showed in about one process in six
        result = subprocess.run([sys.executable, "-c", CONVERT_THEN_LOAD, str(tiny_dir)], capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout.split() == ["True", "True"]


@pytest.mark.parametrize("type_name", ["q8_0", "mxfp4"])
def test_many_encoder_threads_give_the_bytes_of_one(tiny_dir, tmp_path, type_name):
    """More threads than cores, converting again and again: any thread reading or writing a buffer it does not
    own would show as a byte that differs from the one-thread file."""
    one = tmp_path / "one.gguf"
    convert(tiny_dir, one, uniform_recipe(type_name), threads=1)
    expected = one.read_bytes()
    for i in range(4):
        many = tmp_path / f"many{i}.gguf"
        convert(tiny_dir, many, uniform_recipe(type_name), threads=8)
        assert many.read_bytes() == expected
        many.unlink()


# -- the kernel advice: early writeback and mapped read-ahead -------------------------------------------------


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range and MADV_POPULATE_READ are Linux's")
def test_writeback_starts_each_window_once_with_a_call_the_kernel_accepts(tmp_path):
    """Every window of the growing file is handed to sync_file_range exactly once, in order, and the real call
    succeeds (a wrong ctypes binding would fail with EINVAL or write nothing)."""
    import ctypes

    from cascade_local.convert.writeback import Writeback

    window = 1 << 20
    writeback = Writeback(window)
    real = writeback._sync
    assert real is not None
    calls: list[tuple[int, int, int]] = []

    def spy(fd: int, offset: int, length: int, flags: int) -> int:
        rc = real(fd, offset, length, flags)
        calls.append((offset, length, rc if rc == 0 else -ctypes.get_errno()))
        return rc

    writeback._sync = spy
    with open(tmp_path / "out.bin", "wb") as fh:
        for _ in range(10):
            fh.write(b"\1" * (window // 2 + 1000))
            fh.flush()
            writeback.written(fh.fileno(), fh.tell())
        end = fh.tell()
    assert all(rc == 0 for _, _, rc in calls)
    covered = [(offset, offset + length) for offset, length, _ in calls]
    assert covered[0][0] == 0 and all(a[1] == b[0] for a, b in itertools.pairwise(covered))
    assert all(e - s >= window for s, e in covered) and end - covered[-1][1] < window


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_POPULATE_READ is Linux's")
def test_populate_maps_the_block_into_the_process_before_the_encoder_touches_it(tmp_path):
    """After the read-ahead thread's populate, the block's pages are in this process's mapping (its Rss in
    /proc/self/smaps), where a plain map of the same file has none until they are touched."""
    import mmap

    from cascade_local.convert.safetensors_file import _populate

    size = 16 << 20
    path = tmp_path / "shard.bin"
    path.write_bytes(np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8).tobytes())

    def mapped_kib(populate: bool) -> int:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            if populate:
                _populate(mapped, 4 << 20, 8 << 20)
            view = np.frombuffer(mapped, dtype=np.uint8)
            start = view.ctypes.data
            del view
            lines = Path("/proc/self/smaps").read_text().splitlines()
            at = next(i for i, line in enumerate(lines)
                      if re.match(r"[0-9a-f]+-[0-9a-f]+ ", line) and int(line.split("-", 1)[0], 16) == start)
            return next(int(line.split()[1]) for line in lines[at + 1 :] if line.startswith("Rss:"))

    assert mapped_kib(populate=False) == 0
    assert (8 << 10) <= mapped_kib(populate=True) <= (8 << 10) + 4096  # the range, give or take a large folio
