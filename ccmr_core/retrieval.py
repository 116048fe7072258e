"""What a video-report model is worth: retrieval both ways, class-aware precision@K, zero-shot
findings and diagnoses from prompts, few-shot prototypes and a linear probe on frozen embeddings
(the evaluation of CMR-CLIP, Makiya11/CMRCLIP). Embeddings are L2-normalised numpy arrays.
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.metrics import roc_auc_score

# Prompts per finding (positives only, as CMR-CLIP scores a finding by mean similarity to them);
# worded as a reader would, not copied from any one site's template.
FINDING_PROMPTS = {
    "lv_dysfunction": ["severely reduced LV systolic function", "moderately reduced LV systolic function",
                       "LVEF 30%", "reduced ejection fraction"],
    "lv_dilation": ["dilated left ventricle", "the left ventricle is severely dilated", "LVEDV 250 mL",
                    "moderately dilated LV"],
    "lv_hypertrophy": ["LV hypertrophy", "asymmetric septal hypertrophy", "concentric hypertrophy, maximum 18 mm",
                       "max WT 20mm"],
    "lge_present": ["late gadolinium enhancement", "subendocardial late gadolinium enhancement",
                    "mid-wall late gadolinium enhancement", "patchy late gadolinium enhancement"],
    "rv_dysfunction": ["severely reduced RV function", "RVEF 25%", "dilated RV with reduced function"],
    "rwma": ["regional wall motion abnormality", "akinesis of the anterior segments",
             "hypokinesis of the inferior segments"],
}
# The negation of each finding, for scoring a finding against its absence (CheXzero's positive vs
# negative prompts, Tiu et al. 2022). Not the default: a text encoder trained from scratch on a
# few hundred reports places "no X" close to "X" (BENCHMARKS, CMR-CLIP block, measured both ways).
FINDING_NEGATIVE_PROMPTS = {
    "lv_dysfunction": ["normal LV systolic function", "preserved ejection fraction", "LVEF 65%"],
    "lv_dilation": ["normal LV size", "the left ventricle is normal size", "LVEDV 120 mL"],
    "lv_hypertrophy": ["normal wall thickness", "maximum wall thickness 8 mm"],
    "lge_present": ["no late gadolinium enhancement", "no LGE", "no myocardial scar"],
    "rv_dysfunction": ["normal RV function", "RVEF 55%"],
    "rwma": ["no regional wall motion abnormality", "normal regional wall motion"],
}
CLASS_PROMPTS = {
    "NOR": ["normal cardiac MRI", "normal study", "no abnormality described"],
    "MINF": ["prior myocardial infarction", "subendocardial late gadolinium enhancement in the LAD territory",
             "regional wall motion abnormality with transmural scar"],
    "DCM": ["dilated cardiomyopathy", "severely dilated LV with severely reduced systolic function"],
    "HCM": ["hypertrophic cardiomyopathy", "asymmetric septal hypertrophy"],
    "ARV": ["arrhythmogenic right ventricular cardiomyopathy", "dilated RV with severely reduced RV function"],
}


def ranks(sim: np.ndarray) -> np.ndarray:
    """1-based rank of the true item (the diagonal) in each row of ``sim`` (queries x gallery)."""
    true = np.diag(sim)[:, None]
    return 1 + (sim > true).sum(1)


def retrieval(sim: np.ndarray, ks: tuple[int, ...] = (1, 5, 10)) -> dict:
    """``sim[i, j]``: similarity of study i and report j (pairs on the diagonal). Both ways:
    recall@K, median and mean rank, the gallery size and chance recall@K (K / gallery)."""
    n = len(sim)
    out = {"gallery": n}
    for name, s in (("video_to_report", sim), ("report_to_video", sim.T)):
        r = ranks(s)
        out[name] = {**{f"R@{k}": float((r <= k).mean()) for k in ks},
                     "median_rank": float(np.median(r)), "mean_rank": float(r.mean())}
    out["chance"] = {f"R@{k}": min(1.0, k / n) for k in ks}
    return out


def class_precision_at_k(sim: np.ndarray, labels: np.ndarray, k: int = 5) -> float:
    """Report -> study: the share of each report's top-K studies that have the report's diagnosis."""
    top = np.argsort(-sim.T, axis=1)[:, :k]
    return float((labels[top] == labels[:, None]).mean())


def prompt_scores(video: np.ndarray, prompt_emb: np.ndarray) -> np.ndarray:
    """Mean cosine similarity of each study with a set of prompt embeddings."""
    return (video @ prompt_emb.T).mean(1)


def finding_aucs(video: np.ndarray, prompt_emb: dict[str, np.ndarray], truth: dict[str, list]) -> dict:
    """AUC per finding of its prompt score, over the patients whose truth is known (None: unknown);
    a finding with one class only among them gets None."""
    out = {}
    for f, emb in prompt_emb.items():
        y = np.array([np.nan if v is None else float(v) for v in truth[f]])
        known = ~np.isnan(y)
        s = prompt_scores(video[known], emb)
        pos = int(y[known].sum())
        out[f] = {"auc": float(roc_auc_score(y[known], s)) if 0 < pos < known.sum() else None,
                  "positives": pos, "n": int(known.sum())}
    return out


def zero_shot_classes(video: np.ndarray, class_emb: list[np.ndarray]) -> np.ndarray:
    """(N, C) softmax-free class scores: mean similarity to each class's prompts."""
    return np.stack([prompt_scores(video, e) for e in class_emb], 1)


def prototype_probe(train: np.ndarray, train_y: np.ndarray, test: np.ndarray, shots: int, n_classes: int,
                    rng: np.random.Generator) -> np.ndarray:
    """Predicted classes from ``shots`` labelled studies per class: nearest class mean (cosine)."""
    protos = []
    for c in range(n_classes):
        idx = np.flatnonzero(train_y == c)
        pick = rng.choice(idx, size=min(shots, len(idx)), replace=False)
        p = train[pick].mean(0)
        protos.append(p / max(np.linalg.norm(p), 1e-12))
    return (test @ np.stack(protos).T).argmax(1)


def linear_probe(train: np.ndarray, train_y: np.ndarray, test: np.ndarray, c: float = 1.0) -> np.ndarray:
    """Predicted classes of a multinomial logistic regression on the frozen embeddings, each
    dimension standardised on the training embeddings first (unit-norm embeddings differ by little
    per dimension, and an unscaled L2 penalty would flatten them)."""
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000))
    clf.fit(train, train_y)
    return clf.predict(test)
