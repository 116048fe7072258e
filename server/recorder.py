"""The run folder of a federated run: config, per-round metrics, a checkpoint for resume, the
final model, results, and the coordinator's audit log of every message (audit.jsonl)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from ccmr_core.checkpoint import save_model
from ccmr_core.files import append_jsonl, atomic_path, read_jsonl, write_atomic
from ccmr_core.config import ExperimentConfig, dump_config
from ccmr_core.models.registry import changed_settings
from protocol import messages as proto

CHECKPOINT = "checkpoint.pt"


def _clean(x):
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def read_checkpoint(out: Path) -> dict | None:
    """The run folder's checkpoint (None if there is none); a damaged or code-carrying file is refused."""
    p = out / CHECKPOINT
    if not p.is_file():
        return None
    try:
        return torch.load(p, map_location="cpu", weights_only=True)  # never runs code from the file
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"resume: {p} is not a readable checkpoint ({type(e).__name__}); "
                         "start a new run folder, or restore the file from a backup") from None


def check_resume(out: Path, name: str, kwargs: dict) -> None:
    """A resume continues the model its checkpoint holds: a run config that builds another one (another
    model, or an architecture setting such as ``model.region_pool`` changed, e.g. by a new default) is
    refused before anything in the folder is touched. A setting the checkpoint predates counts at the model
    class's own default (what its weights were built with); settings only other models take are ignored.
    Checkpoints of earlier versions do not record their model and are continued with this run config's."""
    ck = read_checkpoint(out)
    if ck is None:
        return
    if "model_kwargs" not in ck:
        print(f"resume: {out / CHECKPOINT} comes from an earlier version that does not record its model; it is "
              "continued with this run config's model settings (a run begun before model.region_pool defaulted to "
              "mean+max needs 'model: {region_pool: mean}' in a --run-config config file)", flush=True)
        return
    if ck.get("model") != name:
        changed = [f"model: {ck.get('model')!r} in the checkpoint, {name!r} now"]
    else:  # the settings this model is built from (a setting of other models, or a new one at its default, is no change)
        changed = [f"{k}: {a!r} in the checkpoint, {b!r} now" for k, a, b in changed_settings(name, ck["model_kwargs"],
                                                                                             kwargs)]
    if changed:
        raise ValueError(f"resume: {out / CHECKPOINT} holds another model than this run config builds ("
                         + "; ".join(changed) + f"). Resume with the settings the run was started with ({out}/"
                         "config.yaml, e.g. --run-config \"config='...'\"), or start a new run folder")


class MessageAudit:
    """The coordinator's audit log: one line per message sent or received, written the way a site
    writes its own (protocol.messages.audit_entry), so the two can be compared. Under secure
    aggregation the SecAgg+ grid records the train rounds' protocol messages itself, and the plain
    train messages are not recorded twice (``secure``)."""

    def __init__(self, path: Path, secure: bool = False):
        self.path, self.secure = Path(path), secure

    def record(self, rnd: int, direction: str, kind: str, messages) -> None:
        if self.secure and kind == "train":  # the grid records the "train/secagg-*" messages instead
            return
        rows = [proto.audit_entry(m.content, round=rnd, direction=direction, kind=kind,
                                  node=m.metadata.dst_node_id if direction == "sent" else m.metadata.src_node_id)
                for m in messages if m.has_content()]
        append_jsonl(self.path, rows)


class RunRecorder:
    def __init__(self, out: Path, cfg: ExperimentConfig, model_kwargs: dict, site_names: list[str]):
        self.out = out
        self.cfg = cfg
        self.kwargs = model_kwargs
        self.sites = site_names
        self.t0 = time.perf_counter()
        self._pending: dict | None = None  # a round's line waiting for the sites' validation
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "config.yaml", dump_config(cfg))

    # --- resume -------------------------------------------------------------------------------
    def load_checkpoint(self) -> dict | None:
        ck = read_checkpoint(self.out)
        if ck is None:
            return None
        self._align_metrics(int(ck["round"]), ck.get("row"))
        return ck

    def _align_metrics(self, done: int, row: dict | None) -> None:
        """metrics.jsonl holds exactly rounds 1..done after a crash at any point of record_round:
        a row written after the last checkpoint is dropped (that round is redone), and the
        checkpoint's own row is restored if the crash came before it reached metrics.jsonl."""
        p = self.out / "metrics.jsonl"
        rows, damaged = read_jsonl(p)
        if damaged:
            print(f"resume: {p} line(s) {', '.join(map(str, damaged))} damaged (a crash while writing); "
                  "dropped", flush=True)
        keep = [r for r in rows if r.get("round", done + 1) <= done]
        if row is not None and (not keep or keep[-1]["round"] < done):
            keep.append(row)
        if keep != rows or damaged:
            print(f"resume: metrics.jsonl aligned with the checkpoint (rounds 1-{done})", flush=True)
            write_atomic(p, "".join(json.dumps(r) + "\n" for r in keep))

    # --- every round --------------------------------------------------------------------------
    def record_round(self, rnd: int, state: dict, train: dict | None, federated: dict | None,
                     server: dict | None, privacy: dict | None, validation_follows: bool = False,
                     average: dict | None = None, carried: dict | None = None) -> str:
        """Checkpoint round ``rnd`` (with the tail average so far, ``average``, and what the
        aggregation carries to the next round, ``carried``: arrays by name) and write its metrics
        line; with ``validation_follows`` the line waits for the sites' validation of this round's
        model (``complete_round``, when the next round's train replies bring it; a crash before
        then leaves the line without it)."""
        row = {"round": rnd, "seconds": round(time.perf_counter() - self.t0, 2), "train": train,
               "federated_validation": federated, "server_validation": server, "privacy": privacy}
        self.flush()  # the round before, complete or not, goes first: metrics.jsonl stays in order
        # the checkpoint first (with its row): a crash in between is repaired on resume
        with atomic_path(self.out / CHECKPOINT) as tmp:
            torch.save({"round": rnd, "state": state, "row": _clean(row), "model": self.cfg.model.name,
                        "model_kwargs": self.kwargs,
                        **({"average": average} if average is not None else {}),
                        **({"carried": {k: torch.from_numpy(np.array(v)) for k, v in carried.items()}}
                           if carried else {})}, tmp)
        if validation_follows:
            self._pending = row
        else:
            append_jsonl(self.out / "metrics.jsonl", [_clean(row)])
        return self._line(rnd, train, federated, server, privacy)

    def complete_round(self, rnd: int, federated: dict) -> str | None:
        """The sites' validation of round ``rnd``'s model, written into that round's waiting line;
        None when no line waits for it (e.g. the round before a resume)."""
        row, self._pending = self._pending, None
        if row is None or row["round"] != rnd:
            self._pending = row
            return None
        append_jsonl(self.out / "metrics.jsonl", [_clean({**row, "federated_validation": federated})])
        return self._line(rnd, None, federated, None, None)

    def flush(self) -> None:
        """Write a line still waiting for its validation as it is (the run ended without it)."""
        if self._pending is not None:
            append_jsonl(self.out / "metrics.jsonl", [_clean(self._pending)])
            self._pending = None

    def _line(self, rnd, train, federated, server, privacy) -> str:
        parts = [f"round {rnd}:"]
        if train and train.get(proto.TRAIN_LOSS) == train.get(proto.TRAIN_LOSS):
            parts.append(f"train loss {train['train-loss']:.3f}")
        if train and train.get(proto.SECAGG_CLIPPED):
            parts.append(f"(warning: secure aggregation clipped {int(train['secagg-clipped'])} update coordinates; "
                         "raise secure_aggregation.clipping_range)")
        if federated and "report-to-study-R@5" in federated:  # CMR-CLIP: retrieval within each site's gallery
            zs = federated.get("zero-shot-accuracy")
            parts.append(f"sites' validation: contrastive loss {federated['loss']:.3f}, report->study R@5 "
                         f"{federated['report-to-study-R@5']:.2f} (chance {federated['chance-R@5']:.2f})"
                         + (f", zero-shot accuracy {zs:.2f}" if zs is not None else ""))
        elif federated and "accuracy" in federated:
            parts.append(f"sites' validation accuracy {federated['accuracy']:.3f} (AUC {federated['macro-auc']:.3f})")
            accs = ", ".join(f"{s} {a:.2f}" for s, a in zip(self.sites, federated.get("site-accuracy", []))
                             if a == a)
            if accs:
                parts.append(f"[{accs}]")
        if server:
            parts.append(f"coordinator validation accuracy {server['accuracy']:.3f}, loss {server['loss']:.3f}")
        if privacy and privacy.get("epsilon"):
            eps = ", ".join(f"{s} {e:.2f}" for s, e in privacy["epsilon"].items())
            parts.append(f"epsilon [{eps}] at delta {privacy['delta']:g}")
        return " ".join(parts)

    def save_model(self, state: dict, rnd: int, refer: dict | None = None) -> None:
        save_model(self.out / "model.pt", state, name=self.cfg.model.name, kwargs=self.kwargs,
                   classes=list(self.cfg.data.classes), ingest=self.cfg.data.ingest.model_dump(mode="json"),
                   config=self.cfg.model_dump(mode="json"), info={"round": rnd, "sites": self.sites,
                                                                   "run": self.out.name, "federated": True},
                   refer=refer)

    def finish(self, results: dict) -> None:
        (self.out / "metrics.json").write_text(json.dumps(_clean(results), indent=1))
