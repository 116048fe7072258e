"""A message's content, fetched from a Flower runtime API (a SuperNode's for a site's worker, the
SuperLink's for the coordinator) with a short retry.

A message is announced before its content has finished arriving; Flower 1.41 asks again for a
missing object after 1, 2, 4, 8 s (``PULL_INITIAL_BACKOFF``), which left a round waiting for
seconds on objects already there. Both ends ask every 0.05 s, at most 0.5 s apart, with the same
Flower functions otherwise.
"""

from __future__ import annotations

from flwr.app import Message
from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree

RETRY_S, RETRY_CAP_S = 0.05, 0.5


def pull_message(client, tree, node: Node, run_id: int, max_time: float) -> Message:
    """The message whose object tree is ``tree``, pulled through ``client`` (a Flower runtime API
    client with PullObject / ConfirmMessageReceived); raises Flower's ObjectPullError when its
    content has not come within ``max_time`` seconds."""
    message = pull_and_inflate_object_from_tree(
        tree, make_pull_object_fn_protobuf(client.PullObject, node, run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, run_id),
        return_type=Message, max_time=max_time, initial_backoff=RETRY_S, backoff_cap=RETRY_CAP_S)
    message.metadata.__dict__["_message_id"] = tree.object_id  # as Flower does: the id is not in the content
    return message
