"""The metrics a clinical paper reports, from per-patient outputs or from mergeable statistics.

Per-patient arrays (probabilities, labels, uncertainties) never leave a site. What a site can
share is :class:`EvalStats`: a confusion matrix, per-class histograms of the predicted
probability for positives and negatives, calibration bins and loss sums. Statistics from several
sites add up, and :func:`metrics_from_stats` turns the pooled statistics into global accuracy,
macro AUC (from the histograms), ECE and per-class sensitivity/specificity/F1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import bootstrap, mannwhitneyu
from sklearn.metrics import roc_auc_score

from ccmr_core.calibration import TEMPERATURES, nll_sums

N_BINS = 20  # probability histogram and calibration bins
N_UNC_BINS = 24  # epistemic-uncertainty bins: [0, 1e-4), then log-spaced up to ln C


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve (ties count half); NaN if only one class is present."""
    positive = np.asarray(positive, dtype=bool)
    if positive.all() or not positive.any():
        return float("nan")
    return float(roc_auc_score(positive, scores))


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = N_BINS) -> float:
    conf = probs.max(1)
    correct = probs.argmax(1) == labels
    idx = np.minimum((conf * bins).astype(int), bins - 1)
    ece = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def ece_floor(count: np.ndarray, conf_sum: np.ndarray, draws: int = 2000, seed: int = 0) -> float:
    """The ECE a perfectly calibrated model would score, on average, on this many patients with these
    confidences (per calibration bin: ``count`` patients, ``conf_sum`` summed confidence): each bin's
    correct count drawn as Binomial(count, mean confidence). ECE is biased upwards on few patients; a
    measured ECE near this floor is as good as calibration can be shown to be at this size."""
    count = np.asarray(count, dtype=np.int64)
    n = int(count.sum())
    if n == 0:
        return float("nan")
    p = np.divide(conf_sum, count, out=np.zeros(len(count)), where=count > 0).clip(0, 1)
    correct = np.random.default_rng(seed).binomial(count, p, size=(draws, len(count)))
    return float(np.abs(correct - conf_sum).sum(1).mean() / n)


def bootstrap_accuracy_ci(correct: np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean over patients (resampled with replacement):
    of accuracy for 0/1 correctness, or of a paired difference for per-patient differences."""
    correct = np.asarray(correct, dtype=float)
    if len(correct) == 0:
        return float("nan"), float("nan")
    if len(correct) < 2 or np.allclose(correct, correct[0]):  # every resample is the same: scipy warns
        return float(correct.mean()), float(correct.mean())
    r = bootstrap((correct,), np.mean, n_resamples=n_boot, method="percentile", random_state=seed)
    return float(r.confidence_interval.low), float(r.confidence_interval.high)


def bootstrap_seeds_patients_ci(values: np.ndarray, n_boot: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean of a (seeds, patients) table (per-patient correctness, or
    paired differences), resampling the training seeds and the test patients independently (a
    crossed bootstrap). ``bootstrap_accuracy_ci`` of the seed-averaged row holds the trained models
    fixed; this one also asks what other training runs of the same recipe would give, which is what
    a claim about the recipe needs (it is somewhat conservative: a patient-by-seed interaction is
    counted in both resamplings). With one seed it is the patient bootstrap."""
    v = np.asarray(values, dtype=float)
    if v.ndim != 2 or v.size == 0:
        raise ValueError(f"expected a (seeds, patients) table, got shape {v.shape}")
    n_s, n_p = v.shape
    if np.allclose(v, v.flat[0]):
        return float(v.mean()), float(v.mean())
    rng = np.random.default_rng(seed)
    out = np.empty(n_boot)
    for start in range(0, n_boot, 1000):  # counts of each seed and patient in a resample: mean = w_s V w_p / (S P)
        b = min(1000, n_boot - start)
        ws = rng.multinomial(n_s, np.full(n_s, 1 / n_s), size=b)
        wp = rng.multinomial(n_p, np.full(n_p, 1 / n_p), size=b)
        out[start:start + b] = np.einsum("bs,sp,bp->b", ws, v, wp) / (n_s * n_p)
    lo, hi = np.percentile(out, [2.5, 97.5])
    return float(lo), float(hi)


def bootstrap_auroc_ci(scores: np.ndarray, positive: np.ndarray, n_boot: int = 2000,
                       seed: int = 0) -> tuple[float, float]:
    """95% stratified percentile-bootstrap interval of ``roc_auc``: positives and negatives are
    resampled separately (scipy's two-sample bootstrap), so every resample keeps their counts
    (with few errors, e.g. 11 among 300 predictions, the AUROC of an error detector is itself
    uncertain). The AUROC of a resample is the Mann-Whitney U over the product of the counts."""
    scores, positive = np.asarray(scores, dtype=float), np.asarray(positive, dtype=bool)
    pos, neg = scores[positive], scores[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan"), float("nan")
    if pos.min() > neg.max() or pos.max() < neg.min() or len(pos) == len(neg) == 1:
        auc = roc_auc(scores, positive)  # every resample scores the same (scipy would warn)
        return auc, auc

    if min(len(pos), len(neg)) == 1:  # scipy resamples samples of two or more: the AUROC is then a mean
        one, many, side = (pos[0], neg, 1.0) if len(pos) == 1 else (neg[0], pos, -1.0)
        wins = np.where(side * (one - many) > 0, 1.0, np.where(one == many, 0.5, 0.0))  # ties count half
        r = bootstrap((wins,), np.mean, n_resamples=n_boot, method="percentile", random_state=seed, vectorized=True)
        return float(r.confidence_interval.low), float(r.confidence_interval.high)

    def auroc(p, n, axis=-1):
        return mannwhitneyu(p, n, axis=axis).statistic / (p.shape[axis] * n.shape[axis])

    r = bootstrap((pos, neg), auroc, n_resamples=n_boot, method="percentile", random_state=seed, vectorized=True,
                  batch=200)
    return float(r.confidence_interval.low), float(r.confidence_interval.high)


def bootstrap_auroc_patients_ci(scores: np.ndarray, positive: np.ndarray, patients: np.ndarray, n_boot: int = 2000,
                                seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of ``roc_auc`` over predictions pooled from several models (seeds) of
    the same test patients, resampling the patients: each resample draws patients with replacement
    and keeps every prediction of each (``patients`` names a prediction's patient). A patient that
    every seed gets wrong is one hard case, not five independent errors, so the pooled predictions'
    own bootstrap (``bootstrap_auroc_ci``) would be too narrow. Resamples without an error (or
    without a right answer) are skipped."""
    scores, positive = np.asarray(scores, dtype=float), np.asarray(positive, dtype=bool)
    ids, which = np.unique(np.asarray(patients), return_inverse=True)
    if positive.all() or not positive.any():
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    out = []
    for counts in rng.multinomial(len(ids), np.full(len(ids), 1 / len(ids)), size=n_boot):
        w = counts[which]
        if w[positive].sum() == 0 or w[~positive].sum() == 0:
            continue
        out.append(roc_auc_score(positive, scores, sample_weight=w))
    lo, hi = np.percentile(out, [2.5, 97.5])
    return float(lo), float(hi)


def per_class(cm: np.ndarray, classes: list[str]) -> dict[str, dict[str, float]]:
    out = {}
    total = cm.sum()
    for k, c in enumerate(classes):
        tp = cm[k, k]
        fn = cm[k].sum() - tp
        fp = cm[:, k].sum() - tp
        tn = total - tp - fn - fp
        sens = tp / (tp + fn) if tp + fn else float("nan")
        spec = tn / (tn + fp) if tn + fp else float("nan")
        prec = tp / (tp + fp) if tp + fp else float("nan")
        f1 = 2 * prec * sens / (prec + sens) if (tp + fp) and (tp + fn) and (prec + sens) > 0 else 0.0
        out[c] = {"sensitivity": float(sens), "specificity": float(spec), "f1": float(f1), "support": int(cm[k].sum())}
    return out


def _nanmean(values: list[float]) -> float:
    v = [x for x in values if not np.isnan(x)]
    return float(np.mean(v)) if v else float("nan")


def classification_metrics(probs: np.ndarray, labels: np.ndarray, classes: list[str],
                           uncertainty: np.ndarray | None = None, seed: int = 0, thresholds: dict | None = None) -> dict:
    """Everything metrics.json holds, from per-patient outputs (used inside a site); with the
    referral ``thresholds``, what the referral rule did."""
    n_cls = len(classes)
    pred = probs.argmax(1)
    correct = pred == labels
    cm = np.zeros((n_cls, n_cls), dtype=int)
    np.add.at(cm, (labels, pred), 1)
    aucs = {c: roc_auc(probs[:, k], labels == k) for k, c in enumerate(classes)}
    lo, hi = bootstrap_accuracy_ci(correct, seed=seed)
    out = {
        "n": int(len(labels)),
        "accuracy": float(correct.mean()) if len(labels) else float("nan"),
        "accuracy_ci95": [lo, hi],
        "macro_auc": _nanmean(list(aucs.values())),
        "auc_per_class": aucs,
        "per_class": per_class(cm, classes),
        "macro_f1": _nanmean([v["f1"] for v in per_class(cm, classes).values()]),
        "confusion_matrix": cm.tolist(),
        "ece": expected_calibration_error(probs, labels) if len(labels) else float("nan"),
        "classes": list(classes),
    }
    stats = EvalStats.from_outputs(probs, labels, uncertainty=uncertainty, thresholds=thresholds)
    out["ece_floor"] = ece_floor(stats.calib_count, stats.calib_conf)
    out["curves"] = curves_from_stats(stats, classes)
    out["referral"] = referral_summary(stats)
    out["confidence_error_auc"] = roc_auc(-probs.max(1), ~correct) if len(labels) else float("nan")
    if uncertainty is not None and len(labels) > 2:
        err = (~correct).astype(float)
        if err.std() > 0 and uncertainty.std() > 0:
            out["uncertainty_error_correlation"] = float(np.corrcoef(uncertainty, err)[0, 1])
            out["uncertainty_error_auc"] = roc_auc(uncertainty, ~correct)
        else:
            out["uncertainty_error_correlation"] = float("nan")
            out["uncertainty_error_auc"] = float("nan")
        out["mean_uncertainty_correct"] = float(uncertainty[correct].mean()) if correct.any() else float("nan")
        out["mean_uncertainty_wrong"] = float(uncertainty[~correct].mean()) if (~correct).any() else float("nan")
    return out


# --- mergeable statistics (what federated evaluation may share) -------------------------------


@dataclass
class EvalStats:
    confusion: np.ndarray  # (C, C) counts, rows = truth
    pos_hist: np.ndarray  # (C, N_BINS) counts of p_k for patients of class k
    neg_hist: np.ndarray  # (C, N_BINS) counts of p_k for patients not of class k
    calib_count: np.ndarray  # (N_BINS,) patients per confidence bin
    calib_correct: np.ndarray  # (N_BINS,) correct predictions per bin
    calib_conf: np.ndarray  # (N_BINS,) summed confidence per bin
    unc_correct: np.ndarray  # (N_UNC_BINS,) correct predictions per epistemic-uncertainty bin
    unc_wrong: np.ndarray  # (N_UNC_BINS,) wrong predictions per epistemic-uncertainty bin
    nll_t: np.ndarray  # (len(TEMPERATURES),) summed NLL at each calibration temperature (from raw logits)
    refer: np.ndarray  # (4,) kept correct, kept wrong, referred correct, referred wrong (given thresholds)
    loss_sum: float
    n: int

    @classmethod
    def from_outputs(cls, probs: np.ndarray, labels: np.ndarray, losses: np.ndarray | None = None,
                     uncertainty: np.ndarray | None = None, logits: np.ndarray | None = None,
                     thresholds: dict | None = None) -> EvalStats:
        """Counts only. ``uncertainty`` (mutual information, nats) is binned by
        ``uncertainty_edges``; without it the uncertainty histograms stay empty. ``logits`` (raw,
        uncalibrated) give the NLL sums that fit the calibration temperature; ``thresholds``
        (ccmr_core/referral.py) give how many patients the referral rule would keep and refer."""
        n, c = probs.shape
        pred = probs.argmax(1)
        cm = np.zeros((c, c), dtype=np.int64)
        np.add.at(cm, (labels, pred), 1)
        b = np.minimum((probs * N_BINS).astype(int), N_BINS - 1)
        pos = np.zeros((c, N_BINS), dtype=np.int64)
        neg = np.zeros((c, N_BINS), dtype=np.int64)
        for k in range(c):
            np.add.at(pos[k], b[labels == k, k], 1)
            np.add.at(neg[k], b[labels != k, k], 1)
        conf = probs.max(1)
        cb = np.minimum((conf * N_BINS).astype(int), N_BINS - 1)
        count = np.bincount(cb, minlength=N_BINS)
        corr = np.bincount(cb, weights=(pred == labels).astype(float), minlength=N_BINS)
        csum = np.bincount(cb, weights=conf, minlength=N_BINS)
        unc_ok = np.zeros(N_UNC_BINS, dtype=np.int64)
        unc_bad = np.zeros(N_UNC_BINS, dtype=np.int64)
        if uncertainty is not None and n:
            ub = uncertainty_bin(np.asarray(uncertainty), c)
            unc_ok = np.bincount(ub[pred == labels], minlength=N_UNC_BINS)
            unc_bad = np.bincount(ub[pred != labels], minlength=N_UNC_BINS)
        nll = nll_sums(logits, labels) if logits is not None else np.zeros(len(TEMPERATURES))
        refer = np.zeros(4, dtype=np.int64)
        if thresholds is not None and n:
            from ccmr_core.referral import referred  # noqa: PLC0415 (referral builds on these statistics)

            ref = referred(conf, np.asarray(uncertainty) if uncertainty is not None else None, thresholds)
            ok = pred == labels
            refer = np.array([(~ref & ok).sum(), (~ref & ~ok).sum(), (ref & ok).sum(), (ref & ~ok).sum()])
        return cls(cm, pos, neg, count, corr, csum, unc_ok, unc_bad, nll, refer,
                   float(losses.sum()) if losses is not None else 0.0, int(n))

    def __add__(self, other: EvalStats) -> EvalStats:
        return EvalStats(*(a + b for a, b in zip(self.arrays(), other.arrays())), self.loss_sum + other.loss_sum,
                         self.n + other.n)

    NAMES = ("confusion", "pos_hist", "neg_hist", "calib_count", "calib_correct", "calib_conf", "unc_correct",
             "unc_wrong", "nll_t", "refer")

    def arrays(self) -> tuple[np.ndarray, ...]:
        return tuple(getattr(self, k) for k in self.NAMES)

    def to_flat(self) -> dict[str, list[float]]:
        """Flat lists of numbers (for a Flower MetricRecord)."""
        out = {k: np.asarray(v, dtype=float).ravel().tolist() for k, v in zip(self.NAMES, self.arrays())}
        out["loss_sum"] = [self.loss_sum]
        out["n"] = [float(self.n)]
        return out

    @classmethod
    def from_flat(cls, d: dict, n_classes: int) -> EvalStats:
        c = n_classes
        return cls(
            np.asarray(d["confusion"]).reshape(c, c).astype(np.int64),
            np.asarray(d["pos_hist"]).reshape(c, N_BINS).astype(np.int64),
            np.asarray(d["neg_hist"]).reshape(c, N_BINS).astype(np.int64),
            np.asarray(d["calib_count"]).astype(np.int64),
            np.asarray(d["calib_correct"]).astype(float),
            np.asarray(d["calib_conf"]).astype(float),
            np.asarray(d.get("unc_correct", np.zeros(N_UNC_BINS))).astype(np.int64),
            np.asarray(d.get("unc_wrong", np.zeros(N_UNC_BINS))).astype(np.int64),
            np.asarray(d.get("nll_t", np.zeros(len(TEMPERATURES)))).astype(float),
            np.asarray(d.get("refer", np.zeros(4))).astype(np.int64),
            float(d["loss_sum"][0]),
            int(d["n"][0]),
        )


def flat_sizes(n_classes: int) -> dict[str, int]:
    """The length of each array of ``EvalStats.to_flat`` for ``n_classes`` classes (what a site may
    send, protocol/messages.py, and what the coordinator accepts, ``flat_stats_problem``)."""
    c = n_classes
    return {"confusion": c * c, "pos_hist": c * N_BINS, "neg_hist": c * N_BINS, "calib_count": N_BINS,
            "calib_correct": N_BINS, "calib_conf": N_BINS, "unc_correct": N_UNC_BINS, "unc_wrong": N_UNC_BINS,
            "nll_t": len(TEMPERATURES), "refer": 4, "loss_sum": 1, "n": 1}


def flat_stats_problem(d: dict, n_classes: int) -> str | None:
    """Why statistics received from a site (``EvalStats.to_flat`` form) cannot be true counts of
    one evaluation, or None. A site could otherwise steer the pooled metrics, the calibration
    temperature and the referral thresholds with numbers no set of patients produces."""
    c = n_classes
    a = {}
    for k, size in flat_sizes(c).items():
        v = np.asarray(d.get(k, np.zeros(size)), dtype=float).ravel()
        if v.size != size:
            return f"{k} has {v.size} values, expected {size}"
        if not np.isfinite(v).all() or (v < 0).any():
            return f"{k} holds a negative or non-finite value"
        if k not in ("calib_conf", "nll_t", "loss_sum") and not np.array_equal(v, np.round(v)):
            return f"{k} holds a value that is not a count"
        a[k] = v
    n = a["n"][0]
    cm = a["confusion"].reshape(c, c)
    pos, neg = a["pos_hist"].reshape(c, N_BINS), a["neg_hist"].reshape(c, N_BINS)
    unc = a["unc_correct"].sum() + a["unc_wrong"].sum()
    checks = [
        (cm.sum() == n and a["calib_count"].sum() == n, "the confusion matrix and the calibration bins do not count n"),
        ((pos.sum(1) == cm.sum(1)).all() and (pos.sum(1) + neg.sum(1) == n).all(),
         "the probability histograms do not match the confusion matrix"),
        ((a["calib_correct"] <= a["calib_count"]).all() and a["calib_correct"].sum() == np.trace(cm),
         "the correct predictions per bin do not match the confusion matrix"),
        ((a["calib_conf"] <= a["calib_count"] + 1e-6).all(), "a bin's summed confidence exceeds its count"),
        (unc in (0, n) and a["refer"].sum() in (0, n), "the uncertainty or referral counts do not count n"),
        (unc == 0 or a["unc_correct"].sum() == np.trace(cm), "the uncertainty histograms do not match the confusion matrix"),
    ]
    for ok, why in checks:
        if not ok:
            return why
    return None


def uncertainty_edges(n_classes: int) -> np.ndarray:
    """Bin edges for epistemic uncertainty (mutual information, nats): MC-dropout values are
    mostly far below their maximum ln C, so the bins are log-spaced from 1e-4 up to ln C."""
    return np.concatenate([[0.0], np.geomspace(1e-4, np.log(max(n_classes, 2)), N_UNC_BINS)])


def uncertainty_bin(u: np.ndarray, n_classes: int) -> np.ndarray:
    return np.clip(np.searchsorted(uncertainty_edges(n_classes), u, side="right") - 1, 0, N_UNC_BINS - 1)


def curves_from_stats(stats: EvalStats, classes: list[str]) -> dict:
    """What the report plots, from counts alone (so pooled federated statistics give the same
    curves as per-patient outputs): ROC per class with thresholds at the histogram edges, the
    reliability diagram, and error rate against epistemic uncertainty."""
    roc = {}
    for k, c in enumerate(classes):
        pos, neg = stats.pos_hist[k][::-1], stats.neg_hist[k][::-1]  # thresholds from high to low
        if pos.sum() and neg.sum():
            roc[c] = {"fpr": [0.0] + (np.cumsum(neg) / neg.sum()).tolist(),
                      "tpr": [0.0] + (np.cumsum(pos) / pos.sum()).tolist()}
    seen = stats.calib_count > 0
    edges = uncertainty_edges(len(classes))
    return {
        "risk_coverage": risk_coverage(stats),
        "roc": roc,
        "reliability": {"confidence": (stats.calib_conf[seen] / stats.calib_count[seen]).tolist(),
                        "accuracy": (stats.calib_correct[seen] / stats.calib_count[seen]).tolist(),
                        "count": stats.calib_count[seen].astype(int).tolist()},
        "uncertainty": {"edges": edges.tolist(), "correct": stats.unc_correct.astype(int).tolist(),
                        "wrong": stats.unc_wrong.astype(int).tolist()},
    }


def risk_coverage(stats: EvalStats) -> dict:
    """Accuracy of the patients kept when the least confident (or the most uncertain) are referred,
    against the share kept, from the histograms: {"confidence": {...}, "uncertainty": {...}}."""
    out = {}
    for key, ok, total in (
        ("confidence", stats.calib_correct[::-1], stats.calib_count[::-1]),  # most confident bins first
        ("uncertainty", stats.unc_correct, stats.unc_correct + stats.unc_wrong),  # least uncertain first
    ):
        kept, right = np.cumsum(total), np.cumsum(ok)
        m = kept > 0
        n = total.sum()
        out[key] = {"coverage": (kept[m] / n).tolist() if n else [], "accuracy": (right[m] / kept[m]).tolist()}
    return out


def error_detection_auc(stats: EvalStats) -> dict:
    """How well a score separates wrong from right predictions (AUROC), from the histograms: the
    epistemic uncertainty (higher = more likely wrong) and the confidence (lower = more likely
    wrong); NaN without both kinds of prediction."""
    conf_wrong = stats.calib_count - stats.calib_correct
    return {"uncertainty": auc_from_histograms(stats.unc_wrong, stats.unc_correct),
            "confidence": auc_from_histograms(conf_wrong[::-1], stats.calib_correct[::-1])}


def referral_summary(stats: EvalStats) -> dict | None:
    """What the referral rule did on these patients: share referred and the accuracy of the rest."""
    kc, kw, rc, rw = (int(x) for x in stats.refer)
    n = kc + kw + rc + rw
    if not n:
        return None
    return {"referred": (rc + rw) / n, "accuracy_kept": kc / (kc + kw) if kc + kw else float("nan"),
            "accuracy_referred": rc / (rc + rw) if rc + rw else float("nan"), "n": n}


def auc_from_histograms(pos: np.ndarray, neg: np.ndarray) -> float:
    """AUC from binned scores: P(score_pos > score_neg) + 0.5 P(same bin)."""
    if pos.sum() == 0 or neg.sum() == 0:
        return float("nan")
    neg_below = np.concatenate([[0], np.cumsum(neg)[:-1]])
    return float((pos * (neg_below + 0.5 * neg)).sum() / (pos.sum() * neg.sum()))


def metrics_from_stats(stats: EvalStats, classes: list[str]) -> dict:
    cm = stats.confusion
    n = int(cm.sum())
    acc = float(np.trace(cm) / n) if n else float("nan")
    aucs = {c: auc_from_histograms(stats.pos_hist[k], stats.neg_hist[k]) for k, c in enumerate(classes)}
    ece = float(np.abs(stats.calib_correct - stats.calib_conf).sum() / n) if n else float("nan")
    pc = per_class(cm, classes)
    return {
        "n": n,
        "accuracy": acc,
        "macro_auc": _nanmean(list(aucs.values())),
        "auc_per_class": aucs,
        "per_class": pc,
        "macro_f1": _nanmean([v["f1"] for v in pc.values()]),
        "confusion_matrix": cm.tolist(),
        "ece": ece,
        "ece_floor": ece_floor(stats.calib_count, stats.calib_conf),
        "loss": stats.loss_sum / n if n else float("nan"),
        "classes": list(classes),
        "curves": curves_from_stats(stats, classes),
        "error_detection_auc": error_detection_auc(stats),
        "referral": referral_summary(stats),
    }
