"""Worker pools must not run their parent's signal handlers.

Inside `flwr run`, the simulation process's SIGTERM handler tells the SuperLink that the whole run
finished and failed. Forked pool workers inherit that handler and get SIGTERM when the pool closes,
so a worker that kept it would end the run its parent is still doing (seen in CI)."""

import multiprocessing as mp
import os
import signal
import time

import pytest

from ccmr_core.data.ingest import _parallel
from ccmr_core.proc import worker_pool


def _square(x: int) -> int:
    return x * x


def _slow(x: int) -> int:
    time.sleep(0.2 if x == 0 else 5)  # the pool is closed while the others are still working
    return x


@pytest.fixture
def sigterm_marker(tmp_path):
    marker = tmp_path / "handlers-ran"
    parent = os.getpid()

    def handler(signum, frame):  # stands in for flwr's exit handler: records who ran it, then exits
        with open(marker, "a") as f:
            f.write(f"{os.getpid()}\n")
        if os.getpid() != parent:
            os._exit(1)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield marker
    finally:
        signal.signal(signal.SIGTERM, old)


def _pids(marker) -> list[str]:
    return marker.read_text().split() if marker.exists() else []


def test_pool_workers_do_not_run_the_parents_sigterm_handler(sigterm_marker):
    assert list(_parallel(_square, list(range(8)), workers=2, desc="t", unit="x", progress=False)) == \
        [x * x for x in range(8)]
    gen = _parallel(_slow, list(range(4)), workers=2, desc="t", unit="x", progress=False)
    assert next(gen) == 0
    gen.close()  # the parent stops early: the pool terminates busy workers with SIGTERM
    time.sleep(0.5)
    assert _pids(sigterm_marker) == []


def _slow_init() -> None:
    time.sleep(1.0)  # e.g. importing torch in a fresh worker


def test_a_pool_closed_while_its_workers_still_start_runs_no_parent_handler(sigterm_marker):
    """The race CI hit: SIGTERM reaching a worker before its initializer had reset the handlers."""
    for _ in range(3):
        with worker_pool(mp.get_context("fork"), 2, initializer=_slow_init):
            pass  # terminated at once, while both workers are still in their initializer
    time.sleep(0.5)
    assert _pids(sigterm_marker) == []


def test_the_marker_detects_an_inherited_handler(sigterm_marker):
    """The check above can fail: a plain forked pool runs the inherited handler on terminate."""
    with mp.get_context("fork").Pool(2) as pool:
        assert next(pool.imap(_slow, range(4))) == 0
    deadline = time.time() + 5
    while not _pids(sigterm_marker) and time.time() < deadline:
        time.sleep(0.05)
    assert _pids(sigterm_marker) and str(os.getpid()) not in _pids(sigterm_marker)
