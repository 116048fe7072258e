"""Wall time of the README's main command, `flwr run .`, from a cold cache, default and smoke.

    python -m benchmarks.simulation_time [--presets default smoke]

Each run gets its own FLWR_HOME, cache and port, so it starts the local SuperLink, generates the
cohort, ingests every site and trains, exactly as a first-time user's run does.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT, machine, update_block
from ccmr_core.flwr_env import child_env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["smoke", "default"])
    args = ap.parse_args()
    flwr = str(Path(sys.executable).with_name("flwr"))
    rows = []
    for preset in args.presets:
        work = Path(tempfile.mkdtemp(prefix="ccmr-sim-", dir="/tmp"))
        env = child_env(clean=True, FLWR_HOME=str(work / "flwr"), FLWR_LOCAL_SUPERLINK_HTTP_API_PORT="39491",
                        CCMR_CACHE=str(work / "c"), RAY_TMPDIR=str(work))
        t = time.perf_counter()
        r = subprocess.run([flwr, "run", ".", "--stream", "--federation-config", "num-supernodes=3",
                            "--run-config", f"preset='{preset}' out-dir='{work / 'run'}'"],
                           cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t
        test = json.loads((work / "run" / "metrics.json").read_text())["test"]
        rounds = len(re.findall(r"^round \d+:", r.stdout, flags=re.M))
        rows.append(f"| `flwr run . --federation-config \"num-supernodes=3\" --run-config \"preset='{preset}'\"` | "
                    f"{rounds} | {wall / 60:.1f} min | "
                    f"{test['accuracy']:.3f} | {test['macro_auc']:.3f} |")
        print(rows[-1], flush=True)
        time.sleep(20)  # the run's SuperLink stops itself after the run
        shutil.rmtree(work, ignore_errors=True)
    text = f"""## `flwr run .` wall time from a cold cache (`python -m benchmarks.simulation_time`)

Machine: {machine()}.
Fresh FLWR_HOME and cache per run: SuperLink start, cohort generation, every site's ingest, Ray
start-up, training, final test; one simulated SuperNode per site (the README's main command).

| command | rounds | wall time | test accuracy | macro AUC |
|---|---|---|---|---|
{chr(10).join(rows)}

Targets: default under 15 minutes, smoke under 2 minutes, on 2 CPU cores.
"""
    update_block("simulation", text)
    print(text)


if __name__ == "__main__":
    main()
