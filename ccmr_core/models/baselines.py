"""Literature baselines on the same engine, data and metrics.

* ``cine-only``: CNN-LSTM on cine, classification only (the contrast-free state of the art that
  CC-CMR reports beating by 4.3 accuracy points).
* ``dual-path``: CNN-LSTM on cine + MLP on biomechanical time series (intraventricular pressure
  gradients and wall-motion dynamics), fused before the classifier (the IVPG paper's design).
* ``lge-only``: an LGE encoder; the upper reference that needs gadolinium. Patients without LGE
  take no part in its training or evaluation.
"""

from __future__ import annotations

import torch
from torch import nn

from ccmr_core.losses import diagnosis_loss

from ccmr_core.models.encoders import CNNLSTMEncoder, LGEEncoder


class Classifier(nn.Module):
    """What every model shares: a calibration temperature for its logits (set on validation data
    after training; 1 until then), a buffer so that it travels with the weights."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calibration", torch.ones(()))

    # head fine-tuning on precomputed views (ccmr_core/frozen_views.py): the encoder is frozen,
    # so what it makes of a patient's view can be computed once; ``head`` trains on it
    def frozen_outputs(self, **inputs) -> dict:
        return {"h": self.embed(**inputs)}

    def head_outputs(self, frozen: dict) -> dict:
        return {"logits": self.head(frozen["h"])}


class CineOnly(Classifier):
    name = "cine-only"
    inputs = ("cine",)
    head_modules = ("cls",)

    def __init__(self, n_classes: int, slices: int, width: int = 8, dim: int = 128, dropout: float = 0.2):
        super().__init__()
        self.cine = CNNLSTMEncoder(slices, width, dim)
        self.drop = nn.Dropout(dropout)
        self.cls = nn.Linear(dim, n_classes)

    def embed(self, cine, lge=None, bio=None):
        return self.cine(cine)

    def head(self, h):
        return self.cls(self.drop(h))

    def forward(self, cine=None, lge=None, bio=None, frozen=None) -> dict:
        if frozen is not None:
            return self.head_outputs(frozen)
        return {"logits": self.head(self.embed(cine))}

    def losses(self, out, batch):
        ce, _ = diagnosis_loss(out["logits"], batch)
        return ce, {"cls": ce}


class DualPath(Classifier):
    name = "dual-path"
    inputs = ("cine", "bio")
    head_modules = ("cls",)

    def __init__(self, n_classes: int, slices: int, width: int = 8, dim: int = 128, dropout: float = 0.2,
                 bio_channels: int = 4, bio_length: int = 32):
        super().__init__()
        self.cine = CNNLSTMEncoder(slices, width, dim)
        self.bio = nn.Sequential(nn.Linear(bio_channels * bio_length, dim), nn.SiLU(), nn.Linear(dim, dim), nn.LayerNorm(dim))
        self.drop = nn.Dropout(dropout)
        self.cls = nn.Linear(2 * dim, n_classes)

    def embed(self, cine, lge=None, bio=None):
        hc = self.cine(cine)
        hb = self.bio(bio.flatten(1)) if bio is not None else torch.zeros_like(hc)
        return torch.cat([hc, hb], dim=-1)

    def head(self, h):
        return self.cls(self.drop(h))

    def forward(self, cine=None, lge=None, bio=None, frozen=None) -> dict:
        if frozen is not None:
            return self.head_outputs(frozen)
        return {"logits": self.head(self.embed(cine, bio=bio))}

    def losses(self, out, batch):
        ce, _ = diagnosis_loss(out["logits"], batch)
        return ce, {"cls": ce}


class LGEOnly(Classifier):
    name = "lge-only"
    inputs = ("lge",)
    requires_lge = True
    head_modules = ("cls",)

    def __init__(self, n_classes: int, slices: int, width: int = 8, dim: int = 128, dropout: float = 0.2):
        super().__init__()
        self.lge = LGEEncoder(slices, width, dim)
        self.drop = nn.Dropout(dropout)
        self.cls = nn.Linear(dim, n_classes)

    def embed(self, cine=None, lge=None, bio=None):
        return self.lge(lge)[1]

    def head(self, h):
        return self.cls(self.drop(h))

    def forward(self, cine=None, lge=None, bio=None, frozen=None) -> dict:
        if frozen is not None:
            return self.head_outputs(frozen)
        return {"logits": self.head(self.embed(lge=lge))}

    def losses(self, out, batch):
        ce = diagnosis_loss(out["logits"], batch)[0] * batch["has_lge"].float()
        return ce, {"cls": ce}
