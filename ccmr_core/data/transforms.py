"""Composable, dictionary-based augmentations that are safe for cardiac cine and LGE.

Each transform takes and returns a sample dict (``cine`` (S, T, H, W), ``lge`` (S, H, W), ...)
and touches only its ``keys``. What is deliberately absent: left-right or up-down flips (they
would put the right ventricle on the wrong side, a chirality no heart has), large rotations, and
time reversal or phase shifts (systole and diastole are not symmetric, and frame 0 is the
R-wave-triggered end-diastole). Reversing the slice order is allowed because the direction of
the slice normal (base-to-apex or apex-to-base) depends on the scanner's planning.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

Sample = dict[str, torch.Tensor]


class Compose:
    def __init__(self, transforms: Sequence[Callable[[Sample], Sample]]):
        self.transforms = list(transforms)

    def __call__(self, sample: Sample) -> Sample:
        for t in self.transforms:
            sample = t(sample)
        return sample


def _present(sample: Sample, keys: Sequence[str]) -> list[str]:
    """Keys that hold an image in this sample (an absent LGE, has_lge False, is left as zeros)."""
    return [k for k in keys if sample.get(k) is not None and bool(sample.get(f"has_{k}", True))]


class RandomAffine:
    """Small in-plane rotation, isotropic scaling and translation, the same for all slices,
    frames and keys of one sample (so cine and LGE stay aligned)."""

    def __init__(self, keys=("cine", "lge"), rotate_deg=10.0, scale=(0.92, 1.08), translate=0.06, p=0.8):
        self.keys, self.rotate, self.scale, self.translate, self.p = keys, rotate_deg, scale, translate, p

    def __call__(self, sample: Sample) -> Sample:
        if torch.rand(()) >= self.p:
            return sample
        a = math.radians(float(torch.empty(()).uniform_(-self.rotate, self.rotate)))
        s = float(torch.empty(()).uniform_(*self.scale))
        tx, ty = (float(v) for v in torch.empty(2).uniform_(-self.translate, self.translate) * 2)
        theta = torch.tensor([[math.cos(a) / s, -math.sin(a) / s, tx], [math.sin(a) / s, math.cos(a) / s, ty]])
        out = dict(sample)
        for k in _present(sample, self.keys):
            x = sample[k]
            flat = x.reshape(-1, 1, *x.shape[-2:])
            grid = F.affine_grid(theta[None].expand(flat.shape[0], -1, -1), list(flat.shape), align_corners=False)
            out[k] = F.grid_sample(flat, grid, mode="bilinear", padding_mode="zeros", align_corners=False).reshape(x.shape)
        return out


class RandomIntensity:
    """Gamma and contrast changes per key (scanner and coil differences), values kept in [0, 1]."""

    def __init__(self, keys=("cine", "lge"), gamma=(0.8, 1.25), scale=(0.9, 1.1), p=0.8):
        self.keys, self.gamma, self.scale, self.p = keys, gamma, scale, p

    def __call__(self, sample: Sample) -> Sample:
        out = dict(sample)
        for k in _present(sample, self.keys):
            if torch.rand(()) >= self.p:
                continue
            g = float(torch.empty(()).uniform_(*self.gamma))
            c = float(torch.empty(()).uniform_(*self.scale))
            out[k] = (sample[k].clamp(0, 1) ** g * c).clamp(0, 1)
        return out


class RandomNoise:
    def __init__(self, keys=("cine", "lge"), std=(0.0, 0.03), p=0.5):
        self.keys, self.std, self.p = keys, std, p

    def __call__(self, sample: Sample) -> Sample:
        out = dict(sample)
        for k in _present(sample, self.keys):
            if torch.rand(()) < self.p:
                sd = float(torch.empty(()).uniform_(*self.std))
                out[k] = (sample[k] + sd * torch.randn_like(sample[k])).clamp(0, 1)
        return out


class RandomSliceReverse:
    """Reverse the slice axis of every key together (normal direction is scanner-dependent)."""

    def __init__(self, keys=("cine", "lge"), p=0.5):
        self.keys, self.p = keys, p

    def __call__(self, sample: Sample) -> Sample:
        if torch.rand(()) >= self.p:
            return sample
        out = dict(sample)
        for k in _present(sample, self.keys):
            out[k] = sample[k].flip(0)
        return out


def default_augmentation() -> Compose:
    return Compose([RandomAffine(), RandomIntensity(), RandomNoise(), RandomSliceReverse()])
