"""A deep ensemble: several trained classifiers read the same study and their calibrated
probabilities are averaged (Lakshminarayanan et al. 2017).

Members keep their own weights and calibration temperatures; the ensemble is never trained (it is
made from finished runs by ``ccmr ensemble``, ``ccmr_core/ensemble.py``). Every inference pass
reads each member once, so epistemic uncertainty (the mutual information of ``engine.predict``)
counts the members' disagreement as well as each member's MC-dropout spread.

The interface is the one inference uses: ``embed`` (the deterministic part, one feature per
member), ``head`` (the log of the mean calibrated probability, so that ``softmax(head)`` is the
ensemble's probability; ``calibration`` stays 1), ``pass_probs`` (one pass: each member's
probabilities) and ``measure`` (the members' mean estimate, when every member makes one).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class DeepEnsemble(nn.Module):
    name = "ensemble"

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least two members, got {len(members)}")
        inputs = {tuple(m.inputs) for m in members}
        if len(inputs) != 1:
            raise ValueError(f"the members read different inputs ({sorted(inputs)}); an ensemble's members read the same")
        self.members = nn.ModuleList(members)
        self.inputs = inputs.pop()
        self.requires_lge = any(getattr(m, "requires_lge", False) for m in members)
        self.register_buffer("calibration", torch.ones(()))  # the members' own temperatures apply

    def embed(self, cine=None, lge=None, bio=None) -> tuple[torch.Tensor, ...]:
        return tuple(m.embed(cine=cine, lge=lge, bio=bio) for m in self.members)

    def _logits(self, hs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """(members, B, classes): each member's logits over its own calibration temperature."""
        return torch.stack([m.head(h) / m.calibration for m, h in zip(self.members, hs)])

    def pass_probs(self, hs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """(members, B, classes): each member's calibrated probabilities for one pass."""
        return F.softmax(self._logits(hs), dim=-1)

    def head(self, hs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """log of the members' mean calibrated probability (B, classes)."""
        return torch.logsumexp(F.log_softmax(self._logits(hs), dim=-1), 0) - math.log(len(self.members))

    def measure(self, hs: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
        est = [m.measure(h) if hasattr(m, "measure") else None for m, h in zip(self.members, hs)]
        return None if any(e is None for e in est) else torch.stack(est).mean(0)

    def forward(self, cine=None, lge=None, bio=None) -> dict:
        return {"logits": self.head(self.embed(cine, lge, bio))}
