"""Losses, each returning per-sample values (B,) so that they can be clipped per patient.

``clip_loss`` couples the patients of a batch (each is the other's negative): it is for non-DP
training only (see DESIGN.md, Privacy rules). ``slice_alignment_loss`` aligns a patient's cine and
LGE slices using that patient's other slices as negatives, so it depends on one patient only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # the models import these losses
    from ccmr_core.models.blocks import Temperature


def clip_loss(zc: torch.Tensor, zl: torch.Tensor, temperature: Temperature, has_lge: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE between patients' cine and LGE embeddings (open_clip style).
    Patients without LGE take no part (their row is 0). Returns (B,)."""
    idx = has_lge.nonzero(as_tuple=True)[0]
    out = zc.new_zeros(zc.shape[0])
    if len(idx) < 2:
        return out + 0.0 * (temperature(zc @ zl.t()).sum())  # keep every parameter in the graph
    logits = temperature(zc[idx] @ zl[idx].t())
    target = torch.arange(len(idx), device=zc.device)
    per = 0.5 * (F.cross_entropy(logits, target, reduction="none") + F.cross_entropy(logits.t(), target, reduction="none"))
    return out.index_put((idx,), per)


def slice_alignment_loss(zc: torch.Tensor, zl: torch.Tensor, temperature: Temperature, has_lge: torch.Tensor) -> torch.Tensor:
    """Per patient: cine slice k should match LGE slice k among that patient's S slices.
    zc, zl: (B, S, P) normalised. Returns (B,), 0 for patients without LGE."""
    logits = temperature(torch.einsum("bsp,btp->bst", zc, zl))
    b, s, _ = logits.shape
    target = torch.arange(s, device=zc.device).expand(b, s)
    ce = F.cross_entropy(logits.reshape(b * s, s), target.reshape(-1), reduction="none").reshape(b, s).mean(1)
    ce_t = F.cross_entropy(logits.transpose(1, 2).reshape(b * s, s), target.reshape(-1), reduction="none").reshape(b, s).mean(1)
    return 0.5 * (ce + ce_t) * has_lge.float()


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float = 2.0) -> torch.Tensor:
    """KL(teacher || student) per sample at temperature tau; the teacher is not updated by it."""
    t = F.log_softmax(teacher_logits.detach() / tau, dim=-1)
    s = F.log_softmax(student_logits / tau, dim=-1)
    return (t.exp() * (t - s)).sum(-1) * tau * tau
