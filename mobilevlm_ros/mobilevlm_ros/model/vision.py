"""The CLIP vision tower: pixels -> patch features of the layer the config selects.

Official checkpoints store the tower under `model.vision_tower.vision_tower.vision_model.*`: upstream's
`CLIPVisionTower.vision_tower` was a transformers 4.x `CLIPVisionModel`, which kept its transformer under
`vision_model`. transformers 5 dropped that level, so `LegacyCLIPVisionModel` puts it back and the keys load as they are.
"""

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

# CLIP ViT-L/14 at 336 px, the tower of every MobileVLM: its CLIPVisionConfig fields.
CLIP_VIT_L_14_336 = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
    image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
)


class LegacyCLIPVisionModel(nn.Module):
    """transformers 4.x key layout (`vision_model.*`) around transformers 5's `CLIPVisionModel`."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.vision_model = CLIPVisionModel(config)


class CLIPVisionTower(nn.Module):
    """Runs CLIP only up to the selected hidden state (layer 22 of 24 for `mm_vision_select_layer: -2`).

    All encoder layers are kept so the stored weights load strictly; the ones past the selected state are never run.
    `select_layer` indexes the tower's hidden states like upstream's `hidden_states[select_layer]` (validated by the loader).
    """

    def __init__(self, config: CLIPVisionConfig, select_layer: int, select_feature: str):
        super().__init__()
        # hidden_states[0] is the embedding output, so hidden state k is the output of k layers.
        self.num_layers_run = select_layer % (config.num_hidden_layers + 1)
        self.select_feature = select_feature
        self.vision_tower = LegacyCLIPVisionModel(config)

    @property
    def config(self) -> CLIPVisionConfig:
        return self.vision_tower.vision_model.config

    @property
    def num_patches(self) -> int:
        return (self.config.image_size // self.config.patch_size) ** 2

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> [B, num_patches, width] (`patch`) or [B, 1 + num_patches, width] (`cls_patch`)."""
        clip = self.vision_tower.vision_model
        hidden_states = clip.pre_layrnorm(clip.embeddings(pixel_values))
        for layer in clip.encoder.layers[: self.num_layers_run]:
            hidden_states = layer(hidden_states, None)
        return hidden_states[:, 1:] if self.select_feature == "patch" else hidden_states
