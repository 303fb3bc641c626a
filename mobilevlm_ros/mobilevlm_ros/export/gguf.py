"""GGUF export of MobileLLaMA (the LlamaForCausalLM inside MobileVLM) for llama.cpp, and quantization by llama.cpp.

Only the language model goes to GGUF; the vision tower and projector stay in torch and hand their embeddings to
llama.cpp through `llama_batch.embd`. The writer is ours, on the `gguf` package; the layout follows what llama.cpp's
loader expects for the `llama` architecture (its convert_hf_to_gguf.py LlamaModel writes the same):

- tensors `token_embd`, `blk.N.{attn_norm,attn_q,attn_k,attn_v,attn_output,ffn_norm,ffn_gate,ffn_up,ffn_down}`,
  `output_norm`, `output`; norms stay F32 in every file type, matrices are F32 or F16;
- q_proj and k_proj rows are permuted per head: transformers rotates the two halves of a head (rotate_half) while
  llama.cpp's LLAMA rope rotates adjacent pairs, so each head's rows go from (half, i) order to (i, half) order;
- the tokenizer is the checkpoint's sentencepiece vocabulary (pieces, scores, types, `<0x..>` byte pieces as BYTE),
  padded with unused `[PAD<i>]` entries up to the model's vocab size.

Quantized files (Q8_0, Q4_K_S, Q4_K_M) come from llama.cpp's own `llama_model_quantize` run on an F16 file. Its
k-quants need rows that are a multiple of 256 values; llama.cpp falls back per tensor (Q4_K -> Q5_0, Q6_K -> Q8_0)
where they are not, as in tiny test models. The tensor types actually written are recorded in the artifact manifest.
"""

import ctypes
import logging
import tempfile
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gguf
import llama_cpp
import numpy as np
import torch
from transformers import LlamaForCausalLM

from mobilevlm_ros.choices import QUANTS, check_choice
from mobilevlm_ros.cpu import physical_cores
from mobilevlm_ros.errors import ArtifactError, ConfigError
from mobilevlm_ros.export.artifacts import Artifact, ArtifactKey, build_command, get_or_build, model_fingerprint
from mobilevlm_ros.ggml import init_llama_cpp
from mobilevlm_ros.model.checkpoint import load_checkpoint
from mobilevlm_ros.model.prompt import SentencePieceTokenizer

logger = logging.getLogger(__name__)

# Bump when the written file changes for the same checkpoint, so cached GGUFs are rebuilt.
EXPORT_VERSION = 1
QUANT_FILE_TYPES = {  # llama.cpp's file type of each of choices.QUANTS
    "q4_k_s": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_S,
    "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
    "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
    "f16": llama_cpp.LLAMA_FTYPE_MOSTLY_F16,
    "f32": llama_cpp.LLAMA_FTYPE_ALL_F32,
}


def write_gguf(
    llm: LlamaForCausalLM, tokenizer: SentencePieceTokenizer, path: str | Path, file_type: str = "f16", name: str = "MobileLLaMA"
) -> None:
    """Write `llm` with `tokenizer`'s vocabulary as an F32 or F16 GGUF, one tensor at a time (no second copy in memory)."""
    if file_type not in ("f32", "f16"):
        raise ValueError(f"write_gguf writes f32 or f16, not {file_type!r} (quantize the result)")
    config = llm.config
    _check_supported(config)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_context_length(getattr(config, "max_sequence_length", None) or config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(QUANT_FILE_TYPES[file_type])
    _add_vocabulary(writer, tokenizer, config.vocab_size)

    tensors = _gguf_tensors(llm)
    dtype = np.float32 if file_type == "f32" else np.float16
    for gguf_name, tensor, _ in tensors:
        tensor_dtype = np.float32 if tensor.ndim == 1 else dtype
        writer.add_tensor_info(gguf_name, tuple(tensor.shape), np.dtype(tensor_dtype), tensor.numel() * np.dtype(tensor_dtype).itemsize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, tensor, heads in tensors:
        array = _permute_rope_rows(tensor, heads) if heads else tensor
        writer.write_tensor_data(array.detach().to(torch.float32).numpy().astype(np.float32 if tensor.ndim == 1 else dtype))
    writer.close()


def _check_supported(config: Any) -> None:
    """Fail on LLaMA variants this writer does not express (MobileLLaMA is none of them)."""
    problems = []
    if config.attention_bias or config.mlp_bias:
        problems.append("attention or MLP biases")
    if (config.rope_parameters or {}).get("rope_type", "default") != "default":
        problems.append(f"rope scaling {config.rope_parameters['rope_type']!r}")
    if config.hidden_act != "silu":
        problems.append(f"activation {config.hidden_act!r}")
    if problems:
        raise ConfigError(f"GGUF export supports plain LLaMA only; this model has {', '.join(problems)}")


def _gguf_tensors(llm: LlamaForCausalLM) -> list[tuple[str, torch.Tensor, int]]:
    """(GGUF name, tensor, heads to permute rope rows by, 0 for none) in the order llama.cpp's converter writes them."""
    config, model = llm.config, llm.model
    tensors = [("token_embd.weight", model.embed_tokens.weight, 0)]
    for index, layer in enumerate(model.layers):
        attention, mlp, block = layer.self_attn, layer.mlp, f"blk.{index}."
        tensors += [
            (block + "attn_norm.weight", layer.input_layernorm.weight, 0),
            (block + "attn_q.weight", attention.q_proj.weight, config.num_attention_heads),
            (block + "attn_k.weight", attention.k_proj.weight, config.num_key_value_heads),
            (block + "attn_v.weight", attention.v_proj.weight, 0),
            (block + "attn_output.weight", attention.o_proj.weight, 0),
            (block + "ffn_norm.weight", layer.post_attention_layernorm.weight, 0),
            (block + "ffn_gate.weight", mlp.gate_proj.weight, 0),
            (block + "ffn_up.weight", mlp.up_proj.weight, 0),
            (block + "ffn_down.weight", mlp.down_proj.weight, 0),
        ]
    tensors += [("output_norm.weight", model.norm.weight, 0), ("output.weight", llm.lm_head.weight, 0)]
    return tensors


def _permute_rope_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head from transformers' (half, i) order to llama.cpp's interleaved (i, half) order."""
    rows, columns = weight.shape
    return weight.reshape(heads, 2, rows // heads // 2, columns).transpose(1, 2).reshape(rows, columns)


def _add_vocabulary(writer: gguf.GGUFWriter, tokenizer: SentencePieceTokenizer, vocab_size: int) -> None:
    sp = tokenizer.sp
    pieces = sp.get_piece_size()
    if pieces > vocab_size:
        raise ConfigError(f"{tokenizer.path}: {pieces} tokens but the model's vocab_size is {vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [gguf.TokenType.UNUSED] * vocab_size
    for i in range(pieces):
        tokens[i], scores[i] = sp.id_to_piece(i), sp.get_score(i)
        if sp.is_unknown(i):
            types[i] = gguf.TokenType.UNKNOWN
        elif sp.is_control(i):
            types[i] = gguf.TokenType.CONTROL
        elif sp.is_unused(i):
            types[i] = gguf.TokenType.UNUSED
        elif sp.is_byte(i):
            types[i] = gguf.TokenType.BYTE
        else:
            types[i] = gguf.TokenType.NORMAL
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    if sp.pad_id() >= 0:
        writer.add_pad_token_id(sp.pad_id())
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)


def quantize_gguf(source: str | Path, target: str | Path, quant: str, threads: int | None = None) -> None:
    """llama.cpp's `llama_model_quantize` from an F16/F32 GGUF to `quant` (its own per-tensor type choices)."""
    init_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_FILE_TYPES[quant]
    params.nthread = threads or physical_cores()
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)) != 0:
        raise ArtifactError(f"llama.cpp could not quantize {source} to {quant} (see the llama_cpp log)")


def tensor_types(path: str | Path) -> dict[str, int]:
    """How many tensors of each GGML type a GGUF file holds, e.g. {"Q4_K": 120, "Q5_0": 24, "F32": 49}."""
    return dict(sorted(Counter(tensor.tensor_type.name for tensor in gguf.GGUFReader(str(path)).tensors).items()))


def build_llm_gguf(model_dir: str | Path, quant: str, target: str | Path) -> Mapping[str, Any]:
    """Write the checkpoint's language model to `target` as `quant`; returns what the manifest records about it."""
    check_choice("GGUF quantization", quant, QUANTS)
    target = Path(target)
    # Official checkpoints are fp16: loading them as fp16 (not fp32) halves the memory and loses nothing.
    checkpoint = load_checkpoint(model_dir, dtype=torch.float32 if quant == "f32" else torch.float16)
    if not isinstance(checkpoint.tokenizer, SentencePieceTokenizer):
        raise ConfigError(f"{model_dir}: GGUF export needs the sentencepiece tokenizer.model (LLaMA's vocabulary)")
    name = Path(model_dir).resolve().name
    if quant in ("f32", "f16"):
        write_gguf(checkpoint.model, checkpoint.tokenizer, target, quant, name)
    else:
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".gguf-f16-") as scratch:
            f16 = Path(scratch) / "model-f16.gguf"
            write_gguf(checkpoint.model, checkpoint.tokenizer, f16, "f16", name)
            del checkpoint  # the torch weights are not needed while llama.cpp quantizes
            quantize_gguf(f16, target, quant)
    types = tensor_types(target)
    if quant.startswith("q4_k") and set(types) - {"Q4_K", "Q5_K", "Q6_K", "F32"}:
        logger.warning("%s: rows not a multiple of 256 for some tensors: llama.cpp fell back to %s", target.name, types)
    return {"tensor_types": types}


def llm_gguf_artifact(model_dir: str | Path, quant: str = "q4_k_s", engines_dir: str | Path | None = None,
                      build: bool | str = True) -> Artifact:
    """The checkpoint's language model as a GGUF in the artifact cache, built when missing or stale and `build` (the
    policy, see get_or_build) allows."""
    check_choice("GGUF quantization", quant, QUANTS)
    key = ArtifactKey(
        model_hash=model_fingerprint(model_dir),
        component="llm",
        precision=f"gguf-{quant}",
        runtime="llama-cpp-python",
        runtime_version=llama_cpp.__version__,
        device="any",  # a GGUF file runs on any llama.cpp backend
        suffix="gguf",
        extra={"export_version": EXPORT_VERSION},
    )
    command = build_command(model_dir, ["--llm", "gguf", "--quant", quant], engines_dir)
    return get_or_build(key, lambda path: build_llm_gguf(model_dir, quant, path), engines_dir, build, command=command)
