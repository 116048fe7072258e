"""The site's tables: labels.csv (required) and biomechanics.csv (optional).

labels.csv may also carry report measurements (ccmr_core/measurements.py: lvef, lvedv_ml, ...),
one column each; an empty cell means "not reported".

Row problems become error entries naming the file, line and value; only a missing or headerless
labels.csv stops ingestion, because without it no study can be labelled.
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ccmr_core.measurements import MEASUREMENTS, parse_value

LABELS = "labels.csv"
BIOMECHANICS = "biomechanics.csv"
REPORTS = "reports.csv"  # optional: the cardiologist's report per patient (ccmr_core/data/reports.py)
SPLITS = ("train", "val", "test")


class TableError(ValueError):
    """A table cannot be used at all (missing file, missing columns)."""


def _text(path: Path) -> io.StringIO:
    """The table's text; a file that is not UTF-8 (e.g. an Excel export in Windows-1252) is named
    with the first offending byte and how to fix it, instead of a bare UnicodeDecodeError."""
    raw = path.read_bytes()
    try:
        return io.StringIO(raw.decode("utf-8-sig"), newline="")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise TableError(f"{path} is not UTF-8 text (line {line}, byte {raw[e.start:e.start + 1]!r}); save it as "
                         "UTF-8 (in Excel: Save As > 'CSV UTF-8') and run again") from None


@dataclass
class Labels:
    diagnosis: dict[str, str] = field(default_factory=dict)
    split: dict[str, str] = field(default_factory=dict)
    measurements: dict[str, dict[str, float]] = field(default_factory=dict)
    errors: list[dict] = field(default_factory=list)


def read_labels(site: Path, classes: tuple[str, ...]) -> Labels:
    path = site / LABELS
    if not path.is_file():
        raise TableError(f"{path} not found: create it with the columns patient_id,diagnosis[,split] "
                         f"(diagnosis one of {', '.join(classes)})")
    out = Labels()
    with _text(path) as f:
        reader = csv.DictReader(f)
        cols = [c.strip() for c in (reader.fieldnames or [])]
        if "patient_id" not in cols or "diagnosis" not in cols:
            raise TableError(f"{path}: the header must contain patient_id and diagnosis (found: {', '.join(cols) or 'nothing'})")
        for line, row in enumerate(reader, start=2):
            row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
            pid, dx, split = row.get("patient_id", ""), row.get("diagnosis", ""), row.get("split", "")
            where = f"{LABELS}:{line}"
            if not pid:
                out.errors.append({"path": where, "reason": "empty patient_id; row ignored"})
                continue
            if dx not in classes:
                out.errors.append({"patient_id": pid, "reason": f"diagnosis {dx!r} ({where}) is not one of the "
                                   f"allowed classes: {', '.join(classes)}; fix the row or the class list"})
                continue
            if split and split not in SPLITS:
                out.errors.append({"patient_id": pid, "reason": f"split {split!r} ({where}) is not one of "
                                   f"{', '.join(SPLITS)}; leave it empty for an automatic split"})
                continue
            if pid in out.diagnosis and out.diagnosis[pid] != dx:
                out.errors.append({"patient_id": pid, "reason": f"listed twice with different diagnoses "
                                   f"({out.diagnosis[pid]!r} and {dx!r}, {where}); patient not used"})
                out.diagnosis[pid] = ""
                continue
            out.diagnosis[pid] = dx
            if split:
                out.split[pid] = split
            values = {}
            for name in MEASUREMENTS:
                if row.get(name, ""):
                    try:
                        values[name] = parse_value(name, row[name])
                    except ValueError as e:
                        out.errors.append({"patient_id": pid, "reason": f"{e} ({where}); that value is not "
                                           "used, the patient is"})
            if values:
                out.measurements[pid] = values
    out.diagnosis = {k: v for k, v in out.diagnosis.items() if v}
    return out


def read_biomechanics(site: Path) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str], list[dict]]:
    """Per patient: times (L,) and signals (L, C); the signal names; error entries."""
    path = site / BIOMECHANICS
    if not path.is_file():
        return {}, [], []
    rows: dict[str, list[list[float]]] = defaultdict(list)
    errors: list[dict] = []
    try:
        text = _text(path)
    except TableError as e:  # optional table: the site goes on without it
        return {}, [], [{"path": BIOMECHANICS, "reason": f"{e}; biomechanics not used"}]
    with text as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        if header[:2] != ["patient_id", "t"] or len(header) < 3:
            return {}, [], [{"path": BIOMECHANICS, "reason": "header must be patient_id,t,<signal>...; "
                             f"found {','.join(header) or 'nothing'}; biomechanics not used"}]
        names = header[2:]
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            try:
                if len(row) != len(header):
                    raise ValueError(f"{len(row)} columns, expected {len(header)}")
                vals = [float(x) for x in row[1:]]
                if not np.all(np.isfinite(vals)):
                    raise ValueError("non-finite value")
            except ValueError as e:
                errors.append({"path": f"{BIOMECHANICS}:{line}", "reason": f"row ignored: {e}"})
                continue
            rows[row[0].strip()].append(vals)
    out = {}
    for pid, vals in rows.items():
        a = np.asarray(sorted(vals), dtype=np.float64)
        if len(a) < 4:
            errors.append({"patient_id": pid, "reason": f"only {len(a)} biomechanics samples (need >= 4); not used"})
            continue
        out[pid] = (a[:, 0], a[:, 1:].astype(np.float32))
    return out, names, errors
