"""SecAgg+ in the real ServerApp and ClientApp (in-process): the coordinator only ever holds the
mean of the sites' updates, which equals plain averaging within the quantisation error."""

import json

import numpy as np
import pytest
import torch
from flwr.common import bytes_to_ndarray

from tests.inprocess import run_inprocess
from tests.test_federation import _apps, _run_config

MASKED = "secaggplus_configs"


def _run(env, cohort, name, nodes=None, **over):
    server_app, client_app = _apps()
    out = env / name
    rc = _run_config(preset="smoke", **{"out-dir": str(out), "data-dir": str(cohort), "num-server-rounds": 1, **over})
    grid = run_inprocess(server_app, client_app, 3, rc, nodes)
    return out, grid


def _state(out):
    return torch.load(out / "checkpoint.pt", weights_only=False)["state"]


def test_secure_aggregate_equals_the_plain_mean_and_the_coordinator_never_holds_an_update(env, cohort, monkeypatch,
                                                                                         capsys):
    monkeypatch.setenv("CCMR_AUDIT_DIR", str(env / "audit"))
    plain, plain_grid = _run(env, cohort, "plain")
    secure, grid = _run(env, cohort, "secure", **{"secure-aggregation": True})
    assert "secure aggregation of 3 sites' updates" in capsys.readouterr().out

    # same seeds, same local training: the secure aggregate is the plain FedProx mean, up to the
    # quantisation error, while the round moved the model by far more than that
    p, s = _state(plain), _state(secure)
    init = plain_grid.sent[0].content["arrays"].to_torch_state_dict()
    err = max(float((p[k].float() - s[k].float()).abs().max()) for k in p)
    moved = max(float((p[k].float() - init[k].float()).abs().max()) for k in p)
    assert err < 1e-5 and moved > 100 * err, (err, moved)
    assert json.loads((secure / "metrics.jsonl").read_text())["train"]["secagg-clipped"] == 0

    # in the plain run the coordinator received each site's model; in the secure run it never did:
    # every train-stage reply carries no arrays, only keys, shares and masked integer vectors that
    # look uniformly random (an unmasked quantised update would sit in a narrow band)
    assert any(len(rec) for r in plain_grid.received for rec in r.content.array_records.values())
    masked = []
    for r in grid.received:
        if r.has_content() and MASKED in r.content.config_records:
            assert all(len(rec) == 0 for rec in r.content.array_records.values())
            cfg = r.content.config_records[MASKED]
            masked += [bytes_to_ndarray(b).ravel() for b in cfg.get("masked_params", [])]
    assert len(masked) > 3 * 10  # three sites' vectors, one per parameter (plus the weight factor)
    v = np.concatenate(masked).astype(np.float64) / 2 ** 32
    assert abs(v.mean() - 0.5) < 0.01 and abs(v.std() - 0.2887) < 0.01

    # both sides' audit logs name the protocol stages; nothing of the model appears in clear
    coord = [json.loads(x) for x in (secure / "audit.jsonl").read_text().splitlines()]
    kinds = {r["kind"] for r in coord if r["direction"] == "received"}
    assert {"train/secagg-setup", "train/secagg-share-keys", "train/secagg-collect-masked-vectors",
            "train/secagg-unmask"} <= kinds and "train" not in kinds
    assert not any(k["key"].startswith("arrays/") for r in coord if r["direction"] == "received" for k in r["keys"])
    from server.provision import run_key

    site = [r for r in map(json.loads, (env / "audit" / "site-a.jsonl").read_text().splitlines()) if r["run"] == run_key(secure)]
    collect = [r for r in site if r["kind"] == "train/secagg-collect-masked-vectors"]
    assert len(collect) == 1 and any(k["key"] == f"{MASKED}/masked_params" for k in collect[0]["keys"])
    assert not any(k["key"].startswith(("arrays/", "fitres.parameters/")) for r in site for k in r["keys"])
    from client.egress import summarize

    text = summarize(env / "audit" / "site-a.jsonl")
    # one round: evaluate; then validation twice (calibration, thresholds) and the test
    assert f"run {run_key(secure)}: 8 messages (0 train, 4 evaluate, 4 secure-aggregation)" in text, text
    assert "the model left only masked" in text


def test_validation_on_the_train_reply_survives_secure_aggregation(env, cohort):
    """validate-in train-reply under SecAgg+: the sites' validation statistics ride beside the
    masked update and reach the run log as they do without masking, for every round."""
    rows = {}
    for name, over in (("ride-plain", {}), ("ride-secure", {"secure-aggregation": True})):
        out, _ = _run(env, cohort, name, **{"num-server-rounds": 2, "validate-in": "train-reply", **over})
        rows[name] = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows["ride-secure"]] == [1, 2]
    for plain, secure in zip(rows["ride-plain"], rows["ride-secure"]):
        a, b = plain["federated_validation"], secure["federated_validation"]
        assert b["patients"] == a["patients"] > 0 and b["accuracy"] == a["accuracy"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3)  # round 1's model: the mean up to quantisation
        assert not any(k.startswith("val-") for k in secure["train"])  # taken out before the train metrics


def test_secure_aggregation_with_site_level_dp_clips_at_the_sites(env, cohort, monkeypatch):
    """Each site clips its own update before masking (the coordinator cannot): what leaves every
    site is within the clipping norm of the global model, and clipping really had work to do."""
    import torch

    import client.client_app as ca
    from ccmr_core.privacy import clip_update

    seen = []

    def recording(state, reference, max_norm):
        out, norm = clip_update(state, reference, max_norm)
        sent = float(torch.sqrt(sum(((out[k].double() - reference[k].double()) ** 2).sum()
                                    for k in out if out[k].is_floating_point())))
        seen.append((norm, sent, max_norm))
        return out, norm

    monkeypatch.setattr(ca, "clip_update", recording)
    tight = env / "tight.yaml"
    tight.write_text("privacy: {clipping_norm: 0.02}\n")  # below a smoke round's update norm
    out, _ = _run(env, cohort, "dp", config=str(tight), **{"secure-aggregation": True, "dp": "site"})
    assert len(seen) == 3  # three sites, one round
    for before, sent, bound in seen:
        assert sent <= bound * (1 + 1e-6) and before > bound  # clipped, to the bound
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["privacy"]["mode"] == "site" and np.isfinite(list(row["privacy"]["epsilon"].values())).all()


def test_coordinates_beyond_the_clipping_range_are_counted_and_reported(env, cohort, capsys):
    cfg = env / "narrow.yaml"
    cfg.write_text("secure_aggregation:\n  clipping_range: 1.0e-6\n")
    out, _ = _run(env, cohort, "narrow", config=str(cfg), **{"secure-aggregation": True})
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["train"]["secagg-clipped"] > 1000
    assert "secure aggregation clipped" in capsys.readouterr().out


def test_site_policies_under_secure_aggregation(env, cohort, monkeypatch, capsys):
    monkeypatch.setenv("CCMR_AUDIT_DIR", str(env / "audit"))
    nodes = [{"partition-id": i, "num-partitions": 3} for i in range(3)]
    nodes[0]["policy-require-secagg"] = "true"
    # a plain run is refused by the site that requires secure aggregation
    _run(env, cohort, "plain", nodes)
    assert "requires secure aggregation" in capsys.readouterr().out
    # a secure run is accepted by it; a site that requires DP refuses at setup, and the round is
    # set up again without it and aggregates the other two
    nodes[1]["policy-require-dp"] = "sample"
    out, _ = _run(env, cohort, "secure", nodes, **{"secure-aggregation": True})
    printed = capsys.readouterr().out
    assert "REFUSED the secure train round" in printed and "secure aggregation of 2 sites' updates" in printed
    log = [json.loads(x) for x in (env / "audit" / "site-b.jsonl").read_text().splitlines()]
    assert any("requires differential privacy" in (r["refused"] or "") for r in log)
    assert json.loads((out / "metrics.json").read_text())["test"]["n"] > 0


def test_secure_aggregation_refuses_robust_aggregators():
    from ccmr_core.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="secure_aggregation.enabled cannot be combined with federated.aggregator "
                                          "'median'.*use aggregator 'mean'"):
        load_config(None, "smoke", ["secure_aggregation.enabled=true", "federated.aggregator=median"])


def test_a_site_above_max_weight_refuses_the_round_with_the_reason():
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

    from client.secure_aggregation import SecureRoundRefused, to_masked_update

    glob = ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32)), "t": Array(np.zeros((), dtype=np.float32))})
    local = ArrayRecord({"w": Array(np.full(3, 0.1, dtype=np.float32)), "t": Array(np.ones((), dtype=np.float32))})
    req = Message(RecordDict({"arrays": glob, "config": ConfigRecord({})}), dst_node_id=1,
                  message_type=MessageType.TRAIN)
    rep = Message(RecordDict({"arrays": local, "metrics": MetricRecord({"num-examples": 60.0})}), reply_to=req)
    with pytest.raises(SecureRoundRefused, match="weight 60 exceeds secure_aggregation.max_weight 50"):
        to_masked_update(req, rep, 50, 0.5)
    # within range: the update (local - global) in the model's key order, scalars as shape (1,),
    # and a count of the coordinates the clipping range will cut (t: 1.0 x 60/100 > 0.5)
    out = to_masked_update(req, rep, 100, 0.5).content
    upd = out["fitres.parameters"].to_numpy_ndarrays()
    assert np.allclose(upd[0], 0.1) and upd[1].shape == (1,) and upd[1][0] == 1.0
    assert out["fitres.num_examples"]["num_examples"] == 60 and out["metrics"]["secagg-clipped"] == 1.0


@pytest.mark.parametrize("fraction", [0.1, 0.5])
def test_no_threshold_lets_a_minority_of_shares_unmask_a_site(fraction):
    from server.secure_aggregation import reconstruction_threshold

    for n in range(2, 60):
        t = reconstruction_threshold(n, fraction)
        assert n / 2 < t <= n  # two disjoint sets of t shares cannot both exist
    assert reconstruction_threshold(10, 0.8) == 8 and reconstruction_threshold(4, 1.0) == 4
