"""A ``torch.utils.data.Dataset`` over an ingested cache.

Each item is a dict of tensors: ``cine`` (S, T, H, W) float32 in [0, 1]; ``lge`` (S, H, W)
(zeros when the study has none) with ``has_lge``; ``label`` (class index); ``bio`` (C, L), the
biomechanical signals resampled to L points over one cycle and standardised per signal (zeros
with ``has_bio`` False when absent); ``meas`` (M,), the report measurements as standardised
targets with ``has_meas`` (M,) saying which were reported; and ``index`` (position in the dataset). Patient identifiers
are deliberately not part of the item, so they cannot travel with a batch; ``patient_ids`` holds
them for splitting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ccmr_core.data.ingest import load_manifest
from ccmr_core.data.study_memory import STUDIES
from ccmr_core.measurements import targets


class CacheDataset(Dataset):
    def __init__(
        self,
        cache: str | Path,
        classes: Sequence[str],
        patient_ids: Sequence[str] | None = None,
        transform: Callable[[dict], dict] | None = None,
        bio_length: int = 32,
        load_lge: bool = True,
        measurements: Sequence[str] = (),
    ):
        self.cache = Path(cache)
        manifest = load_manifest(self.cache)
        self.classes = list(classes)
        mismatch = set(manifest["classes"]) - set(self.classes)
        if mismatch:
            raise ValueError(f"{self.cache}: cache was ingested with classes {manifest['classes']}, "
                             f"which are not all in {self.classes}")
        studies = manifest["studies"]
        if patient_ids is not None:
            wanted = set(patient_ids)
            studies = [s for s in studies if s["patient_id"] in wanted]
        self.studies = studies
        self.transform = transform
        self.bio_length = bio_length
        self.load_lge = load_lge
        self.measurements = tuple(measurements)
        self.signals: list[str] = manifest.get("biomechanics_signals", [])
        self._bio = self._load_bio() if self.signals else {}
        first = studies[0] if studies else None
        self.cine_shape = tuple(first["cine_shape"]) if first else None

    def _load_bio(self) -> dict[str, np.ndarray]:
        path = self.cache / "biomechanics.npz"
        if not path.is_file():
            return {}
        out = {}
        with np.load(path) as z:
            for s in self.studies:
                pid = s["patient_id"]
                if s.get("has_biomechanics") and f"{pid}/x" in z:
                    t, x = z[f"{pid}/t"], z[f"{pid}/x"]
                    phase = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
                    grid = np.linspace(0, 1, self.bio_length)
                    res = np.stack([np.interp(grid, phase, x[:, c]) for c in range(x.shape[1])])
                    res = (res - res.mean(1, keepdims=True)) / (res.std(1, keepdims=True) + 1e-6)
                    out[pid] = res.astype(np.float32)
        return out

    @property
    def patient_ids(self) -> list[str]:
        return [s["patient_id"] for s in self.studies]

    @property
    def labels(self) -> list[int]:
        return [self.classes.index(s["label"]) for s in self.studies]

    @property
    def splits(self) -> list[str | None]:
        return [s.get("split") for s in self.studies]

    def __len__(self) -> int:
        return len(self.studies)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        s = self.studies[i]
        z = STUDIES.arrays(self.cache / s["path"])
        cine = torch.from_numpy(z["cine"].astype(np.float32))
        has_lge = self.load_lge and "lge" in z
        lge = torch.from_numpy(z["lge"].astype(np.float32)) if has_lge else torch.zeros(cine.shape[0], *cine.shape[2:])
        bio = self._bio.get(s["patient_id"])
        meas, has_meas = targets(s.get("measurements", {}), self.measurements)
        item = {
            "cine": cine,
            "lge": lge,
            "has_lge": torch.tensor(bool(has_lge)),
            "label": torch.tensor(self.classes.index(s["label"])),
            "bio": torch.from_numpy(bio) if bio is not None else torch.zeros(max(len(self.signals), 1), self.bio_length),
            "has_bio": torch.tensor(bio is not None),
            "meas": torch.from_numpy(meas),
            "has_meas": torch.from_numpy(has_meas),
            "index": torch.tensor(i),
        }
        if self.transform is not None:
            item = self.transform(item)
        return item
