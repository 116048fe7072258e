"""FedProx/FedAvg from Flower with what the coordinator needs on top: declined sites (privacy
budget) are left out of the average, and each round's aggregated metrics are kept for the run log."""

from __future__ import annotations

from typing import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedProx


def _trained(msg: Message) -> bool:
    if not msg.has_content():
        return True  # errors are logged and skipped by Flower itself
    m = next(iter(msg.content.metric_records.values()), {})
    return float(m.get("num-examples", 1.0)) > 0


class RoundLog:
    """Mixin: remember the last aggregated train/evaluate metrics and inject the global round."""

    round_offset: int = 0
    last_train: MetricRecord | None = None
    last_eval: MetricRecord | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        config["global-round"] = self.round_offset + server_round
        return super().configure_train(server_round, arrays, config, grid)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        config["global-round"] = self.round_offset + server_round
        return super().configure_evaluate(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        kept = [r for r in replies if _trained(r)]
        if len(kept) < len(replies):
            self.declined_this_round = len(replies) - len(kept)
        arrays, metrics = super().aggregate_train(server_round, kept) if kept else (None, None)
        if metrics is None and replies:  # nobody trained: still report epsilon and declines
            ok = [r.content for r in replies if r.has_content()]
            metrics = self.train_metrics_aggr_fn(ok, self.weighted_by_key) if ok else None
        self.last_train = metrics
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        self.last_eval = super().aggregate_evaluate(server_round, replies)
        return self.last_eval


class CCMRFedProx(RoundLog, FedProx):
    pass


class CCMRFedAvg(RoundLog, FedAvg):
    pass
