"""Cardiac measurements a clinical CMR report states, usable as optional training targets.

A hospital's ``labels.csv`` may carry some of these columns (from the report of each study).
Models learn to estimate them from cine as an auxiliary task during training; inference needs
cine only, and a missing value is simply not a target for that patient.

Targets are standardised with fixed, physiological constants (not statistics of one site's
data), so every site of a federation trains towards the same scale and nothing about a site's
patients is baked into the model's units.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Measurement:
    name: str
    unit: str
    description: str
    centre: float  # typical value (standardisation)
    scale: float  # typical spread (standardisation)
    low: float  # values outside [low, high] are refused as implausible
    high: float

    def standardise(self, value: float) -> float:
        return (value - self.centre) / self.scale

    def unstandardise(self, z: float) -> float:
        return z * self.scale + self.centre


MEASUREMENTS: dict[str, Measurement] = {m.name: m for m in (
    Measurement("lvef", "%", "left-ventricular ejection fraction", 55.0, 15.0, 3.0, 95.0),
    Measurement("lvedv_ml", "ml", "left-ventricular end-diastolic volume", 150.0, 60.0, 10.0, 700.0),
    Measurement("lvesv_ml", "ml", "left-ventricular end-systolic volume", 70.0, 50.0, 2.0, 650.0),
    Measurement("rvef", "%", "right-ventricular ejection fraction", 48.0, 12.0, 3.0, 95.0),
    Measurement("rvedv_ml", "ml", "right-ventricular end-diastolic volume", 160.0, 60.0, 10.0, 800.0),
    Measurement("max_wall_mm", "mm", "maximal left-ventricular wall thickness", 12.0, 4.0, 2.0, 45.0),
    # the AHA wall motion score index: the mean over the 16 segments of 1 normal, 2 hypokinetic,
    # 3 akinetic, 4 dyskinetic (1.0 = no regional abnormality), as CMR and echo reports state it
    Measurement("wmsi", "", "wall motion score index (mean of the 16 AHA segments' scores, 1-4)", 1.2, 0.4, 1.0,
                4.0),
)}
# the targets a run learns unless data.measurements says otherwise; the wall motion score index is
# opt-in (a benchmarked pilot, BENCHMARKS.md) so that the default model is the one every table measured
DEFAULT_MEASUREMENTS = ("lvef", "lvedv_ml", "lvesv_ml", "rvef", "rvedv_ml", "max_wall_mm")


def check_names(names) -> tuple[str, ...]:
    unknown = [n for n in names if n not in MEASUREMENTS]
    if unknown:
        raise ValueError(f"unknown measurement(s) {', '.join(map(repr, unknown))}; known: {', '.join(MEASUREMENTS)}")
    return tuple(names)


def parse_value(name: str, text: str) -> float:
    """A report value from a labels.csv cell; ValueError says what is wrong with it."""
    m = MEASUREMENTS[name]
    try:
        v = float(text)
    except ValueError:
        raise ValueError(f"{name} {text!r} is not a number ({m.unit})") from None
    if not np.isfinite(v) or not (m.low <= v <= m.high):
        raise ValueError(f"{name} {text!r} is outside the plausible range {m.low:g}-{m.high:g} {m.unit}")
    return v


def targets(values: dict[str, float], names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Standardised targets (M,) and which are present (M,) for one patient's report values."""
    z = np.zeros(len(names), np.float32)
    has = np.zeros(len(names), bool)
    for i, n in enumerate(names):
        if n in values:
            z[i], has[i] = MEASUREMENTS[n].standardise(values[n]), True
    return z, has


def from_outputs(z: np.ndarray, names: tuple[str, ...]) -> dict[str, float]:
    """A model's standardised estimates back in report units."""
    return {n: float(MEASUREMENTS[n].unstandardise(float(v))) for n, v in zip(names, z)}
