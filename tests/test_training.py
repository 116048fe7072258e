import json
import re

import numpy as np
import pytest
import torch

from ccmr_core.checkpoint import load_model
from ccmr_core.clip_training import train_clip_run
from ccmr_core.config import load_config
from ccmr_core.data.splits import stratified_split
from ccmr_core.data.sources import MultiSite, SourceError, prepare
from ccmr_core.training import evaluate_saved, train_central, unstated_measurements


def test_stratified_split_is_patient_level_and_balanced():
    labels = [i % 5 for i in range(100)]
    s = stratified_split(labels, 0.15, 0.15, seed=0)
    all_idx = s["train"] + s["val"] + s["test"]
    assert sorted(all_idx) == list(range(100))  # every patient exactly once
    for part in ("val", "test"):
        assert sorted({labels[i] for i in s[part]}) == [0, 1, 2, 3, 4]
    assert stratified_split(labels, 0.15, 0.15, seed=0) == s
    assert stratified_split(labels, 0.15, 0.15, seed=1) != s
    given = ["test" if i < 10 else None for i in range(100)]
    g = stratified_split(labels, 0.15, 0.15, seed=0, given=given)
    assert set(range(10)) <= set(g["test"])


@pytest.fixture
def run(trained_run):
    return trained_run


def test_run_folder_contract(run):
    out, metrics = run
    for f in ("config.yaml", "metrics.jsonl", "model.pt", "metrics.json"):
        assert (out / f).is_file(), f
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2] and "loss" in lines[0]["val"]
    m = json.loads((out / "metrics.json").read_text())["test"]
    lo, hi = m["accuracy_ci95"]
    assert lo <= m["accuracy"] <= hi
    for k in ("macro_auc", "ece", "confusion_matrix", "uncertainty_error_correlation", "per_class"):
        assert k in m
    assert set(m["per_class"]["NOR"]) >= {"sensitivity", "specificity", "f1"}
    assert metrics["test_site"] == "site-c" and metrics["n_test"] == m["n"]
    assert np.array(m["confusion_matrix"]).sum() == m["n"]


def test_saved_model_reloads_and_evaluates_externally(run, cohort, tmp_path):
    out, _ = run
    model, blob = load_model(out / "model.pt")
    assert blob["classes"] == ["NOR", "MINF", "DCM", "HCM", "ARV"] and blob["model"] == "cc-cmr"
    ext = evaluate_saved(out / "model.pt", cohort / "site-c", tmp_path / "ext", progress=False,
                         cache_root=tmp_path / "cache")
    assert (tmp_path / "ext" / "metrics.json").is_file()
    own = json.loads((out / "metrics.json").read_text())["test"]
    assert ext["test"]["n"] == own["n"]
    # site-c was this run's test site: the reloaded model says exactly what the run said, patient by patient
    rows = lambda f: sorted(f.read_text().splitlines()[1:])  # noqa: E731
    assert rows(tmp_path / "ext" / "predictions.csv") == rows(out / "test_predictions.csv")
    assert ext["test"]["accuracy"] == own["accuracy"] and ext["test"]["macro_auc"] == own["macro_auc"]


def test_existing_run_is_not_overwritten(run, cohort):
    out, _ = run
    with pytest.raises(FileExistsError, match="already holds"):
        train_central(cohort, out, load_config(preset="smoke"), progress=False)


@pytest.mark.parametrize("preset", ["smoke", "cmr-clip"])
def test_a_run_refused_for_its_data_leaves_no_run_folder(tmp_path, preset):
    empty = tmp_path / "export"  # a hospital export folder that holds nothing usable
    empty.mkdir()
    out = tmp_path / "runs" / "r1"
    cfg = load_config(preset=preset, overrides=["train.epochs=1"])
    run = train_central if preset == "smoke" else train_clip_run
    with pytest.raises(SourceError, match=re.escape(f"{empty}: not a site folder")):
        run(empty, out, cfg, test_site="site-c", progress=False, cache_root=tmp_path / "cache")
    assert not out.exists() and not (tmp_path / "runs").exists()


def test_not_a_model_file(tmp_path):
    p = tmp_path / "x.pt"
    torch.save({"weights": 1}, p)
    with pytest.raises(ValueError, match="not a CC-CMR model file"):
        load_model(p)


class _Payload:
    """A pickle that runs code when loaded (what a crafted model.pt would carry)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_model_file_that_would_run_code_is_refused_before_it_runs(tmp_path):
    marker = tmp_path / "ran"
    p = tmp_path / "model.pt"
    torch.save({"kind": "ccmr-model", "model": "cc-cmr", "payload": _Payload(marker)}, p)
    with pytest.raises(ValueError, match="holds more than weights"):
        load_model(p)
    assert not marker.exists()


def test_report_measurements_as_stated_and_those_no_training_patient_has(cohort, shared_cache):
    """Each row's measurements are its labels.csv values; a measurement that no training row states
    (a cohort made before the column existed, a site whose reports lack it) is named."""
    import csv

    cfg = load_config(preset="smoke", overrides=["data.measurements=[lvef, wmsi]"])
    ds = MultiSite(prepare(cohort, cfg, shared_cache, progress=False), cfg)  # the federation tests' ingest
    rows = {f"{s}/{r['patient_id']}": r for s in ds.site_names for r in csv.DictReader(open(cohort / s / "labels.csv"))}
    for i, pid in enumerate(ds.patient_ids):
        want = {k: float(rows[pid][k]) for k in ("lvef", "wmsi") if rows[pid][k]}
        assert {k: v for k, v in ds.stated_measurements[i].items() if k in want} == want
        assert set(ds.stated_measurements[i]) <= {"lvef", "lvedv_ml", "lvesv_ml", "rvef", "rvedv_ml", "max_wall_mm", "wmsi"}
    everyone = list(range(len(ds)))
    assert unstated_measurements(ds, everyone, ("lvef", "wmsi")) == []
    silent = [i for i in everyone if "wmsi" not in ds.stated_measurements[i]]
    assert silent and unstated_measurements(ds, silent, ("lvef", "wmsi")) == ["wmsi"]


def test_small_site_with_rare_classes_still_gets_validation_and_test_patients():
    labels = [0, 1, 2, 3, 4, 0]  # every class has fewer than three patients
    s = stratified_split(labels, 0.15, 0.15, seed=0)
    assert len(s["val"]) == 1 and len(s["test"]) == 1 and len(s["train"]) == 4
    assert sorted(s["train"] + s["val"] + s["test"]) == list(range(6))


def test_fine_tuning_starts_from_the_files_weights_and_trains_its_last_stage_only(run, cohort, tmp_path,
                                                                                   monkeypatch, capsys):
    from ccmr_core.cli import main

    start, _ = run
    monkeypatch.setenv("CCMR_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "tuned"
    # a learning rate too small to move anything: what comes out is what went in
    assert main(["train", "--start-from", str(start / "model.pt"), "--data", str(cohort / "site-c"), "--out", str(out),
                 "--set", "train.epochs=1", "--set", "train.lr=1e-9", "--quiet"]) == 0
    assert "fine-tuned 1 epoch, calibration" in capsys.readouterr().out
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["student"]  # CC-CMR's teacher is not trained again
    before, after = load_model(start / "model.pt")[1]["state_dict"], load_model(out / "model.pt")[1]["state_dict"]
    assert before.keys() == after.keys()
    moved = {k: float((before[k].float() - after[k].float()).abs().max()) for k in before if k != "calibration"}
    assert max(moved.values()) < 1e-5, max(moved.items(), key=lambda kv: kv[1])
    assert json.loads((out / "metrics.json").read_text())["start_from"] == str((start / "model.pt").absolute())
    assert f"central, fine-tuned from {(start / 'model.pt').absolute()}" in (out / "report.html").read_text()
    # a file's own config is the base: another model or preset beside it is refused
    assert main(["train", "--start-from", str(start / "model.pt"), "--data", str(cohort / "site-c"),
                 "--out", str(tmp_path / "x"), "--preset", "smoke"]) == 2
    assert "leave out --model, --config and --preset" in capsys.readouterr().err


def test_fine_tuning_refuses_a_model_built_otherwise(run, cohort, tmp_path):
    start, _ = run
    cfg = load_config(preset="smoke", overrides=["model.region_pool=mean"])
    with pytest.raises(ValueError, match=r"region_pool: 'mean\+max' in the file, 'mean' here"):
        train_central(cohort / "site-c", tmp_path / "a", cfg, progress=False, cache_root=tmp_path / "c",
                      start_from=start / "model.pt")
    with pytest.raises(ValueError, match="is a cc-cmr model; this run trains cine-only"):
        train_central(cohort / "site-c", tmp_path / "b", load_config(preset="smoke", overrides=["model.name=cine-only"]),
                      progress=False, cache_root=tmp_path / "c", start_from=start / "model.pt")
