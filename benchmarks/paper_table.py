"""CC-CMR against its baselines and its own ablation, on a held-out site and on an independent
external site, over several seeds; a label-efficiency curve; uncertainty; training throughput.

    python -m benchmarks.paper_table [--seeds 0 1 2 3 4] [--fractions 0.1 0.25 0.5] [--workdir DIR]
    python -m benchmarks.paper_table --efficiency-only --efficiency-seeds 1 2   # the curve alone, its own block

Data: the default synthetic cohort (3 sites, seed 0), trained on site-a + site-b (stratified
train/validation split), tested on all of site-c; and the external site of ``ccmr synth
--external`` (another vendor, protocol and anatomy model; seed 100, 40 patients), which no model
sees in training. Every run is ``ccmr train`` with the default config (fixed schedule, final
model, temperature scaling and referral thresholds on validation) and one override per variant.
Runs are kept in the work folder, so an interrupted benchmark resumes where it stopped.

Statistics: per-patient correctness is averaged over the seeds, and 95% intervals come from a
percentile bootstrap over test patients (scipy); differences between variants are paired (the
same patients, the same seeds). Error detection: AUROC of each score for the wrong predictions,
pooled over the seeds' test patients.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import machine, update_block
from benchmarks.throughput import matmul_flops, throughput
from ccmr_core.config import load_config
from ccmr_core.ensemble import make_ensemble
from ccmr_core.metrics import bootstrap_accuracy_ci, bootstrap_auroc_patients_ci, bootstrap_seeds_patients_ci, roc_auc
from ccmr_core.synth.cohort import generate_cohort
from ccmr_core.training import evaluate_saved, train_central

# name -> (overrides, what it reads at inference)
VARIANTS = {
    "cc-cmr": (["model.name=cc-cmr"], "cine"),
    "cc-cmr, LGE terms off": (["model.name=cc-cmr", "model.use_lge=false"], "cine"),
    # the report's wall motion score index as one more auxiliary target (ccmr_core/measurements.py)
    "cc-cmr, wall motion score": (["model.name=cc-cmr", "data.measurements=[lvef, lvedv_ml, lvesv_ml, rvef, rvedv_ml, "
                                   "max_wall_mm, wmsi]"], "cine"),
    # a slice's locations summarised by mean plus maximum (ccmr_core/models/encoders.py; the default since
    # the fourteenth session) or by their mean alone (the default before). Since then 'regional max' trains
    # what 'cc-cmr' trains (a pilot against it measures seeds, not pooling); it stays so that the pilot
    # blocks' commands in BENCHMARKS.md still name their runs; pilot the pooling against 'regional mean'
    "cc-cmr, regional max": (["model.name=cc-cmr", "model.region_pool=mean+max"], "cine"),
    "cc-cmr, regional mean": (["model.name=cc-cmr", "model.region_pool=mean"], "cine"),
    "cine-only CNN-LSTM": (["model.name=cine-only"], "cine"),
    "dual-path": (["model.name=dual-path"], "cine + biomechanics"),
    "lge-only": (["model.name=lge-only"], "LGE"),
}
SLUG = {"cc-cmr": "ccmr", "cc-cmr, LGE terms off": "ccmr-nolge", "cc-cmr, wall motion score": "ccmr-wmsi",
        "cc-cmr, regional max": "ccmr-rmax", "cc-cmr, regional mean": "ccmr-rmean",
        "cine-only CNN-LSTM": "cnnlstm",
        "dual-path": "dualpath", "lge-only": "lgeonly"}
PAIRS = [("cc-cmr", "cc-cmr, LGE terms off"), ("cc-cmr, LGE terms off", "cine-only CNN-LSTM"),
         ("cc-cmr", "cine-only CNN-LSTM"), ("cc-cmr, wall motion score", "cc-cmr"),
         ("cc-cmr, regional max", "cc-cmr"), ("cc-cmr", "cc-cmr, regional mean")]
EFFICIENCY = ["cc-cmr", "cc-cmr, LGE terms off"]
# run when named (--variants), not by default
PILOTS = ("cc-cmr, wall motion score", "cc-cmr, regional max", "cc-cmr, regional mean")


def run_dir(work: Path, variant: str, frac: float, seed: int) -> Path:
    """The folder of one training run in a work folder: variant, labelled share and seed."""
    return work / "runs" / f"{SLUG[variant]}-f{frac:g}-s{seed}"


def _read(path: Path) -> dict[str, dict]:
    with open(path) as f:
        return {r["patient_id"]: r for r in csv.DictReader(f)}


def _ci(values: np.ndarray) -> tuple[float, float]:
    return bootstrap_accuracy_ci(values, n_boot=10_000, seed=0)


def _correct(preds: list[dict[str, dict]], patients: list[str]) -> np.ndarray:
    """(seeds, patients) 1 where the prediction was right."""
    return np.array([[float(p[k]["label"] == p[k]["predicted"]) for k in patients] for p in preds])


def _detection(preds: list[dict[str, dict]]) -> str:
    """'AUROC (95% CI) / AUROC (95% CI), N errors' of high epistemic uncertainty and of low confidence
    for the errors, pooled over the prediction files (seeds) of the same patients; the intervals
    resample the patients, each with all its predictions (``bootstrap_auroc_patients_ci``)."""
    rows = [r for p in preds for r in p.values()]
    wrong = np.array([r["label"] != r["predicted"] for r in rows])
    n = f"{int(wrong.sum())} error{'' if wrong.sum() == 1 else 's'}"
    if not 0 < wrong.sum() < len(wrong):
        return f"n/a ({n})"
    patients = np.array([r["patient_id"] for r in rows])
    cell = lambda s: "{:.2f} ({:.2f}-{:.2f})".format(  # noqa: E731
        roc_auc(s, wrong), *bootstrap_auroc_patients_ci(s, wrong, patients))
    unc = np.array([float(r["uncertainty"]) for r in rows])
    conf = np.array([float(r["confidence"]) for r in rows])
    return f"{cell(unc)} / {cell(-conf)}, {n}"


def referral_figures(preds: list[dict[str, dict]]) -> dict[str, float]:
    """What the runs' referral thresholds did, from the prediction files' ``referred`` column, pooled:
    the share referred and the accuracy of the rest (as metrics.json's ``referral``)."""
    rows = [r for p in preds for r in p.values()]
    kept = [r for r in rows if r["referred"] == "0"]
    return {"referred": 1 - len(kept) / len(rows),
            "accuracy_kept": float(np.mean([r["label"] == r["predicted"] for r in kept])) if kept else float("nan")}


def _referral(preds: list[dict[str, dict]]) -> str:
    """'referred share / accuracy of the rest', pooled over the prediction files."""
    f = referral_figures(preds)
    return f"{f['referred']:.0%} / {f['accuracy_kept']:.3f}"


def _cis(table: np.ndarray) -> tuple[float, float, float, float]:
    """95% intervals of the mean of a (seeds, patients) table: over patients of the seed-averaged row
    (these runs fixed), then over seeds and patients (what other runs of the recipe would give)."""
    return (*_ci(table.mean(0)), *bootstrap_seeds_patients_ci(table))


def verdict(lo: float, hi: float, slo: float, shi: float) -> str:
    """What a paired difference's two intervals (patients; seeds and patients) allow one to claim."""
    return ("gain" if slo > 0 else "loss" if shi < 0 else
            "for these runs only" if lo > 0 or hi < 0 else "no difference shown")


def quality_cells(preds: list[dict[str, dict]], ms: list[dict]) -> list[str]:
    """A model's cells on one test set, from its seeds' prediction files and metrics (the same seeds, in
    order): accuracy mean ± sd over seeds, its two 95% intervals, macro AUC, ECE (a perfectly
    calibrated model's), error detection, referral."""
    acc = _correct(preds, sorted(preds[0]))
    per_seed = acc.mean(1)
    ref = [m.get("referral") or {} for m in ms]
    return [f"{per_seed.mean():.3f} ± {per_seed.std(ddof=1) if len(per_seed) > 1 else 0:.3f}",
            "{:.2f}-{:.2f} / {:.2f}-{:.2f}".format(*_cis(acc)),
            f"{statistics.mean(m['macro_auc'] for m in ms):.3f}",
            f"{statistics.mean(m['ece'] for m in ms):.3f} "
            f"({statistics.mean(m.get('ece_floor', float('nan')) for m in ms):.3f})",
            _detection(preds),
            f"{statistics.mean(r.get('referred', float('nan')) for r in ref):.0%} / "
            f"{statistics.mean(r.get('accuracy_kept', float('nan')) for r in ref):.3f}"]


def run_all(work: Path, seeds: list[int], fractions: list[float], variants: list[str], preset: str = "default",
            efficiency_seeds: list[int] | None = None, threads: int = 0, efficiency_only: bool = False) -> dict:
    cohort, external = work / "cohort", work / "external"
    generate_cohort(cohort, progress=False)
    generate_cohort(external, sites=1, patients=40, seed=100, progress=False, kind="external")
    eff_seeds, shown = efficiency_seeds or seeds, [v for v in EFFICIENCY if v in variants]
    eff = [(v, f, s) for f in fractions for s in eff_seeds for v in shown]
    if efficiency_only:
        jobs = [(v, 1.0, s) for s in eff_seeds for v in shown] + eff
    else:
        jobs = [(v, 1.0, s) for s in seeds for v in variants] + eff
    for k, (v, frac, seed) in enumerate(jobs):
        out = run_dir(work, v, frac, seed)
        if not (out / "metrics.json").is_file():
            t0 = time.perf_counter()
            cfg = load_config(preset=preset,
                              overrides=VARIANTS[v][0] + [f"train.seed={seed}", f"train.label_fraction={frac}",
                                                          f"train.threads={threads}"])
            m = train_central(cohort, out, cfg, test_site="site-c", progress=False, cache_root=work / "cache")
            print(f"[{k + 1}/{len(jobs)}] {v}, {frac:.0%} of labels, seed {seed}: site-c accuracy "
                  f"{m['test']['accuracy']:.3f} ({(time.perf_counter() - t0) / 60:.1f} min)", flush=True)
        if frac == 1.0 and not (out / "external" / "metrics.json").is_file() and VARIANTS[v][1] != "LGE":
            evaluate_saved(out / "model.pt", external / "site-x", out / "external", progress=False,
                           cache_root=work / "cache")
    return {"cohort": cohort, "external": external}


def summarise(work: Path, seeds: list[int], variants: list[str],
              heading: str = "CC-CMR vs baselines and its ablation; external sites (`python -m benchmarks.paper_table`)") -> str:

    read: dict[Path, dict[str, dict]] = {}  # each prediction file is read once (rows and paired differences)

    def preds(v: str, frac: float = 1.0, external: bool = False, only: list[int] | None = None) -> list[dict[str, dict]]:
        name = "external/predictions.csv" if external else "test_predictions.csv"
        files = [run_dir(work, v, frac, s) / name for s in (only or seeds)]
        for f in files:
            if f not in read:
                read[f] = _read(f)
        return [read[f] for f in files]

    def interval(correct: np.ndarray) -> str:
        """Patients only (these runs) / seeds and patients (the recipe), as in the paired differences."""
        return "{:.2f}-{:.2f} / {:.2f}-{:.2f}".format(*_cis(correct))

    def metrics(v: str, frac: float = 1.0) -> list[dict]:
        return [json.loads((run_dir(work, v, frac, s) / "metrics.json").read_text())["test"] for s in seeds]

    rows = []
    for v in variants:
        p, ms = preds(v), metrics(v)
        ext = "n/a (needs LGE)"
        if VARIANTS[v][1] != "LGE":
            ep = preds(v, external=True)
            ec = _correct(ep, sorted(ep[0]))
            ea = ec.mean(1)
            ext = f"{ea.mean():.3f} ± {ea.std(ddof=1) if len(ea) > 1 else 0:.3f} ({interval(ec)})"
        rows.append(f"| {v} | {VARIANTS[v][1]} | {' | '.join(quality_cells(p, ms))} | {ext} | {len(p[0])} |")
    diffs = []
    for a, b in PAIRS:
        if a not in variants or b not in variants:
            continue
        for label, ext in (("site-c", False), ("external site-x", True)):
            pa, pb = preds(a, external=ext), preds(b, external=ext)
            patients = sorted(pa[0])
            table = _correct(pa, patients) - _correct(pb, patients)  # (seeds, patients), paired
            lo, hi, slo, shi = _cis(table)
            diffs.append(f"| {a} minus {b} | {label} | {100 * table.mean():+.1f} | {100 * lo:+.1f} to {100 * hi:+.1f} "
                         f"| {100 * slo:+.1f} to {100 * shi:+.1f} | {verdict(lo, hi, slo, shi)} |")
    peak = matmul_flops()
    tp = []
    for v in variants:
        cfg = load_config(overrides=VARIANTS[v][0])
        stages = ["teacher", "student"] if v == "cc-cmr" else [None]
        for st in stages:
            pps, fps, _ = throughput(cfg, st)
            tp.append(f"| {v}{f' ({st} stage)' if st else ''} | {pps:.1f} | {fps / 1e9:.1f} | {fps / peak:.3f} |")
    return f"""## {heading}

Machine: {machine()}. No GPU was lent to this task (the `device` tool had none), so there is no CUDA row.
Default synthetic cohort (3 sites, 231 patients, seed 0): trained on site-a + site-b ({metrics(variants[0])[0]['n']} test patients
held out as all of **site-c**: another scanner and case mix); **site-x**: `ccmr synth --external` (seed 100, 40 patients,
another vendor, protocol and anatomy model; never seen in training). Seeds {seeds}; default config (40 epochs, warm-up then
cosine, final model kept; CC-CMR: 20 teacher + 20 student epochs); temperature scaling and referral thresholds set on the
validation patients. Accuracy intervals (95%, percentile bootstrap): over test patients of the seed-averaged correctness,
which holds these training runs fixed / over seeds and patients (`bootstrap_seeds_patients_ci`), which asks what other
runs of the same recipe would give.
ECE: 20 bins, mean over seeds; in brackets the ECE a perfectly calibrated model with the same confidences would score on
this many patients (`ccmr_core.metrics.ece_floor`): ECE is biased upwards on few patients.

| model | reads at inference | site-c accuracy (mean ± sd over seeds) | 95% CI, patients / seeds and patients | macro AUC | ECE (calibrated model's) | error-detection AUROC (95% CI), uncertainty / confidence | referred / accuracy of the rest | site-x accuracy (95% CIs as for site-c) | test n |
|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Paired differences (accuracy points; the same patients and seeds). The first interval resamples the test patients
and holds these training runs fixed; the second also resamples the seeds (`bootstrap_seeds_patients_ci`), i.e. asks
what other runs of the same recipe would give: a gain of the recipe is claimed only where that one excludes 0
("for these runs only": the first excludes 0, the second does not).

| comparison | test site | difference | 95% CI, patients | 95% CI, seeds and patients | |
|---|---|---|---|---|---|
{chr(10).join(diffs)}

Training throughput (one AdamW step, batch {load_config().train.batch_size}, default grid; FLOPs counted by
`torch.utils.flop_counter`, forward + backward; best of 3 timings of 4 steps) against this machine's float32 matmul
rate ({peak / 1e9:.0f} GFLOP/s, 1024 x 1024 products, best of 5 timings, measured in the same process):

| model | patients/s | achieved GFLOP/s | ratio to matmul |
|---|---|---|---|
{chr(10).join(tp)}
"""


def efficiency_table(work: Path, fractions: list[float], variants: list[str], eff_seeds: list[int],
                     command: str = "python -m benchmarks.paper_table --efficiency-only") -> str:
    """The label-efficiency curve: site-c accuracy of CC-CMR and its LGE-off ablation per labelled share."""

    def preds(v: str, frac: float, only: list[int]) -> list[dict[str, dict]]:
        return [_read(run_dir(work, v, frac, s) / "test_predictions.csv") for s in only]

    eff = []
    shown = [v for v in EFFICIENCY if v in variants]
    for frac in [*fractions, 1.0]:
        # the seeds for which every compared variant has this point (a partly run curve shows what it has)
        have = [s for s in eff_seeds if all((run_dir(work, v, frac, s) / "test_predictions.csv").is_file() for v in shown)]
        if not have:
            continue
        cells = []
        tables = {}  # (seeds, patients) correctness per variant
        for v in shown:
            p = preds(v, frac, only=have)
            tables[v] = _correct(p, sorted(p[0]))
            cells.append("{:.3f} ({:.2f}-{:.2f} / {:.2f}-{:.2f})".format(tables[v].mean(), *_cis(tables[v])))
        if len(tables) == 2:
            d = tables[EFFICIENCY[0]] - tables[EFFICIENCY[1]]
            cells.append("{:+.1f} ({:+.1f} to {:+.1f} / {:+.1f} to {:+.1f})".format(*(100 * x for x in (d.mean(), *_cis(d)))))
        n_lab = json.loads((run_dir(work, shown[0], frac, have[0]) / "metrics.json").read_text())
        eff.append(f"| {frac:.0%} ({n_lab['n_train_labelled']}) | {', '.join(map(str, have))} | " + " | ".join(cells) + " |")
    return f"""## Label efficiency: CC-CMR and its ablation with part of the labels (`{command}`)

Machine: {machine()}. The default cohort and config of the table above, tested on site-c; seeds as listed per row.
The diagnosis is known for a stratified share of the training patients (number in brackets); the others still
contribute cine, LGE (CC-CMR's alignment) and report measurements, but no diagnosis: CC-CMR's student distils its
teacher only for the patients whose diagnosis is known. Accuracy with 95% percentile bootstrap intervals: over test patients of the
seed-averaged correctness, which holds these runs fixed / over seeds and patients (`bootstrap_seeds_patients_ci`), which
asks what other runs of the same recipe would give; difference: paired, the same patients and seeds, with the same two
intervals (a gain of the LGE terms is claimed only where the second excludes 0).

| labelled share | seeds | {' | '.join(shown)} | difference |
|---|---|---|---|---|
{chr(10).join(eff)}
"""


def ensemble_runs(work: Path, v: str, group: list[int]) -> Path:
    """``ccmr ensemble`` of the variant's runs with these seeds (thresholds on their validation
    patients), evaluated on all of site-c and on site-x; kept in the work folder. Returns its folder."""
    folder = work / "ensembles" / f"{SLUG[v]}-s{'-'.join(map(str, group))}"
    if not (folder / "model.pt").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        make_ensemble([run_dir(work, v, 1.0, s) / "model.pt" for s in group], work / "cohort", folder / "model.pt",
                      progress=False, cache_root=work / "cache")
    sites = {"site-c": work / "cohort" / "site-c"}
    if VARIANTS[v][1] != "LGE":
        sites["site-x"] = work / "external" / "site-x"
    for site, data in sites.items():
        if not (folder / site / "predictions.csv").is_file():
            evaluate_saved(folder / "model.pt", data, folder / site, progress=False, cache_root=work / "cache")
    return folder


def ensemble_table(work: Path, seeds: list[int], variants: list[str], size: int) -> str:
    """Deep ensembles (``ccmr ensemble``) of the runs already made: the seeds in disjoint groups of
    ``size`` (in the order given, a remainder left out; per variant, the groups it has every run of),
    against the same runs alone."""
    every = [seeds[i:i + size] for i in range(0, len(seeds) - size + 1, size)]
    rows = []
    for v in variants:
        # the groups whose runs are all there (a variant run with fewer seeds shows what it has)
        groups = [g for g in every if all((run_dir(work, v, 1.0, s) / "model.pt").is_file() for s in g)]
        if not groups:
            continue
        folders = [ensemble_runs(work, v, g) for g in groups]
        sites = [("site-c", "test_predictions.csv")]
        if VARIANTS[v][1] != "LGE":
            sites.append(("site-x", "external/predictions.csv"))
        cells, extra = [], ""
        for site, name in sites:
            preds = [_read(f / site / "predictions.csv") for f in folders]
            patients = sorted(preds[0])
            ens = _correct(preds, patients)  # (ensembles, patients)
            members = np.array([_correct([_read(run_dir(work, v, 1.0, s) / name) for s in g], patients).mean(0)
                                for g in groups])
            lo, hi = bootstrap_seeds_patients_ci(ens)
            d = ens - members
            dlo, dhi = bootstrap_seeds_patients_ci(d)
            sd = ens.mean(1).std(ddof=1) if len(groups) > 1 else 0.0
            cells.append(f"{ens.mean():.3f} ± {sd:.3f} ({lo:.2f}-{hi:.2f}) | {members.mean():.3f} | "
                         f"{100 * d.mean():+.1f} ({100 * dlo:+.1f} to {100 * dhi:+.1f})")
            if site == "site-c":
                extra = f"{_detection(preds)} | {_referral(preds)}"
        if len(cells) == 1:
            cells.append("n/a (needs LGE) | | ")
        rows.append(f"| {v} | {size} | {'; '.join('+'.join(map(str, g)) for g in groups)} | {' | '.join(cells)} "
                    f"| {extra} |")
    return f"""## Deep ensembles of the paper table's runs (`python -m benchmarks.paper_table --summarise-only --tables ensembles --ensemble-size {size} --seeds {' '.join(map(str, seeds))}`)

Machine: {machine()}. The runs of the paper table's work folder (the same models, cohort and test patients),
their training seeds taken in disjoint groups of {size}: each group is one model made by `ccmr ensemble` (the mean of
its members' calibrated probabilities; every MC-dropout pass reads each member, so the uncertainty also counts their
disagreement; referral thresholds set again on the members' validation patients), evaluated with `ccmr evaluate`;
it costs {size} training runs and {size} encoder passes per study. Accuracy: mean ± sd over the ensembles (95% CI over
ensembles and patients, `bootstrap_seeds_patients_ci`); "members alone": the mean accuracy of the same runs;
difference: ensemble minus its members, paired (the same runs and patients), with the interval over ensembles and
patients. Error detection and referral: site-c, pooled over the ensembles.

| model | members | ensembles (seeds) | site-c accuracy (95% CI) | members alone | ensemble minus members (points) | site-x accuracy (95% CI) | members alone | ensemble minus members (points) | error-detection AUROC (95% CI), uncertainty / confidence | referred / accuracy of the rest |
|---|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--fractions", type=float, nargs="*", default=[0.1, 0.25, 0.5])
    ap.add_argument("--efficiency-seeds", type=int, nargs="+", default=[0, 1, 2],
                    help="seeds of the label-efficiency runs (the 100%% point uses --seeds)")
    ap.add_argument("--variants", nargs="+", default=[v for v in VARIANTS if v not in PILOTS], choices=list(VARIANTS))
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--preset", default="default", help="config preset (smoke: a quick rehearsal, not a result)")
    ap.add_argument("--summarise-only", action="store_true", help="write the tables from the runs already in "
                    "--workdir (and measure throughput: do it on a quiet machine)")
    ap.add_argument("--runs-only", action="store_true", help="train and evaluate, write no table (e.g. two "
                    "workers with --threads 1 and different --seeds on one work folder, then --summarise-only)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per run (0: all cores)")
    ap.add_argument("--efficiency-only", action="store_true", help="only the label-efficiency runs (--fractions "
                    "and 100%% for --efficiency-seeds) and their table")
    ap.add_argument("--block", default="paper", help="the BENCHMARKS.md block of the paper table, or with "
                    "--efficiency-only of the curve (another name: a table of its own, e.g. variants piloted or more "
                    "seeds run in another work folder, headed by its command)")
    ap.add_argument("--ensemble-size", type=int, default=3, help="members of each ensemble (--tables ensembles)")
    ap.add_argument("--tables", nargs="+", default=["paper", "efficiency"], choices=["paper", "efficiency", "ensembles"],
                    help="which blocks to write (e.g. --summarise-only --tables paper while the curve's runs are "
                    "not all there)")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ccmr-paper-"))
    print(f"work folder {work} (rerun with --workdir to resume)", flush=True)
    if not args.summarise_only:
        run_all(work, args.seeds, args.fractions, args.variants, args.preset, args.efficiency_seeds, args.threads,
                args.efficiency_only)
    if args.runs_only:
        return
    tables = ["efficiency"] if args.efficiency_only else args.tables
    texts = {}
    if "efficiency" in tables:
        if args.efficiency_only and args.block != "paper":  # e.g. more seeds of the curve, beside the first block
            command = (f"python -m benchmarks.paper_table --summarise-only --efficiency-only --block {args.block} "
                       f"--efficiency-seeds {' '.join(map(str, args.efficiency_seeds))}")
            texts[args.block] = efficiency_table(work, args.fractions, args.variants, args.efficiency_seeds, command)
        else:
            texts["efficiency"] = efficiency_table(work, args.fractions, args.variants, args.efficiency_seeds)
    if "paper" in tables:
        if args.block == "paper":
            texts["paper"] = summarise(work, args.seeds, args.variants)
        else:
            command = (f"python -m benchmarks.paper_table --summarise-only --tables paper --block {args.block} "
                       f"--seeds {' '.join(map(str, args.seeds))} --variants {' '.join(repr(v) for v in args.variants)}")
            texts[args.block] = summarise(work, args.seeds, args.variants,
                                          f"CC-CMR variants against it, the same seeds and patients (`{command}`)")
    if "ensembles" in tables:
        if not 2 <= args.ensemble_size <= len(args.seeds):
            raise SystemExit(f"--ensemble-size {args.ensemble_size}: give 2 to {len(args.seeds)} (the number of --seeds)")
        texts["ensembles"] = ensemble_table(work, args.seeds, args.variants, args.ensemble_size)
    for block, text in texts.items():
        if args.preset == "default":
            update_block(block, text)
        print(text)


if __name__ == "__main__":
    main()
