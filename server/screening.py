"""Update validation and robust aggregation at the coordinator (ccmr_core has no Flower; this does).

Before a round's updates are averaged, each is checked against the global model that was sent:
the same parameter names, shapes and dtypes, only finite numbers, and an update norm
||w_site - w_global|| not far beyond the others' (more than ``max_ratio`` times the median of the
other sites' update norms). The weight a site claims for itself (its training patients) is
checked too: a finite number, at most ``max_weight``, and at most ``max_ratio`` times the median
of the other sites' weights; otherwise one site could own the mean with an honest-looking update
and a huge count. A rejected update is left out and logged with its reason; the global model is
computed from the rest, so one broken or hostile site cannot move it.

``Screening`` applies these checks to a round's replies (server/strategy.py); what bounds a site
that passes them is the aggregator (``federated.aggregator``: Flower's FedMedian or FedTrimmedAvg).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, Message

from protocol import messages as proto


@dataclass
class Rejection:
    node_id: int
    reason: str


def _arrays(rec: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in rec.items()}


def check_shapes(update: dict[str, np.ndarray], reference: dict[str, np.ndarray], *, subset: bool = False
                 ) -> str | None:
    """Why ``update`` is not an array set of ``reference``'s names, shapes and dtypes with finite
    values, or None. ``reference``'s values need only a shape and a dtype; ``subset``: some of its
    names may be missing (a SCAFFOLD control variate covers the trained parameters only)."""
    missing, extra = sorted(set(reference) - set(update)), sorted(set(update) - set(reference))
    if extra or (missing and not subset):
        return (f"parameter names differ from the global model (missing {missing[:3]}, unexpected {extra[:3]})")
    for k, v in update.items():
        ref = reference[k]
        if v.shape != ref.shape:
            return f"parameter {k} has shape {tuple(v.shape)}, the global model's is {tuple(ref.shape)}"
        if v.dtype != ref.dtype:
            return f"parameter {k} has dtype {v.dtype}, the global model's is {ref.dtype}"
        if np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all():
            return f"parameter {k} holds NaN or Inf"
    return None


def update_norm(update: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(float(((update[k].astype(np.float64) - reference[k]) ** 2).sum())
                             for k in reference if np.issubdtype(reference[k].dtype, np.floating))))


def screen(updates: list[tuple[int, ArrayRecord]], reference: ArrayRecord, max_ratio: float = 10.0,
           weights: list[float] | None = None, max_weight: float = float("inf")) -> tuple[list[int], list[Rejection]]:
    """Indices of the updates to keep, and the rejections with reasons (``weights``: what each
    site claims its update weighs in the mean)."""
    ref = _arrays(reference)
    w = [1.0] * len(updates) if weights is None else [float(x) for x in weights]
    keep, rejected, norms = [], [], {}
    for i, (node, rec) in enumerate(updates):
        upd = _arrays(rec)
        why = check_shapes(upd, ref)
        if why is None and not (np.isfinite(w[i]) and 0 <= w[i] <= max_weight):
            why = f"weight {w[i]:g} is not a count between 0 and the federation's limit {max_weight:g}"
        if why:
            rejected.append(Rejection(node, why))
            continue
        norms[i] = update_norm(upd, ref)
        keep.append(i)
    for name, values, fmt in (("update norm", norms, ".3g"), ("weight", dict(enumerate(w)), "g")):
        if len(keep) < 2:
            break
        final = []
        for i in keep:
            others = np.median([values[j] for j in keep if j != i])
            if others > 0 and values[i] > max_ratio * others:
                rejected.append(Rejection(updates[i][0], f"{name} {values[i]:{fmt}} is {values[i] / others:.0f}x the "
                                                        f"median of the other sites' ({others:{fmt}}; limit {max_ratio:g}x)"))
            else:
                final.append(i)
        keep = final
    return keep, rejected


def _model(reply: Message) -> ArrayRecord:
    """The model a reply carries: its "arrays" record (a SCAFFOLD reply also carries "control")."""
    records = reply.content.array_records
    return records["arrays"] if "arrays" in records else next(iter(records.values()))


@dataclass(frozen=True)
class Screening:
    """The checks a round's updates pass before they are averaged (``federated.max_update_ratio``,
    ``federated.max_site_weight``)."""

    max_update_ratio: float = 10.0
    max_site_weight: float = 1000.0

    def apply(self, replies: list[Message], sent: ArrayRecord | None, weight_key: str
              ) -> tuple[list[Message], list[Rejection]]:
        """The replies without the rejected updates (replies without a model pass through), and
        the rejections with their reasons."""
        with_arrays = [r for r in replies if r.has_content() and r.content.array_records]
        if sent is None or not with_arrays:
            return replies, []
        updates = [(r.metadata.src_node_id, _model(r)) for r in with_arrays]
        weights = [float(proto.reply_metrics(r.content).get(weight_key, float("nan"))) for r in with_arrays]
        keep, rejected = screen(updates, sent, self.max_update_ratio, weights, self.max_site_weight)
        bad = {id(with_arrays[i]) for i in range(len(with_arrays)) if i not in keep}
        return [r for r in replies if id(r) not in bad], rejected
