"""A whole deployment on one machine, over 127.0.0.1: a federation folder, the SuperLink
(`ccmr-server start`) and one SuperNode per hospital (`ccmr-client start`), each a separate
process started with the same entry points the container images run. For the deployment test
and the deployment benchmark; everything it starts is ended by PID when the block exits.

    with LoopbackFederation(tmp, {"hospital-a": site_a, "hospital-b": site_b}) as lf:
        result = lf.run("--preset", "smoke", "--rounds", "2")
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from ccmr_core.flwr_env import child_env
from server import federation as fedlib

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_members(sid: int) -> list[int]:
    """Every process in session ``sid`` (each process this harness starts leads a session of its
    own, and what it starts stays in it unless it calls setsid: orphans included)."""
    out = []
    for pid in psutil.pids():
        try:
            if os.getsid(pid) == sid:
                out.append(pid)
        except OSError:
            pass
    return out


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``."""
    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


# With separate roots, every Python process of a side carries this (a sitecustomize on its path): each
# file it opens and each folder it lists under the test's folder is appended to a log of that side.
OPEN_HOOK = '''
import os, sys
_log, _watch = os.environ.get("CCMR_OPEN_LOG"), os.environ.get("CCMR_OPEN_WATCH")
_here = os.path.dirname(os.path.abspath(__file__))
if _log and _watch:
    _fd = os.open(f"{_log}-{os.getpid()}.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def _hook(event, args):
        if event in ("open", "os.listdir", "os.scandir") and args and isinstance(args[0], (str, bytes, os.PathLike)):
            path = os.path.abspath(os.fsdecode(args[0]))
            if path.startswith(_watch) and not path.startswith(_here):  # not the import system reading this
                os.write(_fd, (path + "\\n").encode())

    sys.addaudithook(_hook)
'''


class LoopbackFederation:
    stamp_lines = False  # time-stamp every output line as it arrives (benchmarks/deployment_trace.py)

    def __init__(self, work: Path, sites: dict[str, Path | None], start_timeout: float = 120, start_sites: bool = True,
                 site_args: tuple[str, ...] = (), args_of: dict[str, tuple[str, ...]] | None = None,
                 separate_roots: bool = False):
        """``sites``: name -> data folder, each registered; with ``start_sites`` each also gets a
        running SuperNode (without, the sites are only registered: e.g. to test who is refused),
        started with ``ccmr-client start ... *site_args *args_of[site]``. ``separate_roots``: the
        coordinator and each site live in folders of their own (``side_root``: home, working folder,
        the federation folder or the site's bundle, data copy and cache) and every file their
        processes open there is logged per side (``opened``), as if each were another machine."""
        self.site_args = tuple(site_args)
        self.args_of = dict(args_of or {})
        self.work = Path(work)
        self.sites = sites
        self.start_sites = start_sites
        self.start_timeout = start_timeout
        self.separate_roots = separate_roots
        self.root = self.side_root("coordinator") / "fed" if separate_roots else self.work / "fed"
        self.port = free_port()
        self.procs: list[subprocess.Popen] = []
        self.named: dict[str, subprocess.Popen] = {}
        self.stubborn: list[str] = []  # processes that had to be killed after SIGTERM and 30 s
        self._logs: list = []
        py = sys.executable
        self.py = py
        self.env = child_env(clean=True, PYTHONPATH=str(ROOT), HOME=str(self.work))
        if separate_roots:
            hook = self.work / "open-hook"
            hook.mkdir(parents=True, exist_ok=True)
            (hook / "sitecustomize.py").write_text(OPEN_HOOK)
            self.env.update(PYTHONPATH=f"{hook}:{ROOT}", CCMR_OPEN_WATCH=str(self.work.absolute()))

    # --- separate roots -------------------------------------------------------------------------
    def side_root(self, side: str) -> Path:
        """The folder of "coordinator" or of a site (its name); the shared work folder without
        separate roots."""
        return self.work / side if self.separate_roots else self.work

    def side_env(self, side: str) -> dict:
        if not self.separate_roots:
            return {}
        root = self.side_root(side)
        root.mkdir(parents=True, exist_ok=True)
        (self.work / "opened").mkdir(exist_ok=True)
        return {"HOME": str(root), "CCMR_OPEN_LOG": str(self.work / "opened" / side)}

    def opened(self) -> dict[str, set[Path]]:
        """Side -> the paths under the test's folder its processes opened or listed."""
        out: dict[str, set[Path]] = {}
        for log in (self.work / "opened").glob("*-*.log"):
            side = log.name.rsplit("-", 1)[0]
            out.setdefault(side, set()).update(Path(x) for x in log.read_text().splitlines() if x)
        return out

    # --- commands -------------------------------------------------------------------------------
    def cli(self, module: str, *args: str, timeout: float = 120, **env) -> subprocess.CompletedProcess:
        side = {**(self.side_env("coordinator") if module.startswith("server.") else {}), **env}
        return subprocess.run([self.py, "-m", module, *args], env={**self.env, **side}, capture_output=True,
                              text=True, timeout=timeout, cwd=side.get("HOME", self.work))

    def spawn(self, name: str, cmd: list[str], **env) -> subprocess.Popen:
        """Start ``cmd`` with its output in WORK/NAME.log (with ``stamp_lines``: each line prefixed
        with the time it arrived and ``name``, for merging logs into one timeline)."""
        f = open(self.work / f"{name}.log", "w", buffering=1)
        self._logs.append(f)
        # its own process group, so a test can crash it with everything it started (kill)
        p = subprocess.Popen(cmd, env={**self.env, **env}, stdout=subprocess.PIPE if self.stamp_lines else f,
                             stderr=subprocess.STDOUT, cwd=env.get("HOME", self.work), start_new_session=True,
                             text=True)
        if self.stamp_lines:
            def pump():
                for line in p.stdout:
                    f.write(f"{time.time():.3f} {name}: {line}")
            threading.Thread(target=pump, daemon=True).start()
        self.procs.append(p)
        self.named[name] = p
        return p

    def kill(self, name: str) -> None:
        """Crash a process this harness started and everything under it (SIGKILL, no chance to
        say goodbye): a SuperNode with its ClientApp, or the SuperLink with its ServerApp."""
        root = self.named[name].pid
        # stop the tree first (a stopped process cannot start another), then list it: a ClientApp
        # started between a listing and the kill would otherwise outlive its SuperNode
        frozen: list[int] = []
        while True:
            new = [p for p in [root, *descendants(root)] if p not in frozen]
            if not new:
                break
            for pid in new:
                try:
                    os.kill(pid, signal.SIGSTOP)
                except (ProcessLookupError, PermissionError):
                    pass
            frozen += new
        for pid in frozen:  # the SuperLink / SuperNode run in sessions of their own
            for kill in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
                try:
                    kill()
                except (ProcessLookupError, PermissionError):
                    pass
        self.named[name].wait(30)

    def start_coordinator(self) -> subprocess.Popen:
        n = sum(1 for k in self.named if k.startswith("superlink"))
        name = "superlink" if n == 0 else f"superlink-{n}"
        p = self.spawn(name, [self.py, "-m", "server.cli", "start", str(self.root)], **self.side_env("coordinator"))
        self.named["superlink"] = p
        want = f"sites: {', '.join(self.sites)}"
        deadline = time.time() + self.start_timeout
        while want not in self.log(name):
            if time.time() > deadline or p.poll() is not None:
                raise RuntimeError("the SuperLink did not start:\n" + self.log(name))
            time.sleep(0.5)
        return p

    def run_in_background(self, name: str, *args: str) -> subprocess.Popen:
        """``ccmr-server run`` as a process whose output goes to NAME.log."""
        return self.spawn(name, [self.py, "-m", "server.cli", "run", str(self.root), *args],
                          **self.side_env("coordinator"))

    def log(self, name: str) -> str:
        p = self.work / f"{name}.log"
        return p.read_text()[-4000:] if p.is_file() else ""

    @property
    def fed(self) -> fedlib.Federation:
        return fedlib.load(self.root)

    # --- lifecycle ------------------------------------------------------------------------------
    def __enter__(self) -> LoopbackFederation:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        r = self.cli("server.cli", "init", str(self.root), "--host", "localhost", "--port", str(self.port),
                     "--listen-host", "127.0.0.1")
        if r.returncode:
            raise RuntimeError(r.stderr)
        for s in self.sites:
            r = self.cli("server.cli", "add-site", str(self.root), s)
            if r.returncode:
                raise RuntimeError(r.stderr)
        self.start_coordinator()
        for s, data in self.sites.items():
            if self.start_sites:
                self.start_site(s, data)

    def start_site(self, site: str, data: Path) -> subprocess.Popen:
        bundle, cache = self.fed.bundle(site), self.work / f"cache-{site}"
        if self.separate_roots:  # what the site received (its bundle) and holds (its data), in its own folder
            own = self.side_root(site)
            shutil.copytree(bundle, own / "bundle", dirs_exist_ok=True)
            shutil.copytree(data, own / "data", dirs_exist_ok=True)
            bundle, data, cache = own / "bundle", own / "data", own / "cache"
        return self.spawn(site, [self.py, "-m", "client.cli", "start", "--bundle", str(bundle),
                                 "--data", str(data), "--port", str(free_port()), *self.site_args,
                                 *self.args_of.get(site, ())],
                          CCMR_CACHE=str(cache), **self.side_env(site))

    def wait_online(self, n: int, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            r = self.cli("server.cli", "status", str(self.root))
            if r.stdout.count("online") >= n:
                return
            time.sleep(2)
        raise RuntimeError(f"fewer than {n} SuperNodes online:\n{r.stdout}")

    def run(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        return self.cli("server.cli", "run", str(self.root), *args, timeout=timeout)

    def refused(self, *args: str, timeout: float = 90) -> tuple[int, str]:
        """Run a bare flower-supernode against this SuperLink with at most one retry; its exit
        status and log. Output goes to a file: its SuperExec child would hold a pipe open."""
        log = self.work / f"refused-{len(self.procs)}-{time.time_ns()}.log"
        with open(log, "w") as out:
            p = subprocess.Popen([str(Path(self.py).with_name("flower-supernode")), *args, "--max-retries", "1",
                                  "--max-wait-time", "20", "--port", str(free_port())], env=self.env, stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = p.wait(timeout)
            finally:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        return rc, log.read_text()

    def stop(self) -> None:
        # each forwards the signal to the processes it started; what is still there afterwards (a
        # ClientApp whose SuperNode went first) is ended by PID, as found before the signal
        family = [pid for p in self.procs if p.poll() is None for pid in descendants(p.pid)]
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for name, p in self.named.items():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:  # it did not stop when asked (a test asserts there are none)
                self.stubborn.append(name)
                p.kill()
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        # and whatever is left in their sessions (a ClientApp started while its SuperNode stopped)
        for pid in family + [m for p in self.procs for m in session_members(p.pid) if m != os.getpid()]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        # and a SuperNode or SuperLink of this harness in a session of its own whose parent is gone
        # (a test that failed mid-way): its command line names this harness's folder
        for line in self.leftovers():
            try:
                os.kill(int(line.split()[0]), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        for f in self._logs:
            f.close()

    def __exit__(self, *exc) -> None:
        self.stop()

    def leftovers(self) -> list[str]:
        out = subprocess.run(["pgrep", "-af", "flower-superlink|flower-supernode|flower-superexec|server.cli|client.cli"],
                             capture_output=True, text=True).stdout
        return [line for line in out.splitlines() if str(self.root) in line or str(self.work) in line]
