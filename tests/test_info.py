"""`cascade-local info` and the GGUF reader under it: our files, llama.cpp's files, and damaged or hostile ones."""

from __future__ import annotations

import ctypes
import json
import re
import struct
import subprocess
import tempfile
import time
import tracemalloc
from collections import Counter
from pathlib import Path

import gguf
import pytest
from conftest import CLI, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cascade_local.errors import ModelLoadError, ModelNotFoundError
from cascade_local.gguf_info import read_gguf
from cascade_local.gguf_meta import read_metadata
from cascade_local.model_summary import CLASS_ORDER, tensor_class

ANSI = re.compile(r"\x1b\[")
T = gguf.GGMLQuantizationType
V = gguf.GGUFValueType


# -- a GGUF built by hand, to damage one field at a time --------------------------------------------------------


def s(text: str | bytes, order: str = "<") -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack(order + "Q", len(raw)) + raw


def kv(key: str, vtype: int, payload: bytes) -> bytes:
    return s(key) + struct.pack("<I", vtype) + payload


def kv_u32(key: str, value: int) -> bytes:
    return kv(key, V.UINT32, struct.pack("<I", value))


def tensor_info(name: str, dims: list[int], ttype: int = T.F32, offset: int = 0) -> bytes:
    return s(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ttype, offset)


def build(kvs: list[bytes] = (), infos: list[bytes] = (), data: bytes = b"", *, version: int = 3,
          n_tensors: int | None = None, n_kv: int | None = None, alignment: int = 32) -> bytes:
    """A GGUF file; the counts default to the real ones, so a test can make them lie."""
    head = b"GGUF" + struct.pack("<IQQ", version, len(infos) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(infos)
    return body + b"\0" * (-len(body) % alignment) + data


ARCH = kv("general.architecture", V.STRING, s("llama"))
ONE_TENSOR = tensor_info("token_embd.weight", [4, 2])
ONE_TENSOR_DATA = struct.pack("<8f", *range(8))
VALID = build([ARCH], [ONE_TENSOR], ONE_TENSOR_DATA)


def nested_array(depth: int) -> bytes:
    """An array nested `depth` deep around one uint8."""
    payload = struct.pack("<IQB", V.UINT8, 1, 7)
    for _ in range(depth - 1):
        payload = struct.pack("<IQ", V.ARRAY, 1) + payload
    return payload


HOSTILE: dict[str, tuple[bytes, str]] = {
    "empty": (b"", "is empty"),
    "not gguf": (b"PK\x03\x04" + b"\0" * 60, "not a GGUF file"),
    "version 1": (build(version=1), "version 1"),
    "version 7": (build(version=7), "GGUF version 7"),
    "tensor count 2**63-1": (build([ARCH], n_tensors=2**63 - 1), "tensor count 9223372036854775807 exceeds"),
    "kv count 2**63-1": (build([ARCH], n_kv=2**63 - 1), "key count 9223372036854775807 exceeds"),
    "kv count one too many": (build([ARCH], n_kv=2, alignment=1), "ends inside"),
    "string length 2**62": (b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, 2**62) + b"x" * 64, "claims 4611686018427387904"),
    "array count 2**60": (build([kv("a", V.ARRAY, struct.pack("<IQ", V.UINT32, 2**60))]), "claims 1152921504606846976"),
    "string array count 2**60": (build([kv("a", V.ARRAY, struct.pack("<IQ", V.STRING, 2**60))]), "items"),
    "array of unknown type": (build([kv("a", V.ARRAY, struct.pack("<IQ", 77, 1))]), "not a GGUF value type"),
    "unknown value type": (build([kv("a", 99, b"\0" * 8)]), "is 99, not a GGUF value type"),
    "arrays nested 3 deep": (build([kv("a", V.ARRAY, nested_array(3))]), "nests arrays"),
    "duplicate key": (build([ARCH, ARCH]), "appears twice"),
    "alignment not a power of two": (build([kv_u32("general.alignment", 24)]), "not a power of two"),
    "alignment as u64": (build([kv("general.alignment", V.UINT64, struct.pack("<Q", 32))]), "must be UINT32"),
    "n_dims 99": (build([ARCH], [s("t") + struct.pack("<I", 99) + b"\0" * 64]), "99 dimensions"),
    "zero dimension": (build([ARCH], [tensor_info("t", [4, 0])], ONE_TENSOR_DATA), "at least 1"),
    "element count overflow": (build([ARCH], [tensor_info("t", [2**40, 2**40])]), "overflows"),
    "tensor type 999": (build([ARCH], [tensor_info("t", [4, 2], ttype=999)], ONE_TENSOR_DATA), "type 999"),
    "row not a multiple of the block": (build([ARCH], [tensor_info("t", [5], ttype=T.Q8_0)], b"\0" * 64), "block"),
    "data beyond the end": (build([ARCH], [tensor_info("t", [1024, 1024])], ONE_TENSOR_DATA), "past the end"),
    "misaligned offset": (build([ARCH], [tensor_info("t", [2], offset=8)], ONE_TENSOR_DATA), "alignment"),
    "overlapping tensors": (build([ARCH], [tensor_info("a", [8]), tensor_info("b", [4])], ONE_TENSOR_DATA),
                            "overlaps"),
    "duplicate tensor": (build([ARCH], [tensor_info("a", [4]), tensor_info("a", [4], offset=32)], b"\0" * 64),
                         "appears twice"),
    "control characters in a name": (build([kv("a\n\x1b[31mb", 99, b"")]), r"a\n\x1b[31mb"),
}


@pytest.fixture
def write(tmp_path):
    def write(data: bytes, name: str = "model.gguf") -> Path:
        path = tmp_path / name
        path.write_bytes(data)
        return path

    return write


def test_the_hand_built_file_is_valid(write):
    g = read_gguf(write(VALID))
    assert g.architecture == "llama" and g.version == 3 and g.alignment == 32
    assert [(t.name, t.shape, t.numpy_shape, t.qtype, t.nbytes) for t in g.tensors] == [
        ("token_embd.weight", (4, 2), (2, 4), T.F32, 32)]
    assert g.tensors[0].offset == g.data_offset == g.file_size - 32


def test_arrays_nest_two_deep(write):
    g = read_gguf(write(build([kv("a", V.ARRAY, nested_array(2)), kv("b", V.ARRAY, nested_array(1))])))
    assert g.metadata == {"a": [[7]], "b": [7]} and g.tensors == []


def test_a_big_endian_file_reads_too(write):
    body = (b"GGUF" + struct.pack(">IQQ", 3, 1, 1) + s("general.architecture", ">") + struct.pack(">I", V.STRING)
            + s("llama", ">") + s("t", ">") + struct.pack(">IQIQ", 1, 4, T.F32, 0))
    g = read_gguf(write(body + b"\0" * (-len(body) % 32) + struct.pack(">4f", 1, 2, 3, 4)))
    assert g.big_endian and g.architecture == "llama" and g.tensors[0].shape == (4,)


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_file_is_refused_with_one_clear_line(write, case):
    data, expected = HOSTILE[case]
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        read_gguf(write(data))
    message = str(info.value)
    assert expected in message and "\n" not in message and "\x1b" not in message
    assert time.perf_counter() - start < 1


# The library test above covers every case; these are the ones the issue names, run as a user meets them.
CLI_CASES = ("empty", "not gguf", "version 7", "tensor count 2**63-1", "kv count 2**63-1", "string length 2**62",
             "array count 2**60", "n_dims 99", "data beyond the end", "tensor type 999", "control characters in a name")


def test_hostile_files_through_the_cli(tmp_path, q8_bytes):
    """Exit 2, one line on stderr starting 'error:', nothing on stdout, no traceback (runs side by side)."""
    files = {case: HOSTILE[case][0] for case in CLI_CASES} | {"truncated": q8_bytes[:5000]}
    paths = {}
    for i, (case, data) in enumerate(files.items()):
        paths[case] = tmp_path / f"hostile-{i}.gguf"
        paths[case].write_bytes(data)
    started = time.perf_counter()
    runs = {case: subprocess.Popen([*CLI, "info", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True) for case, path in paths.items()}
    for case, proc in runs.items():
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 2, (case, err)
        assert out == "" and "Traceback" not in err, case
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (case, err)
    assert time.perf_counter() - started < 30


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ModelNotFoundError):
        read_gguf(tmp_path / "nope.gguf")
    for target, said in ((tmp_path / "nope.gguf", "does not exist"), (tmp_path, "is a folder")):
        result = run_cli("info", str(target))
        assert result.returncode == 2 and result.stdout == ""
        assert result.stderr.startswith("error: ") and said in result.stderr and len(result.stderr.splitlines()) == 1


def test_help_has_an_example():
    result = run_cli("info", "--help")
    assert result.returncode == 0 and "Example: cascade-local info" in result.stdout


# -- truncation and fuzzing of a real file ----------------------------------------------------------------------


@pytest.fixture(scope="session")
def q8_bytes(tiny_gguf) -> bytes:
    return tiny_gguf("q8_0").read_bytes()


def test_every_truncation_is_refused(q8_bytes, tiny_gguf, write):
    g = read_gguf(tiny_gguf("q8_0"))
    header_cuts = range(0, g.data_offset, 211)
    data_cuts = [g.data_offset + 1, *(t.offset + t.nbytes // 2 for t in g.tensors[::7]), g.file_size - 1]
    for cut in [*header_cuts, *data_cuts]:
        with pytest.raises(ModelLoadError):
            read_gguf(write(q8_bytes[:cut]))


# Where to change bytes: the counts and version, the first 64 KB (keys, vocabulary, tokenizer.json), and the
# tensor table at the end of the header (negative: counted back from the start of the data section).
POSITION = st.one_of(st.integers(0, 63), st.integers(0, 64 * 1024 - 1), st.integers(-3000, -1))
MUTATIONS = st.lists(st.tuples(POSITION, st.integers(0, 255)), min_size=1, max_size=8)


@settings(deadline=2000, max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=MUTATIONS, cut=st.one_of(st.none(), st.integers(0, 900_000)))
def test_fuzzed_files_succeed_or_fail_cleanly(q8_bytes, tiny_gguf, mutations, cut):
    data_offset = read_gguf(tiny_gguf("q8_0")).data_offset
    data = bytearray(q8_bytes)
    for at, value in mutations:
        data[at if at >= 0 else data_offset + at] = value
    data = data if cut is None else data[:cut]
    with tempfile.NamedTemporaryFile(suffix=".gguf") as fh:
        fh.write(data)
        fh.flush()
        tracemalloc.start()
        try:
            read_gguf(fh.name)
        except ModelLoadError as exc:
            assert "\n" not in str(exc)
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
    assert peak < 8 * len(q8_bytes) + (1 << 20)  # bounded by the file, whatever the header claims


def test_a_big_vocabulary_header_reads_quickly(write):
    """A 131k-token vocabulary and a 20 MB tokenizer.json: the sizes of a real model's header."""
    n = 131072
    tokens = struct.pack("<IQ", V.STRING, n) + b"".join(s(f"tok{i}") for i in range(n))
    big = "x" * 20_000_000
    path = write(build([ARCH, kv("tokenizer.ggml.tokens", V.ARRAY, tokens),
                        kv("tokenizer.huggingface.json", V.STRING, s(big))], [ONE_TENSOR], ONE_TENSOR_DATA))
    start = time.perf_counter()
    meta = read_metadata(path)
    assert time.perf_counter() - start < 2
    assert len(meta["tokenizer.ggml.tokens"]) == n and meta["tokenizer.ggml.tokens"][-1] == f"tok{n - 1}"
    assert meta["tokenizer.huggingface.json"] == big


# -- equivalence with gguf-py, on trusted files -----------------------------------------------------------------


def reference(path: Path) -> tuple[dict, list]:
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = [(t.name, tuple(int(d) for d in t.shape), T(t.tensor_type), int(t.data_offset), int(t.n_bytes))
               for t in reader.tensors]
    return fields, tensors


@pytest.fixture(scope="session")
def llama_q4_k_m(tiny_gguf, tmp_path_factory) -> Path:
    """The tiny model quantized by llama.cpp's own quantizer, from our f16 file."""
    import llama_cpp

    from cascade_local.llama_log import quiet_llama

    quiet_llama()
    out = tmp_path_factory.mktemp("llama") / "tiny-Q4_K_M.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert llama_cpp.llama_model_quantize(str(tiny_gguf("f16")).encode(), str(out).encode(), ctypes.byref(params)) == 0
    return out


@pytest.mark.parametrize("source", ["f16", "bf16", "q8_0", "llama.cpp Q4_K_M"])
def test_same_header_as_gguf_py(tiny_gguf, llama_q4_k_m, source):
    path = llama_q4_k_m if source.startswith("llama") else tiny_gguf(source)
    fields, tensors = reference(path)
    g = read_gguf(path)
    assert g.metadata == fields
    assert [(t.name, t.shape, t.qtype, t.offset, t.nbytes) for t in g.tensors] == tensors
    assert read_metadata(path) == fields


def test_metadata_values_stay_whole(tiny_gguf):
    meta = read_metadata(tiny_gguf("q8_0"))
    assert len(meta["tokenizer.ggml.tokens"]) == 1024
    assert json.loads(meta["tokenizer.huggingface.json"])["model"]["type"] == "BPE"


# -- the summary ------------------------------------------------------------------------------------------------


def test_classes_agree_with_the_converter():
    from cascade_local.convert.tensor_map import EVERY_LAYER_ROWS, GLOBAL_ROWS, LAYER_ROWS, TensorClass

    assert {c.value for c in TensorClass} <= set(CLASS_ORDER)
    for row in (*GLOBAL_ROWS, *EVERY_LAYER_ROWS, *(r for rows in LAYER_ROWS.values() for r in rows)):
        assert tensor_class(row.target.format(bid=17)) == row.cls.value, row.target


@pytest.mark.parametrize(("name", "cls"), [
    ("blk.0.ffn_gate_exps.weight", "expert_up"), ("blk.0.ffn_gate_up_exps.weight", "expert_up"),
    ("blk.0.ffn_gate_shexp.weight", "shared_up"), ("blk.0.attn_qkv.weight", "attn_qkv"),
    ("blk.0.attn_q_norm.weight", "f32_only"), ("blk.0.ffn_norm.weight", "f32_only"),
    ("blk.0.ffn_up.weight", "dense_ffn"), ("blk.0.ffn_down.weight", "dense_ffn"), ("rope_freqs.weight", "other"),
])
def test_llama_style_names(name, cls):
    assert tensor_class(name) == cls


def info_json(*args: str) -> dict:
    result = run_cli("info", *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_info_on_our_q8_0(tiny_gguf):
    path = tiny_gguf("q8_0")
    _, tensors = reference(path)
    params = sum(int(t.n_elements) for t in gguf.GGUFReader(path).tensors)
    human = run_cli("info", str(path), env={"NO_COLOR": ""})  # a pipe alone must keep colour codes out
    assert human.returncode == 0 and human.stderr == "" and not ANSI.search(human.stdout)
    assert "nemotron_h_moe" in human.stdout and f"({params:,})" in human.stdout
    assert "[1024 strings]" in human.stdout and "<10504 chars>" in human.stdout

    data = info_json(str(path))
    assert data["architecture"] == "nemotron_h_moe" and data["params"] == params
    assert data["file_size"] == path.stat().st_size and data["tensor_bytes"] == sum(t[4] for t in tensors)
    classes = {c["class"]: c for c in data["classes"]}
    assert set(classes) == {"token_embd", "output", "expert_up", "expert_down", "shared_up", "shared_down",
                            "mamba_in", "mamba_out", "attn_qkv", "attn_out", "f32_only"}
    assert classes["expert_up"]["types"] == {"Q8_0": 2} and set(classes["f32_only"]["types"]) == {"F32"}
    for name, c in classes.items():
        assert c["bits_per_weight"] == (32.0 if name == "f32_only" else 8.5)
        assert f"{c['bits_per_weight']:.2f}" in human.stdout
    assert 8.5 < data["bits_per_weight"] < 9
    assert data["metadata"]["tokenizer.ggml.tokens"] == "[1024 strings]"
    assert data["tokenizer"]["tokens"] == 1024 and data["tokenizer"]["chat_template_chars"] == 10504
    assert "tensors" not in data


def test_info_on_a_llama_cpp_quantized_file(llama_q4_k_m):
    fields, tensors = reference(llama_q4_k_m)
    data = info_json(str(llama_q4_k_m), "--tensors")
    assert [(t["name"], t["type"]) for t in data["tensors"]] == [(name, qtype.name) for name, _, qtype, _, _ in tensors]
    assert data["types"] == dict(Counter(qtype.name for _, _, qtype, _, _ in tensors))
    assert data["metadata"]["general.file_type"] == fields["general.file_type"] == 15  # MOSTLY_Q4_K_M
    by_class: dict[str, Counter] = {}
    for name, _, qtype, _, _ in tensors:
        by_class.setdefault(tensor_class(name), Counter())[qtype.name] += 1
    assert {c["class"]: c["types"] for c in data["classes"]} == {k: dict(v) for k, v in by_class.items()}
    human = run_cli("info", str(llama_q4_k_m), "--tensors")
    assert human.returncode == 0 and "blk.4.ffn_down_exps.weight" in human.stdout


@pytest.mark.parametrize(("header", "expected"), [
    (build([kv("a", V.STRING, struct.pack("<Q", 900_000_000))], alignment=1), "more than the 268.4 MB any real"),
    (build([kv("a", V.ARRAY, struct.pack("<IQ", V.UINT8, 100_000_000))], alignment=1), "may hold at most"),
    (build([kv("a", V.ARRAY, struct.pack("<IQ", V.UINT64, 200_000_000))], alignment=1), "a GGUF header (at most"),
    (build([ARCH], n_tensors=10_000_000, alignment=1), "more than the 1048576 any real model has"),
], ids=["string", "items", "header", "tensors"])
def test_caps_hold_where_the_file_is_big_enough_to_pretend(write, header, expected):
    """A 2 GB (sparse) file could hold what these headers claim; the caps refuse them before any allocation."""
    path = write(header)
    with open(path, "r+b") as fh:
        fh.truncate(2 * 1024**3)
    tracemalloc.start()
    try:
        with pytest.raises(ModelLoadError, match=re.escape(expected)):
            read_gguf(path)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 4 << 20
