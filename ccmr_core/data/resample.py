"""Resample ordered stacks onto one fixed grid in patient coordinates.

The target grid is a prism along the cine slice normal: ``size x size`` pixels at ``spacing_mm``,
centred on the heart, with ``slices`` planes evenly spaced from the first to the last cine slice.
Each acquired image is sampled at the grid's 3D points through its own ImagePositionPatient,
ImageOrientationPatient and PixelSpacing, so different matrices, spacings, oblique planes and an
LGE stack planned differently from the cine all land on the same voxels. The heart is found as
the region of largest temporal variation on the mid-ventricular cine slice (the beating blood
pools), with a weak prior towards the image centre.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from ccmr_core.config import IngestConfig
from ccmr_core.data.dicom_read import Frame
from ccmr_core.data.stacks import Stack, StudyError


@dataclass(frozen=True)
class Plane:
    origin: np.ndarray  # centre of the first pixel
    row_dir: np.ndarray  # direction of increasing column index
    col_dir: np.ndarray  # direction of increasing row index
    row_spacing: float  # distance between rows (along col_dir)
    col_spacing: float  # distance between columns (along row_dir)

    @classmethod
    def of(cls, f: Frame) -> Plane:
        if f.position is None or f.orientation is None or f.spacing is None:
            raise StudyError(f"{f.path}: ImagePositionPatient, ImageOrientationPatient or PixelSpacing is missing")
        return cls(f.position, f.orientation[:3], f.orientation[3:], f.spacing[0], f.spacing[1])

    def pixel_to_patient(self, i: float, j: float) -> np.ndarray:
        return self.origin + j * self.col_spacing * self.row_dir + i * self.row_spacing * self.col_dir


def _images(frames: list[Frame]) -> torch.Tensor:
    shapes = {f.pixels.shape for f in frames}
    if len(shapes) != 1:
        raise StudyError(f"frames of one slice have different matrices {sorted(shapes)}")
    return torch.from_numpy(np.stack([np.asarray(f.pixels, dtype=np.float32) for f in frames]))


def heart_centre(stack: Stack) -> np.ndarray:
    """Patient-space point at the heart's centre on the middle cine slice."""
    mid = stack.slices[len(stack.slices) // 2]
    plane = Plane.of(mid[0])
    img = _images(mid).numpy()
    var = img.std(0)
    h, w = var.shape
    sigma = max(1.0, 8.0 / min(plane.row_spacing, plane.col_spacing))
    var = ndimage.gaussian_filter(var, sigma)
    yy, xx = np.mgrid[0:h, 0:w]
    prior = np.exp(-0.5 * (((yy - (h - 1) / 2) / (0.3 * h)) ** 2 + ((xx - (w - 1) / 2) / (0.3 * w)) ** 2))
    i, j = np.unravel_index(np.argmax(var * prior), var.shape)
    return plane.pixel_to_patient(float(i), float(j))


def _grid_points(centre: np.ndarray, u: np.ndarray, v: np.ndarray, size: int, spacing: float) -> np.ndarray:
    """(size, size, 3) points; rows along u, columns along v."""
    k = (np.arange(size) - (size - 1) / 2) * spacing
    return centre + k[:, None, None] * u + k[None, :, None] * v


def _sample(images: torch.Tensor, plane: Plane, points: np.ndarray, target_spacing: float) -> torch.Tensor:
    """Sample (N, H, W) images of one plane at (P, Q, 3) patient points -> (N, P, Q)."""
    n, h, w = images.shape
    x = images[:, None]
    rs, cs, origin = plane.row_spacing, plane.col_spacing, plane.origin
    factor = min(rs, cs) / target_spacing
    if factor < 0.77:  # downsampling: low-pass first (antialias) so fine noise does not alias
        h2, w2 = max(2, round(h * rs / target_spacing)), max(2, round(w * cs / target_spacing))
        x = F.interpolate(x, size=(h2, w2), mode="bilinear", antialias=True, align_corners=False)
        origin = origin + (0.5 * h / h2 - 0.5) * rs * plane.col_dir + (0.5 * w / w2 - 0.5) * cs * plane.row_dir
        rs, cs, h, w = rs * h / h2, cs * w / w2, h2, w2
    d = points - origin
    j = d @ plane.row_dir / cs
    i = d @ plane.col_dir / rs
    gx = 2 * j / max(w - 1, 1) - 1
    gy = 2 * i / max(h - 1, 1) - 1
    grid = torch.from_numpy(np.stack([gx, gy], -1).astype(np.float32))[None].expand(n, -1, -1, -1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[:, 0]


def _bracket(positions: np.ndarray, t: float) -> tuple[int, int, float]:
    """Indices of the acquired planes around position t and the weight of the second."""
    if t <= positions[0]:
        return 0, 0, 0.0
    if t >= positions[-1]:
        k = len(positions) - 1
        return k, k, 0.0
    k = int(np.searchsorted(positions, t)) - 1
    span = positions[k + 1] - positions[k]
    return k, k + 1, float((t - positions[k]) / span) if span > 0 else 0.0


def _resample_time(x: torch.Tensor, frames: int) -> torch.Tensor:
    """(n, H, W) frames over one cycle -> (frames, H, W), cyclic linear interpolation."""
    n = x.shape[0]
    if n == frames:
        return x
    pos = torch.arange(frames, dtype=torch.float32) * (n / frames)
    i0 = pos.floor().long() % n
    w = (pos - pos.floor())[:, None, None]
    return x[i0] * (1 - w) + x[(i0 + 1) % n] * w


def _normalise(x: torch.Tensor, pct: tuple[float, float]) -> torch.Tensor:
    flat = x.flatten()
    if flat.numel() > 200_000:
        flat = flat[torch.linspace(0, flat.numel() - 1, 200_000).long()]
    lo, hi = torch.quantile(flat, torch.tensor([pct[0] / 100, pct[1] / 100]))
    if float(hi - lo) <= 1e-6:
        raise StudyError("the images have no contrast (constant intensity)")
    return ((x - lo) / (hi - lo)).clamp_(0, 1)


def resample_study(cine: Stack, lge: Stack | None, cfg: IngestConfig) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Cine (S, T, size, size) and LGE (S, size, size) float16 in [0, 1], and the grid geometry."""
    normal = cine.normal
    first = Plane.of(cine.slices[0][0])
    u = first.col_dir - (first.col_dir @ normal) * normal
    u /= np.linalg.norm(u)
    v = np.cross(normal, u)
    centre = heart_centre(cine)
    mid_pos = float(centre @ normal)
    targets = np.linspace(cine.positions[0], cine.positions[-1], cfg.slices) if cfg.slices > 1 else np.array(
        [cine.positions.mean()])

    def plane_points(t: float) -> np.ndarray:
        return _grid_points(centre + (t - mid_pos) * normal, u, v, cfg.size, cfg.spacing_mm)

    def cine_slice(k: int, pts: np.ndarray) -> torch.Tensor:
        frames = cine.slices[k]
        return _resample_time(_sample(_images(frames), Plane.of(frames[0]), pts, cfg.spacing_mm), cfg.frames)

    out = torch.empty(cfg.slices, cfg.frames, cfg.size, cfg.size)
    for s, t in enumerate(targets):
        pts = plane_points(float(t))
        a, b, w = _bracket(cine.positions, float(t))
        xa = cine_slice(a, pts)
        out[s] = xa if w == 0 else xa * (1 - w) + cine_slice(b, pts) * w
    cine_arr = _normalise(out, cfg.intensity_percentiles)

    lge_arr = None
    if lge is not None:
        ln = lge.normal
        lpos = lge.positions
        lout = torch.empty(cfg.slices, cfg.size, cfg.size)
        for s, t in enumerate(targets):
            pts = plane_points(float(t))
            c = float((centre + (t - mid_pos) * normal) @ ln)
            a, b, w = _bracket(lpos, c)
            fa = lge.slices[a][0]
            xa = _sample(_images([fa]), Plane.of(fa), pts, cfg.spacing_mm)[0]
            if w > 0:
                fb = lge.slices[b][0]
                xa = xa * (1 - w) + _sample(_images([fb]), Plane.of(fb), pts, cfg.spacing_mm)[0] * w
            lout[s] = xa
        lge_arr = _normalise(lout, cfg.intensity_percentiles).numpy().astype(np.float16)
    geometry = {
        "centre_mm": [round(float(x), 2) for x in centre],
        "normal": [round(float(x), 5) for x in normal],
        "slice_positions_mm": [round(float(x), 2) for x in targets],
        "acquired_cine_slices": cine.n_slices,
        "acquired_cine_frames": [len(s) for s in cine.slices],
        "acquired_lge_slices": lge.n_slices if lge is not None else 0,
    }
    return cine_arr.numpy().astype(np.float16), lge_arr, geometry
