"""Where a deployed round's time goes: the deployment benchmark's run (SuperLink + 3 SuperNodes,
TLS, 127.0.0.1, smoke preset) with every process's output time-stamped and each of Flower's object
transfers timed, for reading, not for a BENCHMARKS block.

    python -m benchmarks.deployment_trace [--rounds 3] [--out DIR] [--set KEY=VALUE ...]

Every process the federation starts (SuperLink, ServerApp, SuperNodes, the sites' workers) runs
with a ``sitecustomize`` on its path that wraps Flower 1.41's ``pull_objects`` and
``push_object_contents_from_iterable`` (in memory, in those processes only; the installed package
is not changed) and appends one line per transfer to DIR/traces: how many objects, how many
requests found an object not there yet (each such request is retried after Flower's back-off),
and how long it took. Printed: the round times and, per process kind, the transfers' counts and
durations; DIR/timeline.log holds all processes' output merged by time.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
from collections import defaultdict
from pathlib import Path

from ccmr_core.synth.cohort import generate_cohort
from tests.loopback import LoopbackFederation

SITECUSTOMIZE = '''
import os, sys, time
_DIR = os.environ.get("CCMR_TRACE_DIR")
def _write(msg):
    with open(os.path.join(_DIR, f"trace-{os.getpid()}.log"), "a") as f:
        f.write(f"{time.time():.3f} {os.path.basename(sys.argv[0])} {msg}\\n")
if _DIR:
    from flwr.supercore.inflatable import inflatable_utils as _iu
    _pull, _push = _iu.pull_objects, _iu.push_object_contents_from_iterable
    def pull_objects(object_ids, pull_object_fn, *a, **k):
        ids, seen = list(object_ids), {"requests": 0, "unavailable": 0}
        def fn(oid):
            seen["requests"] += 1
            try:
                return pull_object_fn(oid)
            except _iu.ObjectUnavailableError:
                seen["unavailable"] += 1
                raise
        t = time.time()
        try:
            return _pull(ids, fn, *a, **k)
        finally:
            _write(f"pull objects={len(ids)} requests={seen['requests']} unavailable={seen['unavailable']} "
                   f"seconds={time.time() - t:.3f}")
    def push_object_contents_from_iterable(*a, **k):
        t = time.time()
        try:
            return _push(*a, **k)
        finally:
            _write(f"push seconds={time.time() - t:.3f}")
    _iu.pull_objects, _iu.push_object_contents_from_iterable = pull_objects, push_object_contents_from_iterable
'''
KINDS = {"flwr-serverapp": "coordinator (ServerApp)", "flower-supernode": "SuperNode", "cli.py": "site worker"}


class TracedFederation(LoopbackFederation):
    """A LoopbackFederation whose processes carry the tracing sitecustomize and whose output lines
    are time-stamped as they arrive."""

    stamp_lines = True

    def __init__(self, work: Path, sites: dict, **kw):
        super().__init__(work, sites, **kw)
        self.traces = self.work / "traces"
        self.traces.mkdir(parents=True, exist_ok=True)
        hook = self.work / "hook"
        hook.mkdir(exist_ok=True)
        (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
        self.env.update(PYTHONPATH=f"{hook}:{self.env['PYTHONPATH']}", CCMR_TRACE_DIR=str(self.traces),
                        PYTHONUNBUFFERED="1")


def summary(traces: Path) -> list[str]:
    rows: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for p in traces.glob("trace-*.log"):
        for line in p.read_text().splitlines():
            _, proc, what, *kv = line.split()
            rows[(KINDS.get(proc, proc), what)].append({k: float(v) for k, v in (x.split("=") for x in kv)})
    out = ["| process | transfer | count | objects (median) | requests that found an object not there yet | "
           "seconds (median) | seconds (max) |", "|---|---|---|---|---|---|---|"]
    for (kind, what), rs in sorted(rows.items()):
        secs = [r["seconds"] for r in rs]
        pull = what == "pull"
        objs = f"{statistics.median(r['objects'] for r in rs):g}" if pull else "-"
        unav = int(sum(r.get("unavailable", 0) for r in rs)) if pull else "-"
        out.append(f"| {kind} | {what} | {len(rs)} | {objs} | {unav} | "
                   f"{statistics.median(secs):.2f} | {max(secs):.2f} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None, help="work folder (default: a new one under /tmp)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a run-config key for the run (repeatable), e.g. secure-aggregation=true")
    args = ap.parse_args()
    work = Path(args.out or tempfile.mkdtemp(prefix="ccmr-trace-", dir="/tmp")).absolute()
    cohort = work / "cohort"
    if not cohort.exists():
        generate_cohort(cohort, sites=3, patients=24, seed=0, progress=False)
    sites = {f"hospital-{s[-1]}": cohort / s for s in ("site-a", "site-b", "site-c")}
    with TracedFederation(work / "dep", sites, site_args=("--min-eval-patients", "1")) as lf:
        lf.wait_online(3)
        r = lf.run("--preset", "smoke", "--rounds", str(args.rounds), "--set", "validation-patients=0", "--no-follow",
                   *[a for kv in args.set for a in ("--set", kv)], "--out", str(work / "run"), timeout=1800)
        if r.returncode:
            raise SystemExit(r.stdout[-2000:] + r.stderr[-2000:])
    lines = sorted(x for p in (work / "dep").glob("*.log") for x in p.read_text().splitlines()
                   if re.match(r"^\d+\.\d+ ", x))
    (work / "timeline.log").write_text("\n".join(lines) + "\n")
    ends = [json.loads(x)["seconds"] for x in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    print(f"rounds end at {', '.join(f'{e:.1f}' for e in ends)} s; per round after the first: "
          f"{', '.join(f'{b - a:.1f}' for a, b in zip(ends, ends[1:]))} s")
    print("\n".join(summary(work / "dep" / "traces")))
    print(f"all processes' output, merged by time: {work / 'timeline.log'}")


if __name__ == "__main__":
    main()
