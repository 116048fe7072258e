"""Generate the synthetic multi-site cine + LGE DICOM cohort (``ccmr synth``).

Output (DIR):
    DIR/<site>/labels.csv            patient_id,diagnosis,<report measurements: lvef, lvedv_ml, ...>
    DIR/<site>/biomechanics.csv      patient_id,t,<signals...>
    DIR/<site>/**                    DICOM, laid out as that site's PACS exports it
    DIR/groundtruth/<site>.json      per-patient physics (EF, walls, scar) for tests and checks
    DIR/groundtruth/masks/<site>/<patient>.npz   label masks (only with masks=True)
    DIR/cohort.json                  what was generated, from which parameters

The cohort is written to a sibling temporary folder and moved into place when complete, so an
interrupted run never leaves a half cohort behind. Every byte depends only on the parameters.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import multiprocessing as mp
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ccmr_core.measurements import MEASUREMENTS
from ccmr_core.proc import worker_pool
from ccmr_core.synth.anatomy import Heart, lv_volume_ml, sample_heart, scar_extent, scar_transmurality
from ccmr_core.synth.reports import aha_segments, habits_for, wall_motion_score_index, write_report
from ccmr_core.synth.biomechanics import SIGNALS, biomechanics
from ccmr_core.synth.external import CINE_CONTRAST, LGE_CONTRAST, external_site, sample_external_heart
from ccmr_core.synth.dicom_writer import SeriesTemplate, base_dataset, stable_uid, write_bytes
from ccmr_core.synth.render import Grid, render, rv_edv_ml, scanner_effects
from ccmr_core.synth.sites import SiteProfile, allocate, public_profiles, site_diagnoses, site_profiles

GENERATOR_VERSION = 2  # 2: scar transmurality sets regional contractility


class CohortExistsError(FileExistsError):
    pass


@dataclass(frozen=True)
class PatientJob:
    out: str
    site: SiteProfile
    site_index: int
    index: int
    diagnosis: str
    seed: int
    with_masks: bool
    kind: str = "sites"  # which cohort (generate_cohort's kind): its sites' reporting habits

    @property
    def patient_id(self) -> str:
        return f"{self.site.name.upper()}-{self.index + 1:04d}"


def _orientation(rng: np.random.Generator, obliquity: float = 0.12) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row direction, column direction and slice normal (base to apex) of an oblique short axis."""
    n = np.array([0.62, -0.45, -0.64]) + rng.normal(0, obliquity, 3)
    n /= np.linalg.norm(n)
    row = np.cross(n, [0.0, 0.0, 1.0])
    row /= np.linalg.norm(row)
    col = np.cross(n, row)
    a = rng.uniform(-0.3, 0.3)
    row, col = np.cos(a) * row + np.sin(a) * col, -np.sin(a) * row + np.cos(a) * col
    return row, col, np.cross(row, col)


REPORT_MISSING = 0.1  # share of report values a cardiologist did not state


def report_values(heart: Heart, slice_spacing: float, rng: np.random.Generator) -> tuple[dict, dict]:
    """What the study's clinical report states (labels.csv measurement columns): the phantom's
    volumes, ejection fractions and maximal wall thickness with reader error and rounding, some
    values not stated; and the exact values (ground truth)."""
    edv, esv = lv_volume_ml(heart, np.array([0.0, heart.es_phase]), slice_spacing)
    exact = {"lvef": 100 * (edv - esv) / edv, "lvedv_ml": edv, "lvesv_ml": esv, "rvef": 100 * heart.rv_ef,
             "rvedv_ml": rv_edv_ml(heart, slice_spacing), "max_wall_mm": float(heart.wall_ed.max())}
    vol_err = rng.normal(0, 0.07)  # a reader's contours are consistently a little tight or loose
    read = {"lvef": exact["lvef"] + rng.normal(0, 3.0), "lvedv_ml": edv * (1 + vol_err),
            "lvesv_ml": esv * (1 + vol_err + rng.normal(0, 0.05)), "rvef": exact["rvef"] + rng.normal(0, 4.0),
            "rvedv_ml": exact["rvedv_ml"] * (1 + rng.normal(0, 0.1)),
            "max_wall_mm": exact["max_wall_mm"] + rng.normal(0, 1.0)}
    stated = {k: float(round(v)) for k, v in read.items() if rng.uniform() >= REPORT_MISSING}
    return stated, {k: round(float(v), 2) for k, v in exact.items()}


def _relpath(job: PatientJob, study: str, series_no: int, desc: str, sop: str, inst: int) -> str:
    h = lambda s, k: hashlib.sha1(s.encode()).hexdigest()[:k].upper()  # noqa: E731
    if job.site.layout == "nested":
        folder = f"{series_no:03d}_{desc or 'series'}".replace(" ", "_")
        return f"{job.patient_id}/STUDY_{h(study, 6)}/{folder}/IM_{inst:04d}.dcm"
    if job.site.layout == "hashed":
        return f"DICOM/{h(study, 8)}/{h(study + str(series_no), 8)}/{h(sop, 8)}"
    return f"IMAGES/{h(sop, 12)}.dcm"


def _pixels(img: np.ndarray, signed: bool) -> bytes:
    return img.astype("<i2" if signed else "<u2").tobytes()


def generate_patient(job: PatientJob) -> dict:
    """Render and write one patient's studies; returns labels, biomechanics and ground truth."""
    site = job.site
    rng = np.random.default_rng([job.seed, job.site_index, job.index])
    external = site.anatomy == "external"
    if external:
        heart: Heart = sample_external_heart(job.diagnosis, rng, site.slice_spacing, site.anatomy_without)
    else:
        heart = sample_heart(job.diagnosis, rng, site.slice_spacing)
    heart = dataclasses.replace(heart, has_lge=bool(rng.uniform() >= site.no_lge_share))
    grid = Grid(site.matrix, site.pixel_spacing)
    frames = int(rng.integers(site.frames_range[0], site.frames_range[1] + 1)) if site.frames_range else site.frames
    contrast = dict(cine_contrast=CINE_CONTRAST, lge_contrast=LGE_CONTRAST) if site.contrast == "external" else {}
    out = render(heart, grid, frames, rng, with_masks=job.with_masks, **contrast)
    scale = site.intensity_scale * rng.uniform(0.85, 1.15)
    max_value = 32767 if site.signed else 4095
    cine = scanner_effects(out["cine"], rng, site.noise, site.bias, scale, max_value)
    lge = None
    if out["lge"] is not None:
        lge = scanner_effects(out["lge"], rng, site.noise * 1.2, site.bias, scale, max_value)

    root = Path(job.out) / site.name
    key = (job.seed, site.name, job.patient_id)
    study = stable_uid(*key, "study")
    frame_ref = stable_uid(*key, "for")
    date = f"2026{1 + job.index % 12:02d}{1 + job.index % 28:02d}"
    row, col, normal = _orientation(rng, site.obliquity)
    centre = np.array([15.0, -10.0, -20.0]) + rng.normal(0, 12, 3)
    half = (site.matrix - 1) / 2 * site.pixel_spacing
    positions = [
        centre + (k - (heart.n_slices - 1) / 2) * site.slice_spacing * normal - half * row - half * col
        for k in range(heart.n_slices)
    ]
    orient = np.concatenate([row, col])
    common = dict(
        patient_id=job.patient_id,
        study_uid=study,
        frame_of_reference=frame_ref,
        manufacturer=site.manufacturer,
        model=site.model,
        field_strength=site.field_strength,
        rows=site.matrix,
        cols=site.matrix,
        pixel_spacing=site.pixel_spacing,
        slice_thickness=site.slice_thickness,
        spacing_between_slices=site.slice_spacing,
        orientation=orient,
        signed=site.signed,
        study_date=date,
    )
    nbytes = site.matrix * site.matrix * 2

    def write_series(series_no: int, desc: str, images: np.ndarray, trig: list[float] | None, **extra) -> None:
        series = stable_uid(*key, "series", series_no)
        ds = base_dataset(series_uid=series, series_number=series_no, series_description=desc, **common, **extra)
        tpl = SeriesTemplate.build(ds, nbytes, site.implicit_vr, site.slice_location)
        inst = 0
        for s in range(heart.n_slices):
            for t in range(images.shape[0]):
                inst += 1
                sop = stable_uid(*key, series_no, inst)
                data = tpl.instance(
                    sop,
                    inst,
                    positions[s],
                    _pixels(images[t, s], site.signed),
                    slice_location=float(positions[s] @ normal),
                    trigger_time=None if trig is None else trig[t],
                )
                write_bytes(root / _relpath(job, study, series_no, desc, sop, inst), data)

    trig = [t * heart.rr_ms / frames for t in range(frames)]
    write_series(3, site.cine_description, cine, trig, cardiac={"rr": heart.rr_ms, "frames": frames})
    if lge is not None:
        ti = float(rng.uniform(*site.inversion_time))
        write_series(
            9,
            site.lge_description,
            lge[None],
            [0.78 * heart.rr_ms],
            cardiac={"rr": heart.rr_ms, "frames": 1},
            inversion_time=ti,
        )

    t_ms, sig = biomechanics(heart, site.slice_spacing, rng)
    report, exact = report_values(heart, site.slice_spacing, np.random.default_rng([job.seed, job.site_index, job.index, 17]))
    if job.with_masks:
        mdir = Path(job.out) / "groundtruth" / "masks" / site.name
        mdir.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(
            mdir / f"{job.patient_id}.npz",
            cine_mask=out["cine_mask"],
            lge_mask=out["lge_mask"],
            pixel_spacing=site.pixel_spacing,
            slice_spacing=site.slice_spacing,
        )
    wall = heart.wall_ed
    segments = aha_segments(heart)
    text_rng = np.random.default_rng([job.seed, job.site_index, job.index, 31])  # its own stream: images unchanged
    text, blind = write_report(heart, segments, report, habits_for(job.site_index, job.kind), text_rng)
    # the wall motion score index, graded as the text grades the segments; stated or not from a stream
    # of its own, so that every other value and image of the cohort is what it was before it existed
    exact["wmsi"] = round(wall_motion_score_index(segments), 3)
    if np.random.default_rng([job.seed, job.site_index, job.index, 19]).uniform() >= REPORT_MISSING:
        report["wmsi"] = round(exact["wmsi"], 2)
    return {
        "site": site.name,
        "patient_id": job.patient_id,
        "diagnosis": job.diagnosis,
        "report": report,
        "text": (text, blind),
        "bio": [(job.patient_id, float(t), *map(float, s)) for t, s in zip(t_ms, sig)],
        "truth": {
            "patient_id": job.patient_id,
            "diagnosis": job.diagnosis,
            "variant": heart.variant,
            "has_lge": lge is not None,
            "ef": round(heart.ef_target, 4),
            "rv_ef": round(heart.rv_ef, 4),
            "rv_scale": round(heart.rv_scale, 4),
            "n_slices": heart.n_slices,
            "frames": frames,
            "rr_ms": round(heart.rr_ms, 1),
            "es_frame": int(round(heart.es_phase * frames)) % frames,
            "r_endo_base_mm": round(float(heart.r_endo_ed[0]), 2),
            "wall_mean_mm": round(float(wall.mean()), 2),
            "wall_max_mm": round(float(wall.max()), 2),
            "measurements": exact,
            "scars": [sc.kind for sc in heart.scars],
            "scar_extent": round(scar_extent(heart), 4),
            "scar_transmurality_max": round(float(scar_transmurality(heart.scars, heart.z).max()), 3),
            "segments": segments,
        },
    }


def _params(sites: int, patients: int, seed: int, with_masks: bool, kind: str = "sites",
            without: tuple[str, ...] = ()) -> dict:
    out = {"generator_version": GENERATOR_VERSION, "sites": sites, "patients": patients, "seed": seed,
           "masks": with_masks}
    if without:
        out["external_without"] = sorted(without)
    return {**out, "kind": kind} if kind != "sites" else out


def cohort_matches(out: Path, sites: int, patients: int, seed: int, with_masks: bool = False,
                   kind: str = "sites", without: tuple[str, ...] = ()) -> bool:
    """True when ``out`` already holds a complete cohort generated from these parameters."""
    meta = out / "cohort.json"
    if not meta.is_file():
        return False
    try:
        got = json.loads(meta.read_text())["parameters"]
    except (ValueError, KeyError):
        return False
    want = _params(sites, patients, seed, with_masks, kind, without)
    return got == want or (got == {**want, "masks": True} and not with_masks)


def generate_cohort(
    out: str | Path,
    sites: int = 3,
    patients: int = 231,
    seed: int = 0,
    with_masks: bool = False,
    workers: int | None = None,
    force: bool = False,
    progress: bool = True,
    kind: str = "sites",
    external_without: tuple[str, ...] | list[str] = (),
) -> dict:
    """Write the cohort to ``out``; returns the cohort description (also in cohort.json).

    ``kind``: "sites" (the federation's hospitals), "external" (one independent external site,
    ccmr_core/synth/external.py), "public" (a stand-in for public data, with scanners of its own,
    for pretraining at no privacy cost) or "public-external" (the same, drawn by the external
    site's phantom: public data that differ from the sites'). ``external_without`` (kind "external"
    only): factors of the external site's shift reverted to the training sites'
    (ccmr_core/synth/external.py, ``SHIFT_FACTORS``), to measure what each costs a model."""
    out = Path(out).absolute()
    without = tuple(sorted(set(external_without)))
    if without and kind != "external":
        raise ValueError(f"external_without {list(without)} applies to the external cohort only (kind 'external'), "
                         f"not {kind!r}")
    external = external_site(without)  # names an unknown factor before anything is written
    if kind not in ("sites", "external", "public", "public-external"):
        raise ValueError(f"cohort kind {kind!r}: choose sites, external, public or public-external")
    if kind == "external" and sites != 1:
        raise ValueError("the external cohort is one site; pass sites=1 (ccmr synth --external --sites 1)")
    if patients < sites:
        raise ValueError(f"--patients {patients} is less than --sites {sites}: every site needs a patient")
    if out.exists():
        if cohort_matches(out, sites, patients, seed, with_masks, kind, without):
            return json.loads((out / "cohort.json").read_text())
        if not force:
            raise CohortExistsError(
                f"{out} already exists and was not generated with these parameters; "
                "choose another --out or pass --force to replace it"
            )
    profiles = {"external": lambda: [external], "public": lambda: public_profiles(sites, seed),
                "public-external": lambda: public_profiles(sites, seed, "external"),
                "sites": lambda: site_profiles(sites, seed)}[kind]()
    counts = allocate(patients, [p.weight for p in profiles])
    jobs: list[PatientJob] = []
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for si, (site, n) in enumerate(zip(profiles, counts)):
        dx = site_diagnoses(site, n, np.random.default_rng([seed, si, 10**6]))
        jobs += [PatientJob(str(tmp), site, si, i, d, seed, with_masks, kind) for i, d in enumerate(dx)]

    workers = workers or len(os.sched_getaffinity(0))
    results: list[dict] = []
    try:
        bar = tqdm(total=len(jobs), desc="synthesising patients", unit="patient", disable=not progress)
        if workers <= 1:
            for j in jobs:
                results.append(generate_patient(j))
                bar.update()
        else:
            ctx = mp.get_context("fork" if hasattr(os, "fork") else "spawn")
            with worker_pool(ctx, workers) as pool:
                for r in pool.imap_unordered(generate_patient, jobs, chunksize=2):
                    results.append(r)
                    bar.update()
        bar.close()
        description = _write_tables(tmp, profiles, counts, results, _params(sites, patients, seed, with_masks, kind, without))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
    return description


def _write_tables(root: Path, profiles: list[SiteProfile], counts: list[int], results: list[dict], params: dict) -> dict:
    by_site: dict[str, list[dict]] = {p.name: [] for p in profiles}
    for r in results:
        by_site[r["site"]].append(r)
    gt_dir = root / "groundtruth"
    gt_dir.mkdir(exist_ok=True)
    sites = []
    for p, n in zip(profiles, counts):
        rows = sorted(by_site[p.name], key=lambda r: r["patient_id"])
        with open(root / p.name / "labels.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["patient_id", "diagnosis", *MEASUREMENTS])
            w.writerows([r["patient_id"], r["diagnosis"], *(f"{r['report'][k]:g}" if k in r["report"] else ""
                                                            for k in MEASUREMENTS)] for r in rows)
        with open(root / p.name / "biomechanics.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["patient_id", "t", *SIGNALS])
            for r in rows:
                w.writerows([b[0], f"{b[1]:.1f}", *(f"{v:.4f}" for v in b[2:])] for b in r["bio"])
        with open(root / p.name / "reports.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["patient_id", "report", "report_without_diagnosis"])
            w.writerows([r["patient_id"], *r["text"]] for r in rows)
        (gt_dir / f"{p.name}.json").write_text(json.dumps([r["truth"] for r in rows], indent=1))
        mix: dict[str, int] = {}
        for r in rows:
            mix[r["diagnosis"]] = mix.get(r["diagnosis"], 0) + 1
        sites.append({
            "name": p.name,
            "description": p.description,
            "patients": n,
            "with_lge": sum(r["truth"]["has_lge"] for r in rows),
            "classes": dict(sorted(mix.items())),
            "scanner": {k: getattr(p, k) for k in ("manufacturer", "model", "field_strength", "matrix",
                                                    "pixel_spacing", "frames", "slice_thickness", "slice_gap")},
        })
    description = {"parameters": params, "sites": sites}
    (root / "cohort.json").write_text(json.dumps(description, indent=1))
    return description
