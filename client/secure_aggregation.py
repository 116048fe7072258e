"""SecAgg+ at the site: Flower's ``secaggplus_mod`` around the train handler, for runs that ask for it.

A run with ``secure_aggregation.enabled`` sends each train round as Flower's four SecAgg+ stages
(server/secure_aggregation.py). This mod, registered on the ClientApp, steps in only for those
messages:

* setup: the site's policy is checked first (a run it does not accept gets an error reply with
  the reason, so the coordinator drops it from the round);
* collect masked vectors: the train handler runs as in a plain round (the egress guard checks its
  reply); this mod turns the reply into the *weighted update* ``weight / max_weight x
  (local - global)`` that ``secaggplus_mod`` clips to the clipping range, quantises and masks. What
  leaves is one masked integer vector per parameter plus the clear statistics (loss, epsilon,
  patient count), never the model itself;
* every stage: what leaves is checked against the protocol's keys and written to the audit log.

Flower's mod expects the legacy ``fitres.*`` records; the adapter below is the only place that
knows them.
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from ccmr_core.console import warn
from ccmr_core.config import from_run_config
from client.egress import EgressRefused, audit
from client.local import hosted_sites
from client.policy import violations
from protocol import messages as proto

log = logging.getLogger("ccmr.client")

# what each stage may send back (besides the clear statistics of the collect stage)
STAGE_OUTPUT = {
    Stage.SETUP: {Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2},
    Stage.SHARE_KEYS: {Key.DESTINATION_LIST, Key.CIPHERTEXT_LIST},
    Stage.COLLECT_MASKED_VECTORS: {Key.MASKED_PARAMETERS},
    Stage.UNMASK: {Key.NODE_ID_LIST, Key.SHARE_LIST},
}
FITRES = ("fitres.parameters", "fitres.num_examples", "fitres.metrics", "fitres.status")


class SecureRoundRefused(RuntimeError):
    """The site does not take part in this secure round (its reason is in the message)."""


def is_secure(msg: Message) -> bool:
    return msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content.config_records


def to_masked_update(request: Message, reply: Message, max_weight: int, clipping_range: float) -> Message:
    """The handler's plain train reply -> the legacy ``fitres`` records secaggplus_mod masks.

    The update is ``local - global`` in the global model's key order; the coordinator adds the
    global model back to the averaged update. Raises SecureRoundRefused when there is nothing to
    send (a refused or declined site) or the weight is out of the protocol's range."""
    if reply.has_error():
        raise SecureRoundRefused(f"train failed: {reply.error.reason}")
    c = request.content["config"]
    metrics = reply.content.metric_records.get("metrics")
    arrays = reply.content.array_records.get("arrays")
    if arrays is None or metrics is None or float(metrics.get(proto.REFUSED, 0.0)) > 0:
        raise SecureRoundRefused("the site refused to send its update (see its audit log)")
    weight = float(metrics.get(str(c.get(proto.SECAGG_WEIGHT_KEY, proto.NUM_EXAMPLES)), 0.0))
    if weight <= 0:
        raise SecureRoundRefused("the site declined to train this round (privacy budget)")
    if weight > max_weight:
        raise SecureRoundRefused(f"the site's weight {weight:g} exceeds secure_aggregation.max_weight "
                                 f"{max_weight}; the coordinator must raise it for this federation")
    glob = request.content["arrays"]
    # 0-d parameters (learnable scalars) travel as shape (1,): Flower's SecAgg+ arithmetic needs arrays
    delta = [np.atleast_1d(np.asarray(arrays[k].numpy() - glob[k].numpy(), dtype=np.float64)) for k in glob.keys()]
    scaled_max = max((float(np.abs(d).max()) for d in delta if d.size), default=0.0) * weight / max_weight
    clipped = int(sum(int((np.abs(d) * weight / max_weight > clipping_range).sum()) for d in delta))
    if clipped:
        warn(log, f"warning: {clipped} update coordinates exceed the secure-aggregation clipping range "
                  f"{clipping_range:g} (largest {scaled_max:.3g}) and are clipped")
    content = RecordDict({
        "fitres.parameters": ArrayRecord(delta),
        "fitres.num_examples": MetricRecord({"num_examples": int(round(weight))}),
        "fitres.metrics": ConfigRecord({}),
        "fitres.status": ConfigRecord({"code": 0, "message": "Success"}),
        "metrics": MetricRecord({**dict(metrics), proto.SECAGG_CLIPPED: float(clipped)}),
    })
    return Message(content=content, reply_to=request)


def check_outgoing(content: RecordDict, stage: str) -> None:
    """Raise EgressRefused unless the reply holds only this stage's protocol keys (and, in the
    collect stage, emptied arrays plus the statistics the egress guard already passed)."""
    for name, rec in content.items():
        if name == RECORD_KEY_CONFIGS:
            extra = sorted(set(rec.keys()) - STAGE_OUTPUT.get(stage, set()))
            if extra:
                raise EgressRefused(f"secure aggregation stage {stage!r} would send unexpected keys {extra}")
        elif stage != Stage.COLLECT_MASKED_VECTORS:
            raise EgressRefused(f"secure aggregation stage {stage!r} would send record {name!r}")
        elif isinstance(rec, ArrayRecord) and len(rec):
            raise EgressRefused(f"arrays {name!r} would leave in clear under secure aggregation")
        elif name not in (*FITRES, "metrics"):
            raise EgressRefused(f"record {name!r} may not leave the site under secure aggregation")


def secure_aggregation_mod(msg: Message, ctxt: Context, call_next) -> Message:
    if not is_secure(msg):
        return call_next(msg, ctxt)
    stage = str(msg.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE, ""))
    cfg = from_run_config(ctxt.run_config)
    c = msg.content["config"]  # every stage carries the run's config (server/secure_aggregation.py)
    run_key, rnd = str(c[proto.RUN_KEY]), int(c[proto.ROUND])
    names = [name for _, name, _ in hosted_sites(ctxt.node_config, str(c[proto.COHORT_DIR]))]
    kind = "train/secagg-" + stage.replace("_", "-")  # the same names as the coordinator's log
    if stage == Stage.SETUP:
        bad = violations(ctxt.node_config, cfg.privacy.mode, secure=True)
        if bad:
            return _refuse(msg, names, kind, run_key, rnd, "; ".join(bad))
    sa = cfg.secure_aggregation

    def train_as_fitres(m: Message, cx: Context) -> Message:
        return to_masked_update(m, call_next(m, cx), sa.max_weight, sa.clipping_range)

    try:
        out = secaggplus_mod(msg, ctxt, train_as_fitres)
        check_outgoing(out.content, stage)
    except (SecureRoundRefused, EgressRefused) as e:
        return _refuse(msg, names, kind, run_key, rnd, str(e))
    audit(names, out.content, kind, run_key, rnd, None, None)
    return out


def _refuse(msg: Message, sites: list[str], kind: str, run_key: str, rnd: int | None, reason: str) -> Message:
    """An error reply (the protocol drops the site from this round) with the reason, audited."""
    print(f"[{', '.join(sites)}] REFUSED the secure train round: {reason}", flush=True)
    audit(sites, RecordDict(), kind, run_key, rnd, reason, None)
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"refused by the site: {reason}"),
                   reply_to=msg)

