"""Process helpers shared by the worker pools (cohort generation, ingestion)."""

from __future__ import annotations

import os


def lower_priority() -> None:
    """Pool initializer: worker processes yield the CPU to their parent. Inside a Flower app the
    parent must keep sending heartbeats, or the SuperLink gives the run up."""
    try:
        os.nice(10)
    except OSError:  # pragma: no cover - not permitted on some systems
        pass
