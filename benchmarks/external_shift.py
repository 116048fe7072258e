"""What the external site's shift costs a model, factor by factor: saved models evaluated on the
external phantom as it is and with one factor of its shift reverted to the training sites' (leave
one factor out; ``ccmr_core/synth/external.py``, ``SHIFT_FACTORS``).

    python -m benchmarks.external_shift --runs "LABEL=DIR" ["LABEL=DIR" ...] --workdir W

DIR: a ``benchmarks.paper_table`` work folder; its models trained with every label
(``runs/<variant>-f1-s<seed>/model.pt``) of ``--variants`` and ``--seeds`` are evaluated, under the
column "variant, LABEL" (e.g. two work folders trained with two recipes). The external cohort is
drawn with a seed of its own (default 200, 80 patients), not site-x's of the paper table (seed
100, 40 patients), so this diagnostic is not that table's test set. Paired: every cohort variant
holds the same patients (the same random draws, one factor changed), and each difference is
against the full shift, over the column's models and the patients (95% percentile bootstrap over
patients of the model-averaged difference). Cohorts and evaluations are kept in W (a rerun resumes).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from tqdm import tqdm

from benchmarks.common import machine, update_block
from benchmarks.paper_table import SLUG, _ci, _cis, _correct, _read, run_dir, verdict
from ccmr_core.synth.cohort import generate_cohort
from ccmr_core.synth.external import ANATOMY_FACTORS, SHIFT_FACTORS
from ccmr_core.training import evaluate_saved

COHORTS = {"full shift": (), **{f"without {k}": (k,) for k in SHIFT_FACTORS},
           "without the anatomy model (its 5 factors)": ANATOMY_FACTORS,
           "without any factor (another scanner only)": tuple(SHIFT_FACTORS)}


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-")


def _runs(spec: list[str], variants: list[str], seeds: list[int]) -> dict[str, list[Path]]:
    """Column name -> the models it averages over; an absent model is named with what to do."""
    columns, labels = {}, set()
    for item in spec:
        label, sep, folder = item.partition("=")
        if not sep or not label or not folder:
            raise SystemExit(f"--runs {item!r}: write LABEL=DIR (DIR: a benchmarks.paper_table work folder)")
        if label in labels:
            raise SystemExit(f"--runs {item!r}: the label {label!r} is given twice; give each work folder its own "
                             "(a column and its evaluations are kept under the label)")
        labels.add(label)
        for v in variants:
            models = [run_dir(Path(folder), v, 1.0, s) / "model.pt" for s in seeds]
            missing = [str(m) for m in models if not m.is_file()]
            if missing:
                raise SystemExit(f"--runs {item!r}: no saved model {', '.join(missing)}; train it with "
                                 f"python -m benchmarks.paper_table --workdir {folder} --seeds {' '.join(map(str, seeds))}")
            columns[f"{v}, {label}"] = models
    return columns


def _read_text(path: Path) -> str | None:
    return path.read_text() if path.is_file() else None


def run(work: Path, columns: dict[str, list[Path]], patients: int, seed: int, cohorts: list[str]) -> dict:
    """(cohort, column) -> the evaluation folders of the column's models (predictions.csv, metrics.json),
    in --seeds order (``benchmarks.external_draws`` reads them for its quality rows)."""
    out = {}
    jobs = [(c, col, m) for c in cohorts for col, models in columns.items() for m in models]
    bar = tqdm(total=len(jobs), desc="evaluating", unit="model")
    for cohort in cohorts:
        without = COHORTS[cohort]
        data = work / "cohorts" / _slug(cohort)
        generate_cohort(data, sites=1, patients=patients, seed=seed, progress=False, kind="external",
                        external_without=without)
        for col, models in columns.items():
            evals = []
            for m in models:
                ev = work / "eval" / _slug(cohort) / _slug(col) / m.parent.name
                source = f"{m.resolve()} {m.stat().st_mtime_ns}"  # an evaluation is reused for this model file only
                if not (ev / "predictions.csv").is_file() or _read_text(ev / "model.txt") != source:
                    shutil.rmtree(ev, ignore_errors=True)
                    evaluate_saved(m, data / "site-x", ev, progress=False, cache_root=work / "cache")
                    (ev / "model.txt").write_text(source)
                evals.append(ev)
                bar.update()
            out[(cohort, col)] = evals
    bar.close()
    return out


def correctness(evals: dict) -> dict:
    """(cohort, column) -> (models, patients) 0/1 correctness, in the cohorts' patient order."""
    out = {}
    for key, folders in evals.items():
        preds = [_read(ev / "predictions.csv") for ev in folders]
        out[key] = _correct(preds, sorted(preds[0]))
    return out


def table(correct: dict, columns: list[str], patients: int, seed: int, seeds: list[int],
          heading: str = "What the external site's shift costs, factor by factor (`python -m benchmarks.external_shift`)") -> str:
    cohorts = [c for c in COHORTS if (c, columns[0]) in correct]  # the draws evaluated (--cohorts)
    head = "| external cohort | " + " | ".join(f"{c}: accuracy | difference (points)" for c in columns) + " |"
    lines = [head, "|---|" + "---|---|" * len(columns)]
    for cohort in cohorts:
        cells = []
        for col in columns:
            x, full = correct[(cohort, col)], correct[("full shift", col)]
            acc = f"{x.mean():.3f}"
            if cohort == "full shift":
                cells += [acc, ""]
                continue
            d = (x - full).mean(0)
            lo, hi = _ci(d)
            cells += [acc, f"{100 * d.mean():+.1f} ({100 * lo:+.1f} to {100 * hi:+.1f})"]
        lines.append(f"| {cohort} | " + " | ".join(cells) + " |")
    factors = "; ".join(f"**{k}**: {v}" for k, v in SHIFT_FACTORS.items())
    drawn = (f"""is, and again with one factor of its shift reverted to the training sites' (the same patients and random draws):
{factors}. Difference: against the full shift, paired over the column's models and the patients (95% percentile
bootstrap over patients of the model-averaged difference); a positive difference is what that factor costs."""
             if len(cohorts) > 1 else "is (no factor reverted): one more external site for the columns' models.")
    which = ("the paper table's site-x" if (seed, patients) == (100, 40) else
             "not site-x of the paper table, seed 100")
    return f"""## {heading}

Machine: {machine()}. The models of `benchmarks.paper_table` work folders (default cohort and config, trained on
site-a + site-b with every label; seeds {', '.join(map(str, seeds))}), each column averaging its models. The external
phantom (`ccmr synth --external`) is drawn with seed {seed} ({patients} patients; {which}) as it
{drawn}

{chr(10).join(lines)}
{_against_first(correct, columns)}"""


def _against_first(correct: dict, columns: list[str]) -> str:
    """With the full shift, every column minus the first, paired over the seeds (the columns' models
    in --seeds order) and patients: intervals over patients / over seeds and patients."""
    if len(columns) < 2:
        return ""
    first = correct[("full shift", columns[0])]
    rows = []
    for col in columns[1:]:
        d = correct[("full shift", col)] - first  # (seeds, patients), paired
        lo, hi, slo, shi = _cis(d)
        rows.append(f"| {col} minus {columns[0]} | {100 * d.mean():+.1f} | {100 * lo:+.1f} to {100 * hi:+.1f} "
                    f"| {100 * slo:+.1f} to {100 * shi:+.1f} | {verdict(lo, hi, slo, shi)} |")
    return f"""
Columns against the first, full shift (paired: the same seeds and patients; 95% intervals over patients of the
seed-averaged difference / over seeds and patients):

| comparison | difference (points) | 95% CI, patients | 95% CI, seeds and patients | |
|---|---|---|---|---|
{chr(10).join(rows)}
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", required=True, help="LABEL=DIR: a paper_table work folder and its column label")
    ap.add_argument("--variants", nargs="+", default=["cc-cmr", "cc-cmr, LGE terms off"], choices=list(SLUG))
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--patients", type=int, default=80)
    ap.add_argument("--seed", type=int, default=200, help="the external cohort's seed (site-x of the paper table: 100)")
    ap.add_argument("--workdir", required=True, help="cohorts and evaluations are kept here (a rerun resumes)")
    ap.add_argument("--cohorts", nargs="+", default=list(COHORTS), choices=list(COHORTS),
                    help="which draws of the external cohort (default: every one; 'full shift' alone compares "
                    "the columns on one more external site)")
    ap.add_argument("--block", default="external-shift", help="the BENCHMARKS.md block it writes")
    ap.add_argument("--no-block", action="store_true", help="print the table, do not write BENCHMARKS.md")
    args = ap.parse_args()
    if "full shift" not in args.cohorts:
        raise SystemExit("--cohorts: include 'full shift' (every other draw is compared with it)")
    columns = _runs(args.runs, args.variants, args.seeds)
    work = Path(args.workdir)
    evals = run(work, columns, args.patients, args.seed, args.cohorts)
    correct = correctness(evals)
    if args.cohorts == ["full shift"]:
        command = ("python -m benchmarks.external_shift --cohorts 'full shift' --seed "
                   f"{args.seed}{f' --patients {args.patients}' if args.patients != 80 else ''} --seeds {' '.join(map(str, args.seeds))} --variants {' '.join(repr(v) for v in args.variants)}"
                   f" --block {args.block}")
        text = table(correct, list(columns), args.patients, args.seed, args.seeds,
                     f"Variants on one more draw of the external phantom, seed {args.seed} (`{command}`)")
    else:
        text = table(correct, list(columns), args.patients, args.seed, args.seeds)
    (work / "correct.json").write_text(json.dumps({f"{c} | {col}": v.tolist() for (c, col), v in correct.items()}))
    if not args.no_block:
        update_block(args.block, text)
    print(text)


if __name__ == "__main__":
    main()
