"""Render a :class:`Heart` into cine (bSSFP look) and LGE images and ground-truth label masks.

All slices and frames are rendered at once with numpy (float32). Edges are anti-aliased with a
one-pixel linear ramp (partial volume). Intensities are relative (blood on cine = 1); the scanner
profile then applies its bias field, noise, scale and quantisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ccmr_core.synth.anatomy import N_SECTORS, Heart, contraction_curve, radii, scar_field

# label values in the ground-truth masks
BACKGROUND, LV_CAVITY, LV_MYO, RV_CAVITY, SCAR = 0, 1, 2, 3, 4

CINE = {"blood": 1.0, "myo": 0.27, "fat": 0.85, "lung": 0.05, "tissue": 0.42, "liver": 0.33}
LGE = {"blood": 0.48, "myo": 0.03, "scar": 1.0, "fat": 0.55, "lung": 0.02, "tissue": 0.2, "liver": 0.16}
LGE_PHASE = 0.78  # LGE is triggered in mid-diastole
RV_WALL_MM = 3.5
PERICARDIAL_FAT_MM = 2.5


@dataclass(frozen=True)
class Grid:
    """Pixel geometry of the square image: matrix and spacing."""

    matrix: int
    spacing: float

    def coords(self, rows: slice = slice(None), cols: slice = slice(None)) -> tuple[np.ndarray, np.ndarray]:
        """x (columns) and y (rows) of pixel centres in mm, image centre at 0; optionally a window."""
        c = (np.arange(self.matrix, dtype=np.float32) - (self.matrix - 1) / 2) * self.spacing
        return np.meshgrid(c[cols], c[rows], indexing="xy")

    def heart_window(self, heart: "Heart") -> tuple[slice, slice]:
        """The pixel window that holds both ventricles and the pericardial fat in every frame."""
        r_epi = float((heart.r_endo_ed[:, None] + heart.wall_ed).max())
        rv_u = r_epi + 19.0 * heart.rv_scale + RV_WALL_MM
        rv_v = float(np.hypot(0.5 * r_epi, (1.15 * r_epi + 7.0) * heart.rv_scale**0.7 + RV_WALL_MM))
        half = max(rv_u, rv_v) + PERICARDIAL_FAT_MM + 4 * self.spacing
        out = []
        for centre, tilt in zip(heart.centre_mm[::-1], heart.axis_tilt_mm[::-1]):  # rows (y), cols (x)
            lo_mm, hi_mm = centre + min(0.0, tilt) - half, centre + max(0.0, tilt) + half
            lo = int(np.floor(lo_mm / self.spacing + (self.matrix - 1) / 2))
            hi = int(np.ceil(hi_mm / self.spacing + (self.matrix - 1) / 2)) + 1
            out.append(slice(max(0, lo), min(self.matrix, hi)))
        return out[0], out[1]


def _ramp(d: np.ndarray, spacing: float) -> np.ndarray:
    """Fraction of a pixel inside a boundary at signed distance d (mm, positive inside)."""
    return np.clip(0.5 + d / spacing, 0.0, 1.0)


def _polar(heart: Heart, grid: Grid, window: tuple[slice, slice] = (slice(None), slice(None))):
    """Per slice: radius (S,h,w), anatomical angle, and the LV-centred x/y coordinates (mm)."""
    x, y = grid.coords(*window)
    tz = heart.z / max(float(heart.z[-1]), 1e-6)
    cx = heart.centre_mm[0] + heart.axis_tilt_mm[0] * tz
    cy = heart.centre_mm[1] + heart.axis_tilt_mm[1] * tz
    px = x[None] - cx[:, None, None].astype(np.float32)
    py = y[None] - cy[:, None, None].astype(np.float32)
    rho = np.hypot(px, py)
    e = heart.shape.ellipticity
    if e != 1.0:  # an elliptical LV of the same area: distances stretched along the major axis
        ca, sa = np.cos(heart.shape.ellipse_angle), np.sin(heart.shape.ellipse_angle)
        u, v = px * ca + py * sa, -px * sa + py * ca
        rho = np.hypot(u * np.sqrt(e), v / np.sqrt(e)).astype(np.float32)
    theta = np.mod(np.arctan2(py, px) - heart.rv_angle, 2 * np.pi).astype(np.float32)
    return rho, theta, px, py


def _sector_lookup(values: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Interpolate per-sector values (T, S, N) at pixel angles (S, H, W) -> (T, S, H, W)."""
    t, s, n = values.shape
    idx = theta * (n / (2 * np.pi))
    i0 = np.floor(idx).astype(np.int64) % n
    i1 = (i0 + 1) % n
    frac = (idx - np.floor(idx)).astype(np.float32)
    flat0 = i0.reshape(1, s, -1)
    flat1 = i1.reshape(1, s, -1)
    v = values.astype(np.float32)
    a = np.take_along_axis(v, np.broadcast_to(flat0, (t, s, flat0.shape[-1])), axis=2)
    b = np.take_along_axis(v, np.broadcast_to(flat1, (t, s, flat1.shape[-1])), axis=2)
    out = a * (1 - frac.reshape(1, s, -1)) + b * frac.reshape(1, s, -1)
    return out.reshape((t,) + theta.shape)


def _rv_geometry(heart: Heart, r_epi_mean: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RV ellipse centre offset and semi-axes per slice at end-diastole (mm)."""
    taper = np.sqrt(np.clip(1 - (heart.z / 0.78) ** 2, 0.0, 1.0))
    d = 0.5 * r_epi_mean
    a = (0.5 * r_epi_mean + 19.0 * heart.rv_scale) * taper
    b = (1.15 * r_epi_mean + 7.0) * heart.rv_scale**0.7 * taper
    return d, a, b


def _rv_fractions(pu, pv, d, a, b, inside_lv, spacing):
    """RV cavity and RV free-wall pixel fractions outside the LV epicardium."""
    eps = 1e-3
    a = np.maximum(a, eps)
    b = np.maximum(b, eps)
    q = np.sqrt(((pu - d) / a) ** 2 + (pv / b) ** 2)
    scale = np.minimum(a, b)
    outside_lv = 1.0 - inside_lv
    cav = _ramp((1 - q) * scale, spacing) * outside_lv
    qw = np.sqrt(((pu - d) / (a + RV_WALL_MM)) ** 2 + (pv / (b + RV_WALL_MM)) ** 2)
    wall = np.clip(_ramp((1 - qw) * (scale + RV_WALL_MM), spacing) * outside_lv - cav, 0, 1)
    visible = a > 1.0  # the RV ends before the LV apex
    return cav * visible, wall * visible


def _rv_setup(heart: Heart, coarse: Grid):
    """What the RV size computations share: RV-frame coordinates, the LV (ED, ES) and RV axes."""
    rho, theta, px, py = _polar(heart, coarse)
    ca, sa = np.cos(heart.rv_angle), np.sin(heart.rv_angle)
    pu, pv = px * ca + py * sa, -px * sa + py * ca
    r_endo, r_epi = radii(heart, np.array([0.0, heart.es_phase]))
    inside = _ramp(_sector_lookup(r_epi, theta) - rho[None], coarse.spacing)
    d, a, b = _rv_geometry(heart, r_epi[0].mean(-1))
    return pu, pv, inside, d[:, None, None], a[:, None, None], b[:, None, None]


def rv_shrink(heart: Heart, grid: Grid) -> float:
    """Factor q on the RV semi-axes at end-systole that gives the target RV ejection fraction."""
    coarse = Grid(64, grid.matrix * grid.spacing / 64)
    pu, pv, inside, d, a, b = _rv_setup(heart, coarse)
    ed = _rv_fractions(pu, pv, d, a, b, inside[0], coarse.spacing)[0].sum()
    lo, hi = 0.2, 1.0
    for _ in range(18):
        q = 0.5 * (lo + hi)
        cav = _rv_fractions(pu, pv, d, a * q, b * q, inside[1], coarse.spacing)[0].sum()
        if 1 - cav / max(ed, 1e-6) > heart.rv_ef:
            lo = q
        else:
            hi = q
    return 0.5 * (lo + hi)


def rv_edv_ml(heart: Heart, slice_spacing_mm: float, fov_mm: float = 300.0) -> float:
    """RV end-diastolic cavity volume (Simpson's rule over the stack, as a reader would sum it)."""
    coarse = Grid(96, fov_mm / 96)
    pu, pv, inside, d, a, b = _rv_setup(heart, coarse)
    area = _rv_fractions(pu, pv, d, a, b, inside[0], coarse.spacing)[0].sum() * coarse.spacing**2
    return float(area * slice_spacing_mm / 1000.0)


def _static_background(heart: Heart, grid: Grid, rng: np.random.Generator, contrast: dict) -> np.ndarray:
    """Chest: body ellipse, subcutaneous fat, lungs, liver at apical levels, smooth texture."""
    x, y = grid.coords()
    fov = grid.matrix * grid.spacing
    s = heart.n_slices
    out = np.zeros((s, grid.matrix, grid.matrix), np.float32)
    bx, by = rng.uniform(0.42, 0.5) * fov, rng.uniform(0.33, 0.4) * fov
    ox, oy = rng.uniform(-0.04, 0.04) * fov, rng.uniform(0.02, 0.08) * fov
    body = np.sqrt(((x - ox) / bx) ** 2 + ((y - oy) / by) ** 2)
    fat_w = rng.uniform(8, 16)
    body_in = _ramp((1 - body) * min(bx, by), grid.spacing)
    muscle_in = _ramp((1 - body) * min(bx, by) - fat_w, grid.spacing)
    # smooth tissue texture: a few random plane waves with wavelengths of 3-10 cm
    tex = np.zeros((s,) + x.shape, np.float32)
    for _ in range(6):
        k = rng.uniform(2 * np.pi / 100, 2 * np.pi / 30)
        a = rng.uniform(0, 2 * np.pi)
        ph = rng.uniform(0, 2 * np.pi, s).astype(np.float32)[:, None, None]
        tex += np.cos(k * (np.cos(a) * x + np.sin(a) * y)[None] + ph) * np.float32(np.sqrt(2 / 6))
    lung_x = rng.uniform(0.2, 0.26) * fov
    lungs = np.zeros_like(x)
    for side in (-1, 1):
        lx, ly = side * lung_x + heart.centre_mm[0] * 0.3, rng.uniform(-0.05, 0.05) * fov
        ax_, ay_ = rng.uniform(0.09, 0.12) * fov, rng.uniform(0.18, 0.24) * fov
        q = np.sqrt(((x - lx) / ax_) ** 2 + ((y - ly) / ay_) ** 2)
        lungs = np.maximum(lungs, _ramp((1 - q) * ax_, grid.spacing))
    for k in range(s):
        tissue = contrast["tissue"] * (1 + 0.08 * tex[k])
        img = contrast["fat"] * (body_in - muscle_in) + tissue * muscle_in
        img = img * (1 - lungs) + contrast["lung"] * lungs * body_in
        if heart.z[k] > 0.45:  # the liver dome rises into apical slices
            lvx, lvy = -0.18 * fov, 0.26 * fov - (heart.z[k] - 0.45) * 0.2 * fov
            q = np.sqrt(((x - lvx) / (0.2 * fov)) ** 2 + ((y - lvy) / (0.12 * fov)) ** 2)
            liv = _ramp((1 - q) * 0.12 * fov, grid.spacing) * muscle_in
            img = img * (1 - liv) + contrast["liver"] * liv
        out[k] = img
    return out


PAPILLARY_ANGLES = (np.deg2rad(140.0), np.deg2rad(235.0))  # anterolateral, posteromedial (anatomical)


def _papillary(heart: Heart, rho: np.ndarray, theta: np.ndarray, endo: np.ndarray, f: np.ndarray) -> np.ndarray:
    """Fraction of each pixel in the two papillary muscles (T, S, h, w): discs inside the cavity at
    mid-ventricular slices, centred at 62% of the endocardial radius so that they follow the wall,
    thickening in systole."""
    on = ((heart.z > 0.25) & (heart.z < 0.75)).astype(np.float32)[None, :, None, None]
    radius = (heart.shape.papillary_mm * (1 + 0.35 * f))[:, None, None, None].astype(np.float32)
    out = np.zeros(endo.shape, np.float32)
    for a in PAPILLARY_ANGLES:
        d = np.angle(np.exp(1j * (theta - a)))[None]
        dist = np.sqrt((rho[None] * np.cos(d) - 0.62 * endo) ** 2 + (rho[None] * np.sin(d)) ** 2)
        out = np.maximum(out, _ramp(radius - dist, 1.0) * on)
    return out


def render(heart: Heart, grid: Grid, frames: int, rng: np.random.Generator, with_masks: bool = False,
           cine_contrast: dict | None = None, lge_contrast: dict | None = None):
    """Cine (T, S, H, W), LGE (S, H, W) in relative intensity, and masks when asked.

    Returns a dict with ``cine``, ``lge`` (None when the patient has no LGE), and with masks
    ``cine_mask`` (T, S, H, W) uint8 and ``lge_mask`` (S, H, W) uint8. ``cine_contrast`` and
    ``lge_contrast`` replace the tissue intensities of :data:`CINE` and :data:`LGE`.
    """
    CINE_ = cine_contrast or CINE
    LGE_ = lge_contrast or LGE
    sp = grid.spacing
    win = grid.heart_window(heart)  # the heart is rendered in its window only, the chest everywhere
    rho, theta, px, py = _polar(heart, grid, win)
    ca, sa = np.cos(heart.rv_angle), np.sin(heart.rv_angle)
    pu, pv = px * ca + py * sa, -px * sa + py * ca
    phases = np.arange(frames) / frames
    phases_all = np.concatenate([phases, [LGE_PHASE]])
    r_endo_s, r_epi_s = radii(heart, phases_all)
    endo = _sector_lookup(r_endo_s, theta)  # (T+1, S, H, W)
    epi = _sector_lookup(r_epi_s, theta)
    blood = _ramp(endo - rho[None], sp)
    inside = _ramp(epi - rho[None], sp)
    myo = inside - blood
    if heart.shape.papillary_mm > 0:  # muscle inside the cavity: myocardium where there was blood
        muscle = blood * _papillary(heart, rho, theta, endo,
                                    contraction_curve(phases_all, heart.es_phase, heart.relaxation, heart.shape.curve))
        blood, myo = blood - muscle, myo + muscle
    q = rv_shrink(heart, grid)
    f_rv = contraction_curve(phases_all, heart.es_phase, heart.relaxation, heart.shape.curve)
    k = (1 - (1 - q) * f_rv).astype(np.float32)[:, None, None, None]
    d, a, b = _rv_geometry(heart, r_epi_s[0].mean(-1))
    d, a, b = (v.astype(np.float32)[None, :, None, None] for v in (d, a, b))
    rv_cav, rv_wall = _rv_fractions(pu[None], pv[None], d, a * k, b * k, inside, sp)
    heart_occ = np.clip(inside + rv_cav + rv_wall, 0, 1)
    fat = np.clip(_ramp(epi + PERICARDIAL_FAT_MM - rho[None], sp) - heart_occ, 0, 1)
    occ = np.clip(heart_occ + fat, 0, 1)

    bg_rng = np.random.default_rng(rng.integers(2**63))
    bg_cine = _static_background(heart, grid, np.random.default_rng(bg_rng.integers(2**63)), CINE_)
    cine = np.broadcast_to(bg_cine[None], (frames,) + bg_cine.shape).copy()
    cine[(Ellipsis,) + win] = (
        bg_cine[(slice(None),) + win][None] * (1 - occ[:frames])
        + CINE_["blood"] * (blood[:frames] + rv_cav[:frames])
        + CINE_["myo"] * (myo[:frames] + rv_wall[:frames])
        + CINE_["fat"] * fat[:frames]
    )
    out = {"cine": cine, "lge": None}
    depth = np.clip((rho - endo[-1]) / np.maximum(epi[-1] - endo[-1], 1e-3), 0, 1)
    scar = scar_field(heart.scars, heart.z, theta, depth) * myo[-1]
    if heart.has_lge:
        bg_lge = _static_background(heart, grid, np.random.default_rng(bg_rng.integers(2**63)), LGE_)
        lge = bg_lge.copy()
        lge[(slice(None),) + win] = (
            bg_lge[(slice(None),) + win] * (1 - occ[-1])
            + LGE_["blood"] * (blood[-1] + rv_cav[-1])
            + LGE_["myo"] * (myo[-1] - scar + rv_wall[-1])
            + LGE_["scar"] * scar
            + LGE_["fat"] * fat[-1]
        )
        out["lge"] = lge
    if with_masks:
        lab = np.zeros(blood.shape, np.uint8)
        lab[rv_cav >= 0.5] = RV_CAVITY
        lab[myo >= 0.5] = LV_MYO
        lab[blood >= 0.5] = LV_CAVITY
        full = np.zeros((frames + 1, heart.n_slices, grid.matrix, grid.matrix), np.uint8)
        full[(Ellipsis,) + win] = lab
        lge_lab = full[-1].copy()
        scar_full = np.zeros(lge_lab.shape, np.float32)
        scar_full[(slice(None),) + win] = scar
        lge_lab[(scar_full >= 0.5) & (lge_lab == LV_MYO)] = SCAR
        out["cine_mask"] = full[:frames]
        out["lge_mask"] = lge_lab
    return out


def scanner_effects(
    img: np.ndarray, rng: np.random.Generator, noise: float, bias: float, scale: float, max_value: int
) -> np.ndarray:
    """Bias field, Rician noise, intensity scale and integer quantisation (same field for all frames)."""
    h, w = img.shape[-2:]
    yy, xx = np.meshgrid(np.linspace(-1, 1, h, dtype=np.float32), np.linspace(-1, 1, w, dtype=np.float32), indexing="ij")
    c = rng.normal(0, 1, 4).astype(np.float32)
    field = np.exp(bias * (c[0] * xx + c[1] * yy + 0.5 * c[2] * xx * yy + 0.5 * c[3] * (xx**2 + yy**2)))
    sig = img * field
    n1 = rng.standard_normal(sig.shape, dtype=np.float32) * noise
    n2 = rng.standard_normal(sig.shape, dtype=np.float32) * noise
    mag = np.sqrt((sig + n1) ** 2 + n2**2)
    return np.clip(np.rint(mag * scale), 0, max_value)


__all__ = ["BACKGROUND", "LV_CAVITY", "LV_MYO", "RV_CAVITY", "SCAR", "Grid", "N_SECTORS", "render", "scanner_effects"]
