"""Cine (video) and LGE (2.5D) encoders over short-axis stacks."""

from __future__ import annotations

import torch
from opacus.layers import DPLSTM
from torch import nn

from ccmr_core.models.blocks import Conv2dBlock, R2Plus1D, SliceMixer


def _widths(width: int, depth: int = 4) -> list[int]:
    return [width * 2**i for i in range(depth)]


class CineEncoder(nn.Module):
    """(B, S, T, H, W) -> slice features (B, S, D) and a patient feature (B, D).

    Each slice is a video through (2+1)D blocks (spatial stride 2 each, temporal stride 2 in the
    last two), pooled over time and space; a slice mixer keeps base-to-apex position."""

    def __init__(self, slices: int, width: int = 16, dim: int = 128):
        super().__init__()
        layers, cin = [], 1
        for i, w in enumerate(_widths(width)):
            layers.append(R2Plus1D(cin, w, s_stride=2, t_stride=1 if i < 2 else 2))
            cin = w
        self.body = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.out = nn.Linear(cin, dim)
        self.mix = SliceMixer(slices, dim)

    def forward(self, cine: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, s = cine.shape[:2]
        x = cine.reshape(b * s, 1, *cine.shape[2:])
        f = self.out(self.pool(self.body(x)).flatten(1)).reshape(b, s, -1)
        return f, self.mix(f)


class LGEEncoder(nn.Module):
    """(B, S, H, W) -> slice features (B, S, D) and a patient feature (B, D)."""

    def __init__(self, slices: int, width: int = 16, dim: int = 128):
        super().__init__()
        layers, cin = [], 1
        for w in _widths(width):
            layers.append(Conv2dBlock(cin, w))
            cin = w
        self.body = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out = nn.Linear(cin, dim)
        self.mix = SliceMixer(slices, dim)

    def forward(self, lge: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, s = lge.shape[:2]
        f = self.out(self.pool(self.body(lge.reshape(b * s, 1, *lge.shape[2:]))).flatten(1)).reshape(b, s, -1)
        return f, self.mix(f)


class CNNLSTMEncoder(nn.Module):
    """The contrast-free baseline's encoder: a 2D CNN per frame, an LSTM over the cardiac cycle
    per slice (DPLSTM, so DP-SGD works), slice features mixed as above. (B, S, T, H, W) -> (B, D)."""

    def __init__(self, slices: int, width: int = 16, dim: int = 128):
        super().__init__()
        layers, cin = [], 1
        for w in _widths(width):
            layers.append(Conv2dBlock(cin, w))
            cin = w
        self.cnn = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(cin, dim))
        self.lstm = DPLSTM(dim, dim, batch_first=True)
        self.mix = SliceMixer(slices, dim)

    def forward(self, cine: torch.Tensor) -> torch.Tensor:
        b, s, t = cine.shape[:3]
        f = self.cnn(cine.reshape(b * s * t, 1, *cine.shape[3:])).reshape(b * s, t, -1)
        _, (h, _) = self.lstm(f)
        return self.mix(h[-1].reshape(b, s, -1))
