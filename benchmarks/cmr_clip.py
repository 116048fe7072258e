"""CMR-CLIP, trained centrally on the default cohort's reports, tested on a held-out site.

    python -m benchmarks.cmr_clip [--seeds 0 1 2] [--epochs 40] [--workdir DIR] [--threads N] [--federated]

Trains on site-a + site-b (studies and reports; no diagnosis label), tests on all of site-c:
retrieval both ways within site-c's gallery, class-aware precision@5, zero-shot findings from
prompts (AUC against the phantom's ground truth), a 5-class zero-shot from class prompts,
prototype few-shot probes (1, 4, 16 labelled studies per class, 20 draws) and a full linear
probe on the frozen study embedding, fitted on the training sites. Two report variants, side by
side per seed: the full report, and the report whose impression leaves out the diagnosis word.
Each run's metrics stay in the work folder (a rerun with --workdir reuses them).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import machine, update_block
from ccmr_core.clip_training import evaluate_clip, synthetic_truth, train_clip
from ccmr_core.config import load_config
from ccmr_core.models.registry import build_model, model_kwargs
from ccmr_core.synth.cohort import generate_cohort
from ccmr_core.synth.reports import FINDINGS

COLUMNS = {"full report": "report", "no diagnosis word": "report_without_diagnosis",
           "no diagnosis word, sentence sampling 0.5": "report_without_diagnosis",
           "no diagnosis word, negation marks": "report_without_diagnosis",
           "no diagnosis word, best validation epoch": "report_without_diagnosis",
           "no diagnosis word, attention pooling": "report_without_diagnosis",
           "no diagnosis word, learnt temperature": "report_without_diagnosis",
           "no diagnosis word, report measurements": "report_without_diagnosis"}
# what a column changes besides the report column, the suffix of its run folders, and what its
# paired difference with "no diagnosis word" is called
RECIPES = {"no diagnosis word, sentence sampling 0.5": (["train.sentence_sampling=0.5"], "-sent0.5",
                                                        "sentence sampling 0.5 minus whole reports"),
           "no diagnosis word, negation marks": (["model.text_negation=true"], "-neg",
                                                 "negation marks minus none (the default)"),
           "no diagnosis word, best validation epoch": (["train.keep_model=best-validation"], "-bestval",
                                                        "best validation epoch minus the last (the default)"),
           "no diagnosis word, attention pooling": (["model.text_pool=attention"], "-attn",
                                                    "attention pooling minus the mean (the default)"),
           "no diagnosis word, learnt temperature": (["model.learn_temperature=true"], "-learnt",
                                                     "learnt temperature minus fixed (the default)"),
           "no diagnosis word, report measurements": (["model.report_measurements=true"], "-meas",
                                                      "report measurements minus none (the default)")}
FEDERATED = "no diagnosis word, federated (2 sites)"


def federated_label(batch: int, local: int, default_batch: int) -> str:
    """The column of a federated recipe (the default recipe: the central runs' batch, 2 local epochs)."""
    if batch == default_batch and local == 2:
        return FEDERATED
    return FEDERATED[:-1] + f", site batch {batch}, {local} local epochs)"
TRAIN_SITES = ("site-a", "site-b")


def _evaluate(model, cohort: Path, cfg, cache: Path, seed: int, scores_only: bool = False) -> dict:
    """The evaluation of every run, central or federated: site-c held out, probes on the training
    sites; with each test patient's zero-shot finding scores and truth (``per_patient``) for the
    paired comparisons (``scores_only``: those alone)."""
    from ccmr_core.clip_training import embed, embed_prompts, site_reports
    from ccmr_core.data.reports import WithReports
    from ccmr_core.data.sources import MultiSite, prepare
    from ccmr_core.retrieval import FINDING_NEGATIVE_PROMPTS, FINDING_PROMPTS, prompt_scores
    from ccmr_core.training import split_indices
    from torch.utils.data import Subset

    ds = MultiSite(prepare(cohort, cfg, cache), cfg)
    idx = split_indices(ds, cfg, "site-c")
    truth = synthetic_truth(cohort, ds.patient_ids, idx["test"])
    wr = WithReports(ds, ds.patient_ids, site_reports(cohort, cfg.data.report_column))
    test_embedding = embed(model, Subset(wr, idx["test"]))
    video = test_embedding[0]
    pos = {f: prompt_scores(video, embed_prompts(model, p)) for f, p in FINDING_PROMPTS.items()}
    per = {"patients": [ds.patient_ids[i] for i in idx["test"]], "truth": truth,
           "scores": {f: v.tolist() for f, v in pos.items()},
           "paired_scores": {f: (v - prompt_scores(video, embed_prompts(model, FINDING_NEGATIVE_PROMPTS[f]))).tolist()
                             for f, v in pos.items()}}
    if scores_only:
        return per
    return {**evaluate_clip(model, wr, idx, list(cfg.data.classes), truth, seed=seed, test_embedding=test_embedding),
            "per_patient": per}


def run_federated(work: Path, cohort: Path, seed: int, epochs: int, threads: int, batch: int, local: int,
                  tag: str = "") -> dict:
    """CMR-CLIP trained by a federation of the training sites (``epochs`` = rounds x ``local``;
    ``batch``: patients per batch at a site; ``tag``: the run folder's suffix of a non-default recipe)."""
    import os

    from benchmarks.federated import run_config
    from ccmr_core.checkpoint import load_clip
    from client.client_app import app as client_app
    from server.server_app import app as server_app
    from tests.inprocess import run_inprocess

    out = work / "runs" / f"federated-{COLUMNS['no diagnosis word']}{tag}-s{seed}"
    cfg = load_config(preset="cmr-clip", overrides=[f"train.seed={seed}",
                                                    f"data.report_column={COLUMNS['no diagnosis word']}"])
    if (out / "metrics.json").is_file():
        return _with_scores(out, cohort, cfg, work, seed, lambda: load_clip(out / "run" / "model.pt", "")[0])
    view = work / "cohort-training-sites"  # site-c is not in the federation
    view.mkdir(parents=True, exist_ok=True)
    for name in TRAIN_SITES:
        if not (view / name).exists():
            (view / name).symlink_to((cohort / name).resolve(), target_is_directory=True)
    t = load_config().train
    central_val = t.val_fraction / (1 - t.test_fraction)  # the share the central runs validate on
    yaml = work / "runs" / f"federated{tag}-s{seed}.yaml"
    yaml.parent.mkdir(parents=True, exist_ok=True)
    yaml.write_text(f"data: {{report_column: {COLUMNS['no diagnosis word']}}}\n"
                    f"train: {{val_fraction: {central_val:.4f}, test_fraction: 0.0, batch_size: {batch}, "
                    f"threads: {threads}}}\n"
                    f"federated: {{rounds: {epochs // local}, local_epochs: {local}, validation_patients: 0}}\n")
    os.environ["CCMR_CACHE"] = str(work / "cache-federated")  # the sites' own ingest caches
    t0 = time.perf_counter()
    run = out / "run"
    if not (run / "model.pt").is_file():
        run_inprocess(server_app, client_app, len(TRAIN_SITES), run_config(
            preset="cmr-clip", config=str(yaml), **{"out-dir": str(run), "data-dir": str(view), "train-seed": seed,
                                                    "keep-superlink": True}))
    model, _ = load_clip(run / "model.pt", "this benchmark needs")
    return _finish(out, _evaluate(model, cohort, cfg, work / "cache", seed), t0, f"federated, seed {seed}")


def _with_scores(out: Path, cohort: Path, cfg, work: Path, seed: int, model) -> dict:
    """A finished run's metrics; a run of an older version gets the per-patient scores it lacks
    from its saved model (``model()``), written back to its metrics.json."""
    m = json.loads((out / "metrics.json").read_text())
    if "paired_scores" not in m.get("per_patient", {}):
        m["per_patient"] = _evaluate(model(), cohort, cfg, work / "cache", seed, scores_only=True)
        (out / "metrics.json").write_text(json.dumps(m, indent=1))
    return m


def lge_ceiling(cohort: Path) -> dict[str, float]:
    """How well 'LGE present' can be told on site-c from what a cine-only model could know, by a
    logistic regression fitted on site-a + site-b's phantom truth (patients given contrast): the
    diagnosis alone, and the values cine shows (LV and RV volumes and function, wall thickness, the
    17 segments' contraction; not the scar)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    classes = list(load_config().data.classes)

    def rows(site):
        gt = [t for t in json.loads((cohort / "groundtruth" / f"{site}.json").read_text()) if t["has_lge"]]
        dx = [[float(t["diagnosis"] == c) for c in classes] for t in gt]
        cine = [[*t["measurements"].values(), t["wall_mean_mm"], *(v[0] for v in t["segments"].values())] for t in gt]
        return np.array(dx), np.array(cine), np.array([t["scar_extent"] > 0 for t in gt])

    train = [rows(s) for s in TRAIN_SITES]
    test = rows("site-c")
    out = {}
    for k, name in ((0, "diagnosis"), (1, "cine values")):
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
        clf.fit(np.concatenate([r[k] for r in train]), np.concatenate([r[2] for r in train]))
        out[name] = float(roc_auc_score(test[2], clf.predict_proba(test[k])[:, 1]))
    return out


def _finish(out: Path, m: dict, t0: float, label: str) -> dict:
    """A run's metrics with its minutes, written to its folder and summarised on the console."""
    m["minutes"] = (time.perf_counter() - t0) / 60
    (out / "metrics.json").write_text(json.dumps(m, indent=1))
    r = m["retrieval"]["report_to_video"]
    print(f"{label}: report->video R@1 {r['R@1']:.2f} R@10 {r['R@10']:.2f}, linear probe {m['linear_probe']:.3f} "
          f"({m['minutes']:.1f} min)", flush=True)
    return m


def run_one(work: Path, cohort: Path, variant: str, seed: int, epochs: int, threads: int, batch: int) -> dict:
    extra, suffix, _ = RECIPES.get(variant, ([], "", ""))
    out = work / "runs" / f"{COLUMNS[variant]}{suffix}-s{seed}"
    cfg = load_config(preset="cmr-clip", overrides=[f"train.seed={seed}", f"train.epochs={epochs}",
                                                    f"train.threads={threads}", f"train.batch_size={batch}",
                                                    f"data.report_column={COLUMNS[variant]}", *extra])
    if (out / "metrics.json").is_file():
        def model():
            state = next(p for p in (out / "model.pt", out / "cmr_clip.pt") if p.is_file())
            m = build_model("cmr-clip", **model_kwargs(cfg, 1))
            m.load_state_dict(torch.load(state, weights_only=True))
            return m
        return _with_scores(out, cohort, cfg, work, seed, model)
    t0 = time.perf_counter()
    model, s = train_clip(cohort, out, cfg, "site-c", cache_root=work / "cache")
    torch.save(model.state_dict(), out / "model.pt")  # for paired comparisons added later
    m = {**_evaluate(model, cohort, cfg, work / "cache", seed), "kept_epoch": s["kept_epoch"],
         "temperature": model.temperature}
    return _finish(out, m, t0, f"{variant}, seed {seed} (model of epoch {s['kept_epoch']})")


def auc_difference(a: list[dict], b: list[dict], finding: str) -> tuple[float, float, float] | None:
    """Zero-shot AUC of run ``a`` minus run ``b`` for ``finding``, averaged over the seeds both have
    per-patient scores for, with a 95% percentile bootstrap over the test patients (paired: the
    same resampled patients for both runs and every seed, positives and negatives resampled
    separately so every draw has both; scipy)."""
    from scipy.stats import bootstrap
    from sklearn.metrics import roc_auc_score

    pairs = [(x["per_patient"], y["per_patient"]) for x, y in zip(a, b) if "per_patient" in x and "per_patient" in y]
    if not pairs:
        return None
    truth = pairs[0][0]["truth"][finding]
    known = np.array([v is not None for v in truth])
    y = np.array([bool(v) for v in truth])[known]
    sa = np.array([p[0]["scores"][finding] for p in pairs])[:, known]
    sb = np.array([p[1]["scores"][finding] for p in pairs])[:, known]

    def diff(pos, neg):  # resampled positives and negatives (a stratified bootstrap: both classes in every draw)
        rows = np.concatenate([np.asarray(pos, dtype=int), np.asarray(neg, dtype=int)])
        return float(np.mean([roc_auc_score(y[rows], u[rows]) - roc_auc_score(y[rows], v[rows]) for u, v in zip(sa, sb)]))

    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    if not len(pos) or not len(neg):
        return None
    res = bootstrap((pos, neg), diff, vectorized=False, n_resamples=2000, method="percentile", confidence_level=0.95,
                    random_state=0)
    return diff(pos, neg), float(res.confidence_interval.low), float(res.confidence_interval.high)


def _auc(per: dict, key: str, finding: str) -> float | None:
    """AUC of one run's per-patient ``key`` scores of ``finding`` against the truth."""
    from sklearn.metrics import roc_auc_score

    y = np.array([np.nan if v is None else float(v) for v in per["truth"][finding]])
    known = ~np.isnan(y)
    return float(roc_auc_score(y[known], np.array(per[key][finding])[known])) if 0 < y[known].sum() < known.sum() else None


def _ms(values: list[float], fmt: str = "{:.2f}") -> str:
    v = np.array([x for x in values if x is not None], float)
    if not len(v):
        return "-"
    return fmt.format(v.mean()) + (f" ± {fmt.format(v.std(ddof=1))}" if len(v) > 1 else "")


def table(results: dict[str, list[dict]], seeds: list[int], epochs: int, batch: int, local: int = 2,
          ceiling: dict[str, float] | None = None, command: str = "python -m benchmarks.cmr_clip") -> str:
    cfg = load_config(preset="cmr-clip")
    any_m = next(iter(results.values()))[0]
    n = any_m["retrieval"]["gallery"]
    variants = list(results)
    head = "| | " + " | ".join(variants) + " |\n|---|" + "---|" * len(variants)
    rows = []

    def row(label, get, fmt="{:.2f}"):
        rows.append(f"| {label} | " + " | ".join(_ms([get(m) for m in results[v]], fmt) for v in variants) + " |")

    for d, name in (("report_to_video", "report -> study"), ("video_to_report", "study -> report")):
        for k in (1, 5, 10):
            row(f"{name} R@{k} (chance {min(1, k / n):.2f})", lambda m, d=d, k=k: m["retrieval"][d][f"R@{k}"])
        row(f"{name} median rank (chance {(n + 1) / 2:.0f})", lambda m, d=d: m["retrieval"][d]["median_rank"], "{:.1f}")
    row("class-aware precision@5 (report -> study)", lambda m: m["class_precision@5"])
    for f in FINDINGS:
        pos = any_m["findings"][f]
        row(f"zero-shot AUC: {f.replace('_', ' ')} ({pos['positives']} of {pos['n']})",
            lambda m, f=f: m["findings"][f]["auc"])
    for f in FINDINGS:
        row(f"zero-shot AUC, positive minus negative prompts: {f.replace('_', ' ')}",
            lambda m, f=f: _auc(m["per_patient"], "paired_scores", f))
    row("zero-shot 5-class accuracy (class prompts)", lambda m: m["zero_shot_accuracy"])
    for k in any_m["few_shot"]:
        row(f"{k}-shot prototype accuracy (20 draws)", lambda m, k=k: m["few_shot"][k], "{:.3f}")
    row("linear probe accuracy (all training patients)", lambda m: m["linear_probe"], "{:.3f}")
    row("epoch of the model kept (`train.keep_model`)", lambda m: m.get("kept_epoch", epochs), "{:.0f}")
    row("contrastive temperature at the end", lambda m: m.get("temperature", cfg.model.temperature), "{:.3f}")
    row("minutes per run", lambda m: m["minutes"], "{:.1f}")
    central = "no diagnosis word"
    compared = [(v, f"{v.split(', ', 1)[1]} minus central") for v in variants if v.startswith(FEDERATED[:-1])]
    compared += [(v, RECIPES[v][2]) for v in variants if v in RECIPES]
    for other, title in [c for c in compared if central in results]:
        rows.append(f"| **{title}** (same report column; zero-shot AUC, paired 95% CI over site-c's patients) | "
                    + " | ".join("" for _ in variants) + " |")
        for f in FINDINGS:
            d = auc_difference(results[other], results[central], f)
            rows.append(f"| {f.replace('_', ' ')} | " + " | ".join(
                (f"{d[0]:+.3f} ({d[1]:+.3f} to {d[2]:+.3f})" if d else "-") if v == other else ""
                for v in variants) + " |")
    fed_text = (f"\nFederated column: site-a and site-b train it in a federation (FedProx, {epochs // local} rounds x "
                f"{local} local epochs = the central runs' {epochs} epochs, the same batch and learning rate; each site "
                "keeps its studies and reports, validates on its own patients and sends retrieval counts), then the "
                "final model is evaluated like the central ones; site-c never joins. Other federated columns change "
                "only the sites' batch or local epochs, as named." if any(v.startswith(FEDERATED[:-1]) for v in results)
                else "")
    ceiling_text = ("\nWhat cine could tell of 'LGE present' on site-c (a logistic regression fitted on site-a + b's "
                    f"phantom truth, patients given contrast): AUC {ceiling['diagnosis']:.2f} from the diagnosis alone, "
                    f"{ceiling['cine values']:.2f} from the values cine shows (volumes, function, wall thickness, the 17 "
                    "segments' contraction; not the scar)." if ceiling else "")
    return f"""## CMR-CLIP: video-report pretraining on the synthetic reports (`{command}`)

Machine: {machine()}. No GPU was lent to this task.
Default synthetic cohort (seed 0) with its reports (`SITE/reports.csv`, each site's own template and habits); trained
on site-a + site-b's studies and reports (no diagnosis label), {epochs} epochs, batch {batch}, AdamW at {cfg.train.lr:g} (preset `cmr-clip`), warm-up
then cosine; tested on all of **site-c** ({n} patients: another scanner, case mix and report
template). Seeds {seeds}; mean ± sd over seeds. Projection {cfg.model.proj}-d,
temperature {cfg.model.temperature} (fixed; learnt from there in a column so named). Text side: a byte-level transformer from random initialisation; in a
column named "negation marks" the bytes a negation covers ("No late gadolinium enhancement", "DE: none") also carry
one learned vector (`model.text_negation`, NegEx rules, a993f35; off by default). In a column named "report measurements"
the study encoder also estimates the values the report states (`model.report_measurements`: the `data.measurements`
labels.csv columns, a per-patient smooth-L1 loss beside the contrastive one; off by default). Retrieval within site-c's gallery of {n}. Zero-shot findings: mean
cosine similarity to a few positive prompts (`ccmr_core/retrieval.py`), AUC against the phantom's ground truth
(LV dysfunction EF < 50%, LV dilation EDV > 150 mL, hypertrophy max wall >= 15 mm, LGE present among patients
given contrast, RV dysfunction RVEF < 45%, regional wall-motion abnormality); in brackets positives of patients.
Second set of zero-shot rows: the same prompts minus the mean similarity to each finding's negation
(`FINDING_NEGATIVE_PROMPTS`, e.g. "no late gadolinium enhancement"; CheXzero's scoring).{ceiling_text}
Probes: fitted on the training sites' frozen study embeddings, tested on site-c.{fed_text}

{head}
{chr(10).join(rows)}
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--batch", type=int, default=32, help="patients per batch (the in-batch negatives + 1)")
    ap.add_argument("--variants", nargs="+", default=list(COLUMNS)[:2], choices=list(COLUMNS))
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--runs-only", action="store_true")
    ap.add_argument("--block", default="cmrclip", help="the BENCHMARKS.md block to write (a pilot: a block of its own)")
    ap.add_argument("--federated", action="store_true", help="add the federated column (site-a + site-b)")
    ap.add_argument("--local-epochs", type=int, default=2, help="federated: local epochs per round")
    ap.add_argument("--federated-batch", type=int, nargs="+", default=None,
                    help="federated: patients per batch at a site, one column each (default: --batch)")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ccmr-clip-"))
    print(f"work folder {work} (rerun with --workdir to resume)", flush=True)
    cohort = work / "cohort"
    generate_cohort(cohort, progress=False)
    results = {v: [run_one(work, cohort, v, s, args.epochs, args.threads, args.batch) for s in args.seeds]
               for v in args.variants}
    if args.federated:
        for b in args.federated_batch or [args.batch]:
            label = federated_label(b, args.local_epochs, args.batch)
            tag = "" if label == FEDERATED else f"-b{b}-E{args.local_epochs}"
            results[label] = [run_federated(work, cohort, s, args.epochs, args.threads, b, args.local_epochs, tag)
                              for s in args.seeds]
    if args.runs_only:
        return
    command = "python -m benchmarks.cmr_clip" + (
        " --seeds " + " ".join(map(str, args.seeds)) if args.seeds != [0, 1, 2] else "") + (
        " --variants " + " ".join(f'"{v}"' for v in args.variants) if args.variants != list(COLUMNS)[:2] else "") + (
        " --federated" + (" --federated-batch " + " ".join(map(str, args.federated_batch)) if args.federated_batch
                          else "") + (f" --local-epochs {args.local_epochs}" if args.local_epochs != 2 else "")
        if args.federated else "") + (f" --block {args.block}" if args.block != "cmrclip" else "")
    text = table(results, args.seeds, args.epochs, args.batch, args.local_epochs, lge_ceiling(cohort), command)
    update_block(args.block, text)
    print(text)


if __name__ == "__main__":
    main()
