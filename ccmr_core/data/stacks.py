"""Recognise the cine short-axis stack and the LGE stack of a study, and order them.

Recognition is structural first, names second, so unnamed series and vendor habits work:

* cine: frames at one position with several trigger times (or CardiacNumberOfImages > 1) and no
  inversion time; LGE: one image per position with an inversion time, or a late-enhancement
  series name (LGE, PSIR, DE, MDE, delayed) when the inversion time is missing.
* Frames of all cine series of the study are pooled and grouped by plane orientation, so a stack
  exported as one series per slice (common) is rebuilt, and long-axis cines (2/3/4-chamber) fall
  into groups with a single position and are not mistaken for the short axis.
* Slices are ordered by position along the slice normal (SliceLocation is never needed), frames
  by trigger time (then temporal index, then instance number). Duplicate instances are dropped.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from ccmr_core.data.dicom_read import Frame

LGE_NAME = re.compile(r"(lge|psir|\bde\b|de_|_de|mde|delayed|late|enhancement)", re.I)
LAX_NAME = re.compile(r"(2ch|3ch|4ch|lax|long.?axis|lvot|rvot)", re.I)


class StudyError(ValueError):
    """A study cannot be used; the message says why and what was found."""


@dataclass
class Stack:
    """Slices ordered along the normal; each slice a list of frames ordered in time."""

    slices: list[list[Frame]]
    normal: np.ndarray
    positions: np.ndarray  # (S,) position of each slice along the normal, mm
    series: list[str]  # descriptions of the series it came from
    notes: list[str] = field(default_factory=list)

    @property
    def n_slices(self) -> int:
        return len(self.slices)


def _series_kind(frames: list[Frame]) -> str:
    """'cine', 'lge' or 'other' for one series (structure first, then names)."""
    by_pos: dict[tuple, set] = defaultdict(set)
    for f in frames:
        key = None if f.position is None else tuple(np.round(f.position, 1))
        by_pos[key].add(f.trigger_time if f.trigger_time is not None else (f.temporal_index, f.instance))
    max_times = max(len(v) for v in by_pos.values())
    desc = frames[0].series_description
    has_inv = any(f.inversion_time is not None for f in frames)
    cardiac = max((f.cardiac_images or 0) for f in frames)
    if (max_times > 1 or cardiac > 1) and not has_inv:
        return "cine"
    if max_times == 1 and (has_inv or LGE_NAME.search(desc)):
        return "lge"
    return "other"


def _dedupe(frames: list[Frame]) -> tuple[list[Frame], int]:
    seen, out, dropped = set(), [], 0
    for f in frames:
        key = (f.sop_uid, f.frame) if f.sop_uid else (f.path, f.frame)
        if key in seen:
            dropped += 1
            continue
        seen.add(key)
        out.append(f)
    return out, dropped


def _position_along(frames: list[Frame], normal: np.ndarray) -> list[float | None]:
    out = []
    for f in frames:
        if f.position is not None:
            out.append(float(f.position @ normal))
        else:
            out.append(f.slice_location)
    return out


def _orientation_groups(frames: list[Frame]) -> list[tuple[np.ndarray, list[Frame]]]:
    groups: list[tuple[np.ndarray, list[Frame]]] = []
    for f in frames:
        n = f.normal
        if n is None:
            continue
        for g_n, members in groups:
            if abs(float(g_n @ n)) > 0.995:  # parallel planes (within ~6 degrees)
                members.append(f)
                break
        else:
            groups.append((n, [f]))
    return groups


def _time_key(f: Frame):
    return (
        f.trigger_time if f.trigger_time is not None else float("inf"),
        f.temporal_index if f.temporal_index is not None else 0,
        f.instance,
        f.frame,
    )


def build_stack(frames: list[Frame], kind: str, min_slices: int, min_frames: int) -> Stack:
    """Assemble the largest parallel stack of ``kind`` ('cine' or 'lge') from candidate frames."""
    frames, dropped = _dedupe(frames)
    notes = [f"{dropped} duplicate instance(s) ignored"] if dropped else []
    groups = _orientation_groups(frames)
    if not groups:
        raise StudyError(f"{kind} images have no ImageOrientationPatient, so slices cannot be placed")
    best = None
    for normal, members in groups:
        pos = _position_along(members, normal)
        if any(p is None for p in pos):
            continue
        by_slice: dict[float, dict[str, list[Frame]]] = defaultdict(lambda: defaultdict(list))
        for f, p in zip(members, pos):
            by_slice[round(p, 1)][f.series_uid].append(f)
        if best is None or len(by_slice) > len(best[1]):
            best = (normal, by_slice)
    if best is None:
        raise StudyError(f"{kind} images have neither ImagePositionPatient nor SliceLocation; slices cannot be ordered")
    normal, by_slice = best
    slices, positions, series = [], [], set()
    for p in sorted(by_slice):
        candidates = by_slice[p]
        # a position acquired twice (a repeated slice): keep the series with most frames, then the latest
        uid = max(candidates, key=lambda u: (len(candidates[u]), candidates[u][0].series_number))
        if len(candidates) > 1:
            notes.append(f"slice at {p:.1f} mm was acquired {len(candidates)} times; kept series "
                         f"{candidates[uid][0].series_number}")
        fr = sorted(candidates[uid], key=_time_key)
        if kind == "cine":
            # same position and trigger time twice in one series: a duplicate with a new UID
            uniq, last = [], None
            for f in fr:
                if f.trigger_time is not None and last is not None and abs(f.trigger_time - last) < 1e-3:
                    notes.append(f"{f.path}: second image at the same position and trigger time ignored")
                    continue
                uniq.append(f)
                last = f.trigger_time
            fr = uniq
            if len(fr) < min_frames:
                notes.append(f"slice at {p:.1f} mm has {len(fr)} frames (< {min_frames}); dropped")
                continue
        slices.append(fr if kind == "cine" else fr[-1:])
        positions.append(p)
        series.add(fr[0].series_description or "(unnamed)")
    if len(slices) < min_slices:
        raise StudyError(
            f"the {kind} stack has {len(slices)} usable slice position(s), fewer than {min_slices}; "
            "a short-axis stack from base to apex is needed"
        )
    return Stack(slices, normal, np.asarray(positions), sorted(series), notes)


def find_stacks(frames: list[Frame], min_slices: int, min_frames: int) -> tuple[Stack, Stack | None, list[str]]:
    """The study's cine short-axis stack (required) and LGE stack (optional), with notes."""
    by_series: dict[str, list[Frame]] = defaultdict(list)
    for f in frames:
        by_series[f.series_uid].append(f)
    cine, lge, other = [], [], []
    for uid, fs in by_series.items():
        kind = _series_kind(fs)
        if kind == "cine" and LAX_NAME.search(fs[0].series_description):
            kind = "other"
        {"cine": cine, "lge": lge, "other": other}[kind].extend(fs)
    notes: list[str] = []
    if not cine:
        found = sorted({f"'{fs[0].series_description or '(unnamed)'}'" for fs in by_series.values()})
        raise StudyError(
            "no cine series (no images with several trigger times at one position); found series: "
            + ", ".join(found)
        )
    cine_stack = build_stack(cine, "cine", min_slices, min_frames)
    lge_stack = None
    if lge:
        try:
            lge_stack = build_stack(lge, "lge", min_slices=2, min_frames=1)
        except StudyError as e:
            notes.append(f"LGE not used: {e}")
    return cine_stack, lge_stack, notes + cine_stack.notes + (lge_stack.notes if lge_stack else [])
