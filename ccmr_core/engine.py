"""The one training and evaluation loop: central training, the Flower ClientApp and the
benchmarks all call these functions.

FedProx is applied as a decoupled proximal step after each optimiser step,
``w <- w - s * mu * (w - w_global)``, with ``s`` the learning-rate schedule's factor (1 at the
peak): ``mu`` is the share of a parameter's drift from the global model removed per step, the
same whatever the optimiser's units (with SGD at the peak learning rate it is the gradient step
of (mu / lr) / 2 * ||w - w_global||^2). Unlike a term added to the loss it still acts under
DP-SGD, where Opacus replaces the gradients with clipped, noised per-sample gradients, and as
post-processing of private weights it costs no privacy. ``mu = 0`` is FedAvg.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ccmr_core.config import TrainConfig
from ccmr_core.data.transforms import inference_augmentation
from ccmr_core.frozen_views import view_batches
from ccmr_core.metrics import classification_metrics
from ccmr_core.models.registry import model_inputs


def resolve_device(name: str = "auto") -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device is 'cuda' but no CUDA GPU is visible; use 'auto' or 'cpu'")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def set_threads(n: int) -> None:
    if n > 0:
        torch.set_num_threads(n)


def core(model: nn.Module) -> nn.Module:
    """The model itself, also when Opacus wrapped it (GradSampleModule keeps it in ``_module``)."""
    return getattr(model, "_module", model)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


FAST_MODULES = ("weighting", "temperature", "logit_scale")  # learned loss weights, contrastive temperatures


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The trainable parameters in two groups: the network, and the learned task weights and
    temperature, which get ``cfg.fast_lr_factor`` times the learning rate so that they adapt
    within a run, without weight decay. Each group keeps its ``base_lr`` for the schedule."""
    fast, slow = [], []
    for name, p in core(model).named_parameters():
        if p.requires_grad:
            (fast if name.split(".")[0] in FAST_MODULES else slow).append(p)
    groups = [{"params": slow, "base_lr": cfg.lr, "weight_decay": cfg.weight_decay}]
    if fast:
        groups.append({"params": fast, "base_lr": cfg.lr * cfg.fast_lr_factor, "weight_decay": 0.0})
    for g in groups:
        g["lr"] = g["base_lr"]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def _prox_step(model: nn.Module, global_params: list[torch.Tensor], share: float) -> None:
    with torch.no_grad():
        for p, g in zip(core(model).parameters(), global_params):
            if p.requires_grad:
                p.sub_(share * (p - g))


def _losses(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-patient total loss and task losses of a training batch; a batch with several views of
    each patient (augmentation multiplicity, ccmr_core/frozen_views.py) gives each patient the mean
    of its views' losses, so its gradient is the mean over its views."""
    views = view_batches(batch)
    results = [core(model).losses(model(**model_inputs(model, b, training=True)), b) for b in views]
    if len(results) == 1:
        return results[0]
    total = torch.stack([t for t, _ in results]).mean(0)
    parts = {k: torch.stack([p[k] for _, p in results]).mean(0) for k in results[0][1]}
    return total, parts


def train_epoch(
    model: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    *,
    lr_at=None,
    prox_mu: float = 0.0,
    global_params: list[torch.Tensor] | None = None,
    class_log_prior: torch.Tensor | None = None,
    after_backward=None,
    progress: bool = False,
    desc: str = "training",
) -> dict[str, float]:
    """One pass over ``loader``; returns the mean loss, each task's mean and the time taken.

    ``lr_at(f)``: learning-rate factor at fraction ``f`` of this epoch (ccmr_core/schedule.py),
    applied to each parameter group's ``base_lr`` before every step, taken at the step's middle
    (so that an epoch of a single step is not spent entirely at its warm-up's starting point).
    ``class_log_prior`` (C,): the diagnosis loss adds it to the logits (``diagnosis_loss``).
    ``after_backward()``: called between each step's backward pass and the optimiser step (e.g.
    ccmr_core/drift.DriftCorrection, which reads and shifts the gradients)."""
    model.train()
    if prox_mu > 0 and global_params is None:
        raise ValueError("FedProx needs the global parameters (global_params) when prox_mu > 0")
    prepare = getattr(core(model), "prepare_epoch", None)
    if prepare is not None:
        prepare(loader, device)
    prior = class_log_prior.to(device) if class_log_prior is not None else None
    sums: dict[str, float] = {}
    n_total, t0 = 0, time.perf_counter()
    n_batches = max(1, len(loader))
    for i, batch in enumerate(tqdm(loader, desc=desc, unit="batch", disable=not progress, leave=False)):
        factor = 1.0
        if lr_at is not None:
            factor = lr_at((i + 0.5) / n_batches)
            for g in optimizer.param_groups:
                g["lr"] = g["base_lr"] * factor
        batch = to_device(batch, device)
        if prior is not None:
            batch["class_log_prior"] = prior
        optimizer.zero_grad(set_to_none=True)
        total, parts = _losses(model, batch)
        n = int(total.shape[0])
        loss = total.mean() if n else total.sum()
        loss.backward()
        if after_backward is not None:
            after_backward()
        optimizer.step()
        if prox_mu > 0:
            _prox_step(model, global_params, min(1.0, prox_mu * factor))
        n_total += n
        sums["loss"] = sums.get("loss", 0.0) + float(total.detach().sum())
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach().sum())
    out = {k: v / max(n_total, 1) for k, v in sums.items()}
    out.update(n=float(n_total), seconds=time.perf_counter() - t0)
    return out


@contextmanager
def mc_dropout(model: nn.Module, on: bool):
    """Evaluation mode with dropout left active (MC dropout) when ``on``. Every module's mode is
    restored on exit, so a deterministic pass nested inside an MC block leaves the MC block's
    dropout on (``model.train(was)`` would switch it off for the remaining samples)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    if on:
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.train()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _augmented(inputs: dict, views) -> dict:
    """The model's inputs with each patient's cine replaced by a random view of it."""
    if "cine" not in inputs:
        return inputs
    cine = torch.stack([views({"cine": c})["cine"] for c in inputs["cine"].cpu()]).to(inputs["cine"].device)
    return {**inputs, "cine": cine}


def _pass_probs(m: nn.Module, h, t_cal: float) -> torch.Tensor:
    """One inference pass: (1, B, C) calibrated probabilities, or (members, B, C) for an ensemble."""
    if hasattr(m, "pass_probs"):
        return m.pass_probs(h)
    return F.softmax(m.head(h) / t_cal, dim=-1)[None]


@contextmanager
def seeded(seed: int | None, device: torch.device):
    """Random draws inside (MC-dropout masks, test-time views) from ``seed``, and the caller's random
    state as it was afterwards: an evaluation then gives the same answer whatever ran before it in
    the process (a site's ClientApp answers its requests in whatever order they come). None: the
    process's own random state, as it is."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def predict(model: nn.Module, loader, device: torch.device, mc_samples: int = 0, progress: bool = False,
            augment: bool = False, seed: int | None = None) -> dict:
    """Per-patient outputs of the inference path: mean class probabilities over ``mc_samples``
    MC-dropout passes of the head (logits divided by the model's calibration temperature),
    epistemic uncertainty (mutual information between the prediction and the dropout mask, in
    nats; 0 without MC; for a deep ensemble the passes are every member's, so it also counts their
    disagreement), the loss, the raw logits (no dropout), measurement estimates
    (standardised, for models that make them), labels and dataset indices. With ``augment``
    (test-time augmentation) each MC pass reads its own random view of the cine
    (``inference_augmentation``), so the mean and the mutual information are over augmented, dropout-perturbed passes; the raw
    logits and measurements stay those of the study as it is. Models that need LGE skip patients
    without it. ``seed``: the MC passes drawn from it (``seeded``), not from the process's state."""
    with seeded(seed, device):
        return _predict(model, loader, device, mc_samples, progress, augment)


def _predict(model: nn.Module, loader, device: torch.device, mc_samples: int, progress: bool, augment: bool) -> dict:
    m = core(model)
    t_cal = float(getattr(m, "calibration", torch.ones(())))
    views = inference_augmentation() if augment and mc_samples > 1 else None
    probs, labels, unc, losses, index, logits, meas = [], [], [], [], [], [], []
    with mc_dropout(m, on=mc_samples > 1):
        for batch in tqdm(loader, desc="evaluating", unit="batch", disable=not progress, leave=False):
            batch = to_device(batch, device)
            keep = batch["has_lge"] if getattr(m, "requires_lge", False) else torch.ones_like(batch["label"], dtype=torch.bool)
            if not keep.any():
                continue
            batch = {k: (v[keep] if torch.is_tensor(v) and v.ndim and v.shape[0] == keep.shape[0] else v) for k, v in batch.items()}
            inputs = model_inputs(m, batch, training=False)
            h = m.embed(**inputs)
            with mc_dropout(m, on=False):
                logits.append(m.head(h).cpu())
                est = m.measure(h) if hasattr(m, "measure") else None
                if est is not None:
                    meas.append(est.cpu())
            k = max(1, mc_samples)
            sample = (lambda: h) if views is None else (lambda: m.embed(**_augmented(inputs, views)))
            p = torch.cat([_pass_probs(m, sample(), t_cal) for _ in range(k)])  # (K x members, B, C)
            mean = p.mean(0)
            ent = -(mean * mean.clamp_min(1e-12).log()).sum(-1)
            exp_ent = -(p * p.clamp_min(1e-12).log()).sum(-1).mean(0)
            probs.append(mean.cpu())
            unc.append((ent - exp_ent).clamp_min(0).cpu())
            losses.append(F.nll_loss(mean.clamp_min(1e-12).log(), batch["label"], reduction="none").cpu())
            labels.append(batch["label"].cpu())
            index.append(batch["index"].cpu())
    cat = lambda xs: torch.cat(xs).numpy() if xs else np.zeros((0,), dtype=np.float32)  # noqa: E731
    return {"probs": torch.cat(probs).numpy() if probs else np.zeros((0, 0)), "labels": cat(labels),
            "uncertainty": cat(unc), "loss": cat(losses), "index": cat(index),
            "logits": torch.cat(logits).numpy() if logits else np.zeros((0, 0)),
            "measurements": torch.cat(meas).numpy() if meas else None}


def evaluate(model: nn.Module, loader, device: torch.device, classes: list[str], mc_samples: int = 0,
             seed: int = 0, progress: bool = False, thresholds: dict | None = None, augment: bool = False) -> dict:
    return summarize(predict(model, loader, device, mc_samples, progress, augment), classes, mc_samples, seed,
                     thresholds)


def summarize(out: dict, classes: list[str], mc_samples: int = 0, seed: int = 0, thresholds: dict | None = None) -> dict:
    """The metrics of :func:`predict`'s per-patient outputs."""
    if len(out["labels"]) == 0:
        return {"n": 0}
    m = classification_metrics(out["probs"], out["labels"].astype(int), classes,
                               out["uncertainty"] if mc_samples > 1 else None, seed=seed, thresholds=thresholds)
    m["loss"] = float(out["loss"].mean())
    return m
