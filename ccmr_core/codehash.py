"""The SHA-256 of the training code: every .py file of ccmr_core, client, protocol and server, the
configs (configs/**/*.yaml: they set the experiment, e.g. the privacy target and the splits) and
pyproject.toml, by relative path and content. The same value at the coordinator (the code it
submits) and at a site (the code the SuperNode received), so a site can pin what it reviewed."""

from __future__ import annotations

import hashlib
from pathlib import Path

PARTS = ("ccmr_core", "client", "protocol", "server")


def code_hash(root: str | Path) -> str:
    root = Path(root)
    files = sorted(p for part in PARTS for p in (root / part).rglob("*.py") if "__pycache__" not in p.parts)
    files += sorted((root / "configs").rglob("*.yaml"))
    if (root / "pyproject.toml").is_file():
        files.append(root / "pyproject.toml")
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(root)).encode() + b"\0")
        h.update(p.read_bytes() + b"\0")
    return h.hexdigest()
