"""What the vision-graph tests share: input pixels, a cosine, and a vision path of real size with random weights."""

from pathlib import Path

import torch
from transformers import CLIPVisionConfig

from mobilevlm_ros.model.config import parse_config
from mobilevlm_ros.model.mobilevlm import MobileLlamaForCausalLM
from tiny_checkpoint import official_config

IMAGE_SIZE = 336  # CLIP ViT-L/14-336, and the tiny towers of tiny_checkpoint.py


def pixels(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two tensors of any shape, in float64 (the bounds tested reach 1 - 3e-6)."""
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def real_size_vision_model() -> MobileLlamaForCausalLM:
    """CLIP ViT-L/14-336 + LDPv2 at MobileVLM 1.7B width (2048) with random weights; a one-layer LLM keeps it light."""
    fields = official_config("ldpnetv2", 256, "openai/clip-vit-large-patch14-336") | {
        "hidden_size": 2048, "intermediate_size": 256, "num_hidden_layers": 1, "num_attention_heads": 16,
        "num_key_value_heads": 16, "mm_hidden_size": 1024,
    }
    config = parse_config(fields, Path("real-size/config.json"))
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=IMAGE_SIZE, patch_size=14, hidden_act="quick_gelu", projection_dim=768)
    torch.manual_seed(0)
    return MobileLlamaForCausalLM(config, vision).eval()
