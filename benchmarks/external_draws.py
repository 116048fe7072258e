"""Saved models on several independent draws of the external phantom, each alone and pooled.

    python -m benchmarks.external_draws --runs DIR --draws 100:40 300:80 400:200 --selected 200:80 --workdir W

DIR: a ``benchmarks.paper_table`` work folder; its models trained with every label
(``runs/<variant>-f1-s<seed>/model.pt``) of ``--variants`` and ``--seeds`` are evaluated on each draw
of ``ccmr synth --external`` (SEED:PATIENTS; 100:40 is the paper table's site-x), which no model saw
in training. One draw of 40 patients holds 10 infarcts, the class the external shift costs most, so
one draw's accuracy moves by several points with the draw; the pooled row treats the draws as one
larger external site. ``--selected`` draws were looked at when a recipe was chosen: they are shown,
and left out of the pool. Each draw's row is what the paper table shows for a test site; the pool's
intervals resample its patients (and seeds), every draw's patients together. Evaluations are kept
in W (a rerun resumes).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from benchmarks.common import machine, update_block
from benchmarks.external_shift import _runs
from benchmarks.external_shift import run as evaluate
from benchmarks.paper_table import SLUG, _cis, _correct, _read, quality_cells, referral_figures, verdict
from ccmr_core.metrics import classification_metrics


def _draw(text: str) -> tuple[int, int]:
    seed, sep, n = text.partition(":")
    if not sep or not seed.isdigit() or not n.isdigit() or int(n) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: write SEED:PATIENTS, e.g. 400:200")
    return int(seed), int(n)


def _name(draw: tuple[int, int]) -> str:
    return "site-x (seed 100)" if draw == (100, 40) else f"seed {draw[0]}"


def _metrics(pred: dict[str, dict]) -> dict:
    """What ``quality_cells`` reads of a model's metrics, from its prediction file: macro AUC, ECE and
    its floor (``classification_metrics`` on the calibrated probabilities), and what the run's
    referral thresholds did (the file's ``referred`` column)."""
    rows = [pred[k] for k in sorted(pred)]
    classes = [k[2:] for k in rows[0] if k.startswith("p_")]
    probs = np.array([[float(r[f"p_{c}"]) for c in classes] for r in rows])
    labels = np.array([classes.index(r["label"]) for r in rows])
    return {**classification_metrics(probs, labels, classes), "referral": referral_figures([pred])}


def _pool(per_draw: list[list[dict[str, dict]]], draws: list[tuple[int, int]]) -> list[dict[str, dict]]:
    """One prediction file per seed holding every draw's patients (ids prefixed by the draw)."""
    seeds = len(per_draw[0])
    return [{f"{d[0]}/{k}": {**r, "patient_id": f"{d[0]}/{k}"} for preds, d in zip(per_draw, draws)
             for k, r in preds[s].items()} for s in range(seeds)]


def table(evals: dict, draws: list[tuple[int, int]], selected: list[tuple[int, int]], columns: list[str],
          seeds: list[int], command: str) -> str:
    """``evals``: (draw, column) -> the column's evaluation folders in --seeds order."""
    preds = {key: [_read(ev / "predictions.csv") for ev in folders] for key, folders in evals.items()}
    pooled = [d for d in draws if d not in selected]
    rows, diffs = [], []
    sets = [(_name(d), [d]) for d in draws] + ([(f"pooled: {', '.join(_name(d) for d in pooled)}", pooled)]
                                               if len(pooled) > 1 else [])
    for label, ds in sets:
        by_col = {col: (preds[(ds[0], col)] if len(ds) == 1 else _pool([preds[(d, col)] for d in ds], ds))
                  for col in columns}
        for col in columns:
            p = by_col[col]
            rows.append(f"| {label}{' (looked at to choose a recipe)' if ds[0] in selected else ''} | {col} | "
                        f"{' | '.join(quality_cells(p, [_metrics(x) for x in p]))} | {len(p[0])} |")
        for col in columns[1:]:
            patients = sorted(by_col[col][0])
            d = _correct(by_col[col], patients) - _correct(by_col[columns[0]], patients)  # (seeds, patients)
            lo, hi, slo, shi = _cis(d)
            diffs.append(f"| {label} | {col} minus {columns[0]} | {100 * d.mean():+.1f} | {100 * lo:+.1f} to "
                         f"{100 * hi:+.1f} | {100 * slo:+.1f} to {100 * shi:+.1f} | {verdict(lo, hi, slo, shi)} |")
    return f"""## Saved models on independent draws of the external phantom (`{command}`)

Machine: {machine()}. The models of a `benchmarks.paper_table` work folder (default cohort and config, trained on
site-a + site-b with every label; seeds {', '.join(map(str, seeds))}), evaluated on draws of `ccmr synth --external`
(another vendor, protocol and anatomy model; seed:patients {', '.join(f'{s}:{n}' for s, n in draws)}; 100:40 is the
paper table's site-x), which no model saw in training. Accuracy: mean ± sd over the seeds; 95% intervals over
patients of the seed-averaged correctness, which holds these runs fixed / over seeds and patients, which asks what
other runs of the recipe would give. ECE: 20 bins, mean over seeds, in brackets a perfectly calibrated model's with
the same confidences. Error detection: AUROC of the epistemic uncertainty / of low confidence for the wrong
predictions, pooled over seeds, intervals resampling patients. Referral: the runs' validation thresholds. The pooled
rows put the draws' patients together as one site (draws looked at when a recipe was chosen are left out).

| external draw | model | accuracy (mean ± sd over seeds) | 95% CI, patients / seeds and patients | macro AUC | ECE (calibrated model's) | error-detection AUROC (95% CI), uncertainty / confidence | referred / accuracy of the rest | n |
|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}
{_differences(diffs)}"""


def _differences(rows: list[str]) -> str:
    if not rows:
        return ""
    return f"""
Paired differences (accuracy points; the same seeds and patients):

| external draw | comparison | difference | 95% CI, patients | 95% CI, seeds and patients | |
|---|---|---|---|---|---|
{chr(10).join(rows)}
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", required=True, help="a benchmarks.paper_table work folder")
    ap.add_argument("--variants", nargs="+", default=["cc-cmr, LGE terms off", "cc-cmr"], choices=list(SLUG),
                    help="models; each after the first is compared with the first, paired")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--draws", type=_draw, nargs="+", required=True, help="SEED:PATIENTS of each external draw")
    ap.add_argument("--selected", type=_draw, nargs="*", default=[],
                    help="draws looked at when a recipe was chosen: shown, left out of the pool")
    ap.add_argument("--workdir", required=True, help="cohorts and evaluations are kept here (a rerun resumes)")
    ap.add_argument("--block", default="external-draws", help="the BENCHMARKS.md block it writes")
    ap.add_argument("--no-block", action="store_true", help="print the table, do not write BENCHMARKS.md")
    args = ap.parse_args()
    draws = sorted(set(args.draws) | set(args.selected))
    columns = _runs([f"m={args.runs}"], args.variants, args.seeds)
    evals = {}
    for seed, n in draws:
        got = evaluate(Path(args.workdir) / f"draw-{seed}-{n}", columns, n, seed, ["full shift"])
        evals.update({((seed, n), col[:-len(", m")]): folders for (_, col), folders in got.items()})
    command = ("python -m benchmarks.external_draws --runs DIR --variants "
               f"{' '.join(repr(v) for v in args.variants)} --seeds {' '.join(map(str, args.seeds))} --draws "
               f"{' '.join(f'{s}:{n}' for s, n in args.draws)}"
               + (f" --selected {' '.join(f'{s}:{n}' for s, n in args.selected)}" if args.selected else "")
               + f" --block {args.block}")
    text = table(evals, draws, args.selected, args.variants, args.seeds, command)
    if not args.no_block:
        update_block(args.block, text)
    print(text)


if __name__ == "__main__":
    main()
