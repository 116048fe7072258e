"""Rounds that survive missing sites: a train round that got fewer than ``federated.min_sites``
replies within ``federated.round_timeout_s`` is sent again, to the SuperNodes connected by then
(a site that came back rejoins), up to ``federated.round_retries`` times; then the run stops
with the last completed round checkpointed, to be continued with ``--resume``.

A site that dies mid-round costs that round at most its timeout: the SuperLink answers for a
SuperNode whose heartbeat stopped (NODE_UNAVAILABLE), and the round closes with the others (the
error replies are logged and not handed to the strategy).

``GridWrapper`` is the seam the coordinator uses for such behaviour (also SecAgg+, see
server/secure_aggregation.py): the strategy keeps sending through a Grid and never knows.
"""

from __future__ import annotations

import logging
import time

from flwr.app import Error, Message, MessageType, Metadata
from flwr.app.message import make_message
from flwr.common.constant import ErrorCode
from flwr.proto.runtime_pb2 import PullAppMessagesRequest  # pylint: disable=E0611
from flwr.serverapp import Grid
from flwr.supercore.constant import SYSTEM_MESSAGE_TYPE
from flwr.supercore.inflatable.inflatable_utils import ObjectPullError
from flwr.superlink.grid.http_grid import HttpGrid

from ccmr_core.console import warn
from protocol import messages as proto
from protocol.transfer import pull_message

log = logging.getLogger("ccmr.server")


class GridWrapper(Grid):
    """A Grid that delegates everything to another one (subclasses override send_and_receive)."""

    def __init__(self, grid: Grid):
        self.grid = grid

    def set_run(self, run):
        self.grid.set_run(run)

    @property
    def run(self):
        return self.grid.run

    def create_message(self, *args, **kwargs):
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self):
        return self.grid.get_node_ids()

    def push_messages(self, messages):
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids):
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages, *, timeout=None):
        return self.grid.send_and_receive(messages, timeout=timeout)


class FastPollGrid(GridWrapper):
    """Replies are asked for every ``poll_s`` seconds. Flower's deployed grid (HttpGrid) sleeps 3 s
    between pulls, so a reply that arrives just after a pull waits up to 3 s, in each of a round's
    message phases; the simulation's in-memory grid polls at 0.1 s.

    On the deployed grid a reply's content is also asked for again soon while it is still on its
    way (``pull_replies``, the innermost Grid only): a SuperNode posts its reply before it uploads
    the content."""

    def __init__(self, grid: Grid, poll_s: float = 0.2):
        super().__init__(grid)
        self.poll_s = poll_s

    def pull_messages(self, message_ids):
        if isinstance(self.grid, HttpGrid):
            return pull_replies(self.grid, message_ids)
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages, *, timeout=None):
        pending = set(self.grid.push_messages(messages))
        end = time.monotonic() + (timeout or 0.0)
        replies: list[Message] = []
        while pending:
            got = list(self.pull_messages(pending))
            replies += got
            pending -= {m.metadata.reply_to_message_id for m in got}
            if not pending or (timeout is not None and time.monotonic() >= end):
                break
            time.sleep(self.poll_s)
        return replies


REPLY_CONTENT_WAIT_S = 600.0  # how long a posted reply's content may take to upload


def pull_replies(grid: HttpGrid, message_ids) -> list[Message]:
    """Flower 1.41's HttpGrid.pull_messages with protocol/transfer's short retry for content still on
    its way; a reply whose content never comes becomes an error reply, as there."""
    run_id = grid.run.run_id
    client = grid._runtime_client  # noqa: SLF001 - flwr is pinned (<1.42)
    res = client.PullMessages(PullAppMessagesRequest(message_ids=list(message_ids)))
    out: list[Message] = []
    for msg_proto, tree in zip(res.messages_list, res.message_object_trees, strict=True):
        try:
            out.append(pull_message(client, tree, grid.node, run_id, REPLY_CONTENT_WAIT_S))
        except ObjectPullError as e:
            m = msg_proto.metadata
            out.append(make_message(
                metadata=Metadata(run_id=run_id, message_id="", src_node_id=m.src_node_id, dst_node_id=grid.node.node_id,
                                  message_type=SYSTEM_MESSAGE_TYPE, group_id="", ttl=0,
                                  reply_to_message_id=m.reply_to_message_id, created_at=time.time()),
                error=Error(code=ErrorCode.MESSAGE_UNAVAILABLE, reason=f"the reply's content did not arrive: {e}")))
    return out


def is_train_round(msgs: list[Message]) -> bool:
    """The strategy's train messages of one round (a wrapper's business), not evaluation."""
    return bool(msgs) and all(m.metadata.message_type == MessageType.TRAIN for m in msgs)


class RoundIncomplete(RuntimeError):
    pass


def answered(replies: list[Message]) -> list[Message]:
    """Replies from sites that took part (not an error, not a refusal)."""
    return [r for r in replies if r.has_content() and not proto.is_refused(r.content)]


class RetryGrid(GridWrapper):
    def __init__(self, grid: Grid, min_sites: int, retries: int):
        super().__init__(grid)
        self.min_sites, self.retries = min_sites, retries

    def send_and_receive(self, messages, *, timeout=None):
        msgs = list(messages)
        if not is_train_round(msgs):
            return self.grid.send_and_receive(msgs, timeout=timeout)
        rnd = msgs[0].content["config"].get(proto.ROUND, "?")
        for attempt in range(self.retries + 1):
            replies = list(self.grid.send_and_receive(msgs, timeout=timeout))
            ok = answered(replies)
            if len(ok) >= self.min_sites:
                for r in replies:
                    if r.has_error():
                        line = f"round {rnd}: SuperNode {r.metadata.src_node_id} dropped out: {r.error.reason[:160]}"
                        warn(log, line)
                # the strategy averages the replies that arrived (and site-level DP sizes its noise
                # for them, server/strategy.py); Flower's DP wrappers would drop the whole round
                return [r for r in replies if not r.has_error()]
            why = "; ".join(f"SuperNode {r.metadata.src_node_id}: {r.error.reason[:120]}" for r in replies
                            if r.has_error())
            msg = (f"round {rnd}: {len(ok)} of {len(msgs)} sites replied within {timeout} s, fewer than "
                   f"min_sites {self.min_sites}" + (f" ({why})" if why else ""))
            if attempt == self.retries:
                raise RoundIncomplete(msg + f"; gave up after {self.retries} retries. The last completed round is "
                                      "checkpointed: continue with ccmr-server run --resume RUN_FOLDER (deployment) "
                                      "or --run-config \"resume='RUN_FOLDER'\"")
            warn(log, f"{msg}; sending the round again (retry {attempt + 1} of {self.retries})")
            content, group = msgs[0].content, msgs[0].metadata.group_id
            msgs = [Message(content=content, dst_node_id=nid, message_type=MessageType.TRAIN, group_id=group)
                    for nid in self.grid.get_node_ids()]
        return replies
