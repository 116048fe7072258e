"""The synthetic cohort: class physics measured on masks, DICOM as scanners write it, site
effects and determinism."""

import hashlib
import json

import numpy as np
import pydicom
import pytest

from ccmr_core.synth import measure
from ccmr_core.synth.anatomy import SECTOR_ANGLES, sample_heart, scar_transmurality
from ccmr_core.synth.cohort import CohortExistsError, generate_cohort
from ccmr_core.synth.dicom_writer import SeriesTemplate, base_dataset, stable_uid
from ccmr_core.synth.render import Grid, render
from ccmr_core.synth.sites import BASE_SITES

SPACING = 10.0  # slice spacing (mm)
GRID = Grid(96, 1.6)


@pytest.fixture(scope="module")
def measured():
    """Eight patients per class rendered with masks and measured."""
    rng = np.random.default_rng(11)
    out = {}
    for dx in ("NOR", "MINF", "DCM", "HCM", "ARV"):
        rows = []
        for _ in range(8):
            h = sample_heart(dx, rng, SPACING)
            o = render(h, GRID, 20, rng, with_masks=True)
            m = o["cine_mask"]
            vols = measure.volumes_ml(m, 1, GRID.spacing, SPACING)
            ed = int(np.argmax(vols))
            walls = np.stack([measure.wall_thickness(m[ed, s], GRID.spacing) for s in range(h.n_slices - 1)])
            rows.append({
                "variant": h.variant,
                "ef": measure.ejection_fraction(vols),
                "edv": float(vols.max()),
                "rv_ef": measure.rv_ef(m, GRID.spacing, SPACING),
                "rv_edv": float(measure.volumes_ml(m, 3, GRID.spacing, SPACING).max()),
                "wall_mean": float(np.nanmean(walls)),
                "wall_max": float(np.nanpercentile(walls, 98)),
                "septal_vs_lateral": float(np.nanmean(walls[:, 15:22]) - np.nanmean(walls[:, [33, 34, 35, 0, 1, 2, 3]])),  # septum faces the RV, image left
                "scar": measure.scar_fraction(o["lge_mask"]),
                "n_slices": h.n_slices,
                "frames_es": int(np.argmin(vols)),
            })
        out[dx] = rows
    return out


def test_normal_physics(measured):
    for r in measured["NOR"]:
        assert 0.55 <= r["ef"] <= 0.70
        assert 7.0 <= r["wall_mean"] <= 11.0
        assert r["scar"] == 0.0
        assert 6 <= r["n_slices"] <= 12
        assert 5 <= r["frames_es"] <= 10  # systole is about a third of a 20-frame cycle


def test_dcm_is_dilated_thin_and_poorly_contracting(measured):
    nor_edv = max(r["edv"] for r in measured["NOR"])
    for r in measured["DCM"]:
        assert r["ef"] < 0.40
        assert r["edv"] > nor_edv
        assert r["wall_mean"] < 7.5


def test_hcm_walls_and_cavity(measured):
    nor_edv = np.median([r["edv"] for r in measured["NOR"]])
    for r in measured["HCM"]:
        assert r["wall_max"] >= 15.0
        assert r["ef"] >= 0.55
        assert r["edv"] < nor_edv
    asym = [r for r in measured["HCM"] if r["septal_vs_lateral"] > 3.0]
    assert len(asym) >= len(measured["HCM"]) // 2  # asymmetric septal in most


def test_minf_has_territorial_scar_and_reduced_function(measured):
    for r in measured["MINF"]:
        assert r["scar"] > 0.015  # small subendocardial infarcts included
        assert r["ef"] < 0.58
    nor_ef = min(r["ef"] for r in measured["NOR"])
    assert sum(r["ef"] < nor_ef for r in measured["MINF"]) >= 5


def test_scar_reduces_regional_thickening_with_its_transmurality():
    """Measured on the masks: sectors whose scar is deeper thicken less, for every kind of scar;
    and small subendocardial infarcts keep most of their segment's thickening (subtle on cine)."""
    rng = np.random.default_rng(21)
    trans, thick, subtle = [], [], []
    hearts = [sample_heart(dx, rng, SPACING, hard_share=0.5) for dx in ("MINF",) * 6 + ("DCM",) * 3 + ("HCM",) * 3]
    for h in hearts:
        if not h.scars:
            continue
        m = render(h, GRID, 20, rng, with_masks=True)["cine_mask"]
        vols = measure.volumes_ml(m, 1, GRID.spacing, SPACING)
        ed, es = int(np.argmax(vols)), int(np.argmin(vols))
        t = scar_transmurality(h.scars, h.z)
        for s in range(1, h.n_slices - 2):
            w_ed = measure.wall_thickness(m[ed, s], GRID.spacing)
            w_es = measure.wall_thickness(m[es, s], GRID.spacing)
            # ray k points at image angle 10k degrees; the anatomical angle is that minus rv_angle
            sector = np.round(np.mod(np.deg2rad(np.arange(36) * 10.0) - h.rv_angle, 2 * np.pi) / SECTOR_ANGLES[1]).astype(int) % 36
            ok = np.isfinite(w_ed) & np.isfinite(w_es) & (w_ed > 0)
            trans += list(t[s, sector][ok])
            thick += list((w_es / np.where(w_ed > 0, w_ed, 1) - 1)[ok])
        if h.variant == "preserved-ef":
            subtle.append(float(t.max()))
    trans, thick = np.array(trans), np.array(thick)
    assert np.corrcoef(trans, thick)[0, 1] < -0.3
    deep, none = thick[trans > 0.55], thick[trans < 0.05]
    assert len(deep) > 20 and len(none) > 100
    assert np.median(deep) < 0.4 * np.median(none)
    assert subtle and max(subtle) < 0.45  # preserved-EF infarcts stay partial-thickness


def test_arv_right_ventricle(measured):
    for r in measured["ARV"]:
        assert r["rv_ef"] < 0.38
        assert 0.50 <= r["ef"] <= 0.70
    assert min(r["rv_edv"] for r in measured["ARV"]) > np.median([r["rv_edv"] for r in measured["NOR"]])
    assert min(r["rv_ef"] for r in measured["NOR"]) > 0.40


def test_hard_cases_exist():
    rng = np.random.default_rng(5)
    variants = [sample_heart("MINF", rng, SPACING, hard_share=1.0) for _ in range(40)]
    preserved = [h for h in variants if h.variant == "preserved-ef"]
    dilated = [h for h in variants if h.variant == "dilated"]
    assert preserved and dilated
    assert all(h.ef_target >= 0.5 and h.scars for h in preserved)
    assert all(h.r_endo_ed[0] >= 29 for h in dilated)


def test_template_writer_matches_pydicom(tmp_path):
    ds = base_dataset(patient_id="P", study_uid=stable_uid("s"), series_uid=stable_uid("se"),
                      frame_of_reference=stable_uid("f"), series_number=3, series_description="cine",
                      manufacturer="X", model="Y", field_strength=1.5, rows=8, cols=8, pixel_spacing=1.5,
                      slice_thickness=8, spacing_between_slices=10, orientation=np.array([1, 0, 0, 0, 1, 0.0]),
                      signed=False, study_date="20260101", cardiac={"rr": 900, "frames": 25})
    tpl = SeriesTemplate.build(ds, 128, implicit_vr=True, slice_location=True)
    px = np.arange(64, dtype="<u2").reshape(8, 8)
    uid = stable_uid("inst", 7)
    f = tmp_path / "x"
    f.write_bytes(tpl.instance(uid, 7, np.array([-12.5, 300.25, 0.0]), px.tobytes(), 42.0, 123.4567))
    got = pydicom.dcmread(f)
    assert got.SOPInstanceUID == uid == got.file_meta.MediaStorageSOPInstanceUID
    assert got.InstanceNumber == 7 and float(got.TriggerTime) == pytest.approx(123.4567)
    assert [float(v) for v in got.ImagePositionPatient] == [-12.5, 300.25, 0.0]
    assert float(got.SliceLocation) == 42.0 and got.CardiacNumberOfImages == 25
    assert np.array_equal(got.pixel_array, px)


def test_cohort_dicom_and_site_effects(cohort):
    desc = json.loads((cohort / "cohort.json").read_text())
    assert [s["name"] for s in desc["sites"]] == ["site-a", "site-b", "site-c"]
    assert sum(s["patients"] for s in desc["sites"]) == 15
    mixes = [s["classes"] for s in desc["sites"]]
    assert len({json.dumps(m) for m in mixes}) == 3  # non-IID class mixes
    required = ["StudyInstanceUID", "SeriesInstanceUID", "SeriesDescription", "PatientID", "ImagePositionPatient",
                "ImageOrientationPatient", "PixelSpacing", "SliceThickness", "TriggerTime",
                "CardiacNumberOfImages", "InstanceNumber"]
    for prof in BASE_SITES:
        site = cohort / prof.name
        files = [p for p in site.rglob("*") if p.is_file() and p.suffix != ".csv"]
        ds = pydicom.dcmread(files[0])
        assert ds.SOPClassUID == pydicom.uid.MRImageStorage and ds.Modality == "MR"
        for k in required:
            assert k in ds, k
        assert ds.Rows == prof.matrix and float(ds.PixelSpacing[0]) == prof.pixel_spacing
        assert ("SliceLocation" in ds) == prof.slice_location
        assert (ds.file_meta.TransferSyntaxUID == pydicom.uid.ImplicitVRLittleEndian) == prof.implicit_vr
        lge = [f for f in files if "InversionTime" in pydicom.dcmread(f, stop_before_pixels=True)]
        assert lge, f"{prof.name} has no LGE files"
        assert (site / "biomechanics.csv").read_text().startswith("patient_id,t,lv_volume_ml")
    # the patients without LGE (if any) are exactly those the ground truth says, and cohort.json counts them
    desc = {s["name"]: s for s in json.loads((cohort / "cohort.json").read_text())["sites"]}
    for s in ("site-a", "site-b", "site-c"):
        truth = json.loads((cohort / "groundtruth" / f"{s}.json").read_text())
        assert desc[s]["with_lge"] == sum(t["has_lge"] for t in truth) and desc[s]["patients"] == len(truth)
        with_inversion = {pydicom.dcmread(f, stop_before_pixels=True).PatientID
                          for f in (cohort / s).rglob("*") if f.is_file() and f.suffix != ".csv"
                          and "InversionTime" in pydicom.dcmread(f, stop_before_pixels=True)}
        assert with_inversion == {t["patient_id"] for t in truth if t["has_lge"]}
    assert (cohort / "groundtruth" / "masks" / "site-a").is_dir()
    assert not list((cohort / "site-a").rglob("*.npz"))  # masks stay outside the DICOM tree


def test_report_states_the_wall_motion_score_index_as_its_text_grades_segments(cohort):
    """labels.csv's wmsi: 1.0 without a regional abnormality, above it exactly when the report's
    text names hypokinetic or akinetic segments, and higher for infarcts than for normal hearts."""
    import csv

    from ccmr_core.synth.reports import AKINETIC, HYPOKINETIC, wall_motion_score_index

    by_dx: dict[str, list[float]] = {}
    stated = 0
    for s in ("site-a", "site-b", "site-c"):
        truth = {t["patient_id"]: t for t in json.loads((cohort / "groundtruth" / f"{s}.json").read_text())}
        for row in csv.DictReader(open(cohort / s / "labels.csv")):
            t = truth[row["patient_id"]]
            segs = {k: tuple(v) for k, v in t["segments"].items()}
            exact = wall_motion_score_index(segs)
            hypo = sum(AKINETIC <= m < HYPOKINETIC for m, _ in segs.values())
            akin = sum(m < AKINETIC for m, _ in segs.values())
            assert exact == pytest.approx((16 + hypo + 2 * akin) / 16)
            assert t["measurements"]["wmsi"] == pytest.approx(exact, abs=1e-3)
            if row["wmsi"]:
                stated += 1
                assert float(row["wmsi"]) == pytest.approx(exact, abs=0.006)
            by_dx.setdefault(t["diagnosis"], []).append(exact)
    assert stated >= 10  # about 90% of 15 reports state it
    assert all(v == 1.0 for v in by_dx["NOR"])
    assert max(by_dx["MINF"]) > 1.2


def _tree_hash(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_deterministic_for_a_seed(tmp_path):
    a = generate_cohort(tmp_path / "a", sites=2, patients=3, seed=9, workers=2, progress=False)
    b = generate_cohort(tmp_path / "b", sites=2, patients=3, seed=9, workers=1, progress=False)
    generate_cohort(tmp_path / "c", sites=2, patients=3, seed=10, workers=1, progress=False)
    assert a == b
    assert _tree_hash(tmp_path / "a") == _tree_hash(tmp_path / "b")
    assert _tree_hash(tmp_path / "a") != _tree_hash(tmp_path / "c")


def test_existing_folder_is_not_overwritten(tmp_path):
    out = tmp_path / "c"
    generate_cohort(out, sites=1, patients=1, seed=1, workers=1, progress=False)
    again = generate_cohort(out, sites=1, patients=1, seed=1, workers=1, progress=False)  # same: no-op
    assert again["parameters"]["seed"] == 1
    with pytest.raises(CohortExistsError, match="--force"):
        generate_cohort(out, sites=1, patients=1, seed=2, workers=1, progress=False)
    generate_cohort(out, sites=1, patients=1, seed=2, workers=1, progress=False, force=True)
    assert json.loads((out / "cohort.json").read_text())["parameters"]["seed"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["c"]  # no temporary folders left behind


def test_a_public_cohort_can_come_from_another_phantom(tmp_path):
    """federated.public_generator 'external': the public pretraining cohort is drawn by the external
    site's phantom (anatomy, contrast, protocol), not only other scanners of the sites' generator."""
    from ccmr_core.synth.sites import public_profiles, site_profiles

    same, other = public_profiles(2, 0), public_profiles(2, 0, "external")
    assert [p.name for p in same] == [p.name for p in other] == ["public-1", "public-2"]
    assert {p.anatomy for p in same} == {"standard"} and {p.anatomy for p in other} == {"external"}
    assert {p.contrast for p in other} == {"external"} and all(p.frames_range for p in other)
    assert not {p.name for p in other} & {p.name for p in site_profiles(3, 0)}
    with pytest.raises(ValueError, match="choose project or external"):
        public_profiles(2, 0, "acdc")
    desc = generate_cohort(tmp_path / "pub", sites=2, patients=4, seed=7, workers=1, progress=False,
                           kind="public-external")
    assert desc["parameters"]["kind"] == "public-external"
    frames = {t["frames"] for s in ("public-1", "public-2")
              for t in json.loads((tmp_path / "pub" / "groundtruth" / f"{s}.json").read_text())}
    assert frames and all(25 <= f <= 30 for f in frames)  # the external protocol's frame counts


def test_external_shift_factors_can_be_left_out_patient_by_patient():
    """benchmarks/external_shift.py: a factor of the external site's shift reverted to the training
    sites' changes that factor only, for the same patients (same random draws): without papillary
    muscles the cavity holds more blood at every frame, the heart is otherwise the same."""
    from ccmr_core.synth.external import external_site, sample_external_heart

    full = sample_external_heart("MINF", np.random.default_rng(5), SPACING)
    bare = sample_external_heart("MINF", np.random.default_rng(5), SPACING, ("papillary",))
    assert full.shape.papillary_mm > 0 and bare.shape.papillary_mm == 0
    assert np.array_equal(full.r_endo_ed, bare.r_endo_ed) and full.shape.ellipticity == bare.shape.ellipticity
    blood = [render(h, GRID, 20, np.random.default_rng(1), with_masks=True)["cine_mask"] == 1 for h in (full, bare)]
    assert (blood[1].sum((1, 2, 3)) > blood[0].sum((1, 2, 3))).all()
    assert external_site(["frames", "contrast", "papillary"]).frames_range is None
    assert external_site(["contrast"]).contrast == "standard" and external_site().contrast == "external"
    with pytest.raises(ValueError, match="unknown external shift factor.*papilary.*choose from contrast"):
        external_site(["papilary"])


def test_a_cohort_without_a_shift_factor_is_its_own_cohort(tmp_path):
    a = generate_cohort(tmp_path / "x", sites=1, patients=2, seed=3, workers=1, progress=False, kind="external")
    b = generate_cohort(tmp_path / "x-bare", sites=1, patients=2, seed=3, workers=1, progress=False, kind="external",
                        external_without=["papillary", "sine"])
    assert b["parameters"]["external_without"] == ["papillary", "sine"] and "external_without" not in a["parameters"]
    assert a["sites"][0]["classes"] == b["sites"][0]["classes"]  # the same patients
    assert _tree_hash(tmp_path / "x") != _tree_hash(tmp_path / "x-bare")
    with pytest.raises(CohortExistsError):  # the folder of the full site is not taken for a variant
        generate_cohort(tmp_path / "x", sites=1, patients=2, seed=3, workers=1, progress=False, kind="external",
                        external_without=["papillary"])
    with pytest.raises(ValueError, match="external cohort only"):
        generate_cohort(tmp_path / "y", sites=2, patients=2, seed=3, workers=1, progress=False,
                        external_without=["papillary"])
