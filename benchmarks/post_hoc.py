"""Test-time augmentation against the single clean pass, on the very models of a paper-table work folder.

    python -m benchmarks.test_time_augmentation --workdir DIR   # DIR: a benchmarks.paper_table work folder

Each saved model (runs/*/model.pt) is evaluated again with ``model.test_time_augmentation`` on:
its MC-dropout passes each read a random training augmentation of the cine. The referral
thresholds are set again on the run's own validation patients with the same passes (each signal
with its own thresholds); the calibration temperature is the run's. Tested on all of site-c and,
for the runs with every label, on the external site-x. The comparison is paired: the same models,
patients and seeds; intervals are percentile bootstraps over test patients of the seed-averaged
correctness. Evaluations are kept under each run (``tta/``), so a rerun resumes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Subset

from benchmarks.common import machine, update_block
from benchmarks.paper_table import SLUG, _ci, _correct, _detection, _read
from ccmr_core.checkpoint import load_classifier
from ccmr_core.config import validate
from ccmr_core.data.sources import MultiSite, prepare
from ccmr_core.engine import predict
from ccmr_core.metrics import expected_calibration_error
from ccmr_core.referral import thresholds_from_outputs
from ccmr_core.training import loader, split_indices, write_predictions

NAMES = {slug: name for name, slug in SLUG.items()}


def evaluate_run(run: Path, work: Path) -> None:
    """Write run/tta/site-c.csv (and site-x.csv for a run with every label) with augmented passes."""
    tta = run / "tta"
    external = run.name.split("-f")[1].startswith("1-")
    if (tta / "site-c.csv").is_file() and (not external or (tta / "site-x.csv").is_file()):
        return
    model, blob = load_classifier(run / "model.pt")
    cfg = validate(blob["config"], f"{run / 'model.pt'} (embedded config)")
    mc, cpu, classes = cfg.model.mc_samples, torch.device("cpu"), blob["classes"]
    ds = MultiSite(prepare(work / "cohort", cfg, work / "cache", False), cfg)
    idx = split_indices(ds, cfg, "site-c")
    torch.manual_seed(cfg.train.seed)
    vo = predict(model, loader(Subset(ds, idx["val"]), cfg, shuffle=False), cpu, mc, augment=True)
    refer = thresholds_from_outputs(vo["probs"], vo["labels"].astype(int), vo["uncertainty"], cfg.model.refer_fraction)
    tta.mkdir(exist_ok=True)
    (tta / "refer.json").write_text(json.dumps(refer, indent=1))
    sets = [("site-c", ds, idx["test"])]
    if external:
        dx = MultiSite(prepare(work / "external" / "site-x", cfg, work / "cache", False), cfg)
        sets.append(("site-x", dx, list(range(len(dx)))))
    for name, d, rows in sets:
        torch.manual_seed(cfg.train.seed)
        out = predict(model, loader(Subset(d, rows), cfg, shuffle=False), cpu, mc, augment=True)
        write_predictions(tta / f"{name}.csv", out, d, classes, refer)


def _ece(preds: list[dict[str, dict]], classes: list[str]) -> float:
    """Mean over seeds of the ECE of each seed's calibrated probabilities."""
    out = []
    for p in preds:
        rows = list(p.values())
        probs = np.array([[float(r[f"p_{c}"]) for c in classes] for r in rows])
        out.append(expected_calibration_error(probs, np.array([classes.index(r["label"]) for r in rows])))
    return float(np.mean(out))


def _referral(preds: list[dict[str, dict]]) -> str:
    rows = [r for p in preds for r in p.values()]
    kept = [r for r in rows if r["referred"] == "0"]
    return f"{1 - len(kept) / len(rows):.0%} / {np.mean([r['label'] == r['predicted'] for r in kept]):.3f}"


def table(work: Path) -> str:
    runs = sorted(p for p in (work / "runs").iterdir() if (p / "tta" / "site-c.csv").is_file())
    groups: dict[tuple[str, str, str], list[Path]] = {}
    for r in runs:
        slug, rest = r.name.split("-f")
        frac, seed = rest.split("-s")
        groups.setdefault((NAMES[slug], frac, "site-c"), []).append(r)
        if (r / "tta" / "site-x.csv").is_file():
            groups.setdefault((NAMES[slug], frac, "site-x"), []).append(r)
    lines, pooled = [], {"single": [], "tta": []}
    for (name, frac, site), rs in sorted(groups.items(), key=lambda kv: (kv[0][2], kv[0][0], -float(kv[0][1]))):
        base_name = "test_predictions.csv" if site == "site-c" else "external/predictions.csv"
        single = [_read(r / base_name) for r in rs]
        tta = [_read(r / "tta" / f"{site}.csv") for r in rs]
        classes = [k[2:] for k in next(iter(single[0].values())) if k.startswith("p_")]
        patients = sorted(single[0])
        a, b = _correct(single, patients).mean(0), _correct(tta, patients).mean(0)
        if site == "site-c":
            pooled["single"].append(_correct(single, patients))
            pooled["tta"].append(_correct(tta, patients))
        lo, hi = _ci(b - a)
        seeds = ", ".join(r.name.rsplit("-s", 1)[1] for r in rs)
        lines.append(f"| {name} | {float(frac):.0%} | {site} | {seeds} | {a.mean():.3f} / {b.mean():.3f} "
                     f"| {100 * (b - a).mean():+.1f} ({100 * lo:+.1f} to {100 * hi:+.1f}) "
                     f"| {_detection(single)} | {_detection(tta)} "
                     f"| {_ece(single, classes):.3f} / {_ece(tta, classes):.3f} "
                     f"| {_referral(single)} | {_referral(tta)} |")
    every = ""
    if pooled["single"]:
        s, t = np.concatenate(pooled["single"]), np.concatenate(pooled["tta"])
        d = (t - s).mean(0)
        lo, hi = _ci(d)
        every = (f"\nEvery model above on site-c together ({len(s)} models, the same {s.shape[1]} patients): "
                 f"accuracy {s.mean():.3f} single pass, {t.mean():.3f} with test-time augmentation, paired difference "
                 f"{100 * d.mean():+.1f} points ({100 * lo:+.1f} to {100 * hi:+.1f}).\n")
    return f"""## Test-time augmentation against the single clean pass (`python -m benchmarks.test_time_augmentation --workdir DIR`)

Machine: {machine()}. The models of the label-efficiency work folder (`benchmarks.paper_table`, default cohort and
config), each evaluated twice: as trained (20 MC-dropout passes over the study as it is) and with
`model.test_time_augmentation` (each of the 20 passes reads its own random training augmentation of the cine: rotation,
translation, area-preserving stretch, elastic, bias field, gamma and contrast, noise). Each way sets its own referral
thresholds on the run's validation patients (at most 20%); the calibration temperature is the run's (fitted on clean
logits). Difference: paired, the same models, patients and seeds (95% percentile bootstrap over test patients).

| model | labelled share | test site | seeds | accuracy single / TTA | difference (points) | error-detection AUROC (95% CI) single, uncertainty / confidence | TTA | ECE single / TTA | referred / accuracy of the rest, single | TTA |
|---|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(lines)}
{every}"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, help="a benchmarks.paper_table work folder (runs/, cohort/, external/)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    ap.add_argument("--summarise-only", action="store_true", help="write the table from the evaluations already made")
    ap.add_argument("--no-block", action="store_true", help="print the table without writing BENCHMARKS.md")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    if not args.summarise_only:
        done = sorted(p for p in (work / "runs").iterdir() if (p / "metrics.json").is_file())
        for k, run in enumerate(done):
            evaluate_run(run, work)
            print(f"[{k + 1}/{len(done)}] {run.name}: evaluated with test-time augmentation", flush=True)
    text = table(work)
    if not args.no_block:
        update_block("tta", text)
    print(text)


if __name__ == "__main__":
    main()
