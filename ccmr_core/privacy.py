"""Patient-level differential privacy (DP-SGD with Opacus) for a site's local training.

One patient is one record. The noise multiplier is chosen once, for the whole run, so that
``rounds x local_epochs`` epochs of Poisson-sampled DP-SGD spend at most ``target_epsilon`` at
``delta`` (RDP accountant). The accountant's history travels between rounds (Flower re-creates
the client each round), epsilon and delta are reported every round, and a site whose next round
would exceed its budget declines to train.

Refused: DP-SGD with in-batch contrastive negatives. With in-batch InfoNCE, changing one patient
changes every other patient's per-sample gradient, so Opacus' epsilon would not hold (see
DESIGN.md, Privacy rules). Use ``model.alignment: slice`` (negatives from the patient's own
slices) or site-level DP.

The randomness that makes DP-SGD private, which patients a step samples and the Gaussian noise,
comes from generators seeded from the operating system's entropy at the site (``secret_generator``),
never from the run config: the coordinator chooses ``train.seed`` and knows the site's index, so noise
drawn from the seeded global generator could be replayed by the coordinator and subtracted from the
update, leaving no privacy at all. The noise is also drawn the floating-point-safe way (Opacus'
``secure_mode`` sampling, four draws per value; Holohan et al. 2021), though from torch's Mersenne
Twister rather than a cryptographic generator (torchcsprng does not exist for this torch).
"""

from __future__ import annotations

import copy
import json
import math
import os
import warnings
from dataclasses import dataclass, field

import torch
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn
from torch.utils.data import default_collate

from ccmr_core.config import ConfigError, ExperimentConfig
from ccmr_core.schedule import site_batch_size

# Opacus computes per-sample gradients in full backward hooks; on a model whose encoders are frozen
# the first trainable layer's input needs no gradient, and torch warns at every step that the hook
# fires with the output's gradient only, which is all Opacus reads. Expected, so not printed.
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with respect "
                        "to module outputs", category=UserWarning)


class BudgetExhausted(RuntimeError):
    """The site's next round would exceed its privacy budget."""


def check_dp_compatible(cfg: ExperimentConfig) -> None:
    if cfg.privacy.mode == "sample" and cfg.model.name == "cc-cmr" and cfg.alignment == "bank":
        raise ConfigError(
            "privacy.mode 'sample' (patient-level DP-SGD) cannot be combined with model.alignment 'bank': "
            "contrastive negatives from other patients couple patients, so the reported epsilon would be false. "
            "Set model.alignment to 'slice' (run config: alignment='slice') or use privacy.mode 'site'."
        )


@dataclass
class Ledger:
    """A site's privacy accounting across rounds (what the accountant needs, nothing else)."""

    noise_multiplier: float | None = None
    history: list[tuple[float, float, int]] = field(default_factory=list)  # (sigma, q, steps)

    def epsilon(self, delta: float, extra: tuple[float, float, int] | None = None) -> float:
        acc = RDPAccountant()
        acc.history = list(self.history) + ([extra] if extra else [])
        if not acc.history:
            return 0.0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "optimal order is the largest alpha" is not an error
            return float(acc.get_epsilon(delta))

    def to_json(self) -> str:
        return json.dumps({"noise_multiplier": self.noise_multiplier, "history": self.history})

    @classmethod
    def from_json(cls, text: str | None) -> Ledger:
        if not text:
            return cls()
        d = json.loads(text)
        return cls(d["noise_multiplier"], [tuple(h) for h in d["history"]])


def plan_noise(cfg: ExperimentConfig, n_patients: int) -> tuple[float, float, int]:
    """(noise multiplier, sample rate, steps per epoch) for the whole run's budget. As Opacus does
    with a loader of ``n_patients`` and the site's batch size B (``site_batch_size``): an epoch is
    ceil(N / B) Poisson-sampled steps at sample rate 1 / steps, so the plan is exactly what its
    accountant will record."""
    steps_per_epoch = max(1, math.ceil(max(n_patients, 1) / site_batch_size(cfg)))
    q = 1.0 / steps_per_epoch
    total = steps_per_epoch * cfg.federated.local_epochs * cfg.federated.rounds
    sigma = get_noise_multiplier(target_epsilon=cfg.privacy.target_epsilon, target_delta=cfg.privacy.delta,
                                 sample_rate=q, steps=total, accountant="rdp")
    return float(sigma), q, steps_per_epoch


def secret_generator(device: torch.device | str, seed: int | None = None) -> torch.Generator:
    """A generator on ``device`` seeded from the operating system's entropy, so that nobody outside
    this process, the coordinator included, can predict what it draws. ``seed``: tests only."""
    g = torch.Generator(device=device)
    g.manual_seed(int.from_bytes(os.urandom(8), "little") if seed is None else seed)
    return g


class PrivateTraining:
    """Wrap a model, optimiser and loader for one round of patient-level DP-SGD. ``noise_seed``
    repeats the sampling and the noise (tests only: a federation's site leaves it None, and nothing
    the coordinator sends can set it)."""

    def __init__(self, cfg: ExperimentConfig, ledger: Ledger, n_patients: int, noise_seed: int | None = None):
        check_dp_compatible(cfg)
        self.cfg = cfg
        self.noise_seed = noise_seed
        self.ledger = ledger
        sigma, self.q, self.steps_per_epoch = plan_noise(cfg, n_patients)
        if ledger.noise_multiplier is None:
            ledger.noise_multiplier = sigma

    def round_cost(self) -> tuple[float, float, int]:
        return (self.ledger.noise_multiplier, self.q, self.steps_per_epoch * self.cfg.federated.local_epochs)

    def check_budget(self) -> float:
        """Epsilon after the coming round; raises BudgetExhausted if it would exceed the target."""
        after = self.ledger.epsilon(self.cfg.privacy.delta, self.round_cost())
        if after > self.cfg.privacy.target_epsilon * (1 + 1e-6):
            spent = self.ledger.epsilon(self.cfg.privacy.delta)
            raise BudgetExhausted(
                f"privacy budget: epsilon spent {spent:.2f}, the next round would reach {after:.2f} > "
                f"target {self.cfg.privacy.target_epsilon:g} (delta {self.cfg.privacy.delta:g}); this site "
                "declines to train")
        return after

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer, loader):
        self.engine = PrivacyEngine(accountant="rdp")
        self.engine.accountant.history = list(self.ledger.history)
        device = next(model.parameters()).device
        model, optimizer, dp_loader = self.engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=self.ledger.noise_multiplier,
            max_grad_norm=self.cfg.privacy.max_grad_norm, poisson_sampling=True,
            noise_generator=secret_generator(device, self.noise_seed))
        # Opacus gives its Poisson sampler the generator of secure_mode only (None here: the global one,
        # which the round seeds from the run config); the sample must be as secret as the noise
        if not isinstance(dp_loader.batch_sampler, UniformWithReplacementSampler):  # another Opacus: refuse, not leak
            raise RuntimeError(f"Opacus' Poisson sampler is {type(dp_loader.batch_sampler).__name__}, not "
                               "UniformWithReplacementSampler: its generator cannot be made secret; DP-SGD refused")
        dp_loader.batch_sampler.generator = secret_generator("cpu", None if self.noise_seed is None
                                                             else self.noise_seed + 1)
        optimizer.secure_mode = True  # the noise only: sum of four draws / 2, robust to floating-point attacks
        # Poisson sampling can draw an empty first batch; Opacus then needs the batch structure (a
        # dict of tensors here) to build one, which it otherwise learns from a first non-empty batch.
        # Only the shapes and dtypes of this collated sample are used, with a batch size of 0.
        collate = getattr(dp_loader, "collate_fn", None)
        if collate is not None and getattr(collate, "first_batch", "absent") is None and len(loader.dataset):
            collate.first_batch = default_collate([loader.dataset[0]])
        return model, optimizer, dp_loader

    def finish(self) -> float:
        self.ledger.history = [tuple(h) for h in copy.deepcopy(self.engine.accountant.history)]
        return self.ledger.epsilon(self.cfg.privacy.delta)


def strip_opacus_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Opacus wraps the model as ``_module``; weights leaving a site carry the plain names."""
    return {(k[len("_module."):] if k.startswith("_module.") else k): v for k, v in state.items()}


def clip_update(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
                max_norm: float) -> tuple[dict[str, torch.Tensor], float]:
    """Site-level DP with clipping at the site (used under secure aggregation, where the
    coordinator cannot clip what it cannot see): scale the update ``state - reference`` so its
    L2 norm over all floating-point tensors is at most ``max_norm``. Returns the clipped state and
    the update's norm before clipping."""
    deltas = {k: state[k].double() - reference[k].double() for k in state if state[k].is_floating_point()}
    norm = float(torch.sqrt(sum((d * d).sum() for d in deltas.values()))) if deltas else 0.0
    scale = min(1.0, max_norm / norm) if norm > 0 else 1.0
    out = {k: ((reference[k].double() + deltas[k] * scale).to(v.dtype) if k in deltas else v)
           for k, v in state.items()}
    return out, norm
