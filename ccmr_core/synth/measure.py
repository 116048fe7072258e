"""Measurements on label masks: the physics the classes are defined by, measured independently
of the parameters that generated them (used by the tests and available for QC of real masks)."""

from __future__ import annotations

import numpy as np

from ccmr_core.synth.render import LV_CAVITY, LV_MYO, RV_CAVITY, SCAR


def volumes_ml(mask: np.ndarray, label: int, pixel_spacing: float, slice_spacing: float) -> np.ndarray:
    """Volume of ``label`` per frame of a (T, S, H, W) mask by Simpson's rule over the slices."""
    return (mask == label).sum(axis=(1, 2, 3)) * pixel_spacing**2 * slice_spacing / 1000.0


def ejection_fraction(volumes: np.ndarray) -> float:
    ed, es = float(volumes.max()), float(volumes.min())
    return (ed - es) / ed if ed > 0 else 0.0


def lv_ef(mask: np.ndarray, pixel_spacing: float, slice_spacing: float) -> float:
    return ejection_fraction(volumes_ml(mask, LV_CAVITY, pixel_spacing, slice_spacing))


def rv_ef(mask: np.ndarray, pixel_spacing: float, slice_spacing: float) -> float:
    return ejection_fraction(volumes_ml(mask, RV_CAVITY, pixel_spacing, slice_spacing))


def wall_thickness(mask2d: np.ndarray, pixel_spacing: float, n_rays: int = 36) -> np.ndarray:
    """Myocardial thickness (mm) along ``n_rays`` rays from the LV cavity centroid of one slice;
    NaN where the slice has no cavity. Scar counts as myocardium."""
    cav = np.argwhere(mask2d == LV_CAVITY)
    if len(cav) == 0:
        return np.full(n_rays, np.nan)
    cy, cx = cav.mean(0)
    myo = (mask2d == LV_MYO) | (mask2d == SCAR)
    step = 0.25
    r = np.arange(0, mask2d.shape[0] / 2, step)
    out = np.empty(n_rays)
    for k, a in enumerate(np.linspace(0, 2 * np.pi, n_rays, endpoint=False)):
        y = np.clip(np.round(cy + r * np.sin(a)).astype(int), 0, mask2d.shape[0] - 1)
        x = np.clip(np.round(cx + r * np.cos(a)).astype(int), 0, mask2d.shape[1] - 1)
        out[k] = myo[y, x].sum() * step * pixel_spacing
    return out


def scar_fraction(lge_mask: np.ndarray) -> float:
    """Share of the LV myocardium that is scar on the LGE mask."""
    scar = (lge_mask == SCAR).sum()
    myo = (lge_mask == LV_MYO).sum() + scar
    return float(scar / myo) if myo else 0.0
