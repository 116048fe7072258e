"""The layers as ARCHITECTURE.md states them, checked on the source: ccmr_core (the science) has no
Flower and no federation code; client/ (a hospital) and server/ (the coordinator) are equals that
share only protocol/, never each other's modules (server/ imported client internals before).
Test harnesses that drive both sides on one machine live in tests/."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_packages(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("package, forbidden", [
    ("ccmr_core", {"flwr", "client", "server", "protocol"}),
    ("protocol", {"client", "server"}),
    ("client", {"server"}),
    ("server", {"client"}),
])
def test_each_layer_imports_only_what_it_may(package, forbidden):
    offenders = {}
    for p in sorted((ROOT / package).rglob("*.py")):
        rel = str(p.relative_to(ROOT))
        bad = imported_packages(p) & forbidden
        if bad:
            offenders[rel] = sorted(bad)
    assert not offenders, f"{package}/ must not import {sorted(forbidden)}: {offenders}"


def test_the_check_sees_an_import_it_must_refuse(tmp_path):
    p = tmp_path / "m.py"
    p.write_text("import os\nfrom client.egress import guard\nimport flwr.app\nfrom . import x\n")
    assert imported_packages(p) == {"os", "client", "flwr"}
