"""The Flower messages between the coordinator and a site: every key, what may leave a site, and
how a message is written down in an audit log (the same way on both sides, so the two logs can be
compared entry by entry)."""

from __future__ import annotations

import datetime as dt
import hashlib
import json

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from ccmr_core.metrics import flat_sizes
from ccmr_core.retrieval_stats import flat_sizes as retrieval_sizes

# --- the request's "config" record (coordinator -> site) --------------------------------------------
ROUND = "global-round"  # the run's round number (resumed runs continue counting); absent at the final tests
RUN_KEY = "run-key"  # names the run; the site keys its optimiser state and privacy ledger by it
COHORT_DIR = "cohort-dir"  # simulation only: where the synthetic cohort is (empty in a deployment)
NUM_SITES = "num-sites"  # length of every per-site list in a reply
BIO_CHANNELS = "bio-channels"  # the model's biomechanics input width
SPLIT = "split"  # evaluate: "val" or "test"
MC_SAMPLES = "mc-samples"  # evaluate: MC-dropout passes for epistemic uncertainty (0: none)
REFER_CONFIDENCE = "refer-confidence"  # final test: count referrals against these thresholds
REFER_UNCERTAINTY = "refer-uncertainty"  # (-1: no uncertainty threshold)
PROXIMAL_MU = "proximal-mu"  # set by Flower's FedProx
CLIPPING_NORM = "clipping_norm"  # set by Flower's client-side clipping DP wrapper
SECAGG_WEIGHT_KEY = "secagg-weight-key"  # SecAgg+: which reply metric weighs the masked update
VALIDATE = "validate-received"  # train: first validate the model received (val split), send that with the update

# --- records beside "arrays" (the model) and "config" / "metrics" -----------------------------------
CONTROL = "control"  # SCAFFOLD (federated.drift_correction): in a train request the coordinator's control
#                      variate c; in a train reply the change of the site's own c_i (by parameter name)

# --- the reply's "metrics" record (site -> coordinator) -------------------------------------------
NUM_EXAMPLES = "num-examples"  # patients trained on / evaluated (0: the site did not train)
UNIT_WEIGHT = "unit-weight"  # 1.0: the weight under site-level DP (every site counts the same)
TRAIN_LOSS = "train-loss"
TRAIN_SECONDS = "train-seconds"
DELTA = "delta"
REFUSED = "refused"  # 1.0: the site's policy or egress guard refused; the reply carries nothing else
SITE_EPSILON = "site-epsilon"  # per site: epsilon spent so far in this run
SITE_DECLINED = "site-declined"  # per site: 1.0 where the privacy budget stopped it
SITE_CORRECT = "site-correct"  # per site: correctly classified patients
SITE_N = "site-n"  # per site: patients evaluated
STATS = "stats-"  # prefix of the mergeable evaluation statistics (ccmr_core.metrics.EvalStats.to_flat)
RETRIEVAL_STATS = "retrieval-"  # CMR-CLIP: prefix of the mergeable retrieval statistics (ccmr_core.retrieval_stats)
SECAGG_CLIPPED = "secagg-clipped"  # SecAgg+: coordinates cut to the clipping range
VALIDATION = "val-"  # train reply (VALIDATE): prefix of an evaluate reply's metrics about the model received


def _evaluation_sizes(n_classes: int, n_sites: int) -> dict[str, int]:
    """The metrics of an evaluate reply: metric key -> its largest allowed length."""
    return {NUM_EXAMPLES: 1, UNIT_WEIGHT: 1, SITE_CORRECT: n_sites, SITE_N: n_sites,
            **{STATS + k: n for k, n in flat_sizes(n_classes).items()},
            **{RETRIEVAL_STATS + k: n for k, n in retrieval_sizes().items()}}


def allowed_metrics(n_classes: int, n_sites: int) -> dict[str, int]:
    """The egress allow-list: metric key -> its largest allowed length (1 = a scalar)."""
    evaluation = _evaluation_sizes(n_classes, n_sites)
    return {TRAIN_LOSS: 1, DELTA: 1, TRAIN_SECONDS: 1, REFUSED: 1, SITE_EPSILON: n_sites, SITE_DECLINED: n_sites,
            SECAGG_CLIPPED: 1, **evaluation, **{VALIDATION + k: n for k, n in evaluation.items()}}


def split_validation(content: RecordDict) -> tuple[RecordDict, RecordDict | None]:
    """A train reply -> (the reply without the validation it carries, that validation as the content
    of an evaluate reply; None when it carries none)."""
    name, metrics = next(iter(content.metric_records.items()), (None, None))
    if metrics is None or not any(k.startswith(VALIDATION) for k in metrics):
        return content, None
    rest = {k: v for k, v in metrics.items() if not k.startswith(VALIDATION)}
    val = {k[len(VALIDATION):]: v for k, v in metrics.items() if k.startswith(VALIDATION)}
    kept = RecordDict({k: (MetricRecord(rest) if k == name else r) for k, r in content.items()})
    return kept, RecordDict({"metrics": MetricRecord(val)})


def refused_metrics() -> MetricRecord:
    """The whole of a refused reply: no model, no statistics, only the flag."""
    return MetricRecord({NUM_EXAMPLES: 0.0, UNIT_WEIGHT: 0.0, REFUSED: 1.0})


def reply_metrics(content: RecordDict) -> dict:
    """The metrics of a reply (empty if it has none)."""
    return dict(next(iter(content.metric_records.values()), {}))


def is_refused(content: RecordDict) -> bool:
    return bool(reply_metrics(content).get(REFUSED, 0.0))


def describe(content: RecordDict) -> tuple[list[dict], str]:
    """Every key of a message with shape, dtype and bytes; and the SHA-256 of the payload."""
    h = hashlib.sha256()
    keys = []
    for name, rec in sorted(content.items()):
        if isinstance(rec, ArrayRecord):
            for k, a in rec.items():
                data = a.data
                h.update(f"{name}/{k}".encode())
                h.update(data)
                keys.append({"key": f"{name}/{k}", "shape": list(a.shape), "dtype": a.dtype, "bytes": len(data)})
        elif isinstance(rec, MetricRecord):
            for k, v in sorted(rec.items()):
                blob = json.dumps(v).encode()
                h.update(f"{name}/{k}".encode())
                h.update(blob)
                n = len(v) if isinstance(v, list) else 1
                keys.append({"key": f"{name}/{k}", "shape": [n] if isinstance(v, list) else [], "dtype": "float64",
                             "bytes": 8 * n})
        elif isinstance(rec, ConfigRecord):  # secure aggregation's protocol messages (keys, masked vectors)
            for k, v in sorted(rec.items()):
                items = v if isinstance(v, list) else [v]
                blobs = [x if isinstance(x, bytes) else json.dumps(x).encode() for x in items]
                h.update(f"{name}/{k}".encode())
                for b in blobs:
                    h.update(b)
                dtype = "bytes" if items and isinstance(items[0], bytes) else type(items[0]).__name__ if items else "-"
                keys.append({"key": f"{name}/{k}", "shape": [len(items)] if isinstance(v, list) else [],
                             "dtype": dtype, "bytes": int(sum(len(b) for b in blobs))})
    return keys, h.hexdigest()


def audit_entry(content: RecordDict | None, **fields) -> dict:
    """One line of an audit log: when, the caller's fields (run, round, kind, direction, node,
    refusal, privacy), and every key of the message with its size and the payload's SHA-256
    (``content`` None: nothing left, e.g. a failure)."""
    keys, digest = describe(content) if content is not None else ([], "")
    return {"time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **fields, "keys": keys,
            "bytes": int(sum(k["bytes"] for k in keys)), "sha256": digest}
