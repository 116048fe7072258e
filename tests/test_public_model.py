"""The coordinator's public pretraining: a model below federated.public_min_accuracy on the public
cohort's validation patients never becomes the sites' starting point."""

import json

import pytest
import torch

from ccmr_core.checkpoint import load_model, save_model
from ccmr_core.config import load_config
from ccmr_core.models import build_model
from ccmr_core.training import model_kwargs
from server import provision


def _fake_pretraining(monkeypatch, accuracy_by_seed: dict[int, float]) -> list[int]:
    """Replace the public cohort and its training by a model whose first parameter holds the
    training seed and a metrics.jsonl whose last validation accuracy is ``accuracy_by_seed[seed]``.
    Returns the seeds trained, in order."""
    trained = []

    def train_central(cohort, out, cfg, progress=False):
        seed = cfg.train.seed
        trained.append(seed)
        kwargs = model_kwargs(cfg, 4)
        model = build_model(cfg.model.name, **kwargs)
        state = model.state_dict()
        first = next(iter(state))
        state[first] = torch.full_like(state[first], float(seed))
        out.mkdir(parents=True)
        save_model(out / "model.pt", state, name=cfg.model.name, kwargs=kwargs, classes=list(cfg.data.classes),
                   ingest={}, config={})
        rows = [{"epoch": e, "val": {"accuracy": 0.2}} for e in (1, 2)]
        rows[-1]["val"]["accuracy"] = accuracy_by_seed[seed]
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (out / "metrics.json").write_text(json.dumps({"n_val": 21, "test": {"accuracy": 0.5, "n": 21}}))
        return {"test": {"accuracy": 0.5, "n": 21}}

    monkeypatch.setattr("ccmr_core.training.train_central", train_central)
    monkeypatch.setattr(provision, "cohort_matches", lambda *a, **k: True)
    return trained


def _cfg(*over):
    return load_config(preset="smoke", overrides=["train.seed=2", "federated.pretrain=public", *over])


def test_a_public_model_below_the_floor_is_trained_again_with_another_seed(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CCMR_CACHE", str(tmp_path))
    step = provision.PUBLIC_RETRY_SEED_STEP
    trained = _fake_pretraining(monkeypatch, {2: 0.62, 2 + step: 0.90, 2 + 2 * step: 0.95})
    state = provision.public_model(_cfg())
    assert trained == [2, 2 + step]  # stops at the first seed that reaches the floor
    assert float(next(iter(state.values())).flatten()[0]) == 2 + step
    out = capsys.readouterr().out
    assert "seed 2 reached validation accuracy 0.620" in out and "below federated.public_min_accuracy 0.8" in out
    assert f"pretraining seed {2 + step}, validation accuracy 0.900 on 21 public patients" in out
    # each attempt is cached: asking again trains nothing and chooses the same model
    again = provision.public_model(_cfg())
    assert trained == [2, 2 + step] and torch.equal(next(iter(again.values())), next(iter(state.values())))
    # every attempt's run folder, the failed one first, the kept one last (what a benchmark times)
    runs = provision.public_runs(_cfg())
    assert len(runs) == 2 and all((r / "model.pt").is_file() for r in runs)
    assert float(next(iter(load_model(runs[-1] / "model.pt")[1]["state_dict"].values())).flatten()[0]) == 2 + step


def test_the_cached_public_model_serves_runs_that_differ_only_in_how_they_run(tmp_path, monkeypatch):
    """Threads, device and train.compile change how a pretraining runs, not what it learns: reused;
    a setting that changes the training (the learning rate) trains a new one."""
    monkeypatch.setenv("CCMR_CACHE", str(tmp_path))
    trained = _fake_pretraining(monkeypatch, {2: 0.9})
    provision.public_model(_cfg())
    provision.public_model(_cfg("train.threads=1", "train.device=cpu", "train.compile=true"))
    assert trained == [2]
    provision.public_model(_cfg("train.lr=0.01"))
    assert trained == [2, 2]


def test_no_public_model_reaching_the_floor_stops_the_run_naming_the_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("CCMR_CACHE", str(tmp_path))
    step = provision.PUBLIC_RETRY_SEED_STEP
    trained = _fake_pretraining(monkeypatch, {2: 0.62, 2 + step: 0.71})
    with pytest.raises(provision.PublicModelError) as e:
        provision.public_model(_cfg("federated.public_attempts=2"))
    assert trained == [2, 2 + step]
    msg = str(e.value)
    assert "federated.public_min_accuracy 0.8 in 2 attempt(s)" in msg and "seed 2: 0.620" in msg
    assert "federated.public_patients" in msg and "federated.public_attempts" in msg


def test_a_floor_of_zero_accepts_the_first_public_model(tmp_path, monkeypatch):
    monkeypatch.setenv("CCMR_CACHE", str(tmp_path))
    trained = _fake_pretraining(monkeypatch, {2: 0.2})
    provision.public_model(_cfg("federated.public_min_accuracy=0"))
    assert trained == [2]
