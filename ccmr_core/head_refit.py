"""Refit a trained model's diagnostic layer as linear discriminant analysis on its own features.

The encoder stays as trained; only the last linear layer (``classifier_modules``) is replaced by
the Gaussian generative classifier with one shared covariance (LDA, shrunk by Ledoit-Wolf) fitted
on the features that layer reads for the training patients with a known diagnosis. LDA's
decision function is linear, so the result is an ordinary ``nn.Linear``: MC dropout, temperature
scaling, referral, export and ``ccmr predict`` work unchanged. A generative head fitted on class
means is a classic remedy for an overconfident softmax layer under distribution shift (Lee et al.
2018, "A simple unified framework for detecting out-of-distribution samples").
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from torch import nn

from ccmr_core.engine import core, mc_dropout, to_device
from ccmr_core.models.registry import model_inputs


def diagnostic_layer(model: nn.Module) -> nn.Linear:
    base = core(model)
    names = getattr(base, "classifier_modules", getattr(base, "head_modules", ()))
    layer = base.get_submodule(names[0]) if len(names) == 1 else None
    if not isinstance(layer, nn.Linear):
        raise ValueError(f"{getattr(base, 'name', type(base).__name__)} has no single linear diagnostic layer to refit")
    return layer


@torch.no_grad()
def layer_inputs(model: nn.Module, loader, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """What the diagnostic layer reads for each patient of ``loader`` (no dropout), and the labels."""
    m, seen, labels = core(model), [], []
    hook = diagnostic_layer(m).register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().cpu()))
    try:
        with mc_dropout(m, on=False):
            for batch in loader:
                batch = to_device(batch, device)
                m.head(m.embed(**model_inputs(m, batch, training=False)))
                labels.append(batch["label"].cpu())
    finally:
        hook.remove()
    return torch.cat(seen).double().numpy(), torch.cat(labels).numpy().astype(int)


def refit_lda(model: nn.Module, loader, device: torch.device, n_classes: int) -> dict:
    """Replace the diagnostic layer's weights by LDA fitted on ``loader``'s patients (labelled ones
    only). Every class needs at least two patients."""
    x, y = layer_inputs(model, loader, device)
    counts = np.bincount(y, minlength=n_classes)
    if (counts < 2).any():
        raise ValueError(f"LDA needs at least 2 training patients per class; counts {counts.tolist()} (in the "
                         "order of the classes): keep the trained layer or refit on more patients")
    lda = LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto").fit(x, y)
    w, b = lda.coef_, lda.intercept_
    if n_classes == 2:  # sklearn gives one discriminant for two classes: split it into two logits
        w, b = np.vstack([-w / 2, w / 2]), np.r_[-b / 2, b / 2]
    layer = diagnostic_layer(model)
    with torch.no_grad():
        layer.weight.copy_(torch.as_tensor(w, dtype=layer.weight.dtype))
        layer.bias.copy_(torch.as_tensor(b, dtype=layer.bias.dtype))
    return {"patients": int(len(y)), "per_class": counts.tolist(), "features": int(x.shape[1])}
