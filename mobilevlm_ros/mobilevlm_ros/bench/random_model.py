"""The bench's model: a checkpoint of MobileVLM 1.7B's or 3B's architecture with random weights, in the official
layout (model/writer.py), so the loader, the GGUF export and the sessions do the work they do for a real model."""

import logging
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from transformers import CLIPVisionConfig
from transformers.initialization import no_init_weights

from mobilevlm_ros.model.config import parse_config
from mobilevlm_ros.model.mobilevlm import MobileLlamaForCausalLM
from mobilevlm_ros.model.vision import CLIP_VIT_L_14_336
from mobilevlm_ros.model.writer import LLAMA, checkpoint_config, write_checkpoint, write_tokenizer

logger = logging.getLogger(__name__)

SIZES: dict[str, dict[str, Any]] = {
    # The architectures of MobileVLM 1.7B / 3B (CLIP ViT-L/14-336 + LDPv2 + MobileLLaMA 1.4B / 2.7B).
    "1.7b": dict(vision=CLIP_VIT_L_14_336, llm=dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
                                                    num_key_value_heads=16, vocab_size=32000, max_position_embeddings=2048)),
    "3b": dict(vision=CLIP_VIT_L_14_336, llm=dict(hidden_size=2560, intermediate_size=6912, num_hidden_layers=32, num_attention_heads=32,
                                                  num_key_value_heads=32, vocab_size=32000, max_position_embeddings=2048)),
    # A smoke-test size: the same machinery in seconds.
    "tiny": dict(vision=dict(CLIP_VIT_L_14_336, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4),
                 llm=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=4, vocab_size=512, max_position_embeddings=1024)),
}
CHECKPOINT_FORMAT = 1  # bump when the written bench checkpoint changes
TOWER_DIR = "vision_tower"  # holds only the tower's config: the weights are in the checkpoint, as MobileVLM V2 stores them


def write_random_checkpoint(directory: Path, size: str) -> Path:
    """A checkpoint of `size`'s architecture with random fp16 weights, written once and reused (seeded, so identical)."""
    if (directory / "config.json").is_file():
        return directory
    spec = SIZES[size]
    started = time.perf_counter()
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    config = checkpoint_config({**LLAMA, "tie_word_embeddings": False, **spec["llm"]}, TOWER_DIR, "ldpnetv2", spec["vision"]["hidden_size"])
    write_tokenizer(partial / "tokenizer.model", random_sentences(), spec["llm"]["vocab_size"])
    with torch.device("meta"), no_init_weights():
        skeleton = MobileLlamaForCausalLM(parse_config(config, partial / "config.json"), CLIPVisionConfig(**spec["vision"]))
    write_checkpoint(partial, config, spec["vision"], random_weights(skeleton.state_dict()))
    shutil.rmtree(directory, ignore_errors=True)
    partial.rename(directory)
    logger.info("wrote a random %s checkpoint to %s in %.0f s", size, directory, time.perf_counter() - started)
    return directory


def random_weights(shapes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fp16 tensors of the shapes of `shapes` (a meta state dict): norms scale by 1, biases start at 0, matrices are
    N(0, 0.02) from one seeded generator."""
    generator = torch.Generator().manual_seed(0)
    weights = {}
    for key, meta in shapes.items():
        if meta.ndim == 1:
            weights[key] = (torch.ones if "norm" in key and key.endswith("weight") else torch.zeros)(meta.shape, dtype=torch.float16)
        else:
            weights[key] = (torch.randn(meta.shape, generator=generator) * 0.02).to(torch.float16)
    return weights


def random_sentences() -> list[str]:
    """The tokenizer's corpus: generated words, on which sentencepiece reaches 32000 pieces in seconds, so the 1.7B/3B
    bench uses LLaMA's vocabulary size (smaller sizes get what the corpus gives)."""
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9))) for _ in range(60000)]
    return [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]
