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
from ccmr_core.models.text import CLS, EOS, NEGATED, PAD, TextEncoder, decode, encode, negated_spans
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


def test_tokenizer_marks_what_a_negation_covers_in_each_sites_wording():
    def negated(text):
        return [text[s:e].strip() for s, e in negated_spans(text)]

    assert negated("No late gadolinium enhancement. IMPRESSION: Mildly dilated LV.") == ["No late gadolinium enhancement"]
    assert negated("max WT 8mm. DE: none. Imp: LV hypertrophy.") == ["DE: none"]
    assert negated("No RWMA, LVEF 2.5 mm. Subendocardial LGE but no RV dilation") == ["No RWMA", "no RV dilation"]
    assert negated("Normal LV size. Late gadolinium enhancement in the anterior segments.") == []  # 'normal' is no cue
    text = "Imp: no late gadolinium enhancement; dilated LV."
    ids = encode([text])[0]
    marked = bytes(int(i) - NEGATED for i in ids if int(i) >= NEGATED).decode()
    assert marked == "no late gadolinium enhancement" and decode(ids) == text
    assert int(ids[0]) == CLS and PAD in ids.tolist()  # specials are never marked


def test_negation_marks_move_the_text_embedding_only_for_a_model_that_learns_them():
    torch.manual_seed(0)
    plain, marked = encode(["late gadolinium enhancement"], 64), encode(["no late gadolinium enhancement"], 64)
    unmarked = marked % NEGATED  # the same bytes without the marks
    old = TextEncoder(width=32, layers=1, heads=2, max_len=64).eval()  # a model from before the marks: ignores them
    assert torch.equal(old(marked), old(unmarked))
    new = TextEncoder(width=32, layers=1, heads=2, max_len=64, negation=True).eval()
    assert not torch.allclose(new(marked), new(unmarked), atol=1e-3)
    assert torch.equal(new(plain), old_with(new)(plain))  # nothing negated: the vector adds nothing
    assert "negation.weight" in new.state_dict() and "negation.weight" not in old.state_dict()
    cfg_model = CMRCLIP(slices=4, width=4, dim=16, proj=8, text_width=16, text_layers=1)
    assert cfg_model.text.negation is None  # the class default loads model files written before the marks
    from ccmr_core.config import load_config
    from ccmr_core.models.registry import build_model, model_kwargs
    on = load_config(preset="cmr-clip", overrides=["model.text_negation=true"])
    assert build_model("cmr-clip", **model_kwargs(on, 1)).text.negation is not None


def old_with(new: TextEncoder) -> TextEncoder:
    """``new``'s weights in an encoder that ignores negation marks."""
    old = TextEncoder(width=new.width, layers=1, heads=2, max_len=64).eval()
    old.load_state_dict({k: v for k, v in new.state_dict().items() if not k.startswith("negation.")})
    return old


@pytest.mark.parametrize("pool", ["mean", "attention"])
def test_text_encoder_ignores_padding(pool):
    torch.manual_seed(0)
    enc = TextEncoder(width=32, layers=1, heads=2, max_len=64, pool=pool).eval()
    short, long = encode(["LVEF 35%, dilated LV"], 32), encode(["LVEF 35%, dilated LV"], 64)
    assert enc(short).shape == (1, 32)
    assert torch.allclose(enc(short), enc(long), atol=1e-5)
    assert not torch.allclose(enc(encode(["LVEF 35%"], 32)), enc(encode(["LVEF 65%"], 32)))


def test_attention_pooling_is_a_learned_query_that_the_config_reaches():
    from ccmr_core.config import load_config
    from ccmr_core.models.registry import build_model, model_kwargs

    torch.manual_seed(0)
    enc = TextEncoder(width=32, layers=1, heads=2, max_len=64, pool="attention").eval()
    ids = encode(["LVEF 35%, dilated LV", "LVEF 65%"], 64)
    before = enc(ids)
    with torch.no_grad():
        enc.query.add_(torch.randn_like(enc.query))  # the query decides what is read: a new one, new vectors
    assert not torch.allclose(before, enc(ids), atol=1e-4)
    assert {"query", "pool_attn.in_proj_weight"} <= set(enc.state_dict())
    assert "query" not in TextEncoder(width=32, layers=1, heads=2, max_len=64).state_dict()  # the default: mean
    with pytest.raises(ValueError, match="text pooling 'max'"):
        TextEncoder(width=32, pool="max")
    on = load_config(preset="cmr-clip", overrides=["model.text_pool=attention"])
    assert build_model("cmr-clip", **model_kwargs(on, 1)).text.pool == "attention"
    assert build_model("cmr-clip", **model_kwargs(load_config(preset="cmr-clip"), 1)).text.pool == "mean"


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


def test_sentence_sampling_gives_whole_sentences_of_the_patients_own_report():
    from ccmr_core.data.reports import sentences

    text = "LVEDV 230ml LVEF 22%. Max WT 2.5 mm; no RWMA. No late gadolinium enhancement. Imp: DCM."
    assert sentences(text) == ["LVEDV 230ml LVEF 22%.", "Max WT 2.5 mm;", "no RWMA.",
                               "No late gadolinium enhancement.", "Imp: DCM."]
    base = [{"label": torch.tensor(i)} for i in range(2)]
    reports = {"s/P1": text, "s/P2": "Normal study."}
    whole = WithReports(base, ["s/P1", "s/P2"], reports)
    assert decode(whole[0]["report"]) == text  # no sampling unless asked (evaluation, inference)
    torch.manual_seed(0)
    ds = WithReports(base, ["s/P1", "s/P2"], reports, sentence_p=0.5)
    seen = [decode(ds[0]["report"]) for _ in range(200)]
    assert set(seen) == {text, *sentences(text)}  # the whole report or one of its own sentences
    assert 0.35 < seen.count(text) / len(seen) < 0.65
    assert {decode(ds[1]["report"]) for _ in range(20)} == {"Normal study."}  # one sentence: itself
    assert all(ds[0]["report"].shape == whole[0]["report"].shape for _ in range(5))


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


def test_every_finding_has_positive_and_negative_prompts_and_a_truth():
    from ccmr_core.retrieval import FINDING_NEGATIVE_PROMPTS, FINDING_PROMPTS
    from ccmr_core.synth.reports import FINDINGS

    assert list(FINDING_PROMPTS) == list(FINDING_NEGATIVE_PROMPTS) == list(FINDINGS)
    for f in FINDINGS:
        assert FINDING_NEGATIVE_PROMPTS[f] and not set(FINDING_NEGATIVE_PROMPTS[f]) & set(FINDING_PROMPTS[f])


def test_ccmr_train_cmr_clip_then_search(cohort, tmp_path, monkeypatch, capsys):
    from ccmr_core.cli import main

    monkeypatch.setenv("CCMR_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    assert main(["train", "--data", str(cohort), "--model", "cmr-clip", "--out", str(run), "--test-site", "site-c",
                 "--preset", "smoke", "--set", "train.epochs=2", "--set", "train.batch_size=4",
                 "--set", "train.threads=1", "--set", "data.report_column=report_without_diagnosis", "--quiet"]) == 0
    assert json.loads((run / "metrics.json").read_text())["report_column"] == "report_without_diagnosis"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(np.isfinite(r["train"]["loss"]) and np.isfinite(r["val"]["loss"]) for r in rows)
    assert all(r["train"]["chance_loss"] == pytest.approx(np.log(4)) for r in rows)  # batches of 4
    assert json.loads((run / "metrics.json").read_text())["kept_epoch"] == 2  # the last (train.keep_model)
    m = json.loads((run / "metrics.json").read_text())["test"]
    n = m["test_n"]
    assert n == len(_reports(cohort / "site-c")) and m["retrieval"]["gallery"] == n
    assert 1 <= m["retrieval"]["report_to_video"]["median_rank"] <= n
    assert set(m["findings"]) == {"lv_dysfunction", "lv_dilation", "lv_hypertrophy", "lge_present", "rv_dysfunction",
                                  "rwma"}
    page = (run / "report.html").read_text()
    assert f"gallery of {n} studies" in page and "zero-shot" in page and "Learning curves" in page
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)  # an embedded plot may spell "ECE" by chance
    assert "ECE" not in text  # no classifier sections for a model without a diagnosis head
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


def test_evaluation_uses_the_test_embedding_its_caller_already_has(cohort, clip_run, tmp_path):
    """The benchmark embeds the test patients once for its per-patient scores and hands them to
    evaluate_clip: the same figures as embedding again; other embeddings give other figures."""
    from ccmr_core.checkpoint import load_clip
    from ccmr_core.clip_training import embed, evaluate_clip, site_reports
    from ccmr_core.config import load_config
    from ccmr_core.data.sources import MultiSite, prepare
    from ccmr_core.training import split_indices
    from torch.utils.data import Subset

    model, blob = load_clip(clip_run / "model.pt", "this test needs")
    cfg = load_config(preset="smoke", overrides=["model.name=cmr-clip"])
    ds = MultiSite(prepare(cohort, cfg, tmp_path, progress=False), cfg)
    wr = WithReports(ds, ds.patient_ids, site_reports(cohort, cfg.data.report_column))
    idx = split_indices(ds, cfg, "site-c")
    classes = list(blob["classes"])
    emb = embed(model, Subset(wr, idx["test"]))
    assert evaluate_clip(model, wr, idx, classes, test_embedding=emb) == evaluate_clip(model, wr, idx, classes)
    # each study embedded as its own report: retrieval becomes perfect, whatever the model learnt
    perfect = (emb[1].copy(), emb[1], emb[2])
    assert evaluate_clip(model, wr, idx, classes, test_embedding=perfect)["retrieval"]["video_to_report"]["R@1"] == 1.0


def test_best_validation_keeps_the_epoch_of_lowest_validation_loss(cohort, tmp_path):
    from torch.utils.data import Subset

    from ccmr_core.clip_training import embeddings, train_clip, validation_loss
    from ccmr_core.config import ConfigError, load_config

    cfg = load_config(preset="smoke", overrides=["model.name=cmr-clip", "train.epochs=3", "train.batch_size=4",
                                                 "train.threads=1", "train.keep_model=best-validation"])
    model, s = train_clip(cohort, tmp_path / "run", cfg, "site-c", cache_root=tmp_path / "cache")
    rows = [json.loads(x)["val"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows]
    assert len(rows) == 3 and all(r["gallery"] >= 2 and r["chance_loss"] == pytest.approx(np.log(r["gallery"]))
                                  for r in rows)
    assert s["kept_epoch"] == 1 + int(np.argmin(losses))
    assert all(torch.equal(v, s["best"]["state"][k]) for k, v in model.state_dict().items())
    val = Subset(s["ds"], s["idx"]["val"])
    assert validation_loss(model, val)["loss"] == pytest.approx(min(losses), abs=1e-5)
    # validating between epochs draws nothing from the global RNG the training's augmentation uses
    torch.manual_seed(0)
    first = torch.rand(3)
    torch.manual_seed(0)
    embeddings(model, val)
    assert torch.equal(torch.rand(3), first)
    with pytest.raises(ConfigError, match="train.keep_model 'best-validation' is for model.name 'cmr-clip' only"):
        load_config(overrides=["train.keep_model=best-validation"])


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


def test_cmr_clip_refuses_patient_level_dp_and_a_classifier_start():
    from ccmr_core.config import ConfigError, load_config
    from server.server_app import open_run

    with pytest.raises(ConfigError, match="cannot be combined with model.name 'cmr-clip'"):
        load_config(overrides=["model.name=cmr-clip", "privacy.mode=sample"])
    load_config(overrides=["model.name=cmr-clip", "privacy.mode=site"])  # site-level DP is allowed
    for yaml in ("federated: {pretrain: public}", "privacy: {finetune: head}"):
        with pytest.raises(ValueError, match="set federated.pretrain: none and privacy.finetune: auto"):
            open_run({"model": "cmr-clip", "config-yaml": yaml})
    with pytest.raises(ValueError, match="a federation keeps its last round's model"):
        open_run({"model": "cmr-clip", "config-yaml": "train: {keep_model: best-validation}"})


def _gallery(n, d=8, seed=0, noise=0.3):
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(n, d))
    t = v + noise * rng.normal(size=(n, d))
    return v / np.linalg.norm(v, axis=1, keepdims=True), t / np.linalg.norm(t, axis=1, keepdims=True)


def test_site_retrieval_statistics_pool_to_the_central_figures():
    from ccmr_core.retrieval_stats import KS, RetrievalStats

    v, t = _gallery(12)
    y = np.arange(12) % 3
    protos = [v[y == c][:2] for c in range(3)]
    s = RetrievalStats.from_embeddings(v, t, y, protos, temperature=0.1)
    central = retrieval(v @ t.T, ks=KS)
    got = s.summary()
    for way in ("video_to_report", "report_to_video"):
        for k in KS:
            assert got["retrieval"][way][f"R@{k}"] == pytest.approx(central[way][f"R@{k}"])
        assert got["retrieval"][way]["mean_rank"] == pytest.approx(central[way]["mean_rank"])
    assert got["class_precision@5"] == pytest.approx(class_precision_at_k(v @ t.T, y, 5))
    want = clip_loss(torch.tensor(v), torch.tensor(t), 0.1).sum().item()
    assert s.loss_sum == pytest.approx(want, rel=1e-6)  # the training loss, over the whole gallery
    # two sites: counts add, each keeps its own gallery and chance
    v2, t2 = _gallery(4, seed=1)
    s2 = RetrievalStats.from_embeddings(v2, t2, np.zeros(4, int), protos, 0.1)
    both = RetrievalStats.from_flat({k: np.add(a, b).tolist() for (k, a), b in zip(s.to_flat().items(),
                                                                                  s2.to_flat().values())})
    assert both.summary()["n"] == 16 and both.summary()["galleries"] == 2
    assert both.summary()["retrieval"]["chance"]["R@5"] == pytest.approx((12 * 5 / 12 + 4 * 4 / 4) / 16)  # each query: K / its gallery
    assert both.v2t_hits.tolist() == (s.v2t_hits + s2.v2t_hits).tolist()


def test_the_coordinator_leaves_out_retrieval_counts_no_gallery_produces():
    from flwr.app import MetricRecord, RecordDict

    from ccmr_core.retrieval_stats import RetrievalStats, flat_problem
    from protocol import messages as proto
    from server.aggregation import retrieval_summary

    v, t = _gallery(6)
    honest = RetrievalStats.from_embeddings(v, t, np.zeros(6, int), [], 0.1).to_flat()
    assert flat_problem(honest) is None
    # no class prompts for this label set: zero-shot accuracy is not available, not 0
    assert honest["zero_shot_n"] == [0.0] and RetrievalStats.from_flat(honest).summary()["zero_shot_accuracy"] is None
    assert "zero-shot hits" in flat_problem({**honest, "zero_shot_correct": [1.0]})

    def reply(flat, site_n):
        m = {proto.NUM_EXAMPLES: flat["n"][0], proto.SITE_N: site_n,
             **{proto.RETRIEVAL_STATS + k: x for k, x in flat.items()}}
        return RecordDict({"metrics": MetricRecord(m)})

    inflated = {**honest, "t2v_hits": [6.0, 6.0, 60.0]}  # more hits than queries
    assert "exceeds" in flat_problem(inflated)
    assert "below the number of queries" in flat_problem({**honest, "v2t_rank_sum": [1.0]})
    assert "expected 3" in flat_problem({**honest, "v2t_hits": [1.0]})
    out = retrieval_summary([reply(honest, [6.0, 0.0]), reply(inflated, [0.0, 6.0]), reply(honest, [0.0, 5.0])])
    assert out["n"] == 6 and out["site_n"] == [6, 0]  # the hostile and the inconsistent replies left out


@pytest.mark.parametrize("measurements", [False, True], ids=["contrastive", "with report measurements"])
def test_federated_cmr_clip_rounds_evaluate_retrieval_at_each_site(tmp_path, monkeypatch, capsys, measurements):
    """`flwr run .` with model cmr-clip: reports stay at the sites, which train the contrastive
    model and answer evaluations with allow-listed retrieval counts over their own galleries (also
    with the report's measurements as a second loss, read from each site's own labels)."""
    import ccmr_core.models.cmr_clip as cmr_clip_module
    from ccmr_core.checkpoint import load_clip
    from client.client_app import app as client_app
    from server.server_app import app as server_app
    from tests.conftest import write_toy_site
    from tests.inprocess import run_inprocess
    from tests.test_federation import _run_config

    monkeypatch.setenv("CCMR_CACHE", str(tmp_path / "cache"))
    cohort = tmp_path / "toy"
    rng = np.random.default_rng(0)
    for k, name in enumerate(("site-a", "site-b", "site-c")):
        site = write_toy_site(cohort, name, {"NOR": 6, "DCM": 6}, seed=k)  # 2 test, 1 val per class
        with open(site / "reports.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["patient_id", "report"])
            for pid in sorted(p.stem for p in (site / "studies").glob("*.npz")):
                ef = rng.integers(55, 70) if "-NOR-" in pid else rng.integers(10, 30)
                w.writerow([pid, f"LVEF {ef}%. " + ("Normal LV size." if "-NOR-" in pid else "Severely dilated LV.")])
        if measurements:  # the report's EF as the site's labels state it
            manifest = json.loads((site / "manifest.json").read_text())
            for study in manifest["studies"]:
                study["measurements"] = {"lvef": 60.0 if "-NOR-" in study["patient_id"] else 20.0}
            (site / "manifest.json").write_text(json.dumps(manifest))
    cfgfile = tmp_path / "clip.yaml"
    lines = (["data: {classes: [NOR, DCM], measurements: [lvef]}", "model: {report_measurements: true}"] if measurements
             else ["data: {classes: [NOR, DCM], measurements: []}"])
    cfgfile.write_text("\n".join(lines + ["train: {batch_size: 3}",
                                          "federated: {rounds: 2, local_epochs: 2, validation_patients: 0}"]) + "\n")
    stated = []  # how many measurements each training batch at the sites held
    real_loss = cmr_clip_module.measurement_loss
    monkeypatch.setattr(cmr_clip_module, "measurement_loss", lambda pred, target, present:
                        stated.append(int(present.sum())) or real_loss(pred, target, present))
    out = tmp_path / "run"
    grid = run_inprocess(server_app, client_app, 3, _run_config(
        preset="smoke", model="cmr-clip", config=str(cfgfile), **{"out-dir": str(out), "data-dir": str(cohort)}))
    assert (sum(stated) > 0) == measurements  # the sites trained on their own labels' EF
    printed = capsys.readouterr().out
    assert "report->study R@5" in printed and "each site retrieves within its own gallery" in printed
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    fed = rows[-1]["federated_validation"]
    assert fed["patients"] == 6 and fed["chance-R@5"] == 1.0 and np.isfinite(fed["loss"])  # galleries of 2
    assert all(np.isfinite(r["train"]["train-loss"]) for r in rows)
    test = json.loads((out / "metrics.json").read_text())["test"]
    assert test["n"] == 12 and test["galleries"] == 3 and test["site_n"] == [4, 4, 4]
    assert test["retrieval"]["chance"]["R@1"] == 0.25 and 1 <= test["retrieval"]["report_to_video"]["mean_rank"] <= 4
    assert 0 <= test["zero_shot_accuracy"] <= 1 and test["class_precision@5"] == 0.5  # 4 studies, 2 per class
    model, blob = load_clip(out / "model.pt", "this test needs")
    assert blob["model"] == "cmr-clip" and blob["info"]["federated"]
    assert (model.measure is not None) == measurements
    assert "own test gallery (3 sites" in (out / "report.html").read_text()
    # what left the sites: retrieval statistics only (no arrays, no text) in every evaluation reply
    evals = [r for r in grid.received if r.has_content() and not r.content.array_records]
    assert len(evals) == 3 * 3  # two rounds and the final test, three sites each
    for r in evals:
        keys = set(r.content["metrics"].keys())
        assert "refused" not in keys and any(k.startswith("retrieval-") for k in keys)
        assert not any(k.startswith("stats-") for k in keys)


def test_learnt_temperature_is_off_by_default_for_cmr_clip_and_learns_when_set():
    from ccmr_core.config import load_config
    from ccmr_core.engine import make_optimizer
    from ccmr_core.models.registry import build_model, model_kwargs

    fixed = build_model("cmr-clip", **model_kwargs(load_config(preset="cmr-clip"), 1))
    assert fixed.temperature == 0.1 and not any("logit_scale" in k for k in fixed.state_dict())  # old files load
    assert build_model("cc-cmr", **model_kwargs(load_config(), 4)).temperature.v.requires_grad  # CC-CMR: learnt
    cfg = load_config(preset="cmr-clip", overrides=["model.learn_temperature=true", "model.width=4", "model.dim=16"])
    torch.manual_seed(0)
    m = build_model("cmr-clip", **model_kwargs(cfg, 1))
    assert abs(m.temperature - 0.1) < 1e-6 and "logit_scale.v" in m.state_dict()
    opt = make_optimizer(m, cfg.train)
    fast = next(g for g in opt.param_groups if any(p is m.logit_scale.v for p in g["params"]))
    assert fast["weight_decay"] == 0.0  # decay would pull the temperature towards 1
    batch = {"cine": torch.rand(4, cfg.data.ingest.slices, 4, 32, 32), "report": encode(["a b", "c d", "e f", "g"], 32)}
    loss, _ = m.losses(m(batch["cine"], batch["report"]), batch)
    loss.mean().backward()
    assert m.logit_scale.v.grad is not None and float(m.logit_scale.v.grad) != 0.0
    opt.step()
    assert m.temperature != pytest.approx(0.1, abs=1e-6)


def test_report_measurements_supervise_the_study_side_only_where_the_report_states_them():
    from ccmr_core.config import ConfigError, load_config
    from ccmr_core.models.registry import build_model, model_kwargs

    with pytest.raises(ConfigError, match="model.report_measurements needs.*data.measurements is empty"):
        load_config(preset="cmr-clip", overrides=["model.report_measurements=true", "data.measurements=[]"])
    plain = build_model("cmr-clip", **model_kwargs(load_config(preset="cmr-clip"), 1))
    assert plain.measure is None and not any(k.startswith("measure") for k in plain.state_dict())  # old files load
    cfg = load_config(preset="cmr-clip", overrides=["model.report_measurements=true", "model.width=4", "model.dim=16"])
    torch.manual_seed(0)
    m = build_model("cmr-clip", **model_kwargs(cfg, 1))
    n = len(cfg.data.measurements)
    assert m.measure.out_features == n
    cine = torch.rand(3, cfg.data.ingest.slices, 4, 32, 32)
    batch = {"cine": cine, "report": encode(["a b", "c d", "e f"], 32), "meas": torch.zeros(3, n),
             "has_meas": torch.tensor([[True] * n, [False] * n, [True] + [False] * (n - 1)])}
    out = m(batch["cine"], batch["report"])
    loss, parts = m.losses(out, batch)
    assert set(parts) == {"clip", "measure"} and loss.shape == (3,)
    assert parts["measure"][1] == 0  # a report that states no value adds nothing
    assert torch.allclose(loss, parts["clip"] + parts["measure"])
    expected = torch.nn.functional.smooth_l1_loss(out["measure"][0], batch["meas"][0])
    assert torch.isclose(parts["measure"][0], expected)
    # the estimate reads the study: its gradient reaches the cine encoder, not the text side
    m.zero_grad()
    parts["measure"].sum().backward()
    assert m.cine.proj[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in m.text.parameters())
    # inference is the embedding alone, the same with or without the head's output
    assert torch.equal(m.embed_video(cine), out["video"])


def test_training_with_report_measurements_logs_both_losses_and_no_chance_line_for_their_sum(cohort, tmp_path):
    from ccmr_core.clip_training import train_clip
    from ccmr_core.config import load_config

    cfg = load_config(preset="smoke", overrides=["model.name=cmr-clip", "train.epochs=1", "train.batch_size=4",
                                                 "train.threads=1", "model.report_measurements=true"])
    model, _ = train_clip(cohort, tmp_path / "run", cfg, "site-c", cache_root=tmp_path / "cache")
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert model.measure is not None and row["train"]["measure"] > 0  # the cohort's reports state measurements
    assert row["train"]["loss"] == pytest.approx(row["train"]["clip"] + row["train"]["measure"], rel=1e-5)
    assert "chance_loss" not in row["train"] and row["val"]["chance_loss"] > 0  # validation: contrastive alone
