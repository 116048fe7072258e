"""A model travels as two arrays, not one per tensor.

Flower 1.41 moves a message as a tree of objects, one per Array (and per 5 MiB chunk of it), each
fetched with a request of its own; and a request for an object that has not arrived yet is
retried after 1, 2, 4, 8 s (``PULL_INITIAL_BACKOFF``). A CC-CMR state dict of 117 tensors was
234 objects per message, and a deployed message took 10-27 s to arrive on 127.0.0.1 (traced:
BENCHMARKS.md, deployment block). ``pack`` joins every ArrayRecord of two or more arrays into one
byte array plus a layout (name, dtype, shape of each tensor, as JSON); ``unpack`` restores the same
ArrayRecord exactly (keys, order, dtypes, shapes, values), and refuses a layout that does not add
up, naming what is wrong.

Both ends apply it at their edge, so everything between sees ordinary state-dict ArrayRecords:
the coordinator in ``server/packing_grid.PackingGrid`` (innermost Grid), a site in the ClientApp's
outermost mod (``client/client_app.packing_mod``), after its egress guard has checked the reply.
"""

from __future__ import annotations

import json
import math

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

DATA, LAYOUT = "packed-data", "packed-layout"
DTYPES = frozenset({"float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool"})
MAX_TENSORS = 100_000


class PackingError(ValueError):
    """A packed record whose layout does not describe its data."""


def is_packed(rec: ArrayRecord) -> bool:
    return set(rec.keys()) == {DATA, LAYOUT}


def _packable(rec: ArrayRecord) -> bool:
    return (len(rec) >= 2 and not is_packed(rec)
            and all(a.stype == "numpy.ndarray" and a.dtype in DTYPES for a in rec.values()))


def pack_record(rec: ArrayRecord) -> ArrayRecord:
    arrays = {k: a.numpy() for k, a in rec.items()}  # tobytes() is C order whatever the layout
    layout = [[k, str(x.dtype), list(x.shape)] for k, x in arrays.items()]
    data = b"".join(x.tobytes() for x in arrays.values())
    return ArrayRecord({DATA: Array(np.frombuffer(data, dtype=np.uint8)),
                        LAYOUT: Array(np.frombuffer(json.dumps(layout).encode(), dtype=np.uint8))})


def _layout(rec: ArrayRecord) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
    try:
        entries = json.loads(rec[LAYOUT].numpy().tobytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise PackingError(f"packed record: its layout is not JSON ({e})") from None
    if not isinstance(entries, list) or len(entries) > MAX_TENSORS:
        raise PackingError(f"packed record: the layout must be a list of at most {MAX_TENSORS} [name, dtype, shape]")
    out, seen = [], set()
    for e in entries:
        ok = (isinstance(e, list) and len(e) == 3 and isinstance(e[0], str) and e[1] in DTYPES
              and isinstance(e[2], list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                 for d in e[2]))
        if not ok:
            raise PackingError(f"packed record: layout entry {str(e)[:80]} is not [name, dtype, shape] with a dtype "
                               f"in {sorted(DTYPES)} and non-negative integer sizes")
        if e[0] in seen:
            raise PackingError(f"packed record: tensor {e[0]!r} appears twice in the layout")
        seen.add(e[0])
        out.append((e[0], np.dtype(e[1]), tuple(e[2])))
    return out


def unpack_record(rec: ArrayRecord) -> ArrayRecord:
    if rec[DATA].dtype != "uint8" or len(rec[DATA].shape) != 1:
        raise PackingError(f"packed record: {DATA} must be a 1-d uint8 array, not {rec[DATA].dtype} "
                           f"{list(rec[DATA].shape)}")
    layout = _layout(rec)
    data = rec[DATA].numpy().tobytes()
    need = sum(math.prod(shape) * dt.itemsize for _, dt, shape in layout)
    if need != len(data):
        raise PackingError(f"packed record: the layout describes {need} bytes, the data has {len(data)}")
    out, at = {}, 0
    for name, dt, shape in layout:
        n = math.prod(shape) * dt.itemsize
        out[name] = Array(np.frombuffer(data, dtype=dt, count=n // dt.itemsize, offset=at).reshape(shape))
        at += n
    return ArrayRecord(out)


def pack(content: RecordDict) -> RecordDict:
    """``content`` with each ArrayRecord of two or more plain arrays packed; other records as they are."""
    if not any(isinstance(r, ArrayRecord) and _packable(r) for r in content.values()):
        return content
    return RecordDict({k: pack_record(r) if isinstance(r, ArrayRecord) and _packable(r) else r
                       for k, r in content.items()})


def unpack(content: RecordDict) -> RecordDict:
    """The inverse of ``pack``; raises PackingError for a packed record that does not add up."""
    if not any(isinstance(r, ArrayRecord) and is_packed(r) for r in content.values()):
        return content
    return RecordDict({k: unpack_record(r) if isinstance(r, ArrayRecord) and is_packed(r) else r
                       for k, r in content.items()})
