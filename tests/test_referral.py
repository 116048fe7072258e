"""Referral thresholds: set on validation counts; the two signals together refer at most the stated share."""

import numpy as np
import pytest

from ccmr_core.metrics import EvalStats
from ccmr_core.referral import refer, thresholds_from_outputs, thresholds_from_stats


def _val(n=500, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 5, n)
    logits = rng.normal(size=(n, 5)) * rng.uniform(0.2, 3, (n, 1))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    unc = rng.lognormal(-5, 1.5, n)
    return probs, labels, unc


@pytest.mark.parametrize("fraction", [0.05, 0.2, 0.5])
def test_the_rule_refers_at_most_the_fraction_in_all_and_close_to_it(fraction):
    probs, labels, unc = _val()
    t = thresholds_from_outputs(probs, labels, unc, fraction)
    low_conf = probs.max(1) < t["confidence"]
    high_unc = unc > t["uncertainty"]
    assert low_conf.mean() <= fraction / 2 and high_unc.mean() <= fraction / 2  # each signal: half the budget
    assert (low_conf | high_unc).mean() <= fraction
    # bin resolution, not a blanket "refer none"
    assert low_conf.mean() > fraction / 2 - 0.1 and high_unc.mean() > fraction / 2 - 0.1
    assert t["validation_n"] == 500 and t["fraction"] == fraction


def test_without_uncertainty_confidence_takes_the_whole_budget():
    probs, labels, _ = _val()
    t = thresholds_from_outputs(probs, labels, None, 0.2)
    low_conf = (probs.max(1) < t["confidence"]).mean()
    assert t["uncertainty"] is None and 0.1 < low_conf <= 0.2


def test_referring_more_moves_both_thresholds_towards_more_referrals():
    probs, labels, unc = _val()
    a, b = thresholds_from_outputs(probs, labels, unc, 0.1), thresholds_from_outputs(probs, labels, unc, 0.4)
    assert b["confidence"] >= a["confidence"] and b["uncertainty"] <= a["uncertainty"]


def test_pooled_counts_give_the_thresholds_of_all_outputs():
    probs, labels, unc = _val()
    s = EvalStats.from_outputs(probs[:200], labels[:200], uncertainty=unc[:200]) + \
        EvalStats.from_outputs(probs[200:], labels[200:], uncertainty=unc[200:])
    assert thresholds_from_stats(s, 5, 0.2) == thresholds_from_outputs(probs, labels, unc, 0.2)


def test_refer_says_why_and_refuses_bad_settings():
    t = {"confidence": 0.5, "uncertainty": 0.01, "fraction": 0.2, "validation_n": 10}
    assert refer(0.9, 0.001, t) == (False, [])
    yes, why = refer(0.4, 0.02, t)
    assert yes and len(why) == 2 and "0.40" in why[0] and "0.0200" in why[1]
    assert refer(0.99, 0.0, None)[0]  # no thresholds in the model file: a human reads it
    with pytest.raises(ValueError, match="fraction"):
        thresholds_from_outputs(*_val(), fraction=1.0)
    with pytest.raises(ValueError, match="no validation patients"):
        thresholds_from_stats(EvalStats.from_outputs(np.zeros((0, 5)), np.zeros(0, int)), 5)
