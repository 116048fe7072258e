"""SecAgg+ at the coordinator: each train round runs Flower's SecAgg+ protocol, and the strategy
only ever holds the weighted mean of the sites' updates.

Flower 1.41 ships SecAgg+ for its legacy strategies only (``SecAggPlusWorkflow`` needs a
``LegacyContext``). ``SecAggPlusGrid`` keeps the project's one server loop instead: it wraps the
Grid the strategy sends through, and when the strategy sends a train round it drives the
workflow's four stages (setup, share keys, collect masked vectors, unmask) with that round's
messages. The strategy then gets, from every site that took part, a reply carrying the *same*
array record (global model + securely averaged update) and that site's clear statistics; FedProx,
the DP wrappers, the recorder and the referral logic run unchanged. What the coordinator actually
received (public keys, encrypted shares, masked integer vectors) is in its audit log.

Limits, by construction: per-site screening and robust aggregators cannot see individual updates
(the config refuses median/trimmed-mean with secure aggregation; each coordinate is bounded by the
clipping range instead), and site-level DP clips at the site (Flower's client-side fixed clipping).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common import FitIns, Parameters, parameters_to_ndarrays
from flwr.serverapp import Grid
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState

from ccmr_core.console import warn
from ccmr_core.config import SecureAggregationConfig
from protocol import messages as proto
from server.robust_rounds import GridWrapper, is_train_round

log = logging.getLogger("ccmr.server")

STAGES = ("setup", "share-keys", "collect-masked-vectors", "unmask")


@dataclass
class _Proxy:  # the workflow only reads node_id from the legacy ClientProxy
    node_id: int


class _Strategy:
    """The two legacy strategy calls the workflow makes: sample the round's nodes, and receive
    the unmasked aggregate (kept here, not applied: SecAggPlusGrid hands it to the real strategy)."""

    def __init__(self, node_ids: list[int]):
        self.node_ids, self.aggregate = node_ids, None

    def configure_fit(self, server_round, parameters, client_manager):
        return [(_Proxy(n), FitIns(Parameters(tensors=[], tensor_type=""), {})) for n in self.node_ids]

    def aggregate_fit(self, server_round, results, failures):
        if results:
            self.aggregate = parameters_to_ndarrays(results[0][1].parameters)
        return None, {}


class _Nodes:
    def __init__(self, n: int):
        self.n = n

    def num_available(self) -> int:
        return self.n


class _Context:
    """What the workflow's stage methods read from a LegacyContext."""

    def __init__(self, rnd: int, node_ids: list[int]):
        self.state = RecordDict({MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: rnd}),
                                 MAIN_PARAMS_RECORD: ArrayRecord()})
        self.strategy, self.client_manager = _Strategy(node_ids), _Nodes(len(node_ids))


class _StageGrid:
    """Passes the workflow's messages to the real grid, adds the round's config record to every
    stage (sites name the run and round in their audit logs), and keeps the replies."""

    def __init__(self, grid: Grid, config: ConfigRecord, audit: Callable | None):
        self.grid, self.config, self.audit = grid, config, audit
        self.replies: list[list[Message]] = []

    def send_and_receive(self, messages, *, timeout=None):
        msgs = list(messages)
        stage = STAGES[len(self.replies)]
        for m in msgs:
            if "config" not in m.content.config_records:
                m.content["config"] = self.config
        rnd = int(self.config.get(proto.ROUND, 0))
        if self.audit:
            self.audit(rnd, "sent", f"train/secagg-{stage}", msgs)
        replies = list(self.grid.send_and_receive(msgs, timeout=timeout))
        if self.audit:
            self.audit(rnd, "received", f"train/secagg-{stage}", replies)
        for r in replies:
            if r.has_error():
                warn(log, f"secure aggregation, {stage}: SuperNode {r.metadata.src_node_id} dropped out: "
                          f"{r.error.reason}")
        self.replies.append(replies)
        return replies


def reconstruction_threshold(n_sites: int, fraction: float) -> int:
    """Shares needed to remove a site's masks: ``fraction`` of the sites, and always a strict majority.
    With half or fewer, a coordinator that tells some sites a peer dropped out and others that it
    survived could collect the shares of both of its secrets and unmask that one site's update
    (Bell et al. 2020); SecAgg+ then protects the sites only from an honest-but-curious coordinator."""
    return min(n_sites, max(n_sites // 2 + 1, math.ceil(fraction * n_sites)))


class SecAggPlusGrid(GridWrapper):
    """A Grid whose train rounds run as SecAgg+ (see the module docstring); everything else passes
    through unchanged."""

    def __init__(self, grid: Grid, sa: SecureAggregationConfig, weight_key: str, audit: Callable | None = None):
        super().__init__(grid)
        self.sa, self.weight_key, self.audit = sa, weight_key, audit

    def send_and_receive(self, messages, *, timeout=None):
        msgs = list(messages)
        if not is_train_round(msgs):
            return self.grid.send_and_receive(msgs, timeout=timeout)
        return self.secure_round(msgs, timeout)

    # -- one secure train round -------------------------------------------------------------
    def _workflow(self, timeout, n_sites: int) -> SecAggPlusWorkflow:
        q = 2 ** self.sa.quantization_bits
        return SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=reconstruction_threshold(
                                      n_sites, self.sa.reconstruction_fraction),
                                  max_weight=float(self.sa.max_weight), clipping_range=float(self.sa.clipping_range),
                                  quantization_range=q, modulus_range=2 ** 32, timeout=timeout)

    def secure_round(self, msgs: list[Message], timeout) -> list[Message]:
        """Run SecAgg+ for these train messages (one per SuperNode, same arrays and config) and
        return one reply per site that took part: the new global model and its statistics."""
        by_node = {m.metadata.dst_node_id: m for m in msgs}
        arrays: ArrayRecord = msgs[0].content["arrays"]
        config = ConfigRecord({**dict(msgs[0].content["config"]), proto.SECAGG_WEIGHT_KEY: self.weight_key})
        rnd = int(config.get(proto.ROUND, 0))
        nodes = list(by_node)
        if len(nodes) < 2:
            print(f"round {rnd}: secure aggregation needs at least 2 sites, {len(nodes)} available; round skipped",
                  flush=True)
            return []
        wf = self._workflow(timeout, len(nodes))
        for attempt in range(2):  # a site that refuses at setup is left out and the setup is redone
            ctx, state = _Context(rnd, nodes), WorkflowState()
            grid = _StageGrid(self.grid, config, self.audit)
            ok = wf.setup_stage(grid, ctx, state)
            answered = [r.metadata.src_node_id for r in grid.replies[0] if not r.has_error()]
            if len(answered) == len(nodes) or len(answered) < 2:
                break
            nodes = answered
        if not ok:
            print(f"round {rnd}: secure aggregation stopped at setup ({len(answered)} of {len(by_node)} sites "
                  "answered)", flush=True)
            return []
        state.nid_to_fitins = {n: RecordDict({"arrays": arrays, "config": config}) for n in nodes}
        for step in (wf.share_keys_stage, wf.collect_masked_vectors_stage, wf.unmask_stage):
            if not step(grid, ctx, state):
                print(f"round {rnd}: secure aggregation stopped at {STAGES[len(grid.replies) - 1]}: too few sites "
                      "left to remove the masks", flush=True)
                return []
        mean_update = ctx.strategy.aggregate
        if mean_update is None:
            return []
        names = list(arrays.keys())
        new = ArrayRecord({k: _as_array(arrays[k].numpy().astype(np.float64) + d, arrays[k])
                           for k, d in zip(names, mean_update)})
        collected = [r for r in grid.replies[2] if not r.has_error()]
        print(f"round {rnd}: secure aggregation of {len(collected)} sites' updates "
              f"({', '.join(str(r.metadata.src_node_id) for r in collected)})", flush=True)
        return [Message(RecordDict({"arrays": new, "metrics": r.content["metrics"]}),
                        reply_to=by_node[r.metadata.src_node_id]) for r in collected]


def _as_array(values: np.ndarray, like: Array) -> Array:
    ref = like.numpy()
    out = np.rint(values) if np.issubdtype(ref.dtype, np.integer) else values
    return Array(np.asarray(out, dtype=ref.dtype).reshape(ref.shape))  # 0-d parameters stay arrays
