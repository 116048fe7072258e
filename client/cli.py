"""``ccmr-client``: a hospital's commands (see deploy/runbook-site-it.md).

    ccmr-client keygen DIR                          this site's key pair; only DIR/site.pub goes to the coordinator
    ccmr-client prepare --data SITE                 ingest and validate the site's DICOM; sends nothing
    ccmr-client check --bundle DIR [--data SITE]    bundle, certificates, SuperLink reachability, GPU
    ccmr-client start --bundle DIR --data SITE      run the SuperNode (outbound TLS only)
    ccmr-client audit                               what has left this site, from the audit log

The site's images stay on this machine: the SuperNode dials out to the coordinator's SuperLink
and only model weights and aggregate statistics leave (DESIGN.md, privacy rules). Errors a
person can fix print one line starting with ``error:`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

from pydantic import ValidationError

from ccmr_core.cli import dispatch
from ccmr_core.config import ConfigError, load_config
from ccmr_core.flwr_env import child_env, flower_bin
from ccmr_core.proc import Stopped, dies_with, stop_group, stop_signals
from client.bundle import BundleError, check_ca, check_gpu, check_key, check_superlink, keygen, load_bundle
from client.policy import DEFAULT_MIN_EVAL_PATIENTS, PolicyError, SitePolicy, load_policy


def _config(args):
    return load_config(getattr(args, "config", None), getattr(args, "preset", None), [])


def _ingest(site: Path, cfg, quiet: bool) -> dict:
    from ccmr_core.data.ingest import ingest
    from ccmr_core.data.sources import site_cache

    if not (site / "labels.csv").is_file():
        raise BundleError(f"{site} has no labels.csv (patient_id,diagnosis[,split]); see the README's data layout")
    cache = site_cache(site, cfg)
    m = ingest(site, cache, cfg.data.ingest, cfg.data.classes, progress=not quiet)
    m["cache"] = str(cache)
    return m


def cmd_prepare(args) -> int:
    site = Path(args.data).absolute()
    cfg = _config(args)
    m = _ingest(site, cfg, args.quiet)
    s = m["summary"]
    mix = ", ".join(f"{k} {v}" for k, v in s["classes"].items()) or "none"
    cov = f"{s['with_lge']} of {s['studies']}" if s["studies"] else "0"
    print(f"{site}: {s['studies']} usable studies ({mix}); LGE for {cov}; {s['errors']} problem(s) in "
          f"{s['files']} files.\n  Nothing was sent anywhere; the cache is {m['cache']}.")
    for e in m["errors"][: args.show_errors]:
        print(f"  - {e.get('patient_id') or e.get('path')}: {e['reason']}")
    if len(m["errors"]) > args.show_errors:
        print(f"  ... {len(m['errors']) - args.show_errors} more in the cache's manifest.json")
    if s["studies"] == 0:
        print("error: no usable study; fix the problems above before joining a federation", file=sys.stderr)
        return 1
    return 0


def cmd_check(args) -> int:
    b = load_bundle(args.bundle)
    print(f"bundle for site {b.site} (index {b.site_index}) of federation {b.federation}")
    checks = [check_key(b), check_ca(b), check_superlink(b, timeout=args.timeout), check_gpu()]
    if args.data:
        d = Path(args.data)
        checks.append((d.is_dir() and (d / "labels.csv").is_file(),
                       f"data folder {d} with labels.csv" if d.is_dir() and (d / "labels.csv").is_file() else
                       f"{d} is not a site folder with labels.csv; run `ccmr-client prepare --data {d}` to see why"))
    for ok, msg in checks:
        print(f"  [{'ok' if ok else 'FAIL'}] {msg}")
    bad = sum(not ok for ok, _ in checks)
    print("ready to start" if not bad else f"{bad} problem(s): fix them, then run this check again")
    return 0 if not bad else 1


def cmd_keygen(args) -> int:
    pub = keygen(args.dir, force=args.force)
    print(f"key pair made in {Path(args.dir)} (site.key stays here, owner-only).\n  Send {pub} to the "
          "coordinator (it is public; e-mail is fine), who registers it with `ccmr-server add-site FED NAME "
          f"--public-key site.pub` and sends back site.yaml and ca.crt: put them in {Path(args.dir)}, which is "
          "then this site's bundle (`ccmr-client check --bundle ...`).")
    return 0


def cmd_audit(args) -> int:
    from client.egress import audit_path, summarize

    root = Path(args.dir) if args.dir else audit_path("x").parent
    files = [root / f"{args.site}.jsonl"] if args.site else sorted(root.glob("*.jsonl"))
    if not files:
        print(f"no audit log in {root}: nothing has left this site")
    for f in files:
        print(summarize(f))
    return 0


def site_policy(args) -> SitePolicy:
    """The policy file (--policy), with any rule also given as a flag set there instead: a rule in
    both places is refused, so that nobody wonders which one holds."""
    flags = {"require_dp": args.require_dp or None, "require_secagg": args.require_secagg or None,
             "allowed_code": [args.pin_code] if args.pin_code else None, "max_epsilon": args.max_epsilon,
             "min_eval_patients": args.min_eval_patients}
    flags = {k: v for k, v in flags.items() if v is not None}
    base = load_policy(args.policy) if args.policy else SitePolicy()
    if args.policy:
        both = sorted(k for k in flags if k in base.model_fields_set)
        if both:
            raise PolicyError(f"{args.policy} and the command line both set {', '.join(both)}; keep each rule in "
                              "one place")
    try:
        return SitePolicy.model_validate({**base.model_dump(exclude_unset=True), **flags})
    except ValidationError as e:
        raise PolicyError(f"site policy: {e.errors()[0]['loc'][0]}: {e.errors()[0]['msg']}") from None


def supernode_command(b, data: Path, port: int, policy: SitePolicy | None = None) -> list[str]:
    policy = policy or SitePolicy()
    node_config = f'data-path="{data}" site-name="{b.site}" site-index={b.site_index} {policy.node_config()}'
    # --isolation process: the SuperNode runs no app itself; the site's worker (client/worker.py)
    # answers every message with the site's installed code
    return [flower_bin("flower-supernode"), "--superlink", b.superlink, "--root-certificates", str(b.ca),
            "--auth-supernode-private-key", str(b.key), "--node-config", node_config, "--port", str(port),
            "--isolation", "process"]


def cmd_start(args) -> int:
    b = load_bundle(args.bundle)
    data = Path(args.data).absolute()
    if not (data / "labels.csv").is_file():
        raise BundleError(f"{data} is not a site folder with labels.csv; run `ccmr-client prepare --data {data}`")
    ok, msg = check_key(b)
    if not ok:
        raise BundleError(msg)
    if args.prepare:
        _ingest(data, _config(args), quiet=True)  # the first round then finds the cache ready
    env = child_env()
    policy = site_policy(args)
    cmd = supernode_command(b, data, args.port, policy)
    print(f"site {b.site}: SuperNode dialling {b.superlink} (TLS, key {b.key.name}); data {data}; local runtime "
          f"port 127.0.0.1:{args.port} (not reachable from outside). Ctrl-C stops it.", flush=True)
    # the SuperNode retries forever by default, so it reconnects when the SuperLink restarts
    # its own session (stop_group ends it with what it starts), and it ends when this process ends,
    # even by SIGKILL, so no SuperNode is left dialling the coordinator unattended
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=dies_with(os.getpid()))
    rc = None
    try:
        with stop_signals():
            from client.worker import SiteWorker

            worker = SiteWorker(f"127.0.0.1:{args.port}")
            print(f"site {b.site}: answering with this site's installed code (code hash {worker.own_hash[:16]}...), "
                  "imported once; the coordinator's app is never run here", flush=True)
            worker.serve(alive=lambda: proc.poll() is None)
            rc = proc.wait()
    except Stopped:
        rc = -signal.SIGTERM  # asked to stop: the SuperNode is stopped below, not an error
    finally:
        stop_group(proc)
    if rc not in (0, -signal.SIGTERM):
        print(f"error: the SuperNode stopped (status {rc}). If its log above says 'Exit Code: 305', it could not "
              "join: either the SuperLink refused this site's key (ask the coordinator whether the site is "
              f"registered) or TLS failed; run `ccmr-client check --bundle {b.root}` to see which", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ccmr-client", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = sub.add_parser("prepare", help="ingest and validate the site's DICOM (sends nothing)")
    s.add_argument("--data", required=True, help="site folder: labels.csv and DICOM files in any layout")
    s.add_argument("--preset", help="configs/presets/NAME.yaml (must match the federation's)")
    s.add_argument("--config", help="YAML config (must match the federation's grid)")
    s.add_argument("--show-errors", type=int, default=10)
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_prepare)
    s = sub.add_parser("check", help="check the bundle, certificates, SuperLink reachability and GPU")
    s.add_argument("--bundle", required=True)
    s.add_argument("--data", help="also check the site folder")
    s.add_argument("--timeout", type=float, default=5.0)
    s.set_defaults(func=cmd_check)
    s = sub.add_parser("keygen", help="make this site's key pair (only site.pub goes to the coordinator)")
    s.add_argument("dir", help="the folder that becomes the site's bundle")
    s.add_argument("--force", action="store_true", help="replace an existing key pair (register the new site.pub)")
    s.set_defaults(func=cmd_keygen)
    s = sub.add_parser("audit", help="summarise what this site has sent (the append-only audit log)")
    s.add_argument("--site", help="one site's log (default: all in the audit folder)")
    s.add_argument("--dir", help="audit folder (default $CCMR_CACHE/audit)")
    s.set_defaults(func=cmd_audit)
    s = sub.add_parser("start", help="run the SuperNode for this site")
    s.add_argument("--bundle", required=True)
    s.add_argument("--data", required=True)
    s.add_argument("--port", type=int, default=9094, help="local runtime port on 127.0.0.1 (default 9094)")
    s.add_argument("--prepare", action="store_true", help="ingest before connecting")
    s.add_argument("--require-dp", choices=["sample", "site"], help="take part only in runs with this DP mode")
    s.add_argument("--require-secagg", action="store_true", help="take part only in runs with secure aggregation "
                   "(SecAgg+: the coordinator sees only the sum of the sites' updates)")
    s.add_argument("--pin-code", metavar="SHA256", help="take part only in runs of this training code "
                   "(the hash `ccmr-server run` prints)")
    s.add_argument("--max-epsilon", type=float, metavar="E", help="this site's lifetime cap on patient-level DP: "
                   "epsilon over all runs together (at delta 1e-5); rounds beyond it are declined")
    s.add_argument("--policy", metavar="FILE", help="the site's rules as YAML (require_dp, require_secagg, "
                   "allowed_code, max_epsilon, min_eval_patients); kept by the site, never sent by the coordinator")
    s.add_argument("--min-eval-patients", type=int, default=None, metavar="N",
                   help="send no evaluation statistics computed on fewer than N patients (default "
                        f"{DEFAULT_MIN_EVAL_PATIENTS}): counts over one or two patients describe those patients")
    s.add_argument("--preset", help="with --prepare: the federation's preset")
    s.add_argument("--config", help="with --prepare: the federation's config")
    s.set_defaults(func=cmd_start)
    return p


def main(argv: list[str] | None = None) -> int:
    return dispatch(build_parser().parse_args(argv), (BundleError, ConfigError, ValueError, FileNotFoundError))


if __name__ == "__main__":
    sys.exit(main())
