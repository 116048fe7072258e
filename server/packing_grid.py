"""The coordinator's edge of protocol/packing: every message leaves with its models packed (one
byte array and a layout instead of an object per tensor) and every reply is unpacked before
anything else reads it. The innermost Grid wrapper, so the strategy, SecAgg+ and the audit see
ordinary state-dict ArrayRecords."""

from __future__ import annotations

import logging

from flwr.app import Error, Message
from flwr.common.constant import ErrorCode

from ccmr_core.console import warn
from protocol.packing import PackingError, pack, unpack
from server.robust_rounds import GridWrapper

log = logging.getLogger("ccmr.server")


def packed(msg: Message) -> Message:
    if not msg.has_content():
        return msg
    content = pack(msg.content)
    if content is msg.content:
        return msg
    m = msg.metadata
    return Message(content=content, dst_node_id=m.dst_node_id, message_type=m.message_type, ttl=m.ttl,
                   group_id=m.group_id)


def unpacked(reply: Message) -> Message:
    """The reply with its models unpacked; a reply whose packed model does not add up becomes an
    error reply (the round goes on without it, as for a site that dropped out)."""
    if not reply.has_content():
        return reply
    try:
        reply.content = unpack(reply.content)
    except PackingError as e:
        warn(log, f"SuperNode {reply.metadata.src_node_id}: reply left out, {e}")
        return Message(metadata=reply.metadata, error=Error(code=ErrorCode.UNKNOWN, reason=f"malformed reply: {e}"[:500]))
    return reply


class PackingGrid(GridWrapper):
    def push_messages(self, messages):
        return self.grid.push_messages([packed(m) for m in messages])

    def pull_messages(self, message_ids):
        return [unpacked(r) for r in self.grid.pull_messages(message_ids)]

    def send_and_receive(self, messages, *, timeout=None):
        return [unpacked(r) for r in self.grid.send_and_receive([packed(m) for m in messages], timeout=timeout)]
