"""The model file (model.pt): weights plus everything needed to use them."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import torch
from torch import nn

from ccmr_core.files import atomic_path
from ccmr_core.models.ensemble import DeepEnsemble
from ccmr_core.models.registry import build_model

FORMAT = 1


def save_model(path: str | Path, state: dict[str, torch.Tensor], *, name: str, kwargs: dict, classes: list[str],
               ingest: dict, config: dict, info: dict | None = None, refer: dict | None = None) -> None:
    """``state``: the model's state dict; ``refer``: the referral thresholds set on validation
    data (ccmr_core/referral.py)."""
    blob = {
        "format": FORMAT,
        "kind": "ccmr-model",
        "model": name,
        "model_kwargs": kwargs,
        "state_dict": {k.removeprefix("_module."): v.detach().cpu() for k, v in state.items()},
        "classes": list(classes),
        "ingest": ingest,
        "config": config,
        "refer": refer,
        "info": {"saved": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **(info or {})},
    }
    with atomic_path(path) as tmp:
        torch.save(blob, tmp)


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} not found")
    try:
        # weights_only: tensors, numbers, strings and containers only; a pickle that would run code
        # (a crafted model file sent to a hospital) is refused before anything of it executes
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} is not a readable model file: it holds more than weights and settings, or is "
                         f"damaged ({first}); use a model.pt written by 'ccmr train' or a federated run") from None
    if not isinstance(blob, dict) or blob.get("kind") != "ccmr-model":
        raise ValueError(f"{path} is not a CC-CMR model file (expected one written by 'ccmr train' or a federated run)")
    model = _build(path, blob["model"], blob["model_kwargs"])
    model.load_state_dict(blob["state_dict"])
    return model.to(device).eval(), blob


def _build(path: Path, name: str, kwargs: dict) -> nn.Module:
    """The model a file describes; a deep ensemble (``ccmr ensemble``) lists its members' own."""
    if name != DeepEnsemble.name:
        return build_model(name, **kwargs)
    members = kwargs.get("members") if isinstance(kwargs, dict) else None
    if not isinstance(members, list) or not all(isinstance(m, dict) and isinstance(m.get("model"), str)
                                                and isinstance(m.get("model_kwargs"), dict) for m in members):
        raise ValueError(f"{path} says it is an ensemble but does not list its members' architectures; make it "
                         "again with 'ccmr ensemble'")
    if any(m["model"] == DeepEnsemble.name for m in members):
        raise ValueError(f"{path} is an ensemble of ensembles; make one ensemble of the runs' own model files")
    return DeepEnsemble([build_model(m["model"], **m["model_kwargs"]) for m in members])


def load_classifier(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """``load_model`` for the commands that diagnose (predict, evaluate, export): a CMR-CLIP model
    has no diagnosis head and is refused with what to use instead."""
    model, blob = load_model(path, device)
    if blob["model"] == "cmr-clip":
        raise ValueError(f"{path} is a cmr-clip model (studies and reports in one space, no diagnosis head): use "
                         "'ccmr search --model' with it, or a model trained with --model cc-cmr / cine-only")
    return model, blob


def load_clip(path: str | Path, needs: str) -> tuple[nn.Module, dict]:
    """``load_model`` for what only a CMR-CLIP model can do (``needs``: e.g. "search needs")."""
    model, blob = load_model(path)
    if blob["model"] != "cmr-clip":
        raise ValueError(f"{path} is a {blob['model']} model; {needs} a cmr-clip model "
                         "('ccmr train --preset cmr-clip')")
    return model, blob
