"""Building blocks. GroupNorm (per-sample statistics) instead of BatchNorm, no in-place
activations, learnable scalars inside single-input leaf modules: what Opacus needs."""

from __future__ import annotations

import torch
from opacus.grad_sample import register_grad_sampler
from torch import nn


def gn(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=min(8, c), num_channels=c)


class R2Plus1D(nn.Module):
    """(2+1)D block: spatial (1,3,3) convolution, then temporal (3,1,1) convolution."""

    def __init__(self, cin: int, cout: int, s_stride: int = 2, t_stride: int = 1):
        super().__init__()
        self.spatial = nn.Conv3d(cin, cout, (1, 3, 3), stride=(1, s_stride, s_stride), padding=(0, 1, 1), bias=False)
        self.gn1 = gn(cout)
        self.temporal = nn.Conv3d(cout, cout, (3, 1, 1), stride=(t_stride, 1, 1), padding=(1, 0, 0), bias=False)
        self.gn2 = gn(cout)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.gn2(self.temporal(self.act(self.gn1(self.spatial(x))))))


class Conv2dBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 2):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.norm = gn(cout)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class SliceMixer(nn.Module):
    """(B, S, D) slice features -> (B, D): keeps where along the long axis each feature is
    (regional disease is not the same at base and apex)."""

    def __init__(self, slices: int, dim: int):
        super().__init__()
        self.proj = nn.Linear(slices * dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x.flatten(1)))


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

    def forward(self, sim: torch.Tensor) -> torch.Tensor:
        return self.v.clamp(max=self.max_log).exp() * sim


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
