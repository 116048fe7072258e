"""A site's reports (``SITE/reports.csv``: patient_id, report) joined to its studies.

Reports stay where the images stay: they are read at the site, turned into byte ids
(ccmr_core/models/text.py) and never written anywhere else.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ccmr_core.data.tables import REPORTS
from ccmr_core.models.text import MAX_BYTES, encode


class ReportError(ValueError):
    pass


def read_reports(site: str | Path, column: str = "report") -> dict[str, str]:
    """patient_id -> report text of one site folder; ``column`` picks the text column (the
    synthetic cohort also writes ``report_without_diagnosis``)."""
    path = Path(site) / REPORTS
    if not path.is_file():
        raise ReportError(f"{path}: no reports file; a site's reports go in {REPORTS} with columns patient_id and "
                          "report (regenerate a synthetic cohort made before reports existed with 'ccmr synth --force')")
    with open(path, newline="") as f:
        rows = csv.DictReader(f)
        missing = {"patient_id", column} - set(rows.fieldnames or [])
        if missing:
            raise ReportError(f"{path}: missing column(s) {', '.join(sorted(missing))}; found {rows.fieldnames}")
        out: dict[str, str] = {}
        for n, r in enumerate(rows, start=2):
            pid = (r["patient_id"] or "").strip()
            if not pid:
                raise ReportError(f"{path}, line {n}: empty patient_id")
            if pid in out:
                raise ReportError(f"{path}, line {n}: patient {pid} has a second report; keep one per patient")
            text = (r[column] or "").strip()
            if text:
                out[pid] = text
    return out


class WithReports(Dataset):
    """A dataset whose items gain ``report`` (byte ids, (L,)) and ``has_report``; ``patient_ids``
    gives each row's key into ``reports`` (patients without a report get PAD ids and False)."""

    def __init__(self, base: Dataset, patient_ids: list[str], reports: dict[str, str], max_len: int = MAX_BYTES):
        if len(patient_ids) != len(base):
            raise ValueError(f"{len(patient_ids)} patient ids for a dataset of {len(base)}")
        self.base = base
        keys = list(patient_ids)
        self.has = torch.tensor([k in reports for k in keys])
        self.ids = encode([reports.get(k, "") for k in keys], max_len)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        item = dict(self.base[i])
        item["report"] = self.ids[i]
        item["has_report"] = self.has[i]
        return item
