"""The converted file, read back with gguf-py: names, shapes, metadata, and tensor bytes."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
from cascade_local.convert import Checkpoint
from cascade_local.convert.gguf_stream import GGUFStreamWriter

from cascade_local.errors import ConversionError
from cascade_local.ggml import quantize_rows

ARCH = gguf.MODEL_ARCH.NEMOTRON_H_MOE
T = gguf.GGMLQuantizationType


def reader(path) -> gguf.GGUFReader:
    return gguf.GGUFReader(path)


def tensors(path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in reader(path).tensors}


def valid_names(n_layers: int) -> set[str]:
    names = set()
    for kind in gguf.MODEL_TENSORS[ARCH]:
        template = gguf.TENSOR_NAMES[kind]
        for bid in range(n_layers):
            base = template.format(bid=bid)
            names |= {base, base + ".weight", base + ".bias"}
    return names


def test_every_tensor_is_one_llama_cpp_knows(tiny_gguf, tiny_dir):
    cfg = json.loads((tiny_dir / "config.json").read_text())
    names = set(tensors(tiny_gguf("bf16")))
    assert names <= valid_names(cfg["num_hidden_layers"])
    assert len(names) == 40


def test_metadata_matches_config(tiny_gguf, tiny_dir):
    cfg = json.loads((tiny_dir / "config.json").read_text())
    fields = {k: f.contents() for k, f in reader(tiny_gguf("bf16")).fields.items()}
    a = "nemotron_h_moe"
    assert fields["general.architecture"] == a
    assert fields[f"{a}.block_count"] == 5
    assert fields[f"{a}.embedding_length"] == cfg["hidden_size"]
    assert fields[f"{a}.feed_forward_length"] == [0, 64, 0, 0, 64]
    assert fields[f"{a}.attention.head_count_kv"] == [0, 0, 0, 2, 0]
    assert fields[f"{a}.expert_count"] == 8 and fields[f"{a}.expert_used_count"] == 2
    assert fields[f"{a}.expert_shared_feed_forward_length"] == 96
    assert fields[f"{a}.expert_weights_scale"] == pytest.approx(2.5)
    assert fields[f"{a}.expert_weights_norm"] is True
    assert fields[f"{a}.ssm.inner_size"] == 128 and fields[f"{a}.ssm.group_count"] == 2
    assert fields[f"{a}.ssm.time_step_rank"] == 8 and fields[f"{a}.ssm.state_size"] == 16
    assert fields["tokenizer.ggml.pre"] == "tekken"
    assert fields["tokenizer.ggml.eos_token_id"] == 11  # <|im_end|>, from tokenizer_config.json
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_BF16
    assert fields["cascade_local.converter_version"]
    assert len(fields["tokenizer.ggml.tokens"]) == cfg["vocab_size"]


def test_bf16_passes_checkpoint_bytes_through_and_stacks_experts_in_order(tiny_gguf, tiny_dir):
    got = tensors(tiny_gguf("bf16"))
    ckpt = Checkpoint(tiny_dir)
    up = np.asarray(got["blk.1.ffn_up_exps.weight"].data)
    assert got["blk.1.ffn_up_exps.weight"].tensor_type == T.BF16
    for x in range(8):
        expected = ckpt.raw(f"backbone.layers.1.mixer.experts.{x}.up_proj.weight")
        assert np.array_equal(up[x].view(np.uint16), expected)
    emb = np.asarray(got["token_embd.weight"].data).view(np.uint16)
    assert np.array_equal(emb, ckpt.raw("backbone.embeddings.weight"))


def test_mamba_transforms(tiny_gguf, tiny_dir):
    got = tensors(tiny_gguf("bf16"))
    ckpt = Checkpoint(tiny_dir)
    a = np.asarray(got["blk.0.ssm_a"].data)
    assert a.shape == (8, 1) and got["blk.0.ssm_a"].tensor_type == T.F32
    np.testing.assert_allclose(a[:, 0], -np.exp(ckpt.f32("backbone.layers.0.mixer.A_log")), rtol=1e-6)
    conv = np.asarray(got["blk.0.ssm_conv1d.weight"].data)
    assert conv.shape == (192, 4) and got["blk.0.ssm_conv1d.weight"].tensor_type == T.F32
    np.testing.assert_array_equal(conv, ckpt.f32("backbone.layers.0.mixer.conv1d.weight")[:, 0, :])
    norm = np.asarray(got["blk.0.ssm_norm.weight"].data)
    assert norm.shape == (2, 64)
    np.testing.assert_array_equal(norm.reshape(-1), ckpt.f32("backbone.layers.0.mixer.norm.weight"))
    router = got["blk.1.ffn_gate_inp.weight"]
    assert router.tensor_type == T.F32


def test_q8_0_is_bit_identical_to_reference_quantizer(tiny_gguf, tiny_dir):
    """Our Q8_0 bytes (ggml's own routine) equal gguf-py's reference quantizer, which llama.cpp tests
    bit for bit against libggml."""
    got = tensors(tiny_gguf("q8_0"))
    ckpt = Checkpoint(tiny_dir)
    for name, source in [("blk.0.ssm_in.weight", "backbone.layers.0.mixer.in_proj.weight"),
                         ("output.weight", "lm_head.weight")]:
        values = ckpt.f32(source)
        reference = gguf.quants.quantize(values, T.Q8_0)
        assert np.array_equal(np.asarray(got[name].data).reshape(-1), reference.reshape(-1)), name


def test_threaded_quantization_equals_single_thread():
    values = np.random.default_rng(0).standard_normal((257, 256), dtype=np.float32)
    for qtype in (T.Q8_0, T.Q4_0, T.Q5_0):
        one = quantize_rows(values, qtype, threads=1)
        two = quantize_rows(values, qtype, threads=2)
        assert np.array_equal(one, two)
        assert np.array_equal(one, gguf.quants.quantize(values, qtype).reshape(-1))


def test_stream_writer_refuses_out_of_order_calls(tmp_path):
    writer = GGUFStreamWriter(tmp_path / "x.gguf", "nemotron_h_moe")
    writer.declare("a", (2, 32), T.F32)
    with pytest.raises(ConversionError):
        writer.write(np.zeros(64, np.float32))  # before begin()
    writer.begin()
    with pytest.raises(ConversionError):
        writer.declare("b", (32,), T.F32)
    with pytest.raises(ConversionError):
        writer.write(np.zeros(65, np.float32))  # more than the tensor holds
    with pytest.raises(ConversionError):
        writer.finish()  # tensor never written
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_stream_writer_output_reads_back(tmp_path):
    writer = GGUFStreamWriter(tmp_path / "x.gguf", "nemotron_h_moe")
    writer.declare("a", (3, 32), T.F32)
    writer.declare("b", (5,), T.F16)
    writer.begin()
    a = np.arange(96, dtype=np.float32).reshape(3, 32)
    writer.write(a[:1])
    writer.write(a[1:])
    writer.write(np.arange(5, dtype=np.float16))
    writer.finish()
    back = tensors(tmp_path / "x.gguf")
    np.testing.assert_array_equal(np.asarray(back["a"].data), a)
    np.testing.assert_array_equal(np.asarray(back["b"].data), np.arange(5, dtype=np.float16))
    assert [p.name for p in tmp_path.iterdir()] == ["x.gguf"]
