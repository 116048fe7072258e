"""Aggregating what the sites report: train metrics and mergeable evaluation statistics."""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import MetricRecord, RecordDict

from ccmr_core.console import warn
from ccmr_core.metrics import EvalStats, flat_stats_problem, metrics_from_stats
from ccmr_core.retrieval_stats import RetrievalStats, flat_problem
from protocol import messages as proto

log = logging.getLogger("ccmr.server")


def aggregate_train_metrics(replies: list[RecordDict], weight_key: str) -> MetricRecord:
    """Weighted mean training loss over sites that trained; per-site epsilon and declines."""
    n_refused = sum(proto.is_refused(r) for r in replies)
    ms = [proto.reply_metrics(r) for r in replies if not proto.is_refused(r)]
    if not ms:
        return MetricRecord({proto.REFUSED: float(n_refused)})
    w = np.array([m[proto.NUM_EXAMPLES] for m in ms], dtype=float)
    loss = float(np.average([m[proto.TRAIN_LOSS] for m in ms], weights=w)) if w.sum() > 0 else float("nan")
    eps = np.max([m[proto.SITE_EPSILON] for m in ms], axis=0)
    declined = np.max([m[proto.SITE_DECLINED] for m in ms], axis=0)
    out = {proto.TRAIN_LOSS: loss, proto.SITE_EPSILON: eps.tolist(), proto.SITE_DECLINED: declined.tolist(),
           "patients": float(w.sum()), proto.DELTA: float(ms[0][proto.DELTA]),
           proto.TRAIN_SECONDS: float(sum(m.get(proto.TRAIN_SECONDS, 0.0) for m in ms)), proto.REFUSED: float(n_refused)}
    if any(proto.SECAGG_CLIPPED in m for m in ms):  # coordinates the secure-aggregation range cut, all sites
        out[proto.SECAGG_CLIPPED] = float(sum(m.get(proto.SECAGG_CLIPPED, 0.0) for m in ms))
    return MetricRecord(out)


def pooled_stats(replies: list[RecordDict], n_classes: int) -> tuple[EvalStats, np.ndarray, np.ndarray]:
    """The sum of the sites' evaluation statistics; a reply whose numbers cannot be true counts
    (ccmr_core.metrics.flat_stats_problem, or per-site counts that do not add up) is left out."""
    total, correct, n = None, None, None
    for r in replies:
        if proto.is_refused(r):  # nothing to pool
            continue
        m = proto.reply_metrics(r)
        flat = {k[len(proto.STATS):]: v for k, v in m.items() if k.startswith(proto.STATS)}
        why = flat_stats_problem(flat, n_classes) if flat else "it carries no evaluation statistics"
        site_n, site_c = np.asarray(m.get(proto.SITE_N, []), dtype=float), np.asarray(m.get(proto.SITE_CORRECT, []), dtype=float)
        if why is None and not (site_n.shape == site_c.shape and np.isfinite(site_n).all() and
                                (site_c >= 0).all() and (site_c <= site_n).all() and site_n.sum() == flat["n"][0]):
            why = "its per-site counts do not add up to its total"
        if why is None and n is not None and site_n.shape != n.shape:
            why = f"it counts {site_n.size} sites, the replies before it {n.size}"
        if why:
            msg = f"evaluation statistics of a SuperNode left out: {why}"
            warn(log, msg)
            continue
        s = EvalStats.from_flat(flat, n_classes)
        total = s if total is None else total + s
        correct = np.asarray(m[proto.SITE_CORRECT]) if correct is None else correct + np.asarray(m[proto.SITE_CORRECT])
        n = np.asarray(m[proto.SITE_N]) if n is None else n + np.asarray(m[proto.SITE_N])
    if total is None:
        total, correct, n = EvalStats.from_outputs(np.zeros((0, n_classes)), np.zeros(0, dtype=int)), np.zeros(0), np.zeros(0)
    return total, correct, n


def summarize_stats(total: EvalStats, correct: np.ndarray, n: np.ndarray, classes: list[str]) -> dict:
    m = metrics_from_stats(total, classes)
    k = int(np.trace(total.confusion))
    # percentile bootstrap of accuracy from the pooled counts (patients resampled with replacement)
    rng = np.random.default_rng(0)
    if total.n:
        lo, hi = np.percentile(rng.binomial(total.n, k / total.n, 2000) / total.n, [2.5, 97.5])
        m["accuracy_ci95"] = [float(lo), float(hi)]
    else:
        m["accuracy_ci95"] = [float("nan"), float("nan")]
    m["site_accuracy"] = [float(c / s) if s else float("nan") for c, s in zip(correct, n)]
    m["site_n"] = [int(x) for x in n]
    return m


def evaluate_aggr_fn(classes: list[str]):
    def fn(replies: list[RecordDict], weight_key: str) -> MetricRecord:
        total, correct, n = pooled_stats(replies, len(classes))
        s = summarize_stats(total, correct, n, classes)
        return MetricRecord({"accuracy": s["accuracy"], "macro-auc": s["macro_auc"], "ece": s["ece"],
                             "loss": s["loss"], "patients": float(s["n"]), "site-accuracy": s["site_accuracy"]})

    return fn


def pooled_retrieval(replies: list[RecordDict]) -> tuple[RetrievalStats, np.ndarray]:
    """CMR-CLIP: the sum of the sites' retrieval statistics and the patients per site; a reply whose
    numbers cannot be one evaluation's (ccmr_core.retrieval_stats.flat_problem) is left out."""
    total, n = RetrievalStats(), None
    for r in replies:
        if proto.is_refused(r):
            continue
        m = proto.reply_metrics(r)
        flat = {k[len(proto.RETRIEVAL_STATS):]: v for k, v in m.items() if k.startswith(proto.RETRIEVAL_STATS)}
        why = flat_problem(flat)
        site_n = np.asarray(m.get(proto.SITE_N, []), dtype=float)
        if why is None and not (np.isfinite(site_n).all() and site_n.sum() == flat["n"][0]):
            why = "its per-site counts do not add up to its total"
        if why:
            warn(log, f"retrieval statistics of a SuperNode left out: {why}")
            continue
        total = total + RetrievalStats.from_flat(flat)
        n = site_n if n is None else n + site_n
    return total, (np.zeros(0) if n is None else n)


def retrieval_summary(replies: list[RecordDict]) -> dict:
    """The pooled retrieval metrics with the patients each site contributed."""
    total, n = pooled_retrieval(replies)
    return {**total.summary(), "site_n": [int(x) for x in n]}


def retrieval_aggr_fn(replies: list[RecordDict], weight_key: str) -> MetricRecord:
    """A round's evaluation of a CMR-CLIP model at the sites, as the flat numbers a run log keeps."""
    s = retrieval_summary(replies)
    if not s["n"]:
        return MetricRecord({"patients": 0.0})
    r = s["retrieval"]
    zs = s["zero_shot_accuracy"]  # None where the label set has classes without prompts
    return MetricRecord({"loss": s["loss"], "patients": float(s["n"]),
                         "report-to-study-R@5": r["report_to_video"]["R@5"],
                         "study-to-report-R@5": r["video_to_report"]["R@5"], "chance-R@5": r["chance"]["R@5"],
                         **({"zero-shot-accuracy": zs} if zs is not None else {})})
