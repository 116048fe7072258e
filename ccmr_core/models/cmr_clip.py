"""CMR-CLIP: a cine study encoder and a report encoder aligned by symmetric contrastive learning
(after CMR-CLIP, Makiya11/CMRCLIP, and CMRformer). No diagnosis label is used: the cardiologist's
report is the supervision. Both sides are projected to a shared, L2-normalised space; the
temperature is fixed (``model.temperature``, 0.1 by default; CMR-CLIP uses 0.05 with batches far
larger than a site's), or learnt from there as CLIP does (``model.learn_temperature: true``). The study side reads cine only, so retrieval, zero-shot findings and
probes need no gadolinium. With ``report_measurements`` the study encoder also estimates the values
the report states (EF, volumes, wall thickness: ``data.measurements``), a per-patient loss beside the
contrastive one: the report's numbers, which a few hundred reports cannot teach a text encoder from
scratch to read, still supervise the study side. No diagnosis label either way.

In-batch negatives couple patients, so this model refuses patient-level DP (as CC-CMR's batch
alignment does); site-level DP is allowed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ccmr_core.losses import clip_loss, measurement_loss
from ccmr_core.models.blocks import Temperature
from ccmr_core.models.encoders import CineEncoder
from ccmr_core.models.text import TextEncoder


class CMRCLIP(nn.Module):
    name = "cmr-clip"
    inputs = ("cine", "report")
    patient_level_dp = False  # in-batch negatives: one patient's report is every other patient's negative

    def __init__(self, slices: int, width: int = 8, dim: int = 128, proj: int = 64, text_width: int = 128,
                 text_layers: int = 2, temperature: float = 0.1, text_dropout: float = 0.1, n_classes: int = 5,
                 text_negation: bool = False, text_pool: str = "mean", learn_temperature: bool = False,
                 report_measurements: bool = False, n_measurements: int = 0):
        super().__init__()
        self.n_classes = n_classes  # the label set of the probes and class prompts it is evaluated with
        self.cine = CineEncoder(slices, width, dim)
        self.video_proj = nn.Linear(dim, proj)
        # the report's measurements from the study's patient feature (None: off, and no weights in the file)
        self.measure = nn.Linear(dim, n_measurements) if report_measurements and n_measurements else None
        self.text = TextEncoder(text_width, text_layers, dropout=text_dropout, negation=text_negation,
                                 pool=text_pool)
        self.text_proj = nn.Linear(text_width, proj)
        self._t0 = temperature
        # learnable: CLIP's logit scale (exp(v), v from log(1/t0), capped at 100), a leaf module of its own
        self.logit_scale = Temperature(temperature, learnable=True) if learn_temperature else None

    @property
    def temperature(self) -> float:
        """The contrastive temperature now (fixed, or where learning has taken it)."""
        tau = self._tau()
        return float(tau.detach()) if torch.is_tensor(tau) else float(tau)

    def _tau(self) -> torch.Tensor | float:
        if self.logit_scale is None:
            return self._t0
        return self.logit_scale.scale().reciprocal()

    def embed_video(self, cine: torch.Tensor) -> torch.Tensor:
        return self._video(cine)["video"]

    def _video(self, cine: torch.Tensor) -> dict:
        h = self.cine(cine)[1]
        out = {"video": F.normalize(self.video_proj(h), dim=-1)}
        if self.measure is not None:
            out["measure"] = self.measure(h)
        return out

    def embed_text(self, report: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(self.text(report)), dim=-1)

    def forward(self, cine: torch.Tensor, report: torch.Tensor) -> dict:
        return {**self._video(cine), "text": self.embed_text(report)}

    def losses(self, out: dict, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per patient with a report: the symmetric InfoNCE over the batch's patients that have one,
        plus (``report_measurements``) the error of the measurements that patient's report states."""
        has = batch.get("has_report", torch.ones(len(out["video"]), dtype=torch.bool, device=out["video"].device))
        v, t = out["video"][has], out["text"][has]
        if len(v) < 2:  # no negatives: nothing to learn from this batch
            none = (out["video"].sum() * 0.0).reshape(1)[:0]
            return none, {"clip": none, **({"measure": none} if "measure" in out else {})}
        loss = clip_loss(v, t, self._tau())
        parts = {"clip": loss}
        if "measure" in out:
            parts["measure"] = measurement_loss(out["measure"][has], batch["meas"][has], batch["has_meas"][has])
            loss = loss + parts["measure"]
        return loss, parts
