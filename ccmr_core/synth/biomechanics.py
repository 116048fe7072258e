"""Biomechanical time series derived from the phantom's ventricular volume and wall motion.

Intraventricular pressure gradient (IVPG) follows the one-dimensional Euler equation along the
long axis, dp = rho * L * (dQ/dt) / A, with Q the LV flow rate and A the mean cavity area; the
wall-motion dispersion is the spread of endocardial radial velocity across sectors, high where
some segments move and others do not (infarction).
"""

from __future__ import annotations

import numpy as np

from ccmr_core.synth.anatomy import Heart, radii

SIGNALS = ("lv_volume_ml", "lv_flow_ml_s", "ivpg_mmHg", "wall_motion_dispersion_mm_s")
BLOOD_DENSITY = 1060.0  # kg/m^3
PA_PER_MMHG = 133.322
N_SAMPLES = 40


def biomechanics(heart: Heart, slice_spacing_mm: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Times (ms) and signals (N_SAMPLES, len(SIGNALS)) for one cardiac cycle, with 3% noise."""
    phases = np.arange(N_SAMPLES) / N_SAMPLES
    t_ms = phases * heart.rr_ms
    dt = heart.rr_ms / N_SAMPLES / 1000.0  # s
    r_endo, _ = radii(heart, phases)  # (T, S, N)
    area = np.pi * (r_endo**2).mean(-1)  # (T, S) mm^2
    volume = area.sum(-1) * slice_spacing_mm / 1000.0  # ml
    flow = (np.roll(volume, -1) - np.roll(volume, 1)) / (2 * dt)  # ml/s, periodic
    dqdt = (np.roll(flow, -1) - np.roll(flow, 1)) / (2 * dt)  # ml/s^2
    length_m = heart.n_slices * slice_spacing_mm / 1000.0
    mean_area_m2 = area.mean(-1) * 1e-6
    ivpg = BLOOD_DENSITY * length_m * dqdt * 1e-6 / mean_area_m2 / PA_PER_MMHG
    vel = (np.roll(r_endo, -1, axis=0) - np.roll(r_endo, 1, axis=0)) / (2 * dt)  # mm/s
    dispersion = vel.std(-1).mean(-1)
    sig = np.stack([volume, flow, ivpg, dispersion], axis=1)
    noise = rng.normal(0, 0.03, sig.shape) * np.abs(sig).mean(0, keepdims=True)
    return t_ms, sig + noise
