"""The ServerApp and ClientApp together, in-process: rounds, pooled metrics, run folder, DP."""

import os
import json
from pathlib import Path

import numpy as np
import pytest
import tomllib

from ccmr_core.checkpoint import load_model

from tests.inprocess import run_inprocess


ROOT = Path(__file__).resolve().parents[1]


def _run_config(**over):
    rc = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    rc = dict(rc)
    rc.update(over)
    return rc


def _small_public(folder: Path, privacy: str = "") -> str:
    """A config with a small public pretraining cohort (the pretrained model is cached per config;
    ``privacy`` settings do not change it)."""
    p = folder / "public.yaml"
    p.write_text("federated: {public_patients: 12, public_epochs: 1, public_min_accuracy: 0}\n" + (f"privacy: {{{privacy}}}\n" if privacy else ""))
    return str(p)


def _apps():
    from client.client_app import app as client_app
    from server.server_app import app as server_app

    return server_app, client_app


def test_simulated_federation_writes_the_run_folder(env, cohort, capsys):
    server_app, client_app = _apps()
    out = env / "run"
    rc = _run_config(preset="smoke", **{"out-dir": str(out), "data-dir": str(cohort)})
    grid = run_inprocess(server_app, client_app, 3, rc)
    printed = capsys.readouterr().out
    assert "round 1:" in printed and "round 2:" in printed and "test set" in printed
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    fed = rows[-1]["federated_validation"]
    assert 0 <= fed["accuracy"] <= 1 and len(fed["site-accuracy"]) == 3
    assert rows[-1]["server_validation"]["accuracy"] is not None
    m = json.loads((out / "metrics.json").read_text())
    assert m["test"]["n"] > 0 and len(m["test"]["accuracy_ci95"]) == 2 and "macro_auc" in m["test"]
    model, blob = load_model(out / "model.pt")
    assert blob["info"]["federated"] and not any(k.startswith("_module.") for k in blob["state_dict"])
    # referral thresholds set from the sites' pooled validation counts, stored with the model
    assert blob["refer"] == m["refer"] and blob["refer"]["validation_n"] > 0
    assert 0 <= blob["refer"]["confidence"] <= 1 and blob["refer"]["uncertainty"] is not None
    # the final test carries the report's curves, drawn from pooled counts
    assert set(m["test"]["curves"]) == {"roc", "reliability", "uncertainty", "risk_coverage"}
    assert sum(m["test"]["curves"]["uncertainty"]["correct"] + m["test"]["curves"]["uncertainty"]["wrong"]) == \
        m["test"]["n"]
    for f in ("config.yaml", "checkpoint.pt", "report.html"):
        assert (out / f).is_file()
    # only parameters and aggregate statistics came back from the sites
    params = set(blob["state_dict"])
    for rep in grid.received:
        if not rep.has_content():
            continue
        for rec in rep.content.array_records.values():
            assert set(rec.keys()) == params
        for rec in rep.content.metric_records.values():
            for k, v in rec.items():
                n = len(v) if isinstance(v, list) else 1
                assert n <= 25 * 5 or k.startswith("stats-"), k  # fixed-size statistics only


def test_validation_on_the_train_reply_records_what_an_evaluate_phase_would(env, cohort, capsys):
    """validate-in train-reply: round 1's model is validated at the start of round 2 (one message
    phase per round); the run log holds the same validation as with an evaluate phase per round."""
    from flwr.app import MessageType

    server_app, client_app = _apps()
    rows, rounds_evaluated = {}, {}
    for mode in ("evaluate-phase", "train-reply"):
        out = env / f"validate-{mode}"
        grid = run_inprocess(server_app, client_app, 3, _run_config(preset="smoke", **{
            "out-dir": str(out), "data-dir": str(cohort), "validate-in": mode}))
        rows[mode] = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        rounds_evaluated[mode] = sorted({int(m.content["config"]["global-round"]) for m in grid.sent
                                         if m.metadata.message_type == MessageType.EVALUATE
                                         and "global-round" in m.content["config"]})
    assert rounds_evaluated == {"evaluate-phase": [1, 2], "train-reply": [2]}
    assert [r["round"] for r in rows["train-reply"]] == [1, 2]
    for phase, ride in zip(rows["evaluate-phase"], rows["train-reply"]):
        a, b = phase["federated_validation"], ride["federated_validation"]
        assert b["patients"] == a["patients"] > 0 and b["accuracy"] == a["accuracy"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert "round 1: sites' validation accuracy" in capsys.readouterr().out


def test_federated_averaging_over_non_iid_sites_learns_patients_it_has_not_seen(tmp_path, monkeypatch, capsys):
    """Three sites with opposite class mixes (one mostly NOR, one mostly DCM, one balanced); each
    site's held-out test patients were never trained on. The federated model must classify them."""
    from tests.conftest import write_toy_site

    monkeypatch.setenv("CCMR_CACHE", str(tmp_path / "cache"))
    cohort = tmp_path / "toy"
    for name, counts, seed in (("site-a", {"NOR": 16, "DCM": 5}, 1), ("site-b", {"NOR": 5, "DCM": 16}, 2),
                               ("site-c", {"NOR": 9, "DCM": 9}, 3)):
        write_toy_site(cohort, name, counts, seed)
    cfg = tmp_path / "toy.yaml"
    cfg.write_text("data: {classes: [NOR, DCM], measurements: []}\nmodel: {mc_samples: 4}\n"
                   "train: {batch_size: 4, lr: 0.003}\nfederated: {rounds: 5, local_epochs: 2, validation_patients: 0}\n")
    server_app, client_app = _apps()
    out = tmp_path / "run"
    run_inprocess(server_app, client_app, 3, _run_config(preset="smoke", config=str(cfg), strategy="fedavg",
                                                          **{"out-dir": str(out), "data-dir": str(cohort)}))
    test = json.loads((out / "metrics.json").read_text())["test"]
    assert test["n"] == 12 and test["site_n"] == [4, 4, 4]
    assert test["accuracy"] >= 11 / 12, test["confusion_matrix"]  # chance: 1/2
    assert min(test["site_accuracy"]) >= 0.75


def test_fewer_supernodes_than_sites_still_trains_every_site(env, cohort, capsys):
    """Two SuperNodes for three sites: one hosts two sites, each trained and weighted on its own, so
    the global model is the one three SuperNodes give (up to float rounding)."""
    import torch

    server_app, client_app = _apps()
    states = {}
    for nodes in (3, 2):
        out = env / f"nodes{nodes}"
        rc = _run_config(preset="smoke", **{"out-dir": str(out), "data-dir": str(cohort), "num-server-rounds": 1})
        run_inprocess(server_app, client_app, nodes, rc)
        states[nodes] = torch.load(out / "model.pt", weights_only=False)["state_dict"]
    printed = capsys.readouterr().out
    assert "some SuperNodes host several sites" in printed
    for site in ("site-a", "site-b", "site-c"):
        assert printed.count(f"[{site}] round 1 (") == 2
    moved = 0.0
    for k, v in states[3].items():
        assert torch.allclose(v.float(), states[2][k].float(), atol=1e-5, rtol=1e-4), k
        moved = max(moved, float((v.float() - states[2][k].float()).abs().max()))
    assert moved < 1e-5


def test_each_site_trains_with_the_federations_local_batch_and_its_own_class_prior(env, cohort, capsys):
    """federated.local_batch_size sets the batch a site trains with (the pooled runs keep
    train.batch_size, 4 here): a round of 2 local epochs in batches of 1 makes 2 x patients AdamW
    steps at each site, as its kept optimiser state counts them; with federated.logit_adjustment
    each site says that it trains on logits adjusted for its own class mix (tests/test_engine.py:
    what that does)."""
    import torch

    from ccmr_core.config import from_run_config
    from client.local import load_sites

    server_app, client_app = _apps()
    optimizers = Path(os.environ["CCMR_CACHE"]) / "optimizer"
    before = set(optimizers.iterdir()) if optimizers.is_dir() else set()
    rc = _run_config(preset="smoke", **{"out-dir": str(env / "run"), "data-dir": str(cohort), "num-server-rounds": 1,
                                        "local-batch-size": 1, "logit-adjustment": True})
    cfg = from_run_config(rc)
    assert (cfg.federated.local_batch_size, cfg.federated.local_epochs, cfg.train.batch_size) == (1, 2, 4)
    run_inprocess(server_app, client_app, 3, rc)
    (run,) = set(optimizers.iterdir()) - before
    printed = capsys.readouterr().out
    sites = load_sites({"partition-id": 0, "num-partitions": 1}, cfg, str(cohort))
    assert len(sites) == 3
    for site in sites:
        n = len(site.split["train"])
        assert n >= 2  # so that batches of 1 and of 4 differ in number
        state = torch.load(run / f"{site.name}.pt", weights_only=True)["state"]["state"]
        assert {int(s["step"]) for s in state.values()} == {2 * n}, site.name
        line = printed.split(f"[{site.name}] round 1 (")[1].split("\n")[0]
        assert f"{n} patients in batches of 1, logits adjusted for its class mix, loss" in line


def test_scaffold_sends_control_variates_both_ways_from_the_second_round(env, cohort, capsys, monkeypatch):
    """federated.drift_correction 'scaffold': round 1 is plain local training and each site keeps its
    c_i at the site and sends its change beside the model; from round 2 each train request carries
    the coordinator's c and every site shifts its gradients by c - c_i (a shift it reports). The
    site's audit summary says that control variates left. c goes into the checkpoint: a resumed run
    sends it on, and each site goes on from its own c_i."""
    import torch
    from flwr.app import MessageType

    import client.client_app
    import client.local
    from client.egress import audit_path, summarize

    monkeypatch.setenv("CCMR_AUDIT_DIR", str(env / "audit-scaffold"))
    server_app, client_app = _apps()
    out = env / "scaffold"
    controls = Path(os.environ["CCMR_CACHE"]) / "control"
    before = set(controls.iterdir()) if controls.is_dir() else set()
    rc = _run_config(preset="smoke", **{"out-dir": str(out), "data-dir": str(cohort), "num-server-rounds": 2,
                                        "drift-correction": "scaffold"})
    run_inprocess(server_app, client_app, 3, rc)
    rows = [json.loads(x) for x in (out / "audit.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    with_c: dict[tuple, list[bool]] = {}
    for r in train:
        with_c.setdefault((r["round"], r["direction"]), []).append(any(k["key"].startswith("control/") for k in r["keys"]))
    assert not any(with_c[(1, "sent")]) and all(with_c[(2, "sent")])
    assert all(with_c[(1, "received")]) and all(with_c[(2, "received")])
    (run,) = set(controls.iterdir()) - before
    printed = capsys.readouterr().out
    assert "SCAFFOLD control variates" in printed
    for site in ("site-a", "site-b", "site-c"):
        kept = torch.load(run / f"{site}.pt", weights_only=True)
        assert kept["round"] == 2 and kept["c"] and kept["before"].keys() <= kept["c"].keys()
        assert all(bool(torch.isfinite(v).all()) for v in kept["c"].values())
        line = printed.split(f"[{site}] round 2 (")[1].split("\n")[0]
        norm = float(line.split("control variate of norm ")[1].split(",")[0])
        assert norm > 0
        assert "control variate" not in printed.split(f"[{site}] round 1 (")[1].split("\n")[0]
    assert (out / "model.pt").is_file() and "test" in json.loads((out / "metrics.json").read_text())
    n_params = len(dict(torch.load(out / "model.pt", weights_only=False)["state_dict"]))
    summary = summarize(audit_path("site-a"))
    n_control = int(summary.split("SCAFFOLD control-variate arrays per train reply: ")[1].split(";")[0])
    assert 0 < n_control <= n_params
    # the checkpoint keeps c; a resumed run sends it on in round 3 instead of starting it again
    c = torch.load(out / "checkpoint.pt", weights_only=True)["carried"]
    assert c and all(k.startswith("control/") for k in c)
    kept = {site: torch.load(run / f"{site}.pt", weights_only=True)["c"] for site in ("site-a", "site-b", "site-c")}
    read = {}

    def spy(site, run_key, rnd):
        read[(site.name, rnd)] = got = client.local.read_control(site, run_key, rnd)
        return got

    monkeypatch.setattr(client.client_app, "read_control", spy)
    rc.update({"resume": str(out), "num-server-rounds": 3})
    grid = run_inprocess(server_app, client_app, 3, rc)
    assert read.keys() == {(site, 3) for site in kept}  # each site went on from its own c_i of round 2
    for (site, _), c_i in read.items():
        assert c_i.keys() == kept[site].keys() and all(torch.equal(c_i[k], kept[site][k]) for k in c_i)
    sent = [m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN]
    assert len(sent) == 3 and {int(m.content["config"]["global-round"]) for m in sent} == {3}
    for m in sent:
        got = m.content.array_records["control"].to_torch_state_dict()
        assert got.keys() == {k.split("/", 1)[1] for k in c}
        assert all(torch.equal(got[k.split("/", 1)[1]], v) for k, v in c.items())


def test_dp_sample_reports_epsilon_per_site_and_declines_over_budget(env, cohort, capsys):
    server_app, client_app = _apps()
    out = env / "dp"
    rc = _run_config(preset="smoke", config=_small_public(env), **{"out-dir": str(out), "data-dir": str(cohort),
                                                                   "dp": "sample", "target-epsilon": 2.0,
                                                                   "num-server-rounds": 2})
    run_inprocess(server_app, client_app, 3, rc)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    eps = [r["privacy"]["epsilon"] for r in rows]
    assert set(eps[0]) == {"site-a", "site-b", "site-c"}
    for s in eps[0]:
        assert 0 < eps[0][s] < eps[1][s] <= 2.0 + 1e-6
    # a third round with the same run key would exceed the budget: sites decline, the run goes on
    rc.update({"resume": str(out), "num-server-rounds": 3})
    run_inprocess(server_app, client_app, 3, rc)
    last = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["round"] == 3 and sorted(last["privacy"]["declined"]) == ["site-a", "site-b", "site-c"]
    assert "declines to train" in capsys.readouterr().out


def test_dp_sites_fine_tune_only_the_heads_of_a_publicly_pretrained_model(env, cohort, capsys, monkeypatch):
    """Patient-level DP starts from the coordinator's public pretraining (no privacy cost) and the
    sites train the heads only: every other weight a site sends back is exactly what it received.
    Each step averages two views of each patient before clipping (augmentation multiplicity)."""
    from flwr.app import MessageType

    import client.local

    monkeypatch.setattr(client.local, "_VIEWS", {})  # views an earlier run in this process computed

    server_app, client_app = _apps()
    out = env / "dpft"
    rc = _run_config(preset="smoke", config=_small_public(env, "finetune_multiplicity: 2"),
                     **{"out-dir": str(out), "data-dir": str(cohort), "dp": "sample", "target-epsilon": 3.0})
    grid = run_inprocess(server_app, client_app, 3, rc)
    printed = capsys.readouterr().out
    # the pretraining itself is printed only by the first test that needs it (the cache is shared)
    assert "starts from public pretraining" in printed
    assert list((Path(os.environ["CCMR_CACHE"]) / "pretrained").glob("cc-cmr-*/model.pt"))
    assert "sites train the heads only" in printed
    # each site puts its patients' views through the frozen encoders once, not every round
    assert printed.count("training patients through the frozen encoders") == 3
    sent = {m.metadata.message_id: m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN}
    replies = [r for r in grid.received if r.metadata.message_type == MessageType.TRAIN and r.has_content()]
    assert len(replies) == 6
    moved = set()
    for r in replies:
        before = sent[r.metadata.reply_to_message_id].content["arrays"]
        after = next(iter(r.content.array_records.values()))
        for k in before.keys():
            same = np.array_equal(before[k].numpy(), after[k].numpy())
            if k.split(".")[0] in ("heads", "weighting", "temperature"):
                moved |= set() if same else {k.split(".")[0]}
            else:
                assert same, f"{k} changed under head-only DP fine-tuning"
    assert "heads" in moved
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < e <= 3.0 + 1e-6 for e in rows[-1]["privacy"]["epsilon"].values())


def test_resume_continues_without_losing_or_repeating_rounds(env, cohort):
    server_app, client_app = _apps()
    out = env / "res"
    rc = _run_config(preset="smoke", **{"out-dir": str(out), "data-dir": str(cohort), "num-server-rounds": 1})
    run_inprocess(server_app, client_app, 3, rc)
    import torch
    from flwr.app import MessageType

    after_one = torch.load(out / "checkpoint.pt", weights_only=False)
    assert after_one["round"] == 1
    rc.update({"resume": str(out), "num-server-rounds": 3})
    grid = run_inprocess(server_app, client_app, 3, rc)
    rounds = [json.loads(x)["round"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [1, 2, 3]
    # rounds 2 and 3 only (3 sites each), starting from the checkpoint's weights, not fresh ones
    train = [m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN]
    assert len(train) == 6 and {int(m.content["config"]["global-round"]) for m in train} == {2, 3}
    first = train[0].content["arrays"].to_torch_state_dict()
    assert set(first) == set(after_one["state"])
    assert all(torch.equal(first[k], after_one["state"][k]) for k in first)
    # a run config that builds another model (here the cine pooling of the default before) is refused
    # before the folder is touched: the checkpoint's weights would load into it and silently mean another model
    before = {f: (out / f).read_bytes() for f in ("config.yaml", "metrics.jsonl", "checkpoint.pt")}
    (env / "mean-pool.yaml").write_text("model: {region_pool: mean}\n")
    rc.update({"num-server-rounds": 4, "config": str(env / "mean-pool.yaml")})
    with pytest.raises(ValueError, match=r"region_pool: 'mean\+max' in the checkpoint, 'mean' now.*config.yaml"):
        run_inprocess(server_app, client_app, 3, rc)
    assert {f: (out / f).read_bytes() for f in before} == before


def test_tail_averaging_ends_with_the_mean_of_the_last_rounds_across_a_resume(env, cohort, capsys):
    """federated.average_last 2: the saved model is the mean of the global models of rounds 3 and 4
    (the student stage), also when the run stopped after round 3 and was resumed."""
    import torch
    from flwr.app import MessageType

    from ccmr_core.checkpoint import load_model

    server_app, client_app = _apps()
    out = env / "tail"
    yaml = env / "tail.yaml"
    yaml.write_text("federated: {average_last: 2}\n")
    rc = _run_config(preset="smoke", config=str(yaml), **{"out-dir": str(out), "data-dir": str(cohort),
                                                          "num-server-rounds": 3})
    run_inprocess(server_app, client_app, 3, rc)
    after_three = torch.load(out / "checkpoint.pt", weights_only=True)
    assert after_three["average"]["n"] == 1  # round 3 is the first of the student stage
    rc.update({"resume": str(out), "num-server-rounds": 4})
    grid = run_inprocess(server_app, client_app, 3, rc)
    assert "final model: the mean of the global models of rounds 3-4" in capsys.readouterr().out
    g3 = after_three["state"]
    g4 = next(m.content["arrays"].to_torch_state_dict() for m in grid.sent
              if m.metadata.message_type == MessageType.EVALUATE and m.content["config"].get("global-round") == 4)
    saved, _ = load_model(out / "model.pt")
    final = saved.state_dict()
    assert not torch.equal(g3["heads.cls.weight"], g4["heads.cls.weight"])  # round 4 trained the student
    for k, v in final.items():
        if v.is_floating_point() and k != "calibration":
            assert torch.allclose(v, (g3[k] + g4[k]) / 2, atol=1e-6), k


def test_resume_compares_the_settings_that_build_the_checkpoints_model(tmp_path):
    """A checkpoint written before a setting existed counts it at the model's own default: a setting
    of another model (CMR-CLIP's text_negation for CC-CMR) is no change, the same setting for the model
    that takes it is (its weights were built without it)."""
    import torch

    from ccmr_core.config import load_config
    from ccmr_core.models.registry import model_kwargs
    from server.recorder import CHECKPOINT, check_resume

    for name in ("cc-cmr", "cmr-clip"):
        kw = model_kwargs(load_config(preset="cmr-clip" if name == "cmr-clip" else None,
                                      overrides=["model.text_negation=true"]), 1)
        older = {k: v for k, v in kw.items() if k != "text_negation"}
        torch.save({"model": name, "model_kwargs": older, "state": {}}, tmp_path / CHECKPOINT)
        if name == "cc-cmr":
            check_resume(tmp_path, name, kw)
        else:
            with pytest.raises(ValueError, match="text_negation: False in the checkpoint, True now"):
                check_resume(tmp_path, name, kw)
        with pytest.raises(ValueError, match="model: .* in the checkpoint, 'dual-path' now"):
            check_resume(tmp_path, "dual-path", kw)


def test_resume_repairs_a_crash_between_the_checkpoint_and_the_metrics_line(tmp_path):
    import torch

    from ccmr_core.config import load_config
    from server.recorder import RunRecorder

    rec = RunRecorder(tmp_path, load_config(preset="smoke"), {}, ["a", "b"])
    state = {"w": torch.zeros(2)}
    for rnd in (1, 2):
        rec.record_round(rnd, state, {"train-loss": 1.0}, None, {"accuracy": 0.5, "macro-auc": 0.5, "ece": 0.1,
                                                               "loss": 1.0 / rnd}, None)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    # crashed after round 2's checkpoint, before its metrics line
    (tmp_path / "metrics.jsonl").write_text(lines[0] + "\n")
    RunRecorder(tmp_path, load_config(preset="smoke"), {}, ["a", "b"]).load_checkpoint()
    assert [json.loads(x)["round"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    # a metrics line for a round whose checkpoint never landed (round 3) is dropped: it is redone
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"round": 3}) + "\n")
    ck = RunRecorder(tmp_path, load_config(preset="smoke"), {}, ["a", "b"]).load_checkpoint()
    assert ck["round"] == 2
    assert [json.loads(x)["round"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    # a crash mid-append tore round 3's line (no newline): resume drops it, and the next round's line
    # is not glued onto it
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"round": 3, "train": {"tr')
    rec = RunRecorder(tmp_path, load_config(preset="smoke"), {}, ["a", "b"])
    assert rec.load_checkpoint()["round"] == 2
    assert [json.loads(x)["round"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"round": 3, "tr')  # torn again; this time the run goes on without a resume
    rec.record_round(3, state, {"train-loss": 1.0}, None, None, None)
    from ccmr_core.files import read_jsonl

    rows, damaged = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2, 3] and damaged == [3]


def test_bad_run_config_is_refused_with_the_allowed_keys(env):
    from ccmr_core.config import ConfigError, from_run_config

    with pytest.raises(ConfigError, match="negatives from other patients couple patients"):
        from_run_config(_run_config(dp="sample", alignment="bank"))
    assert from_run_config(_run_config(dp="sample")).alignment == "slice"
    with pytest.raises(ConfigError, match="unknown key.*allowed"):
        from_run_config({"rounds": 3})
    assert np.isclose(from_run_config(_run_config(**{"proximal-mu": 0.5})).federated.proximal_mu, 0.5)


def test_site_level_dp_clips_updates_and_reports_epsilon(env, cohort):
    server_app, client_app = _apps()
    out = env / "site-dp"
    rc = _run_config(preset="smoke", **{"out-dir": str(out), "data-dir": str(cohort), "dp": "site",
                                         "noise-multiplier": 1.0, "num-server-rounds": 2})
    run_inprocess(server_app, client_app, 3, rc)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    e1, e2 = (r["privacy"]["epsilon"]["site-a"] for r in rows)
    assert rows[0]["privacy"]["mode"] == "site" and 0 < e1 < e2
    assert json.loads((out / "metrics.json").read_text())["privacy"]["epsilon"]["site-c"] == pytest.approx(e2)
    with pytest.raises(ValueError, match="one SuperNode per site"):
        run_inprocess(server_app, client_app, 2, {**rc, "out-dir": str(env / "site-dp-2")})


def _poisoning(client_app, poisons, captured):
    """The real ClientApp, except that the train replies of some partitions are replaced (packed
    for the wire again, as a hostile site running the project's code would send them)."""
    from flwr.app import ArrayRecord, MessageType

    from protocol.packing import pack, unpack

    def call(msg, ctx):
        rep = client_app(msg, ctx)
        pid = ctx.node_config["partition-id"]
        if msg.metadata.message_type == MessageType.TRAIN and rep.has_content():
            sent = unpack(msg.content)["arrays"].to_torch_state_dict()
            content = unpack(rep.content)
            mine = content["arrays"].to_torch_state_dict()
            if pid in poisons:
                content["arrays"] = ArrayRecord(poisons[pid](sent, mine))
                rep.content = pack(content)
            else:
                captured.append(mine)
        return rep

    return call


def test_nan_and_huge_updates_are_rejected_and_the_global_model_is_the_honest_sites(env, cohort, capsys):
    import torch

    server_app, client_app = _apps()
    out = env / "run"
    honest = []
    poisons = {0: lambda g, w: {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                                for k, v in w.items()},
               1: lambda g, w: {k: g[k] + 1000 * (w[k] - g[k]) if w[k].is_floating_point() else w[k] for k in w}}
    rc = _run_config(preset="smoke", **{"out-dir": str(out), "data-dir": str(cohort), "num-server-rounds": 1})
    run_inprocess(server_app, _poisoning(client_app, poisons, honest), 3, rc)
    printed = capsys.readouterr().out
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    reasons = {r["node"]: r["reason"] for r in row["train"]["rejected"]}
    assert len(reasons) == 2 and "rejected" in printed
    assert any("NaN" in r for r in reasons.values()) and any("median of the other sites" in r for r in reasons.values())
    # the global model after the round is exactly the one honest site's update
    state = torch.load(out / "checkpoint.pt", weights_only=False)["state"]
    assert len(honest) == 1
    for k, v in honest[0].items():
        assert torch.equal(state[k], v), k
    assert json.loads((out / "metrics.json").read_text())["test"]["n"] > 0


def test_the_audit_log_lists_exactly_what_was_sent_and_a_pixel_array_is_refused(env, cohort, monkeypatch, capsys):
    import torch

    import client.client_app as ca
    from client.egress import summarize

    audit = env / "audit"
    monkeypatch.setenv("CCMR_AUDIT_DIR", str(audit))
    real = ca.average_states
    calls = []

    def leaky(states, weights):  # a bug that would attach an image to the first train reply
        out = real(states, weights)
        calls.append(1)
        if len(calls) == 1:
            out = {**out, "debug-image": torch.rand(8, 16, 32, 32)}
        return out

    monkeypatch.setattr(ca, "average_states", leaky)
    server_app, client_app = _apps()
    out = env / "run"
    run_inprocess(server_app, client_app, 3, _run_config(preset="smoke", **{"out-dir": str(out),
                                                                           "data-dir": str(cohort)}))
    assert "REFUSED to send the train reply" in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text())["test"]["n"] > 0  # the run went on
    logs = sorted(audit.glob("*.jsonl"))
    assert [p.stem for p in logs] == ["site-a", "site-b", "site-c"]
    params = set(torch.load(out / "model.pt", weights_only=False)["state_dict"])
    refused = 0
    for p in logs:
        rows = [json.loads(x) for x in p.read_text().splitlines()]
        # 2 rounds x (train + evaluate) + the final validation and test evaluations
        # two rounds of train + evaluate; then validation (calibration), validation (thresholds), test
        assert [r["kind"] for r in rows] == ["train", "evaluate", "train", "evaluate", "evaluate", "evaluate", "evaluate"]
        for r in rows:
            arrays = {k["key"][len("arrays/"):] for k in r["keys"] if k["key"].startswith("arrays/")}
            if r["kind"] == "train" and not r["refused"]:
                assert arrays == params and r["bytes"] > 4 * sum(1 for _ in params)
            else:
                assert arrays == set()  # evaluation replies and refused replies carry no arrays
            assert len(r["sha256"]) == 64
        refused += sum(bool(r["refused"]) for r in rows)
        assert "messages" in summarize(p)
    assert refused == 1
    # the coordinator's own log of what it received matches, message for message, what the sites logged
    coord = [json.loads(x) for x in (out / "audit.jsonl").read_text().splitlines()]
    got = sorted(r["sha256"] for r in coord if r["direction"] == "received")
    sent_by_sites = sorted(json.loads(x)["sha256"] for p in logs for x in p.read_text().splitlines()
                           if json.loads(x)["round"] is not None and json.loads(x)["round"] > 0
                           and json.loads(x)["kind"] in ("train", "evaluate"))
    assert len(got) == 12 and got == sent_by_sites
    assert {r["direction"] for r in coord} == {"sent", "received"}


def test_site_policies_refuse_runs_they_do_not_accept_and_the_run_goes_on(env, cohort, monkeypatch, capsys):
    from ccmr_core.codehash import code_hash
    from client.policy import APP_ROOT

    monkeypatch.setenv("CCMR_AUDIT_DIR", str(env / "audit"))
    server_app, client_app = _apps()
    out = env / "run"
    nodes = [{"partition-id": i, "num-partitions": 3} for i in range(3)]
    nodes[0]["policy-require-dp"] = "sample"  # this run has no DP
    nodes[1]["policy-code-sha256"] = "0" * 64  # code this run does not ship
    nodes[2]["policy-code-sha256"] = code_hash(APP_ROOT)  # exactly this code: takes part
    run_inprocess(server_app, client_app, 3, _run_config(preset="smoke", **{"out-dir": str(out),
                                                                           "data-dir": str(cohort)}), nodes)
    printed = capsys.readouterr().out
    assert "requires differential privacy dp='sample'" in printed and "accepts only 0000000000000000" in printed
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["train"]["patients"] > 0 for r in rows)  # the accepting site trained every round
    for site, reason in (("site-a", "requires differential privacy"), ("site-b", "accepts only")):
        log = [json.loads(x) for x in (env / "audit" / f"{site}.jsonl").read_text().splitlines()]
        assert log and all(reason in (r["refused"] or "") for r in log)
        assert all(not any(k["key"].startswith("arrays/") for k in r["keys"]) for r in log)  # nothing of the model left
    ok = [json.loads(x) for x in (env / "audit" / "site-c.jsonl").read_text().splitlines()]
    assert ok and not any(r["refused"] for r in ok)


def test_code_hash_changes_with_any_training_code(tmp_path):
    from ccmr_core.codehash import code_hash

    for part in ("ccmr_core", "client", "protocol", "server"):
        (tmp_path / part).mkdir()
        (tmp_path / part / "a.py").write_text("x = 1\n")
    (tmp_path / "configs" / "presets").mkdir(parents=True)
    (tmp_path / "configs" / "default.yaml").write_text("privacy: {target_epsilon: 8.0}\n")
    h = code_hash(tmp_path)
    assert code_hash(tmp_path) == h
    (tmp_path / "client" / "a.py").write_text("x = 2\n")
    assert code_hash(tmp_path) != h
    h = code_hash(tmp_path)  # the message keys and allow-list both sides share
    (tmp_path / "protocol" / "a.py").write_text("x = 2\n")
    assert code_hash(tmp_path) != h
    # the shipped configs set the experiment (issue 13: epsilon 1000 left the hash unchanged)
    h = code_hash(tmp_path)
    (tmp_path / "configs" / "default.yaml").write_text("privacy: {target_epsilon: 1000.0}\n")
    assert code_hash(tmp_path) != h
    h = code_hash(tmp_path)
    (tmp_path / "configs" / "presets" / "x.yaml").write_text("train: {val_fraction: 0.01}\n")
    assert code_hash(tmp_path) != h
