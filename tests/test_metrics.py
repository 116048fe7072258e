import itertools

import numpy as np
import pytest

from ccmr_core.metrics import (EvalStats, bootstrap_accuracy_ci, bootstrap_auroc_ci, bootstrap_auroc_patients_ci,
                               bootstrap_seeds_patients_ci, classification_metrics, ece_floor,
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


def test_ece_floor_is_what_a_calibrated_model_scores_at_this_size():
    """A model whose confidences are exactly its chance of being right still scores ECE > 0 on few
    patients; the floor matches simulation, shrinks with n and is 0 for certain predictions."""
    rng = np.random.default_rng(1)
    conf = rng.choice([0.99, 0.95, 0.8, 0.6], 62, p=[0.6, 0.2, 0.1, 0.1])
    draws = []
    for _ in range(2000):
        right = rng.random(62) < conf
        draws.append(expected_calibration_error(np.stack([conf, 1 - conf], 1), np.where(right, 0, 1)))
    stats = EvalStats.from_outputs(np.stack([conf, 1 - conf, 0 * conf], 1), np.zeros(62, dtype=int))
    floor = ece_floor(stats.calib_count, stats.calib_conf)
    assert floor == pytest.approx(np.mean(draws), rel=0.1) and 0.02 < floor < 0.1
    big = EvalStats.from_outputs(np.tile(np.stack([conf, 1 - conf, 0 * conf], 1), (20, 1)), np.zeros(1240, dtype=int))
    assert ece_floor(big.calib_count, big.calib_conf) < floor / 3
    assert ece_floor(np.array([10, 0]), np.array([10.0, 0.0])) == 0.0
    assert metrics_from_stats(stats, CLASSES)["ece_floor"] == pytest.approx(floor)


def test_bootstrap_ci_brackets_accuracy_and_narrows():
    small = np.array([1, 0] * 10, dtype=bool)
    big = np.array([1, 0] * 500, dtype=bool)
    lo, hi = bootstrap_accuracy_ci(small)
    blo, bhi = bootstrap_accuracy_ci(big)
    assert lo < 0.5 < hi and blo < 0.5 < bhi and (bhi - blo) < (hi - lo) / 4


def test_seed_and_patient_interval_widens_with_training_noise_only():
    rng = np.random.default_rng(1)
    patients = rng.normal(0.05, 0.3, 60)  # a paired difference per patient
    steady = np.tile(patients, (5, 1))  # five training runs that agree
    noisy = steady + rng.normal(0, 0.15, (5, 1))  # the same patients, runs that move the mean by several points
    lo, hi = bootstrap_seeds_patients_ci(steady)
    plo, phi = bootstrap_accuracy_ci(steady.mean(0), n_boot=10_000)
    assert abs(lo - plo) < 0.01 and abs(hi - phi) < 0.01  # nothing to add when every run agrees
    nlo, nhi = bootstrap_seeds_patients_ci(noisy)
    assert nlo < noisy.mean() < nhi and (nhi - nlo) > 1.3 * (phi - plo)  # the run-to-run spread widens it
    assert (nlo, nhi) == bootstrap_seeds_patients_ci(noisy)  # deterministic for a seed
    assert bootstrap_seeds_patients_ci(np.ones((3, 4))) == (1.0, 1.0)
    with pytest.raises(ValueError, match=r"\(seeds, patients\) table, got shape \(4,\)"):
        bootstrap_seeds_patients_ci(np.ones(4))


def test_auroc_interval_brackets_the_estimate_and_narrows_with_more_errors():
    rng = np.random.default_rng(0)
    few = rng.random(300) < 11 / 300  # 11 errors or so among 300 predictions
    many = rng.random(300) < 0.5
    for wrong in (few, many):
        score = wrong + rng.normal(0, 1.0, 300)  # an informative but imperfect detector
        lo, hi = bootstrap_auroc_ci(score, wrong)
        assert lo < roc_auc(score, wrong) < hi
    width = lambda w: np.subtract(*bootstrap_auroc_ci(w + rng.normal(0, 1.0, 300), w)[::-1])  # noqa: E731
    assert width(many) < width(few) / 2
    assert bootstrap_auroc_ci(few.astype(float), few) == (1.0, 1.0)  # a perfect detector stays perfect
    assert bootstrap_auroc_ci(np.ones(300), few) == (0.5, 0.5)  # ties count half, as in roc_auc
    assert all(np.isnan(bootstrap_auroc_ci(np.ones(5), np.zeros(5, bool))))  # no error: nothing to detect
    one = np.zeros(300, bool)
    one[0] = True  # a single error, ranked above 270 of the 299 right answers
    score = np.r_[0.9, np.linspace(0, 1, 299)]
    lo, hi = bootstrap_auroc_ci(score, one)
    assert lo < roc_auc(score, one) < hi and 0.8 < lo and hi < 0.96
    assert bootstrap_auroc_ci(-score, ~one) == pytest.approx((lo, hi))  # one right answer among errors: the same


def test_auroc_interval_over_patients_counts_a_patient_every_seed_gets_wrong_once():
    """Five seeds' predictions of the same 60 patients: when every seed makes the same errors on the
    same patients with the same scores, the pooled predictions hold 60 patients' worth of evidence,
    not 300, and the patients' interval is as wide as one seed's; the pooled predictions' own
    bootstrap is narrower than it should be."""
    rng = np.random.default_rng(1)
    wrong = rng.random(60) < 0.3
    score = wrong + rng.normal(0, 0.8, 60)
    seeds = 5
    pooled_w, pooled_s, ids = np.tile(wrong, seeds), np.tile(score, seeds), np.tile(np.arange(60), seeds)
    width = lambda ci: ci[1] - ci[0]  # noqa: E731
    one_seed = bootstrap_auroc_patients_ci(score, wrong, np.arange(60))
    clustered = bootstrap_auroc_patients_ci(pooled_s, pooled_w, ids)
    naive = bootstrap_auroc_ci(pooled_s, pooled_w)
    assert clustered[0] < roc_auc(pooled_s, pooled_w) < clustered[1]
    assert width(clustered) == pytest.approx(width(one_seed), rel=0.15)
    assert width(naive) < 0.6 * width(clustered)
    assert all(np.isnan(bootstrap_auroc_patients_ci(np.ones(5), np.zeros(5, bool), np.arange(5))))


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


def test_a_site_cannot_steer_pooled_metrics_with_counts_no_patients_produce():
    """Issue 14: the evaluation counts a site sends feed the pooled metrics, the temperature and the
    referral thresholds unchecked. True statistics pass; each forged one is named and left out."""
    from flwr.app import MetricRecord, RecordDict

    from ccmr_core.metrics import flat_stats_problem
    from server.aggregation import pooled_stats

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 40)
    logits = rng.normal(size=(40, 5))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    stats = EvalStats.from_outputs(probs, labels, np.ones(40), uncertainty=rng.random(40) * 0.1, logits=logits,
                                   thresholds={"confidence": 0.4, "uncertainty": 0.05})
    flat = stats.to_flat()
    assert flat_stats_problem(flat, 5) is None
    forged = {
        "n": ({**flat, "n": [400.0]}, "do not count n"),
        "confusion": ({**flat, "confusion": [x * 10 for x in flat["confusion"]]}, "do not count n"),
        "fraction": ({**flat, "unc_wrong": [0.5] + flat["unc_wrong"][1:]}, "not a count"),
        "negative": ({**flat, "refer": [-1.0, 0.0, 0.0, 41.0]}, "negative"),
        "nan": ({**flat, "nll_t": [float("nan")] * len(flat["nll_t"])}, "non-finite"),
        "length": ({**flat, "calib_count": flat["calib_count"][:-1]}, "expected 20"),
        "histogram": ({**flat, "pos_hist": [0.0] * len(flat["pos_hist"])}, "histograms"),
    }
    for name, (d, words) in forged.items():
        assert words in (flat_stats_problem(d, 5) or ""), name

    def reply(d, n):
        m = {f"stats-{k}": v for k, v in d.items()}
        return RecordDict({"metrics": MetricRecord({**m, "site-n": [float(n)], "site-correct": [0.0]})})

    total, _, n = pooled_stats([reply(flat, 40), reply(forged["n"][0], 400)], 5)
    assert total.n == 40 and n.tolist() == [40.0]  # the forged reply is left out
    total, _, _ = pooled_stats([reply(flat, 40), reply(flat, 39)], 5)  # per-site counts off by one
    assert total.n == 40
    # a reply with no statistics at all, or counting another number of sites, is left out too
    # (before: a KeyError / a broadcasting error that stopped the coordinator)
    bare = RecordDict({"metrics": MetricRecord({"site-n": [0.0], "site-correct": [0.0]})})
    two_sites = RecordDict({"metrics": MetricRecord({**{f"stats-{k}": v for k, v in flat.items()},
                                                     "site-n": [40.0, 0.0], "site-correct": [0.0, 0.0]})})
    total, _, n = pooled_stats([reply(flat, 40), bare, two_sites], 5)
    assert total.n == 40 and n.tolist() == [40.0]
