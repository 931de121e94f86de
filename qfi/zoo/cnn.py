"""A small two-convolution CNN for 8x8 single-channel digits (38,282 parameters, no dropout)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DigitsCNN", "cnn_digits"]


class DigitsCNN(nn.Module):
    """conv1 (3x3) -> ReLU -> conv2 (3x3) -> ReLU -> 2x2 max-pool -> fc1 -> ReLU -> fc2."""

    def __init__(
        self, in_channels: int = 1, channels: int = 16, hidden: int = 64, num_classes: int = 10
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3, padding=1)
        self.fc1 = nn.Linear(2 * channels * 4 * 4, hidden)  # 8x8 input pooled to 4x4
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


CNN_DIGITS_CONFIG = dict(in_channels=1, channels=16, hidden=64, num_classes=10)


def cnn_digits() -> DigitsCNN:
    """The digits CNN, untrained."""
    return DigitsCNN(**CNN_DIGITS_CONFIG)
