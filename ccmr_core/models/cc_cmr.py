"""CC-CMR: cine and LGE encoders aligned by cross-modal contrastive learning, a feature
interaction module, an uncertainty-weighted multi-task loss; diagnosis from cine alone.

Training (LGE available for some patients):
  * ``cls``: the diagnostic head on cine features only (the one used at inference);
  * ``align``: contrastive alignment of cine and LGE embeddings (in-batch patients, or the
    patient's own slices under DP);
  * ``joint``: a head on the fused cine+LGE features from the interaction module, so LGE shapes
    the cine encoder through the shared fusion;
  * ``distill``: the cine head learns to match the joint head's softened predictions, which
    carries what LGE makes obvious into the cine-only path.
Inference: ``forward(cine)`` runs the cine encoder and the cine head only; the LGE branch is
never called, so LGE on disk cannot change a prediction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ccmr_core.losses import clip_loss, distillation_loss, slice_alignment_loss
from ccmr_core.models.blocks import TaskWeighting, Temperature
from ccmr_core.models.encoders import CineEncoder, LGEEncoder


class GatedInteraction(nn.Module):
    """Feature interaction: each modality gates how much of the other enters the fused feature."""

    def __init__(self, dim: int):
        super().__init__()
        self.gate = nn.Linear(2 * dim, dim)
        self.cine = nn.Linear(dim, dim)
        self.lge = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, hc: torch.Tensor, hl: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(self.gate(torch.cat([hc, hl], dim=-1)))
        return self.norm(g * self.cine(hc) + (1 - g) * self.lge(hl))


class CCCMR(nn.Module):
    name = "cc-cmr"
    inputs = ("cine",)
    tasks = ["cls", "align", "joint", "distill"]

    def __init__(self, n_classes: int, slices: int, width: int = 16, dim: int = 128, proj: int = 64,
                 dropout: float = 0.2, alignment: str = "batch", temperature: float = 0.07,
                 learn_temperature: bool = True):
        super().__init__()
        self.alignment = alignment
        self.cine = CineEncoder(slices, width, dim)
        self.lge = LGEEncoder(slices, width, dim)
        self.proj_cine = nn.Linear(dim, proj)
        self.proj_lge = nn.Linear(dim, proj)
        self.temperature = Temperature(temperature, learn_temperature)
        self.interaction = GatedInteraction(dim)
        self.drop = nn.Dropout(dropout)
        self.cls = nn.Linear(dim, n_classes)
        self.cls_joint = nn.Linear(dim, n_classes)
        self.weighting = TaskWeighting(self.tasks)

    def embed(self, cine: torch.Tensor, lge=None, bio=None) -> torch.Tensor:
        """The patient feature the diagnostic head reads: cine only."""
        return self.cine(cine)[1]

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.cls(self.drop(h))

    def forward(self, cine: torch.Tensor, lge: torch.Tensor | None = None, bio: torch.Tensor | None = None) -> dict:
        fc, hc = self.cine(cine)
        out = {"logits": self.head(hc)}
        if lge is None:
            return out
        fl, hl = self.lge(lge)
        if self.alignment == "slice":
            out["zc"] = F.normalize(self.proj_cine(fc), dim=-1)
            out["zl"] = F.normalize(self.proj_lge(fl), dim=-1)
        else:
            out["zc"] = F.normalize(self.proj_cine(hc), dim=-1)
            out["zl"] = F.normalize(self.proj_lge(hl), dim=-1)
        out["logits_joint"] = self.cls_joint(self.drop(self.interaction(hc, hl)))
        return out

    def losses(self, out: dict, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        y, has = batch["label"], batch["has_lge"].float()
        align_fn = slice_alignment_loss if self.alignment == "slice" else clip_loss
        parts = {
            "cls": F.cross_entropy(out["logits"], y, reduction="none"),
            "align": align_fn(out["zc"], out["zl"], self.temperature, batch["has_lge"]),
            "joint": F.cross_entropy(out["logits_joint"], y, reduction="none") * has,
            "distill": distillation_loss(out["logits"], out["logits_joint"]) * has,
        }
        present = torch.stack([torch.ones_like(has), has, has, has], dim=-1)
        losses = torch.stack([parts[t] for t in self.tasks], dim=-1)
        return self.weighting(torch.stack([losses, present], dim=-1)), parts
