"""What trust costs per round: the audit logs and secure aggregation (SecAgg+), side by side.

    python -m benchmarks.trust_cost [--rounds 3] [--repeats 2] [--deployment-rounds 3]

The same train-only FedProx rounds on the default synthetic cohort (3 sites, the default model),
driven through the real ServerApp and ClientApp in one process (tests/inprocess.py), in three
modes, interleaved: a plain round with the audit logs switched off (the baseline; the product
has no such switch, the benchmark patches it out), a plain round as shipped (egress guard +
audit at the sites and at the coordinator), and a SecAgg+ round (as shipped, audited).
Per-round time is the median over rounds after the first and over repeats; bytes are what each
site's audit log says left it per train round.

Then the same comparison, plain vs SecAgg+, in a deployment on 127.0.0.1 (tests/loopback.py:
SuperLink, three SuperNodes as processes, TLS, smoke preset), where each SecAgg+ round is four
messages per site instead of one.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from tqdm import tqdm

from benchmarks.common import machine, update_block
from benchmarks.federated import run_config
from ccmr_core.config import load_config
from tests.inprocess import run_inprocess
from tests.loopback import LoopbackFederation
from server.provision import ensure_cohort

MODES = ("plain, audit off", "plain (as shipped)", "SecAgg+ (as shipped)")


@contextmanager
def audit_off(on: bool):
    import client.egress as eg
    import server.recorder as rec

    saved = eg.audit, rec.MessageAudit.record
    if not on:
        eg.audit = lambda *a, **k: None
        rec.MessageAudit.record = lambda *a, **k: None
    try:
        yield
    finally:
        eg.audit, rec.MessageAudit.record = saved


def one_run(cohort: Path, out: Path, mode: str, rounds: int, audit_dir: Path) -> tuple[list[float], float]:
    """(seconds of each round after the first, mean bytes per site per train round)."""
    import os

    from client.client_app import app as client_app
    from server.server_app import app as server_app

    os.environ["CCMR_AUDIT_DIR"] = str(audit_dir)
    rc = run_config(**{"out-dir": str(out), "data-dir": str(cohort), "keep-superlink": True,
                       "num-server-rounds": rounds, "fraction-evaluate": 0.0, "validation-patients": 0,
                       "secure-aggregation": mode.startswith("SecAgg")})
    with audit_off(mode != MODES[0]):
        run_inprocess(server_app, client_app, 3, rc)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    secs = list(np.diff([r["seconds"] for r in rows]))
    sent = [json.loads(x) for p in audit_dir.glob("*.jsonl") for x in p.read_text().splitlines()]
    train = [r for r in sent if r["run"] == out.name and r["kind"].startswith("train")]
    per_site_round = sum(r["bytes"] for r in train) / max(1, 3 * rounds)
    return secs, per_site_round


def deployment(work: Path, rounds: int) -> dict[str, float]:
    """Median seconds per round (after the first) of a plain and a SecAgg+ run, same federation."""
    from ccmr_core.synth.cohort import generate_cohort

    cohort = work / "dep-cohort"
    generate_cohort(cohort, sites=3, patients=24, seed=0, progress=False, workers=2)
    sites = {f"hospital-{s[-1]}": cohort / s for s in ("site-a", "site-b", "site-c")}
    out = {}
    with LoopbackFederation(work / "dep", sites) as lf:
        lf.wait_online(3)
        for name, secure in (("plain", "false"), ("SecAgg+", "true")):
            run = work / f"dep-{name}"
            r = lf.run("--preset", "smoke", "--rounds", str(rounds), "--no-follow", "--out", str(run),
                       "--set", "validation-patients=0", "--set", "fraction-evaluate=0.0",
                       "--set", f"secure-aggregation={secure}", timeout=3600)
            if r.returncode:
                raise RuntimeError(r.stdout[-2000:] + r.stderr[-2000:])
            ends = [json.loads(x)["seconds"] for x in (run / "metrics.jsonl").read_text().splitlines()]
            out[name] = float(np.median(np.diff(ends)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--deployment-rounds", type=int, default=3, help="0: skip the deployment comparison")
    ap.add_argument("--no-write", action="store_true", help="print, do not update BENCHMARKS.md")
    args = ap.parse_args()
    cfg = load_config()
    cohort = ensure_cohort(cfg)
    work = Path(tempfile.mkdtemp(prefix="ccmr-trust-"))
    secs: dict[str, list[float]] = {m: [] for m in MODES}
    nbytes: dict[str, float] = {}
    jobs = [(rep, m) for rep in range(args.repeats) for m in MODES]
    for rep, m in tqdm(jobs, desc="trust cost (runs)"):
        s, b = one_run(cohort, work / f"{rep}-{MODES.index(m)}", m, args.rounds, work / "audit")
        secs[m] += s
        nbytes[m] = b
    nbytes[MODES[0]] = nbytes[MODES[1]]  # the same messages; only not written down
    med = {m: float(np.median(v)) for m, v in secs.items()}
    dep = deployment(work, args.deployment_rounds) if args.deployment_rounds > 1 else None
    base = med[MODES[0]]
    rows = "\n".join(f"| {m} | {med[m]:.2f} | **{med[m] / base:.2f}** | {nbytes[m] / 1e6:.3f} | "
                     f"{nbytes[m] / nbytes[MODES[1]]:.2f} |" for m in MODES)
    text = f"""## Trust: audit logs and secure aggregation per round (`python -m benchmarks.trust_cost`)

Machine: {machine()}. Default synthetic cohort (3 sites), default model, train-only FedProx rounds
in one process; median of {args.repeats} x {args.rounds - 1} rounds (the first round of each run is
left out), modes interleaved.

| mode | s per round | ratio to plain, audit off | MB per site per train round | bytes ratio to plain |
|---|---|---|---|---|
{rows}

The SecAgg+ bytes are the four protocol messages (keys, encrypted shares, the masked update as
64-bit integers, unmasking shares) against one fp32 model.
{_dep_text(dep, args.deployment_rounds)}"""
    print(text)
    if not args.no_write:
        update_block("trust", text)


def _dep_text(dep: dict | None, rounds: int) -> str:
    if not dep:
        return ""
    return f"""
In a deployment on 127.0.0.1 (three SuperNodes as processes, TLS, smoke preset, train-only
rounds, median of {rounds - 1} rounds after the first): plain {dep['plain']:.1f} s per round, SecAgg+
{dep['SecAgg+']:.1f} s: **ratio {dep['SecAgg+'] / dep['plain']:.2f}**. There each of the four SecAgg+
messages is a separate delivery to every site (Flower's polling and a ClientApp process start
each), which is what the ratio is made of; the protocol's arithmetic is the small part above.
"""


if __name__ == "__main__":
    main()
