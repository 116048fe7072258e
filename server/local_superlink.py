"""Stop the local simulation SuperLink that ``flwr run`` started for this run, once the run is over.

``flwr run .`` starts a detached ``flower-superlink --simulation`` and leaves it running (Flower
1.41 has no command to stop it). When the ServerApp runs under such a SuperLink (an ancestor
process with ``--simulation`` whose log file is ``$FLWR_HOME/local-superlink/superlink.log``), it
hands a small detached watcher the SuperLink's PID: the watcher waits until this ServerApp's
process has exited and the CLI has had time to read the final status, then ends that PID (its
SuperExec follows via ``--parent-pid``). Deployment SuperLinks are never touched, and
``keep-superlink=true`` in the run config turns this off.
"""

from __future__ import annotations

import os
import subprocess
import sys

import psutil

_WATCHER = r"""
import sys, time
import psutil
sl, app, grace = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
def alive(p):  # a zombie (exited, not yet reaped by its parent) counts as gone
    try:
        return psutil.Process(p).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
deadline = time.time() + 6 * 3600
while alive(app) and time.time() < deadline:
    time.sleep(0.5)
time.sleep(grace)
if alive(sl):
    p = psutil.Process(sl)
    p.terminate()
    if not psutil.wait_procs([p], timeout=10)[0]:
        p.kill()
"""


def _cmdline(pid: int) -> list[str]:
    try:
        return psutil.Process(pid).cmdline()
    except psutil.Error:
        return []


def _parent(pid: int) -> int:
    try:
        return psutil.Process(pid).ppid()
    except psutil.Error:
        return 0


def auto_started_superlink(start: int | None = None) -> int | None:
    """PID of the `flwr run`-managed local simulation SuperLink above this process, if any."""
    pid = start or os.getpid()
    for _ in range(12):
        pid = _parent(pid)
        if pid <= 1:
            return None
        cmd = _cmdline(pid)
        if any(c.endswith("flower-superlink") for c in cmd[:2]) and "--simulation" in cmd and "--log-file" in cmd:
            log_file = cmd[cmd.index("--log-file") + 1] if cmd.index("--log-file") + 1 < len(cmd) else ""
            if log_file.endswith(os.path.join("local-superlink", "superlink.log")):
                return pid
    return None


def schedule_stop_if_auto_started(grace_s: float = 15.0) -> int | None:
    pid = auto_started_superlink()
    if pid is None:
        return None
    subprocess.Popen([sys.executable, "-c", _WATCHER, str(pid), str(os.getpid()), str(grace_s)],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True, close_fds=True)
    print(f"the local simulation SuperLink started by `flwr run` (pid {pid}) stops {grace_s:.0f} s after this run "
          "ends; run with --run-config \"keep-superlink=true\" to keep it", flush=True)
    return pid
