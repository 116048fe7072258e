"""What leaves a site, checked before it leaves and written down.

Every reply the ClientApp builds passes ``guard`` before it is returned to Flower:

* arrays: exactly the global model's parameter names, each with the shape and dtype the
  coordinator sent (so no image, feature map or extra tensor can ride along); in a run with
  SCAFFOLD's drift correction also a ``control`` record, some of those names with the same shapes;
* metrics: only the keys of an allow-list, each a number or a list no longer than its fixed size
  (per-site lists: one value per site; statistics: histogram sizes fixed by the class count);
* anything else: the reply is replaced by an empty one that says "refused" (the coordinator
  treats it like a site that did not train) and the reason is logged. The run goes on.

Every reply that leaves is appended to the site's audit log, ``$CCMR_CACHE/audit/<site>.jsonl``
(one JSON object per line, append-only): time, run, round, message kind, every key with its
shape, dtype and byte count, the SHA-256 of the payload, and the privacy spent. ``ccmr-client
audit`` summarises it for site IT.
"""

from __future__ import annotations

import os
import traceback
from pathlib import Path

from flwr.app import ArrayRecord, Error, Message, MetricRecord, RecordDict

from ccmr_core.data.sources import default_cache_root
from ccmr_core.files import append_jsonl, read_jsonl
from protocol import messages as proto


class EgressRefused(ValueError):
    pass


def check(content: RecordDict, reference: ArrayRecord | None, n_classes: int, n_sites: int,
          control: bool = False) -> None:
    """Raise EgressRefused naming the first key that may not leave (``control``: the run uses
    SCAFFOLD's control variates, so a train reply may carry a ``control`` record)."""
    allowed = proto.allowed_metrics(n_classes, n_sites)
    for name, rec in content.items():
        if isinstance(rec, ArrayRecord):
            if reference is None:
                raise EgressRefused(f"arrays {name!r} in a reply that must carry statistics only")
            if name == proto.CONTROL and not control:
                raise EgressRefused(f"arrays {name!r} in a run without drift correction")
            ref = {k: v for k, v in reference.items()}
            extra = sorted(set(rec.keys()) - set(ref))
            missing = sorted(set(ref) - set(rec.keys())) if name != proto.CONTROL else []
            if extra or missing:
                raise EgressRefused(f"array keys differ from the global model's (unexpected {extra[:3]}, "
                                    f"missing {missing[:3]})")
            for k, a in rec.items():
                if tuple(a.shape) != tuple(ref[k].shape) or a.dtype != ref[k].dtype:
                    raise EgressRefused(f"array {k} is {a.dtype}{tuple(a.shape)}, the global model's is "
                                        f"{ref[k].dtype}{tuple(ref[k].shape)}")
        elif isinstance(rec, MetricRecord):
            for k, v in rec.items():
                if k not in allowed:
                    raise EgressRefused(f"metric {k!r} is not on the allow-list")
                n = len(v) if isinstance(v, list) else 1
                if n > allowed[k]:
                    raise EgressRefused(f"metric {k!r} has {n} values; at most {allowed[k]} may leave")
        else:
            raise EgressRefused(f"record {name!r} of type {type(rec).__name__} may not leave the site")


def audit_path(site_name: str) -> Path:
    root = Path(os.environ.get("CCMR_AUDIT_DIR", default_cache_root() / "audit"))
    return root / f"{site_name}.jsonl"


def append_audit(sites: list[str], entry: dict) -> None:
    for s in sites:
        p = audit_path(s)
        p.parent.mkdir(parents=True, exist_ok=True)
        append_jsonl(p, [entry])  # append-only, synced


def _refused(request: Message, sites: list[str], kind: str, run_key: str, rnd: int | None, reason: str,
             privacy: dict | None) -> Message:
    """An empty reply that says 'refused' (the coordinator treats it like a site that did not
    train), written to the site's audit log with the reason."""
    content = RecordDict({"metrics": proto.refused_metrics()})
    audit(sites, content, kind, run_key, rnd, reason, privacy)
    return Message(content=content, reply_to=request)


def refuse(request: Message, sites: list[str], kind: str, run_key: str, rnd: int | None, reason: str) -> Message:
    """Decline a request (the site's policy), with the reason printed at the site and audited."""
    print(f"[{', '.join(sites)}] REFUSED the {kind} request: {reason}", flush=True)
    return _refused(request, sites, kind, run_key, rnd, reason, None)


FAILED = ("the site could not complete this request; the reason stays in the site's own log "
          "(ask the site's IT team: `ccmr-client audit` shows when it happened)")


def failed(request: Message, sites: list[str], kind: str, error: BaseException) -> Message:
    """A handler raised. The detail (traceback, paths, file names) stays at the site: printed to
    its console and written to its audit log. The coordinator gets a fixed reason, so an error
    cannot carry data out (whether a path exists, a line of a file) past the egress guard."""
    detail = "".join(traceback.format_exception(error)).strip()
    print(f"[{', '.join(sites)}] the {kind} request failed at this site; the coordinator is told only that it "
          f"failed:\n{detail}", flush=True)
    rnd = None
    try:
        rnd = int(request.content["config"].get(proto.ROUND))
    except Exception:  # noqa: BLE001 - a malformed request has no round
        pass
    append_audit(sites, proto.audit_entry(None, run="-", round=rnd, kind=kind, privacy=None,
                                          refused=f"failed at the site: {type(error).__name__}: {str(error)[:500]} "
                                          "(the coordinator was told only that it failed)"))
    return Message(Error(code=0, reason=FAILED), reply_to=request)


def audit(sites: list[str], content: RecordDict, kind: str, run_key: str, rnd: int | None, refused: str | None,
          privacy: dict | None) -> None:
    """Append what leaves (``content``; empty for a refusal) to the hosted sites' audit logs."""
    append_audit(sites, proto.audit_entry(content, run=run_key, round=rnd, kind=kind, refused=refused,
                                          privacy=privacy))


def guard(reply: Message, request: Message, sites: list[str], n_classes: int, n_sites: int, kind: str,
          run_key: str, rnd: int | None, privacy: dict | None = None, record: bool = True,
          control: bool = False) -> Message:
    """The reply if it may leave (and audited unless ``record`` is off: the caller audits what
    finally leaves), else an empty 'refused' reply (always audited)."""
    reference = request.content.array_records.get("arrays") if kind == "train" else None
    try:
        check(reply.content, reference, n_classes, n_sites, control)
    except EgressRefused as e:
        print(f"[{', '.join(sites)}] REFUSED to send the {kind} reply: {e}", flush=True)
        return _refused(request, sites, kind, run_key, rnd, str(e), privacy)
    if record:
        audit(sites, reply.content, kind, run_key, rnd, None, privacy)
    return reply


def summarize(path: Path) -> str:
    """What ``ccmr-client audit`` prints."""
    if not path.is_file():
        return f"no audit log at {path}: nothing has left this site"
    rows, damaged = read_jsonl(path)
    runs: dict[str, list[dict]] = {}
    for r in rows:
        runs.setdefault(r["run"], []).append(r)
    out = [f"{path}: {len(rows)} messages sent"]
    for run, rs in runs.items():
        total = sum(r["bytes"] for r in rs)
        n_arrays = max((sum(k["key"].startswith("arrays/") for k in r["keys"]) for r in rs), default=0)
        n_control = max((sum(k["key"].startswith(proto.CONTROL + "/") for k in r["keys"]) for r in rs), default=0)
        eps = [r["privacy"]["epsilon"] for r in rs if (r.get("privacy") or {}).get("epsilon") is not None]
        rounds = [r["round"] for r in rs if r["round"] is not None]
        refused = [r for r in rs if r["refused"]]
        secure = sum(r["kind"].startswith("train/secagg-") for r in rs)
        line = (f"  run {run}: {len(rs)} messages ({sum(r['kind'] == 'train' for r in rs)} train, "
                f"{sum(r['kind'] == 'evaluate' for r in rs)} evaluate"
                + (f", {secure} secure-aggregation" if secure else "") + f"), {total / 1e6:.2f} MB in all; "
                + (f"model parameter arrays per train reply: {n_arrays}" if n_arrays or not secure else
                   "the model left only masked (secure aggregation)"))
        if n_control:
            line += f"; SCAFFOLD control-variate arrays per train reply: {n_control}"
        if rounds:
            line += f"; rounds {min(rounds)}-{max(rounds)}"
        line += f"; largest epsilon spent {max(eps):.2f}" if eps else "; no differential privacy"
        if refused:
            line += f"; {len(refused)} refused"
        out.append(line)
        for r in refused:
            out.append(f"    refused at {r['time']} ({r['kind']}, round {r['round']}): {r['refused']}")
    if damaged:
        out.append(f"  line(s) {', '.join(map(str, damaged))} damaged (a crash while writing): not counted above")
    return "\n".join(out)
