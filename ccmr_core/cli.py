"""``ccmr``: the command-line tools of CC-CMR Federated.

Each subcommand lives in a small function here and calls into ccmr_core; errors a person can fix
print one line starting with ``error:`` and exit with status 2 (nothing half-written is left).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ccmr_core.config import MODEL_NAMES, ConfigError, load_config

EPILOG = """examples:
  ccmr synth --out cohort                        # 3 sites, 231 patients, seed 0
  ccmr ingest cohort/site-a --out cache/site-a   # DICOM folder -> cache + manifest.json
  ccmr train --data cohort --model cc-cmr --out runs/ccmr --test-site site-c
  ccmr evaluate --model runs/ccmr/model.pt --data cohort/site-c
  ccmr ensemble runs/s0/model.pt runs/s1/model.pt runs/s2/model.pt --data cohort --out ensemble.pt
  ccmr predict STUDY --model runs/ccmr/model.pt --out pred/   # one patient, cine only
  ccmr train --data cohort --preset cmr-clip --out runs/clip --test-site site-c  # studies + reports
  ccmr search cohort/site-c --model runs/clip/model.pt --text "dilated LV with mid-wall LGE"
"""


def _config(args):
    return load_config(getattr(args, "config", None), getattr(args, "preset", None), getattr(args, "set", None) or [])


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file with settings (see configs/default.yaml)")
    p.add_argument("--preset", help="named preset from configs/presets/ (e.g. smoke)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override one setting, e.g. --set data.ingest.size=96 (repeatable)")


def cmd_synth(args) -> int:
    from ccmr_core.synth.cohort import generate_cohort

    cfg = _config(args).data.synth
    sites = args.sites if args.sites is not None else (1 if args.external else cfg.sites)
    patients = args.patients if args.patients is not None else cfg.patients
    seed = args.seed if args.seed is not None else cfg.seed
    desc = generate_cohort(args.out, sites=sites, patients=patients, seed=seed, with_masks=args.masks,
                           workers=args.workers, force=args.force, progress=not args.quiet,
                           kind="external" if args.external else "sites")
    print(f"synthetic cohort in {Path(args.out).absolute()} (seed {seed}):")
    for s in desc["sites"]:
        mix = ", ".join(f"{k} {v}" for k, v in s["classes"].items())
        print(f"  {s['name']}: {s['patients']} patients ({mix}); {s['with_lge']} with LGE; "
              f"{s['scanner']['field_strength']} T {s['scanner']['manufacturer']}, {s['description']}")
    return 0


def cmd_ingest(args) -> int:
    from ccmr_core.data.ingest import ingest

    cfg = _config(args)
    m = ingest(args.site, args.out, cfg.data.ingest, cfg.data.classes, progress=not args.quiet,
               workers=args.workers)
    s = m["summary"]
    mix = ", ".join(f"{k} {v}" for k, v in s["classes"].items()) or "none"
    print(f"ingested {args.site}: {s['studies']} usable studies ({mix}), {s['with_lge']} with LGE, "
          f"{s['errors']} problem(s), {s['files']} files ({s['files_read']} read) in {s['seconds']} s")
    for e in m["errors"][: args.show_errors]:
        where = e.get("patient_id") or e.get("path")
        print(f"  - {where}: {e['reason']}")
    if len(m["errors"]) > args.show_errors:
        print(f"  ... {len(m['errors']) - args.show_errors} more in {Path(args.out) / 'manifest.json'}")
    return 0


def _metrics_line(m: dict) -> str:
    lo, hi = m["accuracy_ci95"]
    out = (f"accuracy {m['accuracy']:.3f} (95% CI {lo:.3f}-{hi:.3f}), macro AUC {m['macro_auc']:.3f}, "
           f"ECE {m['ece']:.3f}, n={m['n']}")
    if "uncertainty_error_auc" in m:
        out += f"; uncertainty flags errors with AUC {m['uncertainty_error_auc']:.2f}"
    return out


def cmd_train(args) -> int:
    from ccmr_core.training import train_central

    overrides = list(args.set or [])
    if args.start_from:
        cfg = _start_config(args, overrides)
    else:
        if args.model:
            overrides.append(f"model.name={args.model}")
        cfg = load_config(args.config, args.preset, overrides)
    if cfg.model.name == "cmr-clip":
        return _train_clip(args, cfg)
    m = train_central(args.data, args.out, cfg, test_site=args.test_site, progress=not args.quiet,
                      start_from=args.start_from)
    print(f"{cfg.model.name}: {'fine-tuned' if args.start_from else 'trained'} {m['epochs']} "
          f"epoch{'' if m['epochs'] == 1 else 's'}, calibration "
          f"temperature {m['calibration_temperature']:.2f}; run folder {args.out}")
    if "test" in m:
        print("test: " + _metrics_line(m["test"]))
    return 0


def _start_config(args, overrides: list[str]):
    """The config of a fine-tuning run (``--start-from``): the model file's own, then ``--set``."""
    import yaml

    from ccmr_core.checkpoint import load_classifier

    if args.model or args.config or args.preset:
        raise ConfigError("--start-from fine-tunes the file's model with the file's own config: leave out --model, "
                          "--config and --preset, and change training settings with --set (e.g. --set train.epochs=9 "
                          "--set train.lr=0.0001)")
    _, blob = load_classifier(args.start_from)
    return load_config(overrides=overrides, text=(yaml.safe_dump(blob["config"]), f"{args.start_from} (its config)"))


def _train_clip(args, cfg) -> int:
    from ccmr_core.clip_training import train_clip_run

    m = train_clip_run(args.data, args.out, cfg, args.test_site, progress=not args.quiet)
    t = m["test"]
    r = t["retrieval"]
    print(f"cmr-clip: trained on {m['n_train']} patients' studies and reports; run folder {args.out}")
    print(f"test site {m['test_site']} ({t['test_n']} patients): report -> study R@1 {r['report_to_video']['R@1']:.2f}, "
          f"R@10 {r['report_to_video']['R@10']:.2f} (chance {r['chance']['R@10']:.2f}), median rank "
          f"{r['report_to_video']['median_rank']:.0f}; linear probe accuracy {t['linear_probe']:.3f}")
    for f, v in (t.get("findings") or {}).items():
        if v["auc"] is not None:
            print(f"  zero-shot {f.replace('_', ' ')}: AUC {v['auc']:.2f} ({v['positives']} of {v['n']})")
    return 0


def cmd_search(args) -> int:
    from ccmr_core.clip_training import search

    hits = search(args.model, args.site, args.text, args.top, progress=not args.quiet)
    print(f"{len(hits)} studies of {args.site} nearest to {args.text!r}:")
    for pid, sim in hits:
        print(f"  {sim:+.3f}  {pid}")
    return 0


def cmd_evaluate(args) -> int:
    from ccmr_core.training import evaluate_saved

    m = evaluate_saved(args.model, args.data, args.out, progress=not args.quiet)
    print(f"{m['model']} on {args.data}: " + _metrics_line(m["test"]))
    return 0


def cmd_ensemble(args) -> int:
    from ccmr_core.ensemble import make_ensemble

    r = make_ensemble(args.models, args.data, args.out, force=args.force, progress=not args.quiet)
    refer = r["refer"]
    u = refer.get("uncertainty")
    print(f"ensemble of {len(r['members'])} ({', '.join(m['architecture'] for m in r['members'])}) -> {r['file']}: "
          f"validation accuracy {r['validation_accuracy']:.3f} on {r['n_val']} patients; refers below confidence "
          f"{refer['confidence']:.2f}" + (f" or above uncertainty {u:.3g}" if u is not None else ""))
    return 0


def cmd_predict(args) -> int:
    from ccmr_core.inference import predict_batch, predict_study

    if (args.study is None) == (args.batch is None):
        raise ValueError("give either one STUDY folder or --batch SITE (a folder of many studies)")
    scorer = None
    if args.findings:
        from ccmr_core.inference import FindingScorer

        scorer = FindingScorer(args.findings)
    if args.batch:
        rows = predict_batch(args.batch, args.model, args.out, force=args.force, mc_samples=args.mc,
                             progress=not args.quiet, findings=scorer)
        ok = [r for r in rows if not r.get("error")]
        print(f"{len(ok)} of {len(rows)} studies predicted, {sum(bool(r['refer']) for r in ok)} to be read by a "
              f"human (refer); {len(rows) - len(ok)} could not be read (see the error column) -> "
              f"{Path(args.out) / 'predictions.csv'}")
        return 0
    d = predict_study(args.study, args.model, args.out, force=args.force, mc_samples=args.mc, findings=scorer)
    probs = ", ".join(f"{c} {p:.2f}" for c, p in sorted(d["probabilities"].items(), key=lambda kv: -kv[1]))
    u = d["epistemic_uncertainty"]
    print(f"{d['patient_id']}: {d['predicted']} (confidence {d['confidence']:.2f}"
          f"{'' if u is None else f', epistemic uncertainty {u:.4f}'})\n  probabilities: {probs}")
    if d["refer"]:
        print("  REFER to a human reader: " + "; ".join(d["refer_reasons"]))
    else:
        print("  no referral: confidence and uncertainty are within the thresholds set on validation data")
    if "zero_shot_findings" in d:
        print("  zero-shot findings (cmr-clip similarity, not a probability): " + ", ".join(
            f"{k.replace('_', ' ')} {v:+.2f}" for k, v in d["zero_shot_findings"]["scores"].items()))
    for n in d["ingestion"]["notes"]:
        print(f"  note: {n}")
    print(f"  -> {Path(args.out) / 'prediction.json'}, {Path(args.out) / 'saliency.png'}")
    return 0


def cmd_export(args) -> int:
    from ccmr_core.export import export_model

    out = Path(args.out) if args.out else Path(args.model).with_suffix(".onnx" if args.format == "onnx" else ".ts")
    meta = export_model(args.model, args.format, out, force=args.force)
    g = meta["input"]["shape"]
    print(f"wrote {out} ({args.format}): cine float32 {tuple(g)} in [0, 1] -> probabilities for "
          f"{', '.join(meta['classes'])}; class list and preprocessing embedded (sha256 {meta['sha256'][:12]})")
    return 0


def cmd_report(args) -> int:
    from ccmr_core.report import write_report

    if not (Path(args.run) / "metrics.jsonl").is_file() and not (Path(args.run) / "metrics.json").is_file():
        raise FileNotFoundError(f"{args.run} is not a run folder (no metrics.jsonl or metrics.json)")
    print(f"wrote {write_report(args.run)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ccmr",
        description="CC-CMR Federated: gadolinium-free cardiomyopathy screening on cine cardiac MRI.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write a synthetic multi-site cine + LGE DICOM cohort",
                       description="Write a synthetic multi-centre cohort of real DICOM files: per site a "
                       "labels.csv, a biomechanics.csv and, per patient, a cine short-axis series and (for "
                       "most) an LGE series, each site with its own scanner profile and class mix. "
                       "Deterministic for a seed.")
    p.add_argument("--out", required=True, help="folder to create (refused if it holds something else)")
    p.add_argument("--sites", type=int, help="number of hospitals (default from config: 3)")
    p.add_argument("--patients", type=int, help="patients over all sites (default from config: 231)")
    p.add_argument("--seed", type=int, help="random seed (default from config: 0)")
    p.add_argument("--masks", action="store_true", help="also write ground-truth label masks (outside the DICOM tree)")
    p.add_argument("--external", action="store_true", help="one independent external site instead (another vendor, "
                   "protocol and anatomy model), for testing a trained model's generalisation")
    p.add_argument("--workers", type=int, default=None, help="processes (default: one per CPU core)")
    p.add_argument("--force", action="store_true", help="replace an existing, different cohort in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_config_args(p)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("ingest", help="turn a site's DICOM folder into the training cache",
                       description="Read every file under SITE (any layout and names), recognise each study's "
                       "cine short-axis and LGE series, resample to the configured grid and write one "
                       "compressed array file per study plus CACHE/manifest.json. Problems become entries "
                       "in the manifest's 'errors' and never stop the ingest; SITE is never modified. "
                       "Re-running only reads what changed.")
    p.add_argument("site", help="site folder with labels.csv and DICOM files")
    p.add_argument("--out", required=True, help="cache folder (outside SITE)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: data.ingest.workers or CPU cores)")
    p.add_argument("--show-errors", type=int, default=10, help="how many problems to print (all are in the manifest)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_config_args(p)
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("train", help="train a model centrally (CC-CMR, a baseline or CMR-CLIP)",
                       description="Ingest (incrementally, into ~/.cache/ccmr or $CCMR_CACHE) and train on a "
                       "cohort, a site folder or a cache: patient-level stratified split (or labels.csv's split "
                       "column, or --test-site for external testing), a fixed schedule (warm-up, cosine to zero; CC-CMR: "
                       "teacher, then student) whose final model is kept, calibrated and given referral thresholds "
                       "on the validation patients, and a run folder with config.yaml, metrics.jsonl, model.pt, "
                       "metrics.json and report.html.")
    p.add_argument("--data", required=True, help="cohort folder, site folder or cache")
    p.add_argument("--model", choices=list(MODEL_NAMES), help="model (default: config)")
    p.add_argument("--out", required=True, help="run folder to create")
    p.add_argument("--test-site", help="hold out this whole site as the external test set")
    p.add_argument("--start-from", metavar="MODEL", help="fine-tune this model.pt (e.g. the federation's, on this "
                   "site's own patients) instead of training from scratch: its last stage only, with the file's own "
                   "config changed by --set (a lower train.lr and fewer train.epochs, e.g. --set train.lr=0.0001 "
                   "--set train.epochs=9)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_config_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a saved model on other data (external validation)",
                       description="Load MODEL (model.pt), ingest DATA with the model's own grid, and report "
                       "accuracy with 95% CI, macro AUC, per-class sensitivity/specificity/F1, ECE and the "
                       "uncertainty-error relation. Writes OUT/metrics.json when --out is given.")
    p.add_argument("--model", required=True, help="model.pt from a run folder")
    p.add_argument("--data", required=True, help="cohort folder, site folder or cache")
    p.add_argument("--out", help="folder for metrics.json")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("ensemble", help="one model file from several finished runs (a deep ensemble)",
                       description="Average the calibrated probabilities of MODELS (model.pt files of runs for the "
                       "same classes and grid, trained on the same sites and split, e.g. with different "
                       "train.seed): every member reads every study, and the uncertainty also counts the members' "
                       "disagreement. Referral thresholds are set again on the validation patients of DATA (the "
                       "cohort the runs were trained on). OUT works wherever a model.pt does (evaluate, predict, "
                       "export).")
    p.add_argument("models", nargs="+", metavar="MODEL", help="two or more model.pt files")
    p.add_argument("--data", required=True, help="the cohort the members were trained on")
    p.add_argument("--out", required=True, help="the ensemble's model file (e.g. ensemble.pt)")
    p.add_argument("--force", action="store_true", help="replace --out")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_ensemble)

    p = sub.add_parser("predict", help="read one patient's cine study with a trained model",
                       description="Read STUDY (one patient's DICOM folder; cine is enough, LGE is ignored) with "
                       "MODEL, on the model's own grid. Writes OUT/prediction.json (predicted class, "
                       "probabilities, epistemic uncertainty, refer flag with the thresholds set on validation "
                       "data, model identity, ingestion notes) and OUT/saliency.png. With --batch SITE, every "
                       "study under SITE goes into OUT/predictions.csv.")
    p.add_argument("study", nargs="?", help="folder with one patient's DICOM study")
    p.add_argument("--batch", metavar="SITE", help="folder with many studies (any layout) instead of STUDY")
    p.add_argument("--model", required=True, help="model.pt from a run folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--mc", type=int, default=None, help="MC-dropout passes (default: the model's own setting)")
    p.add_argument("--findings", metavar="CLIP_MODEL", help="also score findings zero-shot with a cmr-clip model.pt "
                   "(similarities, not probabilities)")
    p.add_argument("--force", action="store_true", help="replace an earlier prediction in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("search", help="find a site's studies that match a description (cmr-clip model)",
                       description="Ingest SITE with MODEL's grid (a cmr-clip model.pt from 'ccmr train --preset "
                       "cmr-clip') and list its TOP studies nearest to TEXT in the shared study-report space. Runs "
                       "at the site: nothing of SITE is written anywhere but its ingest cache.")
    p.add_argument("site", help="site folder (or cache) to search")
    p.add_argument("--model", required=True, help="a cmr-clip model.pt")
    p.add_argument("--text", required=True, help="what to look for, e.g. 'dilated LV with mid-wall LGE'")
    p.add_argument("--top", type=int, default=5, help="how many studies to list")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("export", help="write a cine-only inference model (TorchScript or ONNX)",
                       description="Export MODEL's cine path as a stand-alone model: input cine float32 "
                       "(B, S, T, H, W) in [0, 1], output class probabilities (dropout off). The class list, "
                       "preprocessing parameters and the source model's identity are embedded (TorchScript: "
                       "extra file ccmr.json; ONNX: metadata entry 'ccmr').")
    p.add_argument("model", help="model.pt from a run folder")
    p.add_argument("--format", required=True, choices=["torchscript", "onnx"])
    p.add_argument("--out", help="output file (default: next to MODEL, .ts or .onnx)")
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("report", help="rebuild RUN/report.html from a run folder",
                       description="Rebuild the self-contained report.html (learning curves, confusion matrix, "
                       "final table) from a run folder's metrics.jsonl and metrics.json.")
    p.add_argument("run", help="run folder (central or federated)")
    p.set_defaults(func=cmd_report)
    return parser


def dispatch(args, errors: tuple[type[BaseException], ...], interrupted: str = "") -> int:
    """Run the chosen subcommand (``args.func``) of ccmr, ccmr-server or ccmr-client: an error a
    person can fix (one of ``errors``) prints one line starting with ``error:`` and gives status 2;
    Ctrl-C gives 130."""
    try:
        return int(args.func(args) or 0)
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if interrupted:
            print(interrupted, file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    args = build_parser().parse_args(argv)
    return dispatch(args, (ConfigError, ValueError, FileExistsError, FileNotFoundError),
                    "interrupted; nothing half-written was kept")


if __name__ == "__main__":
    sys.exit(main())

