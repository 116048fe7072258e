"""The site's worker reads the coordinator's app (FAB) as data: its code hash is what a site pins,
and must equal what `ccmr-server run` prints for the same code."""

import io
import zipfile
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk

from ccmr_core.codehash import code_hash
from client import worker

ROOT = Path(__file__).resolve().parents[1]


def test_the_hash_a_site_computes_from_the_shipped_app_is_the_one_the_coordinator_prints():
    """Flower rewrites pyproject.toml into the FAB (same content, other bytes); a byte hash made every
    pin fail in a real deployment."""
    assert worker.fab_code_hash(build_fab_from_disk(ROOT)) == code_hash(ROOT)


def _fab(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


def test_a_hostile_app_cannot_write_outside_the_unpacking_folder_or_change_the_hash_by_doing_so(tmp_path):
    base = {"pyproject.toml": b"[project]\nname = 'x'\n", "client/a.py": b"x = 1\n"}
    h = worker.fab_code_hash(_fab(base))
    target = tmp_path / "escaped.py"
    hostile = {**base, f"../../../../../../..{target}": b"owned = True\n", "/etc/ccmr-owned.py": b"owned = True\n"}
    assert worker.fab_code_hash(_fab(hostile)) == h
    assert not target.exists() and not Path("/etc/ccmr-owned.py").exists()
    assert worker.fab_code_hash(_fab({**base, "client/a.py": b"x = 2\n"})) != h


def test_an_oversized_app_is_not_unpacked(monkeypatch):
    monkeypatch.setattr(worker, "MAX_FAB_BYTES", 100)
    with pytest.raises(ValueError, match="MiB"):
        worker.fab_code_hash(b"x" * 101)
    bomb = _fab({"pyproject.toml": b"[project]\n", "a.py": b"0" * 10_000})  # compresses below 100 bytes
    assert len(bomb) < 400
    monkeypatch.setattr(worker, "MAX_FAB_BYTES", 1000)
    with pytest.raises(ValueError, match="unpacks to more than"):
        worker.fab_code_hash(bomb)
