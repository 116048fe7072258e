"""An independent external site for generalisation tests (``ccmr synth --external``).

Another vendor and protocol, and another anatomy model drawn on top of the class physics, so a
model trained on the standard cohort meets a site it has not seen in kind, as models trained at
one group of hospitals meet another hospital: elliptical LV cross-sections, trabeculated
endocardium, papillary muscles that move with the wall, another ejection curve, another
population (body size), other tissue contrasts, 25-30 frames varying per patient, steeper
obliquity. What defines each class (EF, volumes, walls, regional motion, RV, scar) is unchanged:
the site tests generalisation, not a new disease definition.

Honest limits: it comes from the same code base as the training sites (the render engine, noise
model and class rules), so it is less independent than a phantom written by another team.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ccmr_core.synth.anatomy import N_SECTORS, SECTOR_ANGLES, Heart, Shape, sample_heart
from ccmr_core.synth.sites import SiteProfile

CINE_CONTRAST = {"blood": 1.0, "myo": 0.33, "fat": 0.95, "lung": 0.08, "tissue": 0.47, "liver": 0.38}
LGE_CONTRAST = {"blood": 0.36, "myo": 0.05, "scar": 0.92, "fat": 0.62, "lung": 0.03, "tissue": 0.24, "liver": 0.2}

EXTERNAL_SITE = SiteProfile(
    name="site-x",
    description="independent external site: another vendor, protocol and anatomy model",
    manufacturer="CANON_MEC",
    model="Vantage Orian",
    field_strength=1.5,
    matrix=160,
    pixel_spacing=1.9,
    frames=28,
    slice_thickness=7.0,
    slice_gap=3.0,
    intensity_scale=2400.0,
    noise=0.05,
    bias=0.25,
    signed=False,
    implicit_vr=True,
    slice_location=True,
    layout="hashed",
    cine_description="SAX cine bSSFP",
    lge_description="PSIR SAX",
    inversion_time=(270.0, 350.0),
    class_mix={"NOR": 0.25, "MINF": 0.25, "DCM": 0.2, "HCM": 0.15, "ARV": 0.15},
    no_lge_share=0.15,
    weight=1.0,
    anatomy="external",
    frames_range=(25, 30),
    obliquity=0.25,
    contrast="external",
)


SHIFT_FACTORS = {
    "contrast": "another sequence's tissue contrasts",
    "frames": "25-30 cine frames varying per patient (else 28 for all)",
    "obliquity": "steeper obliquity of the short-axis planes",
    "size": "another population's body size (cavity x 0.92-1.08)",
    "ellipse": "elliptical cross-sections",
    "roughness": "trabeculated endocardium",
    "papillary": "papillary muscles",
    "sine": "another ejection curve",
}
ANATOMY_FACTORS = ("size", "ellipse", "roughness", "papillary", "sine")


def external_site(without: tuple[str, ...] | list[str] = ()) -> SiteProfile:
    """The external site with the named factors of its shift (:data:`SHIFT_FACTORS`) reverted to
    the training sites' (standard contrast, one frame count, their obliquity, the standard anatomy's
    size, circles, smooth endocardium, no papillary muscles, the standard ejection curve), to
    measure what each factor costs a model. Every patient draws the same random numbers whatever
    is left out, so the variants are paired patient by patient."""
    unknown = sorted(set(without) - set(SHIFT_FACTORS))
    if unknown:
        raise ValueError(f"unknown external shift factor(s) {', '.join(unknown)}: choose from {', '.join(SHIFT_FACTORS)}")
    w = set(without)
    standard = {f.name: f.default for f in dataclasses.fields(SiteProfile)}
    return dataclasses.replace(
        EXTERNAL_SITE,
        contrast=standard["contrast"] if "contrast" in w else EXTERNAL_SITE.contrast,
        frames_range=None if "frames" in w else EXTERNAL_SITE.frames_range,
        obliquity=standard["obliquity"] if "obliquity" in w else EXTERNAL_SITE.obliquity,
        anatomy_without=tuple(f for f in ANATOMY_FACTORS if f in w))


def sample_external_heart(diagnosis: str, rng: np.random.Generator, slice_spacing_mm: float,
                          without: tuple[str, ...] = ()) -> Heart:
    """A heart of ``diagnosis`` from the external anatomy model, less the anatomy factors named in
    ``without`` (:data:`ANATOMY_FACTORS`); the random draws are the same whatever is left out."""
    h = sample_heart(diagnosis, rng, slice_spacing_mm)
    size = rng.uniform(0.92, 1.08)  # another population: body size scales the cavity (EF is unchanged)
    k = np.arange(8, 13)
    phase = rng.uniform(0, 2 * np.pi, (h.n_slices, len(k)))
    amp = rng.uniform(0.02, 0.05)  # endocardial irregularity of about 4-11% of the radius
    rough = 1 + amp * np.cos(SECTOR_ANGLES[None, :, None] * k[None, None, :] + phase[:, None, :]).mean(-1) * np.sqrt(len(k))
    ellipticity, angle, papillary = float(rng.uniform(0.78, 0.92)), float(rng.uniform(0, np.pi)), float(rng.uniform(2.5, 4.0))
    shape = Shape(ellipticity=1.0 if "ellipse" in without else ellipticity, ellipse_angle=angle,
                  roughness=None if "roughness" in without else np.clip(rough, 0.85, 1.15).reshape(h.n_slices, N_SECTORS),
                  papillary_mm=0.0 if "papillary" in without else papillary,
                  curve="standard" if "sine" in without else "sine")
    return dataclasses.replace(h, r_endo_ed=h.r_endo_ed * (1.0 if "size" in without else size), shape=shape)
