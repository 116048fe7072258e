"""Building blocks. GroupNorm (per-sample statistics) instead of BatchNorm, no in-place
activations, learnable scalars inside single-input leaf modules: what Opacus needs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from opacus.grad_sample import register_grad_sampler
from torch import nn


def gn(c: int) -> nn.GroupNorm:
    groups = next(g for g in (8, 4, 2, 1) if c % g == 0)
    return nn.GroupNorm(num_groups=groups, num_channels=c)


class Compilable(nn.Module):
    """A module whose computation ``train.compile`` can route through one compiled function
    (ccmr_core/models/compiled.py): ``runner(fn, x)`` instead of ``fn(x)``. A class attribute,
    not state: the state dict and the weights are the same either way."""

    runner = None

    def routed(self, fn, x: torch.Tensor):
        return fn(x) if self.runner is None else self.runner(fn, x)


class FrameEncoder(Compilable):
    """A 2D CNN run on every image of a patient at once: (B, 1, D, H, W) -> (B, C, D, H/8, W/8).

    The images (slices x frames of a cine, or slices of an LGE stack) lie on the depth axis of
    (1, 3, 3) convolutions, so the patient stays the first dimension (per-patient gradients for
    DP-SGD) while every image is processed in one batched call. Three stages, each a strided
    and a plain convolution; widths ``width``, 2 ``width``, 4 ``width``."""

    def __init__(self, width: int = 8):
        super().__init__()
        layers, cin = [], 1
        for w in (width, 2 * width, 4 * width):
            layers += [nn.Conv3d(cin, w, (1, 3, 3), (1, 2, 2), (0, 1, 1), bias=False), gn(w), nn.SiLU(),
                       nn.Conv3d(w, w, (1, 3, 3), 1, (0, 1, 1), bias=False), gn(w), nn.SiLU()]
            cin = w
        self.body = nn.Sequential(*layers)
        self.channels = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.routed(self.body, x)


class TemporalConv(nn.Module):
    """Residual convolution along the cardiac cycle (depth axis of (B, C, T, H, W)), circular in
    time because the cycle is periodic: frame 0 follows the last frame."""

    def __init__(self, c: int, dilation: int = 1):
        super().__init__()
        self.d = dilation
        self.conv = nn.Conv3d(c, c, (3, 1, 1), dilation=(dilation, 1, 1), bias=False)
        self.norm = gn(c)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.pad(x, (0, 0, 0, 0, self.d, self.d), mode="circular")
        return x + self.act(self.norm(self.conv(y)))


class SlicePool(nn.Module):
    """(B, C, S) slice features -> (B, C x J): J learned weightings of the slices, so the pooled
    feature keeps where along the long axis it was seen (base, mid, apex) with J x S weights
    instead of a flatten-and-project of every slice."""

    def __init__(self, slices: int, pools: int = 4):
        super().__init__()
        self.weights = nn.Linear(slices, pools, bias=False)
        with torch.no_grad():
            self.weights.weight.copy_(torch.linspace(-1, 1, pools)[:, None] * torch.linspace(-1, 1, slices)[None] / slices
                                      + 1.0 / slices)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weights(x).flatten(1)


class Temperature(nn.Module):
    """A learnable (or fixed) contrastive temperature as its own leaf module: scales a similarity
    matrix by exp(v), v initialised to log(1/t0)."""

    def __init__(self, t0: float = 0.07, learnable: bool = True, max_scale: float = 100.0):
        super().__init__()
        v = torch.tensor(1.0 / t0).log()
        if learnable:
            self.v = nn.Parameter(v)
        else:
            self.register_buffer("v", v)
        self.max_log = float(torch.tensor(max_scale).log())

    def scale(self) -> torch.Tensor:
        """exp(v), capped at ``max_scale``: 1 / the temperature."""
        return self.v.clamp(max=self.max_log).exp()

    def forward(self, sim: torch.Tensor) -> torch.Tensor:
        return self.scale() * sim


class TaskWeighting(nn.Module):
    """Uncertainty-guided multi-task weighting (Kendall, Gal & Cipolla, CVPR 2018).

    Input: (B, K, 2), per-sample task losses and whether the task applies to that sample (a
    patient without LGE has no alignment term). Output: per-sample total (B,) =
    sum_k m_k (exp(-s_k) * L_k + s_k), with s_k = log sigma_k^2 learned. Tasks with noisy or
    hard losses get down-weighted; the +s_k term stops the weights from collapsing to zero.
    One batched input keeps the module per-sample, so DP-SGD can clip it like any layer."""

    def __init__(self, tasks: list[str]):
        super().__init__()
        self.tasks = list(tasks)
        self.log_vars = nn.Parameter(torch.zeros(len(tasks)))

    def forward(self, losses_and_mask: torch.Tensor) -> torch.Tensor:
        losses, mask = losses_and_mask.unbind(-1)
        return (mask * (torch.exp(-self.log_vars) * losses + self.log_vars)).sum(-1)

    def weights(self) -> dict[str, float]:
        return {t: float(torch.exp(-v)) for t, v in zip(self.tasks, self.log_vars.detach())}


# --- per-sample gradients for DP-SGD ---------------------------------------------------------
# Closed-form per-sample gradients of the two custom layers, registered with Opacus. Without them
# Opacus falls back to functorch's vmap, which fails on the empty batches Poisson sampling
# produces (and is slower).


@register_grad_sampler(Temperature)
def _temperature_grad_sample(layer: Temperature, activations, backprops: torch.Tensor) -> dict:
    if not isinstance(layer.v, nn.Parameter) or not layer.v.requires_grad:
        return {}
    sim = activations[0]
    scale = layer.v.clamp(max=layer.max_log).exp() * (layer.v <= layer.max_log).to(sim.dtype)
    return {layer.v: (backprops * sim * scale).flatten(1).sum(1)}


@register_grad_sampler(TaskWeighting)
def _task_weighting_grad_sample(layer: TaskWeighting, activations, backprops: torch.Tensor) -> dict:
    losses, mask = activations[0].unbind(-1)  # (B, K) each; backprops (B,)
    return {layer.log_vars: backprops[:, None] * mask * (1 - torch.exp(-layer.log_vars) * losses)}
