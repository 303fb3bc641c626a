"""Vision projectors: CLIP patch features [B, N, mm_hidden] -> LLM input embeddings [B, M, hidden].

Module and attribute names mirror upstream's state-dict keys (`model.mm_projector.*`), so official weights load with
a plain strict `load_state_dict`. The LDP blocks are written out with plain torch layers instead of upstream's
torchvision/timm building blocks; the layer order and hyper-parameters are the same.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from mobilevlm_ros.model.config import MobileVLMConfig


def tokens_to_grid(x: torch.Tensor) -> torch.Tensor:
    """[B, N, C] row-major tokens -> [B, C, H, W] with H = W = sqrt(N)."""
    batch, num_tokens, channels = x.shape
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"projector needs a square token grid, got {num_tokens} tokens")
    return x.transpose(1, 2).reshape(batch, channels, side, side)


def grid_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H*W, C] row-major."""
    return x.flatten(2).transpose(1, 2)


def make_divisible(value: float, divisor: int = 8) -> int:
    """MobileNet's channel rounding (used for the squeeze-excitation width): nearest multiple, never below 90%."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a [B, C, H, W] map (timm's LayerNorm2d; eps 1e-5)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SqueezeExcitation(nn.Module):
    """Channel attention: global average -> fc1 -> ReLU -> fc2 -> hard sigmoid -> rescale the input."""

    def __init__(self, channels: int, squeeze_channels: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = F.adaptive_avg_pool2d(x, 1)
        scale = F.hardsigmoid(self.fc2(F.relu(self.fc1(scale))))
        return x * scale


class InvertedResidual(nn.Module):
    """MobileNetV3 block with expansion ratio 1 (so no expand conv): depthwise 3x3 -> SE -> pointwise 1x1.

    `block.0` = [depthwise conv, LayerNorm2d, Hardswish], `block.1` = SE, `block.2` = [pointwise conv, LayerNorm2d].
    The stride-1 block adds its input; the stride-2 block halves the grid and has no residual.
    """

    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.use_residual = stride == 1
        self.block = nn.Sequential(
            nn.Sequential(
                nn.Conv2d(channels, channels, 3, stride, 1, groups=channels, bias=False),
                LayerNorm2d(channels),
                nn.Hardswish(),
            ),
            SqueezeExcitation(channels, make_divisible(channels // 4)),
            nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False), LayerNorm2d(channels)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.use_residual else out


class LDPBlock(nn.Module):
    """MobileVLM v1's Lightweight Downsample Projector: MLP, then two inverted residuals (24x24 -> 12x12 grid)."""

    def __init__(self, in_features: int, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Identity(), nn.Linear(in_features, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size))
        self.mb_block = nn.Sequential(nn.Identity(), InvertedResidual(hidden_size, 1), InvertedResidual(hidden_size, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = tokens_to_grid(self.mlp(x))
        return grid_to_tokens(self.mb_block(x))


class LDPNetProjector(nn.Module):
    """`ldpnet*` (MobileVLM v1); keys `model.mm_projector.model.*`."""

    def __init__(self, in_features: int, hidden_size: int):
        super().__init__()
        self.model = LDPBlock(in_features, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class FeatureIRLayer(nn.Module):
    def __init__(self, in_features: int, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_features, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class TokenDownLayer(nn.Module):
    """Average-pools the token grid to a fixed 12x12 (upstream hard-codes it; from 24x24 it is a 2x2 average)."""

    def __init__(self, grid: tuple[int, int] = (12, 12)):
        super().__init__()
        self.dwn = nn.Sequential(nn.AdaptiveAvgPool2d(grid))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return grid_to_tokens(self.dwn(tokens_to_grid(x)))


class PosInjectLayer(nn.Module):
    """Positional encoding generator: depthwise 3x3 conv added to its input."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.peg = nn.Sequential(nn.Conv2d(hidden_size, hidden_size, 3, 1, 1, groups=hidden_size, bias=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = tokens_to_grid(x)
        return grid_to_tokens(self.peg(grid) + grid)


class LDPNetV2Projector(nn.Module):
    """`ldpnetv2*` (MobileVLM V2): MLP -> 12x12 average pool -> positional conv; keys `model.mm_projector.{mlp,peg}.*`."""

    def __init__(self, in_features: int, hidden_size: int):
        super().__init__()
        self.mlp = FeatureIRLayer(in_features, hidden_size)
        self.dwn = TokenDownLayer()
        self.peg = PosInjectLayer(hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.peg(self.dwn(self.mlp(x)))


def build_projector(config: MobileVLMConfig) -> nn.Module:
    """The projector named by `mm_projector_type`, tested in upstream's order (ldpnetv2 before ldpnet)."""
    in_features, hidden_size = config.mm_hidden_size, config.hidden_size
    projector_type = config.mm_projector_type
    if projector_type == "linear":
        return nn.Linear(in_features, hidden_size)
    if config.mlp_depth is not None:
        layers: list[nn.Module] = [nn.Linear(in_features, hidden_size)]
        for _ in range(config.mlp_depth - 1):
            layers += [nn.GELU(), nn.Linear(hidden_size, hidden_size)]
        return nn.Sequential(*layers)
    if projector_type.startswith("ldpnetv2"):
        return LDPNetV2Projector(in_features, hidden_size)
    if projector_type.startswith("ldpnet"):
        return LDPNetProjector(in_features, hidden_size)
    raise ValueError(f"unknown projector type {projector_type!r}")  # load_config rejects these first
