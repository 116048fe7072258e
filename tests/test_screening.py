"""Update screening and robust aggregation: what the coordinator refuses to average, and why."""

import numpy as np
import torch
from flwr.app import ArrayRecord

from server.screening import screen


def _rec(**arrays):
    return ArrayRecord({k: torch.as_tensor(np.asarray(v, dtype=np.float32)) for k, v in arrays.items()})


GLOBAL = _rec(w=np.zeros((2, 2)), b=np.zeros(2))


def _upd(scale, seed):
    r = np.random.default_rng(seed)
    return _rec(w=scale * r.normal(size=(2, 2)), b=scale * r.normal(size=2))


def test_screen_keeps_honest_updates_and_names_each_problem():
    updates = [(1, _upd(1, 1)), (2, _upd(1, 2)), (3, _upd(1, 3)),
               (4, _rec(w=np.full((2, 2), np.nan), b=np.zeros(2))),  # NaN
               (5, _upd(1000, 5)),  # 1000x the others' norm
               (6, _rec(w=np.zeros((3, 2)), b=np.zeros(2))),  # wrong shape
               (7, _rec(w=np.zeros((2, 2)), b=np.zeros(2), pixels=np.zeros((64, 64))))]  # something extra
    keep, rejected = screen(updates, GLOBAL, max_ratio=10)
    assert keep == [0, 1, 2]
    why = {r.node_id: r.reason for r in rejected}
    assert "NaN or Inf" in why[4]
    assert "median of the other sites" in why[5] and "limit 10x" in why[5]
    assert "shape (3, 2)" in why[6] and "(2, 2)" in why[6]
    assert "unexpected ['pixels']" in why[7]


def test_two_sites_one_huge_the_huge_one_goes():
    keep, rejected = screen([(1, _upd(1, 1)), (2, _upd(1000, 2))], GLOBAL)
    assert keep == [0] and rejected[0].node_id == 2


def test_an_update_within_the_ratio_is_kept():
    keep, rejected = screen([(1, _upd(1, 1)), (2, _upd(3, 2)), (3, _upd(1, 3))], GLOBAL, max_ratio=10)
    assert keep == [0, 1, 2] and not rejected


def test_a_site_cannot_own_the_mean_by_claiming_a_huge_weight_or_send_other_dtypes():
    """The attack of issue 14: an update inside the norm limit with a weight of 1e6 made the global
    update equal to the attacker's. Its claimed weight is now checked before it is averaged."""
    honest = [(1, _upd(1, 1)), (2, _upd(1, 2)), (3, _upd(1, 3))]
    attack = (4, _upd(2, 4))  # an ordinary-looking update
    for weight, words in ((1e6, "federation's limit 1000"), (600.0, "12x the median"), (float("nan"), "not a count"),
                          (-5.0, "not a count")):
        keep, rejected = screen(honest + [attack], GLOBAL, 10, [50.0, 60.0, 45.0, weight], max_weight=1000)
        assert keep == [0, 1, 2], weight
        assert rejected[0].node_id == 4 and words in rejected[0].reason, rejected[0].reason
    # honest sites of different sizes pass, and so does a site whose update is zero-weighted (declined)
    keep, _ = screen(honest + [attack], GLOBAL, 10, [50.0, 200.0, 45.0, 0.0], max_weight=1000)
    assert keep == [0, 1, 2, 3]
    as_float64 = _rec(w=np.zeros((2, 2)), b=np.zeros(2))
    as_float64 = ArrayRecord({k: torch.as_tensor(v.numpy().astype(np.float64)) for k, v in as_float64.items()})
    keep, rejected = screen(honest + [(5, as_float64)], GLOBAL)
    assert keep == [0, 1, 2] and "dtype float64" in rejected[0].reason
