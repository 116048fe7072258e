"""Build a model by name from the config."""

from __future__ import annotations

from torch import nn

from ccmr_core.models.baselines import CineOnly, DualPath, LGEOnly
from ccmr_core.models.cc_cmr import CCCMR

MODELS: dict[str, type[nn.Module]] = {m.name: m for m in (CCCMR, CineOnly, DualPath, LGEOnly)}
MODEL_NAMES = tuple(MODELS)


def build_model(name: str, n_classes: int, slices: int, *, width: int = 16, dim: int = 128, proj: int = 64,
                dropout: float = 0.2, alignment: str = "batch", temperature: float = 0.07,
                learn_temperature: bool = True, bio_channels: int = 4, bio_length: int = 32) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    kw = dict(n_classes=n_classes, slices=slices, width=width, dim=dim, dropout=dropout)
    if name == "cc-cmr":
        kw.update(proj=proj, alignment=alignment, temperature=temperature, learn_temperature=learn_temperature)
    if name == "dual-path":
        kw.update(bio_channels=bio_channels, bio_length=bio_length)
    return MODELS[name](**kw)


def model_inputs(model: nn.Module, batch: dict, training: bool) -> dict:
    """The tensors a model receives: in training CC-CMR also gets LGE; at inference only what
    the model declares (CC-CMR: cine alone)."""
    base = getattr(model, "_module", model)
    names = set(base.inputs)
    if training and base.name == "cc-cmr":
        names.add("lge")
    return {k: batch[k] for k in ("cine", "lge", "bio") if k in names}
