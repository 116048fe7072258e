"""Deployment: ccmr-server / ccmr-client on loopback, with TLS and site authentication.

The unit tests build federations in a temporary folder; the integration test starts a SuperLink
and two SuperNodes as processes on 127.0.0.1 (the same entry points the container images run),
runs two rounds and stops everything it started, by PID."""

import json
import os
import signal
import shutil
import socket
import ssl
import stat
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509

from client.bundle import BundleError, check_ca, check_key, check_superlink, load_bundle
from server import federation as fedlib
from tests.loopback import LoopbackFederation
from tests.loopback import free_port as _free_port
from server.pki import KeyExists, make_server_cert


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_init_writes_owner_only_keys_and_never_replaces_them(tmp_path):
    fed = fedlib.init(tmp_path / "fed", ["fl.example.org", "10.1.2.3"], port=9093)
    for k in ("ca.key", "superlink.key"):
        assert _mode(fed.root / k) == 0o600
    cert = x509.load_pem_x509_certificate((fed.root / "superlink.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"fl.example.org", "localhost"} <= set(san.get_values_for_type(x509.DNSName))
    assert {"10.1.2.3", "127.0.0.1"} <= {str(a) for a in san.get_values_for_type(x509.IPAddress)}
    assert fed.address == "fl.example.org:9093"
    before = (fed.root / "ca.key").read_bytes()
    with pytest.raises(KeyExists, match="refusing to replace"):
        fedlib.init(tmp_path / "fed", ["other"])
    assert (fed.root / "ca.key").read_bytes() == before
    old = (fed.root / "superlink.crt").read_bytes()
    fedlib.renew_certificate(fed)  # same CA, new certificate: bundles stay valid
    assert (fed.root / "ca.key").read_bytes() == before and (fed.root / "superlink.crt").read_bytes() != old
    assert _mode(fed.root / "superlink.key") == 0o600
    fedlib.init(tmp_path / "fed", ["other"], force=True)
    assert (fed.root / "ca.key").read_bytes() != before


def test_add_and_remove_site_offline(tmp_path):
    fed = fedlib.init(tmp_path / "fed", ["localhost"], port=_free_port())
    assert fed.listen_host == "127.0.0.1"  # the control plane shares the port: closed unless asked (issue 14)
    b = fedlib.add_site(fed, "hospital-a")
    assert _mode(b / "site.key") == 0o600 and _mode(b) == 0o700
    bundle = load_bundle(b)
    assert (bundle.site, bundle.site_index, bundle.superlink) == ("hospital-a", 0, fed.address)
    assert (b / "ca.crt").read_bytes() == fed.ca.read_bytes()
    assert fed.registry()["sites"]["hospital-a"]["status"] == "pending"  # registered at the next start
    assert check_key(bundle)[0] and check_ca(bundle)[0]
    with pytest.raises(KeyExists, match="already exists"):
        fedlib.add_site(fed, "hospital-a")
    with pytest.raises(fedlib.FederationError, match="lower-case"):
        fedlib.add_site(fed, "Hospital A")
    fedlib.add_site(fed, "hospital-b")
    fedlib.remove_site(fed, "hospital-a")  # never registered: no SuperLink needed
    assert not b.exists() and not (fed.root / "keys" / "hospital-a.pub").exists()
    assert [n for n, _ in fed.active_sites()] == ["hospital-b"] and fed.site_slots() == ["hospital-a", "hospital-b"]
    with pytest.raises(fedlib.FederationError, match="no active site 'hospital-a'.*hospital-b"):
        fedlib.remove_site(fed, "hospital-a")
    with pytest.raises(fedlib.FederationError, match="not a federation folder"):
        fedlib.load(tmp_path)


class _TLSServer:
    """A stand-in SuperLink endpoint: TLS with a given certificate on a loopback port."""

    def __init__(self, cert: Path, key: Path):
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.stop = False
        self.t = threading.Thread(target=self._serve, daemon=True)
        self.t.start()

    def _serve(self):
        while not self.stop:
            try:
                c, _ = self.sock.accept()
            except OSError:
                continue
            try:
                with self.ctx.wrap_socket(c, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass

    def close(self):
        self.stop = True
        self.t.join(2)
        self.sock.close()


def test_check_says_exactly_what_is_wrong(tmp_path):
    fed = fedlib.init(tmp_path / "fed", ["localhost"], port=_free_port())
    other = fedlib.init(tmp_path / "other", ["localhost"], port=_free_port())
    srv = _TLSServer(fed.root / "superlink.crt", fed.root / "superlink.key")
    try:
        for f, p in ((fed, srv.port), (other, srv.port)):
            f.address = f"localhost:{p}"
        good = load_bundle(fedlib.add_site(fed, "hospital-a"))
        good.superlink = f"localhost:{srv.port}"
        ok, msg = check_superlink(good)
        assert ok and "reachable over TLS" in msg
        # a bundle from another federation does not trust this SuperLink
        stranger = load_bundle(fedlib.add_site(other, "hospital-x"))
        stranger.superlink = f"localhost:{srv.port}"
        ok, msg = check_superlink(stranger)
        assert not ok and "certificate does not check out" in msg
    finally:
        srv.close()
    # a certificate from the right CA but for another host name than the bundle dials
    pem, key = make_server_cert(fed.ca.read_bytes(), (fed.root / "ca.key").read_bytes(), ["fl.example.org"],
                                loopback=False)
    (tmp_path / "elsewhere.crt").write_bytes(pem)
    (tmp_path / "elsewhere.key").write_bytes(key)
    srv = _TLSServer(tmp_path / "elsewhere.crt", tmp_path / "elsewhere.key")
    try:
        good.superlink = f"127.0.0.1:{srv.port}"
        ok, msg = check_superlink(good)
        assert not ok and "does not check out" in msg and "127.0.0.1" in msg
    finally:
        srv.close()
    closed = load_bundle(good.root)
    closed.superlink = f"127.0.0.1:{_free_port()}"
    ok, msg = check_superlink(closed)
    assert not ok and "refused" in msg
    os.chmod(good.key, 0o644)
    ok, msg = check_key(good)
    assert not ok and f"chmod 600 {good.key}" in msg


def _wait_for(what: str, cond, timeout: float, lf: LoopbackFederation, *logs: str, every: float = 1.0) -> None:
    deadline = time.time() + timeout
    while not cond():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n" + "\n---\n".join(lf.log(n) for n in logs))
        time.sleep(every)


def _assert_nothing_left(lf: LoopbackFederation) -> None:
    assert lf.stubborn == [], f"{lf.stubborn} did not stop within 30 s of SIGTERM (ccmr-server / ccmr-client start)"
    deadline = time.time() + 30
    while lf.leftovers() and time.time() < deadline:
        time.sleep(1)
    assert lf.leftovers() == [], "a SuperLink or SuperNode of this test is still running"


def _rounds(run: Path) -> list[int]:
    p = run / "metrics.jsonl"
    return [json.loads(x)["round"] for x in p.read_text().splitlines()] if p.is_file() else []


@pytest.mark.timeout(900)
def test_hospitals_over_tls_survive_crashes_and_lose_no_round(cohort, tmp_path):
    """Three hospitals on loopback, TLS and site keys. One SuperNode is killed (SIGKILL, with its
    ClientApp) while round 1 trains and the round closes with the other two after its timeout (45 s); the coordinator
    (SuperLink + ServerApp) is killed after round 1, restarted, and `ccmr-server run --resume`
    finishes the run: rounds 1 and 2, each exactly once."""
    sites = {"hospital-a": cohort / "site-a", "hospital-b": cohort / "site-b", "hospital-c": cohort / "site-c"}
    run = tmp_path / "run"
    # these sites hold 5 patients each (1-2 per test split): the hospitals' default floor of 5 patients
    # per evaluation would send no test statistics at all, so the test lowers it as a site could
    with LoopbackFederation(tmp_path, sites, site_args=("--min-eval-patients", "1")) as lf:
        fed = lf.fed
        assert all(r["status"] == "registered" for r in fed.registry()["sites"].values())
        for s, data in sites.items():
            r = lf.cli("client.cli", "check", "--bundle", str(fed.bundle(s)), "--data", str(data))
            assert r.returncode == 0 and "ready to start" in r.stdout, r.stdout + r.stderr
        lf.wait_online(3)

        # the run: two rounds of the smoke preset, a round needs 2 of the 3 sites
        first = lf.run_in_background("run-1", "--preset", "smoke", "--rounds", "2", "--min-sites", "2", "--out",
                                     str(run), "--set", "validation-patients=0", "--set", "fraction-evaluate=0.0",
                                     "--set", "round-timeout=45")
        # polled often: hospital-c must die while it trains, before it can reply (a fast round would race a 1 s poll)
        _wait_for("round 1 to reach hospital-c", lambda: "Receiving: train message" in lf.log("hospital-c"), 240,
                  lf, "run-1", "hospital-c", every=0.05)
        lf.kill("hospital-c")
        _wait_for("round 1 to close without hospital-c", lambda: _rounds(run) == [1], 300, lf, "run-1")
        lf.kill("superlink")
        lf.kill("run-1")
        assert first.poll() is not None and _rounds(run) == [1]
        assert "[hospital-c] round 1" not in lf.log("hospital-c")

        lf.start_coordinator()
        lf.wait_online(2, timeout=180)
        # only the two live sites are asked now, so the round closes when both reply: a long timeout
        # costs nothing and keeps a slow, busy machine (each reply starts a ClientApp process) from
        # retrying the round
        r = lf.run("--resume", str(run), "--min-sites", "2", "--set", "round-timeout=180", timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:] + lf.log("hospital-a")
        assert "completed" in r.stdout and "after round 1 of 2" in r.stdout
        assert _rounds(run) == [1, 2]  # none lost, none repeated
        m = json.loads((run / "metrics.json").read_text())
        assert m["sites"] == ["hospital-a", "hospital-b", "hospital-c"] and m["test"]["n"] > 0
        assert m["test"]["site_n"][2] == 0 and m["test"]["site_n"][0] > 0  # hospital-c never came back
        assert (run / "model.pt").is_file() and (run / "report.html").is_file()
        # the hospitals' images never reached the coordinator: its cache holds no site data
        assert not any("site-" in p.name or "hospital" in p.name for p in (fed.root / "cache").rglob("*"))

    _assert_nothing_left(lf)


@pytest.mark.timeout(900)
def test_the_coordinator_and_each_site_open_only_their_own_files(cohort, tmp_path):
    """Issue 13: the coordinator and each hospital in folders of their own, as on separate machines
    (home, working folder, federation folder / bundle, data, cache). A run with the coordinator's
    study.yaml and a resume of its run folder: every file any process of a side opens or lists
    under the test's folder is that side's own (the coordinator sends content, never its paths)."""
    sites = {"hospital-a": cohort / "site-a", "hospital-b": cohort / "site-b"}
    with LoopbackFederation(tmp_path, sites, site_args=("--min-eval-patients", "1"), separate_roots=True) as lf:
        lf.wait_online(2)
        coordinator = lf.side_root("coordinator")
        study = coordinator / "study.yaml"
        study.write_text("train: {lr: 0.002}\n")
        run = coordinator / "runs" / "first"
        common = ("--preset", "smoke", "--set", "validation-patients=0", "--set", "validate-in=train-reply",
                  "--set", "round-timeout=180")
        r = lf.run("--config", str(study), "--rounds", "1", "--out", str(run), *common, timeout=480)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:] + lf.log("hospital-a")
        r = lf.run("--resume", str(run), "--config", str(study), "--rounds", "2", *common, timeout=480)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:] + lf.log("hospital-a")
        assert _rounds(run) == [1, 2]
    opened = lf.opened()
    assert set(opened) == {"coordinator", *sites}
    for side, paths in opened.items():
        elsewhere = sorted(str(p) for p in paths if not p.is_relative_to(lf.side_root(side)))
        assert not elsewhere, f"{side} opened another side's files: {elsewhere[:5]}"
    # the log sees what it should: each site its own data, the coordinator its study and run folder
    for s in sites:
        assert any(p.is_relative_to(lf.side_root(s) / "data") for p in opened[s]), s
    assert study in opened["coordinator"] and any(p.is_relative_to(run) for p in opened["coordinator"])
    _assert_nothing_left(lf)


def _hostile_app(dst: Path, marker: Path) -> Path:
    """A copy of this app whose ClientApp a coordinator rewrote: it leaves a mark when imported,
    sends a per-patient list with every train reply and skips the egress guard."""
    root = Path(__file__).resolve().parents[1]
    for part in ("ccmr_core", "client", "server", "protocol", "configs"):
        shutil.copytree(root / part, dst / part, ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("pyproject.toml", "README.md"):
        shutil.copy2(root / f, dst / f)
    app = dst / "client" / "client_app.py"
    text = app.read_text().replace("    metrics = {\n", '    metrics = {"patient-ids": [1.0, 2.0, 3.0],\n', 1)
    assert "patient-ids" in text
    app.write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n" + text
                   + "\n\ndef guard(reply, *args, **kwargs):\n    return reply\n")
    return dst


@pytest.mark.timeout(600)
def test_a_coordinators_own_client_code_never_runs_at_a_site(cohort, tmp_path):
    """Issue 13: a coordinator that ships a ClientApp without the egress guard, which adds a
    per-patient list to its replies, gets the sites' own code instead: nothing of its app is
    imported at a site, nothing off the allow-list leaves, and a site that pinned the code it
    reviewed refuses the run (the hash it computes from the shipped app, as data)."""
    from ccmr_core.codehash import code_hash

    marker = tmp_path / "HOSTILE-CODE-RAN"
    hostile = _hostile_app(tmp_path / "hostile-app", marker)
    reviewed = code_hash(Path(__file__).resolve().parents[1])
    assert code_hash(hostile) != reviewed
    sites = {"hospital-a": cohort / "site-a", "hospital-b": cohort / "site-b"}
    with LoopbackFederation(tmp_path, sites, site_args=("--min-eval-patients", "1"),
                            args_of={"hospital-b": ("--pin-code", reviewed)}) as lf:
        lf.wait_online(2)
        run = tmp_path / "run"
        r = lf.run("--app", str(hostile), "--preset", "smoke", "--rounds", "1", "--min-sites", "1", "--out", str(run),
                   "--set", "validation-patients=0", "--set", "fraction-evaluate=0.0", "--set", "round-timeout=120",
                   timeout=480)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:] + lf.log("hospital-a")
        assert not marker.exists(), "the coordinator's ClientApp ran at a site"
        sent = [json.loads(x) for x in (tmp_path / "cache-hospital-a" / "audit" / "hospital-a.jsonl").read_text()
                .splitlines()]
        assert sent and not any("patient" in k["key"] for e in sent for k in e["keys"])
        assert any(e["kind"] == "train" and not e["refused"] for e in sent)  # hospital-a took part with its code
        b = [json.loads(x) for x in (tmp_path / "cache-hospital-b" / "audit" / "hospital-b.jsonl").read_text()
             .splitlines()]
        assert b and all(e["refused"] and "accepts only" in e["refused"] for e in b)
        assert "answering with this site's installed code" in lf.log("hospital-a")
    _assert_nothing_left(lf)


@pytest.mark.timeout(300)
def test_strangers_plaintext_a_foreign_ca_and_revoked_sites_are_refused(cohort, tmp_path):
    """A running SuperLink with two registered sites (no training): each wrong way in is refused on
    the SuperNode's side with Flower's exit code 305 and its reason."""
    with LoopbackFederation(tmp_path, {"hospital-a": None, "hospital-b": None}, start_sites=False) as lf:
        fed = lf.fed
        # `ccmr-client start` killed outright (SIGKILL: no handler runs) takes its SuperNode with it
        client = lf.start_site("hospital-a", cohort / "site-a")
        lf.wait_online(1)
        os.kill(client.pid, signal.SIGKILL)
        client.wait(10)
        deadline = time.time() + 30
        while [x for x in lf.leftovers() if "flower-supernode" in x] and time.time() < deadline:
            time.sleep(0.5)
        assert not [x for x in lf.leftovers() if "flower-supernode" in x], "the SuperNode outlived ccmr-client"
        target = ["--superlink", f"localhost:{lf.port}", "--root-certificates", str(fed.ca)]
        stranger = load_bundle(fedlib.add_site(fedlib.init(tmp_path / "other", ["localhost"]), "rogue"))
        rc, out = lf.refused(*target, "--auth-supernode-private-key", str(stranger.key))
        assert rc != 0 and "Failed to activate SuperNode" in out, out  # a key the coordinator never registered
        rc, out = lf.refused("--superlink", f"localhost:{lf.port}", "--insecure")
        # plaintext against TLS: the server drops the connection (worded by the OS or by httpx)
        assert rc != 0 and "305" in out and ("Server disconnected" in out or "Connection reset" in out), out
        rc, out = lf.refused("--superlink", f"localhost:{lf.port}", "--root-certificates", str(stranger.ca),
                             "--auth-supernode-private-key", str(fed.bundle("hospital-a") / "site.key"))
        assert rc != 0 and "CERTIFICATE_VERIFY_FAILED" in out, out  # a SuperLink this site's CA did not sign
        # a key replaced while the SuperLink is down (issue 14: it stayed valid) stops working at the next start
        old_a = tmp_path / "hospital-a-old"
        shutil.copytree(fed.bundle("hospital-a"), old_a)
        lf.kill("superlink")
        fedlib.add_site(lf.fed, "hospital-a", force=True)
        assert lf.fed.registry()["sites"]["hospital-a"]["retired_node_ids"]
        lf.start_coordinator()
        assert lf.fed.registry()["sites"]["hospital-a"]["retired_node_ids"] == []
        rc, out = lf.refused(*target, "--auth-supernode-private-key", str(old_a / "site.key"))
        assert rc != 0 and "Failed to activate SuperNode" in out, out
        kept = tmp_path / "hospital-b-bundle"  # the hospital still holds its bundle after revocation
        shutil.copytree(fed.bundle("hospital-b"), kept)
        r = lf.cli("server.cli", "remove-site", str(fed.root), "hospital-b")
        assert r.returncode == 0 and "revoked" in r.stdout, r.stderr
        rc, out = lf.refused(*target, "--auth-supernode-private-key", str(kept / "site.key"))
        assert rc != 0 and "Failed to activate SuperNode" in out, out
        # a key registered at the SuperLink behind the federation's back is flagged by `status`
        r = lf.cli("server.cli", "status", str(fed.root))
        assert r.returncode == 0 and "STRANGER" not in r.stdout, r.stdout + r.stderr
        lf.fed.flwr_json("supernode", "register", str(tmp_path / "other" / "bundles" / "rogue" / "site.pub"),
                         fedlib.CONNECTION, "--name", "rogue")
        r = lf.cli("server.cli", "status", str(fed.root))
        assert r.returncode == 1 and "STRANGER node" in r.stdout, r.stdout + r.stderr
    _assert_nothing_left(lf)


def test_the_compose_demo_gives_each_hospital_only_its_own_bundle_and_data():
    """Issue 14 item 6: every hospital container mounted the federation volume (the CA key and every
    site's key). Now each mounts its own bundle and data read-only and a cache of its own."""
    import yaml

    compose = yaml.safe_load((Path(__file__).resolve().parents[1] / "deploy" / "compose.yaml").read_text())
    services = compose["services"]
    hospitals = [s for s in services if s.startswith("hospital-")]
    assert len(hospitals) == 3
    for name in hospitals:
        x = name.removeprefix("hospital-")
        assert sorted(services[name]["volumes"]) == sorted([f"bundle-{x}:/bundle:ro", f"data-{x}:/data:ro",
                                                            f"cache-{x}:/cache"])
    assert all(p.startswith("127.0.0.1:") for p in services["superlink"].get("ports", []))
    assert "federation:/federation" in services["superlink"]["volumes"]


def test_a_site_makes_its_own_key_and_only_the_public_half_travels(tmp_path):
    """Issue 14 item 2: the coordinator made every site's key pair, so it could impersonate a site.
    With `ccmr-client keygen` + `add-site --public-key`, the private key never leaves the site."""
    from client.bundle import keygen

    fed = fedlib.init(tmp_path / "fed", ["localhost"], port=_free_port())
    site_dir = tmp_path / "hospital-a-bundle"
    pub = keygen(site_dir)
    assert _mode(site_dir / "site.key") == 0o600
    with pytest.raises(BundleError, match="refusing to replace"):
        keygen(site_dir)
    b = fedlib.add_site(fed, "hospital-a", public_key=pub)
    assert not (b / "site.key").exists() and (b / "site.pub").read_bytes().strip() == pub.read_bytes().strip()
    assert fed.registry()["sites"]["hospital-a"]["public_key"] == pub.read_text().strip()
    assert not any(p.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY")
                   for p in fed.root.rglob("*") if p.is_file())  # no private key of the site at the coordinator
    for name in ("site.yaml", "ca.crt"):  # what the coordinator sends back
        shutil.copy(b / name, site_dir / name)
    bundle = load_bundle(site_dir)
    assert bundle.site == "hospital-a" and check_key(bundle)[0] and check_ca(bundle)[0]
    # what the coordinator refuses to register, each named
    with pytest.raises(fedlib.FederationError, match="is a private key"):
        fedlib.add_site(fed, "hospital-b", public_key=site_dir / "site.key")
    (tmp_path / "junk.pub").write_text("ssh-rsa AAAA not a key\n")
    with pytest.raises(fedlib.FederationError, match="not an OpenSSH public key"):
        fedlib.add_site(fed, "hospital-b", public_key=tmp_path / "junk.pub")
    assert "hospital-b" not in fed.registry()["sites"]


def test_the_run_follower_reads_a_failed_run_and_an_unknown_one_from_the_control_api():
    """`ccmr-server run` exits non-zero unless the run finished as completed: the status it reads
    through the Control API client (no `flwr ls` process) is Flower's "status:sub_status"."""
    from flwr.common.serde import run_to_proto
    from flwr.proto.control_pb2 import ListRunsResponse  # pylint: disable=E0611
    from flwr.supercore.run import Run, RunStatus

    class Control:
        def __init__(self, runs):
            self.runs = runs

        def ListRuns(self, req):  # noqa: N802 - Flower's API
            return ListRunsResponse(run_dict={k: run_to_proto(r) for k, r in self.runs.items() if k == req.run_id})

    failed = Run.create_empty(7)
    failed.status = RunStatus(status="finished", sub_status="failed", details="ServerApp raised")
    running = Run.create_empty(8)
    running.status = RunStatus(status="running", sub_status="", details="")
    control = Control({7: failed, 8: running})
    assert fedlib.run_status(control, 7) == ("finished:failed", "ServerApp raised")
    assert fedlib.run_status(control, 8) == ("running", "")
    assert fedlib.run_status(control, 9) == ("", "")
