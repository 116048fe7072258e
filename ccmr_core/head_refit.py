"""Refit a trained model's diagnostic layer as linear discriminant analysis on its own features.

The encoder stays as trained; only the last linear layer (``classifier_modules``) is replaced by
the Gaussian generative classifier with one shared covariance (LDA) fitted on the features that
layer reads for the training patients with a known diagnosis. LDA's decision function is linear,
so the result is an ordinary ``nn.Linear``: MC dropout, temperature scaling, referral, export and
``ccmr predict`` work unchanged. A generative head fitted on class means is a classic remedy for
an overconfident softmax layer under distribution shift (Lee et al. 2018, "A simple unified
framework for detecting out-of-distribution samples").

The fit needs only sums over patients (per class: count and feature sum; the feature scatter),
so sites of a federation could send them and the coordinator add them up; the covariance is
shrunk by OAS (Chen et al. 2010), whose shrinkage is computed from the covariance itself (Ledoit-
Wolf's needs every sample).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ccmr_core.engine import core, mc_dropout, to_device
from ccmr_core.models.registry import model_inputs


@dataclass
class FeatureStats:
    """Sums over patients: per class the count and the feature sum, and the scatter sum x x^T."""

    counts: np.ndarray  # (C,)
    sums: np.ndarray  # (C, D)
    scatter: np.ndarray  # (D, D)

    @classmethod
    def of(cls, x: np.ndarray, y: np.ndarray, n_classes: int) -> "FeatureStats":
        sums = np.zeros((n_classes, x.shape[1]))
        np.add.at(sums, y, x)
        return cls(np.bincount(y, minlength=n_classes).astype(float), sums, x.T @ x)

    def __add__(self, other: "FeatureStats") -> "FeatureStats":
        return FeatureStats(self.counts + other.counts, self.sums + other.sums, self.scatter + other.scatter)


def lda_from_stats(stats: FeatureStats, shrink: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Weights (C, D) and biases (C,) of LDA with class priors in proportion to the counts and the
    pooled within-class covariance (maximum likelihood, as scikit-learn's), OAS-shrunk."""
    n, d = stats.counts.sum(), stats.sums.shape[1]
    means = stats.sums / stats.counts[:, None]
    cov = (stats.scatter - means.T @ stats.sums) / n  # sum x x^T - sum_k n_k mu_k mu_k^T, over n
    if shrink:
        mu, alpha = np.trace(cov) / d, np.mean(cov**2)
        den = (n + 1) * (alpha - mu**2 / d)
        s = 1.0 if den == 0 else min((alpha + mu**2) / den, 1.0)
        cov = (1 - s) * cov + s * mu * np.eye(d)
    w = np.linalg.lstsq(cov, means.T, rcond=None)[0].T
    b = -0.5 * np.sum(means * w, axis=1) + np.log(stats.counts / n)
    return w, b


def diagnostic_layer(model: nn.Module) -> nn.Linear:
    base = core(model)
    names = getattr(base, "classifier_modules", getattr(base, "head_modules", ()))
    layer = base.get_submodule(names[0]) if len(names) == 1 else None
    if not isinstance(layer, nn.Linear):
        raise ValueError(f"{getattr(base, 'name', type(base).__name__)} has no single linear diagnostic layer to refit")
    return layer


@torch.no_grad()
def layer_inputs(model: nn.Module, loader, device: torch.device, passes: int = 1,
                 dropout: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """What the diagnostic layer reads for each patient of ``loader``, and the labels: ``passes``
    rows per patient, with the model's dropout on (the MC-dropout passes of inference) or off."""
    m, seen, labels = core(model), [], []
    hook = diagnostic_layer(m).register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().cpu()))
    try:
        with mc_dropout(m, on=dropout):
            for batch in loader:
                batch = to_device(batch, device)
                h = m.embed(**model_inputs(m, batch, training=False))
                for _ in range(passes):
                    m.head(h)
                    labels.append(batch["label"].cpu())
    finally:
        hook.remove()
    return torch.cat(seen).double().numpy(), torch.cat(labels).numpy().astype(int)


def set_layer(model: nn.Module, w: np.ndarray, b: np.ndarray) -> None:
    layer = diagnostic_layer(model)
    with torch.no_grad():
        layer.weight.copy_(torch.as_tensor(w, dtype=layer.weight.dtype))
        layer.bias.copy_(torch.as_tensor(b, dtype=layer.bias.dtype))


def refit_lda(model: nn.Module, loader, device: torch.device, n_classes: int, passes: int = 10) -> dict:
    """Replace the diagnostic layer's weights by LDA fitted on ``loader``'s patients (give it the
    labelled ones only). The features are those of ``passes`` MC-dropout passes per patient, each
    weighing 1/passes: the covariance then holds the dropout noise MC inference will add, which a
    fit on clean features would amplify along its low-variance directions. Every class needs at
    least two patients."""
    x, y = layer_inputs(model, loader, device, passes, dropout=passes > 1)
    stats = FeatureStats.of(x, y, n_classes)
    stats = FeatureStats(stats.counts / passes, stats.sums / passes, stats.scatter / passes)
    if (stats.counts < 2).any():
        raise ValueError(f"LDA needs at least 2 training patients per class; counts {stats.counts.astype(int).tolist()} "
                         "(in the order of the classes): keep the trained layer or refit on more patients")
    set_layer(model, *lda_from_stats(stats))
    return {"patients": int(round(stats.counts.sum())), "per_class": stats.counts.round().astype(int).tolist(),
            "features": int(x.shape[1]), "dropout_passes": passes}
