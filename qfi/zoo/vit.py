"""A Vision Transformer whose parameter names, shapes and order match torchvision's ``vit_b_16``.

Built from ``nn.MultiheadAttention(batch_first=True)`` like torchvision, so the QKV weights are one
parameter (``self_attention.in_proj_weight``) and ``out_proj`` is used without calling its forward:
faults must go through parameters, not module hooks.  No dropout anywhere.  A torchvision
``VisionTransformer`` state dict loads into the same shape with ``strict=True``.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

__all__ = ["EncoderBlock", "VisionTransformer", "vit_b_16_shaped", "vit_digits"]

_LN_EPS = 1e-6  # torchvision's ViT LayerNorm epsilon


class EncoderBlock(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(self, num_heads: int, hidden_dim: int, mlp_dim: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(hidden_dim, eps=_LN_EPS)
        self.self_attention = nn.MultiheadAttention(hidden_dim, num_heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(hidden_dim, eps=_LN_EPS)
        # Indices 0 and 3 as in torchvision's MLPBlock (Linear, GELU, Dropout, Linear, Dropout).
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("0", nn.Linear(hidden_dim, mlp_dim)),
                    ("1", nn.GELU()),
                    ("3", nn.Linear(mlp_dim, hidden_dim)),
                ]
            )
        )
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.normal_(m.bias, std=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        x = x + y
        return x + self.mlp(self.ln_2(x))


class Encoder(nn.Module):
    def __init__(
        self, seq_length: int, num_layers: int, num_heads: int, hidden_dim: int, mlp_dim: int
    ) -> None:
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, seq_length, hidden_dim).normal_(std=0.02))
        self.layers = nn.Sequential(
            OrderedDict(
                (f"encoder_layer_{i}", EncoderBlock(num_heads, hidden_dim, mlp_dim))
                for i in range(num_layers)
            )
        )
        self.ln = nn.LayerNorm(hidden_dim, eps=_LN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(self.layers(x + self.pos_embedding))


class VisionTransformer(nn.Module):
    """ViT as in torchvision: conv patchify, class token, learned positions, pre-LN encoder, linear head."""

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        num_layers: int,
        num_heads: int,
        hidden_dim: int,
        mlp_dim: int,
        num_classes: int = 10,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.image_size, self.patch_size, self.hidden_dim = image_size, patch_size, hidden_dim
        self.conv_proj = nn.Conv2d(in_channels, hidden_dim, kernel_size=patch_size, stride=patch_size)
        self.class_token = nn.Parameter(torch.zeros(1, 1, hidden_dim))
        seq_length = (image_size // patch_size) ** 2 + 1
        self.encoder = Encoder(seq_length, num_layers, num_heads, hidden_dim, mlp_dim)
        self.heads = nn.Sequential(OrderedDict([("head", nn.Linear(hidden_dim, num_classes))]))
        # torchvision's initialisation (its head is zero-initialised: a fresh model predicts one class).
        fan_in = in_channels * patch_size * patch_size
        nn.init.trunc_normal_(self.conv_proj.weight, std=math.sqrt(1 / fan_in))
        nn.init.zeros_(self.conv_proj.bias)
        nn.init.zeros_(self.heads.head.weight)
        nn.init.zeros_(self.heads.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        x = self.conv_proj(x).flatten(2).transpose(1, 2)  # (N, patches, D)
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1)
        return self.heads(self.encoder(x)[:, 0])


def vit_b_16_shaped(num_classes: int = 1000) -> VisionTransformer:
    """ViT-B/16 (224 px, 12 layers, 12 heads, dim 768, MLP 3072), random init: 86,567,656 parameters."""
    return VisionTransformer(224, 16, 12, 12, 768, 3072, num_classes=num_classes)


VIT_DIGITS_CONFIG = dict(
    image_size=8,
    patch_size=2,
    num_layers=3,
    num_heads=4,
    hidden_dim=48,
    mlp_dim=96,
    num_classes=10,
    in_channels=1,
)


def vit_digits() -> VisionTransformer:
    """The small digits ViT (8x8x1 images, patch 2, dim 48, 3 layers, 4 heads, MLP 96), untrained."""
    return VisionTransformer(**VIT_DIGITS_CONFIG)
