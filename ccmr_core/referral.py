"""When a human must read the study: thresholds on confidence and epistemic uncertainty, set on
validation data and stored in the model file.

The rule is stated in one number, ``fraction``: at most that share of the validation patients
would have been referred. The budget is split between the two signals: the least confident
``fraction / 2`` and the most uncertain ``fraction / 2`` (without uncertainty, the least confident
``fraction``). The thresholds come from counts (``EvalStats``: one histogram per signal), so a
federated run sets them from the sites' pooled validation statistics without seeing a single
patient's output; with bin-level resolution (upper bin edge for uncertainty, lower bin edge for
confidence) each signal refers at most its half, and the two together at most ``fraction``.
"""

from __future__ import annotations

import numpy as np

from ccmr_core.metrics import N_BINS, EvalStats, uncertainty_edges

DEFAULT_FRACTION = 0.2


def thresholds_from_stats(stats: EvalStats, n_classes: int, fraction: float = DEFAULT_FRACTION) -> dict:
    """{"confidence": c, "uncertainty": u, ...}: refer when confidence < c or uncertainty > u."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"refer fraction must be in (0, 1), got {fraction}")
    if stats.n == 0:
        raise ValueError("no validation patients to set the referral thresholds from")
    unc = stats.unc_correct + stats.unc_wrong
    share = fraction / 2 if unc.sum() else fraction  # each signal's part of the budget
    conf_edges = np.linspace(0.0, 1.0, N_BINS + 1)
    below = np.cumsum(stats.calib_count)  # patients with confidence under each bin's upper edge
    k = int(np.searchsorted(below, share * stats.n, side="right"))  # first bin that would exceed
    confidence = float(conf_edges[min(k, N_BINS)])
    out = {"fraction": fraction, "confidence": confidence, "uncertainty": None, "validation_n": int(stats.n)}
    if unc.sum():
        above = np.cumsum(unc[::-1])  # patients at or above each bin, from the top
        j = int(np.searchsorted(above, share * unc.sum(), side="right"))
        edges = uncertainty_edges(n_classes)
        out["uncertainty"] = float(edges[len(unc) - j])  # refer strictly above this edge
    return out


def thresholds_from_outputs(probs: np.ndarray, labels: np.ndarray, uncertainty: np.ndarray | None,
                            fraction: float = DEFAULT_FRACTION) -> dict:
    return thresholds_from_stats(EvalStats.from_outputs(probs, labels, uncertainty=uncertainty), probs.shape[1],
                                 fraction)


def referred(confidence: np.ndarray, uncertainty: np.ndarray | None, thresholds: dict) -> np.ndarray:
    """Which patients the rule refers (vectorised :func:`refer`)."""
    out = np.asarray(confidence) < thresholds["confidence"]
    u = thresholds.get("uncertainty")
    if u is not None and uncertainty is not None:
        out = out | (np.asarray(uncertainty) > u)
    return out


def refer(confidence: float, uncertainty: float | None, thresholds: dict | None) -> tuple[bool, list[str]]:
    """(refer?, reasons in words)."""
    if not thresholds:
        return True, ["the model file holds no referral thresholds (train it with this version); read every study"]
    reasons = []
    if confidence < thresholds["confidence"]:
        reasons.append(f"confidence {confidence:.2f} is below {thresholds['confidence']:.2f}")
    u = thresholds.get("uncertainty")
    if u is not None and uncertainty is not None and uncertainty > u:
        reasons.append(f"epistemic uncertainty {uncertainty:.4f} is above {u:.4f}")
    return bool(reasons), reasons
