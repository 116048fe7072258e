"""``ccmr-server``: the coordinator's commands (see deploy/runbook-coordinator.md).

    ccmr-server init FED --host fl.example.org     CA, SuperLink certificate, federation.yaml
    ccmr-server add-site FED hospital-a --public-key site.pub   registers the key the site made (ccmr-client keygen)
    ccmr-server add-site FED hospital-a            or makes the site's key pair here and puts it in the bundle
    ccmr-server remove-site FED hospital-a         unregisters and deletes the site's key
    ccmr-server start FED                          SuperLink with TLS + SuperNode auth (foreground)
    ccmr-server stop FED                           stops what `start` started
    ccmr-server run FED [--preset ...]             one federated run; exit status = run status
    ccmr-server status FED                         sites (registered / online) and runs
    ccmr-server renew-cert FED                     new SuperLink certificate, same CA

Errors a coordinator can fix print one line starting with ``error:`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import signal
import subprocess
import sys
import time

import tomli_w
from pathlib import Path

from ccmr_core.cli import dispatch
from ccmr_core.files import write_atomic
from ccmr_core.flwr_env import flower_bin
from ccmr_core.proc import Stopped, dies_with, stop_group, stop_signals
from server import federation as fedlib
from server.federation import CONNECTION, FederationError
from server.pki import KeyExists, cert_summary


def cmd_init(args) -> int:
    fed = fedlib.init(args.fed, args.host, args.port, args.name, args.listen_host, force=args.force)
    c = cert_summary(fed.ca.read_bytes())
    s = cert_summary((fed.root / "superlink.crt").read_bytes())
    print(f"federation {fed.name} in {fed.root}\n  CA valid until {c['not_after']:%Y-%m-%d}; SuperLink certificate "
          f"for {', '.join(s['hosts'])} valid until {s['not_after']:%Y-%m-%d}\n  sites will dial {fed.address}; "
          f"next: ccmr-server add-site {fed.root} <site-name>")
    return 0


def cmd_add_site(args) -> int:
    fed = fedlib.load(args.fed)
    b = fedlib.add_site(fed, args.name, force=args.force, public_key=args.public_key)
    rec = fed.registry()["sites"][args.name]
    when = f"registered (node id {rec['node_id']})" if rec["status"] == "registered" else \
        "will be registered when the SuperLink starts"
    if args.public_key:
        print(f"site {args.name}: its own public key recorded; bundle {b} ({when}).\n  Send site.yaml and ca.crt "
              f"to {args.name}'s IT to put next to the site.key they made (`ccmr-client keygen`); no private key "
              "exists here.")
    else:
        print(f"site {args.name}: bundle {b} ({when}).\n  Hand the whole folder to {args.name}'s IT over a secure "
              "channel; it holds the site's private key. Then delete your copy of site.key. (Safer: the site makes "
              "its key pair with `ccmr-client keygen` and you pass its site.pub with --public-key.)")
    return 0


def cmd_remove_site(args) -> int:
    fed = fedlib.load(args.fed)
    fedlib.remove_site(fed, args.name)
    print(f"site {args.name} revoked: its key is unregistered and can no longer connect")
    return 0


def cmd_renew_cert(args) -> int:
    fed = fedlib.load(args.fed)
    crt = fedlib.renew_certificate(fed, args.host)
    s = cert_summary(crt.read_bytes())
    print(f"new SuperLink certificate for {', '.join(s['hosts'])}, valid until {s['not_after']:%Y-%m-%d}; site bundles "
          "stay valid. Restart the SuperLink to use it.")
    return 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def cmd_start(args) -> int:
    fed = fedlib.load(args.fed)
    if fed.pid_file.is_file() and _pid_alive(int(fed.pid_file.read_text().split()[0])):
        raise FederationError(f"a SuperLink of this federation is already running (pid file {fed.pid_file})")
    if fed.is_up():
        raise FederationError(f"port {fed.port} already answers TLS with this federation's certificate; stop that "
                              "SuperLink first")
    fed.write_flwr_config()
    fed.log_file.parent.mkdir(parents=True, exist_ok=True)
    log = open(fed.log_file, "a")
    # its own process group: `stop` ends the SuperLink and the SuperExec it spawns, nothing else
    proc = subprocess.Popen(fed.superlink_command(), env=fed.env(), stdout=log, stderr=subprocess.STDOUT,
                            cwd=fed.root, start_new_session=True, preexec_fn=dies_with(os.getpid()))
    fed.pid_file.write_text(f"{os.getpid()} {proc.pid}\n")

    try:
        with stop_signals():
            return _serve(fed, proc, args.wait)
    except Stopped:
        print("SuperLink stopped", flush=True)
        return 0
    finally:
        stop_group(proc)
        fed.pid_file.unlink(missing_ok=True)


def _serve(fed, proc: subprocess.Popen, wait: float) -> int:
    """Wait for the SuperLink to answer, register pending sites, then follow it until it exits."""
    deadline = time.time() + wait
    while not fed.is_up():
        if proc.poll() is not None:
            raise FederationError(f"the SuperLink exited with status {proc.returncode}; see {fed.log_file}")
        if time.time() > deadline:
            raise FederationError(f"the SuperLink did not answer on port {fed.port} within {wait} s; see "
                                  f"{fed.log_file}")
        time.sleep(0.5)
    done = fedlib.register_pending(fed)
    active = [n for n, _ in fed.active_sites()]
    print(f"SuperLink of {fed.name} listening on {fed.listen_host}:{fed.port} (TLS, SuperNode authentication "
          f"on); sites dial {fed.address}\n  sites: {', '.join(active) or 'none yet'}"
          f"{f'; newly registered: {chr(44).join(done)}' if done else ''}\n  log: {fed.log_file}; stop with "
          f"Ctrl-C or `ccmr-server stop {fed.root}`", flush=True)
    rc = proc.wait()
    raise FederationError(f"the SuperLink exited with status {rc}; see {fed.log_file}")


def cmd_stop(args) -> int:
    fed = fedlib.load(args.fed)
    if not fed.pid_file.is_file():
        print("no SuperLink of this federation is running")
        return 0
    pid = int(fed.pid_file.read_text().split()[0])
    if _pid_alive(pid):
        os.kill(pid, signal.SIGTERM)
        for _ in range(60):
            if not _pid_alive(pid):
                break
            time.sleep(0.5)
    fed.pid_file.unlink(missing_ok=True)
    print("SuperLink stopped")
    return 0


def _app_dir(given: str | None) -> Path:
    if given:
        p = Path(given).absolute()
    else:
        p = Path(__file__).resolve().parents[1]
    if not (p / "pyproject.toml").is_file() or "[tool.flwr.app" not in (p / "pyproject.toml").read_text():
        raise FederationError(f"{p} is not the CC-CMR app folder (pyproject.toml with [tool.flwr.app]); pass --app")
    return p


def _typed(v: str):
    """A --set value as Flower's run config types it (bool, int, float or string)."""
    if v in ("true", "false"):
        return v == "true"
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v[1:-1] if len(v) >= 2 and v[0] == v[-1] and v[0] in "'\"" else v


def cmd_run(args) -> int:
    fed = fedlib.load(args.fed)
    if not fed.is_up():
        raise FederationError(f"the SuperLink is not running; start it with `ccmr-server start {fed.root}`")
    sites = fed.active_sites()
    if not sites:
        raise FederationError(f"no sites; add them with `ccmr-server add-site {fed.root} NAME`")
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    out = Path(args.out).absolute() if args.out else fed.root / "runs" / stamp
    rc = {"sites": ",".join(fed.site_slots()), "out-dir": str(out), "min-sites": args.min_sites or len(sites)}
    if args.resume:  # continue a run after its last completed round, with the config it ran with
        out = Path(args.resume).absolute()
        for f in ("checkpoint.pt", "config.yaml"):
            if not (out / f).is_file():
                raise FederationError(f"--resume {out}: no {f} there, so there is no completed round to continue "
                                      "from; start a new run instead")
        rc.update({"out-dir": str(out), "resume": str(out)})
        if not (args.preset or args.config):
            rc["config-yaml"] = (out / "config.yaml").read_text()
    if args.preset:
        rc["preset"] = args.preset
    if args.config:  # its content travels, never this machine's path (the sites could not, and must not, open it)
        try:
            rc["config-yaml"] = Path(args.config).read_text()
        except OSError as e:
            raise FederationError(f"--config {args.config}: cannot read it ({e.strerror})") from None
    if args.rounds:
        rc["num-server-rounds"] = args.rounds
    for kv in args.set or []:
        k, _, v = kv.partition("=")
        rc[k.strip()] = _typed(v.strip())
    app = _app_dir(args.app)
    from ccmr_core.codehash import code_hash

    print(f"training code SHA-256 {code_hash(app)} (what sites pin with `ccmr-client start --pin-code`)", flush=True)
    # as a TOML file: multi-line YAML content cannot travel in Flower's "k=v k=v" string
    rc_file = fed.root / "state" / f"run-config-{stamp}.toml"
    rc_file.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(rc_file, tomli_w.dumps(rc))
    sub = fed.flwr_json("run", str(app), CONNECTION, "--run-config", str(rc_file), timeout=300)
    run_id = sub.get("run-id")
    if not sub.get("success", run_id is not None) or run_id is None:
        raise FederationError(f"the run was not accepted: {sub}")
    print(f"run {run_id} started on {len(sites)} site(s) ({', '.join(n for n, _ in sites)}); run folder {out}",
          flush=True)
    if not args.no_follow:
        subprocess.run([flower_bin("flwr"), "log", str(run_id), CONNECTION, "--stream"], env=fed.env(), cwd=fed.root)
    deadline = time.time() + args.timeout
    status = details = ""
    with fed.control_api() as control:  # in this process: no process per poll
        while time.time() < deadline:
            status, details = fedlib.run_status(control, int(run_id))
            if status.startswith("finished"):
                break
            time.sleep(1.0)
    if status != "finished:completed":
        print(f"error: run {run_id} ended as {status or 'unknown (timed out)'} {details}".rstrip(), file=sys.stderr)
        return 1
    print(f"run {run_id} completed; results in {out} (metrics.json, report.html, model.pt)")
    return 0


def cmd_status(args) -> int:
    fed = fedlib.load(args.fed)
    up = fed.is_up()
    print(f"federation {fed.name} ({fed.root}): SuperLink {'running' if up else 'NOT running'} on port {fed.port}")
    nodes = {}
    if up:
        for n in fed.flwr_json("supernode", "ls", CONNECTION).get("nodes", []):
            nodes[int(n.get("node-id", n.get("node_id", -1)))] = n
    sites = fed.registry()["sites"]
    for name, rec in sorted(sites.items(), key=lambda x: x[1]["index"]):
        node = nodes.get(rec.get("node_id") or -1, {})
        state = node.get("status", "") if node else ""
        print(f"  {name:<20} {rec['status']:<11} node {rec.get('node_id') or '-':<22} {state}")
    # what the SuperLink has that the registry does not: a key registered behind the coordinator's back
    ours = {rec.get("node_id") for rec in sites.values() if rec["status"] == "registered"}
    strangers = [(nid, n) for nid, n in nodes.items() if nid not in ours and n.get("status") != "unregistered"]
    for nid, n in strangers:
        print(f"  STRANGER node {nid} ({n.get('status', '?')}): registered at the SuperLink but not by this "
              f"federation; unregister it (flwr supernode unregister {nid}) and check who can reach the port "
              f"(listen host {fed.listen_host})")
    if up:
        for r in fed.flwr_json("ls", CONNECTION).get("runs", [])[-5:]:
            print(f"  run {r.get('run-id')}: {r.get('status')} (since {r.get('created-at', '')})")
    return 1 if strangers else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ccmr-server", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = sub.add_parser("init", help="create a federation folder: CA, SuperLink certificate, config")
    s.add_argument("fed", help="federation folder to create")
    s.add_argument("--host", action="append", required=True,
                   help="DNS name or IP the hospitals dial (repeatable; the first is put in the site bundles)")
    s.add_argument("--port", type=int, default=fedlib.DEFAULT_PORT, help="SuperLink port (default 9093)")
    s.add_argument("--name", help="federation name (default: folder name)")
    s.add_argument("--listen-host", default="127.0.0.1",
                   help="interface the SuperLink binds (default 127.0.0.1). Flower 1.41 serves its Control API, "
                        "which has no user authentication, on the same port as the sites' Fleet API: expose "
                        "only /v1/fleet through a proxy (deploy/nginx-fleet-only.conf). 0.0.0.0 opens the "
                        "control plane to anyone who can reach the port")
    s.add_argument("--force", action="store_true", help="replace existing keys (invalidates every site bundle)")
    s.set_defaults(func=cmd_init)
    s = sub.add_parser("add-site", help="create a site's key pair and bundle and register it")
    s.add_argument("fed")
    s.add_argument("name", help="site name, e.g. hospital-a")
    s.add_argument("--force", action="store_true", help="issue a new key to an existing site (rotation)")
    s.add_argument("--public-key", metavar="SITE_PUB", help="the site.pub the site made (`ccmr-client keygen`): "
                   "only the public key travels, the coordinator never holds the site's private key")
    s.set_defaults(func=cmd_add_site)
    s = sub.add_parser("remove-site", help="revoke a site's key")
    s.add_argument("fed")
    s.add_argument("name")
    s.set_defaults(func=cmd_remove_site)
    s = sub.add_parser("renew-cert", help="issue a new SuperLink certificate from the same CA")
    s.add_argument("fed")
    s.add_argument("--host", action="append", help="host names / IPs (default: those given to init)")
    s.set_defaults(func=cmd_renew_cert)
    s = sub.add_parser("start", help="run the SuperLink (TLS, SuperNode auth, state in FED/state) in the foreground")
    s.add_argument("fed")
    s.add_argument("--wait", type=float, default=90, help="seconds to wait for the SuperLink to answer")
    s.set_defaults(func=cmd_start)
    s = sub.add_parser("stop", help="stop the SuperLink started by `start`")
    s.add_argument("fed")
    s.set_defaults(func=cmd_stop)
    s = sub.add_parser("run", help="launch a federated run, follow it, exit non-zero if it failed")
    s.add_argument("fed")
    s.add_argument("--preset", help="configs/presets/NAME.yaml (e.g. smoke)")
    s.add_argument("--config", help="YAML config file (absolute or relative to here)")
    s.add_argument("--rounds", type=int, help="federated rounds")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="any run-config key (repeatable)")
    s.add_argument("--min-sites", type=int, help="sites a round needs (default: all active sites)")
    s.add_argument("--out", help="run folder (default FED/runs/<time>)")
    s.add_argument("--resume", metavar="RUN_FOLDER", help="continue this run after its last completed round "
                   "(weights, round count, privacy ledgers), e.g. after the coordinator was restarted")
    s.add_argument("--app", help="the CC-CMR app folder (default: this installation's)")
    s.add_argument("--no-follow", action="store_true", help="do not stream the run's log")
    s.add_argument("--timeout", type=float, default=24 * 3600, help="give up waiting after this many seconds")
    s.set_defaults(func=cmd_run)
    s = sub.add_parser("status", help="sites (registered, online) and recent runs")
    s.add_argument("fed")
    s.set_defaults(func=cmd_status)
    return p


def main(argv: list[str] | None = None) -> int:
    return dispatch(build_parser().parse_args(argv), (FederationError, KeyExists, FileNotFoundError))


if __name__ == "__main__":
    sys.exit(main())
