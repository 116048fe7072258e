"""A site's reports (``SITE/reports.csv``: patient_id, report) joined to its studies.

Reports stay where the images stay: they are read at the site, turned into byte ids
(ccmr_core/models/text.py) and never written anywhere else.
"""

from __future__ import annotations

import csv
import re
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


SENTENCE_END = re.compile(r"(?<=[.;!?])\s+")


def sentences(text: str) -> list[str]:
    """The report's sentences (split after '.', ';', '!' or '?' followed by white space, so that
    '2.5 mm' stays whole), empty ones dropped."""
    return [t for t in (s.strip() for s in SENTENCE_END.split(text)) if t] or [text]


class WithReports(Dataset):
    """A dataset whose items gain ``report`` (byte ids, (L,)) and ``has_report``; ``patient_ids``
    gives each row's key into ``reports`` (patients without a report get PAD ids and False).
    ``sentence_p``: the chance that an item's report is one of its sentences instead, drawn at
    random (training only: ConVIRT's text augmentation, so the text side also learns from short
    statements such as "No late gadolinium enhancement.", the form prompts take)."""

    def __init__(self, base: Dataset, patient_ids: list[str], reports: dict[str, str], max_len: int = MAX_BYTES,
                 sentence_p: float = 0.0):
        if len(patient_ids) != len(base):
            raise ValueError(f"{len(patient_ids)} patient ids for a dataset of {len(base)}")
        self.base = base
        keys = list(patient_ids)
        self.has = torch.tensor([k in reports for k in keys])
        self.ids = encode([reports.get(k, "") for k in keys], max_len)
        self.sentence_p = sentence_p
        self.sentences = [sentences(reports[k]) if k in reports and sentence_p > 0 else [] for k in keys]

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        item = dict(self.base[i])
        ids, parts = self.ids[i], self.sentences[i]
        if len(parts) > 1 and float(torch.rand(())) < self.sentence_p:
            ids = encode([parts[int(torch.randint(len(parts), ()))]], len(ids))[0]
        item["report"] = ids
        item["has_report"] = self.has[i]
        return item
