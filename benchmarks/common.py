"""Shared helpers for benchmarks: the machine description and updating BENCHMARKS.md blocks."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import numpy
    import pydicom
    import torch

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{cpu}, {len(os.sched_getaffinity(0))} cores, {mem:.0f} GiB RAM, {platform.system()} {platform.release()}; "
            f"Python {platform.python_version()}, torch {torch.__version__}, numpy {numpy.__version__}, "
            f"pydicom {pydicom.__version__}")


def code_version() -> str:
    """The commit a benchmark runs, read when it starts: the short hash, marked when tracked files differ
    from it (then the figures are not that commit's), or "unknown" outside a git checkout."""
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()  # noqa: E731
    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return "unknown"
    return commit + (" with uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def update_block(name: str, text: str, path: Path = ROOT / "BENCHMARKS.md") -> None:
    """Replace the block between <!-- name:start --> and <!-- name:end --> (append if missing)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    body = f"{start}\n{text.strip()}\n{end}"
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    if start in old and end in old:
        new = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: body, old, flags=re.S)
    else:
        new = old.rstrip() + "\n\n" + body + "\n"
    path.write_text(new)
