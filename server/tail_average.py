"""Tail averaging of the global model (Polyak-Ruppert iterate averaging).

With ``federated.average_last`` N > 0 the model the run ends with is the mean of the global models
of its last N rounds, counting only rounds of the run's last stage (CC-CMR's student: averaging
across a stage change would mix two different models). Under DP-SGD each round's global model
carries fresh noise; their mean keeps what the rounds agree on (De et al. 2022 average their
private iterates the same way). It is post-processing of what the sites sent, so it costs no
privacy, and the sites' training is unchanged: they always continue from the latest round.

The running mean travels in the coordinator's checkpoint, so a resumed run ends with the same
model as one that never stopped.
"""

from __future__ import annotations

import torch

from ccmr_core.schedule import federated_plan


def first_averaged_round(cfg, model) -> int | None:
    """The first round whose global model enters the mean (1-based), or None when the run keeps its
    last round's model (``federated.average_last`` 0)."""
    f = cfg.federated
    if f.average_last <= 0:
        return None
    last_stage_round = federated_plan(model, cfg).bounds()[-1][1] // f.local_epochs + 1
    return max(f.rounds - f.average_last + 1, last_stage_round)


class TailAverage:
    """The running mean of the global models from round ``first`` on (``first`` None: none)."""

    def __init__(self, first: int | None):
        self.first = first
        self.n = 0
        self.mean: dict[str, torch.Tensor] | None = None

    def add(self, rnd: int, state: dict[str, torch.Tensor]) -> None:
        if self.first is None or rnd < self.first:
            return
        self.n += 1
        if self.mean is None:
            self.mean = {k: v.detach().clone() for k, v in state.items()}
            return
        for k, v in state.items():  # floating-point weights and buffers: the mean; the others: the latest
            self.mean[k] = self.mean[k] + (v - self.mean[k]) / self.n if v.is_floating_point() else v.clone()

    def result(self, latest: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model to end the run with: the mean when any round entered it, else ``latest``."""
        return latest if self.mean is None else self.mean

    def describe(self, last_round: int) -> str | None:
        if self.mean is None:
            return None
        return (f"final model: the mean of the global models of rounds {last_round - self.n + 1}-{last_round} "
                f"(federated.average_last)")

    # --- resume: the running mean is part of the coordinator's checkpoint --------------------
    def snapshot(self) -> dict | None:
        return None if self.mean is None else {"n": self.n, "mean": self.mean}

    def restore(self, saved: dict | None) -> None:
        if saved:
            self.n, self.mean = int(saved["n"]), dict(saved["mean"])
