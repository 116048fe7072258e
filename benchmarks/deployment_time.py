"""Round time of the same federated run in deployment (TLS, site keys, one process per
SuperNode, on 127.0.0.1) and in simulation (`flwr run .`, Ray), with the in-process Grid as the
no-framework floor, side by side on one machine; and, in the deployment, a round without the
evaluation phase and a SecAgg+ round.

    python -m benchmarks.deployment_time [--rounds 5]

The run: smoke preset (small grid and model), 3 sites of a 24-patient synthetic cohort, no
coordinator validation set. Round time = the difference of consecutive round end times in the
run's metrics.jsonl, rounds after the first (which includes start-up and each site's ingest); in
the one-phase rows (`evaluate-every` beyond the run, or `validate-in=train-reply`) also before
the last, which validates the final model in a phase of its own. Sites' compute = the sum over sites of their local training time in that round (what
the train replies report); the rest is Flower's messaging and polling, and the evaluation phase.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import numpy as np

from benchmarks.common import ROOT, machine, update_block
from ccmr_core.flwr_env import child_env
from ccmr_core.synth.cohort import generate_cohort
from tests.loopback import LoopbackFederation, free_port


def _rounds(run: Path, one_phase: bool = False) -> tuple[float, float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    ends = [r["seconds"] for r in rows]
    last = len(rows) - 1 if one_phase else len(rows)  # a one-phase run still validates its last round
    wall = np.diff(ends)[:last - 1]  # rounds 2..
    compute = [(r.get("train") or {}).get("train-seconds", 0.0) for r in rows[1:last]]
    return float(np.mean(wall)), float(np.mean(compute))


DEPLOYED = {  # row name -> (ccmr-server run --set options, one message phase per round)
    "deployment: SuperLink + 3 SuperNodes, TLS, site keys, 127.0.0.1": ((), False),
    "the same, sites validate only the final model (`evaluate-every` > rounds): one phase per round":
        (("evaluate-every=1000",), True),
    "the same, every round validated on the next round's train reply (`validate-in=train-reply`): one phase per round":
        (("validate-in=train-reply",), True),
    "the same with SecAgg+ (`secure-aggregation=true`), one phase per round":
        (("evaluate-every=1000", "secure-aggregation=true"), True),
}


def deployment(cohort: Path, work: Path, rounds: int) -> list[tuple[str, float, Path, bool]]:
    """Each of DEPLOYED in turn, in one federation (the sites' workers stay up between runs)."""
    sites = {f"hospital-{s[-1]}": cohort / s for s in ("site-a", "site-b", "site-c")}
    out = []
    with LoopbackFederation(work / "dep", sites, site_args=("--min-eval-patients", "1")) as lf:  # tiny smoke splits
        lf.wait_online(3)
        for i, (name, (sets, one_phase)) in enumerate(DEPLOYED.items()):
            run = work / f"dep-run-{i}"
            t = time.perf_counter()
            r = lf.run("--preset", "smoke", "--rounds", str(rounds), "--set", "validation-patients=0", "--no-follow",
                       *[a for kv in sets for a in ("--set", kv)], "--out", str(run), timeout=1800)
            if r.returncode:
                raise RuntimeError(r.stdout[-2000:] + r.stderr[-2000:])
            out.append((name, time.perf_counter() - t, run, one_phase))
    return out


def simulation(cohort: Path, work: Path, rounds: int) -> tuple[float, Path]:
    flwr = str(Path(sys.executable).with_name("flwr"))
    env = child_env(clean=True, FLWR_HOME=str(work / "flwr"), FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()),
                    CCMR_CACHE=str(work / "sim-cache"), RAY_TMPDIR=tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    out = work / "sim-run"
    rc = (f"preset='smoke' num-server-rounds={rounds} validation-patients=0 data-dir='{cohort}' out-dir='{out}'")
    t = time.perf_counter()
    subprocess.run([flwr, "run", ".", "--stream", "--federation-config", "num-supernodes=3", "--run-config", rc],
                   cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    while not (out / "metrics.json").is_file() and time.perf_counter() - t < 1800:
        time.sleep(1)
    wall = time.perf_counter() - t
    time.sleep(20)  # the run's local SuperLink stops itself
    shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    return wall, out


def inprocess(cohort: Path, work: Path, rounds: int) -> tuple[float, Path]:
    from client.client_app import app as client_app
    from tests.inprocess import run_inprocess
    from server.server_app import app as server_app

    rc = dict(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    out = work / "inproc-run"
    rc.update({"preset": "smoke", "num-server-rounds": rounds, "validation-patients": 0, "data-dir": str(cohort),
               "out-dir": str(out), "keep-superlink": True})
    os.environ["CCMR_CACHE"] = str(work / "inproc-cache")
    t = time.perf_counter()
    run_inprocess(server_app, client_app, 3, rc)
    return time.perf_counter() - t, out


def import_seconds(parallel: int) -> float:
    """Wall time for `parallel` fresh processes to import the ClientApp at once (what each
    SuperNode's flwr-clientapp process does for every message)."""
    t = time.perf_counter()
    ps = [subprocess.Popen([sys.executable, "-c", "import client.client_app"], cwd=ROOT) for _ in range(parallel)]
    for p in ps:
        p.wait()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ccmr-dep-", dir="/tmp"))
    cohort = work / "cohort"
    generate_cohort(cohort, sites=3, patients=24, seed=0, progress=False)
    rows, base = [], None

    def row(name, wall, run, one_phase=False):
        nonlocal base
        per_round, compute = _rounds(run, one_phase)
        base = base or per_round
        rows.append(f"| {name} | {wall:.0f} s | {per_round:.1f} s | {per_round / base:.1f}x | {compute:.1f} s | "
                    f"{per_round - compute:.1f} s |")
        print(rows[-1], flush=True)

    for name, fn in (("in-process Grid (no framework transport; floor)", inprocess),
                     ("simulation: `flwr run .`, Ray, 3 SuperNodes", simulation)):
        row(name, *fn(cohort, work, args.rounds))
    for name, wall, run, one_phase in deployment(cohort, work, args.rounds):
        row(name, wall, run, one_phase)
    one, three = import_seconds(1), import_seconds(3)
    text = f"""## Deployment vs simulation: round time of the same run (`python -m benchmarks.deployment_time`)

Machine: {machine()}.
Same run in each row: smoke preset, 3 sites (24 synthetic patients), {args.rounds} rounds of train + federated
evaluation, final test; round time from the run's metrics.jsonl, rounds after the first (one-phase rows:
and before the last, which validates the final model).

| runtime | whole run | per round | vs floor | sites' training compute per round | rest of the round |
|---|---|---|---|---|---|
{chr(10).join(rows)}

How a deployed round is made fast. Each hospital answers with one long-lived worker of its own
installed code (client/worker.py): no process per message, imports once, datasets kept in memory (a
fresh process per message would import the ClientApp for {one:.1f} s alone, {three:.1f} s with three at once on
these 2 cores, measured here). A model travels packed, as two arrays (protocol/packing.py), not as
one Flower object per tensor (142 objects for this model, each its own request, and each request
that comes before its object has arrived retried after 1, 2, 4, 8 s). The coordinator asks for
replies every 0.2 s; a site's worker asks its SuperNode for a message's content every 0.05-0.5 s.
What is left is Flower 1.41's own, hard-coded and not patched: an idle SuperNode asks the SuperLink
for work every 3 s, waits in 0.5 s steps for a reply to send, and the coordinator's Grid retries a
reply's content after 1 s when it asks before the site has finished sending; twice per round when
the sites validate every round in an evaluate phase (train, then evaluate), once with
`evaluate-every` or with `validate-in=train-reply` (each site validates the model it receives before
training on it and sends the result with its update: every round validated, one phase).
"""
    update_block("deployment", text)
    print(text)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
