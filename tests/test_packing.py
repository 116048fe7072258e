"""A model travels as two arrays (protocol/packing): exact both ways, few objects on the wire, and
a packed record that does not add up is refused at either end, naming what is wrong."""

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from ccmr_core.config import load_config
from ccmr_core.models.registry import build_model, model_kwargs
from protocol import messages as proto
from protocol.packing import DATA, LAYOUT, PackingError, is_packed, pack, pack_record, unpack, unpack_record
from server.packing_grid import PackingGrid


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):  # Flower stamps messages with the task they belong to
    from flwr.supercore.task_identity import TaskIdentity

    for k in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, k, 1)


def _state() -> dict:
    return {"conv.weight": torch.randn(4, 3, 3, 3), "scalar": torch.tensor(2.5), "steps": torch.tensor(7),
            "empty": torch.zeros(0, 5), "half": torch.randn(6).half(), "mask": torch.tensor([True, False])}


def test_unpack_restores_the_same_record_keys_order_dtypes_shapes_and_values():
    rec = ArrayRecord(_state())
    packed = pack_record(rec)
    assert is_packed(packed) and len(packed) == 2
    back = unpack_record(packed)
    assert list(back.keys()) == list(rec.keys())
    for k in rec.keys():
        a, b = rec[k], back[k]
        assert (a.dtype, a.shape) == (b.dtype, b.shape), k
        assert a.data == b.data, k  # byte-identical serialisation, hence the same audit hash
    # the audit's description (keys, shapes, dtypes, payload hash) is that of the unpacked record
    content = RecordDict({"arrays": rec, "metrics": MetricRecord({"num-examples": 3.0})})
    assert proto.describe(unpack(pack(content))) == proto.describe(content)


def test_pack_leaves_everything_but_multi_array_records_alone():
    single = ArrayRecord({"w": Array(np.ones(3, dtype=np.float32))})
    content = RecordDict({"one": single, "none": ArrayRecord(), "config": ConfigRecord({"x": 1})})
    assert pack(content) is content and unpack(content) is content
    mixed = RecordDict({"arrays": ArrayRecord(_state()), "config": ConfigRecord({"x": 1})})
    out = pack(mixed)
    assert is_packed(out["arrays"]) and out["config"] is mixed["config"]


def test_a_packed_model_message_is_a_handful_of_objects_instead_of_one_or_more_per_tensor():
    cfg = load_config()
    model = build_model(cfg.model.name, **model_kwargs(cfg))  # the default model
    n_tensors = len(model.state_dict())
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord({"round": 1})})

    def objects(c):
        return len(get_all_nested_objects(Message(c, dst_node_id=1, message_type="train")))

    assert objects(content) > n_tensors > 100
    assert objects(pack(content)) <= 10


def _packed_with(layout, data: bytes) -> ArrayRecord:
    return ArrayRecord({DATA: Array(np.frombuffer(data, dtype=np.uint8)),
                        LAYOUT: Array(np.frombuffer(json.dumps(layout).encode(), dtype=np.uint8))})


@pytest.mark.parametrize("layout,data,says", [
    ([["w", "float32", [3]]], b"\0" * 8, "describes 12 bytes, the data has 8"),
    ([["w", "float32", [2]], ["w", "float32", [1]]], b"\0" * 12, "'w' appears twice"),
    ([["w", "object", [1]]], b"\0" * 8, "dtype in"),
    ([["w", "float32", [-1]]], b"", "non-negative integer sizes"),
    ([["w", "float32"]], b"", "not [name, dtype, shape]"),
    ({"w": 1}, b"", "must be a list"),
    ([["w", "float32", [2 ** 40, 2 ** 40]]], b"\0" * 4, "describes"),
])
def test_a_layout_that_does_not_add_up_is_refused_naming_why(layout, data, says):
    with pytest.raises(PackingError, match=says.replace("[", r"\[")):
        unpack_record(_packed_with(layout, data))


def test_a_layout_that_is_not_json_is_refused():
    bad = ArrayRecord({DATA: Array(np.zeros(4, dtype=np.uint8)), LAYOUT: Array(np.frombuffer(b"\xff{", dtype=np.uint8))})
    with pytest.raises(PackingError, match="not JSON"):
        unpack_record(bad)


class _Wire:
    """A Grid that keeps what it was given and answers with prepared replies."""

    def __init__(self, replies):
        self.pushed, self.replies = [], replies

    def push_messages(self, messages):
        self.pushed += list(messages)
        return [str(i) for i, _ in enumerate(messages)]

    def pull_messages(self, ids):
        return self.replies


def test_the_coordinator_packs_what_it_sends_and_turns_a_malformed_reply_into_an_error():
    rec = ArrayRecord(_state())
    msg = Message(RecordDict({"arrays": rec, "config": ConfigRecord({"round": 1})}), dst_node_id=5,
                  message_type="train", group_id="1")
    good = Message(pack(RecordDict({"arrays": rec})), reply_to=msg)
    bad = Message(RecordDict({"arrays": _packed_with([["w", "float32", [3]]], b"\0" * 4)}), reply_to=msg)
    wire = _Wire([good, bad])
    grid = PackingGrid(wire)
    grid.push_messages([msg])
    sent = wire.pushed[0]
    assert is_packed(sent.content["arrays"]) and sent.metadata.dst_node_id == 5 and sent.metadata.group_id == "1"
    assert not is_packed(msg.content["arrays"])  # the strategy's own message is left as it was
    ok, refused = grid.pull_messages(["0"])
    assert list(ok.content["arrays"].keys()) == list(rec.keys())
    assert refused.has_error() and not refused.has_content() and "describes 12 bytes" in refused.error.reason
    assert refused.metadata.src_node_id == bad.metadata.src_node_id == 5  # still the site's reply to that message
    assert refused.metadata.reply_to_message_id == bad.metadata.reply_to_message_id
