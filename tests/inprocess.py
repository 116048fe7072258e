"""Drive the real ServerApp and ClientApp objects in one process, without Ray (tests, benchmarks).

A tiny Grid subclass delivers each message to the ClientApp synchronously and behaves like a
SuperNode on exceptions (an error reply). Uses two Flower internals, hence the pinned flwr.

``sent`` / ``received``: every message and reply, decoded (protocol/packing.unpack), as the two
ends read them; ``wire``: both, as they travelled (models packed)."""

from __future__ import annotations

import copy
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from protocol.packing import unpack


def _decoded(msg: Message) -> Message:
    out = copy.deepcopy(msg)
    if out.has_content():
        out.content = unpack(out.content)
    return out


class InProcessGrid(Grid):
    def __init__(self, client_app, num_nodes: int, run_config: dict, node_configs: list[dict] | None = None):
        self.client_app, self._replies = client_app, {}
        self.contexts = {
            1000 + i: Context(run_id=1, node_id=1000 + i,
                              node_config=(node_configs[i] if node_configs else {"partition-id": i, "num-partitions": num_nodes}),
                              state=RecordDict(), run_config=dict(run_config))
            for i in range(num_nodes)
        }
        self._run = Run.create_empty(run_id=1)
        self.sent: list[Message] = []
        self.received: list[Message] = []
        self.wire: list[Message] = []

    def set_run(self, run):
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = mid = str(uuid4())
            # what was sent, as it was when sent (the strategy reuses and changes its config record)
            self.wire.append(copy.deepcopy(msg))
            self.sent.append(_decoded(msg))
            try:  # a copy, as over the wire: a ClientApp (or mod) may change what it received
                rep = self.client_app(copy.deepcopy(msg), self.contexts[msg.metadata.dst_node_id])
            except Exception as e:  # noqa: BLE001 - behave like a SuperNode: an error reply
                rep = Message(Error(code=0, reason=repr(e)), reply_to=msg)
            self._replies[mid] = rep
            self.wire.append(copy.deepcopy(rep))
            self.received.append(_decoded(rep))
            ids.append(mid)
        return ids

    def pull_messages(self, ids):
        return [self._replies.pop(i) for i in ids if i in self._replies]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))


def run_inprocess(server_app, client_app, num_nodes: int, run_config: dict, node_configs=None) -> InProcessGrid:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    grid = InProcessGrid(client_app, num_nodes, run_config, node_configs)
    server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config)))
    return grid
