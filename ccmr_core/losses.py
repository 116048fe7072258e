"""Losses, each returning per-sample values (B,) so that they can be clipped per patient.

``patient_alignment_loss`` uses other patients as negatives (in the batch, or a bank of the
site's patients): it couples patients and is for non-DP training only (see DESIGN.md, Privacy
rules). ``slice_alignment_loss`` aligns a patient's cine and LGE slices using that patient's other
slices as negatives, so it depends on one patient only; so do the others.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # the models import these losses
    from ccmr_core.models.blocks import Temperature


def patient_alignment_loss(z: torch.Tensor, zl: torch.Tensor, temperature: Temperature, mask: torch.Tensor,
                           positives: torch.Tensor | None = None) -> torch.Tensor:
    """InfoNCE between patients' cine embeddings ``z`` (B, P) and LGE embeddings (open_clip style).

    Without ``positives``: ``zl`` is (B, P), row i of each is patient i, and the loss is symmetric
    over the patients in ``mask``. With ``positives``: ``zl`` is a bank (N, P) of LGE embeddings and
    patient i's match is row ``positives[i]``, every other row a negative. Patients outside ``mask``
    get 0. Returns (B,)."""
    out = z.new_zeros(z.shape[0])
    idx = mask.nonzero(as_tuple=True)[0]
    if positives is None:
        if len(idx) < 2:
            return out + 0.0 * temperature(z @ zl.t()).sum()  # keep every parameter in the graph
        logits = temperature(z[idx] @ zl[idx].t())
        target = torch.arange(len(idx), device=z.device)
        per = 0.5 * (F.cross_entropy(logits, target, reduction="none") + F.cross_entropy(logits.t(), target, reduction="none"))
        return out.index_put((idx,), per)
    logits = temperature(z @ zl.t())  # (B, N)
    if len(idx) == 0 or zl.shape[0] < 2:
        return out + 0.0 * logits.sum()
    per = F.cross_entropy(logits[idx], positives[idx], reduction="none")
    return out.index_put((idx,), per) + 0.0 * logits.sum()


def diagnosis_loss(logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy on the diagnosis and the mask of patients whose diagnosis is known to training
    (``has_label``; all of them unless a label-efficiency experiment hides some). (B,), (B,).
    With ``class_log_prior`` (C,) in the batch the loss reads logits + log prior (logit adjustment,
    Menon et al. 2021; FedLC, Zhang et al. 2022): a site's own class mix is explained by the prior,
    so the model's logits learn the evidence for each class, not the site's prevalence."""
    known = batch["has_label"].float() if "has_label" in batch else torch.ones_like(logits[:, 0])
    if "class_log_prior" in batch:
        logits = logits + batch["class_log_prior"]
    return F.cross_entropy(logits, batch["label"], reduction="none") * known, known


def class_log_prior(labels: list[int], n_classes: int) -> torch.Tensor:
    """log of the class frequencies among ``labels``, add-one smoothed (a class a site lacks gets a
    small prior, not minus infinity). (C,)."""
    counts = torch.bincount(torch.as_tensor(labels, dtype=torch.long), minlength=n_classes).float() + 1.0
    return (counts / counts.sum()).log()


def measurement_loss(pred: torch.Tensor, target: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Smooth-L1 between estimated and reported measurements (standardised), averaged over the
    values each patient's report states; 0 for a patient without any. (B, M) -> (B,)."""
    present = present.to(pred.dtype)
    err = F.smooth_l1_loss(pred, target, reduction="none") * present
    return err.sum(-1) / present.sum(-1).clamp_min(1.0)


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
    """Soft-target cross-entropy H(teacher, student) at temperature tau, per sample (the teacher is
    not updated by it). Its gradient is that of KL(teacher || student); its value also counts the
    teacher's own entropy, the noise no student can remove, which keeps it on the scale of the
    other tasks' losses so that uncertainty weighting (1 / loss at equilibrium) does not inflate
    it the way a near-zero KL would."""
    t = F.softmax(teacher_logits.detach() / tau, dim=-1)
    return -(t * F.log_softmax(student_logits / tau, dim=-1)).sum(-1) * tau * tau


def clip_loss(video: torch.Tensor, text: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE of CLIP / CMR-CLIP, per patient: row i is the mean of "which report is
    patient i's?" and "which study is report i's?" over the batch. Inputs L2-normalised (B, D).
    The other patients of the batch are the negatives, so patients are coupled: no patient-level DP."""
    logits = video @ text.T / temperature
    target = torch.arange(len(video), device=video.device)
    return (F.cross_entropy(logits, target, reduction="none") + F.cross_entropy(logits.T, target, reduction="none")) / 2
