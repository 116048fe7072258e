"""Composable, dictionary-based augmentations that are safe for cardiac cine and LGE.

Each transform takes and returns a sample dict (``cine`` (S, T, H, W), ``lge`` (S, H, W), ...)
and touches only its ``keys``. The geometry changes the shape of a heart but not what defines
its class: rotation, translation, an area-preserving stretch (cross-sections are not circles) and
a gentle elastic deformation, the same for every slice, frame and key of a sample, so volumes,
ejection fraction, regional motion and the cine/LGE correspondence are kept. Small dark discs in
the cavity (``RandomCavityMuscle``) stand for papillary muscles and trabeculae, which every heart
has and the training sites' phantom lacks: the external phantom's papillary muscles were its
costliest difference (BENCHMARKS.md, external-shift). What is deliberately absent: any change of
size (the grid is in millimetres and cavity size separates DCM, NOR and HCM), left-right or
up-down flips (they would put the right ventricle on the wrong side, a chirality no heart has),
large rotations, reversing the slices (ingest orders them base to apex), and time reversal or
phase shifts (systole and diastole are not symmetric, and frame 0 is the R-wave-triggered
end-diastole); a monotone warp of the cycle was piloted and did worse.
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


def divergence_free_field(h: int, w: int, grid: int, pixels: float) -> torch.Tensor:
    """A smooth random displacement (1, H, W, 2) in grid_sample units whose divergence is zero:
    the curl of a random stream function, so it bends boundaries without shrinking or growing any
    region (cavity areas, hence volumes, are kept). Its RMS is ``pixels`` pixels."""
    psi = F.interpolate(torch.randn(1, 1, grid, grid), size=(h + 1, w + 1), mode="bicubic", align_corners=True)[0, 0]
    dy = psi[1:, :-1] - psi[:-1, :-1]  # d psi / d row
    dx = psi[:-1, 1:] - psi[:-1, :-1]  # d psi / d column
    disp = torch.stack([dy, -dx], -1)  # (x, y) displacement in pixels: (d psi/dy, -d psi/dx)
    disp = disp * (pixels / disp.pow(2).sum(-1).mean().sqrt().clamp_min(1e-8))
    return (disp * torch.tensor([2.0 / w, 2.0 / h]))[None]


class RandomGeometry:
    """Rotation, translation, an area-preserving stretch along a random axis and a smooth elastic
    displacement, applied in one resampling to every slice, frame and key of a sample."""

    def __init__(self, keys=("cine", "lge"), rotate_deg=15.0, translate=0.06, stretch=1.15, elastic_px=1.0,
                 grid=4, p=0.9):
        self.keys, self.rotate, self.translate, self.stretch = keys, rotate_deg, translate, stretch
        self.elastic, self.grid, self.p = elastic_px, grid, p

    def __call__(self, sample: Sample) -> Sample:
        keys = _present(sample, self.keys)
        if not keys or torch.rand(()) >= self.p:
            return sample
        a = math.radians(float(torch.empty(()).uniform_(-self.rotate, self.rotate)))
        axis = float(torch.empty(()).uniform_(0, math.pi))
        k = math.exp(float(torch.empty(()).uniform_(-math.log(self.stretch), math.log(self.stretch))))
        rot = lambda t: torch.tensor([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])  # noqa: E731
        lin = rot(a) @ rot(axis) @ torch.diag(torch.tensor([k, 1 / k])) @ rot(-axis)  # det 1: areas kept
        shift = torch.empty(2).uniform_(-self.translate, self.translate) * 2
        theta = torch.cat([lin, shift[:, None]], 1)
        h, w = sample[keys[0]].shape[-2:]
        base = F.affine_grid(theta[None], [1, 1, h, w], align_corners=False)  # (1, H, W, 2)
        if self.elastic > 0:
            base = base + divergence_free_field(h, w, self.grid, self.elastic)
        out = dict(sample)
        for key in keys:
            x = sample[key]
            flat = x.reshape(1, -1, h, w)
            out[key] = F.grid_sample(flat, base, mode="bilinear", padding_mode="zeros", align_corners=False).reshape(x.shape)
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


class RandomBiasField:
    """A smooth multiplicative intensity field per key (receive-coil inhomogeneity), values kept in
    [0, 1]."""

    def __init__(self, keys=("cine", "lge"), strength=0.3, p=0.5):
        self.keys, self.strength, self.p = keys, strength, p

    def __call__(self, sample: Sample) -> Sample:
        out = dict(sample)
        for k in _present(sample, self.keys):
            if torch.rand(()) >= self.p:
                continue
            h, w = sample[k].shape[-2:]
            yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
            c = torch.randn(4) * self.strength / 2
            field = torch.exp(c[0] * xx + c[1] * yy + c[2] * xx * yy + c[3] * (xx**2 + yy**2))
            out[k] = (sample[k] * field).clamp(0, 1)
        return out


class RandomCavityMuscle:
    """Small dark discs near the image centre, where ingest puts the left ventricle: what papillary
    muscles and trabeculae look like inside the bright blood pool, which a phantom without them
    never shows and every real heart has. Each of 1-3 discs has its own place (within ``spread``
    pixels of the centre), radius and tissue level, over a random run of adjacent slices, and grows
    towards mid-cycle as a contracting muscle does. Cine only (each frame is blended towards the
    disc's level with a soft edge), so what is outside the discs is untouched."""

    def __init__(self, keys=("cine",), count=(1, 3), radius_px=(0.8, 2.0), spread=10.0, level=(0.15, 0.45),
                 growth=0.35, p=0.5):
        self.keys, self.count, self.radius, self.spread = keys, count, radius_px, spread
        self.level, self.growth, self.p = level, growth, p

    def __call__(self, sample: Sample) -> Sample:
        keys = [k for k in _present(sample, self.keys) if sample[k].ndim == 4]  # (S, T, H, W) only
        if not keys or torch.rand(()) >= self.p:
            return sample
        out = dict(sample)
        for key in keys:
            x = sample[key]
            s, t, h, w = x.shape
            yy, xx = torch.meshgrid(torch.arange(h, dtype=x.dtype), torch.arange(w, dtype=x.dtype), indexing="ij")
            swell = 1 + self.growth * torch.sin(math.pi * torch.arange(t, dtype=x.dtype) / t) ** 2  # (T,)
            alpha = torch.zeros(s, t, h, w, dtype=x.dtype)
            level = torch.zeros_like(alpha)
            for _ in range(int(torch.randint(self.count[0], self.count[1] + 1, ()))):
                r = float(torch.empty(()).uniform_(*self.radius))
                ang, dist = float(torch.rand(())) * 2 * math.pi, self.spread * math.sqrt(float(torch.rand(())))
                cy, cx = (h - 1) / 2 + dist * math.sin(ang), (w - 1) / 2 + dist * math.cos(ang)
                n = int(torch.randint(1, s + 1, ()))
                first = int(torch.randint(0, s - n + 1, ()))
                d = ((yy - cy) ** 2 + (xx - cx) ** 2).sqrt()  # (H, W)
                disc = (r * swell[:, None, None] - d[None] + 0.5).clamp(0, 1)  # (T, H, W), one-pixel edge
                run = slice(first, first + n)  # the disc's slices; where discs overlap the stronger one's level
                level[run] = torch.where(disc >= alpha[run], float(torch.empty(()).uniform_(*self.level)), level[run])
                alpha[run] = torch.maximum(alpha[run], disc)
            out[key] = x * (1 - alpha) + level * alpha
        return out


def default_augmentation(keys: Sequence[str] = ("cine", "lge")) -> Compose:
    """The training augmentation."""
    keys = tuple(keys)
    return Compose([RandomCavityMuscle(), *_acquisition(keys)])


def inference_augmentation() -> Compose:
    """What test-time augmentation averages over (inference reads cine only): the training
    augmentation without its cavity discs. Pose, in-class shape, coil, contrast and noise are
    nuisances a prediction should not depend on; the discs are anatomy (papillary muscles) that
    the study shows or does not, and added to every pass they would shrink the cavity the model
    measures, moving predictions towards the small-cavity classes."""
    return Compose(_acquisition(("cine",)))


def _acquisition(keys: tuple[str, ...]) -> list:
    return [RandomGeometry(keys), RandomBiasField(keys), RandomIntensity(keys), RandomNoise(keys)]
