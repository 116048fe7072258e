"""Rounds that survive missing sites: retry below min_sites, give up with a resume hint, and a
site that crashes mid-round does not stop the run."""

import json

import pytest
from flwr.app import ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict

from tests.inprocess import run_inprocess
from server.robust_rounds import GridWrapper, RetryGrid, RoundIncomplete
from tests.test_federation import _apps, _run_config


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):  # Flower stamps messages with the task they belong to
    from flwr.supercore.task_identity import TaskIdentity

    for k in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, k, 1)


class ScriptedGrid(GridWrapper):
    """Answers train rounds from a script: how many of the addressed nodes reply, per attempt."""

    def __init__(self, nodes, script):
        self.nodes, self.script, self.calls = list(nodes), list(script), []

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        msgs = list(messages)
        self.calls.append(sorted(m.metadata.dst_node_id for m in msgs))
        n = self.script.pop(0) if msgs[0].metadata.message_type == MessageType.TRAIN else len(msgs)
        out = []
        for i, m in enumerate(msgs):
            if i < n:
                out.append(Message(RecordDict({"metrics": MetricRecord({"num-examples": 3.0})}), reply_to=m))
            else:
                out.append(Message(Error(code=5, reason="node unavailable"), reply_to=m))
        return out


def _train(nodes, kind=MessageType.TRAIN):
    c = RecordDict({"config": ConfigRecord({"global-round": 4})})
    return [Message(c, dst_node_id=n, message_type=kind) for n in nodes]


def test_a_round_below_min_sites_is_sent_again_to_the_nodes_connected_by_then(capsys):
    inner = ScriptedGrid([1, 2, 3], [1, 3])
    grid = RetryGrid(inner, min_sites=2, retries=2)
    msgs = _train([1, 2, 3])
    inner.nodes.append(4)  # a site that came back before the retry
    replies = grid.send_and_receive(msgs, timeout=5)
    assert len([r for r in replies if r.has_content()]) == 3
    assert inner.calls == [[1, 2, 3], [1, 2, 3, 4]]
    printed = capsys.readouterr().out
    assert "round 4: 1 of 3 sites replied within 5 s, fewer than min_sites 2" in printed
    assert "SuperNode 2: node unavailable" in printed and "retry 1 of 2" in printed


def test_a_round_that_never_gets_min_sites_stops_the_run_with_a_resume_hint():
    grid = RetryGrid(ScriptedGrid([1, 2, 3], [1, 1]), min_sites=2, retries=1)
    with pytest.raises(RoundIncomplete, match="gave up after 1 retries.*--resume"):
        grid.send_and_receive(_train([1, 2, 3]), timeout=5)


def test_evaluation_and_rounds_with_enough_sites_pass_through_once():
    inner = ScriptedGrid([1, 2], [2])
    grid = RetryGrid(inner, min_sites=2, retries=3)
    assert len(grid.send_and_receive(_train([1, 2]))) == 2
    assert len(grid.send_and_receive(_train([1, 2], MessageType.EVALUATE))) == 2
    assert inner.calls == [[1, 2], [1, 2]]


def _crash_site_b_once(monkeypatch) -> list:
    import client.client_app as ca

    real = ca.train_epoch
    crashed = []

    def crash_once_at_site_b(model, loader, *a, **k):  # the process dies while site-b trains round 1
        if not crashed and len(loader.dataset) == 3:
            crashed.append(1)
            raise SystemError("killed")
        return real(model, loader, *a, **k)

    monkeypatch.setattr(ca, "train_epoch", crash_once_at_site_b)
    return crashed


def test_a_site_that_crashes_mid_round_does_not_stop_the_run(env, cohort, monkeypatch, capsys):
    crashed = _crash_site_b_once(monkeypatch)
    server_app, client_app = _apps()
    out = env / "run"
    run_inprocess(server_app, client_app, 3, _run_config(preset="smoke", **{"out-dir": str(out), "data-dir": str(cohort),
                                                                           "min-sites": 2}))
    assert crashed
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert rows[0]["train"]["patients"] < rows[1]["train"]["patients"]  # round 1 without site-b, round 2 with it
    assert json.loads((out / "metrics.json").read_text())["test"]["n"] > 0


@pytest.mark.parametrize("secure", [False, True])
def test_site_level_dp_sizes_the_noise_for_the_sites_actually_averaged(env, cohort, monkeypatch, capsys, secure):
    """Three sites configured, one crashes in round 1: that round's mean of two gets noise for two
    (stdev noise_multiplier x clipping_norm / 2), the next round's mean of three Flower's own."""
    from flwr.serverapp.strategy import dp_fixed_clipping

    stdevs = []
    real = dp_fixed_clipping.add_gaussian_noise_inplace
    monkeypatch.setattr(dp_fixed_clipping, "add_gaussian_noise_inplace", lambda a, s: (stdevs.append(s), real(a, s)))
    _crash_site_b_once(monkeypatch)
    server_app, client_app = _apps()
    out = env / f"dp-{secure}"
    run_inprocess(server_app, client_app, 3, _run_config(preset="smoke", **{
        "out-dir": str(out), "data-dir": str(cohort), "min-sites": 2, "dp": "site", "noise-multiplier": 1.0,
        "secure-aggregation": secure}))
    assert stdevs == pytest.approx([0.5, 1.0 / 3])
    assert "site-level DP: 2 of 3 sites in this round's mean; noise sized for 2 (stdev 0.5000)" in capsys.readouterr().out
