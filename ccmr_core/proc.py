"""Process helpers: worker pools (cohort generation, ingestion) whose workers never run their
parent's signal handlers, and ending a child process together with what it started.

A forked worker inherits its parent's Python signal handlers. Inside a Flower app those handlers
report the *whole run* as finished and failed to the SuperLink, so a worker that ran one when its
pool was closed (``Pool.terminate`` sends SIGTERM to every worker) would end the run its parent is
still doing. Resetting the handlers in the worker's initializer leaves a window between the fork
and the reset; so the signals are blocked in the forking thread while the pool forks, the worker
resets its handlers to the defaults first thing and only then unblocks them. A SIGTERM that
arrives in between waits, then ends the worker the plain way.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from contextlib import contextmanager

_SIGNALS = {signal.SIGTERM, signal.SIGINT} | ({signal.SIGQUIT} if hasattr(signal, "SIGQUIT") else set())


def _worker_init(user_init) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    if hasattr(signal, "SIGQUIT"):
        signal.signal(signal.SIGQUIT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
    try:
        os.nice(10)  # yield the CPU to the parent, which must keep heartbeating inside a Flower app
    except OSError:  # pragma: no cover - not permitted on some systems
        pass
    if user_init is not None:
        user_init()


@contextmanager
def worker_pool(ctx, processes: int, initializer=None):
    """``ctx.Pool(processes)`` as a context manager (terminated on exit), safe as described above."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        pool = ctx.Pool(processes, initializer=_worker_init, initargs=(initializer,))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    with pool:
        yield pool


def dies_with(parent_pid: int):
    """A ``preexec_fn`` for a child that must not outlive ``parent_pid`` even when the parent is
    killed with SIGKILL and cannot stop it (Linux: the kernel sends the child SIGTERM, which a
    SuperNode or SuperLink handles by stopping what it started). Elsewhere: nothing."""

    def _set() -> None:
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # pragma: no cover - not Linux
            return
        if os.getppid() != parent_pid:  # the parent died before the request took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return _set


class Stopped(Exception):
    """SIGTERM or SIGINT arrived while ``stop_signals`` was in effect."""


@contextmanager
def stop_signals():
    """SIGTERM and SIGINT raise :class:`Stopped` in the main thread, so a wrapper blocked in
    ``proc.wait()`` unwinds and stops its child in a ``finally`` clause. (A handler that stopped
    the child itself deadlocked: ``Popen.wait`` holds a lock that the handler's own wait needs.)"""

    def _raise(signum, frame):
        raise Stopped(signal.Signals(signum).name)

    old = {s: signal.signal(s, _raise) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def stop_group(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """End a child started with ``start_new_session=True`` and the processes it started (a
    SuperLink's or SuperNode's SuperExec): SIGTERM to its process group, SIGKILL if the child
    is still there after ``grace`` seconds. Nothing outside that group is touched. Further
    SIGTERM / SIGINT wait until it is done (from the main thread), so a second Ctrl-C cannot
    leave the group half-stopped."""
    if proc.poll() is not None:
        return
    main = threading.current_thread() is threading.main_thread()
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGTERM, signal.SIGINT)} if main else {}
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
