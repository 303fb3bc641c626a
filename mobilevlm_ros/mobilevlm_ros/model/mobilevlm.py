"""MobileLLaMA with a CLIP vision tower and a projector: the module tree of an official MobileVLM checkpoint.

Upstream's MobileLlamaForCausalLM is a LlamaForCausalLM whose inner `model` also holds `vision_tower` and
`mm_projector`; keeping that tree makes every checkpoint key (`model.layers.*`, `model.mm_projector.*`,
`model.vision_tower.vision_tower.vision_model.*`, `lm_head.weight`) the name of a parameter here. Everything that
runs or compiles the vision step (the torch backend, ONNX export, the TensorRT build, the bench) goes through
`vision_path`, one object for the tower and the projector, instead of reaching into that tree.
"""

import torch
from torch import nn
from transformers import CLIPVisionConfig, LlamaForCausalLM

from mobilevlm_ros.model.config import MobileVLMConfig
from mobilevlm_ros.model.projector import build_projector
from mobilevlm_ros.model.prompt import IMAGE_TOKEN_INDEX
from mobilevlm_ros.model.vision import CLIPVisionTower


class VisionPath(nn.Module):
    """Tower, then projector: pixels [B, 3, S, S] -> image embeddings [B, num_image_tokens, hidden] (144 for
    CLIP-L/336 with an LDP projector). It holds the model's own modules under the model's names, so moving or
    exporting it moves or exports those, and the checkpoint keys stay the model's."""

    def __init__(self, vision_tower: CLIPVisionTower, mm_projector: nn.Module):
        super().__init__()
        self.vision_tower = vision_tower
        self.mm_projector = mm_projector

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def image_size(self) -> int:
        return self.vision_tower.config.image_size

    def example_input(self, batch: int = 1) -> torch.Tensor:
        """Random pixels of the input shape, in the path's dtype and device (what tracing and engine builds need)."""
        size = self.image_size
        return torch.randn(batch, 3, size, size, dtype=self.dtype, device=self.device)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.mm_projector(self.vision_tower(pixel_values))


class MobileLlamaForCausalLM(LlamaForCausalLM):
    def __init__(self, config: MobileVLMConfig, vision_config: CLIPVisionConfig):
        super().__init__(config.text_config)
        self.mobilevlm_config = config
        self.model.vision_tower = CLIPVisionTower(vision_config, config.mm_vision_select_layer, config.mm_vision_select_feature)
        self.model.mm_projector = build_projector(config)

    @property
    def vision_path(self) -> VisionPath:
        return VisionPath(self.model.vision_tower, self.model.mm_projector)

    def release_vision_path(self) -> None:
        """Free the tower and projector once a compiled backend (ONNX graph, TensorRT engine) runs them: the language
        model never reads them, and keeping them would hold the vision weights twice (1.2 GB for CLIP ViT-L in fp32)."""
        del self.model.vision_tower, self.model.mm_projector

    def embed_with_images(self, input_ids: list[int], image_embeds: torch.Tensor) -> torch.Tensor:
        """Token embeddings [1, T, hidden] with the i-th IMAGE_TOKEN_INDEX replaced by `image_embeds[i]`."""
        placeholders = [position for position, token in enumerate(input_ids) if token == IMAGE_TOKEN_INDEX]
        if len(placeholders) != image_embeds.shape[0]:
            raise ValueError(f"{len(placeholders)} image placeholders for {image_embeds.shape[0]} images")
        embed_tokens = self.model.embed_tokens
        device = embed_tokens.weight.device
        pieces, start = [], 0
        for image, position in zip(image_embeds, placeholders, strict=True):
            pieces += [embed_tokens(torch.tensor(input_ids[start:position], dtype=torch.long, device=device)),
                       image.to(embed_tokens.weight.dtype)]
            start = position + 1
        pieces.append(embed_tokens(torch.tensor(input_ids[start:], dtype=torch.long, device=device)))
        return torch.cat(pieces).unsqueeze(0)
