"""Flower ClientApp: one hospital's SuperNode trains locally and reports aggregate statistics.

What leaves the site: the model's parameters (train) and fixed-size aggregate statistics
(counts, histograms, loss sums, epsilon); never an image, a per-patient output or an identifier.
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch.utils.data import DataLoader, Subset

from ccmr_core.console import warn
from ccmr_core.config import from_run_config
from ccmr_core.engine import make_optimizer, predict, resolve_device, set_threads, train_epoch
from ccmr_core.clip_training import gallery_stats
from ccmr_core.losses import class_log_prior
from ccmr_core.metrics import EvalStats
from ccmr_core.models.registry import model_kwargs, reads_reports, training_model
from ccmr_core.retrieval_stats import RetrievalStats
from ccmr_core.privacy import BudgetExhausted, PrivateTraining, clip_update, strip_opacus_prefix
from ccmr_core.schedule import (federated_plan, finetune_part, set_stage, site_batch_size, site_train_config,
                                 train_only_heads)
from client.egress import failed, guard, refuse
from client.policy import max_epsilon, min_eval_patients, violations
from ccmr_core.drift import DriftCorrection
from client.local import (RUN_KEY, average_states, check_lifetime_budget, head_views, hosted_sites, keep_control,
                          keep_optimizer, load_sites, read_control, read_ledger, restore_optimizer, write_ledger)
from client.secure_aggregation import is_secure, secure_aggregation_mod
from client.seeds import site_seed
from protocol import messages as proto
from protocol.packing import PackingError, pack, unpack

# Opacus calls logging.basicConfig() at import, which gives the root logger a handler; Flower's
# logger has its own and also propagates, so every line would be printed twice.
logging.getLogger("flwr").propagate = False
log = logging.getLogger("ccmr.client")


def _site_names(msg: Message, context: Context) -> list[str]:
    """The sites this SuperNode serves, for its own log, whatever state the request is in."""
    try:
        return [name for _, name, _ in hosted_sites(context.node_config, str(msg.content["config"][proto.COHORT_DIR]))]
    except Exception:  # noqa: BLE001
        nc = context.node_config
        return [str(nc.get("site-name") or f"node-{nc.get('partition-id', 0)}")]


def contained(kind: str):
    """Every failure of a handler leaves as a fixed reason (client/egress.failed), not as text."""

    def wrap(handler):
        @functools.wraps(handler)
        def run(msg: Message, context: Context) -> Message:
            try:
                return handler(msg, context)
            except Exception as e:  # noqa: BLE001 - whatever it is, its text stays at the site
                return failed(msg, _site_names(msg, context), kind, e)

        return run

    return wrap


def packing_mod(msg: Message, context: Context, call_next) -> Message:
    """The site's edge of protocol/packing: the request's models unpacked before anything reads
    them, the reply's packed after the egress guard passed it (the same content, re-encoded)."""
    if msg.has_content():
        try:
            msg.content = unpack(msg.content)
        except PackingError as e:
            return failed(msg, _site_names(msg, context), "unpack", e)
    reply = call_next(msg, context)
    if reply.has_content():
        reply.content = pack(reply.content)
    return reply


# outermost: packing_mod; secure_aggregation_mod steps in only for the train rounds of a run with
# secure aggregation
app = ClientApp(mods=[packing_mod, secure_aggregation_mod])


def _setup(msg: Message, context: Context):
    # a hospital's SuperNode (it has its own data path) opens no file the coordinator names
    cfg = from_run_config(context.run_config, allow_paths="data-path" not in context.node_config)
    c = msg.content["config"]
    set_threads(cfg.train.threads)
    sites = load_sites(context.node_config, cfg, str(c[proto.COHORT_DIR]))
    n_sites = int(c[proto.NUM_SITES])
    kwargs = model_kwargs(cfg, int(c[proto.BIO_CHANNELS]))
    return cfg, c, sites, n_sites, kwargs


def _model(cfg, kwargs, arrays: ArrayRecord, device):
    model = training_model(cfg, kwargs, device)
    model.load_state_dict(arrays.to_torch_state_dict())
    return model


@app.train()
@contained("train")
def train(msg: Message, context: Context) -> Message:
    cfg, c, sites, n_sites, kwargs = _setup(msg, context)
    secure = is_secure(msg)
    bad = violations(context.node_config, cfg.privacy.mode, secure)
    if not RUN_KEY.fullmatch(str(c[proto.RUN_KEY])):
        bad.append(f"run key {str(c[proto.RUN_KEY])[:40]!r} is not a plain name")
    if bad:
        return refuse(msg, [s.name for s in sites], "train", str(c[proto.RUN_KEY])[:128], int(c[proto.ROUND]),
                      "; ".join(bad))
    device = resolve_device(cfg.train.device)
    mu = float(c.get(proto.PROXIMAL_MU, 0.0))
    run_key = str(c[proto.RUN_KEY])
    rnd = int(c[proto.ROUND])
    local = cfg.federated.local_epochs
    validation = {}
    if c.get(proto.VALIDATE):  # the model received, on this site's validation patients, before training on it
        received = _model(cfg, kwargs, msg.content["arrays"], device)
        validation = {proto.VALIDATION + k: v for k, v in
                      _evaluation(cfg, c, sites, n_sites, received, "val", 0, context).items()}
    scaffold = cfg.federated.drift_correction == "scaffold"
    received_c = msg.content.array_records.get(proto.CONTROL) if scaffold else None
    global_c = received_c.to_torch_state_dict() if received_c is not None else None
    states, weights, losses, controls = [], [], [], []
    train_seconds = 0.0
    eps = np.zeros(n_sites)
    declined = np.zeros(n_sites)
    for site in sites:
        torch.manual_seed(site_seed(cfg.train.seed, "train", rnd, site.index))
        model = _model(cfg, kwargs, msg.content["arrays"], device)
        # the run's schedule: this round is epochs (rnd-1)*local ... rnd*local-1 of it
        plan = federated_plan(model, cfg)
        first = (rnd - 1) * local
        stage = plan.stage_at(first)
        set_stage(model, stage)
        part = finetune_part(cfg)
        if part:
            train_only_heads(model, top=cfg.privacy.finetune_top, part=part)
        global_params = [p.detach().clone() for p in model.parameters()]
        idx = site.split["train"]
        data = Subset(site.train, idx)
        if part and cfg.privacy.finetune_views and stage == plan.stages[-1]:
            data = head_views(site, model, cfg, device)  # the frozen encoders' outputs, computed once
        # in-batch contrastive models (CMR-CLIP) learn nothing from a last batch of one patient
        batch = site_batch_size(cfg)
        loader = DataLoader(data, batch_size=batch, shuffle=True,
                            drop_last=reads_reports(cfg.model.name) and len(idx) > batch)
        opt = make_optimizer(model, site_train_config(cfg))
        continued = cfg.federated.keep_optimizer and restore_optimizer(opt, site, run_key, rnd, stage)
        dp = None
        if cfg.privacy.mode == "sample":
            ledger = read_ledger(site, run_key)
            dp = PrivateTraining(cfg, ledger, len(idx))
            try:
                dp.check_budget()  # this run's target
                check_lifetime_budget(site, run_key, dp.ledger, dp.round_cost(), *max_epsilon(context.node_config))
            except BudgetExhausted as e:
                warn(log, f"[{site.name}] {e}")
                eps[site.index] = ledger.epsilon(cfg.privacy.delta)
                declined[site.index] = 1
                continue
            model, opt, loader = dp.wrap(model, opt, loader)
        prior = None
        if cfg.federated.logit_adjustment:  # the site's own class mix, kept at the site
            labels = site.eval.labels
            prior = class_log_prior([labels[i] for i in idx], len(cfg.data.classes))
        drift = None
        if scaffold:  # without the coordinator's c (first round; a coordinator that lost it) c_i starts again too
            drift = DriftCorrection(model, global_c, read_control(site, run_key, rnd) if global_c is not None else None)
        for epoch in range(first, first + local):
            res = train_epoch(model, loader, opt, device, lr_at=lambda f, e=epoch: plan.lr_factor(e + f),
                              prox_mu=mu, global_params=global_params, class_log_prior=prior, after_backward=drift)
            train_seconds += res["seconds"]
        if drift is not None:
            keep_control(site, run_key, rnd, drift.new_local(), drift.previous)
            controls.append(drift.change())
        if dp is not None:
            eps[site.index] = dp.finish()
            write_ledger(site, run_key, dp.ledger)
        if cfg.federated.keep_optimizer:
            keep_optimizer(opt, site, run_key, rnd, stage)
        states.append(strip_opacus_prefix(model.state_dict()))
        weights.append(float(len(idx)))
        losses.append(res["loss"])
        adjusted = ", logits adjusted for its class mix" if prior is not None else ""
        if drift is not None and drift.shift:  # none in the first round
            adjusted += f", gradients shifted by a control variate of norm {drift.shift_norm():.3f}"
        print(f"[{site.name}] round {rnd} ({stage}{', optimiser continued' if continued else ''}): "
              f"{len(idx)} patients in batches of {batch}{adjusted}, loss {res['loss']:.3f}"
              + (f", epsilon {eps[site.index]:.2f}" if dp is not None else ""), flush=True)
    metrics = {
        proto.NUM_EXAMPLES: float(sum(weights)),
        proto.UNIT_WEIGHT: 1.0,
        proto.TRAIN_LOSS: float(np.average(losses, weights=weights)) if weights else 0.0,
        proto.SITE_EPSILON: eps.tolist(),
        proto.SITE_DECLINED: declined.tolist(),
        proto.DELTA: float(cfg.privacy.delta),
        proto.TRAIN_SECONDS: train_seconds,
        **validation,
    }
    if states:
        state = average_states(states, weights)
        if proto.CLIPPING_NORM in c:  # site-level DP under secure aggregation: the site clips its own update
            state, norm = clip_update(state, msg.content["arrays"].to_torch_state_dict(), float(c[proto.CLIPPING_NORM]))
            print(f"[{', '.join(s.name for s in sites)}] update norm {norm:.3f} clipped to {float(c[proto.CLIPPING_NORM]):g}",
                  flush=True)
        arrays = ArrayRecord(state)
    else:  # every hosted site declined: send the global model back with weight 0
        arrays = msg.content["arrays"]
    records = {"arrays": arrays}
    if controls:  # SCAFFOLD: the change of the hosted sites' c_i, weighted as their models are
        records[proto.CONTROL] = ArrayRecord(average_states(controls, weights))
    reply = Message(content=RecordDict({**records, "metrics": MetricRecord(metrics)}), reply_to=msg)
    privacy = {"mode": cfg.privacy.mode, "epsilon": float(max(eps)) if cfg.privacy.mode == "sample" else None,
               "delta": cfg.privacy.delta}
    # under secure aggregation the guard checks the reply but the audit records the masked vector
    # that actually leaves (client/secure_aggregation.py)
    return guard(reply, msg, [s.name for s in sites], len(cfg.data.classes), n_sites, "train", run_key,
                 int(c[proto.ROUND]), privacy, record=not secure, control=scaffold)


def _thresholds(c) -> dict | None:
    """The referral thresholds the coordinator asks the site to count against (final test)."""
    if proto.REFER_CONFIDENCE not in c:
        return None
    u = float(c[proto.REFER_UNCERTAINTY])
    return {"confidence": float(c[proto.REFER_CONFIDENCE]), "uncertainty": u if u >= 0 else None}


@app.evaluate()
@contained("evaluate")
def evaluate(msg: Message, context: Context) -> Message:
    cfg, c, sites, n_sites, kwargs = _setup(msg, context)
    rnd = int(c[proto.ROUND]) if proto.ROUND in c else None  # the final evaluations have none
    # evaluation replies are statistics only; a site that requires secure aggregation answers the
    # evaluation of runs that use it for their updates
    bad = violations(context.node_config, cfg.privacy.mode, cfg.secure_aggregation.enabled)
    if bad:
        return refuse(msg, [s.name for s in sites], "evaluate", str(c[proto.RUN_KEY]), rnd, "; ".join(bad))
    device = resolve_device(cfg.train.device)
    split = str(c.get(proto.SPLIT, "val"))
    model = _model(cfg, kwargs, msg.content["arrays"], device)
    metrics = _evaluation(cfg, c, sites, n_sites, model, split, int(c.get(proto.MC_SAMPLES, 0)), context)
    reply = Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
    return guard(reply, msg, [s.name for s in sites], len(cfg.data.classes), n_sites, "evaluate",
                 str(c[proto.RUN_KEY]), rnd)


def _evaluation(cfg, c, sites, n_sites: int, model, split: str, mc: int, context: Context) -> dict:
    """An evaluate reply's metrics: pooled statistics of ``model`` on the hosted sites' ``split``
    (``mc``: MC-dropout passes), with the patients and correct answers per site."""
    if reads_reports(cfg.model.name):
        return _retrieval(cfg, sites, n_sites, model, split, context)
    device = next(model.parameters()).device
    n_cls = len(cfg.data.classes)
    total = EvalStats.from_outputs(np.zeros((0, n_cls)), np.zeros(0, dtype=int), np.zeros(0))
    site_correct, site_n = np.zeros(n_sites), np.zeros(n_sites)
    floor = min_eval_patients(context.node_config)
    for site in sites:
        idx = site.split[split]
        if not idx:
            continue
        if len(idx) < floor:  # the site's rule: no statistics about one or two patients
            print(f"[{site.name}] evaluation of the {split} split: {len(idx)} patient(s), fewer than this site's "
                  f"minimum {floor}; no statistics sent for it", flush=True)
            continue
        # the MC passes seeded per site: the same answer whichever order the sites' requests came in
        out = predict(model, DataLoader(Subset(site.eval, idx), batch_size=cfg.train.batch_size), device, mc,
                      augment=cfg.model.test_time_augmentation,
                      seed=site_seed(cfg.train.seed, "evaluate", 0, site.index))
        if len(out["labels"]) == 0:
            continue
        stats = EvalStats.from_outputs(out["probs"], out["labels"].astype(int), out["loss"],
                                       out["uncertainty"] if mc > 1 else None, logits=out["logits"],
                                       thresholds=_thresholds(c))
        total = total + stats
        site_correct[site.index] = float(np.trace(stats.confusion))
        site_n[site.index] = float(stats.n)
    metrics = {proto.NUM_EXAMPLES: float(total.n), proto.UNIT_WEIGHT: 1.0, proto.SITE_CORRECT: site_correct.tolist(),
               proto.SITE_N: site_n.tolist()}
    metrics.update({proto.STATS + k: v for k, v in total.to_flat().items()})
    return metrics


def _retrieval(cfg, sites, n_sites: int, model, split: str, context: Context) -> dict:
    """CMR-CLIP: each site retrieves within its own gallery of the split and sends counts and sums
    (ccmr_core/retrieval_stats.py); patients per site as for the classifiers."""
    total = RetrievalStats()
    site_n = np.zeros(n_sites)
    floor = min_eval_patients(context.node_config)
    for site in sites:
        idx = site.split[split]
        if len(idx) < max(floor, 2):  # a gallery of one cannot be ranked; the site's minimum applies too
            print(f"[{site.name}] retrieval on the {split} split: {len(idx)} patient(s), fewer than "
                  f"{max(floor, 2)}; no statistics sent for it", flush=True)
            continue
        stats = gallery_stats(model.cpu(), Subset(site.eval, idx), list(cfg.data.classes))
        total = total + stats
        site_n[site.index] = stats.n
    metrics = {proto.NUM_EXAMPLES: float(total.n), proto.UNIT_WEIGHT: 1.0, proto.SITE_N: site_n.tolist()}
    metrics.update({proto.RETRIEVAL_STATS + k: v for k, v in total.to_flat().items()})
    return metrics
