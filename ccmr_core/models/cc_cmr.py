"""CC-CMR: LGE as privileged information for a cine-only diagnosis.

Training runs in two stages (``ccmr_core/schedule.py`` says which epoch or round is which):

1. **teacher**: a cine encoder with a diagnostic and a measurement head (trained on those alone,
   as a cine-only model would be), and an LGE encoder whose slice features meet the cine
   encoder's (detached) in a feature interaction module (per slice, each modality gates the
   other) under a joint diagnostic head (cine + LGE), with cross-modal contrastive alignment of
   the LGE embedding to the cine embedding.
2. **student** (the model used at inference): a cine encoder and heads initialised from the
   teacher's cine branch, the teacher frozen. It learns the diagnosis and the report
   measurements, the teacher's softened joint predictions for the patients whose diagnosis is
   known (distillation: what LGE makes obvious), and to align its own projection of cine with the teacher's LGE embedding of the
   same patient against the other patients' LGE embeddings (a bank of the site's training
   patients: enough negatives, on a head of its own).

Every task's per-patient loss is weighted by learned homoscedastic uncertainty (Kendall et al.),
with its own learning rate so that the weights adapt within a run. Patients without LGE have no
LGE terms. With patient-level DP the alignment uses the patient's own slices as negatives
(``alignment: slice``): every loss term then depends on one patient only.

Inference: ``embed``/``head``, or ``forward(cine)``, run the student's cine path only (before
the student exists: the teacher's cine branch it will start from); LGE on disk cannot change a
prediction. ``use_lge=False`` is the ablation: the same cine encoder and
heads, trained in one stage with every LGE term off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ccmr_core.frozen_views import view_batches
from ccmr_core.losses import (diagnosis_loss, distillation_loss, measurement_loss, patient_alignment_loss,
                             slice_alignment_loss)
from ccmr_core.models.baselines import Classifier
from ccmr_core.models.blocks import SlicePool, TaskWeighting, Temperature
from ccmr_core.models.encoders import CineEncoder, LGEEncoder

TEACHER_TASKS = ["teacher_joint", "teacher_cls", "teacher_measure", "teacher_align"]
STUDENT_TASKS = ["cls", "measure", "distill", "align"]


class GatedInteraction(nn.Module):
    """Feature interaction per slice: each modality gates how much of the other enters the fused
    slice feature. (B, S, C) x (B, S, C) -> (B, S, C)."""

    def __init__(self, c: int):
        super().__init__()
        self.gate = nn.Linear(2 * c, c)
        self.cine = nn.Linear(c, c)
        self.lge = nn.Linear(c, c)
        self.norm = nn.LayerNorm(c)

    def forward(self, fc: torch.Tensor, fl: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(self.gate(torch.cat([fc, fl], dim=-1)))
        return self.norm(g * self.cine(fc) + (1 - g) * self.lge(fl))


class CineHeads(nn.Module):
    """What reads a cine patient feature: diagnosis, report measurements, alignment projection.
    Dropout acts on the slice features before they are pooled and on the patient feature, so
    that MC-dropout samples differ in which slices and features they rely on (epistemic
    uncertainty), not only in the last layer."""

    def __init__(self, dim: int, n_classes: int, n_measurements: int, proj: int, slice_channels: int,
                 dropout: float, alignment: str):
        super().__init__()
        self.slice_drop = nn.Dropout(dropout)
        self.drop = nn.Dropout(dropout)
        self.cls = nn.Linear(dim, n_classes)
        self.measure = nn.Linear(dim, n_measurements) if n_measurements else None
        self.proj = nn.Linear(slice_channels if alignment == "slice" else dim, proj)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.cls(self.drop(h))

    def outputs(self, fc: torch.Tensor, h: torch.Tensor, alignment: str) -> dict:
        out = {"logits": self.logits(h), "z": F.normalize(self.proj(fc if alignment == "slice" else h), dim=-1)}
        if self.measure is not None:
            out["measure"] = self.measure(h)
        return out


def _encode(encoder: CineEncoder, heads: CineHeads, cine: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    fc = encoder.slice_features(cine)
    return fc, encoder.pool(heads.slice_drop(fc))


class Teacher(nn.Module):
    def __init__(self, n_classes: int, slices: int, width: int, dim: int, proj: int, n_measurements: int,
                 dropout: float, alignment: str, region_pool: str = "mean"):
        super().__init__()
        self.alignment = alignment
        self.cine = CineEncoder(slices, width, dim, region_pool=region_pool)
        self.lge = LGEEncoder(slices, width, dim, pooled=alignment != "slice")
        c = self.cine.channels
        self.heads = CineHeads(dim, n_classes, n_measurements, proj, c, dropout, alignment)
        self.interaction = GatedInteraction(c)
        self.fused_slices = SlicePool(slices)
        self.fused = nn.Sequential(nn.Linear(c * self.fused_slices.weights.out_features, dim), nn.LayerNorm(dim),
                                   nn.SiLU())
        self.joint = nn.Linear(dim, n_classes)
        self.proj_lge = nn.Linear(c if alignment == "slice" else dim, proj)

    def lge_embedding(self, lge: torch.Tensor) -> torch.Tensor:
        fl, hl = self.lge(lge)
        return F.normalize(self.proj_lge(fl if self.alignment == "slice" else hl), dim=-1)

    def forward(self, cine: torch.Tensor, lge: torch.Tensor) -> dict:
        fc, hc = _encode(self.cine, self.heads, cine)
        fl, hl = self.lge(lge)
        out = {"logits": self.heads.logits(hc)}
        if self.heads.measure is not None:
            out["measure"] = self.heads.measure(hc)
        # the cine encoder learns here only what the student will need (diagnosis, measurements):
        # the LGE side, the interaction module and the joint head learn on detached cine features,
        # so LGE cannot slow the cine branch down before the student starts from it
        fcd, hcd = fc.detach(), hc.detach()
        out["z"] = F.normalize(self.heads.proj(fcd if self.alignment == "slice" else hcd), dim=-1)
        fused = self.interaction(fcd, fl)  # (B, S, C)
        out["joint"] = self.joint(self.heads.drop(self.fused(self.fused_slices(fused.transpose(1, 2)))))
        out["zl"] = F.normalize(self.proj_lge(fl if self.alignment == "slice" else hl), dim=-1)
        return out


class CCCMR(Classifier):
    name = "cc-cmr"
    inputs = ("cine",)
    head_modules = ("heads",)  # the student's heads (privacy.finetune: head)
    classifier_modules = ("heads.cls",)  # its diagnostic layer: what DP fine-tuning trains on a pretrained model
    top_modules = ("cine.slices", "cine.proj")  # the encoder after its slice features (privacy.finetune_top)

    def __init__(self, n_classes: int, slices: int, width: int = 8, dim: int = 128, proj: int = 64,
                 dropout: float = 0.2, alignment: str = "bank", temperature: float = 0.1,
                 learn_temperature: bool = True, n_measurements: int = 0, use_lge: bool = True,
                 region_pool: str = "mean"):
        super().__init__()
        if alignment not in ("bank", "slice"):
            raise ValueError(f"alignment must be 'bank' or 'slice', got {alignment!r}")
        self.alignment = alignment
        self.use_lge = use_lge
        self.cine = CineEncoder(slices, width, dim, region_pool=region_pool)
        self.heads = CineHeads(dim, n_classes, n_measurements, proj, self.cine.channels, dropout, alignment)
        self.teacher = (Teacher(n_classes, slices, width, dim, proj, n_measurements, dropout, alignment, region_pool)
                        if use_lge else None)
        self.temperature = Temperature(temperature, learn_temperature)
        self.weighting = TaskWeighting(TEACHER_TASKS + STUDENT_TASKS)
        # 1 once the student has been initialised from the teacher; a buffer, so every site of a
        # federation reads the same value from the global model and does the same thing
        self.register_buffer("student_ready", torch.zeros(()))
        self._ready = False  # the buffer as a Python bool: the inference path is chosen without a tensor branch
        self.register_load_state_dict_post_hook(lambda module, _: module._sync_ready())
        self.bank: torch.Tensor | None = None  # the site's teacher LGE embeddings; never saved or sent
        self.bank_row: dict[int, int] = {}
        self.set_stage(self.stages[0])

    def _sync_ready(self) -> None:
        # > 0.5, not == 1: an aggregated flag may come back as 0.99999 (SecAgg+ quantises updates)
        self._ready = bool(self.student_ready.item() > 0.5)

    # --- the inference path: cine only --------------------------------------------------------
    def _cine_path(self) -> nn.Module:
        """The student once it exists; before, the teacher's cine branch, which the student will
        start from (so a model evaluated in the teacher stage is evaluated as it will be used)."""
        return self if self.teacher is None or self._ready else self.teacher

    def embed(self, cine: torch.Tensor, lge=None, bio=None) -> torch.Tensor:
        """The deterministic part: slice features (B, S, C); ``head`` samples the rest."""
        return self._cine_path().cine.slice_features(cine)

    def head(self, f: torch.Tensor) -> torch.Tensor:
        path = self._cine_path()
        return path.heads.logits(path.cine.pool(path.heads.slice_drop(f)))

    def measure(self, f: torch.Tensor) -> torch.Tensor | None:
        path = self._cine_path()
        return path.heads.measure(path.cine.pool(f)) if path.heads.measure is not None else None

    # --- stages ------------------------------------------------------------------------------
    @property
    def stages(self) -> tuple[str, ...]:
        return ("teacher", "student") if self.use_lge else ("student",)

    def set_stage(self, stage: str) -> None:
        """Train ``stage``: its parameters trainable, the others frozen. Entering the student stage
        the first time copies the teacher's cine branch into the student."""
        if stage not in self.stages:
            raise ValueError(f"{self.name} has no stage {stage!r} (stages: {', '.join(self.stages)})")
        self.stage = stage
        if stage == "student" and self.teacher is not None and not self._ready:
            with torch.no_grad():
                self.cine.load_state_dict(self.teacher.cine.state_dict())
                self.heads.load_state_dict(self.teacher.heads.state_dict())
                self.student_ready.fill_(1.0)
            self._sync_ready()
        for p in self.parameters():
            p.requires_grad_(True)
        frozen = self.teacher if stage == "student" else nn.ModuleList([self.cine, self.heads])
        if frozen is not None:
            for p in frozen.parameters():
                p.requires_grad_(False)
        self.bank = None

    @torch.no_grad()
    def prepare_epoch(self, loader, device) -> None:
        """Student stage with bank alignment: the frozen teacher's LGE embedding of every training
        patient with LGE at this site (the negatives). Kept in memory only."""
        if self.stage != "student" or self.teacher is None or self.alignment != "bank":
            return
        was = self.teacher.training
        self.teacher.eval()
        rows, keys = [], []
        for batch in loader:
            batch = view_batches(batch)[0]  # several views of each patient: the bank takes the first
            has = batch["has_lge"].bool()
            if has.any():  # precomputed views carry the teacher's embedding (frozen_zl)
                z = batch["frozen_zl"][has].to(device) if "frozen_zl" in batch else \
                    self.teacher.lge_embedding(batch["lge"][has].to(device))
                rows.append(z)
                keys += batch["index"][has].tolist()
        self.teacher.train(was)
        self.bank = torch.cat(rows) if rows else None
        self.bank_row = {int(k): i for i, k in enumerate(keys)}

    # --- training ----------------------------------------------------------------------------
    def forward(self, cine: torch.Tensor | None = None, lge: torch.Tensor | None = None, bio=None,
                frozen: dict | None = None) -> dict:
        if frozen is not None:
            return self.head_outputs(frozen)
        if self.stage == "teacher" and lge is not None:
            return self.teacher(cine, lge)
        out = self.head_outputs({"fc": self.embed(cine)})
        if lge is not None and self.teacher is not None:
            out.update(self._teacher_outputs(cine, lge))
        return out

    @torch.no_grad()
    def _teacher_outputs(self, cine: torch.Tensor, lge: torch.Tensor) -> dict:
        self.teacher.eval()
        t = self.teacher(cine, lge)
        return {"teacher_joint": t["joint"], "zl": t["zl"]}

    # head fine-tuning on precomputed views (ccmr_core/frozen_views.py): in the student stage with
    # only the heads trainable, the student's slice features and the frozen teacher's outputs
    # depend on the images alone, so they are computed once per view
    def frozen_outputs(self, cine: torch.Tensor, lge: torch.Tensor | None = None, bio=None) -> dict:
        if self.stage != "student":
            raise ValueError("CC-CMR trains its heads on precomputed views in the student stage only")
        out = {"fc": self.embed(cine)}
        if lge is not None and self.teacher is not None:
            out.update(self._teacher_outputs(cine, lge))
        return out

    def head_outputs(self, frozen: dict) -> dict:
        """What the heads make of the slice features (``fc``), the frozen teacher's outputs passed on."""
        path = self._cine_path()
        fc = frozen["fc"]
        out = path.heads.outputs(fc, path.cine.pool(path.heads.slice_drop(fc)), self.alignment)
        out.update({k: frozen[k] for k in ("teacher_joint", "zl") if k in frozen})
        return out

    def losses(self, out: dict, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-patient total (B,) and each active task's per-patient loss. A task a patient lacks
        (no LGE, no report values) is masked out of that patient's total."""
        has = batch["has_lge"].float()
        ce, known = diagnosis_loss(out["logits"], batch)
        parts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # task -> (loss, mask), each (B,)
        if self.stage == "teacher":
            joint, _ = diagnosis_loss(out["joint"], batch)
            parts["teacher_joint"] = (joint * has, known * has)
            parts["teacher_cls"] = (ce, known)
            parts["teacher_align"] = self._align(out["z"], out["zl"], has, batch, bank=False)
        else:
            parts["cls"] = (ce, known)
            if "teacher_joint" in out:
                # only where the diagnosis is known: elsewhere the teacher's guess is a pseudo-label
                # from a teacher that learnt from the few labelled patients (at 10% of the labels it
                # took 13 points off the student; BENCHMARKS, label efficiency)
                taught = has * known
                parts["distill"] = (distillation_loss(out["logits"], out["teacher_joint"]) * taught, taught)
                parts["align"] = self._align(out["z"], out["zl"], has, batch, bank=True)
        if "measure" in out:
            m = measurement_loss(out["measure"], batch["meas"], batch["has_meas"])
            parts["teacher_measure" if self.stage == "teacher" else "measure"] = (m, batch["has_meas"].any(-1).float())
        zero = torch.zeros_like(has)
        stacked = torch.stack([torch.stack(parts.get(t, (zero, zero)), -1) for t in self.weighting.tasks], 1)
        return self.weighting(stacked), {t: v[0] for t, v in parts.items()}

    def _align(self, z: torch.Tensor, zl: torch.Tensor, has: torch.Tensor, batch: dict,
               bank: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if self.alignment == "slice":  # the patient's own slices are the negatives
            return slice_alignment_loss(z, zl, self.temperature, has.bool()), has
        if not bank or self.bank is None:  # the other patients of the batch are the negatives
            return patient_alignment_loss(z, zl, self.temperature, has.bool()), has
        rows = torch.tensor([self.bank_row.get(int(i), -1) for i in batch["index"]], device=z.device)
        mask = has.bool() & (rows >= 0)
        return patient_alignment_loss(z, self.bank, self.temperature, mask, positives=rows), mask.float()
