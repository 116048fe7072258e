"""What each epoch of a run trains and at what learning rate; the same plan for central training
(epochs) and federated training (rounds x local epochs), so the two differ only in where the
data are.

A model may train in stages (CC-CMR: ``teacher`` then ``student``); a stage starts on a round
boundary so that every site of a federation trains the same stage in a round. Stages change what
trains, not the learning rate: it warms up linearly at the start of the run and then follows one
cosine to zero over all epochs (the student continues the teacher's cine branch). The model at
the end of the schedule is the one kept, with no selection on a small validation set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Plan:
    epochs: int  # in all (federated: rounds x local epochs)
    stages: tuple[str, ...] = ("train",)
    first_share: float = 0.5  # share of the epochs for the first of two stages
    unit: int = 1  # epochs per round; stage boundaries fall on multiples of it
    warmup: float = 0.05  # share of the run spent warming up

    def bounds(self) -> list[tuple[str, int, int]]:
        """(stage, first epoch, end epoch) for each stage, epochs counted from 0."""
        if len(self.stages) == 1:
            return [(self.stages[0], 0, self.epochs)]
        rounds = self.epochs // self.unit
        first = min(max(1, round(self.first_share * rounds)), rounds - 1) * self.unit if rounds > 1 else self.epochs
        return [(self.stages[0], 0, first), (self.stages[1], first, self.epochs)]

    def stage_at(self, epoch: int) -> str:
        for stage, lo, hi in self.bounds():
            if lo <= epoch < hi:
                return stage
        return self.bounds()[-1][0]

    def lr_factor(self, t: float) -> float:
        """Learning-rate multiplier at time ``t`` (in epochs from the start of the run)."""
        x = min(max(t / max(self.epochs, 1e-9), 0.0), 1.0)
        warm = min(1.0, (x + 1e-3) / self.warmup) if self.warmup > 0 else 1.0
        return warm * 0.5 * (1 + math.cos(math.pi * x))


def plan_for(model, epochs: int, teacher_share: float, unit: int = 1, pretrained: bool = False) -> Plan:
    """The plan for ``model``; a model that starts pretrained trains its last stage only."""
    base = getattr(model, "_module", model)
    stages = tuple(getattr(base, "stages", ("train",)))
    return Plan(epochs=epochs, stages=stages[-1:] if pretrained else stages, first_share=teacher_share, unit=unit)


def federated_plan(model, cfg) -> Plan:
    """The plan of a federated run of ``cfg`` (rounds x local epochs, stages on round boundaries):
    the one the sites train by and the coordinator reads stages from, so the two agree."""
    f = cfg.federated
    return plan_for(model, f.rounds * f.local_epochs, cfg.model.teacher_share, unit=f.local_epochs,
                    pretrained=starts_pretrained(cfg))


def starts_pretrained(cfg) -> bool:
    """Whether a federated run of ``cfg`` starts from a pretrained global model."""
    f = cfg.federated
    return bool(f.initial_model) or f.pretrain == "public" or (f.pretrain == "auto" and cfg.privacy.mode == "sample")


FINETUNE_PARTS = ("head", "classifier", "bias")  # what train_only_heads can leave trainable


def finetune_part(cfg) -> str | None:
    """What the sites train of a pretrained model (PrivacyConfig.finetune): 'head', 'classifier' or
    'bias' when they train only that (always when set so, also without DP, to compare like with like),
    None when they train everything. 'auto': the heads under patient-level DP from a pretrained
    start (the diagnostic layer alone was no better on validation; BENCHMARKS, DP fine-tuning pilot)."""
    p = cfg.privacy
    if p.finetune in FINETUNE_PARTS:
        return p.finetune
    if p.finetune == "auto" and p.mode == "sample" and starts_pretrained(cfg):
        return "head"
    return None


def finetunes_head(cfg) -> bool:
    """Whether the sites train only a head of the model (the views of ccmr_core/frozen_views.py and
    ``privacy.finetune_batch_size`` then apply)."""
    return finetune_part(cfg) is not None


def site_batch_size(cfg) -> int:
    """The batch a site trains with: when it trains the heads only, ``privacy.finetune_batch_size``
    (if set); else ``federated.local_batch_size`` (if set); else ``train.batch_size``. DP accounting
    plans with the same number."""
    if finetunes_head(cfg):
        return cfg.privacy.finetune_batch_size or cfg.train.batch_size
    return cfg.federated.local_batch_size or cfg.train.batch_size


def site_train_config(cfg):
    """The training settings a site's optimiser uses: ``privacy.finetune_lr`` as the learning rate
    when it trains the heads only (if set), else ``train`` as it is."""
    if finetunes_head(cfg) and cfg.privacy.finetune_lr:
        return cfg.train.model_copy(update={"lr": cfg.privacy.finetune_lr})
    return cfg.train


def train_only_heads(model, top: bool = False, part: str = "head") -> None:
    """Freeze everything but ``part`` of the model: 'head' = its heads (``head_modules``) and
    learned loss weights; 'classifier' = the diagnostic layer alone (``classifier_modules``; the
    heads' other outputs cannot change a diagnosis read from a frozen encoder, and under DP-SGD
    they would share each patient's clipped gradient and add noise dimensions); 'bias' = that
    layer's biases alone (one per class: the class priors, which differ between the coordinator's
    public cohort and the sites). With ``top`` also the encoder's top (``top_modules``: CC-CMR's
    slice pooling and projection)."""
    if part not in FINETUNE_PARTS:
        raise ValueError(f"part must be 'head', 'classifier' or 'bias', got {part!r}")
    base = getattr(model, "_module", model)
    if part == "head":
        keep = tuple(k + "." for k in (*getattr(base, "head_modules", ()), "weighting", "temperature"))
    else:
        layers = tuple(getattr(base, "classifier_modules", getattr(base, "head_modules", ())))
        keep = tuple(k + (".bias" if part == "bias" else ".") for k in layers)
    keep += tuple(k + "." for k in getattr(base, "top_modules", ())) if top else ()
    for name, p in base.named_parameters():
        if not name.startswith(keep):
            p.requires_grad_(False)


def set_stage(model, stage: str) -> None:
    base = getattr(model, "_module", model)
    if hasattr(base, "set_stage"):
        base.set_stage(stage)
