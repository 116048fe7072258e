"""The SHA-256 of the training code: every .py file of ccmr_core, client, protocol and server, the
configs (configs/**/*.yaml: they set the experiment, e.g. the privacy target and the splits) and
pyproject.toml, by relative path and content. pyproject.toml counts by what it says, not its bytes:
Flower writes it anew (same content, other formatting) into the app (FAB) it ships to the sites.
The same value at the coordinator (the code it
submits) and at a site (the code the SuperNode received), so a site can pin what it reviewed."""

from __future__ import annotations

import hashlib
import json
import tomllib
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
        data = p.read_bytes()
        if p.name == "pyproject.toml" and p.parent == root:
            data = json.dumps(tomllib.loads(data.decode()), sort_keys=True).encode()
        h.update(str(p.relative_to(root)).encode() + b"\0")
        h.update(data + b"\0")
    return h.hexdigest()
