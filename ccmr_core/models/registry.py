"""Build a model by name; its arguments come from the config in one place (``model_kwargs``)."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from ccmr_core.frozen_views import frozen_batch
from ccmr_core.models.baselines import CineOnly, DualPath, LGEOnly
from ccmr_core.models.cc_cmr import CCCMR
from ccmr_core.models.cmr_clip import CMRCLIP
from ccmr_core.models.compiled import compile_encoders

MODELS: dict[str, type[nn.Module]] = {m.name: m for m in (CCCMR, CineOnly, DualPath, LGEOnly, CMRCLIP)}
MODEL_NAMES = tuple(MODELS)


def reads_reports(name: str) -> bool:
    """Whether model ``name`` learns from reports (CMR-CLIP): its sites join reports.csv to their
    studies, train on in-batch negatives and are evaluated by retrieval, not by a diagnosis head."""
    return "report" in MODELS[name].inputs


def model_kwargs(cfg, bio_channels: int = 4) -> dict:
    """Everything a model of ``cfg`` is built from (stored in model.pt to rebuild it)."""
    m = cfg.model
    own = {} if m.learn_temperature is None else {"learn_temperature": m.learn_temperature}  # else the class default
    return dict(**own, n_classes=len(cfg.data.classes), slices=cfg.data.ingest.slices, width=m.width, dim=m.dim,
                proj=m.proj, dropout=m.dropout, alignment=cfg.alignment, temperature=m.temperature,
                use_lge=m.use_lge, region_pool=m.region_pool,
                text_negation=m.text_negation, text_pool=m.text_pool, report_measurements=m.report_measurements,
                n_measurements=len(cfg.data.measurements), bio_channels=bio_channels, bio_length=m.bio_length)


def model_settings(name: str, kwargs: dict) -> dict:
    """What builds model ``name`` from ``kwargs``: the arguments its class takes, each missing one at
    the class's own default (as ``build_model`` fills it, e.g. for a model file written before the
    setting existed); settings other models take are left out."""
    params = inspect.signature(MODELS[name]).parameters
    return {k: kwargs.get(k, p.default) for k, p in params.items() if p.default is not inspect.Parameter.empty}


def changed_settings(name: str, was: dict, now: dict) -> list[tuple[str, object, object]]:
    """(setting, value in ``was``, value in ``now``) for each setting model ``name`` is built from
    that differs between two sets of kwargs (a setting only other models take, or one missing from
    an older file and at the class default in the other, is no change)."""
    a, b = model_settings(name, was), model_settings(name, now)
    return [(k, a[k], b[k]) for k in sorted(a) if a[k] != b[k]]


def build_model(name: str, n_classes: int, slices: int, **kwargs) -> nn.Module:
    """The model ``name``, given the arguments it takes (others in ``kwargs`` are ignored)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    cls = MODELS[name]
    takes = inspect.signature(cls).parameters
    return channels_last(cls(n_classes=n_classes, slices=slices, **{k: v for k, v in kwargs.items() if k in takes}))


def training_model(cfg, kwargs: dict, device: torch.device, name: str | None = None) -> nn.Module:
    """The model a run trains, on ``device``: model ``name`` (default ``cfg.model.name``) built from
    ``kwargs`` (``model_kwargs``), its encoders compiled where ``train.compile`` asks
    (ccmr_core/models/compiled.py). Central training, CMR-CLIP's trainer and the ClientApp build
    theirs here, so the setting means the same in each."""
    model = build_model(name or cfg.model.name, **kwargs).to(device)
    if cfg.train.compile:
        compile_encoders(model, device)
    return model


def channels_last(model: nn.Module) -> nn.Module:
    """Store the model's 3D convolution kernels channels-last: oneDNN then runs the convolutions
    (most of a training step) with channels-last activations too. Whether that is faster depends
    on the machine's oneDNN kernels: a training step was 1.2-1.5x faster for every model on one
    2-core virtual machine, 1.2x for the CNN-LSTM and 0.8-0.95x for CC-CMR on another (BENCHMARKS.md,
    paper block). Values agree with the default layout to float rounding; a state dict loads into
    either layout."""
    return model._apply(lambda t: t.to(memory_format=torch.channels_last_3d) if t.dim() == 5 else t)


def model_inputs(model: nn.Module, batch: dict, training: bool) -> dict:
    """The tensors a model receives: in training CC-CMR also gets LGE; at inference only what
    the model declares (CC-CMR: cine alone). A batch of precomputed views (head fine-tuning,
    ``ccmr_core/frozen_views.py``) gives the heads the frozen part's outputs instead."""
    frozen = frozen_batch(batch)
    if frozen is not None:
        return {"frozen": frozen}
    base = getattr(model, "_module", model)
    names = set(base.inputs)
    if training and base.name == "cc-cmr":
        names.add("lge")
    return {k: batch[k] for k in ("cine", "lge", "bio", "report") if k in names}
