"""Federated learning on the default non-IID cohort: centralized vs FedAvg vs FedProx vs site-local,
DP-SGD at several epsilons, framework overhead and bytes per round.

    python -m benchmarks.federated [--rounds 10] [--models cc-cmr cine-only] [--dp-eps 1 3 8]

Every federated run drives the real ServerApp and ClientApp in one process (server/inprocess.py,
no Ray), so the comparison measures learning, not the simulator. The test set is the same in
every row: each site's held-out test patients, pooled. Centralized trains on the union of the
sites' training patients; site-local trains each site alone and tests it on its own patients.

Overhead: the same FedAvg rounds once through the Flower apps (train only: no evaluation phase)
and once as the bare local training loop over the same sites and data, without Flower, side by
side; the ratio is their wall time. Bytes: each train reply serialised to Flower's protobuf
message, divided by the model's fp32 parameter bytes.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import tomllib
from pathlib import Path

import numpy as np
import torch
from flwr.common.serde import message_to_proto
from torch.utils.data import ConcatDataset, DataLoader, Subset

from benchmarks.common import ROOT, machine, update_block
from ccmr_core.config import load_config
from ccmr_core.engine import evaluate, make_optimizer, predict, train_epoch
from ccmr_core.metrics import classification_metrics
from ccmr_core.models.registry import build_model
from ccmr_core.synth.cohort import generate_cohort
from ccmr_core.training import model_kwargs
from client.local import load_sites
from server.inprocess import run_inprocess


def run_config(**over) -> dict:
    rc = dict(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    rc.update(over)
    return rc


def federated(cohort: Path, out: Path, **over) -> tuple[dict, object]:
    from client.client_app import app as client_app
    from server.server_app import app as server_app

    if not (out / "metrics.json").is_file():
        grid = run_inprocess(server_app, client_app, 3, run_config(**{"out-dir": str(out), "data-dir": str(cohort),
                                                                      "keep-superlink": True}, **over))
    else:
        grid = None
    return json.loads((out / "metrics.json").read_text()), grid


def _sites(cohort: Path, cfg):
    return load_sites({"partition-id": 0, "num-partitions": 1}, cfg, str(cohort))


def _test_outputs(model, sites, cfg) -> tuple[np.ndarray, np.ndarray]:
    probs, labels = [], []
    for s in sites:
        o = predict(model, DataLoader(Subset(s.eval, s.split["test"]), batch_size=8), torch.device("cpu"),
                    cfg.model.mc_samples)
        probs.append(o["probs"])
        labels.append(o["labels"].astype(int))
    return np.concatenate(probs), np.concatenate(labels)


def central_or_local(cohort: Path, cfg, epochs: int, local: bool) -> dict:
    """Train with the engine on the sites' training patients, all together (centralized) or each
    site alone (site-local, tested on its own patients); early stopping on validation loss."""
    sites = _sites(cohort, cfg)
    kw = model_kwargs(cfg, len(cfg.data.classes), cfg.data.ingest.slices, 4)
    probs, labels = [], []
    for group in ([[s] for s in sites] if local else [sites]):
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model.name, **kw)
        opt = make_optimizer(model, cfg.train)
        train = ConcatDataset([Subset(s.train, s.split["train"]) for s in group])
        val = ConcatDataset([Subset(s.eval, s.split["val"]) for s in group])
        best, best_loss = None, float("inf")
        for _ in range(epochs):
            train_epoch(model, DataLoader(train, batch_size=cfg.train.batch_size, shuffle=True), opt,
                        torch.device("cpu"))
            v = evaluate(model, DataLoader(val, batch_size=8), torch.device("cpu"), list(cfg.data.classes))
            if v["loss"] < best_loss:
                best_loss, best = v["loss"], {k: t.clone() for k, t in model.state_dict().items()}
        model.load_state_dict(best)
        p, y = _test_outputs(model, group, cfg)
        probs.append(p)
        labels.append(y)
    return classification_metrics(np.concatenate(probs), np.concatenate(labels), list(cfg.data.classes))


def overhead(cohort: Path, work: Path, rounds: int = 3) -> tuple[float, float, float]:
    """(Flower wall s per round, bare loop s per round, bytes ratio) for train-only FedAvg rounds."""
    cfg = load_config(overrides=["federated.fraction_evaluate=0.0", "federated.validation_patients=0"])
    out = work / "overhead"
    _, grid = federated(cohort, out, **{"num-server-rounds": rounds, "strategy": "fedavg",
                                        "validation-patients": 0})
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    fl = np.diff([0.0] + [r["seconds"] for r in rows])[1:].mean()  # rounds after the first (start-up)
    # the same rounds without Flower: load the global weights, train each site one epoch, average
    sites = _sites(cohort, cfg)
    kw = model_kwargs(cfg, len(cfg.data.classes), cfg.data.ingest.slices, 4)
    torch.manual_seed(0)
    g = build_model(cfg.model.name, **kw).state_dict()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        states, w = [], []
        for s in sites:
            m = build_model(cfg.model.name, **kw)
            m.load_state_dict(g)
            opt = make_optimizer(m, cfg.train)
            train_epoch(m, DataLoader(Subset(s.train, s.split["train"]), batch_size=cfg.train.batch_size,
                                      shuffle=True), opt, torch.device("cpu"))
            states.append(m.state_dict())
            w.append(len(s.split["train"]))
        g = {k: sum(st[k] * (wi / sum(w)) for st, wi in zip(states, w)) for k in g}
        times.append(time.perf_counter() - t)
    bare = float(np.mean(times[1:]))
    n_param_bytes = sum(v.numel() * 4 for v in g.values())
    sizes = [message_to_proto(r).ByteSize() for r in grid.received if r.has_content() and r.content.array_records]
    return float(fl), bare, float(np.mean(sizes) / n_param_bytes) if sizes else float("nan")


def _overhead_text(fl: float, bare: float, bytes_ratio: float) -> str:
    return f"""Framework overhead (train-only FedAvg rounds, after the first): Flower apps {fl:.2f} s per round vs
the same local training without Flower {bare:.2f} s: **ratio {fl / bare:.2f}** (target at most 1.15).
Bytes per site per round (Flower protobuf message of a train reply) / fp32 parameter bytes:
**{bytes_ratio:.3f}** (target at most 1.05). (`--overhead-only` re-measures these two lines alone.)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--models", nargs="+", default=["cc-cmr", "cine-only"])
    ap.add_argument("--mus", type=float, nargs="+", default=[0.01, 0.1])
    ap.add_argument("--dp-eps", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--overhead-only", action="store_true",
                    help="measure only the framework overhead and bytes, and replace those lines in the block")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ccmr-fl-"))
    cohort = work / "cohort"
    generate_cohort(cohort, progress=False)
    if args.overhead_only:
        fl, bare, bytes_ratio = overhead(cohort, work)
        path = ROOT / "BENCHMARKS.md"
        text = path.read_text()
        new = _overhead_text(fl, bare, bytes_ratio)
        start = text.index("Framework overhead (train-only")
        end = text.index("<!-- federated:end -->")
        path.write_text(text[:start] + new + "\n" + text[end:])
        print(new)
        return
    rows = []

    def add(model, setting, m):
        lo, hi = m.get("accuracy_ci95", [float("nan")] * 2)
        eps = m.get("epsilon", "")
        rows.append(f"| {model} | {setting} | {m['accuracy']:.3f} | {lo:.2f}-{hi:.2f} | {m['macro_auc']:.3f} | "
                    f"{m['ece']:.3f} | {eps} |")
        print(rows[-1], flush=True)

    for model in args.models:
        align = "slice" if model == "cc-cmr" else "batch"
        cfg = load_config(overrides=[f"model.name={model}"])
        add(model, f"centralized ({args.rounds} epochs)", central_or_local(cohort, cfg, args.rounds, local=False))
        add(model, f"site-local only ({args.rounds} epochs)", central_or_local(cohort, cfg, args.rounds, local=True))
        r, _ = federated(cohort, work / f"{model}-fedavg", model=model, strategy="fedavg",
                         **{"num-server-rounds": args.rounds})
        add(model, "FedAvg", r["test"])
        for mu in args.mus:
            r, _ = federated(cohort, work / f"{model}-fedprox-{mu}", model=model, strategy="fedprox",
                             **{"num-server-rounds": args.rounds, "proximal-mu": mu})
            add(model, f"FedProx mu={mu:g}", r["test"])
        r, _ = federated(cohort, work / f"{model}-fedprox-slice", model=model, alignment=align,
                         **{"num-server-rounds": args.rounds})
        if model == "cc-cmr":
            add(model, "FedProx, per-patient alignment, no DP", r["test"])
        for eps in args.dp_eps:
            r, _ = federated(cohort, work / f"{model}-dp-{eps}", model=model, alignment=align, dp="sample",
                             **{"num-server-rounds": args.rounds, "target-epsilon": eps})
            spent = max(r["privacy"]["epsilon"].values())
            add(model, f"FedProx + DP-SGD, target epsilon {eps:g}", {**r["test"], "epsilon": f"{spent:.2f}"})
    fl, bare, bytes_ratio = overhead(cohort, work)
    text = f"""## Federated learning on non-IID sites (`python -m benchmarks.federated`)

Machine: {machine()}.
Default synthetic cohort (3 sites with different scanners and class mixes, 231 patients). Test set in
every row: the held-out test patients of all three sites, pooled (the same patients each time).
{args.rounds} rounds x 1 local epoch (federated) or {args.rounds} epochs (centralized, site-local); one seed;
FedProx mu 0.01 unless stated; DP rows use patient-level DP-SGD (Opacus, clipping norm 1, RDP,
delta 1e-5) with CC-CMR's per-patient alignment; epsilon is the largest any site spent.

| model | training | accuracy | 95% CI | macro AUC | ECE | epsilon |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}

{_overhead_text(fl, bare, bytes_ratio)}"""
    update_block("federated", text)
    print(text)


if __name__ == "__main__":
    main()
