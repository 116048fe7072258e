"""Turn what a user points at (a cohort, a site folder, a cache) into ingested caches."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch.utils.data import ConcatDataset

from ccmr_core.config import ExperimentConfig
from ccmr_core.data.dataset import CacheDataset
from ccmr_core.data.ingest import MANIFEST, ingest
from ccmr_core.data.tables import LABELS


class SourceError(ValueError):
    pass


def default_cache_root() -> Path:
    return Path(os.environ.get("CCMR_CACHE", Path.home() / ".cache" / "ccmr"))


def find_sites(data: str | Path) -> list[tuple[str, Path, str]]:
    """(site name, path, 'cache' or 'site') for a cache, a site folder or a cohort of sites."""
    data = Path(data)
    if (data / MANIFEST).is_file():
        return [(data.name, data, "cache")]
    if (data / LABELS).is_file():
        return [(data.name, data, "site")]
    if data.is_dir():
        subs = sorted(p for p in data.iterdir() if p.is_dir() and ((p / LABELS).is_file() or (p / MANIFEST).is_file()))
        if subs:
            return [(p.name, p, "cache" if (p / MANIFEST).is_file() else "site") for p in subs]
    raise SourceError(f"{data}: not a site folder (no {LABELS}), a cache (no {MANIFEST}) or a cohort of sites; "
                      "create one with 'ccmr synth --out DIR' or point at a hospital's export folder")


def site_cache(site: Path, cfg: ExperimentConfig, cache_root: Path | None = None) -> Path:
    key = json.dumps([str(site.resolve()), cfg.data.ingest.model_dump(mode="json", exclude={"workers"})], sort_keys=True)
    return (cache_root or default_cache_root()) / f"{site.name}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def prepare(data: str | Path, cfg: ExperimentConfig, cache_root: Path | None = None,
            progress: bool = True) -> list[tuple[str, Path]]:
    """Ingest (incrementally) every site under ``data``; returns (site name, cache path)."""
    out = []
    for name, path, kind in find_sites(data):
        if kind == "cache":
            out.append((name, path))
            continue
        cache = site_cache(path, cfg, cache_root)
        ingest(path, cache, cfg.data.ingest, cfg.data.classes, progress=progress)
        out.append((name, cache))
    return out


class MultiSite(ConcatDataset):
    """Sites concatenated, with each row's site and patient kept for splitting and reporting."""

    def __init__(self, caches: list[tuple[str, Path]], cfg: ExperimentConfig, transform=None):
        self.parts = [CacheDataset(c, cfg.data.classes, transform=transform, bio_length=cfg.model.bio_length,
                                   measurements=cfg.data.measurements) for _, c in caches]
        super().__init__(self.parts)
        self.site_names = [n for n, _ in caches]
        self.sites = [n for (n, _), d in zip(caches, self.parts) for _ in range(len(d))]
        self.patient_ids = [f"{n}/{p}" for (n, _), d in zip(caches, self.parts) for p in d.patient_ids]
        self.labels = [y for d in self.parts for y in d.labels]
        self.splits = [s for d in self.parts for s in d.splits]
        # each row's report measurements as labels.csv states them (unstandardised)
        self.stated_measurements = [s.get("measurements", {}) for d in self.parts for s in d.studies]
        self.bio_channels = max((len(d.signals) for d in self.parts), default=0) or 1
        shapes = {d.cine_shape for d in self.parts if d.cine_shape}
        if len(shapes) > 1:
            raise SourceError(f"sites were ingested with different grids {sorted(shapes)}; re-ingest with one config")
        self.cine_shape = shapes.pop() if shapes else None

    hidden_labels: frozenset[int] = frozenset()  # rows whose diagnosis training may not use

    def __getitem__(self, i: int) -> dict:
        item = super().__getitem__(i)
        i = i if i >= 0 else len(self) + i
        item["index"] = torch.tensor(i)  # unique across sites
        item["has_label"] = torch.tensor(i not in self.hidden_labels)
        return item

