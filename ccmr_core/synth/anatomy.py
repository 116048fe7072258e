"""Per-patient heart parameters: each diagnosis is defined by physics, not by a marker.

Geometry is described in an anatomical polar frame per short-axis slice: angle 0 points from the
LV centre to the middle of the interventricular septum (towards the RV), angles grow through the
anterior wall (+90 deg), the lateral wall (180 deg) and the inferior wall (270 deg). Depth in the
wall runs from 0 (endocardium) to 1 (epicardium). Slice position z runs from 0 (base) to 1 (the
apical tip); the acquired stack covers z in [0, APEX_COVERAGE].

Motion: the endocardial radius of sector (z, theta) at cardiac phase t is
``r_ed * (1 - s * m(z, theta) * f(t))`` with ``f`` the contraction curve (0 at end-diastole, 1 at
end-systole) and ``m`` the regional contractility. The shortening ``s`` is solved in closed form so
that the stack's ejection fraction equals the sampled target EF. Each sector keeps its myocardial
cross-section area through the cycle (incompressible wall), so walls thicken as cavities shrink.

Scar and motion follow one law for every diagnosis, as in patients: a sector's contractility falls
with the transmural extent of its scar (``scar_contractility``): under about 10% of the wall it is
unchanged, at half the wall it is markedly hypokinetic, beyond about 60% akinetic. So a small
subendocardial infarct can be bright on LGE and nearly invisible on cine, mid-wall fibrosis in
DCM and patchy scar in HCM slow their segments, and LGE has something of its own to teach.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

N_SECTORS = 36
APEX_COVERAGE = 0.86
SECTOR_ANGLES = np.arange(N_SECTORS) * (2 * np.pi / N_SECTORS)

# Coronary territories as (centre angle, half width) in the anatomical frame, and the part of
# the long axis (z range) each usually affects.
TERRITORIES = {
    "LAD": (np.deg2rad(70.0), (0.25, 0.86)),
    "LCX": (np.deg2rad(200.0), (0.0, 0.6)),
    "RCA": (np.deg2rad(295.0), (0.0, 0.65)),
}
RV_INSERTIONS = (np.deg2rad(62.0), np.deg2rad(-62.0))


@dataclass(frozen=True)
class Scar:
    """A region of enhancement in the wall: where (angles, z, depth) and its shape."""

    kind: str  # "subendocardial", "midwall", "patchy"
    centre: float  # anatomical angle, rad
    half_width: float  # rad
    z_range: tuple[float, float]
    depth: tuple[float, float]  # fraction of wall, 0 = endocardium
    blobs: tuple[tuple[float, float, float], ...] = ()  # patchy: (angle, z, radius_rad)


@dataclass(frozen=True)
class Shape:
    """How an anatomy model draws the LV beyond circles: the standard cohort uses none of it; the
    external site's anatomy model (ccmr_core/synth/external.py) uses all of it."""

    ellipticity: float = 1.0  # minor / major axis of the LV cross-section (same area as the circle)
    ellipse_angle: float = 0.0  # rad, image orientation of the major axis
    roughness: np.ndarray | None = None  # (S, N_SECTORS) multiplicative endocardial radius (trabeculae)
    papillary_mm: float = 0.0  # radius of the two papillary muscles at mid-ventricle (0 = none)
    curve: str = "standard"  # contraction curve: "standard" or "sine" (another ejection shape)


@dataclass(frozen=True)
class Heart:
    """Everything needed to render one patient's cine and LGE and to derive ground truth."""

    diagnosis: str
    variant: str  # e.g. "typical", "preserved-ef", "dilated", "concentric"
    z: np.ndarray  # (S,) slice positions along the long axis, 0 = base
    r_endo_ed: np.ndarray  # (S,) end-diastolic endocardial radius, mm
    wall_ed: np.ndarray  # (S, N_SECTORS) end-diastolic wall thickness, mm
    motion: np.ndarray  # (S, N_SECTORS) regional contractility in [0, 1]
    shortening: float  # s, solved for the target EF
    ef_target: float
    rv_scale: float  # RV size relative to a normal RV for this LV
    rv_ef: float
    rr_ms: float
    es_phase: float  # end-systole as a fraction of the RR interval
    relaxation: float  # width of early filling (larger = impaired relaxation)
    scars: tuple[Scar, ...] = field(default_factory=tuple)
    rv_angle: float = np.pi  # image angle (rad) of the septum direction
    centre_mm: tuple[float, float] = (0.0, 0.0)  # LV centre offset from the image centre
    axis_tilt_mm: tuple[float, float] = (0.0, 0.0)  # LV centre drift from base to apex
    has_lge: bool = True
    shape: Shape = field(default_factory=Shape)

    @property
    def n_slices(self) -> int:
        return int(self.z.shape[0])


def contraction_curve(phase: np.ndarray, es_phase: float, relaxation: float, kind: str = "standard") -> np.ndarray:
    """f(phase) in [0, 1]: 0 at end-diastole, 1 at end-systole, rapid filling, diastasis, atrial kick.
    ``kind`` "sine" ejects faster early in systole (another anatomy model's curve)."""
    phase = np.mod(phase, 1.0)
    f = np.empty_like(phase, dtype=np.float64)
    sys = phase <= es_phase
    if kind == "sine":
        f[sys] = np.sin(0.5 * np.pi * phase[sys] / es_phase) ** 1.5
    else:
        f[sys] = 0.5 * (1 - np.cos(np.pi * phase[sys] / es_phase))
    u = (phase[~sys] - es_phase) / (1 - es_phase)
    atrial = 0.22 + 0.25 * max(0.0, relaxation - 0.2)  # stiffer ventricles lean on the atrium
    smooth = np.clip((u - 0.72) / 0.28, 0, 1)
    smooth = smooth * smooth * (3 - 2 * smooth)
    f[~sys] = (1 - atrial) * np.exp(-((u / relaxation) ** 2)) + atrial * (1 - smooth)
    return f


def solve_shortening(r_endo_ed: np.ndarray, motion: np.ndarray, ef: float) -> float | None:
    """s such that 1 - sum(w (1 - s m)^2) / sum(w) == ef, with w the sector area at ED."""
    w = np.broadcast_to((r_endo_ed**2)[:, None], motion.shape)
    m1 = float((w * motion).sum() / w.sum())
    m2 = float((w * motion**2).sum() / w.sum())
    disc = m1 * m1 - m2 * ef
    if m2 <= 0 or disc < 0:
        return None
    s = (m1 - np.sqrt(disc)) / m2
    return float(s) if 0.0 < s < 0.75 else None


def _angdiff(a: np.ndarray | float, b: float) -> np.ndarray:
    return np.angle(np.exp(1j * (np.asarray(a) - b)))


def _taper(angle_diff: np.ndarray, half_width: float, edge: float = 0.35) -> np.ndarray:
    """1 inside the window, cosine fall-off over ``edge`` rad, 0 outside."""
    d = np.abs(angle_diff) - half_width
    t = np.clip(d / edge, 0, 1)
    return 0.5 * (1 + np.cos(np.pi * t))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], amp: float) -> np.ndarray:
    """Low-frequency angular modulation (a few harmonics) per slice."""
    k = np.arange(1, 4)
    ph = rng.uniform(0, 2 * np.pi, size=(shape[0], 3))
    a = rng.normal(0, amp / np.sqrt(3), size=(shape[0], 3)) / k
    ang = SECTOR_ANGLES[None, :, None] * k[None, None, :] + ph[:, None, :]
    return (a[:, None, :] * np.cos(ang)).sum(-1)


def sample_heart(
    diagnosis: str,
    rng: np.random.Generator,
    slice_spacing_mm: float,
    hard_share: float = 0.25,
) -> Heart:
    """Sample one patient of ``diagnosis`` with patient-to-patient variation."""
    for _ in range(200):
        heart = _try_sample(diagnosis, rng, slice_spacing_mm, hard_share)
        if heart is not None:
            return heart
    raise RuntimeError(f"could not sample a feasible {diagnosis} heart")  # pragma: no cover


def _try_sample(diagnosis: str, rng: np.random.Generator, spacing: float, hard_share: float) -> Heart | None:
    u = rng.uniform
    hard = u() < hard_share
    variant = "typical"
    # long axis and slices
    lv_length = u(82, 98)
    r_base = u(21.5, 25.5)
    wall_base = u(7.6, 10.2)
    ef = u(0.57, 0.68)
    rv_scale, rv_ef = u(0.95, 1.08), u(0.47, 0.6)
    rr = u(780, 1150)
    relaxation = u(0.17, 0.22)
    scars: list[Scar] = []
    wall_mod = None  # callable(z, angles) -> multiplicative factor

    if diagnosis == "DCM":
        r_base, wall_base = u(29.5, 36.0), u(5.4, 6.9)
        lv_length = u(95, 112)
        ef = u(0.17, 0.37)
        rr = u(640, 950)
        rv_scale, rv_ef = u(1.0, 1.2), u(0.35, 0.52)
        if u() < 1 / 3:
            scars.append(Scar("midwall", 0.0, u(0.55, 0.9), (u(0.0, 0.2), u(0.55, 0.8)), (u(0.3, 0.4), u(0.58, 0.7))))
    elif diagnosis == "MINF":
        territory = ("LAD", "LCX", "RCA")[rng.choice(3, p=[0.5, 0.2, 0.3])]
        centre, z_range = TERRITORIES[territory]
        centre += u(-0.25, 0.25)
        transmural = u(0.3, 1.0)
        if hard and u() < 0.5:
            variant = "preserved-ef"  # small subendocardial infarct: bright on LGE, subtle or no cine cue
            half = u(0.5, 0.8)
            ef = u(0.5, 0.57)
            transmural = u(0.2, 0.35)
        elif hard:
            variant = "dilated"  # volumes like DCM; the regional pattern tells them apart
            half = u(1.0, 1.35)
            r_base = u(29.0, 33.5)
            lv_length = u(95, 108)
            ef = u(0.25, 0.37)
            transmural = u(0.55, 1.0)
        else:
            half = u(0.7, 1.2)
            r_base = u(23.0, 29.0)
            ef = u(0.3, 0.48)
        z0, z1 = z_range
        zr = (max(0.0, z0 + u(-0.1, 0.1)), min(1.0, z1 + u(-0.1, 0.05)))
        scars.append(Scar("subendocardial", centre, half, zr, (0.0, transmural)))
        thinning = 1 - 0.45 * max(0.0, transmural - 0.4) / 0.6

        def wall_mod(zz: np.ndarray, ang: np.ndarray, _c=centre, _h=half, _zr=zr, _t=thinning) -> np.ndarray:
            return 1 - (1 - _t) * _taper(_angdiff(ang, _c), _h, 0.3) * _zwin(zz, _zr)

    elif diagnosis == "HCM":
        r_base = u(15.5, 20.5)
        ef = u(0.63, 0.78)
        relaxation = u(0.26, 0.34)  # impaired relaxation: slow early filling
        rr = u(800, 1150)
        if u() < 0.75:
            septal, lateral = u(16.5, 25.0), u(9.0, 12.0)
            half_sept = u(0.9, 1.3)

            def wall_abs(zz: np.ndarray, ang: np.ndarray, _s=septal, _l=lateral, _h=half_sept) -> np.ndarray:
                return _l + (_s - _l) * _taper(_angdiff(ang, 0.0), _h, 0.6)

        else:
            variant = "concentric"
            thick = u(15.8, 19.5)

            def wall_abs(zz: np.ndarray, ang: np.ndarray, _t=thick) -> np.ndarray:
                return np.full(np.broadcast(zz, ang).shape, _t)

        wall_mod = ("absolute", wall_abs)
        if u() < 0.5:
            blobs = []
            for ins in RV_INSERTIONS:
                for _ in range(int(rng.integers(2, 5))):
                    blobs.append((ins + u(-0.3, 0.3), u(0.05, 0.7), u(0.1, 0.22)))
            scars.append(Scar("patchy", 0.0, 0.0, (0.0, 0.8), (0.25, 0.75), tuple(blobs)))
    elif diagnosis == "ARV":
        ef = u(0.53, 0.65)
        rv_scale, rv_ef = u(1.35, 1.7), u(0.16, 0.33)
    elif diagnosis != "NOR":
        raise ValueError(f"unknown diagnosis {diagnosis!r}")

    n_slices = int(np.clip(round(lv_length * APEX_COVERAGE / spacing) + 1, 6, 12))
    z = np.linspace(0.0, APEX_COVERAGE, n_slices)
    r_endo = r_base * np.sqrt(1 - (z / 1.0) ** 2 * 0.78)
    ang = SECTOR_ANGLES[None, :]
    zz = z[:, None]
    natural = 1 + _smooth_noise(rng, (n_slices, N_SECTORS), 0.06)
    if isinstance(wall_mod, tuple):
        wall = wall_mod[1](zz, ang) * natural
    else:
        wall = wall_base * natural
        if wall_mod is not None:
            wall = wall * wall_mod(zz, ang)
    wall = wall * (1 - 0.1 * zz)  # slightly thinner towards the apex
    motion = np.clip(1 + _smooth_noise(rng, (n_slices, N_SECTORS), 0.08), 0.75, 1.15)
    if diagnosis == "NOR":
        motion = motion * (1 + 0.08 * np.cos(ang - np.pi))  # lateral wall moves a bit more
    motion = np.clip(motion * scar_contractility(scar_transmurality(tuple(scars), z)), 0.0, 1.2)
    s = solve_shortening(r_endo, motion, ef)
    if s is None:
        return None
    es_phase = float(np.clip(0.30 + (1000 - rr) / 1000 * 0.3, 0.28, 0.45))
    rv_angle = np.pi + u(-0.35, 0.35)
    return Heart(
        diagnosis=diagnosis,
        variant=variant,
        z=z,
        r_endo_ed=r_endo,
        wall_ed=np.maximum(wall, 2.5),
        motion=motion,
        shortening=s,
        ef_target=ef,
        rv_scale=rv_scale,
        rv_ef=rv_ef,
        rr_ms=rr,
        es_phase=es_phase,
        relaxation=relaxation,
        scars=tuple(scars),
        rv_angle=float(rv_angle),
        centre_mm=(float(u(-14, 14)), float(u(-14, 14))),
        axis_tilt_mm=(float(u(-8, 8)), float(u(-8, 8))),
    )


def scar_field(scars: tuple[Scar, ...], z: np.ndarray, theta: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """Scar fraction in [0, 1] at anatomical angle ``theta`` and wall depth ``depth`` (0 =
    endocardium), for slices at long-axis positions ``z``; arrays shaped (S, ...) like theta."""
    zz = z.reshape((-1,) + (1,) * (theta.ndim - 1))
    out = np.zeros(theta.shape, np.float32)
    for sc in scars:
        zwin = np.clip((zz - sc.z_range[0] + 0.06) / 0.06, 0, 1) * np.clip((sc.z_range[1] + 0.06 - zz) / 0.06, 0, 1)
        if sc.kind == "patchy":
            f = np.zeros_like(out)
            for ang, zc, rad in sc.blobs:
                da = np.angle(np.exp(1j * (theta - ang)))
                g = np.exp(-0.5 * ((da / rad) ** 2 + ((zz - zc) / 0.12) ** 2 + ((depth - 0.5) / 0.22) ** 2))
                f = np.maximum(f, g)
            field = np.clip((f - 0.35) / 0.15, 0, 1)
        else:
            da = np.abs(np.angle(np.exp(1j * (theta - sc.centre))))
            ang_in = np.clip((sc.half_width - da) / 0.12 + 0.5, 0, 1)
            # irregular border: the depth limit varies smoothly with angle
            lo, hi = sc.depth
            wobble = 0.08 * np.sin(3 * theta + sc.centre) if sc.kind == "subendocardial" else 0.04 * np.sin(5 * theta)
            d_in = np.clip((hi + wobble - depth) / 0.06 + 0.5, 0, 1) * np.clip((depth - lo) / 0.06 + 0.5, 0, 1)
            field = ang_in * d_in
        out = np.maximum(out, field * zwin)
    return out


def scar_transmurality(scars: tuple[Scar, ...], z: np.ndarray, depths: int = 21) -> np.ndarray:
    """Transmural extent of scar (share of the wall's depth) per slice and sector, (S, N_SECTORS)."""
    if not scars:
        return np.zeros((len(z), N_SECTORS))
    d = np.linspace(0.0, 1.0, depths)
    theta = np.broadcast_to(SECTOR_ANGLES[None, :, None], (len(z), N_SECTORS, depths))
    depth = np.broadcast_to(d[None, None, :], theta.shape)
    return scar_field(scars, z, theta, depth).mean(-1).astype(np.float64)


def scar_contractility(transmurality: np.ndarray) -> np.ndarray:
    """Share of a sector's contraction left by its scar: 1 below 10% transmural extent, falling
    linearly to 0.05 (akinetic) at 60% and beyond."""
    return 1.0 - 0.95 * np.clip((transmurality - 0.1) / 0.5, 0.0, 1.0)


def scar_extent(heart: "Heart") -> float:
    """Share of the LV myocardium (by end-diastolic cross-section area) that is scar."""
    t = scar_transmurality(heart.scars, heart.z)
    r, w = heart.r_endo_ed[:, None], heart.wall_ed
    area = (r + w) ** 2 - r**2
    return float((t * area).sum() / area.sum())


def _zwin(zz: np.ndarray, z_range: tuple[float, float], edge: float = 0.08) -> np.ndarray:
    lo, hi = z_range
    a = np.clip((zz - lo + edge) / edge, 0, 1)
    b = np.clip((hi + edge - zz) / edge, 0, 1)
    return np.minimum(a, b)


def radii(heart: Heart, phases: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Endocardial and epicardial radii (T, S, N_SECTORS) in mm at the given cardiac phases."""
    f = contraction_curve(np.asarray(phases, dtype=np.float64), heart.es_phase, heart.relaxation, heart.shape.curve)
    r_ed = heart.r_endo_ed[:, None]
    if heart.shape.roughness is not None:
        r_ed = r_ed * heart.shape.roughness
    r_endo = r_ed * (1 - heart.shortening * heart.motion[None] * f[:, None, None])
    area = (r_ed + heart.wall_ed) ** 2 - r_ed**2  # conserved per sector
    r_epi = np.sqrt(r_endo**2 + area[None])
    return r_endo, r_epi


def lv_volume_ml(heart: Heart, phases: np.ndarray, slice_spacing_mm: float) -> np.ndarray:
    """Analytic LV cavity volume over the stack (Simpson's rule, as the masks would measure)."""
    r_endo, _ = radii(heart, phases)
    area = (r_endo**2).mean(-1) * np.pi  # mm^2 per slice
    return area.sum(-1) * slice_spacing_mm / 1000.0
