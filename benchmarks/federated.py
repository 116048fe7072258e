"""Federated learning and differential privacy on the default non-IID cohort, against training on
the pooled data and against each site alone, on the same test patients, over several seeds.

    python -m benchmarks.federated [--seeds 0 1 2] [--dp-eps 1 3 8] [--workdir DIR]
    python -m benchmarks.federated --dp-only --public-generator external [--seeds 0]
    python -m benchmarks.federated --seeds 3 4 --no-fedavg --mus 0.01 --dp-eps --no-overhead \
        --block federated-seeds-3-4   # more seeds of the README recipe, a table of their own
    python -m benchmarks.federated --seeds 3 4 5 6 --logit-adjustment on --no-personalise \
        --no-fedavg --mus 0.01 --dp-eps --no-overhead --block federated-logit-adjustment  # a recipe variant

Every federated run drives the real ServerApp and ClientApp in one process (tests/inprocess.py,
no Ray) with the README main job's settings, so the comparison measures learning, not the
simulator. The test patients are the same in every row: each site's held-out test patients
(``train.split_seed``), pooled. Centralised trains one model on the union of the sites' training
patients for as many epochs as the federation's rounds x local epochs, with the same schedule
(``--central-epochs N``: N epochs, for federated rows with more or less local work than pooling);
site-local trains each site alone and tests it on its own patients. DP rows start from the
coordinator's public pretraining (a synthetic public cohort with scanners of its own) and the
sites fine-tune the heads, with patient-level DP-SGD at the target epsilon or without noise.
``--public-generator external`` draws that public cohort from the external phantom (another
anatomy model, contrast and protocols) instead of the sites' own generator; ``--dp-only`` runs the
DP rows alone into a block of their own (``federated-dp-external`` / ``federated-dp-project``).

Statistics: every row's final model is evaluated per patient on the pooled test patients (a
simulation may look; a federation never sends those outputs), correctness is averaged over the
seeds, and 95% intervals (percentile bootstrap over patients, scipy) are paired.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import tempfile
import textwrap
import time
import tomllib
from pathlib import Path

import numpy as np
import torch
from flwr.common.serde import message_to_proto
from torch.utils.data import DataLoader, Subset

from benchmarks.common import ROOT, machine, update_block
from benchmarks.paper_table import _cis
from ccmr_core.checkpoint import load_model
from ccmr_core.config import load_config
from ccmr_core.data.sources import MultiSite, prepare
from ccmr_core.data.splits import stratified_split
from ccmr_core.engine import make_optimizer, predict, train_epoch
from ccmr_core.models.registry import build_model, model_kwargs
from ccmr_core.synth.cohort import generate_cohort
from ccmr_core.training import train_central
from client.local import load_sites
from tests.inprocess import run_inprocess
from server.provision import public_runs


def run_config(**over) -> dict:
    rc = dict(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    rc.update(over)
    return rc


def federated(cohort: Path, out: Path, **over):
    """One federated run in-process (cached in ``out``); returns its metrics.json and the grid."""
    from client.client_app import app as client_app
    from server.server_app import app as server_app

    grid = None
    if not (out / "metrics.json").is_file():
        grid = run_inprocess(server_app, client_app, 3, run_config(**{"out-dir": str(out), "data-dir": str(cohort),
                                                                      "keep-superlink": True}, **over))
    return json.loads((out / "metrics.json").read_text()), grid


def run_seconds(folder: Path) -> float:
    """A run's wall time from its run folder (the config is written when the run starts,
    metrics.json or model.pt when it ends)."""
    end = folder / "metrics.json" if (folder / "metrics.json").is_file() else folder / "model.pt"
    return end.stat().st_mtime - (folder / "config.yaml").stat().st_mtime


def site_splits(ds: MultiSite, cfg) -> list[dict[str, list[int]]]:
    """Each site's train/val/test rows (MultiSite indices), exactly as the ClientApp splits them."""
    out, offset = [], 0
    for part in ds.parts:
        sp = stratified_split(part.labels, cfg.train.val_fraction, cfg.train.test_fraction, cfg.train.split_seed,
                              part.splits)
        out.append({k: [offset + i for i in v] for k, v in sp.items()})
        offset += len(part)
    return out


def per_patient(model_path: Path, ds: MultiSite, rows: list[int]) -> dict[str, bool]:
    """patient id -> correct, for a saved model on the given rows."""
    model, blob = load_model(model_path)
    o = predict(model, DataLoader(Subset(ds, rows), batch_size=16), torch.device("cpu"))
    return {ds.patient_ids[int(i)]: bool(o["probs"][k].argmax() == o["labels"][k]) for k, i in enumerate(o["index"])}


def overhead(cohort: Path, work: Path, rounds: int = 3) -> tuple[float, float, float]:
    """(Flower wall s per round, bare loop s per round, bytes ratio) for train-only FedAvg rounds."""
    cfg = load_config(overrides=["federated.fraction_evaluate=0.0", "federated.validation_patients=0",
                                 "federated.local_epochs=1"])
    out = work / "overhead"
    if (out / "overhead.json").is_file():  # measured before, in full, with this work folder
        return tuple(json.loads((out / "overhead.json").read_text()))
    shutil.rmtree(out, ignore_errors=True)  # a run without its measurement (an older version): measure again
    _, grid = federated(cohort, out, **{"num-server-rounds": rounds, "strategy": "fedavg", "local-epochs": 1,
                                        "validation-patients": 0, "fraction-evaluate": 0.0})
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    fl = np.diff([0.0] + [r["seconds"] for r in rows])[1:].mean()  # rounds after the first (start-up)
    sites = load_sites({"partition-id": 0, "num-partitions": 1}, cfg, str(cohort))
    kw = model_kwargs(cfg, 4)
    torch.manual_seed(0)
    g = build_model(cfg.model.name, **kw).state_dict()
    times = []
    for _ in range(rounds):  # the same rounds without Flower: load the global weights, train, average
        t = time.perf_counter()
        states, w = [], []
        for s in sites:
            m = build_model(cfg.model.name, **kw)
            m.load_state_dict(g)
            m.set_stage(m.stages[0])
            train_epoch(m, DataLoader(Subset(s.train, s.split["train"]), batch_size=cfg.train.batch_size,
                                      shuffle=True), make_optimizer(m, cfg.train), torch.device("cpu"))
            states.append(m.state_dict())
            w.append(len(s.split["train"]))
        g = {k: sum(st[k].float() * (wi / sum(w)) for st, wi in zip(states, w)) for k in g}
        times.append(time.perf_counter() - t)
    bare = float(np.mean(times[1:]))
    n_param_bytes = sum(v.numel() * 4 for v in g.values())
    sizes = [message_to_proto(r).ByteSize() for r in (grid.wire if grid else [])  # the replies as they travelled
             if r.metadata.reply_to_message_id and r.has_content() and r.content.array_records]
    res = (float(fl), bare, float(np.mean(sizes) / n_param_bytes) if sizes else float("nan"))
    (out / "overhead.json").write_text(json.dumps(res))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--mus", type=float, nargs="*", default=[0.01, 0.05])
    ap.add_argument("--dp-eps", type=float, nargs="*", default=[1.0, 3.0, 8.0])
    ap.add_argument("--no-fedavg", action="store_true", help="leave out the FedAvg row (FedProx rows only)")
    ap.add_argument("--dp-seeds", type=int, nargs="*", default=None, help="seeds of the DP rows (default: --seeds)")
    ap.add_argument("--public-generator", choices=["project", "external"], default="project",
                    help="the phantom of the coordinator's public cohort (DP rows)")
    ap.add_argument("--dp-only", action="store_true", help="only the DP rows, into a block of their own")
    ap.add_argument("--no-personalise", dest="personalise", action="store_false",
                    help="leave out the row where each site fine-tunes the federation's model on its own patients")
    ap.add_argument("--block", default=None,
                    help="the BENCHMARKS.md block to write (default: federated, or federated-dp-GENERATOR with "
                         "--dp-only; another name: a table of its own, e.g. more seeds of the same recipe)")
    ap.add_argument("--no-overhead", dest="overhead", action="store_false",
                    help="leave out the framework-overhead measurement (a few minutes of Flower and bare rounds)")
    ap.add_argument("--local-batches", type=int, nargs="+", default=None,
                    help="the sites' training batch in the federated rows, a row each (default: the config's "
                         "federated.local_batch_size; e.g. 8 4 compares batch 8 with the default, last)")
    ap.add_argument("--logit-adjustment", choices=["config", "on", "off", "both"], default="config",
                    help="the federated rows with federated.logit_adjustment as the config says, on, off, or a row "
                         "each (off, then on)")
    ap.add_argument("--schedules", type=_schedule, nargs="+", default=None, metavar="RxE",
                    help="the federated rows' rounds x local epochs, a row each (default: the config's; e.g. 9x5 "
                         "15x3 compares the same 45 epochs averaged every 5 or every 3, the config's last, which "
                         "the personal fine-tuning row then starts from); all with the same epochs in all, which "
                         "the centralised and site-local rows train")
    ap.add_argument("--central-epochs", type=int, default=None, metavar="N",
                    help="the centralised and site-local rows' epochs (default: the federated rows' rounds x local "
                         "epochs, which must then be the same for every schedule); given, the schedules may differ "
                         "from it and from each other, e.g. --schedules 15x4 15x3 --central-epochs 45: more local "
                         "work for the federation than for the pooled run, said in the table's settings")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ccmr-fl-"))
    print(f"work folder {work} (rerun with --workdir to resume)", flush=True)
    cohort = work / "cohort"
    generate_cohort(cohort, progress=False)
    base = load_config()
    f = base.federated
    schedules = args.schedules or [(f.rounds, f.local_epochs)]
    epochs = args.central_epochs or schedules[0][0] * schedules[0][1]
    if args.central_epochs is not None and args.central_epochs < 1:
        ap.error(f"--central-epochs {args.central_epochs}: give at least 1")
    if args.central_epochs is None and any(r * e != epochs for r, e in schedules):
        ap.error(f"--schedules {' '.join(f'{r}x{e}' for r, e in schedules)}: give schedules of the same epochs in all "
                 "(rounds x local epochs), so that one centralised and one site-local run compare with each, "
                 "or say the pooled runs' epochs with --central-epochs")
    # federated runs are cached per recipe: a run of another recipe in the same work folder is not reused
    recipe = _recipe(f, f.rounds, f.local_epochs)  # the DP rows' (the config's schedule)
    batches = args.local_batches or [f.local_batch_size or base.train.batch_size]
    adjust = {"config": [f.logit_adjustment], "on": [True], "off": [False], "both": [False, True]}[args.logit_adjustment]
    ds = MultiSite(prepare(cohort, base, progress=False), base)
    splits = site_splits(ds, base)
    test = sorted(i for sp in splits for i in sp["test"])
    names = [ds.patient_ids[i] for i in test]
    results: dict[str, dict[int, dict[str, bool]]] = {}  # row -> seed -> patient -> correct
    seconds: dict[str, list[float]] = {}
    eps_spent: dict[str, list[float]] = {}
    seed = args.seeds[0]

    def record(row: str, correct: dict[str, bool], folders: list[Path], eps: float | None = None) -> None:
        """A row's per-patient correctness for this seed; its minutes are the runs' own wall time
        (so a rerun that finds the runs in the work folder reports what they took)."""
        results.setdefault(row, {})[seed] = correct
        secs = sum(run_seconds(d) for d in folders)
        seconds.setdefault(row, []).append(secs)
        if eps is not None:
            eps_spent.setdefault(row, []).append(eps)
        acc = np.mean([correct[n] for n in names])
        print(f"{row}: accuracy {acc:.3f} ({secs / 60:.1f} min)", flush=True)

    gen = args.public_generator
    tag = "" if gen == "project" else f"-{gen}"  # run folders per public cohort
    for seed in args.seeds:
        if args.dp_only:
            dp_rows(args, work, cohort, ds, test, record, recipe, seed, gen, tag)
            continue
        cfg = load_config(overrides=[f"train.seed={seed}", f"train.epochs={epochs}"])
        out = work / f"central-e{epochs}-s{seed}"  # cached per number of epochs and seed
        union = {k: sorted(i for sp in splits for i in sp[k]) for k in ("train", "val", "test")}
        if not (out / "model.pt").is_file():
            train_central(cohort, out, cfg, progress=False, cache_root=None, splits=union)
        record("centralised (pooled data, one model)", per_patient(out / "model.pt", ds, test), [out])
        local: dict[str, bool] = {}
        for k, sp in enumerate(splits):
            out = work / f"local-{k}-e{epochs}-s{seed}"
            if not (out / "model.pt").is_file():
                train_central(cohort, out, cfg, progress=False, splits=sp)
            local.update(per_patient(out / "model.pt", ds, sp["test"]))
        record("each site alone (tested on its own patients)", local,
               [work / f"local-{k}-e{epochs}-s{seed}" for k in range(len(splits))])
        fed_runs = [] if args.no_fedavg else [("FedAvg", {"strategy": "fedavg"})]
        fed_runs += [(f"FedProx mu={mu:g}", {"strategy": "fedprox", "proximal-mu": mu}) for mu in args.mus]
        fed_runs = [(row + (f", sites batch {b}" if len(batches) > 1 or b != base.train.batch_size else ""),
                     {**over, "local-batch-size": b}) for row, over in fed_runs for b in batches]
        fed_runs = [(row + (", logit adjustment" if la else ""), {**over, "logit-adjustment": la})
                    for row, over in fed_runs for la in adjust]
        fed_runs = [(row + (f", {r} rounds x {e} local epochs" if (r, e) != (f.rounds, f.local_epochs) else ""),
                     {**over, "num-server-rounds": r, "local-epochs": e}) for row, over in fed_runs for r, e in schedules]
        fed_outs = []
        for row, over in fed_runs:
            if f.server_momentum > 0:
                row += f", server momentum {f.server_momentum:g}"
            b = over["local-batch-size"]  # a run with the pooled runs' batch keeps its folder name of before
            run_recipe = _recipe(f, over["num-server-rounds"], over["local-epochs"])
            out = work / (f"{row.split()[0].lower().rstrip(',')}-{over.get('proximal-mu', 0):g}-{run_recipe}"
                          f"{'' if b == base.train.batch_size else f'-b{b}'}{'-la' if over['logit-adjustment'] else ''}"
                          f"-s{seed}")
            federated(cohort, out, **{"train-seed": seed}, **over)
            record(f"federated, {row}", per_patient(out / "model.pt", ds, test), [out])
            fed_outs.append((row, out))
        if fed_outs and args.personalise:
            row, fed = fed_outs[-1]  # the README recipe (FedProx mu=0.01, the default batch last) by default
            personal(cohort, work, fed, splits, ds, record, row, seed, base)
        if args.dp_eps and (args.dp_seeds is None or seed in args.dp_seeds):
            dp_rows(args, work, cohort, ds, test, record, recipe, seed, gen, tag)
    fl = bare = bytes_ratio = None
    if not args.dp_only and args.overhead:
        fl, bare, bytes_ratio = overhead(cohort, work)
    text = _table(args, names, results, seconds, eps_spent, f, fl, bare, bytes_ratio, batches,
                  base.train.batch_size, epochs)
    update_block(args.block or (f"federated-dp-{gen}" if args.dp_only else "federated"), text)
    print(text)


# a site's fine-tuning of the federation's model on its own patients (``ccmr train --start-from``): a
# tenth of the learning rate and 3 rounds' worth of epochs, fixed before it was first measured
PERSONAL_EPOCHS, PERSONAL_LR_FACTOR = 9, 0.1


def personal(cohort: Path, work: Path, fed: Path, splits, ds, record, row: str, seed: int, base) -> None:
    """Each site fine-tunes the federation's final model on its own training patients (its last
    stage; validation and calibration on its own validation patients) and is tested on its own
    test patients, as the "each site alone" row is."""
    cfg = load_config(overrides=[f"train.seed={seed}", f"train.epochs={PERSONAL_EPOCHS}",
                                 f"train.lr={base.train.lr * PERSONAL_LR_FACTOR:g}"])
    correct: dict[str, bool] = {}
    outs = []
    for k, sp in enumerate(splits):
        out = work / f"personal-{k}-e{PERSONAL_EPOCHS}-{fed.name}"
        if not (out / "model.pt").is_file():
            train_central(cohort, out, cfg, progress=False, splits=sp, start_from=fed / "model.pt")
        correct.update(per_patient(out / "model.pt", ds, sp["test"]))
        outs.append(out)
    record(f"federated, {row}, then each site fine-tunes it ({PERSONAL_EPOCHS} epochs; tested on its own patients)", correct,
           outs)


def dp_rows(args, work: Path, cohort: Path, ds, test: list[int], record, recipe: str, seed: int, gen: str,
            tag: str) -> None:
    """The DP recipe's rows for one seed: the coordinator's public pretraining alone, then the sites
    fine-tune the heads without DP and with patient-level DP-SGD at each epsilon."""
    dp_cfg = load_config(overrides=[f"train.seed={seed}", "model.alignment=slice", "privacy.mode=sample",
                                    f"federated.public_generator={gen}"])
    # the coordinator's public model (cached across work folders: CCMR_CACHE); its minutes are
    # those of every attempt it took, failed ones included, when they were trained
    runs = public_runs(dp_cfg)
    record("public pretraining alone (no site data)", per_patient(runs[-1] / "model.pt", ds, test), runs)
    out = work / f"head-nodp{tag}-{recipe}-s{seed}"
    federated(cohort, out, **{"train-seed": seed, "alignment": "slice"},
              config=str(_yaml(work, f"head{tag}", "federated: {pretrain: public, public_generator: %s}\n"
                                                  "privacy: {finetune: head}\n" % gen)))
    record("public pretraining + sites fine-tune the heads, no DP", per_patient(out / "model.pt", ds, test), [out])
    for eps in args.dp_eps:
        out = work / f"dp{tag}-{eps:g}-{recipe}-s{seed}"
        r, _ = federated(cohort, out, **{"train-seed": seed, "alignment": "slice", "dp": "sample",
                                         "target-epsilon": eps},
                         config=str(_yaml(work, f"dp{tag}", "federated: {public_generator: %s}\n" % gen)))
        record(f"public pretraining + heads with patient-level DP-SGD, epsilon {eps:g}",
               per_patient(out / "model.pt", ds, test), [out], max(r["privacy"]["epsilon"].values()))


def _recipe(f, rounds: int, local_epochs: int) -> str:
    """The part of a federated run's folder name that says its coordinator step and schedule."""
    return f"m{f.server_momentum:g}-lr{f.server_lr:g}-E{local_epochs}-R{rounds}"


def _schedule(text: str) -> tuple[int, int]:
    """'9x5' -> (9 rounds, 5 local epochs)."""
    try:
        r, e = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not ROUNDSxEPOCHS, e.g. 15x3") from None
    if r < 1 or e < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: rounds and local epochs must be at least 1")
    return r, e


def _without_workdir(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip or a.startswith("--workdir="):
            skip = False
            continue
        if a == "--workdir":
            skip = True
            continue
        out.append(shlex.quote(a))
    return out


def _yaml(work: Path, kind: str, text: str) -> Path:
    p = work / f"{kind}.yaml"
    p.write_text(text)
    return p


def _table(args, names, results, seconds, eps_spent, f, fl, bare, bytes_ratio, batches, pooled_batch,
           epochs: int) -> str:
    rounds, local = f.rounds, f.local_epochs
    server = (f", the coordinator stepping with momentum {f.server_momentum:g} (FedAvgM)" if f.server_momentum > 0
              else "")
    central = "centralised (pooled data, one model)"
    alone = "each site alone (tested on its own patients)"
    no_dp = "public pretraining + sites fine-tune the heads, no DP"

    def acc(row: str, seeds) -> np.ndarray:  # (seeds, patients) correctness
        return np.array([[float(results[row][s][n]) for n in names] for s in seeds])

    def paired(row: str, ref: str) -> str:
        seeds = sorted(set(results[row]) & set(results.get(ref, {})))
        if row == ref or not seeds:
            return ""
        d = acc(row, seeds) - acc(ref, seeds)  # (seeds, patients), paired
        dlo, dhi, slo, shi = _cis(d)
        return f"{100 * d.mean():+.1f} ({100 * dlo:+.1f} to {100 * dhi:+.1f} / {100 * slo:+.1f} to {100 * shi:+.1f})"

    overhead_text = "" if fl is None else f"""Framework overhead (train-only FedAvg rounds of one local epoch, after the first): Flower apps {fl:.2f} s per round vs
the same local training without Flower {bare:.2f} s: **ratio {fl / bare:.2f}**. Bytes per site per round (Flower
protobuf message of a train reply) / fp32 parameter bytes: **{bytes_ratio:.3f}**.
"""
    public = ("from the same generator as the sites, so it flatters DP: real public data (ACDC, M&Ms) differ more "
              "from a hospital's patients" if args.public_generator == "project" else
              "from the external phantom (`federated.public_generator: external`: another anatomy model, contrast "
              "and acquisition protocols than the sites'), so the sites' data have something to add to it")
    dp_text = ("" if not any(r.startswith("public") for r in results) else f""" DP: patient-level DP-SGD (Opacus, RDP,
clipping norm 1, delta 1e-5; epsilon = the most any site spent) on the heads of a model the coordinator pretrained
on a synthetic public cohort ({f.public_patients} patients, scanners of its own; {f.public_epochs} epochs, a model below
{f.public_min_accuracy:g} on the public validation patients trained again with another seed). That public cohort
comes {public}.""")
    has_dp = bool(eps_spent)  # DP columns and title only for a table with DP rows
    title = (f"DP fine-tuning from a public cohort of the {args.public_generator} phantom" if args.dp_only else
             "Federated learning and DP on non-IID sites" if has_dp else "Federated learning on non-IID sites")
    cmd = "python -m benchmarks.federated" + (f" --dp-only --public-generator {args.public_generator}"
                                              if args.dp_only else "")
    if args.block:  # a table of its own: the whole command that made it
        cmd = " ".join(["python -m benchmarks.federated", *_without_workdir(sys.argv[1:])])
    lines = []
    for row in results:
        seeds = sorted(results[row])
        a = acc(row, seeds)
        per_seed = a.mean(1)
        lo, hi, slo, shi = _cis(a)
        eps = f"{max(eps_spent[row]):.2f}" if row in eps_spent else ""
        vs_no_dp = paired(row, no_dp) if row in eps_spent else ""
        vs_alone = paired(row, alone) if row.startswith("federated") else ""
        dp_cells = f"{vs_no_dp} | {eps} | " if has_dp else ""
        lines.append(f"| {row} | {', '.join(map(str, seeds))} | {per_seed.mean():.3f} ± "
                     f"{per_seed.std(ddof=1) if len(per_seed) > 1 else 0:.3f} | {lo:.3f}-{hi:.3f} / {slo:.3f}-{shi:.3f} | "
                     f"{paired(row, central)} | {vs_alone} | {dp_cells}{np.mean(seconds[row]) / 60:.1f} |")
    site_of = np.array([n.split("/", 1)[0] for n in names])
    sites = sorted(set(site_of))
    per_site = []  # each site's own test patients: is any site worse off than alone?
    for row in results:
        a = acc(row, sorted(results[row]))
        cells = [" / ".join(f"{v:.3f}" for v in a[:, site_of == st].mean(1)) for st in sites]
        per_site.append(f"| {row} | {' | '.join(cells)} |")
    settings = textwrap.fill(
        f"Default synthetic cohort (3 sites with different scanners and class mixes, 231 patients); CC-CMR; the README "
        f"main job's settings ({rounds} rounds x {local} local epochs and FedProx unless stated, AdamW with the run's "
        f"schedule, each site keeping its optimiser state{server}, batches of {' or '.join(map(str, batches))} "
        f"patients at the sites; centralised and site-local: {epochs} epochs, batches of {pooled_batch}, the "
        f"same schedule). Test patients in every row: each site's held-out test patients, pooled ({len(names)} "
        "patients, the same in every row and seed). Accuracy mean ± sd over the row's seeds; 95% CIs (percentile "
        "bootstrap): over patients of the seed-averaged correctness, which holds the runs fixed / over seeds and "
        "patients (`bootstrap_seeds_patients_ci`), which asks what other runs of the same recipe would give; "
        "differences are paired (same patients, the seeds both rows have), with the same two intervals." + dp_text,
        width=118)
    dp_head, dp_rule = (("minus the same run without DP (95% CIs) | epsilon | ", "---|---|") if has_dp else ("", ""))
    return f"""## {title} (`{cmd}`)

Machine: {machine()}.
{settings}

| training | seeds | accuracy | 95% CI, patients / seeds and patients | minus centralised (95% CIs) | minus each site alone (95% CIs) | {dp_head}minutes per run |
|---|---|---|---|---|---|{dp_rule}---|
{chr(10).join(lines)}

Per site (its own test patients; one value per seed, in the seeds' order):

| training | {' | '.join(f"{st} ({(site_of == st).sum()})" for st in sites)} |
|---|{'---|' * len(sites)}
{chr(10).join(per_site)}

{overhead_text}"""


if __name__ == "__main__":
    main()
