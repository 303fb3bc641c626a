"""MobileLLaMA with a CLIP vision tower and a projector: the module tree of an official MobileVLM checkpoint.

Upstream's MobileLlamaForCausalLM is a LlamaForCausalLM whose inner `model` also holds `vision_tower` and
`mm_projector`; keeping that tree makes every checkpoint key (`model.layers.*`, `model.mm_projector.*`,
`model.vision_tower.vision_tower.vision_model.*`, `lm_head.weight`) the name of a parameter here.
"""

import torch
from transformers import CLIPVisionConfig, LlamaForCausalLM

from mobilevlm_ros.model.config import MobileVLMConfig
from mobilevlm_ros.model.projector import build_projector
from mobilevlm_ros.model.prompt import IMAGE_TOKEN_INDEX
from mobilevlm_ros.model.vision import CLIPVisionTower


class MobileLlamaForCausalLM(LlamaForCausalLM):
    def __init__(self, config: MobileVLMConfig, vision_config: CLIPVisionConfig):
        super().__init__(config.text_config)
        self.mobilevlm_config = config
        self.model.vision_tower = CLIPVisionTower(vision_config, config.mm_vision_select_layer, config.mm_vision_select_feature)
        self.model.mm_projector = build_projector(config)

    @property
    def vision_tower(self) -> CLIPVisionTower:
        return self.model.vision_tower

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> image embeddings [B, num_image_tokens, hidden] (144 for CLIP-L/336 with an LDP projector)."""
        return self.model.mm_projector(self.model.vision_tower(pixel_values))

    def embed_with_images(self, input_ids: list[int], image_embeds: torch.Tensor) -> torch.Tensor:
        """Token embeddings [1, T, hidden] with the i-th IMAGE_TOKEN_INDEX replaced by `image_embeds[i]`."""
        placeholders = [position for position, token in enumerate(input_ids) if token == IMAGE_TOKEN_INDEX]
        if len(placeholders) != image_embeds.shape[0]:
            raise ValueError(f"{len(placeholders)} image placeholders for {image_embeds.shape[0]} images")
        embed_tokens = self.model.embed_tokens
        device = embed_tokens.weight.device
        pieces, start = [], 0
        for image, position in zip(image_embeds, placeholders):
            pieces += [embed_tokens(torch.tensor(input_ids[start:position], dtype=torch.long, device=device)), image.to(embed_tokens.weight.dtype)]
            start = position + 1
        pieces.append(embed_tokens(torch.tensor(input_ids[start:], dtype=torch.long, device=device)))
        return torch.cat(pieces).unsqueeze(0)
