"""The coordinator's strategy: FedAvgM's server momentum over the screened mean, FedProx's weight
still sent to the sites, and the settings that cannot go together refused by the config."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from ccmr_core.config import ExperimentConfig
from server.strategy import CCMRFedAvg, CCMRFedAvgM, CCMRFedMedian, CCMRFedProx, CCMRFedTrimmedAvg, make_strategy


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):  # Flower stamps messages with the task they belong to
    from flwr.supercore.task_identity import TaskIdentity

    for k in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, k, 1)


class TwoNodes:
    def get_node_ids(self):
        return [1, 2]


def _fed(**kw):
    return ExperimentConfig.model_validate({"federated": kw}).federated


def _round(strategy, rnd, glob: float, site_values: list[float]) -> float:
    sent = ArrayRecord({"w": Array(np.full(3, glob, dtype=np.float32))})
    msgs = list(strategy.configure_train(rnd, sent, ConfigRecord({}), TwoNodes()))
    assert all(m.content["config"]["proximal-mu"] == pytest.approx(0.01) for m in msgs)
    replies = [Message(RecordDict({"arrays": ArrayRecord({"w": Array(np.full(3, v, dtype=np.float32))}),
                                   "metrics": MetricRecord({"num-examples": 10.0})}), reply_to=m)
               for m, v in zip(msgs, site_values)]
    arrays, _ = strategy.aggregate_train(rnd, replies)
    w = arrays["w"].numpy()
    assert np.allclose(w, w[0]) and w.dtype == np.float32
    return float(w[0])


def _flagged_round(strategy, rnd, flag: float, site_flag: float, frozen: float, frozen_sites: list[float]):
    """A buffer (a 0/1 flag the sites set) and a weight; returns both after aggregation."""
    sent = ArrayRecord({"flag": Array(np.array(flag, dtype=np.float32)),
                        "frozen": Array(np.full(2, frozen, dtype=np.float32))})
    msgs = list(strategy.configure_train(rnd, sent, ConfigRecord({}), TwoNodes()))
    replies = [Message(RecordDict({"arrays": ArrayRecord({"flag": Array(np.array(site_flag, dtype=np.float32)),
                                                          "frozen": Array(np.full(2, f, dtype=np.float32))}),
                                   "metrics": MetricRecord({"num-examples": 10.0})}), reply_to=m)
               for m, f in zip(msgs, frozen_sites)]
    arrays, _ = strategy.aggregate_train(rnd, replies)
    return float(arrays["flag"].numpy()), float(arrays["frozen"].numpy()[0])


def test_server_momentum_accumulates_the_mean_update_across_rounds():
    common = dict(min_train_nodes=2, min_evaluate_nodes=2, min_available_nodes=2)
    plain = make_strategy(_fed(), common)
    m = make_strategy(_fed(server_momentum=0.5), common)
    assert type(plain) is CCMRFedProx and type(m) is CCMRFedAvgM
    assert type(make_strategy(_fed(strategy="fedavg"), common)) is CCMRFedAvg
    # round 1: the sites move 0 -> 0.5 and 1.5; the mean update is +1 for both strategies
    assert _round(plain, 1, 0.0, [0.5, 1.5]) == pytest.approx(1.0)
    assert _round(m, 1, 0.0, [0.5, 1.5]) == pytest.approx(1.0)
    # round 2: again +1 on average; with momentum 0.5 the step is 1 + 0.5 x 1
    assert _round(plain, 2, 1.0, [1.5, 2.5]) == pytest.approx(2.0)
    assert _round(m, 2, 1.0, [1.5, 2.5]) == pytest.approx(2.5)
    # a server learning rate scales the step
    lr = make_strategy(_fed(server_lr=2.0), common)
    assert _round(lr, 1, 0.0, [0.5, 1.5]) == pytest.approx(2.0)


def test_momentum_spares_buffers_and_weights_no_site_changed():
    common = dict(min_train_nodes=2, min_evaluate_nodes=2, min_available_nodes=2)
    m = make_strategy(_fed(server_momentum=0.9), common, plain_keys=["flag"])
    # round 1: the sites set the flag (0 -> 1) and move the weight 0 -> 1
    assert _flagged_round(m, 1, 0.0, 1.0, 0.0, [1.0, 1.0]) == (1.0, 1.0)
    # round 2: the flag stays 1 (a momentum on it would make it 1.9); the weight is now frozen at
    # every site: it stays where it is instead of coasting on last round's momentum
    assert _flagged_round(m, 2, 1.0, 1.0, 1.0, [1.0, 1.0]) == (1.0, 1.0)
    # round 3: it trains again; its momentum starts afresh (a step of 1, not 1 + 0.9)
    assert _flagged_round(m, 3, 1.0, 1.0, 1.0, [2.0, 2.0]) == (1.0, 2.0)


def test_momentum_with_a_robust_aggregator_is_refused_with_the_keys_to_change():
    with pytest.raises(ValueError, match="server_momentum.*aggregator 'median'"):
        ExperimentConfig.model_validate({"federated": {"server_momentum": 0.9, "aggregator": "median"}})


class FiveNodes:
    def get_node_ids(self):
        return [1, 2, 3, 4, 5]


@pytest.mark.parametrize("aggregator, cls", [("median", CCMRFedMedian), ("trimmed-mean", CCMRFedTrimmedAvg)])
def test_a_robust_aggregator_bounds_one_site_that_passes_screening(aggregator, cls):
    """Flower's FedMedian / FedTrimmedAvg behind the coordinator's screening: an update that is large
    but within the norm limit moves the mean, not the median or the trimmed mean; the sites still
    get FedProx's weight and the round number."""
    common = dict(min_train_nodes=5, min_evaluate_nodes=5, min_available_nodes=5)
    s = make_strategy(_fed(aggregator=aggregator, trim_fraction=0.2), common, round_offset=4)
    mean = make_strategy(_fed(), common)
    assert type(s) is cls

    def one_round(strategy):
        sent = ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))})
        msgs = list(strategy.configure_train(1, sent, ConfigRecord({}), FiveNodes()))
        assert all(m.content["config"]["proximal-mu"] == pytest.approx(0.01) for m in msgs)
        assert all(m.content["config"]["global-round"] == strategy.round_offset + 1 for m in msgs)
        values = [[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0], [20.0, -20.0]]  # the last: 9x the others' norm
        replies = [Message(RecordDict({"arrays": ArrayRecord({"w": Array(np.array(v, dtype=np.float32))}),
                                       "metrics": MetricRecord({"num-examples": 10.0})}), reply_to=m)
                   for m, v in zip(msgs, values)]
        arrays, _ = strategy.aggregate_train(1, replies)
        assert not strategy.rejected  # it passed the screening
        return arrays["w"].numpy()

    assert one_round(mean).tolist() == pytest.approx([6.0, -2.0])  # the outlier moves the mean
    robust = one_round(s)
    assert robust.dtype == np.float32 and robust.tolist() == pytest.approx([3.0, 2.0])


def test_the_sites_validate_every_n_rounds_and_after_the_last_other_rounds_are_one_phase():
    common = dict(min_train_nodes=2, min_evaluate_nodes=2, min_available_nodes=2)
    sent = ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))})
    # a run resumed after 2 rounds, 7 more to go (rounds 3..9), validating every 3rd round
    s = make_strategy(_fed(evaluate_every=3), common, round_offset=2, final_round=7)
    phases = {2 + r: len(list(s.configure_evaluate(r, sent, ConfigRecord({}), TwoNodes()))) for r in range(1, 8)}
    assert phases == {3: 2, 4: 0, 5: 0, 6: 2, 7: 0, 8: 0, 9: 2}
    # a round without the phase pools nothing: the round's line has no federated validation
    assert s.aggregate_evaluate(5, []) is None and s.last_round()[1] is None
    # the default: every round
    every = make_strategy(_fed(), common)
    assert all(len(list(every.configure_evaluate(r, sent, ConfigRecord({}), TwoNodes()))) == 2 for r in (1, 2, 3))


def test_validation_riding_on_the_train_reply_is_pooled_apart_from_the_update():
    """validate_in train-reply: from the second round on the train request asks for the received
    model's validation; it comes back in the train reply, is pooled as an evaluate phase's would be
    and taken out before the average; only the final round has an evaluate phase."""
    from server.aggregation import evaluate_aggr_fn

    common = dict(min_train_nodes=2, min_evaluate_nodes=2, min_available_nodes=2,
                  evaluate_metrics_aggr_fn=evaluate_aggr_fn(["A", "B"]))
    s = make_strategy(_fed(validate_in="train-reply"), common, final_round=3)
    sent = ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))})
    config = ConfigRecord({})
    assert "validate-received" not in list(s.configure_train(1, sent, config, TwoNodes()))[0].content["config"]
    msgs = list(s.configure_train(2, sent, config, TwoNodes()))
    assert all(m.content["config"]["validate-received"] for m in msgs)
    # each of the 2 sites: 2 validation patients, 1 right; the update 1.0 / 3.0 over 10 training patients each
    from ccmr_core.metrics import EvalStats

    stats = EvalStats.from_outputs(np.array([[0.9, 0.1], [0.8, 0.2]]), np.array([0, 1]), np.ones(2)).to_flat()
    val = {"val-num-examples": 2.0, "val-unit-weight": 1.0, "val-site-correct": [1.0, 0.0],
           "val-site-n": [2.0, 0.0], **{f"val-stats-{k}": v for k, v in stats.items()}}
    replies = [Message(RecordDict({"arrays": ArrayRecord({"w": Array(np.full(2, v, dtype=np.float32))}),
                                   "metrics": MetricRecord({"num-examples": 10.0, **val})}), reply_to=m)
               for m, v in zip(msgs, (1.0, 3.0))]
    arrays, train = s.aggregate_train(2, replies)
    assert arrays["w"].numpy().tolist() == [2.0, 2.0]
    assert not any(k.startswith("val-") for k in train)  # the validation is not a train metric
    assert s.previous_validation["patients"] == 4.0 and s.previous_validation["accuracy"] == 0.5
    phases = [len(list(s.configure_evaluate(r, sent, ConfigRecord({}), TwoNodes()))) for r in (1, 2, 3)]
    assert phases == [0, 0, 2]
    # a train reply without validation (round 1, or a site that sent none) clears it
    s.aggregate_train(1, [Message(RecordDict({"arrays": ArrayRecord({"w": Array(np.ones(2, dtype=np.float32))}),
                                              "metrics": MetricRecord({"num-examples": 10.0})}), reply_to=msgs[0])])
    assert s.previous_validation is None


def test_validation_on_the_train_reply_with_evaluate_every_is_refused_naming_both_keys():
    with pytest.raises(ValueError, match="validate_in 'train-reply'.*evaluate_every 3"):
        _fed(validate_in="train-reply", evaluate_every=3)


def _scaffold_round(strategy, rnd, changes: list[dict], weights=(10.0, 30.0)):
    """One round of two sites that return the model unchanged and ``changes`` (None: none);
    returns the control variate each train request carried (None: none)."""
    sent = ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32)), "flag": Array(np.zeros(1, dtype=np.float32))})
    msgs = list(strategy.configure_train(rnd, sent, ConfigRecord({}), TwoNodes()))
    carried = [m.content.array_records["control"]["w"].numpy().copy() if "control" in m.content.array_records
               else None for m in msgs]
    replies = []
    for m, ch, n in zip(msgs, changes, weights):
        rec = {"arrays": ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32)),
                                      "flag": Array(np.zeros(1, dtype=np.float32))}),
               "metrics": MetricRecord({"num-examples": n})}
        if ch is not None:
            rec["control"] = ArrayRecord({k: Array(np.asarray(v, dtype=np.float32)) for k, v in ch.items()})
        replies.append(Message(RecordDict(rec), reply_to=m))
    arrays, _ = strategy.aggregate_train(rnd, replies)
    assert set(arrays.keys()) == {"w", "flag"}  # the model's mean, the control variates kept apart
    return carried


def test_scaffold_keeps_the_weighted_mean_of_the_sites_control_variates(caplog):
    """The coordinator sends nothing in round 1, then c = the num-examples-weighted mean of the
    changes the sites returned; a change that is not the model's parameters is left out, and the
    rest counts only for the share of sites that sent one (SCAFFOLD's |S|/N)."""
    from server.strategy import CCMRScaffoldAvg, CCMRScaffoldProx

    common = dict(min_train_nodes=2, min_evaluate_nodes=2, min_available_nodes=2)
    shapes = {"w": (3,)}
    s = make_strategy(_fed(drift_correction="scaffold"), common, parameter_shapes=shapes)
    assert type(s) is CCMRScaffoldProx
    assert type(make_strategy(_fed(drift_correction="scaffold", strategy="fedavg"), common,
                              parameter_shapes=shapes)) is CCMRScaffoldAvg
    assert _scaffold_round(s, 1, [{"w": [1.0, 1, 1]}, {"w": [5.0, 5, 5]}]) == [None, None]
    c = _scaffold_round(s, 2, [{"w": [0.0, 0, 0]}, {"flag": [1.0]}])  # the second is not a parameter
    assert all(np.allclose(x, 4.0) for x in c)  # (10 x 1 + 30 x 5) / 40
    assert "unexpected ['flag']" in caplog.text
    # round 2's one good change (0) came from 1 of 2 sites: c moves by half of it, i.e. stays 4
    c = _scaffold_round(s, 3, [{"w": [2.0, 2, 2]}, None])
    assert all(np.allclose(x, 4.0) for x in c)
    c = _scaffold_round(s, 4, [None, None])
    assert all(np.allclose(x, 5.0) for x in c)  # + (1 of 2 sites) x 2


def test_what_the_aggregation_carries_survives_a_checkpoint_and_a_wrong_one_is_refused(capsys):
    """SCAFFOLD's c and FedAvgM's momentum go into the checkpoint (``carried``) and a resumed
    coordinator takes them back: the next round behaves as if the run had not stopped. A carried
    array that does not fit the model is refused naming it; another aggregation's is left unused."""
    common = dict(min_train_nodes=2, min_evaluate_nodes=2, min_available_nodes=2)
    shapes = {"w": (3,)}
    s = make_strategy(_fed(drift_correction="scaffold"), common, parameter_shapes=shapes)
    assert s.carried() == {}
    _scaffold_round(s, 1, [{"w": [1.0, 1, 1]}, {"w": [5.0, 5, 5]}])
    saved = {k: v.copy() for k, v in s.carried().items()}
    assert list(saved) == ["control/w"] and np.allclose(saved["control/w"], 4.0)
    resumed = make_strategy(_fed(drift_correction="scaffold"), common, parameter_shapes=shapes)
    resumed.restore_carried(saved)
    assert all(np.allclose(x, 4.0) for x in _scaffold_round(resumed, 2, [None, None]))
    with pytest.raises(ValueError, match=r"checkpoint's 'control' does not fit this model: parameter w has shape \(4,\)"):
        make_strategy(_fed(drift_correction="scaffold"), common,
                      parameter_shapes=shapes).restore_carried({"control/w": np.zeros(4, dtype=np.float32)})
    with pytest.raises(ValueError, match="parameter w holds NaN or Inf"):
        make_strategy(_fed(drift_correction="scaffold"), common,
                      parameter_shapes=shapes).restore_carried({"control/w": np.full(3, np.nan, dtype=np.float32)})
    # FedAvgM: round 2 after a resume steps with round 1's momentum, as the uninterrupted run does
    m = make_strategy(_fed(server_momentum=0.5), common, parameter_shapes=shapes)
    assert _round(m, 1, 0.0, [0.5, 1.5]) == pytest.approx(1.0)
    again = make_strategy(_fed(server_momentum=0.5), common, parameter_shapes=shapes, round_offset=1)
    again.restore_carried(m.carried())
    assert _round(again, 1, 1.0, [1.5, 2.5]) == pytest.approx(2.5)  # 1 + 0.5 x 1, not 1
    plain = make_strategy(_fed(), common, parameter_shapes=shapes)
    plain.restore_carried(m.carried())
    assert "carries 'velocity' of another aggregation than this run's; left unused" in capsys.readouterr().out
    assert plain.carried() == {}


@pytest.mark.parametrize("setting, named", [
    ({"privacy": {"mode": "sample"}}, "privacy.mode 'sample'"),
    ({"privacy": {"mode": "site"}}, "privacy.mode 'site'"),
    ({"secure_aggregation": {"enabled": True}}, "secure_aggregation.enabled"),
    ({"federated": {"aggregator": "median"}}, "federated.aggregator 'median'"),
    ({"federated": {"server_momentum": 0.9}}, "federated.server_momentum"),
])
def test_scaffold_is_refused_beside_settings_it_would_undermine(setting, named):
    cfg = {**setting, "federated": {**setting.get("federated", {}), "drift_correction": "scaffold"}}
    with pytest.raises(ValueError, match=r"drift_correction 'scaffold' cannot be combined with " + named.replace(".", r"\.")):
        ExperimentConfig.model_validate(cfg)
