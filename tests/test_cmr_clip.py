"""CMR-CLIP: synthetic reports, the byte tokenizer and text encoder, the contrastive loss, the
reports reader's errors, the evaluation metrics, and one short training run."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
import torch

from ccmr_core.data.reports import ReportError, WithReports, read_reports
from ccmr_core.losses import clip_loss
from ccmr_core.models.cmr_clip import CMRCLIP
from ccmr_core.models.text import CLS, EOS, PAD, TextEncoder, decode, encode
from ccmr_core.retrieval import class_precision_at_k, finding_aucs, prototype_probe, ranks, retrieval
from ccmr_core.synth.reports import findings

CLASS_WORDS = re.compile(r"cardiomyopathy|infarction|normal cardiac mri|\bDCM\b|\bHCM\b|\bARV", re.I)


def _reports(site):
    with open(site / "reports.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_synth_writes_a_report_per_patient_with_site_habits(cohort):
    styles = {}
    for site in ("site-a", "site-b", "site-c"):
        rows = _reports(cohort / site)
        with open(cohort / site / "labels.csv", newline="") as f:
            assert [r["patient_id"] for r in rows] == [r["patient_id"] for r in csv.DictReader(f)]
        styles[site] = " ".join(r["report"] for r in rows)
        for r in rows:
            assert r["report"] and r["report_without_diagnosis"]
            # the blinded copy names no diagnosis; the impression of the full one does
            assert not CLASS_WORDS.search(r["report_without_diagnosis"]), r["report_without_diagnosis"]
    assert "FINDINGS:" in styles["site-a"] and "IMPRESSION:" in styles["site-a"]
    assert "LVEF" in styles["site-b"] and "Imp:" in styles["site-b"] and "FINDINGS:" not in styles["site-b"]
    assert "Conclusion:" in styles["site-c"]


def test_reports_follow_the_ground_truth(cohort):
    truth = {t["patient_id"]: t for s in "abc" for t in json.loads((cohort / "groundtruth" / f"site-{s}.json").read_text())}
    for s in "abc":
        for r in _reports(cohort / f"site-{s}"):
            t = truth[r["patient_id"]]
            text = r["report"].lower()
            if not t["has_lge"]:
                assert "contrast" in text
            elif t["scars"] and "subendocardial" in t["scars"]:
                assert "subendocardial" in text or "de:" not in text  # a sentence may be left out
            if t["diagnosis"] == "NOR":
                assert "normal" in r["report"].split(":")[-1].lower()
            f = findings(t)
            assert set(f) >= {"lv_dysfunction", "lge_present", "rwma"}
            assert f["lge_present"] is None or f["lge_present"] == (t["scar_extent"] > 0)


def test_ingest_reads_reports_csv_as_a_table_not_as_a_broken_image(cohort, tmp_path):
    from ccmr_core.data.ingest import ingest, load_manifest
    from tests.conftest import SMALL

    ingest(cohort / "site-a", tmp_path / "cache", SMALL, ["NOR", "MINF", "DCM", "HCM", "ARV"], progress=False)
    errors = load_manifest(tmp_path / "cache")["errors"]
    assert not [e for e in errors if "reports.csv" in e["path"]], errors


def test_reports_are_deterministic_for_a_seed(tmp_path):
    from ccmr_core.synth.cohort import generate_cohort

    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        generate_cohort(out, sites=2, patients=4, seed=5, workers=1, progress=False)
    assert (a / "site-a" / "reports.csv").read_bytes() == (b / "site-a" / "reports.csv").read_bytes()


def test_tokenizer_folds_to_ascii_and_pads():
    ids = encode(["Normal LVEF 60%", "Zürich – é"], max_len=24)
    assert ids.shape == (2, 24) and ids.dtype == torch.long
    assert int(ids[0, 0]) == CLS and decode(ids[0]) == "Normal LVEF 60%"
    assert int(ids[0, 16]) == EOS and (ids[0, 17:] == PAD).all()
    assert decode(ids[1]) == "Zurich  e"  # accents folded, the dash (no ASCII form) dropped
    assert int(ids.max()) < 131
    assert encode(["x" * 100], max_len=10)[0, -1] == EOS  # truncated, still ends
    with pytest.raises(TypeError, match="report 0"):
        encode([None])


def test_text_encoder_ignores_padding():
    torch.manual_seed(0)
    enc = TextEncoder(width=32, layers=1, heads=2, max_len=64).eval()
    short, long = encode(["LVEF 35%, dilated LV"], 32), encode(["LVEF 35%, dilated LV"], 64)
    assert torch.allclose(enc(short), enc(long), atol=1e-5)
    assert not torch.allclose(enc(encode(["LVEF 35%"], 32)), enc(encode(["LVEF 65%"], 32)))


def test_clip_loss_is_symmetric_and_rewards_alignment():
    torch.manual_seed(0)
    v = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
    aligned = clip_loss(v, v, 0.05)
    shuffled = clip_loss(v, v[torch.randperm(6)], 0.05)
    assert aligned.shape == (6,) and aligned.mean() < 0.1 < shuffled.mean()
    t = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
    assert torch.allclose(clip_loss(v, t, 0.1), clip_loss(t, v, 0.1))
    # another patient's report changes this patient's loss: patients are coupled
    t2 = t.clone()
    t2[5] = -t2[5]
    assert not torch.isclose(clip_loss(v, t, 0.1)[0], clip_loss(v, t2, 0.1)[0])
    assert CMRCLIP.patient_level_dp is False


def test_model_losses_skip_patients_without_a_report():
    torch.manual_seed(0)
    m = CMRCLIP(slices=4, width=4, dim=16, proj=8, text_width=16, text_layers=1)
    batch = {"cine": torch.rand(3, 4, 4, 32, 32), "report": encode(["a", "b", "c"], 32),
             "has_report": torch.tensor([True, False, True])}
    loss, parts = m.losses(m(batch["cine"], batch["report"]), batch)
    assert loss.shape == (2,) and torch.isfinite(loss).all()
    batch["has_report"] = torch.tensor([True, False, False])
    loss, _ = m.losses(m(batch["cine"], batch["report"]), batch)
    assert loss.shape == (0,)


def test_read_reports_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(ReportError, match="no reports file.*ccmr synth --force"):
        read_reports(tmp_path)
    (tmp_path / "reports.csv").write_text("patient_id,text\nP1,x\n")
    with pytest.raises(ReportError, match=r"reports.csv: missing column\(s\) report"):
        read_reports(tmp_path)
    (tmp_path / "reports.csv").write_text("patient_id,report\nP1,first\nP2,\nP1,second\n")
    with pytest.raises(ReportError, match="line 4: patient P1 has a second report"):
        read_reports(tmp_path)
    (tmp_path / "reports.csv").write_text("patient_id,report\nP1,first\nP2,\n")
    assert read_reports(tmp_path) == {"P1": "first"}  # an empty report is no report


def test_with_reports_joins_by_patient():
    base = [{"label": torch.tensor(i)} for i in range(3)]
    ds = WithReports(base, ["s/P1", "s/P2", "s/P3"], {"s/P3": "LVEF 20%", "s/P1": "normal"}, max_len=16)
    assert decode(ds[0]["report"]) == "normal" and decode(ds[2]["report"]) == "LVEF 20%"
    assert [bool(ds[i]["has_report"]) for i in range(3)] == [True, False, True]
    with pytest.raises(ValueError, match="2 patient ids for a dataset of 3"):
        WithReports(base, ["a", "b"], {})


def test_retrieval_metrics_on_a_known_matrix():
    sim = np.array([[0.9, 0.1, 0.0], [0.8, 0.5, 0.0], [0.0, 0.2, 0.1]])
    assert ranks(sim).tolist() == [1, 2, 2]
    r = retrieval(sim, ks=(1, 2))
    assert r["gallery"] == 3 and r["video_to_report"]["R@1"] == pytest.approx(1 / 3)
    assert r["video_to_report"]["R@2"] == 1.0 and r["video_to_report"]["median_rank"] == 2
    assert r["report_to_video"]["R@1"] == 1.0  # each report's own study is its column's best
    assert r["chance"]["R@1"] == pytest.approx(1 / 3)
    labels = np.array([0, 0, 1])
    assert class_precision_at_k(sim, labels, 1) == 1.0
    assert class_precision_at_k(sim, labels, 2) == pytest.approx(2 / 3)  # (1 + 1/2 + 1/2) / 3


def test_finding_auc_and_probes():
    rng = np.random.default_rng(0)
    pos_dir = np.eye(4)[0]
    video = np.stack([pos_dir + 0.1 * rng.normal(size=4) if i % 2 else -pos_dir + 0.1 * rng.normal(size=4)
                      for i in range(10)])
    video /= np.linalg.norm(video, axis=1, keepdims=True)
    truth = {"f": [bool(i % 2) for i in range(10)], "g": [None] * 9 + [True]}
    out = finding_aucs(video, {"f": pos_dir[None], "g": pos_dir[None]}, truth)
    assert out["f"]["auc"] == 1.0 and out["f"]["positives"] == 5
    assert out["g"]["auc"] is None and out["g"]["n"] == 1
    y = np.array([i % 2 for i in range(10)])
    assert (prototype_probe(video, y, video, 1, 2, rng) == y).all()


def test_ccmr_train_cmr_clip_then_search(cohort, tmp_path, monkeypatch, capsys):
    from ccmr_core.cli import main

    monkeypatch.setenv("CCMR_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    assert main(["train", "--data", str(cohort), "--model", "cmr-clip", "--out", str(run), "--test-site", "site-c",
                 "--preset", "smoke", "--set", "train.epochs=2", "--set", "train.batch_size=4",
                 "--set", "train.threads=1", "--set", "data.report_column=report_without_diagnosis", "--quiet"]) == 0
    assert json.loads((run / "metrics.json").read_text())["report_column"] == "report_without_diagnosis"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(np.isfinite(r["train"]["loss"]) for r in rows)
    m = json.loads((run / "metrics.json").read_text())["test"]
    n = m["test_n"]
    assert n == len(_reports(cohort / "site-c")) and m["retrieval"]["gallery"] == n
    assert 1 <= m["retrieval"]["report_to_video"]["median_rank"] <= n
    assert set(m["findings"]) == {"lv_dysfunction", "lv_dilation", "lv_hypertrophy", "lge_present", "rv_dysfunction",
                                  "rwma"}
    page = (run / "report.html").read_text()
    assert f"gallery of {n} studies" in page and "zero-shot" in page and "Learning curves" in page
    assert "ECE" not in page  # no classifier sections for a model without a diagnosis head
    capsys.readouterr()
    assert main(["search", str(cohort / "site-c"), "--model", str(run / "model.pt"), "--text", "dilated LV",
                 "--top", "2", "--quiet"]) == 0
    hits = [ln.split() for ln in capsys.readouterr().out.splitlines()[1:]]
    assert len(hits) == 2 and all(h[1].startswith("site-c/SITE-C-") for h in hits)
    assert float(hits[0][0]) >= float(hits[1][0])
    # a diagnosing command refuses it, and says what to use
    assert main(["evaluate", "--model", str(run / "model.pt"), "--data", str(cohort / "site-c")]) == 2
    assert "is a cmr-clip model" in capsys.readouterr().err


@pytest.fixture(scope="module")
def clip_run(cohort, tmp_path_factory):
    from ccmr_core.clip_training import train_clip_run
    from ccmr_core.config import load_config

    cfg = load_config(preset="smoke", overrides=["model.name=cmr-clip", "train.epochs=1", "train.batch_size=4",
                                                 "train.threads=1"])
    out = tmp_path_factory.mktemp("clip") / "run"
    train_clip_run(cohort, out, cfg, "site-c", progress=False, cache_root=tmp_path_factory.mktemp("cache"))
    return out


def test_predict_scores_findings_beside_the_diagnosis(trained_run, clip_run, make_site, cohort, tmp_path, capsys):
    from ccmr_core.cli import main

    run, _ = trained_run
    pid = _reports(cohort / "site-c")[0]["patient_id"]
    study = make_site([("site-c", pid)])
    assert main(["predict", str(study), "--model", str(run / "model.pt"), "--findings", str(clip_run / "model.pt"),
                 "--out", str(tmp_path / "p")]) == 0
    doc = json.loads((tmp_path / "p" / "prediction.json").read_text())
    z = doc["zero_shot_findings"]
    assert set(z["scores"]) == set(z["prompts"]) == {"lv_dysfunction", "lv_dilation", "lv_hypertrophy",
                                                        "lge_present", "rv_dysfunction", "rwma"}
    assert all(-1.0 <= v <= 1.0 for v in z["scores"].values()) and z["model"]["architecture"] == "cmr-clip"
    assert doc["predicted"] in doc["probabilities"]  # the diagnosis is still the classifier's
    assert "zero-shot findings" in capsys.readouterr().out
    # the two models swapped: each refused with what it is
    assert main(["predict", str(study), "--model", str(run / "model.pt"), "--findings", str(run / "model.pt"),
                 "--out", str(tmp_path / "q")]) == 2
    assert "findings need a cmr-clip model" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()
    # a batch gets one column per finding
    assert main(["predict", "--batch", str(study), "--model", str(run / "model.pt"), "--findings",
                 str(clip_run / "model.pt"), "--out", str(tmp_path / "b"), "--quiet"]) == 0
    with open(tmp_path / "b" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and rows[0]["error"] == ""
    assert float(rows[0]["finding_lge_present"]) == pytest.approx(z["scores"]["lge_present"], abs=1e-4)


def test_cmr_clip_refuses_patient_level_dp_and_federation():
    from ccmr_core.config import ConfigError, load_config
    from server.server_app import open_run

    with pytest.raises(ConfigError, match="cannot be combined with model.name 'cmr-clip'"):
        load_config(overrides=["model.name=cmr-clip", "privacy.mode=sample"])
    load_config(overrides=["model.name=cmr-clip", "privacy.mode=site"])  # site-level DP is allowed
    with pytest.raises(ValueError, match="cmr-clip' is trained centrally in this version"):
        open_run({"model": "cmr-clip"})
