"""The coordinator's strategy: Flower's FedProx, FedAvg, FedAvgM, FedMedian or FedTrimmedAvg, with
what a federation of hospitals needs on top of each round (``CoordinatorRounds``): the run's
round number in every request, every message written to the coordinator's audit log
(server/recorder.MessageAudit), every update screened before it is averaged
(server/screening.Screening), sites that declined (privacy budget) or refused left out of the
average, and the round's aggregated metrics kept for the run log."""

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
    FedMedian,
    FedProx,
    FedTrimmedAvg,
)

from ccmr_core.console import warn
from protocol import messages as proto
from server.recorder import MessageAudit
from server.screening import Screening, check_shapes

log = logging.getLogger("ccmr.server")


def _trained(msg: Message) -> bool:
    if not msg.has_content():
        return True  # errors are logged and skipped by Flower itself
    return float(proto.reply_metrics(msg.content).get(proto.NUM_EXAMPLES, 1.0)) > 0


class CoordinatorRounds:
    """Mixin placed before a Flower strategy: what the coordinator adds to each of its rounds.

    ``round_offset``: rounds done before (a resumed run keeps counting); ``screening``: the checks an
    update passes before it is averaged; ``audit``: where the messages are written down (None: not);
    ``evaluate_every``: the sites validate the global model only in rounds that are a multiple of it
    and in ``final_round`` (the other rounds are one message phase). ``validate_on_train``: instead,
    from the second round on, each train request asks the sites to validate the model it carries
    (the previous round's) before training on it, and the validation rides on the train reply: one
    message phase per round, an evaluate phase only in ``final_round``. After each round
    ``last_round()`` gives its aggregated train and evaluation metrics, with this round's rejected
    updates, and ``previous_validation`` the validation carried by this round's train replies.
    ``parameter_shapes``: the model's trainable parameters by name (what a control variate, a
    momentum or a checkpoint of them is checked against; None: not checked)."""

    def __init__(self, *, round_offset: int = 0, screening: Screening | None = None,
                 audit: MessageAudit | None = None, evaluate_every: int = 1, final_round: int | None = None,
                 validate_on_train: bool = False, parameter_shapes: dict[str, tuple[int, ...]] | None = None,
                 **kw):
        # shape-and-dtype stand-ins of the model's trainable parameters (no memory) for screening.check_shapes;
        # set before the mixins after this one (ControlVariates) are initialised
        self.parameters = (None if parameter_shapes is None else
                           {k: np.broadcast_to(np.float32(0), tuple(shape)) for k, shape in parameter_shapes.items()})
        super().__init__(**kw)
        self.round_offset = round_offset
        self.evaluate_every, self.final_round = evaluate_every, final_round
        self.validate_on_train = validate_on_train
        self.previous_validation: MetricRecord | None = None
        self.screening = screening or Screening()
        self.audit = audit
        self.sent: ArrayRecord | None = None  # the global model sent in this round
        self.rejected: list[dict] = []  # this round's rejected updates
        self.kept_count = 0  # updates in this round's mean (site-level DP sizes its noise by it)
        self.last_train: MetricRecord | None = None
        self.last_eval: MetricRecord | None = None

    def carried(self) -> dict[str, np.ndarray]:
        """What the aggregation carries from one round to the next besides the model (SCAFFOLD's c,
        FedAvgM's momentum), keyed "<what>/<parameter>": the checkpoint keeps it, so that a resumed
        run goes on with it instead of starting it from zero. A mixin names what it carries in
        ``carried_names`` (attributes holding dicts of arrays by parameter name)."""
        return {f"{what}/{k}": v for what in getattr(self, "carried_names", ()) for k, v in getattr(self, what).items()}

    def restore_carried(self, saved: dict | None) -> None:
        """Take back what ``carried()`` gave to a checkpoint (arrays or CPU tensors by name, as the
        checkpoint holds them). Each array is checked against the model's parameters
        (``parameter_shapes``: name, shape, finite); a checkpoint that carries something this run's
        aggregation does not keep (another strategy) is left, with a note."""
        names = tuple(getattr(self, "carried_names", ()))
        by_what: dict[str, dict[str, np.ndarray]] = {}
        for key, value in (saved or {}).items():
            what, _, name = key.partition("/")
            by_what.setdefault(what, {})[name] = np.asarray(value, dtype=np.float32)
        for what, arrays in by_what.items():
            if what not in names:
                print(f"resume: the checkpoint carries {what!r} of another aggregation than this run's; left "
                      "unused", flush=True)
                continue
            problem = check_shapes(arrays, self.parameters, subset=True) if self.parameters is not None else None
            if problem:
                raise ValueError(f"resume: the checkpoint's {what!r} does not fit this model: {problem}; start a "
                                 "new run folder, or resume with the settings the run was started with")
            setattr(self, what, arrays)

    def _audit(self, server_round: int, direction: str, kind: str, messages) -> None:
        if self.audit is not None:
            self.audit.record(self.round_offset + server_round, direction, kind, messages)

    def last_round(self) -> tuple[dict | None, dict | None]:
        train = dict(self.last_train) if self.last_train else None
        if self.rejected:
            train = {**(train or {}), "rejected": list(self.rejected)}
        return train, dict(self.last_eval) if self.last_eval else None

    def validated_by_next_train(self, server_round: int) -> bool:
        """Whether the sites validate this round's model with the next round's train replies."""
        return self.validate_on_train and self.fraction_evaluate > 0 and server_round != self.final_round

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        config[proto.ROUND] = self.round_offset + server_round
        if server_round > 1 and self.validated_by_next_train(server_round - 1):
            config[proto.VALIDATE] = True  # arrays = the model of the round before
        else:
            config.pop(proto.VALIDATE, None)
        self.sent = arrays
        msgs = list(super().configure_train(server_round, arrays, config, grid))
        self._audit(server_round, "sent", "train", msgs)
        return msgs

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        rnd = self.round_offset + server_round
        if (self.validate_on_train or rnd % self.evaluate_every) and server_round != self.final_round:
            return []  # no evaluation phase this round
        config[proto.ROUND] = rnd
        msgs = list(super().configure_evaluate(server_round, arrays, config, grid))
        self._audit(server_round, "sent", "evaluate", msgs)
        return msgs

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        self._audit(server_round, "received", "train", replies)
        carried = []
        for r in replies:
            if r.has_content() and not proto.is_refused(r.content):
                r.content, validation = proto.split_validation(r.content)
                carried += [validation] if validation is not None else []
        self.previous_validation = self.evaluate_metrics_aggr_fn(carried, self.weighted_by_key) if carried else None
        replies, rejected = self.screening.apply(replies, self.sent, self.weighted_by_key)
        self.rejected = [{"round": self.round_offset + server_round, "node": rj.node_id, "reason": rj.reason}
                         for rj in rejected]
        for rj in self.rejected:
            warn(log, f"round {rj['round']}: update from SuperNode {rj['node']} rejected: {rj['reason']}")
        kept = [r for r in replies if _trained(r)]
        self.kept_count = sum(1 for r in kept if r.has_content())
        arrays, metrics = super().aggregate_train(server_round, kept) if kept else (None, None)
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


class ProximalWeight:
    """Mixin: send FedProx's proximal weight to the sites, as Flower's FedProx does, from a strategy
    that is not FedProx (the sites' local objective is independent of how the coordinator averages)."""

    def __init__(self, *, proximal_mu: float = 0.0, **kw):
        super().__init__(**kw)
        self.proximal_mu = proximal_mu

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        config[proto.PROXIMAL_MU] = self.proximal_mu
        return super().configure_train(server_round, arrays, config, grid)


class ControlVariates:
    """Mixin between CoordinatorRounds and Flower's FedProx / FedAvg: SCAFFOLD's coordinator side
    (``federated.drift_correction`` 'scaffold'; a site's side is ccmr_core/drift.py). The coordinator
    keeps c, the weighted mean of the sites' control variates; sends it with every train request
    once it has one; and adds to it the weighted mean of the changes the sites return, times the
    share of the federation's SuperNodes that returned one (SCAFFOLD's |S|/N; N: all SuperNodes
    connected, not only those sampled this round). A change whose names or
    shapes are not the model's parameters', or that is not finite, is left out (with a warning).
    c goes into every round's checkpoint (``carried``): a resumed run goes on with it, and each site
    with the c_i it had then (client/local.read_control). Needs CoordinatorRounds'
    ``parameter_shapes``."""

    carried_names = ("control",)

    def __init__(self, **kw):
        super().__init__(**kw)
        if self.parameters is None:
            raise ValueError("drift_correction 'scaffold' needs the model's parameter shapes (parameter_shapes)")
        self.control: dict[str, np.ndarray] = {}
        self.population = 0

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        msgs = list(super().configure_train(server_round, arrays, config, grid))
        self.population = max(len(msgs), len(list(grid.get_node_ids())))  # SCAFFOLD's N: all, not the sampled
        if self.control:
            for m in msgs:
                m.content[proto.CONTROL] = ArrayRecord({k: Array(v) for k, v in self.control.items()})
        return msgs

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        changes, weights = [], []
        for r in replies:
            if not r.has_content() or proto.CONTROL not in r.content.array_records:
                continue
            rec = r.content.array_records[proto.CONTROL]
            del r.content[proto.CONTROL]  # Flower's mean takes exactly one ArrayRecord per reply
            change = {k: rec[k].numpy() for k in rec.keys()}
            problem = check_shapes(change, self.parameters, subset=True)
            if problem:
                warn(log, f"SuperNode {r.metadata.src_node_id}: its control variate left out: {problem}")
                continue
            changes.append({k: v.astype(np.float64) for k, v in change.items()})
            weights.append(float(proto.reply_metrics(r.content).get(self.weighted_by_key, 0.0)))
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None and changes and sum(weights) > 0:
            share = len(changes) / max(self.population, len(changes))
            total = sum(weights)
            for k in set().union(*changes):
                step = sum(w * ch[k] for ch, w in zip(changes, weights) if k in ch) * (share / total)
                self.control[k] = np.asarray(self.control[k] + step if k in self.control else step, dtype=np.float32)
        return arrays, metrics


class CCMRFedProx(CoordinatorRounds, FedProx):
    pass


class CCMRFedAvg(CoordinatorRounds, FedAvg):
    pass


class CCMRScaffoldProx(CoordinatorRounds, ControlVariates, FedProx):
    """FedProx's mean with SCAFFOLD's control variates."""


class CCMRScaffoldAvg(CoordinatorRounds, ControlVariates, FedAvg):
    """FedAvg's mean with SCAFFOLD's control variates."""


class CCMRFedMedian(CoordinatorRounds, ProximalWeight, FedMedian):
    """Coordinate-wise median of the screened updates (unweighted): one site cannot move it far."""


class CCMRFedTrimmedAvg(CoordinatorRounds, ProximalWeight, FedTrimmedAvg):
    """Coordinate-wise mean after cutting the ``beta`` share of highest and lowest values (unweighted)."""


class CCMRFedAvgM(CoordinatorRounds, ProximalWeight, FedAvg):
    """FedAvgM (Hsu et al. 2019): the coordinator steps along a momentum of the mean of the screened
    updates, sending FedProx's proximal weight to the sites as Flower's FedProx does (0 = none).

    Flower's FedAvgM applies the momentum to every array of the model. Here it applies only to the
    weights some site changed this round: buffers (``plain_keys``; e.g. CC-CMR's 0/1 flag that the
    student exists, which a momentum would push to 1.5) and the weights frozen in the current stage
    (the student before it starts, the teacher after) take the plain mean, and their momentum is
    dropped. The momentum goes into every round's checkpoint (``carried``): a resumed run goes on with it."""

    carried_names = ("velocity",)

    def __init__(self, *, server_learning_rate: float = 1.0, server_momentum: float = 0.0,
                 plain_keys: Iterable[str] = (), **kw):
        super().__init__(**kw)
        self.server_learning_rate, self.server_momentum = server_learning_rate, server_momentum
        self.plain_keys: set[str] = set(plain_keys)
        self.velocity: dict[str, np.ndarray] = {}

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


def make_strategy(fed, common: dict, plain_keys: Iterable[str] = (),
                  parameter_shapes: dict[str, tuple[int, ...]] | None = None, **rounds):
    """The coordinator's strategy for ``fed`` (FederatedConfig), built in one call: with
    ``fed.drift_correction`` 'scaffold' the mean with control variates (``parameter_shapes``: the
    model's trainable parameters by name); FedAvgM when the
    coordinator keeps a momentum or steps with a learning rate other than 1 (``plain_keys``: the
    model's buffers, averaged without it); else by ``fed.aggregator``: Flower's FedMedian or
    FedTrimmedAvg, or for the mean FedProx / FedAvg. ``common``: Flower's strategy arguments;
    ``rounds``: CoordinatorRounds' (round_offset, audit, final_round; screening, evaluate_every and
    validate_on_train default to ``fed``'s)."""
    mu = fed.proximal_mu if fed.strategy == "fedprox" else 0.0
    rounds.setdefault("screening", Screening(fed.max_update_ratio, fed.max_site_weight))
    rounds.setdefault("evaluate_every", fed.evaluate_every)
    rounds.setdefault("validate_on_train", fed.validate_in == "train-reply")
    kw = {**common, **rounds, "parameter_shapes": parameter_shapes}
    if fed.drift_correction == "scaffold":  # ControlVariates refuses to start without parameter_shapes
        return CCMRScaffoldProx(proximal_mu=mu, **kw) if fed.strategy == "fedprox" else CCMRScaffoldAvg(**kw)
    if fed.server_momentum > 0 or fed.server_lr != 1.0:
        return CCMRFedAvgM(proximal_mu=mu, server_learning_rate=fed.server_lr, server_momentum=fed.server_momentum,
                           plain_keys=plain_keys, **kw)
    if fed.aggregator == "median":
        return CCMRFedMedian(proximal_mu=mu, **kw)
    if fed.aggregator == "trimmed-mean":
        return CCMRFedTrimmedAvg(proximal_mu=mu, beta=fed.trim_fraction, **kw)
    return CCMRFedProx(proximal_mu=mu, **kw) if fed.strategy == "fedprox" else CCMRFedAvg(**kw)


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
