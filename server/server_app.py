"""Flower ServerApp: the coordinator aggregates with FedProx (or FedAvg), validates the global model
every round without seeing any hospital image, checkpoints, and writes the run folder."""

from __future__ import annotations

import logging
import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from opacus.accountants import RDPAccountant
from torch.utils.data import DataLoader

from ccmr_core.calibration import fit_temperature
from ccmr_core.config import from_run_config
from ccmr_core.data.sources import find_sites
from ccmr_core.files import read_jsonl
from ccmr_core.engine import evaluate, set_threads
from ccmr_core.models.registry import build_model, model_kwargs
from ccmr_core.referral import thresholds_from_stats
from ccmr_core.schedule import finetunes_head
from ccmr_core.synth.biomechanics import SIGNALS
from protocol import messages as proto
from server.aggregation import aggregate_train_metrics, evaluate_aggr_fn, pooled_stats, summarize_stats
from server.local_superlink import schedule_stop_if_auto_started
from server.provision import ensure_cohort, initial_state, run_dir, run_key, validation_set
from server.recorder import RunRecorder
from server.robust_rounds import RetryGrid
from server.secure_aggregation import SecAggPlusGrid
from server.strategy import ClientSideClippingDP, ServerSideClippingDP, make_strategy

app = ServerApp()
# Opacus calls logging.basicConfig() at import, which gives the root logger a handler; Flower's
# logger has its own and also propagates, so every line would be printed twice.
logging.getLogger("flwr").propagate = False
log = logging.getLogger("ccmr.server")


def _site_epsilon(cfg, train: dict | None, rounds_done: int, site_names: list[str]) -> dict | None:
    """Epsilon per site for this round: the sites' own DP-SGD ledgers (sample mode) or the
    server-side Gaussian mechanism applied once per round to clipped site updates (site mode)."""
    if cfg.privacy.mode == "sample" and train:
        eps = train.get(proto.SITE_EPSILON, [])
        return {"mode": "sample", "delta": cfg.privacy.delta,
                "epsilon": {s: float(e) for s, e in zip(site_names, eps)},
                "declined": [s for s, d in zip(site_names, train.get(proto.SITE_DECLINED, [])) if d]}
    if cfg.privacy.mode == "site":
        acc = RDPAccountant()
        acc.history = [(cfg.privacy.noise_multiplier, 1.0, rounds_done)] if rounds_done else []
        e = float(acc.get_epsilon(cfg.privacy.delta)) if rounds_done and cfg.privacy.noise_multiplier > 0 else float("inf")
        return {"mode": "site", "delta": cfg.privacy.delta, "epsilon": {s: e for s in site_names}, "declined": []}
    return None


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    cfg = from_run_config(rc)
    set_threads(cfg.train.threads)
    resume = str(rc.get("resume", "") or "")
    out = run_dir(resume or str(rc.get("out-dir", "") or ""), cfg.model.name)
    deployed = str(rc.get("sites", "") or "")
    if deployed:  # deployment: each SuperNode serves its own hospital's data; the coordinator holds none
        site_names = [s.strip() or f"slot-{k}" for k, s in enumerate(deployed.split(","))]
        cohort = ""
    else:  # simulation: the synthetic cohort, generated once
        cohort = ensure_cohort(cfg, str(rc.get("data-dir", "") or ""))
        site_names = [name for name, _, _ in find_sites(cohort)]
    val = validation_set(cfg)
    bio = val.bio_channels if val is not None else len(SIGNALS)
    kwargs = model_kwargs(cfg, bio)
    recorder = RunRecorder(out, cfg, kwargs, site_names)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model.name, **kwargs)
    done = 0
    start = None
    if not resume:
        start = initial_state(cfg, model, bool(deployed))
    if resume:
        ck = recorder.load_checkpoint()
        if ck is None:
            raise FileNotFoundError(f"resume: no {out}/checkpoint.pt to continue from")
        model.load_state_dict(ck["state"])
        done = int(ck["round"])
        print(f"resuming {out} after round {done} of {cfg.federated.rounds}", flush=True)
    remaining = cfg.federated.rounds - done
    n_nodes = len(list(grid.get_node_ids()))
    print(f"CC-CMR federated run -> {out}\n  model {cfg.model.name}, {cfg.federated.strategy}"
          f"{f' (mu={cfg.federated.proximal_mu:g})' if cfg.federated.strategy == 'fedprox' else ''}"
          f"{f', server momentum {cfg.federated.server_momentum:g} lr {cfg.federated.server_lr:g} (FedAvgM)' if cfg.federated.server_momentum > 0 or cfg.federated.server_lr != 1.0 else ''}, "
          f"{cfg.federated.rounds} rounds x {cfg.federated.local_epochs} local epoch(s), DP: {cfg.privacy.mode}"
          f"{' (sites train the heads only)' if finetunes_head(cfg) else ''}; starts from "
          f"{start or ('the checkpoint' if resume else 'random weights')}\n"
          f"  sites: {', '.join(site_names)} {f'from {cohort}' if cohort else '(each on its own SuperNode)'}; "
          f"SuperNodes: {n_nodes}", flush=True)
    if 0 < n_nodes < len(site_names) and not deployed:
        print(f"  note: {n_nodes} SuperNodes for {len(site_names)} sites, so some SuperNodes host several "
              "sites (each trained and accounted separately; the average is unchanged). For one SuperNode "
              f"per site run once: flwr federation simulation-config --num-supernodes {len(site_names)}",
              flush=True)
        if cfg.privacy.mode == "site":
            raise ValueError("site-level DP needs one SuperNode per site (each site's update is clipped "
                             "separately); set --num-supernodes to the number of sites")

    common = dict(fraction_train=cfg.federated.fraction_train, fraction_evaluate=cfg.federated.fraction_evaluate,
                  min_train_nodes=cfg.federated.min_sites, min_evaluate_nodes=cfg.federated.min_sites,
                  min_available_nodes=cfg.federated.min_sites,
                  weighted_by_key=proto.UNIT_WEIGHT if cfg.privacy.mode == "site" else proto.NUM_EXAMPLES,
                  train_metrics_aggr_fn=aggregate_train_metrics,
                  evaluate_metrics_aggr_fn=evaluate_aggr_fn(list(cfg.data.classes)))
    inner = make_strategy(cfg.federated, common, plain_keys=[k for k, _ in model.named_buffers()])
    inner.round_offset = done
    inner.max_update_ratio = cfg.federated.max_update_ratio
    inner.max_site_weight = cfg.federated.max_site_weight
    inner.audit_path = out / "audit.jsonl"
    inner.aggregator, inner.trim_fraction = cfg.federated.aggregator, cfg.federated.trim_fraction
    strategy = inner
    secure = cfg.secure_aggregation.enabled
    if cfg.privacy.mode == "site":
        # the coordinator clips each site's update, or, under secure aggregation where it sees only
        # the sum, each site clips its own (client/client_app.py); the noise is added to the mean
        wrapper = ClientSideClippingDP if secure else ServerSideClippingDP
        strategy = wrapper(inner, noise_multiplier=cfg.privacy.noise_multiplier,
                           clipping_norm=cfg.privacy.clipping_norm,
                           num_sampled_clients=max(1, int(round(n_nodes * cfg.federated.fraction_train))))
    if secure:
        inner.secure = True
        grid = SecAggPlusGrid(grid, cfg.secure_aggregation, common["weighted_by_key"], audit=inner.audit_messages)
        print(f"  secure aggregation (SecAgg+): the coordinator sees only the weighted mean of the sites' updates; "
              f"clipping range {cfg.secure_aggregation.clipping_range:g}, max weight "
              f"{cfg.secure_aggregation.max_weight}", flush=True)
    grid = RetryGrid(grid, cfg.federated.min_sites, cfg.federated.round_retries)
    val_loader = DataLoader(val, batch_size=cfg.train.batch_size) if val is not None else None
    classes = list(cfg.data.classes)
    base = {proto.COHORT_DIR: str(cohort), proto.NUM_SITES: len(site_names), proto.BIO_CHANNELS: bio,
            proto.RUN_KEY: run_key(out)}

    latest = {"state": model.state_dict()}  # the global model after the last round (resume: the checkpoint)

    def round_end(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        state = arrays.to_torch_state_dict()
        latest["state"] = state
        server = None
        if val_loader is not None:
            model.load_state_dict(state)
            m = evaluate(model, val_loader, torch.device("cpu"), classes)
            server = {"accuracy": m["accuracy"], "macro-auc": m["macro_auc"], "ece": m["ece"], "loss": m["loss"]}
        if server_round == 0:
            if server and not done:
                print(f"round 0 (initial model): coordinator validation accuracy {server['accuracy']:.3f}", flush=True)
            return MetricRecord(server) if server else None
        rnd = done + server_round
        train = dict(inner.last_train) if inner.last_train else None
        if inner.rejected:
            train = {**(train or {}), "rejected": list(inner.rejected)}
        fed = dict(inner.last_eval) if inner.last_eval else None
        privacy = _site_epsilon(cfg, train, rnd, site_names)
        print(recorder.record_round(rnd, state, train, fed, server, privacy), flush=True)
        return MetricRecord(server) if server else None

    t0 = time.perf_counter()
    result = None
    if remaining > 0:
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=remaining,
                                timeout=cfg.federated.round_timeout_s,
                                train_config=ConfigRecord(base),
                                evaluate_config=ConfigRecord({**base, proto.SPLIT: "val"}), evaluate_fn=round_end)
    train_seconds = time.perf_counter() - t0

    # the model at the end of the schedule; calibrated and given referral thresholds on the sites'
    # pooled validation statistics (counts and sums only), then tested on every site's held-out patients
    final_state = latest["state"]

    def final_evaluation(state: dict, split: str, **extra) -> list[RecordDict]:
        c = ConfigRecord({**base, proto.SPLIT: split, **extra})
        arrays = ArrayRecord(state)
        msgs = [Message(content=RecordDict({"arrays": arrays, "config": c}), dst_node_id=nid,
                        message_type=MessageType.EVALUATE) for nid in grid.get_node_ids()]
        return [r.content for r in grid.send_and_receive(msgs, timeout=cfg.federated.round_timeout_s)
                if r.has_content()]

    refer, temperature = None, 1.0
    val_stats = pooled_stats(final_evaluation(final_state, "val"), len(classes))[0]
    if val_stats.n:
        temperature = fit_temperature(val_stats.nll_t)
        final_state = {**final_state, "calibration": torch.tensor(temperature)}
        val_stats = pooled_stats(final_evaluation(final_state, "val", **{proto.MC_SAMPLES: cfg.model.mc_samples}),
                                 len(classes))[0]
        refer = thresholds_from_stats(val_stats, len(classes), cfg.model.refer_fraction)
        print(f"calibration temperature {temperature:.2f} and referral thresholds from {refer['validation_n']} "
              f"validation patients at the sites: confidence below {refer['confidence']:.2f} or uncertainty above "
              f"{refer['uncertainty']}", flush=True)
    rounds_done = done + (remaining if result else 0)
    recorder.save_model(final_state, rounds_done, refer=refer)
    counts = {proto.REFER_CONFIDENCE: refer["confidence"], proto.REFER_UNCERTAINTY: refer["uncertainty"]
              if refer["uncertainty"] is not None else -1.0} if refer else {}
    replies = final_evaluation(final_state, "test", **{proto.MC_SAMPLES: cfg.model.mc_samples}, **counts)
    test = summarize_stats(*pooled_stats(replies, len(classes)), classes) if replies else {"n": 0}
    server_val = None
    if val_loader is not None:
        model.load_state_dict(final_state)
        server_val = evaluate(model, val_loader, torch.device("cpu"), classes, mc_samples=cfg.model.mc_samples)
    last = _last_privacy(out)
    results = {"model": cfg.model.name, "strategy": cfg.federated.strategy, "rounds": cfg.federated.rounds,
               "calibration_temperature": temperature, "sites": site_names, "supernodes": n_nodes, "test": test,
               "server_validation": server_val, "privacy": last, "refer": refer,
               "train_seconds": round(train_seconds, 1)}
    recorder.finish(results)
    _print_table(results, out)
    from ccmr_core.report import write_report

    write_report(out)
    if not bool(rc.get("keep-superlink", False)):
        schedule_stop_if_auto_started()


def _last_privacy(out) -> dict | None:
    rows, _ = read_jsonl(out / "metrics.jsonl")
    return rows[-1].get("privacy") if rows else None


def _print_table(r: dict, out) -> None:
    t = r["test"]
    print("\n=== test set (held-out patients of every site, pooled) ===", flush=True)
    if not t.get("n"):
        print("no test patients", flush=True)
        return
    lo, hi = t["accuracy_ci95"]
    print(f"{'model':<10} {'n':>4} {'accuracy':>9} {'95% CI':>15} {'macro AUC':>10} {'ECE':>6}")
    print(f"{r['model']:<10} {t['n']:>4} {t['accuracy']:>9.3f} {f'{lo:.3f}-{hi:.3f}':>15} "
          f"{t['macro_auc']:>10.3f} {t['ece']:>6.3f}")
    if t.get("ece_floor") is not None:
        print(f"  ECE {t['ece']:.3f}; a perfectly calibrated model would score about {t['ece_floor']:.3f} on "
              f"{t['n']} patients (ECE is biased upwards on few patients)")
    for s, a, n in zip(r["sites"], t["site_accuracy"], t["site_n"]):
        if n:
            print(f"  {s}: accuracy {a:.3f} (n={n})")
    if r.get("privacy"):
        eps = ", ".join(f"{s} {e:.2f}" for s, e in r["privacy"]["epsilon"].items())
        print(f"  privacy ({r['privacy']['mode']}-level): epsilon {eps} at delta {r['privacy']['delta']:g}")
    print(f"run folder: {out} (model.pt, metrics.json, metrics.jsonl, report.html)", flush=True)

