"""A video-report model's evaluation at one site, as counts and sums that add up across sites
(the CMR-CLIP twin of ``metrics.EvalStats``): what a site may send about its studies and reports,
never an embedding, a rank list or a patient's output.

Each site retrieves within its own gallery (its patients of the split): recall@K is pooled as
hits over queries, chance as the hits a random ranking would expect (min(K, gallery) per query),
the mean rank from rank sums. Median ranks and per-finding AUCs do not pool from counts; the
coordinator reports without them (a simulation evaluates them centrally on the final model).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.special import logsumexp

from ccmr_core.retrieval import class_precision_at_k, ranks, zero_shot_classes

KS = (1, 5, 10)
PRECISION_K = 5
_SIZES = {"n": 1, "galleries": 1, "loss_sum": 1, "v2t_hits": len(KS), "t2v_hits": len(KS), "chance_hits": len(KS),
          "v2t_rank_sum": 1, "t2v_rank_sum": 1, "class_precision_sum": 1, "zero_shot_correct": 1,
          "zero_shot_n": 1}
_NOT_COUNTS = ("loss_sum", "chance_hits", "class_precision_sum")


def flat_sizes() -> dict[str, int]:
    """The length of each array of ``RetrievalStats.to_flat`` (the egress allow-list's sizes)."""
    return dict(_SIZES)


def _vec(x=None, size: int = 1) -> np.ndarray:
    return np.zeros(size) if x is None else np.asarray(x, dtype=float).reshape(size)


@dataclass
class RetrievalStats:
    n: float = 0.0  # patients with a report (queries each way)
    galleries: float = 0.0  # sites whose gallery is in the sums
    loss_sum: float = 0.0  # symmetric InfoNCE over each site's gallery, summed over patients
    v2t_hits: np.ndarray = field(default_factory=lambda: np.zeros(len(KS)))  # study -> report, rank <= K
    t2v_hits: np.ndarray = field(default_factory=lambda: np.zeros(len(KS)))  # report -> study
    chance_hits: np.ndarray = field(default_factory=lambda: np.zeros(len(KS)))  # expected under a random ranking
    v2t_rank_sum: float = 0.0
    t2v_rank_sum: float = 0.0
    class_precision_sum: float = 0.0  # per report: share of its 5 nearest studies with its diagnosis
    zero_shot_correct: float = 0.0  # studies whose class prompt scores highest is their diagnosis
    zero_shot_n: float = 0.0  # studies scored zero-shot (none where a class of the label set has no prompts)

    @classmethod
    def from_embeddings(cls, video: np.ndarray, text: np.ndarray, labels: np.ndarray, class_emb: list[np.ndarray],
                        temperature: float) -> "RetrievalStats":
        """One gallery: L2-normalised study and report embeddings (pairs by row), the diagnoses,
        and each class's prompt embeddings."""
        n = len(video)
        if n == 0:
            return cls()
        sim = video @ text.T
        v2t, t2v = ranks(sim), ranks(sim.T)
        logits = sim / temperature
        loss = (logsumexp(logits, 1) + logsumexp(logits, 0)) / 2 - np.diag(logits)  # losses.clip_loss per patient
        zs = zero_shot_classes(video, class_emb).argmax(1) if class_emb else np.full(n, -1)
        return cls(n=float(n), galleries=1.0, loss_sum=float(loss.sum()),
                   v2t_hits=np.array([(v2t <= q).sum() for q in KS], dtype=float),
                   t2v_hits=np.array([(t2v <= q).sum() for q in KS], dtype=float),
                   chance_hits=np.array([float(min(q, n)) for q in KS]),
                   v2t_rank_sum=float(v2t.sum()), t2v_rank_sum=float(t2v.sum()),
                   class_precision_sum=class_precision_at_k(sim, labels, min(PRECISION_K, n)) * n,
                   zero_shot_correct=float((zs == labels).sum()), zero_shot_n=float(n if class_emb else 0))

    def __add__(self, o: "RetrievalStats") -> "RetrievalStats":
        return RetrievalStats(**{k: getattr(self, k) + getattr(o, k) for k in _SIZES})

    def to_flat(self) -> dict[str, list[float]]:
        return {k: _vec(getattr(self, k), size).tolist() for k, size in _SIZES.items()}

    @classmethod
    def from_flat(cls, d: dict) -> "RetrievalStats":
        v = {k: _vec(d.get(k), size) for k, size in _SIZES.items()}
        return cls(**{k: (a if _SIZES[k] > 1 else float(a[0])) for k, a in v.items()})

    def summary(self) -> dict:
        """Pooled metrics, in the form of a central evaluation's (ccmr_core/clip_training.py) where
        they pool: recall@K both ways with chance, mean rank, class precision@5, zero-shot accuracy."""
        if not self.n:
            return {"n": 0}
        n = self.n

        def way(hits, rank_sum):
            return {**{f"R@{q}": float(h / n) for q, h in zip(KS, hits)}, "mean_rank": float(rank_sum / n)}

        return {"n": int(n), "galleries": int(self.galleries), "loss": float(self.loss_sum / n),
                "retrieval": {"gallery": float(n / max(self.galleries, 1)), "pooled_over_sites": int(self.galleries),
                              "video_to_report": way(self.v2t_hits, self.v2t_rank_sum),
                              "report_to_video": way(self.t2v_hits, self.t2v_rank_sum),
                              "chance": {f"R@{q}": float(c / n) for q, c in zip(KS, self.chance_hits)}},
                f"class_precision@{PRECISION_K}": float(self.class_precision_sum / n),
                "zero_shot_accuracy": float(self.zero_shot_correct / self.zero_shot_n) if self.zero_shot_n else None}


def flat_problem(d: dict) -> str | None:
    """Why numbers received from a site cannot be one evaluation's retrieval statistics, or None
    (a site could otherwise steer the pooled figures with counts no gallery produces)."""
    a = {}
    for k, size in _SIZES.items():
        v = np.asarray(d.get(k, []), dtype=float).ravel()
        if v.size != size:
            return f"{k} has {v.size} values, expected {size}"
        if not np.isfinite(v).all() or (v < 0).any():
            return f"{k} holds a negative or non-finite value"
        if k not in _NOT_COUNTS and not np.array_equal(v, np.round(v)):
            return f"{k} holds a value that is not a count"
        a[k] = v
    n = a["n"][0]
    for k in ("v2t_hits", "t2v_hits", "chance_hits"):
        if (a[k] > n).any() or (np.diff(a[k]) < 0).any():
            return f"{k} exceeds the {n:g} queries or falls as K grows"
    if a["galleries"][0] > n or (n and not a["galleries"][0]):
        return "the number of galleries does not fit the number of patients"
    for k in ("v2t_rank_sum", "t2v_rank_sum"):
        if a[k][0] < n:
            return f"{k} is below the number of queries (every rank is at least 1)"
    if a["class_precision_sum"][0] > n or a["zero_shot_n"][0] > n or a["zero_shot_correct"][0] > a["zero_shot_n"][0]:
        return "a per-patient count exceeds the number of patients (or zero-shot hits the studies scored)"
    return None
