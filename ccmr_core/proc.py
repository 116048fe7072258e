"""Process helpers shared by the worker pools (cohort generation, ingestion)."""

from __future__ import annotations

import os
import signal


def worker_init() -> None:
    """Pool initializer for forked workers.

    1. Signals: a forked worker inherits its parent's Python signal handlers. Inside a Flower app
       those handlers report the *whole run* finished and failed to the SuperLink, so when the pool
       is closed (``Pool.terminate`` sends SIGTERM to every worker) a worker would end the run its
       parent is still doing. Workers die by SIGTERM like plain processes and leave Ctrl-C to the
       parent.
    2. Priority: workers yield the CPU to their parent, which must keep sending heartbeats or the
       SuperLink gives the run up.
    """
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "SIGQUIT"):
        signal.signal(signal.SIGQUIT, signal.SIG_DFL)
    try:
        os.nice(10)
    except OSError:  # pragma: no cover - not permitted on some systems
        pass
