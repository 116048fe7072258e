"""Post-hoc inference variants on the very models of a paper-table work folder: test-time
augmentation and an LDA refit of the diagnostic layer, against the model as trained.

    python -m benchmarks.post_hoc --workdir DIR   # DIR: a benchmarks.paper_table work folder

Each saved model (runs/*/model.pt) is evaluated again three ways, beside its own predictions
("single": 20 MC-dropout passes over the study as it is):
- tta: ``model.test_time_augmentation``, each MC pass reads a random view of the cine (the
  training augmentation without its cavity discs); the run's calibration temperature;
- lda: the diagnostic layer refitted as LDA on the features it reads for the run's labelled
  training patients (``ccmr_core.head_refit``), the temperature refitted on validation;
- lda+tta: both.
Each way sets its own referral thresholds on the run's validation patients. Tested on all of
site-c and, for the runs with every label, on the external site-x. The comparison is paired: the
same models, patients and seeds; intervals are percentile bootstraps over test patients of the
seed-averaged correctness. Evaluations are kept under each run (``post_hoc/``), so a rerun resumes.
"""

from __future__ import annotations

import argparse
import json
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Subset

from benchmarks.common import machine, update_block
from benchmarks.paper_table import SLUG, _ci, _correct, _detection, _read, _referral
from ccmr_core.checkpoint import load_classifier
from ccmr_core.config import validate
from ccmr_core.data.sources import MultiSite, prepare
from ccmr_core.data.splits import labelled_subset
from ccmr_core.engine import predict
from ccmr_core.head_refit import refit_lda
from ccmr_core.metrics import expected_calibration_error
from ccmr_core.referral import thresholds_from_outputs
from ccmr_core.training import calibrate, loader, split_indices, write_predictions

NAMES = {slug: name for name, slug in SLUG.items()}


WAYS = {"single": "as trained", "tta": "test-time augmentation", "lda": "LDA head",
        "lda+tta": "LDA head + test-time augmentation"}


def _parse(run: Path) -> tuple[str, float, str]:
    """A paper-table run folder's name (SLUG-fSHARE-sSEED) as (variant name, labelled share, seed)."""
    slug, rest = run.name.split("-f")
    share, seed = rest.split("-s")
    return NAMES[slug], float(share), seed


def _csv(run: Path, way: str, site: str) -> Path:
    if way == "single":
        return run / ("test_predictions.csv" if site == "site-c" else "external/predictions.csv")
    return run / "post_hoc" / way / f"{site}.csv"


def evaluate_run(run: Path, work: Path) -> None:
    """Write run/post_hoc/WAY/site-c.csv (and site-x.csv for a run with every label) for every way
    but "single" (the run's own predictions)."""
    external = (run / "external" / "predictions.csv").is_file()
    sites = ["site-c", "site-x"] if external else ["site-c"]
    if all(_csv(run, w, s).is_file() for w in WAYS for s in sites):
        return
    model, blob = load_classifier(run / "model.pt")
    cfg = validate(blob["config"], f"{run / 'model.pt'} (embedded config)")
    mc, cpu, classes = cfg.model.mc_samples, torch.device("cpu"), blob["classes"]
    ds = MultiSite(prepare(work / "cohort", cfg, work / "cache", False), cfg)
    idx = split_indices(ds, cfg, "site-c")
    val = loader(Subset(ds, idx["val"]), cfg, shuffle=False)
    sets = {"site-c": (ds, idx["test"])}
    if external:
        dx = MultiSite(prepare(work / "external" / "site-x", cfg, work / "cache", False), cfg)
        sets["site-x"] = (dx, list(range(len(dx))))
    for way in ("tta", "lda", "lda+tta"):
        if way == "lda":  # from here on the model carries the LDA layer, recalibrated
            labelled = labelled_subset(ds.labels, idx["train"], cfg.train.label_fraction, cfg.train.seed)
            info = refit_lda(model, loader(Subset(ds, labelled), cfg, shuffle=False), cpu, len(classes))
            info["calibration_temperature"] = calibrate(model, val, cpu)
        augment = way.endswith("tta")
        folder = run / "post_hoc" / way
        folder.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.train.seed)
        vo = predict(model, val, cpu, mc, augment=augment)
        refer = thresholds_from_outputs(vo["probs"], vo["labels"].astype(int), vo["uncertainty"],
                                        cfg.model.refer_fraction)
        (folder / "refer.json").write_text(json.dumps({**refer, **(info if way.startswith("lda") else {})}, indent=1))
        for site in sites:
            d, rows = sets[site]
            torch.manual_seed(cfg.train.seed)
            out = predict(model, loader(Subset(d, rows), cfg, shuffle=False), cpu, mc, augment=augment)
            write_predictions(folder / f"{site}.csv", out, d, classes, refer)


def _ece(preds: list[dict[str, dict]], classes: list[str]) -> float:
    """Mean over seeds of the ECE of each seed's calibrated probabilities."""
    out = []
    for p in preds:
        rows = list(p.values())
        probs = np.array([[float(r[f"p_{c}"]) for c in classes] for r in rows])
        out.append(expected_calibration_error(probs, np.array([classes.index(r["label"]) for r in rows])))
    return float(np.mean(out))


def _chosen(run: Path, runs: list[str] | None) -> bool:
    """Whether ``--runs`` picks this run folder (every folder when it is not given)."""
    return runs is None or any(fnmatch(run.name, pat) for pat in runs)


def table(work: Path, runs: list[str] | None = None, command: str = "python -m benchmarks.post_hoc --workdir DIR") -> str:
    groups: dict[tuple[str, float, str], list[Path]] = {}
    for r in sorted((work / "runs").iterdir()):
        if not _chosen(r, runs):
            continue
        name, share, _ = _parse(r)
        for site in ("site-c", "site-x"):
            if all(_csv(r, w, site).is_file() for w in WAYS):
                groups.setdefault((name, share, site), []).append(r)
    lines, pooled = [], {site: {w: [] for w in WAYS} for site in ("site-c", "site-x")}
    for (name, frac, site), rs in sorted(groups.items(), key=lambda kv: (kv[0][2], kv[0][0], -kv[0][1])):
        preds = {w: [_read(_csv(r, w, site)) for r in rs] for w in WAYS}
        classes = [k[2:] for k in next(iter(preds["single"][0].values())) if k.startswith("p_")]
        patients = sorted(preds["single"][0])
        correct = {w: _correct(p, patients) for w, p in preds.items()}
        seeds = ", ".join(_parse(r)[2] for r in rs)
        for w in WAYS:
            pooled[site][w].append(correct[w])
            d = correct[w].mean(0) - correct["single"].mean(0)
            lo, hi = _ci(d)
            diff = "" if w == "single" else f"{100 * d.mean():+.1f} ({100 * lo:+.1f} to {100 * hi:+.1f})"
            lines.append(f"| {name} | {frac:.0%} | {site} | {seeds} | {WAYS[w]} | {correct[w].mean():.3f} | {diff} "
                         f"| {_detection(preds[w])} | {_ece(preds[w], classes):.3f} | {_referral(preds[w])} |")
    summary = []
    for site, ways in pooled.items():
        if not ways["single"]:
            continue
        base = np.concatenate(ways["single"])
        for w in list(WAYS)[1:]:
            d = (np.concatenate(ways[w]) - base).mean(0)
            lo, hi = _ci(d)
            summary.append(f"| {site} | {len(base)} | {WAYS[w]} | {base.mean():.3f} -> {np.concatenate(ways[w]).mean():.3f} "
                           f"| {100 * d.mean():+.1f} ({100 * lo:+.1f} to {100 * hi:+.1f}) |")
    return f"""## Post-hoc inference variants on the same models (`{command}`)

Machine: {machine()}. The models of a `benchmarks.paper_table` work folder (default cohort and
config; CC-CMR and its LGE-off ablation), each evaluated four ways: **as trained** (20 MC-dropout passes over the
study as it is); **test-time augmentation** (each of the 20 passes reads its own random view of the cine: the training
augmentation without its cavity discs, i.e. rotation, translation, area-preserving stretch, elastic, bias field, gamma
and contrast, noise; the run's temperature); **LDA head** (the diagnostic layer refitted as linear discriminant analysis, OAS shrinkage, on the
features it reads in 10 MC-dropout passes of the run's labelled training patients; temperature refitted on
validation); both. Each way
sets its own referral thresholds on the run's validation patients (at most 20%). Difference: paired against "as
trained", the same models, patients and seeds (95% percentile bootstrap over test patients).

| model | labelled share | test site | seeds | inference | accuracy | difference (points) | error-detection AUROC (95% CI), uncertainty / confidence | ECE | referred / accuracy of the rest |
|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(lines)}

Every model above together, per test site (paired over models and patients):

| test site | models | inference | accuracy as trained -> this way | difference (points) |
|---|---|---|---|---|
{chr(10).join(summary)}
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, help="a benchmarks.paper_table work folder (runs/, cohort/, external/)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    ap.add_argument("--shares", type=float, nargs="+", default=None, help="only the runs with these labelled shares "
                    "(e.g. 1 0.1; default: every run)")
    ap.add_argument("--runs", nargs="+", default=None, help="only the run folders matching these patterns "
                    "(e.g. 'ccmr-f1-*' 'ccmr-nolge-f1-*'; default: every run)")
    ap.add_argument("--summarise-only", action="store_true", help="write the table from the evaluations already made")
    ap.add_argument("--no-block", action="store_true", help="print the table without writing BENCHMARKS.md")
    ap.add_argument("--block", default="post-hoc", help="the BENCHMARKS.md block to write")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    if not args.summarise_only:
        done = sorted(p for p in (work / "runs").iterdir() if (p / "metrics.json").is_file()
                      and (args.shares is None or _parse(p)[1] in args.shares)
                      and _chosen(p, args.runs))
        for k, run in enumerate(done):
            evaluate_run(run, work)
            print(f"[{k + 1}/{len(done)}] {run.name}: evaluated {', '.join(list(WAYS)[1:])}", flush=True)
    command = "python -m benchmarks.post_hoc --workdir DIR" + (
        " --runs " + " ".join(f"'{r}'" for r in args.runs) if args.runs else "") + (
        f" --block {args.block}" if args.block != "post-hoc" else "")
    text = table(work, args.runs, command)
    if not args.no_block:
        update_block(args.block, text)
    print(text)


if __name__ == "__main__":
    main()
