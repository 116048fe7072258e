"""Round time against the number of simulated sites: `flwr run .` (Flower's Ray simulation) on
this machine, 3 to 100 small sites.

    python -m benchmarks.scaling [--sites 3 10 30 100] [--patients-per-site 6] [--rounds 5]

Each size gets a fresh FLWR_HOME and cache: a synthetic cohort of N small sites (the smoke grid
and model, so the framework's share is visible), one SuperNode per site, train-only rounds
(no per-round evaluation, no coordinator validation set). Round time comes from the run's
metrics.jsonl; the first two rounds are left out (the first one ingests every site's DICOM).
Each round is split into the sites' own training compute (the train-seconds they report) and
the rest (Ray scheduling, messages, the ClientApp's set-up per message, aggregation).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import ROOT, machine, update_block
from ccmr_core.flwr_env import child_env


def one(n: int, per_site: int, rounds: int, port: int) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"ccmr-scale{n}-", dir="/tmp"))
    env = child_env(clean=True, FLWR_HOME=str(work / "flwr"), FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(port),
                    CCMR_CACHE=str(work / "c"), RAY_TMPDIR=str(work))
    flwr = str(Path(sys.executable).with_name("flwr"))
    rc = (f"preset='smoke' synthetic-sites={n} synthetic-patients={n * per_site} num-server-rounds={rounds} "
          f"fraction-evaluate=0.0 validation-patients=0 min-sites={n} out-dir='{work / 'run'}'")
    t = time.perf_counter()
    r = subprocess.run([flwr, "run", ".", "--stream", "--federation-config", f"num-supernodes={n}", "--run-config", rc],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    rows = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()] \
        if (work / "run" / "metrics.jsonl").is_file() else []
    if len(rows) < rounds:
        raise RuntimeError(f"{n} sites: the run did not complete ({len(rows)} of {rounds} rounds)\n{r.stdout[-3000:]}")
    ends = np.array([row["seconds"] for row in rows])
    per_round = np.diff(ends)[1:]  # rounds 3.. (round 1 ingests, round 2 is the first diff's baseline)
    compute = np.array([row["train"]["train-seconds"] for row in rows])[2:]
    time.sleep(20)  # the run's SuperLink stops itself after the run
    shutil.rmtree(work, ignore_errors=True)
    return {"n": n, "wall": wall, "round": float(per_round.mean()), "compute": float(compute.mean()),
            "first": float(ends[0])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", type=int, nargs="+", default=[3, 10, 30, 100])
    ap.add_argument("--patients-per-site", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    res = []
    for k, n in enumerate(args.sites):
        res.append(one(n, args.patients_per_site, args.rounds, 39591 + k))
        print(res[-1], flush=True)
    rows = [f"| {r['n']} | {r['n'] * args.patients_per_site} | {r['round']:.1f} | {r['round'] / r['n']:.2f} "
            f"| {r['compute']:.1f} | {r['round'] - r['compute']:.1f} | {(r['round'] - r['compute']) / r['n']:.2f} "
            f"| {r['first'] / 60:.1f} | {r['wall'] / 60:.1f} |" for r in res]
    text = f"""## Round time against the number of sites (`python -m benchmarks.scaling`)

Machine: {machine()}.
`flwr run .` (Flower's Ray simulation, one SuperNode per site, default client resources: one ClientApp at a time on
the 2 cores), smoke model and grid, {args.patients_per_site} synthetic patients per site, train-only rounds (no
per-round evaluation, no coordinator validation); rounds 3 to {args.rounds} averaged (round 1 ingests every site).

| sites | patients | s per round | s per round per site | sites' training compute (s) | rest of the round (s) | rest per site (s) | round 1, with ingest (min) | whole run (min) |
|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}
"""
    update_block("scaling", text)
    print(text)


if __name__ == "__main__":
    main()
