"""The coordinator's federation folder: keys, the site registry, and how to reach the SuperLink.

    FED/federation.yaml     name, the address sites dial, listen host and port, certificate hosts
    FED/ca.crt, ca.key      the federation's certificate authority (key 0600)
    FED/superlink.crt/.key  the SuperLink's TLS certificate and key (key 0600)
    FED/sites.json          registry: per site its index, public key, node id and status
    FED/bundles/NAME/       what goes to hospital NAME: ca.crt, site.key (0600), site.pub, site.yaml
    FED/state/superlink.db  the SuperLink's database (registrations survive restarts)
    FED/flwr/               FLWR_HOME of the coordinator's own `flwr` commands (connection "ccmr")
    FED/runs/, FED/cache/   run folders and the coordinator's cache (its synthetic validation set)
    FED/logs/               superlink.log

Nothing here talks to a hospital; registration talks to the local SuperLink's Control API.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

from ccmr_core.files import write_atomic
from ccmr_core.flwr_env import DEFAULTS, child_env, flower_bin
from protocol.site_keys import BundleError, check_public_key, make_site_keys
from server import pki

CONNECTION = "ccmr"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")
DEFAULT_PORT = 9093


class FederationError(ValueError):
    """Something a coordinator can fix; the message says what."""


@dataclass
class Federation:
    root: Path
    name: str
    address: str  # host:port the sites dial
    listen_host: str
    port: int
    hosts: list[str]

    # --- paths ----------------------------------------------------------------------------------
    @property
    def ca(self) -> Path:
        return self.root / "ca.crt"

    @property
    def registry_path(self) -> Path:
        return self.root / "sites.json"

    @property
    def flwr_home(self) -> Path:
        return self.root / "flwr"

    @property
    def pid_file(self) -> Path:
        return self.root / "superlink.pid"

    @property
    def log_file(self) -> Path:
        return self.root / "logs" / "superlink.log"

    def bundle(self, site: str) -> Path:
        return self.root / "bundles" / site

    # --- registry -------------------------------------------------------------------------------
    def registry(self) -> dict:
        if not self.registry_path.is_file():
            return {"sites": {}}
        return json.loads(self.registry_path.read_text())

    def save_registry(self, reg: dict) -> None:
        write_atomic(self.registry_path, json.dumps(reg, indent=1))

    def active_sites(self) -> list[tuple[str, dict]]:
        """(name, record) of sites not revoked, by index."""
        sites = self.registry()["sites"]
        return sorted(((n, r) for n, r in sites.items() if r["status"] != "revoked"), key=lambda x: x[1]["index"])

    def site_slots(self) -> list[str]:
        """Site names by index (revoked sites keep their slot, so indices never move)."""
        sites = self.registry()["sites"]
        slots = [""] * (max((r["index"] for r in sites.values()), default=-1) + 1)
        for n, r in sites.items():
            slots[r["index"]] = n
        return slots

    # --- the coordinator's flwr CLI -------------------------------------------------------------
    def env(self) -> dict:
        # the coordinator's SuperLink always runs with the FLWR_ defaults, whatever the shell says
        forced = {k: v for k, v in DEFAULTS.items() if k.startswith("FLWR_")}
        return child_env(FLWR_HOME=str(self.flwr_home), CCMR_CACHE=str(self.root / "cache"),
                         HOME=os.environ.get("HOME", str(self.root)), **forced)

    def write_flwr_config(self) -> None:
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        write_atomic(self.flwr_home / "config.toml",
                     f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                     f'address = "127.0.0.1:{self.port}"\nroot-certificates = "{self.ca.resolve()}"\n')

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([flower_bin("flwr"), *args], env=self.env(), capture_output=True, text=True,
                              timeout=timeout, cwd=self.root)

    def flwr_json(self, *args: str, timeout: float = 120) -> dict:
        r = self.flwr(*args, "--format", "json", timeout=timeout)
        try:
            return json.loads(r.stdout)
        except ValueError:
            raise FederationError(f"`flwr {' '.join(args)}` failed: {(r.stdout + r.stderr).strip()[-800:]}") from None

    @contextlib.contextmanager
    def control_api(self):
        """A client of the SuperLink's Control API in this process (what `flwr ls` opens): a follower
        polling a long run through it starts no process per poll (a `flwr ls` costs ~1.4 s of imports)."""
        from flwr.cli.flower_config import read_superlink_connection
        from flwr.cli.utils import init_http_client_from_connection

        saved = os.environ.get("FLWR_HOME")
        os.environ["FLWR_HOME"] = str(self.flwr_home)  # where the connection to this SuperLink is configured
        try:
            client = init_http_client_from_connection(read_superlink_connection(CONNECTION))
        finally:
            if saved is None:
                os.environ.pop("FLWR_HOME", None)
            else:
                os.environ["FLWR_HOME"] = saved
        try:
            yield client
        finally:
            client.close()

    # --- the SuperLink --------------------------------------------------------------------------
    def superlink_command(self) -> list[str]:
        return [flower_bin("flower-superlink"), "--ssl-ca-certfile", str(self.ca), "--ssl-certfile",
                str(self.root / "superlink.crt"), "--ssl-keyfile", str(self.root / "superlink.key"),
                "--enable-supernode-auth", "--disable-runtime-dependency-installation",
                "--database", str(self.root / "state" / "superlink.db"), "--host", self.listen_host,
                "--port", str(self.port)]

    def is_up(self, timeout: float = 3.0) -> bool:
        """The SuperLink answers TLS on its port with the federation's certificate."""
        ctx = ssl.create_default_context(cafile=str(self.ca))
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
                with ctx.wrap_socket(s, server_hostname="127.0.0.1"):
                    return True
        except (OSError, ssl.SSLError):
            return False


def run_status(control, run_id: int) -> tuple[str, str]:
    """(status, details) of a run as `flwr ls --run-id` gives them ("finished:completed"), from a
    ``Federation.control_api()`` client; ("", "") for a run the SuperLink does not know."""
    from flwr.common.serde import run_from_proto
    from flwr.proto.control_pb2 import ListRunsRequest  # pylint: disable=E0611

    res = control.ListRuns(ListRunsRequest(run_id=run_id))
    if run_id not in res.run_dict:
        return "", ""
    st = run_from_proto(res.run_dict[run_id]).status
    return (f"{st.status}:{st.sub_status}" if st.sub_status else st.status), st.details or ""


def load(root: str | Path) -> Federation:
    root = Path(root).absolute()
    f = root / "federation.yaml"
    if not f.is_file():
        raise FederationError(f"{root} is not a federation folder (no federation.yaml); create one with "
                              f"`ccmr-server init {root} --host <name the sites dial>`")
    try:
        d = yaml.safe_load(f.read_text())
        return Federation(root, d["name"], d["address"], d["listen_host"], int(d["port"]), list(d["hosts"]))
    except (KeyError, TypeError, ValueError, yaml.YAMLError) as e:
        raise FederationError(f"{f} is damaged ({type(e).__name__}: {e}); restore it from your backup") from None


def init(root: str | Path, hosts: list[str], port: int = DEFAULT_PORT, name: str | None = None,
         listen_host: str = "127.0.0.1", force: bool = False) -> Federation:
    root = Path(root).absolute()
    if not hosts:
        raise FederationError("give at least one --host: the DNS name or IP address the hospitals will dial")
    if not 1 <= port <= 65535:
        raise FederationError(f"--port {port} is not a TCP port (1-65535)")
    for k in ("ca.key", "superlink.key"):
        if (root / k).exists() and not force:
            raise pki.KeyExists(f"{root / k} exists: {root} is already a federation; refusing to replace its keys "
                                "(pass --force to start over, which invalidates every site bundle)")
    for sub in ("bundles", "keys", "state", "runs", "cache", "logs"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    name = name or root.name
    ca_pem, ca_key = pki.make_ca(name)
    srv_pem, srv_key = pki.make_server_cert(ca_pem, ca_key, hosts)
    pki.write_private(root / "ca.key", ca_key, force)
    pki.write_public(root / "ca.crt", ca_pem, force)
    pki.write_private(root / "superlink.key", srv_key, force)
    pki.write_public(root / "superlink.crt", srv_pem, force)
    write_atomic(root / "federation.yaml", yaml.safe_dump(
        {"name": name, "address": f"{hosts[0]}:{port}", "listen_host": listen_host, "port": port,
         "hosts": hosts, "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}, sort_keys=False))
    fed = load(root)
    if force or not fed.registry_path.exists():
        fed.save_registry({"sites": {}})
    fed.write_flwr_config()
    return fed


def renew_certificate(fed: Federation, hosts: list[str] | None = None) -> Path:
    """A new SuperLink certificate from the same CA (site bundles stay valid); the old one is
    kept as superlink.crt.old. Restart the SuperLink to use it."""
    hosts = hosts or fed.hosts
    pem, key = pki.make_server_cert(fed.ca.read_bytes(), (fed.root / "ca.key").read_bytes(), hosts)
    crt = fed.root / "superlink.crt"
    shutil.copyfile(crt, fed.root / "superlink.crt.old")
    pki.write_private(fed.root / "superlink.key", key, force=True)
    pki.write_public(crt, pem, force=True)
    if hosts != fed.hosts:
        d = yaml.safe_load((fed.root / "federation.yaml").read_text())
        d["hosts"] = hosts
        write_atomic(fed.root / "federation.yaml", yaml.safe_dump(d, sort_keys=False))
    return crt


def register(fed: Federation, site: str) -> int:
    """Register a site's public key with the running SuperLink; returns its node id."""
    reg = fed.registry()
    rec = reg["sites"][site]
    out = fed.flwr_json("supernode", "register", str(fed.root / "keys" / f"{site}.pub"), CONNECTION, "--name", site)
    node_id = out.get("node-id", out.get("node_id"))
    if not out.get("success", node_id is not None) or node_id is None:
        raise FederationError(f"registering {site} failed: {out}")
    rec.update(node_id=int(node_id), status="registered")
    fed.save_registry(reg)
    return int(node_id)


def unregister(fed: Federation, node_id: int, site: str) -> None:
    r = fed.flwr("supernode", "unregister", str(node_id), CONNECTION)
    if r.returncode != 0:
        raise FederationError(f"unregistering {site}'s key (node {node_id}) failed: "
                              f"{(r.stdout + r.stderr).strip()[-800:]}")


def register_pending(fed: Federation) -> list[str]:
    """At start: unregister keys replaced while the SuperLink was down, then register new ones."""
    done = []
    for name, rec in fed.active_sites():
        for node_id in list(rec.get("retired_node_ids", [])):
            unregister(fed, node_id, name)
            reg = fed.registry()
            reg["sites"][name]["retired_node_ids"].remove(node_id)
            fed.save_registry(reg)
        if rec["status"] == "pending":
            register(fed, name)
            done.append(name)
    return done


def add_site(fed: Federation, site: str, force: bool = False, public_key: Path | None = None) -> Path:
    """Create the site's bundle and record its public key: the one the site made (``public_key``,
    ``ccmr-client keygen``; the bundle then holds no private key) or a pair made here. Register it
    now if the SuperLink is running (otherwise at the next `ccmr-server start`)."""
    given = None
    if public_key is not None:
        try:
            given = check_public_key(Path(public_key).read_bytes(), str(public_key))
        except OSError as e:
            raise FederationError(f"cannot read the site's public key {public_key}: {e.strerror}") from None
        except BundleError as e:
            raise FederationError(str(e)) from None
    if not NAME_RE.match(site):
        raise FederationError(f"site name {site!r}: use 1-40 lower-case letters, digits and '-', starting with a "
                              "letter or digit (it appears in logs, metrics and file names)")
    reg = fed.registry()
    old = reg["sites"].get(site)
    if old and old["status"] != "revoked" and not force:
        raise pki.KeyExists(f"site {site} already exists (bundle {fed.bundle(site)}); pass --force to issue it a "
                            "new key (its old key is unregistered)")
    # the old key must stop working whatever is running: unregistered now, or remembered and
    # unregistered at the next start (before any new key is registered)
    retired = list(old.get("retired_node_ids", [])) if old else []
    if old and old.get("node_id") is not None:
        if fed.is_up():
            unregister(fed, old["node_id"], site)
        else:
            retired.append(int(old["node_id"]))
    priv, pub = (None, given) if given is not None else make_site_keys()
    b = fed.bundle(site)
    b.mkdir(parents=True, exist_ok=True)
    os.chmod(b, 0o700)
    if priv is not None:
        pki.write_private(b / "site.key", priv, force=True)
    else:
        (b / "site.key").unlink(missing_ok=True)  # the site holds it; none here
    pki.write_public(b / "site.pub", pub, force=True)
    pki.write_public(fed.root / "keys" / f"{site}.pub", pub, force=True)
    shutil.copyfile(fed.ca, b / "ca.crt")
    index = old["index"] if old else len(reg["sites"])
    write_atomic(b / "site.yaml", yaml.safe_dump(
        {"federation": fed.name, "site": site, "site_index": index, "superlink": fed.address,
         "ca_certificate": "ca.crt", "private_key": "site.key",
         "issued": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}, sort_keys=False))
    reg["sites"][site] = {"index": index, "public_key": pub.decode().strip(), "node_id": None, "status": "pending",
                          "added": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                          "retired_node_ids": retired}
    fed.save_registry(reg)
    if fed.is_up():
        register(fed, site)
    return b


def remove_site(fed: Federation, site: str) -> dict:
    """Revoke a site: unregister its key at the SuperLink (now, or at the next start) and delete
    its key material from the coordinator. Its index stays reserved."""
    reg = fed.registry()
    rec = reg["sites"].get(site)
    if rec is None or rec["status"] == "revoked":
        known = ", ".join(n for n, _ in fed.active_sites()) or "none"
        raise FederationError(f"no active site {site!r} (active sites: {known})")
    keys = ([rec["node_id"]] if rec.get("node_id") is not None else []) + list(rec.get("retired_node_ids", []))
    if keys:
        if not fed.is_up():
            raise FederationError(f"the SuperLink is not running; start it (`ccmr-server start {fed.root}`) so that "
                                  f"{site}'s key can be unregistered, then remove the site")
        for node_id in keys:
            unregister(fed, node_id, site)
        rec["retired_node_ids"] = []
    rec.update(status="revoked", revoked=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    fed.save_registry(reg)
    (fed.root / "keys" / f"{site}.pub").unlink(missing_ok=True)
    shutil.rmtree(fed.bundle(site), ignore_errors=True)
    return rec
