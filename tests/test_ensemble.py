"""Deep ensembles (`ccmr ensemble`): the members' mean probability, their disagreement as
uncertainty, one model file that every command reads, and clear refusals."""

import numpy as np
import pytest
import torch

from ccmr_core.checkpoint import load_classifier, load_model, save_model
from ccmr_core.cli import main
from ccmr_core.engine import predict
from ccmr_core.export import load_exported
from ccmr_core.inference import Predictor, predict_study
from ccmr_core.models.ensemble import DeepEnsemble
from ccmr_core.training import evaluate_saved
from tests.conftest import labels_of


def _other_member(run, path, scale=0.5, **blob_changes):
    """A second 'run': the trained model with its diagnostic layer perturbed, saved like a run's."""
    model, blob = load_model(run / "model.pt")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "cls" in name or "logits" in name:
                p.add_(scale * torch.randn(p.shape, generator=g))
    blob = {**blob, **blob_changes}
    save_model(path, model.state_dict(), name=blob["model"], kwargs=blob["model_kwargs"], classes=blob["classes"],
               ingest=blob["ingest"], config=blob["config"], info=blob["info"], refer=blob["refer"])
    return path


def _batch(n=4, seed=0, x=None):
    g = torch.Generator().manual_seed(seed)
    s, t, h = 4, 8, 32
    cine = torch.rand(n, s, t, h, h, generator=g) if x is None else torch.from_numpy(x)
    n = len(cine)
    return [{"cine": cine, "lge": torch.zeros(n, s, h, h), "has_lge": torch.zeros(n, dtype=torch.bool),
             "label": torch.arange(n) % 5, "index": torch.arange(n)}]


def test_probabilities_are_the_members_mean_and_uncertainty_their_disagreement(trained_run, tmp_path):
    run, _ = trained_run
    a, _ = load_classifier(run / "model.pt")
    b, _ = load_classifier(_other_member(run, tmp_path / "b.pt"))
    cpu = torch.device("cpu")
    pa, pb = (predict(m, _batch(), cpu, 0) for m in (a, b))
    assert np.abs(pa["probs"] - pb["probs"]).max() > 0.01  # the members differ
    pe = predict(DeepEnsemble([a, b]), _batch(), cpu, 0)
    np.testing.assert_allclose(pe["probs"], (pa["probs"] + pb["probs"]) / 2, atol=1e-5)
    np.testing.assert_allclose(np.exp(pe["logits"]), pe["probs"], atol=1e-5)  # head: log of the mean
    assert (pa["uncertainty"] == 0).all() and (pe["uncertainty"] > 1e-4).all()  # without MC: disagreement only
    twins = predict(DeepEnsemble([a, a]), _batch(), cpu, 0)
    np.testing.assert_allclose(twins["probs"], pa["probs"], atol=1e-5)
    assert np.abs(twins["uncertainty"]).max() < 1e-5  # members that agree add no uncertainty
    torch.manual_seed(0)
    mc = predict(DeepEnsemble([a, a]), _batch(), cpu, 6)
    torch.manual_seed(0)
    alone = predict(a, _batch(), cpu, 6)
    assert mc["uncertainty"].mean() > 0 and alone["uncertainty"].mean() > 0  # MC dropout still counts


def test_ensemble_file_is_read_by_evaluate_predict_and_export(trained_run, cohort, make_site, tmp_path, monkeypatch,
                                                             capsys):
    monkeypatch.setenv("CCMR_CACHE", str(tmp_path / "cache"))
    run, _ = trained_run
    b = _other_member(run, tmp_path / "b.pt")
    out = tmp_path / "ens.pt"
    assert main(["ensemble", str(run / "model.pt"), str(b), "--data", str(cohort), "--out", str(out), "--quiet"]) == 0
    said = capsys.readouterr().out
    assert "ensemble of 2 (cc-cmr, cc-cmr)" in said and "validation accuracy" in said
    model, blob = load_classifier(out)
    assert isinstance(model, DeepEnsemble) and len(model.members) == 2
    assert blob["refer"]["validation_n"] == blob["info"]["n_val"] > 0
    assert [m["architecture"] for m in blob["info"]["members"]] == ["cc-cmr", "cc-cmr"]
    # the file holds both members' weights: the first member's outputs are the trained run's
    a, _ = load_classifier(run / "model.pt")
    batch = _batch()
    np.testing.assert_allclose(predict(model.members[0], batch, torch.device("cpu"), 0)["probs"],
                               predict(a, batch, torch.device("cpu"), 0)["probs"], atol=1e-6)
    m = evaluate_saved(out, cohort / "site-c", tmp_path / "eval", progress=False)
    assert m["model"] == "ensemble" and 0 <= m["test"]["accuracy"] <= 1 and m["test"]["n"] > 0
    pred = Predictor(out)
    r = pred.predict(np.random.default_rng(0).random((4, 8, 32, 32), dtype=np.float32))
    assert abs(sum(r["probabilities"].values()) - 1) < 1e-5 and r["epistemic_uncertainty"] > 0
    assert pred.identity["architecture"] == "ensemble" and len(pred.identity["members"]) == 2
    study = make_site([("site-c", sorted(labels_of(cohort / "site-c"))[0])], name="study")
    doc = predict_study(study, out, tmp_path / "p")
    assert doc["model"]["architecture"] == "ensemble" and "log-probability (ensemble)" in doc["saliency"]["method"]
    assert (tmp_path / "p" / "saliency.png").is_file()
    assert main(["export", str(out), "--format", "torchscript", "--out", str(tmp_path / "e.ts")]) == 0
    run_exported, meta = load_exported(tmp_path / "e.ts")
    x = np.random.default_rng(1).random((2, 4, 8, 32, 32), dtype=np.float32)
    np.testing.assert_allclose(run_exported(x), predict(model, _batch(x=x), torch.device("cpu"), 0)["probs"],
                               atol=1e-5)  # the exported file is the ensemble's mean probability
    assert meta["source_model"]["architecture"] == "ensemble"


@pytest.mark.parametrize("case", ["one", "twice", "classes", "grid", "nested", "sites", "folder"])
def test_mismatched_members_are_refused_and_nothing_is_written(trained_run, cohort, tmp_path, monkeypatch, capsys, case):
    monkeypatch.setenv("CCMR_CACHE", str(tmp_path / "cache"))
    run, _ = trained_run
    a = run / "model.pt"
    _, blob = load_model(a)
    data, expect = cohort, ""
    if case == "one":
        models, expect = [a], "two or more"
    elif case == "twice":
        models, expect = [a, a], "given twice"
    elif case == "classes":
        other = list(reversed(blob["classes"]))
        models, expect = [a, _other_member(run, tmp_path / "b.pt", classes=other)], "classes"
    elif case == "grid":
        models, expect = [a, _other_member(run, tmp_path / "b.pt", ingest={**blob["ingest"], "size": 48})], "grid"
    elif case == "nested":
        ens = tmp_path / "ens.pt"
        assert main(["ensemble", str(a), str(_other_member(run, tmp_path / "b.pt")), "--data", str(cohort), "--out",
                     str(ens), "--quiet"]) == 0
        models, expect = [ens, a], "already an ensemble"
    elif case == "sites":
        data, models, expect = cohort / "site-c", [a, _other_member(run, tmp_path / "b.pt")], "trained on"
    else:
        models, expect = [a, _other_member(run, tmp_path / "b.pt")], "does not exist"
    out = tmp_path / ("missing/out.pt" if case == "folder" else "out.pt")
    capsys.readouterr()
    assert main(["ensemble", *map(str, models), "--data", str(data), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and expect in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    if case in ("classes", "grid"):
        assert str(tmp_path / "b.pt") in err  # names the member that differs
