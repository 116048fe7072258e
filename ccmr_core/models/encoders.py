"""Cine (video) and LGE (2.5D) encoders over short-axis stacks.

Invariant for differential privacy: the first dimension of every layer's input is the patient.
Slices go through the shared layers one at a time (never folded into the batch), and a cine
slice's frames are the depth axis of (1,3,3) convolutions, so Opacus' per-sample gradients are
per-patient gradients (tests/test_privacy.py checks this against brute force).
"""

from __future__ import annotations

import torch
from opacus.layers import DPLSTM
from torch import nn

from ccmr_core.models.blocks import Conv2dBlock, R2Plus1D, SliceMixer


def _widths(width: int, depth: int = 4) -> list[int]:
    return [width * 2**i for i in range(depth)]


def per_slice(fn, x: torch.Tensor) -> torch.Tensor:
    """Apply ``fn`` to each slice x[:, s] (batch dim kept) and stack: (B, S, ...)."""
    return torch.stack([fn(x[:, s]) for s in range(x.shape[1])], dim=1)


class CineEncoder(nn.Module):
    """(B, S, T, H, W) -> slice features (B, S, D) and a patient feature (B, D).

    Each slice is a video through (2+1)D blocks (spatial stride 2 each, temporal stride 2 in the
    last two), pooled over time and space; a slice mixer keeps base-to-apex position."""

    def __init__(self, slices: int, width: int = 8, dim: int = 128):
        super().__init__()
        layers, cin = [], 1
        for i, w in enumerate(_widths(width)):
            layers.append(R2Plus1D(cin, w, s_stride=2, t_stride=1 if i < 2 else 2))
            cin = w
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool3d(1), nn.Flatten(1), nn.Linear(cin, dim))
        self.mix = SliceMixer(slices, dim)

    def forward(self, cine: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = per_slice(lambda x: self.body(x[:, None]), cine)
        return f, self.mix(f)


class LGEEncoder(nn.Module):
    """(B, S, H, W) -> slice features (B, S, D) and a patient feature (B, D)."""

    def __init__(self, slices: int, width: int = 8, dim: int = 128):
        super().__init__()
        layers, cin = [], 1
        for w in _widths(width):
            layers.append(Conv2dBlock(cin, w))
            cin = w
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(cin, dim))
        self.mix = SliceMixer(slices, dim)

    def forward(self, lge: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = per_slice(lambda x: self.body(x[:, None]), lge)
        return f, self.mix(f)


class FrameCNN(nn.Module):
    """A 2D CNN applied to every frame: (B, T, H, W) -> (B, T, D), frames on the depth axis."""

    def __init__(self, width: int, dim: int):
        super().__init__()
        layers, cin = [], 1
        for w in _widths(width):
            layers += [nn.Conv3d(cin, w, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1), bias=False),
                       nn.GroupNorm(min(8, w), w), nn.SiLU()]
            cin = w
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(cin, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.body(x[:, None]).mean(dim=(3, 4))  # (B, C, T)
        return self.out(f.transpose(1, 2))


class CNNLSTMEncoder(nn.Module):
    """The contrast-free baseline's encoder: a 2D CNN per frame, an LSTM over the cardiac cycle
    per slice (DPLSTM, so DP-SGD works), slice features mixed as above. (B, S, T, H, W) -> (B, D)."""

    def __init__(self, slices: int, width: int = 8, dim: int = 128):
        super().__init__()
        self.cnn = FrameCNN(width, dim)
        self.lstm = DPLSTM(dim, dim, batch_first=True)
        self.mix = SliceMixer(slices, dim)

    def _slice(self, x: torch.Tensor) -> torch.Tensor:
        _, (h, _) = self.lstm(self.cnn(x))
        return h[-1]

    def forward(self, cine: torch.Tensor) -> torch.Tensor:
        return self.mix(per_slice(self._slice, cine))
