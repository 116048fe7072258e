"""Cine (video) and LGE encoders over short-axis stacks.

Invariant for differential privacy: the first dimension of every layer's input is the patient.
Slices and frames are never folded into the batch; they lie on the depth axis of (1, 3, 3)
convolutions instead, so every image of a patient is processed in one call and Opacus'
per-sample gradients are per-patient gradients (tests/test_privacy.py checks this against
brute force).
"""

from __future__ import annotations

import torch
from opacus.layers import DPLSTM
from torch import nn

from ccmr_core.models.blocks import Compilable, FrameEncoder, SlicePool, TemporalConv, gn


class CineEncoder(Compilable):
    """(B, S, T, H, W) -> slice features (B, S, C) and a patient feature (B, D).

    Built to measure what defines the classes. Every frame goes through a 2D CNN down to a coarse
    map (8x8 at the default grid) that keeps where things are: the ventricles, each wall segment.
    At every location of every slice the network then sees the feature and its change from
    end-diastole (frame 0, R-wave triggered), and convolves along the cardiac cycle (circular,
    dilations 1 and 2), which is where volumes, ejection, wall thickening and regional motion
    live. Each location is summarised by its end-diastolic value, its cycle mean and its peak;
    a strided convolution compares neighbouring segments; slices are pooled with learned
    base-to-apex weightings. ``region_pool``: a slice's locations are averaged ("mean") or
    averaged plus their maximum ("mean+max": one akinetic segment among normal ones is not
    averaged away); either way no parameter is added and the feature size stays C.
    """

    def __init__(self, slices: int, width: int = 8, dim: int = 128, pools: int = 4, region_pool: str = "mean"):
        super().__init__()
        if region_pool not in ("mean", "mean+max"):
            raise ValueError(f"region_pool must be 'mean' or 'mean+max', got {region_pool!r}")
        self.region_pool = region_pool
        self.frames = FrameEncoder(width)
        c = self.frames.channels
        self.mix = nn.Sequential(nn.Conv3d(2 * c, c, 1, bias=False), gn(c), nn.SiLU())
        self.cycle = nn.Sequential(TemporalConv(c, 1), TemporalConv(c, 2))
        self.regions = nn.Sequential(nn.Conv3d(3 * c, c, (1, 3, 3), (1, 2, 2), (0, 1, 1), bias=False), gn(c), nn.SiLU())
        self.slices = SlicePool(slices, pools)
        self.proj = nn.Sequential(nn.Linear(c * pools, dim), nn.LayerNorm(dim), nn.SiLU())
        self.channels = c

    def slice_features(self, cine: torch.Tensor) -> torch.Tensor:
        return self.routed(self._slice_features, cine)

    def _slice_features(self, cine: torch.Tensor) -> torch.Tensor:
        b, s, t, h, w = cine.shape
        f = self.frames(cine.reshape(b, 1, s * t, h, w))  # (B, C, S*T, h', w')
        c, hh, ww = f.shape[1], f.shape[-2], f.shape[-1]
        # time on the depth axis, slices stacked along the rows: (B, C, T, S*h', w')
        f = f.reshape(b, c, s, t, hh, ww).permute(0, 1, 3, 2, 4, 5).reshape(b, c, t, s * hh, ww)
        g = self.cycle(self.mix(torch.cat([f, f - f[:, :, :1]], 1)))
        summary = torch.cat([g[:, :, 0], g.mean(2), g.amax(2)], 1)  # (B, 3C, S*h', w')
        r = self.regions(summary.reshape(b, 3 * c, s, hh, ww))  # (B, C, S, h'/2, w'/2)
        pooled = r.mean((-1, -2))
        if self.region_pool == "mean+max":
            pooled = pooled + r.amax((-1, -2))
        return pooled.transpose(1, 2)  # (B, S, C)

    def pool(self, slice_feats: torch.Tensor) -> torch.Tensor:
        return self.proj(self.slices(slice_feats.transpose(1, 2)))

    def forward(self, cine: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.slice_features(cine)
        return f, self.pool(f)


class LGEEncoder(Compilable):
    """(B, S, H, W) -> slice features (B, S, C) and a patient feature (B, D); the same frame CNN
    as the cine encoder with the slices on the depth axis. ``pooled=False`` builds no patient
    feature (None) for users that read slices only: under DP-SGD every trainable parameter
    must take part in every step."""

    def __init__(self, slices: int, width: int = 8, dim: int = 128, pools: int = 4, pooled: bool = True):
        super().__init__()
        self.frames = FrameEncoder(width)
        c = self.frames.channels
        self.regions = nn.Sequential(nn.Conv3d(c, c, (1, 3, 3), (1, 2, 2), (0, 1, 1), bias=False), gn(c), nn.SiLU())
        self.pool = nn.Sequential(SlicePool(slices, pools), nn.Linear(c * pools, dim), nn.LayerNorm(dim),
                                  nn.SiLU()) if pooled else None
        self.channels = c

    def forward(self, lge: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        f = self.routed(self._slice_features, lge)  # (B, S, C)
        return f, (self.pool(f.transpose(1, 2)) if self.pool is not None else None)

    def _slice_features(self, lge: torch.Tensor) -> torch.Tensor:
        b, s, h, w = lge.shape
        return self.regions(self.frames(lge.reshape(b, 1, s, h, w))).mean((-1, -2)).transpose(1, 2)


class CNNLSTMEncoder(nn.Module):
    """The contrast-free baseline's encoder (the CC-CMR paper's comparison): a 2D CNN per frame,
    globally pooled, an LSTM over the cardiac cycle per slice (DPLSTM, so DP-SGD works), slices
    pooled as above. (B, S, T, H, W) -> (B, D)."""

    def __init__(self, slices: int, width: int = 8, dim: int = 128, pools: int = 4):
        super().__init__()
        self.frames = FrameEncoder(width)
        self.embed = nn.Linear(self.frames.channels, dim)
        self.lstm = DPLSTM(dim, dim, batch_first=True)
        self.slices = SlicePool(slices, pools)
        self.proj = nn.Sequential(nn.Linear(dim * pools, dim), nn.LayerNorm(dim), nn.SiLU())

    def forward(self, cine: torch.Tensor) -> torch.Tensor:
        b, s, t, h, w = cine.shape
        f = self.embed(self.frames(cine.reshape(b, 1, s * t, h, w)).mean((-1, -2)).transpose(1, 2))  # (B, S*T, D)
        f = f.reshape(b, s, t, f.shape[-1])
        last = torch.stack([self.lstm(f[:, k])[1][0][-1] for k in range(s)], dim=2)  # (B, D, S)
        return self.proj(self.slices(last))
