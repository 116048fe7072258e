"""Head fine-tuning at the cost of the heads: each training patient's augmented views are put
through the frozen part of the model once, and the heads then train on what came out.

When a site trains only the heads of a pretrained model (``privacy.finetune``, DP fine-tuning
after public pretraining), every step used to run the frozen encoders (for CC-CMR: the student's
cine encoder and the cine + LGE teacher) on freshly augmented images, to train a few thousand
parameters; that was about nine tenths of a round. Here the encoders see ``views`` augmented
draws of each patient once per run, and every step samples one of them: the frozen-feature
recipe of private fine-tuning (Tramer & Boneh 2021, De et al. 2022).

Privacy: a patient's views are computed from that patient's images alone, so a view is one more
per-patient transformation; Poisson sampling, clipping and accounting stay per patient.
A model takes part by defining ``frozen_outputs(**inputs)`` (what the frozen part computes,
deterministic) and accepting ``forward(frozen=...)``.

Augmentation multiplicity (``per_step`` > 1): an item carries several distinct views of its
patient (on axis 1 of each batch tensor, marked by ``VIEW_AXIS``); the training loop runs the
heads on each (``view_batches``) and averages the patient's losses, so that under DP-SGD the
patient's gradient is the mean over its views before it is clipped (De et al. 2022). Opacus adds
up the per-sample gradients of the forward passes before one backward, as for tied weights.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

PREFIX = "frozen_"  # batch keys holding the frozen part's outputs
VIEW_AXIS = "frozen_views_on_axis_1"  # batch key: the outputs hold several views of each patient on axis 1
IMAGES = ("cine", "lge", "bio", "report")  # what the frozen part reads: not kept


def frozen_batch(batch: dict) -> dict | None:
    """The frozen part's outputs carried by ``batch`` (names without the prefix), or None."""
    if VIEW_AXIS in batch:
        raise ValueError("this batch holds several views of each patient: split it with view_batches first")
    out = {k[len(PREFIX):]: v for k, v in batch.items() if k.startswith(PREFIX)}
    return out or None


def view_batches(batch: dict) -> list[dict]:
    """One batch per view when ``batch`` holds several views of each patient (augmentation
    multiplicity); else ``[batch]``. The non-view entries (labels, masks, index) are shared."""
    if VIEW_AXIS not in batch:
        return [batch]
    views = {k: v for k, v in batch.items() if k.startswith(PREFIX) and k != VIEW_AXIS}
    rest = {k: v for k, v in batch.items() if k not in views and k != VIEW_AXIS}
    k = next(iter(views.values())).shape[1]
    return [{**rest, **{name: v[:, i] for name, v in views.items()}} for i in range(k)]


AFTER_HEADS = ("calibration",)  # buffers applied after the heads (the calibration temperature)


def frozen_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter the heads do not train and every buffer but those applied after the heads:
    what the views depend on."""
    out = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    out.update({n: b.detach().clone() for n, b in model.named_buffers() if n.split(".")[-1] not in AFTER_HEADS})
    return out


def same_frozen(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Whether two frozen parts are the same model. Averaging identical weights across sites may
    change the last bit, so equal means within float32 rounding (1e-6 relative)."""
    return a.keys() == b.keys() and all(
        x.shape == b[k].shape and (x.dtype == torch.bool or torch.allclose(x.float(), b[k].float(), rtol=1e-6, atol=1e-8))
        for k, x in a.items())


def _refuse_stale(outputs: dict[str, torch.Tensor]) -> None:
    """Refuse outputs of the frozen part that depend on trainable weights: their views would not
    follow training."""
    stale = [k for k, t in outputs.items() if t.requires_grad]
    if stale:
        raise ValueError(f"the frozen part's outputs {stale} depend on trainable weights: their views would not "
                         "follow training; train only modules that read those outputs")


class FrozenViews(Dataset):
    """``views`` augmented draws of each item of ``dataset`` through ``model``'s frozen part.

    Items: the dataset's own non-image entries (label, masks, index, ...) and one randomly chosen
    view's outputs under ``frozen_<name>``; with ``per_step`` > 1 that many distinct views, stacked
    on a first axis (see the module's docstring). ``seed`` fixes the augmentations drawn."""

    def __init__(self, model: torch.nn.Module, dataset, views: int, device: torch.device, seed: int = 0,
                 batch_size: int = 16, per_step: int = 1):
        if views < 1:
            raise ValueError(f"views must be at least 1, got {views}")
        if not 1 <= per_step <= views:
            raise ValueError(f"per_step must be between 1 and views ({views}), got {per_step}")
        self.per_step = per_step
        from ccmr_core.models.registry import model_inputs  # the registry imports this module

        base = getattr(model, "_module", model)
        if not hasattr(base, "frozen_outputs"):
            raise ValueError(f"model {getattr(base, 'name', type(base).__name__)!r} cannot train its heads on "
                             "precomputed views (no frozen_outputs)")
        self.frozen_state = frozen_parameters(base)
        self.views = views
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
        per_view: list[dict[str, torch.Tensor]] = []
        meta: dict[str, list[torch.Tensor]] = {}
        was = base.training
        base.eval()
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            for v in range(views):
                parts: dict[str, list[torch.Tensor]] = {}
                for i, batch in enumerate(loader):
                    inputs = {k: x.to(device) for k, x in model_inputs(base, batch, training=True).items()}
                    first = v == 0 and i == 0
                    with torch.set_grad_enabled(first):  # the first batch shows whether training reaches them
                        out = base.frozen_outputs(**inputs)
                    if first:
                        _refuse_stale(out)
                    for k, t in out.items():
                        parts.setdefault(k, []).append(t.cpu())
                    if v == 0:
                        for k, t in batch.items():
                            if k not in IMAGES and torch.is_tensor(t):
                                meta.setdefault(k, []).append(t)
                per_view.append({k: torch.cat(ts) for k, ts in parts.items()})
        base.train(was)
        self.meta = {k: torch.cat(ts) for k, ts in meta.items()}
        self.outputs = {k: torch.stack([pv[k] for pv in per_view], 1) for k in per_view[0]}  # (N, V, ...)
        self.n = len(dataset)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {k: t[i] for k, t in self.meta.items()}
        if self.per_step > 1:
            chosen = torch.randperm(self.views)[:self.per_step]
            item.update({PREFIX + k: t[i, chosen] for k, t in self.outputs.items()})
            item[VIEW_AXIS] = torch.tensor(True)
            return item
        v = int(torch.randint(self.views, ())) if self.views > 1 else 0
        item.update({PREFIX + k: t[i, v] for k, t in self.outputs.items()})
        return item
