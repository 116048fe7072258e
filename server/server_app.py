"""Flower ServerApp: the coordinator aggregates with FedProx (or FedAvg), validates the global model
every round without seeing any hospital image, checkpoints, and writes the run folder."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from opacus.accountants import RDPAccountant
from torch.utils.data import DataLoader

from ccmr_core.calibration import fit_temperature
from ccmr_core.config import ExperimentConfig, from_run_config
from ccmr_core.data.sources import find_sites
from ccmr_core.files import read_jsonl
from ccmr_core.engine import evaluate, set_threads
from ccmr_core.models.registry import build_model, model_kwargs, reads_reports
from ccmr_core.referral import thresholds_from_stats
from ccmr_core.schedule import finetunes_head, starts_pretrained
from ccmr_core.synth.biomechanics import SIGNALS
from protocol import messages as proto
from server.aggregation import (aggregate_train_metrics, evaluate_aggr_fn, pooled_stats, retrieval_aggr_fn,
                                retrieval_summary, summarize_stats)
from server.local_superlink import schedule_stop_if_auto_started
from server.provision import ensure_cohort, initial_state, run_dir, run_key, validation_set
from server.recorder import MessageAudit, RunRecorder, check_resume
from server.packing_grid import PackingGrid
from server.robust_rounds import FastPollGrid, RetryGrid
from server.secure_aggregation import SecAggPlusGrid
from server.strategy import ClientSideClippingDP, ServerSideClippingDP, make_strategy
from server.tail_average import TailAverage, first_averaged_round

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


@dataclass
class Run:
    """What the coordinator knows about this run once it has read its config."""

    cfg: ExperimentConfig
    out: Path
    site_names: list[str]
    cohort: str  # simulation: the synthetic cohort's folder; a deployment: "" (each site has its own data)
    deployed: bool
    resume: bool
    val: object  # the coordinator's own validation set (None: none)
    kwargs: dict  # the model's arguments
    recorder: RunRecorder
    tail: TailAverage = field(default_factory=lambda: TailAverage(None))  # federated.average_last (initial_model)
    carried: dict | None = None  # a resumed run: what the aggregation carried at the checkpoint (initial_model)

    @property
    def classes(self) -> list[str]:
        return list(self.cfg.data.classes)

    @property
    def val_loader(self) -> DataLoader | None:
        """The coordinator's validation patients in batches (None: it has none)."""
        return DataLoader(self.val, batch_size=self.cfg.train.batch_size) if self.val is not None else None

    def request(self, **extra) -> ConfigRecord:
        """The config record every request carries (protocol/messages.py)."""
        bio = self.kwargs["bio_channels"]
        return ConfigRecord({proto.COHORT_DIR: self.cohort, proto.NUM_SITES: len(self.site_names),
                             proto.BIO_CHANNELS: bio, proto.RUN_KEY: run_key(self.out), **extra})


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    run = open_run(rc)
    model, done, start = initial_model(run)
    n_nodes = len(list(grid.get_node_ids()))
    announce(run, n_nodes, start)
    strategy, inner, grid = coordinator(run, grid, model, done, n_nodes)
    t0 = time.perf_counter()
    final_state, completed = train_rounds(run, strategy, inner, grid, model, done)
    train_seconds = time.perf_counter() - t0
    averaged = run.tail.describe(done + completed)
    if averaged:
        print(averaged, flush=True)
    final_state = run.tail.result(final_state)
    final_state, temperature, refer = calibrate(run, grid, final_state)
    run.recorder.save_model(final_state, done + completed, refer=refer)
    results = test(run, grid, model, final_state, refer)
    results.update({"calibration_temperature": temperature, "supernodes": n_nodes, "refer": refer,
                    "train_seconds": round(train_seconds, 1)})
    run.recorder.finish(results)
    _print_table(results, run.out)
    from ccmr_core.report import write_report

    write_report(run.out)
    if not bool(rc.get("keep-superlink", False)):
        schedule_stop_if_auto_started()


def open_run(rc) -> Run:
    """The config, the run folder, the sites and (simulation) their cohort, the validation set."""
    cfg = from_run_config(rc)
    if reads_reports(cfg.model.name) and (starts_pretrained(cfg) or finetunes_head(cfg)):
        raise ValueError("model 'cmr-clip' trains whole from random weights in a federation: federated.pretrain / "
                         "federated.initial_model start from a classifier and privacy.finetune 'head' trains a "
                         "classifier's heads; set federated.pretrain: none and privacy.finetune: auto")
    if cfg.train.keep_model != "last":
        raise ValueError(f"train.keep_model {cfg.train.keep_model!r} chooses among the epochs of central training; a "
                         "federation keeps its last round's model (or the mean of its last rounds': "
                         "federated.average_last): set train.keep_model to 'last'")
    set_threads(cfg.train.threads)
    resume = str(rc.get("resume", "") or "")
    out = run_dir(resume or str(rc.get("out-dir", "") or ""), cfg.model.name)
    deployed = str(rc.get("sites", "") or "")
    if deployed:  # deployment: each SuperNode serves its own hospital's data; the coordinator holds none
        site_names = [s.strip() or f"slot-{k}" for k, s in enumerate(deployed.split(","))]
        cohort = ""
    else:  # simulation: the synthetic cohort, generated once
        cohort = str(ensure_cohort(cfg, str(rc.get("data-dir", "") or "")))
        site_names = [name for name, _, _ in find_sites(cohort)]
    # the coordinator's labelled validation patients judge a classifier; CMR-CLIP is judged at the sites
    val = None if reads_reports(cfg.model.name) else validation_set(cfg)
    kwargs = model_kwargs(cfg, val.bio_channels if val is not None else len(SIGNALS))
    if resume:  # before the run folder's config.yaml is rewritten
        check_resume(out, cfg.model.name, kwargs)
    return Run(cfg, out, site_names, cohort, bool(deployed), bool(resume), val, kwargs,
               RunRecorder(out, cfg, kwargs, site_names))


def initial_model(run: Run) -> tuple[torch.nn.Module, int, str | None]:
    """The global model to start from, the rounds already done (resume) and where it came from."""
    torch.manual_seed(run.cfg.train.seed)
    model = build_model(run.cfg.model.name, **run.kwargs)
    run.tail = TailAverage(first_averaged_round(run.cfg, model))
    if not run.resume:
        return model, 0, initial_state(run.cfg, model, run.deployed)
    ck = run.recorder.load_checkpoint()
    if ck is None:
        raise FileNotFoundError(f"resume: no {run.out}/checkpoint.pt to continue from")
    model.load_state_dict(ck["state"])
    run.tail.restore(ck.get("average"))
    run.carried = ck.get("carried")
    print(f"resuming {run.out} after round {int(ck['round'])} of {run.cfg.federated.rounds}", flush=True)
    return model, int(ck["round"]), None


def announce(run: Run, n_nodes: int, start: str | None) -> None:
    cfg = run.cfg
    fed = cfg.federated
    print(f"CC-CMR federated run -> {run.out}\n  model {cfg.model.name}, {fed.strategy}"
          f"{f' (mu={fed.proximal_mu:g})' if fed.strategy == 'fedprox' else ''}"
          f"{f', server momentum {fed.server_momentum:g} lr {fed.server_lr:g} (FedAvgM)' if fed.server_momentum > 0 or fed.server_lr != 1.0 else ''}"
          f"{', SCAFFOLD control variates' if fed.drift_correction == 'scaffold' else ''}"
          f"{f', aggregator {fed.aggregator}' if fed.aggregator != 'mean' else ''}, "
          f"{fed.rounds} rounds x {fed.local_epochs} local epoch(s), DP: {cfg.privacy.mode}"
          f"{' (sites train the heads only)' if finetunes_head(cfg) else ''}; starts from "
          f"{start or ('the checkpoint' if run.resume else 'random weights')}\n"
          f"  sites: {', '.join(run.site_names)} {f'from {run.cohort}' if run.cohort else '(each on its own SuperNode)'}; "
          f"SuperNodes: {n_nodes}", flush=True)
    if 0 < n_nodes < len(run.site_names) and not run.deployed:
        print(f"  note: {n_nodes} SuperNodes for {len(run.site_names)} sites, so some SuperNodes host several "
              "sites (each trained and accounted separately; the average is unchanged). For one SuperNode "
              f"per site run once: flwr federation simulation-config --num-supernodes {len(run.site_names)}",
              flush=True)
        if cfg.privacy.mode == "site":
            raise ValueError("site-level DP needs one SuperNode per site (each site's update is clipped "
                             "separately); set --num-supernodes to the number of sites")


def coordinator(run: Run, grid: Grid, model, done: int, n_nodes: int):
    """(the strategy that runs the rounds, the CoordinatorRounds inside any DP wrapper, the grid):
    the chosen aggregation with screening and audit, site-level DP noise, SecAgg+ and rounds that
    survive missing sites as layers around it."""
    cfg = run.cfg
    fed = cfg.federated
    secure = cfg.secure_aggregation.enabled
    weight_key = proto.UNIT_WEIGHT if cfg.privacy.mode == "site" else proto.NUM_EXAMPLES
    common = dict(fraction_train=fed.fraction_train, fraction_evaluate=fed.fraction_evaluate,
                  min_train_nodes=fed.min_sites, min_evaluate_nodes=fed.min_sites, min_available_nodes=fed.min_sites,
                  weighted_by_key=weight_key, train_metrics_aggr_fn=aggregate_train_metrics,
                  evaluate_metrics_aggr_fn=(retrieval_aggr_fn if reads_reports(cfg.model.name)
                                            else evaluate_aggr_fn(run.classes)))
    audit = MessageAudit(run.out / "audit.jsonl", secure=secure)
    grid = PackingGrid(FastPollGrid(grid))  # FastPollGrid talks to Flower's Grid itself
    inner = make_strategy(fed, common, plain_keys=[k for k, _ in model.named_buffers()],
                          parameter_shapes={k: tuple(p.shape) for k, p in model.named_parameters()},
                          round_offset=done, audit=audit, final_round=fed.rounds - done)
    inner.restore_carried(run.carried)
    strategy = inner
    if cfg.privacy.mode == "site":
        # the coordinator clips each site's update, or, under secure aggregation where it sees only
        # the sum, each site clips its own (client/client_app.py); the noise is added to the mean
        wrapper = ClientSideClippingDP if secure else ServerSideClippingDP
        strategy = wrapper(inner, noise_multiplier=cfg.privacy.noise_multiplier,
                           clipping_norm=cfg.privacy.clipping_norm,
                           num_sampled_clients=max(1, int(round(n_nodes * fed.fraction_train))))
    if secure:
        grid = SecAggPlusGrid(grid, cfg.secure_aggregation, weight_key, audit=audit.record)
        print(f"  secure aggregation (SecAgg+): the coordinator sees only the weighted mean of the sites' updates; "
              f"clipping range {cfg.secure_aggregation.clipping_range:g}, max weight "
              f"{cfg.secure_aggregation.max_weight}", flush=True)
    return strategy, inner, RetryGrid(grid, fed.min_sites, fed.round_retries)


def train_rounds(run: Run, strategy, inner, grid: Grid, model, done: int) -> tuple[dict, int]:
    """The remaining rounds; after each, the coordinator validates the global model on its own
    patients and records the round. Returns the last global model and the rounds completed."""
    cfg = run.cfg
    remaining = cfg.federated.rounds - done
    val_loader = run.val_loader
    latest = {"state": model.state_dict()}  # the global model after the last round (resume: the checkpoint)

    def round_end(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        state = arrays.to_torch_state_dict()
        latest["state"] = state
        server = None
        if val_loader is not None:
            model.load_state_dict(state)
            m = evaluate(model, val_loader, torch.device("cpu"), run.classes)
            server = {"accuracy": m["accuracy"], "macro-auc": m["macro_auc"], "ece": m["ece"], "loss": m["loss"]}
        if server_round == 0:
            if server and not done:
                print(f"round 0 (initial model): coordinator validation accuracy {server['accuracy']:.3f}", flush=True)
            return MetricRecord(server) if server else None
        rnd = done + server_round
        train, fed = inner.last_round()
        privacy = _site_epsilon(cfg, train, rnd, run.site_names)
        if inner.previous_validation is not None:  # validate_in train-reply: the round before's model
            line = run.recorder.complete_round(rnd - 1, dict(inner.previous_validation))
            if line:
                print(line, flush=True)
        run.tail.add(rnd, state)
        print(run.recorder.record_round(rnd, state, train, fed, server, privacy,
                                        validation_follows=inner.validated_by_next_train(server_round),
                                        average=run.tail.snapshot(), carried=inner.carried()), flush=True)
        return MetricRecord(server) if server else None

    if remaining <= 0:
        return latest["state"], 0
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=remaining,
                            timeout=cfg.federated.round_timeout_s, train_config=run.request(),
                            evaluate_config=run.request(**{proto.SPLIT: "val"}), evaluate_fn=round_end)
    run.recorder.flush()
    return latest["state"], remaining if result else 0


def _evaluate_at_sites(run: Run, grid: Grid, state: dict, split: str, **extra) -> list[RecordDict]:
    arrays = ArrayRecord(state)
    msgs = [Message(content=RecordDict({"arrays": arrays, "config": run.request(**{proto.SPLIT: split}, **extra)}),
                    dst_node_id=nid, message_type=MessageType.EVALUATE) for nid in grid.get_node_ids()]
    return [r.content for r in grid.send_and_receive(msgs, timeout=run.cfg.federated.round_timeout_s)
            if r.has_content()]


def calibrate(run: Run, grid: Grid, state: dict) -> tuple[dict, float, dict | None]:
    """The model at the end of the schedule, calibrated (temperature) and given referral thresholds
    on the sites' pooled validation statistics (counts and sums only). CMR-CLIP has no classifier
    to calibrate: its state is returned as it is."""
    if reads_reports(run.cfg.model.name):
        return state, 1.0, None
    n_cls = len(run.classes)
    val_stats = pooled_stats(_evaluate_at_sites(run, grid, state, "val"), n_cls)[0]
    if not val_stats.n:
        return state, 1.0, None
    temperature = fit_temperature(val_stats.nll_t)
    state = {**state, "calibration": torch.tensor(temperature)}
    val_stats = pooled_stats(_evaluate_at_sites(run, grid, state, "val", **{proto.MC_SAMPLES: run.cfg.model.mc_samples}),
                             n_cls)[0]
    refer = thresholds_from_stats(val_stats, n_cls, run.cfg.model.refer_fraction)
    print(f"calibration temperature {temperature:.2f} and referral thresholds from {refer['validation_n']} "
          f"validation patients at the sites: confidence below {refer['confidence']:.2f} or uncertainty above "
          f"{refer['uncertainty']}", flush=True)
    return state, temperature, refer


def test(run: Run, grid: Grid, model, state: dict, refer: dict | None) -> dict:
    """Every site's held-out patients (pooled statistics, with the referral counted against the
    stored thresholds) and the coordinator's own validation patients."""
    cfg = run.cfg
    if reads_reports(cfg.model.name):  # retrieval within each site's test gallery, pooled as counts
        test = retrieval_summary(_evaluate_at_sites(run, grid, state, "test"))
        return {"model": cfg.model.name, "strategy": cfg.federated.strategy, "rounds": cfg.federated.rounds,
                "sites": run.site_names, "report_column": cfg.data.report_column, "test": test,
                "privacy": _last_privacy(run.out)}
    counts = {proto.REFER_CONFIDENCE: refer["confidence"], proto.REFER_UNCERTAINTY: refer["uncertainty"]
              if refer["uncertainty"] is not None else -1.0} if refer else {}
    replies = _evaluate_at_sites(run, grid, state, "test", **{proto.MC_SAMPLES: cfg.model.mc_samples}, **counts)
    test = summarize_stats(*pooled_stats(replies, len(run.classes)), run.classes) if replies else {"n": 0}
    server_val = None
    if run.val is not None:
        model.load_state_dict(state)
        server_val = evaluate(model, run.val_loader, torch.device("cpu"), run.classes, mc_samples=cfg.model.mc_samples,
                              augment=cfg.model.test_time_augmentation)
    return {"model": cfg.model.name, "strategy": cfg.federated.strategy, "rounds": cfg.federated.rounds,
            "sites": run.site_names, "test": test, "server_validation": server_val,
            "privacy": _last_privacy(run.out)}


def _last_privacy(out) -> dict | None:
    rows, _ = read_jsonl(out / "metrics.jsonl")
    return rows[-1].get("privacy") if rows else None


def _print_table(r: dict, out) -> None:
    t = r["test"]
    if r["model"] == "cmr-clip":
        _print_retrieval(t, r["sites"], out)
        return
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



def _print_retrieval(t: dict, sites: list[str], out) -> None:
    print("\n=== test set (held-out patients of every site; each site retrieves within its own gallery) ===",
          flush=True)
    if not t.get("n"):
        print("no test patients", flush=True)
        return
    r = t["retrieval"]
    print(f"{t['n']} studies and reports in {t['galleries']} galleries (mean {r['gallery']:.1f} per site); "
          f"contrastive loss {t['loss']:.3f}")
    print(f"{'direction':<17} {'R@1':>6} {'R@5':>6} {'R@10':>6} {'mean rank':>10}")
    for key, name in (("report_to_video", "report -> study"), ("video_to_report", "study -> report"), ("chance", "chance")):
        v = r[key]
        rank = f"{v['mean_rank']:>10.1f}" if "mean_rank" in v else f"{'':>10}"
        print(f"{name:<17} {v['R@1']:>6.3f} {v['R@5']:>6.3f} {v['R@10']:>6.3f} {rank}")
    zs = t["zero_shot_accuracy"]
    print(f"class-aware precision@5 {t['class_precision@5']:.3f}; zero-shot 5-class accuracy "
          + (f"{zs:.3f}" if zs is not None else "n/a (a class of this label set has no prompts)"))
    for s, n in zip(sites, t.get("site_n", [])):
        print(f"  {s}: {n} test patients")
    print(f"run folder: {out} (model.pt, metrics.json, metrics.jsonl, report.html); zero-shot findings, probes and "
          "search: ccmr predict --findings / ccmr search with model.pt", flush=True)
