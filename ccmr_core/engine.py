"""The one training and evaluation loop: central training, the Flower ClientApp and the
benchmarks all call these functions.

FedProx is applied as a decoupled proximal step after each optimiser step,
``w <- w - lr * mu * (w - w_global)``. For SGD this is exactly the gradient of
mu/2 * ||w - w_global||^2; unlike a term added to the loss it still acts under DP-SGD, where
Opacus replaces the gradients with clipped, noised per-sample gradients (and, being
post-processing of private weights, it costs no privacy). ``mu = 0`` is FedAvg.
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


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _prox_step(model: nn.Module, global_params: list[torch.Tensor], mu: float, lr: float) -> None:
    with torch.no_grad():
        for p, g in zip(core(model).parameters(), global_params):
            p.sub_(lr * mu * (p - g))


def train_epoch(
    model: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    *,
    prox_mu: float = 0.0,
    global_params: list[torch.Tensor] | None = None,
    progress: bool = False,
    desc: str = "training",
) -> dict[str, float]:
    """One pass over ``loader``; returns the mean loss, each task's mean and the time taken."""
    model.train()
    if prox_mu > 0 and global_params is None:
        raise ValueError("FedProx needs the global parameters (global_params) when prox_mu > 0")
    sums: dict[str, float] = {}
    n_total, t0 = 0, time.perf_counter()
    for batch in tqdm(loader, desc=desc, unit="batch", disable=not progress, leave=False):
        batch = to_device(batch, device)
        optimizer.zero_grad(set_to_none=True)
        out = model(**model_inputs(model, batch, training=True))
        total, parts = core(model).losses(out, batch)
        n = int(total.shape[0])
        loss = total.mean() if n else total.sum()
        loss.backward()
        optimizer.step()
        if prox_mu > 0:
            _prox_step(model, global_params, prox_mu, optimizer.param_groups[0]["lr"])
        n_total += n
        sums["loss"] = sums.get("loss", 0.0) + float(total.detach().sum())
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach().sum())
    out = {k: v / max(n_total, 1) for k, v in sums.items()}
    out.update(n=float(n_total), seconds=time.perf_counter() - t0)
    return out


@contextmanager
def mc_dropout(model: nn.Module, on: bool):
    """Evaluation mode with dropout left active (MC dropout) when ``on``."""
    was = model.training
    model.eval()
    if on:
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.train()
    try:
        yield
    finally:
        model.train(was)


@torch.no_grad()
def predict(model: nn.Module, loader, device: torch.device, mc_samples: int = 0, progress: bool = False) -> dict:
    """Per-patient outputs of the inference path: mean class probabilities over ``mc_samples``
    MC-dropout passes of the head, epistemic uncertainty (mutual information between the
    prediction and the dropout mask, in nats; 0 without MC), the cine-head loss, labels and
    dataset indices. Models that need LGE skip patients without it."""
    m = core(model)
    probs, labels, unc, losses, index = [], [], [], [], []
    with mc_dropout(m, on=mc_samples > 1):
        for batch in tqdm(loader, desc="evaluating", unit="batch", disable=not progress, leave=False):
            batch = to_device(batch, device)
            keep = batch["has_lge"] if getattr(m, "requires_lge", False) else torch.ones_like(batch["label"], dtype=torch.bool)
            if not keep.any():
                continue
            batch = {k: (v[keep] if torch.is_tensor(v) and v.ndim and v.shape[0] == keep.shape[0] else v) for k, v in batch.items()}
            h = m.embed(**model_inputs(m, batch, training=False))
            k = max(1, mc_samples)
            p = torch.stack([F.softmax(m.head(h), dim=-1) for _ in range(k)])  # (K, B, C)
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
            "uncertainty": cat(unc), "loss": cat(losses), "index": cat(index)}


def evaluate(model: nn.Module, loader, device: torch.device, classes: list[str], mc_samples: int = 0,
             seed: int = 0, progress: bool = False) -> dict:
    out = predict(model, loader, device, mc_samples, progress)
    if len(out["labels"]) == 0:
        return {"n": 0}
    m = classification_metrics(out["probs"], out["labels"].astype(int), classes,
                               out["uncertainty"] if mc_samples > 1 else None, seed=seed)
    m["loss"] = float(out["loss"].mean())
    return m
