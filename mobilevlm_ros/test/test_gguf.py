"""GGUF export: metadata, tensor names and layouts read back with gguf's own reader; quantization; `mobilevlm build`."""

import logging

import gguf
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mobilevlm_ros.choices import QUANTS
from mobilevlm_ros.cli import main
from mobilevlm_ros.errors import ConfigError
from mobilevlm_ros.export.gguf import QUANT_FILE_TYPES, build_llm_gguf, llm_gguf_artifact, write_gguf
from mobilevlm_ros.model.checkpoint import load_checkpoint
from tiny_checkpoint import TINY_LLAMA


def field_value(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


@pytest.fixture(scope="module")
def checkpoint(make_checkpoint):
    return load_checkpoint(make_checkpoint(dtype=torch.float32))


@pytest.fixture(scope="module")
def f32_reader(checkpoint, tmp_path_factory) -> gguf.GGUFReader:
    path = tmp_path_factory.mktemp("gguf") / "model-f32.gguf"
    write_gguf(checkpoint.model, checkpoint.tokenizer, path, "f32")
    return gguf.GGUFReader(str(path))


def test_llama_metadata(f32_reader, checkpoint):
    expected = {
        "general.architecture": "llama",
        "llama.context_length": TINY_LLAMA["max_position_embeddings"],
        "llama.embedding_length": 64,
        "llama.block_count": 2,
        "llama.feed_forward_length": 128,
        "llama.rope.dimension_count": 16,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 4,
        "llama.vocab_size": checkpoint.config.text_config.vocab_size,
        "general.file_type": 0,
    }
    assert {key: field_value(f32_reader, key) for key in expected} == expected
    assert field_value(f32_reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)
    assert field_value(f32_reader, "llama.rope.freq_base") == pytest.approx(10000.0)


def test_tokenizer_is_the_sentencepiece_vocabulary(f32_reader, checkpoint):
    sp = checkpoint.tokenizer.sp
    assert field_value(f32_reader, "tokenizer.ggml.model") == "llama"
    tokens = field_value(f32_reader, "tokenizer.ggml.tokens")
    types = field_value(f32_reader, "tokenizer.ggml.token_type")
    scores = field_value(f32_reader, "tokenizer.ggml.scores")
    assert tokens == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    assert scores == pytest.approx([sp.get_score(i) for i in range(sp.get_piece_size())])
    assert types[0] == gguf.TokenType.UNKNOWN and types[1] == types[2] == gguf.TokenType.CONTROL
    assert types[tokens.index("<0x0A>")] == gguf.TokenType.BYTE
    normal = next(i for i in range(sp.get_piece_size()) if not (sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i)))
    assert types[normal] == gguf.TokenType.NORMAL
    assert (field_value(f32_reader, "tokenizer.ggml.bos_token_id"), field_value(f32_reader, "tokenizer.ggml.eos_token_id"),
            field_value(f32_reader, "tokenizer.ggml.unknown_token_id")) == (1, 2, 0)
    assert field_value(f32_reader, "tokenizer.ggml.add_bos_token") is True
    assert field_value(f32_reader, "tokenizer.ggml.add_eos_token") is False


def test_tensor_names_shapes_and_rope_permutation(f32_reader, checkpoint):
    tensors = {tensor.name: tensor for tensor in f32_reader.tensors}
    per_block = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
    assert set(tensors) == {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{i}.{name}.weight" for i in range(2) for name in per_block
    }
    assert all(tensor.tensor_type == gguf.GGMLQuantizationType.F32 for tensor in tensors.values())

    def data(name: str) -> torch.Tensor:
        tensor = tensors[name]
        return torch.from_numpy(np.array(tensor.data)).reshape(list(reversed([int(n) for n in tensor.shape])))

    model = checkpoint.model
    layer = model.model.layers[1]
    assert torch.equal(data("token_embd.weight"), model.model.embed_tokens.weight)
    assert torch.equal(data("output.weight"), model.lm_head.weight)
    assert torch.equal(data("blk.1.attn_v.weight"), layer.self_attn.v_proj.weight)
    assert torch.equal(data("blk.1.ffn_down.weight"), layer.mlp.down_proj.weight)
    assert torch.equal(data("blk.1.ffn_norm.weight"), layer.post_attention_layernorm.weight)
    # Each head's rows interleave its two halves: row 2i is row i of the head, row 2i+1 is row i + head_dim/2.
    q, head_dim = layer.self_attn.q_proj.weight, 16
    permuted = data("blk.1.attn_q.weight")
    for head in range(4):
        rows = q[head * head_dim:(head + 1) * head_dim]
        assert torch.equal(permuted[head * head_dim:(head + 1) * head_dim:2], rows[: head_dim // 2])
        assert torch.equal(permuted[head * head_dim + 1:(head + 1) * head_dim:2], rows[head_dim // 2:])
    assert not torch.equal(data("blk.1.attn_k.weight"), layer.self_attn.k_proj.weight)


def test_f16_keeps_norms_in_f32(checkpoint, tmp_path):
    write_gguf(checkpoint.model, checkpoint.tokenizer, tmp_path / "model.gguf", "f16")
    reader = gguf.GGUFReader(str(tmp_path / "model.gguf"))
    types = {tensor.name: tensor.tensor_type.name for tensor in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == "F32"
    assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == types["output.weight"] == "F16"
    assert field_value(reader, "general.file_type") == 1


def test_vocabulary_is_padded_to_the_model(checkpoint, tmp_path):
    """Checkpoints whose embedding has more rows than the tokenizer has pieces get unused [PAD] tokens, as llama.cpp's converter does."""
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=400, **TINY_LLAMA))
    write_gguf(llm, checkpoint.tokenizer, tmp_path / "padded.gguf", "f16")
    reader = gguf.GGUFReader(str(tmp_path / "padded.gguf"))
    tokens = field_value(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == 400 and tokens[-1] == "[PAD399]"
    assert field_value(reader, "tokenizer.ggml.token_type")[-1] == gguf.TokenType.UNUSED


def test_k_quants_fall_back_per_tensor_on_tiny_rows(make_checkpoint, tmp_path, caplog):
    """64-wide rows are not a multiple of 256: llama.cpp quantizes those tensors to a 32-block type instead, and we say so."""
    with caplog.at_level(logging.WARNING):
        details = build_llm_gguf(make_checkpoint(), "q4_k_s", tmp_path / "model.gguf")
    assert "Q5_0" in details["tensor_types"] and "F32" in details["tensor_types"]
    assert any("fell back" in record.getMessage() for record in caplog.records)
    assert "Q8_0" in build_llm_gguf(make_checkpoint(), "q8_0", tmp_path / "q8.gguf")["tensor_types"]


def test_unknown_quant_is_refused(make_checkpoint, tmp_path):
    with pytest.raises(ConfigError, match=r"unknown GGUF quantization 'q3_k' \(expected q4_k_s, q4_k_m, q8_0, f16, f32\)"):
        llm_gguf_artifact(make_checkpoint(), "q3_k", tmp_path)
    assert tuple(QUANT_FILE_TYPES) == QUANTS


def test_build_command_prints_a_summary_and_caches(make_checkpoint, tmp_path, capsys):
    args = ["build", "--model", str(make_checkpoint()), "--llm", "gguf", "--quant", "q8_0", "f16", "--engines-dir", str(tmp_path)]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| artifact | size | build time | status | details |"
    assert len(lines) == 4 and "llm-gguf-q8_0-" in lines[2] and "| built |" in lines[2] and "llm-gguf-f16-" in lines[3]
    assert main(args) == 0
    assert capsys.readouterr().out.count("| cached |") == 2
