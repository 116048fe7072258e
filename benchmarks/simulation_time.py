"""The README's main job, `flwr run .`, over training seeds: wall time and what it ends at.

    python -m benchmarks.simulation_time [--seeds 0 1 2] [--presets default] [--cold]
    python -m benchmarks.simulation_time --seeds 0 --warm-up --run-config "local-epochs=3" "local-epochs=4" \
        --block simulation-local-epochs

Each run is the README command (one simulated SuperNode per site) with ``--run-config
"train-seed=N"``: the cohort and the patients' split stay those of seed 0, the training randomness
changes. The runs share one fresh FLWR_HOME and cache, so the first run of a preset generates the
cohort and ingests every site (as a first-time user's run does; its row says "cold") and the
others find them ready ("warm"), as a user's second run does. ``--cold`` gives every run a fresh
cache. ``--warm-up`` first makes one untimed run of one round and one local epoch, so that even the
first timed run finds the cohort ready; ``--run-config`` adds settings to every run's (a recipe
variant; several variants run in turns for each seed, side by side). Run it on a quiet machine:
the wall time is the point, and a reading of the machine's speed before and after each run says
whether the machine was in a slow or a fast hour.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT, code_version, machine, update_block
from ccmr_core.flwr_env import child_env

PORT = "39491"  # the local SuperLink's HTTP API, away from the default so a user's own is not touched


def run_once(work: Path, cache: Path, preset: str, seed: int, out: Path, extra: str = "") -> tuple[float, dict, int]:
    """One `flwr run .` (``extra``: more run-config settings); returns its wall time (s), its
    metrics.json and its rounds."""
    env = child_env(clean=True, FLWR_HOME=str(work / "flwr"), FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=PORT,
                    CCMR_CACHE=str(cache), RAY_TMPDIR=str(work))
    t = time.perf_counter()
    r = subprocess.run([str(Path(sys.executable).with_name("flwr")), "run", ".", "--stream",
                        "--federation-config", "num-supernodes=3",
                        "--run-config", f"preset='{preset}' train-seed={seed} out-dir='{out}' {extra}".strip()],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if not (out / "metrics.json").is_file():  # `flwr run` exits 0 when the run failed
        sys.exit(f"preset {preset}, seed {seed}: the run wrote no {out / 'metrics.json'}; its output ends:\n"
                 + (r.stdout + r.stderr)[-3000:])
    m = json.loads((out / "metrics.json").read_text())
    rounds = len(re.findall(r"^round \d+:", r.stdout, flags=re.M))
    time.sleep(20)  # the run's SuperLink stops itself after the run (notes/flower-1.41.md)
    return wall, m, rounds


def machine_speed() -> float:
    """Patients/s of CC-CMR teacher-stage steps on a random batch with two torch threads (the step
    rate of benchmarks.throughput, a few seconds): how fast this shared machine is at the moment.
    The same run's wall time has varied by half between hours of one day; the reading taken
    before and after each run says whether a time was a slow or a fast hour's."""
    import torch

    from benchmarks.throughput import throughput
    from ccmr_core.config import load_config

    torch.set_num_threads(2)
    return throughput(load_config(), "teacher")[0]


def row(preset: str, seed: int, cache: str, wall: float, rounds: int, m: dict, speed: tuple[float, float]) -> str:
    t, v = m["test"], m.get("server_validation") or {}
    lo, hi = t["accuracy_ci95"]
    errors = t["n"] - round(t["accuracy"] * t["n"])
    det = t.get("error_detection_auc") or {}
    detect = (f"{det['uncertainty']:.2f} / {det['confidence']:.2f}" if errors and det.get("uncertainty") is not None
              else "-")
    ref = t.get("referral")
    refer = f"{ref['referred']:.0%} / {ref['accuracy_kept']:.3f}" if ref else "-"
    val = f"{v['accuracy']:.3f} / {v['macro_auc']:.3f}" if v else "-"
    return (f"| {preset} | {seed} | {cache} | {rounds} | {wall / 60:.1f} min | {speed[0]:.1f} / {speed[1]:.1f} "
            f"| {t['accuracy']:.3f} ({lo:.2f}-{hi:.2f}) "
            f"| {t['macro_auc']:.3f} | {t['ece']:.3f} ({t['ece_floor']:.3f}) | {detect} ({errors} error{'s' * (errors != 1)}) "
            f"| {refer} "
            f"| {m['calibration_temperature']:.2f} | {val} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["default"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--cold", action="store_true", help="a fresh cache for every run (each generates and ingests)")
    ap.add_argument("--no-block", action="store_true", help="print the table, leave BENCHMARKS.md alone")
    ap.add_argument("--warm-up", action="store_true",
                    help="an untimed run of one round of one local epoch first, so every timed run is warm")
    ap.add_argument("--run-config", nargs="+", default=[""], metavar="SETTINGS",
                    help="more run-config settings for every run, e.g. 'local-epochs=4'; several: recipe variants, "
                         "run in turns for each seed ('' = the README recipe as it is)")
    ap.add_argument("--block", default="simulation",
                    help="the BENCHMARKS.md block to write (default: simulation, the README recipe's)")
    args = ap.parse_args()
    variants = args.run_config
    if any(variants) and args.block == "simulation" and not args.no_block:
        ap.error(f"--run-config {' '.join(map(repr, variants))} times variants of the README recipe; the 'simulation' "
                 "block holds the recipe itself: name a block of its own (--block NAME) or print only (--no-block)")
    commit = code_version()
    rows, summary = [], []
    for preset in args.presets:
        work = Path(tempfile.mkdtemp(prefix="ccmr-sim-", dir="/tmp"))
        results: dict[str, list] = {v: [] for v in variants}
        try:
            if args.warm_up and not args.cold:
                keep = [kv for kv in variants[0].split() if kv.split("=")[0] not in ("num-server-rounds", "local-epochs")]
                run_once(work, work / "cache", preset, args.seeds[0], work / "warm-up",
                         " ".join(keep + ["num-server-rounds=1", "local-epochs=1"]))
            first = True
            for seed in args.seeds:
                for j, variant in enumerate(variants):
                    cache = work / (f"cache-{seed}-{j}" if args.cold else "cache")
                    before = machine_speed()
                    wall, m, rounds = run_once(work, cache, preset, seed, work / f"run-{seed}-{j}", variant)
                    speed = (before, machine_speed())
                    warm = not args.cold and (not first or args.warm_up)
                    first = False
                    rows.append(row(preset + (f" ({variant})" if variant else ""), seed,
                                    "warm" if warm else "cold", wall, rounds, m, speed))
                    results[variant].append((wall, m["test"]))
                    print(rows[-1], flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        for variant, runs in results.items():
            if len(runs) < 2:
                continue
            walls = [w for w, _ in runs]
            accs, aucs, eces = ([t[k] for _, t in runs] for k in ("accuracy", "macro_auc", "ece"))
            summary.append(f"- {preset}{f' ({variant})' if variant else ''}: accuracy {statistics.mean(accs):.3f} ± "
                           f"{statistics.stdev(accs):.3f} over seeds {', '.join(map(str, args.seeds))} (lowest "
                           f"{min(accs):.3f}), macro AUC {min(aucs):.3f}-{max(aucs):.3f}, ECE {min(eces):.3f}-"
                           f"{max(eces):.3f}, wall time {min(walls) / 60:.1f}-{max(walls) / 60:.1f} min")
    flags = shlex.join(sys.argv[1:])
    title = f"`python -m benchmarks.simulation_time {flags}`" if flags else "`python -m benchmarks.simulation_time`"
    text = f"""## The README's main job (`flwr run .`) over training seeds ({title})

Machine: {machine()}. Code: commit {commit}.
`flwr run . --stream --federation-config "num-supernodes=3" --run-config "preset='P' train-seed=N"` (and the row's settings), one
simulated SuperNode per site; the cohort and the patients' split are seed 0's in every run. Cache "cold": the
run generates the cohort and ingests every site (a first run); "warm": they are ready (every later run). Test:
the held-out patients of every site, pooled; 95% CI: bootstrap over them. ECE in brackets: what a perfectly
calibrated model with the same confidences would score on this many patients. Error detection: AUROC of the
epistemic uncertainty / of low confidence for the wrong predictions. Referral: the share of test patients the
validation-set thresholds refer, and the accuracy of the rest. Coordinator: its own validation patients.
Machine speed: CC-CMR teacher-stage steps on a random batch, two threads, patients/s, just before / just after
the run (this shared machine's speed moves by hours: compare wall times at similar readings).

| preset | train seed | cache | rounds | wall time | machine speed before / after | pooled test accuracy (95% CI) | macro AUC | ECE (calibrated model's) | error detection, uncertainty / confidence | referred / accuracy of the rest | temperature | coordinator validation accuracy / AUC |
|---|---|---|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

{chr(10).join(summary)}

Targets (issue 11): the default preset in at most 15 minutes on 2 CPU cores, pooled test accuracy at least 0.90,
macro AUC at least 0.97, ECE at most 0.05.
"""
    if not args.no_block:
        update_block(args.block, text)
    print(text)


if __name__ == "__main__":
    main()
