"""Patient-level, stratified train/validation/test splits (or the split column of labels.csv)."""

from __future__ import annotations

from collections import defaultdict

import numpy as np


def stratified_split(labels: list[int], val_fraction: float, test_fraction: float, seed: int,
                     given: list[str | None] | None = None) -> dict[str, list[int]]:
    """Indices per split. Rows with a given split keep it; the rest are split per class so that
    every class is represented in proportion (at least one validation patient per class when
    the class has three or more patients)."""
    out: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    free_by_class: dict[int, list[int]] = defaultdict(list)
    for i, y in enumerate(labels):
        g = given[i] if given else None
        if g:
            out[g].append(i)
        else:
            free_by_class[y].append(i)
    rng = np.random.default_rng(seed)
    for y in sorted(free_by_class):
        idx = list(free_by_class[y])
        rng.shuffle(idx)
        n = len(idx)
        n_test = int(round(n * test_fraction))
        n_val = int(round(n * val_fraction))
        if n >= 3:
            n_val = max(n_val, 1)
            n_test = max(n_test, 1) if test_fraction > 0 else 0
        out["test"] += idx[:n_test]
        out["val"] += idx[n_test : n_test + n_val]
        out["train"] += idx[n_test + n_val :]
    # a small site whose classes are all rare still gets one validation (and test) patient, taken
    # from its most frequent training class, so its metrics are defined
    for part, frac in (("val", val_fraction), ("test", test_fraction)):
        if frac > 0 and not out[part] and len(out["train"]) >= 3:
            counts: dict[int, int] = defaultdict(int)
            for i in out["train"]:
                counts[labels[i]] += 1
            y = max(sorted(counts), key=lambda c: counts[c])
            pick = [i for i in out["train"] if labels[i] == y][int(rng.integers(counts[y]))]
            out["train"].remove(pick)
            out[part].append(pick)
    return {k: sorted(v) for k, v in out.items()}


def labelled_subset(labels: list[int], idx: list[int], fraction: float, seed: int) -> list[int]:
    """A stratified ``fraction`` of the rows ``idx`` (at least one per class present) whose diagnosis
    training may use; the same seed gives the same rows."""
    if fraction >= 1.0:
        return list(idx)
    rng = np.random.default_rng([seed, 4242])
    by_class: dict[int, list[int]] = defaultdict(list)
    for i in idx:
        by_class[labels[i]].append(i)
    keep = []
    for y in sorted(by_class):
        rows = list(by_class[y])
        rng.shuffle(rows)
        keep += rows[: max(1, int(round(fraction * len(rows))))]
    return sorted(keep)
