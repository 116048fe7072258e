"""SCAFFOLD's drift correction (Karimireddy et al. 2020) for one site's local training.

Each site keeps a control variate c_i, its own estimate of the gradient of its local loss; the
coordinator keeps c, their weighted mean. During a round every local gradient is shifted by
c - c_i, so a site steps along (its gradient) - (its usual pull) + (the federation's usual pull)
and drifts less towards its own optimum. After the round the site's new c_i is the mean of the raw
gradients of its steps: for plain SGD that is exactly SCAFFOLD's option II,
c_i - c + (x - y_i) / (K lr); written as a mean of gradients it does not depend on the optimiser
(the sites here use AdamW).

Tensors are keyed by parameter name; a parameter that is frozen in this stage has no gradient, is
not shifted and keeps its previous c_i.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class DriftCorrection:
    """``after_backward`` hook for ccmr_core.engine.train_epoch: records each trainable parameter's
    raw gradient, then adds ``global_c - local_c`` to it. ``new_local()`` after the round: the
    site's next c_i. Missing entries count as zero (the first round: plain local training)."""

    def __init__(self, model: nn.Module, global_c: dict[str, torch.Tensor] | None = None,
                 local_c: dict[str, torch.Tensor] | None = None):
        global_c, local_c = global_c or {}, local_c or {}
        self.params = {k: p for k, p in model.named_parameters() if p.requires_grad}
        self.previous = {k: v.detach().clone() for k, v in local_c.items()}
        self.shift: dict[str, torch.Tensor] = {}
        for k, p in self.params.items():
            g, c = global_c.get(k), local_c.get(k)
            for name, t in (("coordinator's", g), ("site's", c)):
                if t is not None and tuple(t.shape) != tuple(p.shape):
                    raise ValueError(f"the {name} control variate for {k!r} has shape {tuple(t.shape)}, the "
                                     f"parameter {tuple(p.shape)}")
            if g is None and c is None:
                continue
            s = (g if g is not None else 0) - (c if c is not None else 0)
            s = torch.as_tensor(s, dtype=p.dtype).to(p.device)
            if not bool(torch.isfinite(s).all()):
                raise ValueError(f"the control variate for {k!r} is not finite")
            self.shift[k] = s
        self.sums = {k: torch.zeros_like(p) for k, p in self.params.items()}
        self.counts = {k: 0 for k in self.params}

    def __call__(self) -> None:
        for k, p in self.params.items():
            if p.grad is None:
                continue
            self.sums[k] += p.grad.detach()
            self.counts[k] += 1
            if k in self.shift:
                p.grad += self.shift[k]

    def new_local(self) -> dict[str, torch.Tensor]:
        """The site's next c_i (CPU tensors): the mean raw gradient of each parameter that trained
        this round, the previous c_i for the others."""
        out = {k: v.cpu() for k, v in self.previous.items()}
        out.update({k: (self.sums[k] / self.counts[k]).cpu() for k in self.params if self.counts[k]})
        return out

    def change(self) -> dict[str, torch.Tensor]:
        """The change of the site's c_i this round (what SCAFFOLD sends the coordinator), for
        the parameters that trained."""
        new = self.new_local()
        return {k: new[k] - self.previous[k] if k in self.previous else new[k]
                for k in self.params if self.counts[k]}

    def shift_norm(self) -> float:
        """The L2 norm of the applied shift c - c_i over all parameters (for the site's log)."""
        return math.sqrt(sum(float(s.pow(2).sum()) for s in self.shift.values()))
