import itertools

import numpy as np
import pytest

from ccmr_core.metrics import (EvalStats, bootstrap_accuracy_ci, classification_metrics,
                               expected_calibration_error, metrics_from_stats, per_class, roc_auc)

CLASSES = ["NOR", "MINF", "DCM"]


def brute_auc(s, pos):
    pairs = list(itertools.product(s[pos], s[~pos]))
    return np.mean([1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs])


def test_auc_matches_pairwise_definition_with_ties():
    rng = np.random.default_rng(0)
    s = np.round(rng.random(40), 1)
    pos = rng.random(40) > 0.5
    assert roc_auc(s, pos) == pytest.approx(brute_auc(s, pos))
    assert roc_auc(np.array([0.1, 0.9]), np.array([False, True])) == 1.0
    assert np.isnan(roc_auc(np.array([0.1, 0.2]), np.array([True, True])))


def test_ece_zero_when_calibrated_positive_when_overconfident():
    labels = np.array([0] * 50 + [1] * 50)
    calibrated = np.tile([0.5, 0.5, 0.0], (100, 1))
    assert expected_calibration_error(calibrated, labels) == pytest.approx(0.0, abs=1e-9)
    over = np.tile([0.99, 0.01, 0.0], (100, 1))
    assert expected_calibration_error(over, labels) == pytest.approx(0.49, abs=1e-6)


def test_bootstrap_ci_brackets_accuracy_and_narrows():
    small = np.array([1, 0] * 10, dtype=bool)
    big = np.array([1, 0] * 500, dtype=bool)
    lo, hi = bootstrap_accuracy_ci(small)
    blo, bhi = bootstrap_accuracy_ci(big)
    assert lo < 0.5 < hi and blo < 0.5 < bhi and (bhi - blo) < (hi - lo) / 4


def test_per_class_from_known_confusion():
    cm = np.array([[8, 2, 0], [1, 9, 0], [0, 0, 10]])
    pc = per_class(cm, CLASSES)
    assert pc["NOR"]["sensitivity"] == pytest.approx(0.8)
    assert pc["NOR"]["specificity"] == pytest.approx(19 / 20)
    assert pc["DCM"]["f1"] == pytest.approx(1.0)


def _fake(n, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    logits = rng.normal(0, 1, (n, 3))
    logits[np.arange(n), labels] += 1.5
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return p, labels


def test_mergeable_statistics_add_up_and_match_patient_level_metrics():
    p, y = _fake(400, 1)
    whole = EvalStats.from_outputs(p, y, np.ones(400))
    parts = EvalStats.from_outputs(p[:150], y[:150], np.ones(150)) + EvalStats.from_outputs(p[150:], y[150:], np.ones(250))
    for a, b in zip(whole.arrays(), parts.arrays()):
        assert np.allclose(a, b)
    flat = EvalStats.from_flat(parts.to_flat(), 3)
    pooled = metrics_from_stats(flat, CLASSES)
    direct = classification_metrics(p, y, CLASSES)
    assert pooled["accuracy"] == pytest.approx(direct["accuracy"])
    assert pooled["macro_auc"] == pytest.approx(direct["macro_auc"], abs=0.02)
    assert pooled["ece"] == pytest.approx(direct["ece"], abs=1e-9)
    assert pooled["confusion_matrix"] == direct["confusion_matrix"]
    assert pooled["loss"] == pytest.approx(1.0)


def test_uncertainty_error_relation_reported():
    p, y = _fake(200, 2)
    wrong = p.argmax(1) != y
    unc = wrong.astype(float) + np.random.default_rng(0).random(200) * 0.1
    m = classification_metrics(p, y, CLASSES, unc)
    assert m["uncertainty_error_correlation"] > 0.9 and m["uncertainty_error_auc"] > 0.99
    assert m["mean_uncertainty_wrong"] > m["mean_uncertainty_correct"]
