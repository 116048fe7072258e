"""FedProx/FedAvg from Flower with what the coordinator needs on top: declined sites (privacy
budget) are left out of the average, every update is screened before it is averaged (shapes,
finite values, norm; server/screening.py), an optional robust aggregator, and each round's
aggregated metrics are kept for the run log."""

from __future__ import annotations

import logging
from typing import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    FedProx,
)

from ccmr_core.console import warn
from ccmr_core.files import append_jsonl
from protocol import messages as proto
from server.screening import robust_aggregate, screen

log = logging.getLogger("ccmr.server")


def _trained(msg: Message) -> bool:
    if not msg.has_content():
        return True  # errors are logged and skipped by Flower itself
    m = next(iter(msg.content.metric_records.values()), {})
    return float(m.get(proto.NUM_EXAMPLES, 1.0)) > 0


class RoundLog:
    """Mixin: remember the last aggregated train/evaluate metrics and inject the global round."""

    round_offset: int = 0
    last_train: MetricRecord | None = None
    last_eval: MetricRecord | None = None
    max_update_ratio: float = 10.0
    max_site_weight: float = 1000.0
    aggregator: str = "mean"
    trim_fraction: float = 0.2
    sent: ArrayRecord | None = None
    rejected: tuple | list = ()  # this round's rejections (a new list each round)
    kept_count: int = 0  # updates in the last round's mean
    audit_path = None  # the coordinator's audit log (run folder/audit.jsonl): what it sent and received
    secure = False  # train rounds run as SecAgg+: the grid audits the protocol messages instead

    def _audit(self, server_round: int, direction: str, kind: str, messages) -> None:
        if self.secure and kind == "train":
            return
        self.audit_messages(self.round_offset + server_round, direction, kind, messages)

    def audit_messages(self, rnd: int, direction: str, kind: str, messages) -> None:
        if self.audit_path is None:
            return
        rows = []
        for m in messages:
            if not m.has_content():
                continue
            node = m.metadata.dst_node_id if direction == "sent" else m.metadata.src_node_id
            rows.append(proto.audit_entry(m.content, round=rnd, direction=direction, kind=kind, node=node))
        append_jsonl(self.audit_path, rows)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        config[proto.ROUND] = self.round_offset + server_round
        self.sent = arrays
        msgs = list(super().configure_train(server_round, arrays, config, grid))
        self._audit(server_round, "sent", "train", msgs)
        return msgs

    def _screen(self, server_round: int, replies: list[Message]) -> list[Message]:
        with_arrays = [r for r in replies if r.has_content() and r.content.array_records]
        if self.sent is None or not with_arrays:
            return replies
        updates = [(r.metadata.src_node_id, next(iter(r.content.array_records.values()))) for r in with_arrays]
        weights = [float(next(iter(r.content.metric_records.values()), {}).get(self.weighted_by_key, float("nan")))
                   for r in with_arrays]
        keep, rejected = screen(updates, self.sent, self.max_update_ratio, weights, self.max_site_weight)
        self.rejected = [{"round": self.round_offset + server_round, "node": rj.node_id, "reason": rj.reason}
                         for rj in rejected]
        for rj in self.rejected:
            msg = f"round {rj['round']}: update from SuperNode {rj['node']} rejected: {rj['reason']}"
            warn(log, msg)
        bad = {id(with_arrays[i]) for i in range(len(with_arrays)) if i not in keep}
        return [r for r in replies if id(r) not in bad]

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        config[proto.ROUND] = self.round_offset + server_round
        msgs = list(super().configure_evaluate(server_round, arrays, config, grid))
        self._audit(server_round, "sent", "evaluate", msgs)
        return msgs

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        self._audit(server_round, "received", "train", replies)
        replies = self._screen(server_round, replies)
        kept = [r for r in replies if _trained(r)]
        self.kept_count = sum(1 for r in kept if r.has_content())
        arrays, metrics = super().aggregate_train(server_round, kept) if kept else (None, None)
        if arrays is not None and self.aggregator != "mean":
            recs = [next(iter(r.content.array_records.values())) for r in kept if r.has_content()]
            arrays = robust_aggregate(recs, self.aggregator, self.trim_fraction)
        if metrics is None and replies:  # nobody trained: still report epsilon and declines
            ok = [r.content for r in replies if r.has_content()]
            metrics = self.train_metrics_aggr_fn(ok, self.weighted_by_key) if ok else None
        self.last_train = metrics
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        self._audit(server_round, "received", "evaluate", replies)
        # a site that refused the request (its policy, or its egress guard) has nothing to pool
        replies = [r for r in replies if not (r.has_content() and proto.is_refused(r.content))]
        self.last_eval = super().aggregate_evaluate(server_round, replies) if replies else None
        return self.last_eval


class CCMRFedProx(RoundLog, FedProx):
    pass


class CCMRFedAvg(RoundLog, FedAvg):
    pass


class CCMRFedAvgM(RoundLog, FedAvg):
    """FedAvgM (Hsu et al. 2019): the coordinator steps along a momentum of the mean of the screened
    updates, sending FedProx's proximal weight to the sites as Flower's FedProx does (0 = none).

    Flower's FedAvgM applies the momentum to every array of the model. Here it applies only to the
    weights some site changed this round: buffers (``plain_keys``; e.g. CC-CMR's 0/1 flag that the
    student exists, which a momentum would push to 1.5) and the weights frozen in the current stage
    (the student before it starts, the teacher after) take the plain mean, and their momentum is
    dropped. The momentum lives in the coordinator's memory: a resumed run starts it from zero."""

    def __init__(self, proximal_mu: float = 0.0, server_learning_rate: float = 1.0, server_momentum: float = 0.0,
                 **kw):
        super().__init__(**kw)
        self.proximal_mu = proximal_mu
        self.server_learning_rate, self.server_momentum = server_learning_rate, server_momentum
        self.plain_keys: set[str] = set()
        self.velocity: dict[str, np.ndarray] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        config[proto.PROXIMAL_MU] = self.proximal_mu
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None or self.sent is None:
            return arrays, metrics
        out = {}
        for key in arrays.keys():
            old, mean = self.sent[key].numpy(), arrays[key].numpy()
            step = old - mean  # the pseudo-gradient
            if key in self.plain_keys or not np.any(step):
                self.velocity.pop(key, None)
                out[key] = arrays[key]
                continue
            v = self.server_momentum * self.velocity[key] + step if key in self.velocity else step
            self.velocity[key] = v
            out[key] = Array(np.asarray(old - self.server_learning_rate * v, dtype=old.dtype))
        return ArrayRecord(out), metrics


def make_strategy(fed, common: dict, plain_keys: Iterable[str] = ()):
    """The coordinator's strategy for ``fed`` (FederatedConfig): FedProx or FedAvg, as FedAvgM when the
    coordinator keeps a momentum or steps with a learning rate other than 1 (``plain_keys``: the
    model's buffers, averaged without it)."""
    mu = fed.proximal_mu if fed.strategy == "fedprox" else 0.0
    if fed.server_momentum > 0 or fed.server_lr != 1.0:
        s = CCMRFedAvgM(proximal_mu=mu, server_learning_rate=fed.server_lr, server_momentum=fed.server_momentum,
                        **common)
        s.plain_keys = set(plain_keys)
        return s
    return CCMRFedProx(proximal_mu=mu, **common) if fed.strategy == "fedprox" else CCMRFedAvg(**common)


class NoiseForTheMean:
    """Site-level DP (mixin for Flower's fixed-clipping wrappers). Flower sizes the Gaussian noise
    for the number of sites configured at the start (stdev = noise_multiplier x clipping_norm /
    num_sampled_clients). When fewer updates make up a round's mean (a site dropped out, declined,
    refused or was rejected), each weighs more, so the noise is sized for the updates actually
    averaged; otherwise that round's guarantee would be weaker than the epsilon reported."""

    def _add_noise_to_aggregated_arrays(self, aggregated_arrays):
        configured = self.num_sampled_clients
        k = int(getattr(self.strategy, "kept_count", 0) or 0)
        if 0 < k < configured:
            self.num_sampled_clients = k
            msg = (f"site-level DP: {k} of {configured} sites in this round's mean; noise sized for {k} "
                   f"(stdev {self.noise_multiplier * self.clipping_norm / k:.4f})")
            warn(log, msg)
        try:
            return super()._add_noise_to_aggregated_arrays(aggregated_arrays)
        finally:
            self.num_sampled_clients = configured


class ServerSideClippingDP(NoiseForTheMean, DifferentialPrivacyServerSideFixedClipping):
    pass


class ClientSideClippingDP(NoiseForTheMean, DifferentialPrivacyClientSideFixedClipping):
    pass
