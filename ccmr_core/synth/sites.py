"""Site effects: each hospital has its own scanner profile, export habits and class mix (non-IID)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from ccmr_core.classes import DEFAULT_CLASSES


@dataclass(frozen=True)
class SiteProfile:
    name: str
    description: str
    manufacturer: str
    model: str
    field_strength: float  # T
    matrix: int
    pixel_spacing: float  # mm
    frames: int  # cine phases per cycle (CardiacNumberOfImages)
    slice_thickness: float  # mm
    slice_gap: float  # mm
    intensity_scale: float  # stored value of relative intensity 1.0
    noise: float  # Rician sigma relative to blood on cine
    bias: float  # strength of the smooth receive-coil bias field
    signed: bool  # int16 (PixelRepresentation 1) instead of uint16
    implicit_vr: bool
    slice_location: bool  # writes SliceLocation (some exports omit it)
    layout: str  # "nested", "hashed" or "flat" (file naming and folder habits)
    cine_description: str  # "" = unnamed series
    lge_description: str
    inversion_time: tuple[float, float]  # ms range
    class_mix: dict[str, float]
    no_lge_share: float
    weight: float  # share of the cohort's patients
    anatomy: str = "standard"  # which anatomy model draws the hearts ("external": ccmr_core/synth/external.py)
    frames_range: tuple[int, int] | None = None  # cine frames drawn per patient instead of ``frames``
    obliquity: float = 0.12  # spread of the short-axis plane's orientation
    contrast: str = "standard"  # tissue intensities ("external": another sequence's)
    anatomy_without: tuple[str, ...] = ()  # external anatomy factors left out (ccmr_core/synth/external.py)

    @property
    def slice_spacing(self) -> float:
        return self.slice_thickness + self.slice_gap


BASE_SITES: tuple[SiteProfile, ...] = (
    SiteProfile(
        name="site-a",
        description="university hospital, 1.5 T, broad case mix",
        manufacturer="SIEMENS",
        model="Aera",
        field_strength=1.5,
        matrix=128,
        pixel_spacing=2.3,
        frames=25,
        slice_thickness=8.0,
        slice_gap=2.0,
        intensity_scale=1800.0,
        noise=0.035,
        bias=0.15,
        signed=False,
        implicit_vr=False,
        slice_location=True,
        layout="nested",
        cine_description="cine_trufi_sax",
        lge_description="de_psir_sax",
        inversion_time=(260.0, 330.0),
        class_mix={"NOR": 0.28, "MINF": 0.26, "DCM": 0.2, "HCM": 0.12, "ARV": 0.14},
        no_lge_share=0.1,
        weight=0.40,
    ),
    SiteProfile(
        name="site-b",
        description="cardiomyopathy referral centre, 3 T, rich in HCM",
        manufacturer="Philips",
        model="Ingenia 3.0T",
        field_strength=3.0,
        matrix=144,
        pixel_spacing=2.0,
        frames=30,
        slice_thickness=7.0,
        slice_gap=3.0,
        intensity_scale=3200.0,
        noise=0.045,
        bias=0.32,
        signed=False,
        implicit_vr=True,
        slice_location=True,
        layout="hashed",
        cine_description="SA BTFE CINE",
        lge_description="LGE SA 3D",
        inversion_time=(300.0, 400.0),
        class_mix={"NOR": 0.12, "MINF": 0.1, "DCM": 0.25, "HCM": 0.4, "ARV": 0.13},
        no_lge_share=0.15,
        weight=0.33,
    ),
    SiteProfile(
        name="site-c",
        description="community hospital, 1.5 T, mostly ischaemic disease, older scanner",
        manufacturer="GE MEDICAL SYSTEMS",
        model="Signa HDxt",
        field_strength=1.5,
        matrix=112,
        pixel_spacing=2.6,
        frames=20,
        slice_thickness=10.0,
        slice_gap=0.0,
        intensity_scale=1000.0,
        noise=0.06,
        bias=0.22,
        signed=True,
        implicit_vr=False,
        slice_location=False,
        layout="flat",
        cine_description="",
        lge_description="",
        inversion_time=(240.0, 320.0),
        class_mix={"NOR": 0.3, "MINF": 0.4, "DCM": 0.12, "HCM": 0.08, "ARV": 0.1},
        no_lge_share=0.25,
        weight=0.27,
    ),
)


def site_profiles(n_sites: int, seed: int) -> list[SiteProfile]:
    """The three base sites, then perturbed copies of them for larger federations."""
    out = list(BASE_SITES[:n_sites])
    rng = np.random.default_rng([seed, 7919])
    for i in range(len(out), n_sites):
        base = BASE_SITES[i % len(BASE_SITES)]
        mix = rng.dirichlet([2.0] * len(DEFAULT_CLASSES))
        name = f"site-{chr(ord('a') + i)}" if i < 26 else f"site-{i + 1:03d}"
        out.append(
            dataclasses.replace(
                base,
                name=name,
                description=f"{base.description} (variant)",
                matrix=int(base.matrix + 16 * rng.integers(-1, 2)),
                pixel_spacing=float(np.round(base.pixel_spacing * rng.uniform(0.9, 1.1), 2)),
                frames=int(rng.integers(20, 31)),
                intensity_scale=float(np.round(base.intensity_scale * rng.uniform(0.6, 1.6))),
                noise=float(base.noise * rng.uniform(0.8, 1.3)),
                class_mix=dict(zip(DEFAULT_CLASSES, map(float, mix))),
                no_lge_share=float(rng.uniform(0.05, 0.3)),
                weight=float(rng.uniform(0.2, 0.4)),
            )
        )
    return out


def allocate(total: int, weights: list[float]) -> list[int]:
    """Split ``total`` by ``weights`` with the largest-remainder method (exact, deterministic)."""
    w = np.asarray(weights, dtype=np.float64)
    raw = total * w / w.sum()
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[: total - counts.sum()]:
        counts[i] += 1
    return [int(c) for c in counts]


def site_diagnoses(site: SiteProfile, n: int, rng: np.random.Generator) -> list[str]:
    """Exactly the site's class mix for n patients (largest remainder), in random order."""
    names = list(site.class_mix)
    counts = allocate(n, [site.class_mix[c] for c in names])
    out = [c for c, k in zip(names, counts) for _ in range(k)]
    rng.shuffle(out)
    return out


def public_profiles(n_sites: int, seed: int, generator: str = "project") -> list[SiteProfile]:
    """Scanner profiles of a "public" cohort (the stand-in for public data such as ACDC or M&Ms):
    perturbed variants of the base scanners, named public-1, public-2, ..., none of them a
    federation site's scanner, with a balanced class mix. ``generator`` 'external': their hearts,
    tissue contrast, obliquity and frame counts come from the external site's phantom instead
    (ccmr_core/synth/external.py), so the public data differ from the sites' in more than scanners."""
    from ccmr_core.synth.external import EXTERNAL_SITE

    variants = site_profiles(len(BASE_SITES) + n_sites, seed + 104729)[len(BASE_SITES):]
    balanced = {c: 1.0 / len(DEFAULT_CLASSES) for c in DEFAULT_CLASSES}
    other = {}
    if generator == "external":
        e = EXTERNAL_SITE
        other = dict(anatomy=e.anatomy, contrast=e.contrast, frames_range=e.frames_range, obliquity=e.obliquity)
    elif generator != "project":
        raise ValueError(f"public cohort generator {generator!r}: choose project or external")
    return [dataclasses.replace(v, name=f"public-{k + 1}", description=f"public cohort ({generator} phantom), "
                                f"{v.description}", class_mix=balanced, **other) for k, v in enumerate(variants)]
