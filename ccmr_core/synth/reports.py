"""The cardiologist's report of a synthetic study, written the way readers write them.

A report states what the phantom shows, through a reader: the report measurements of labels.csv
(already with reader error and rounding), words for size and function chosen from those values,
regional wall motion by AHA segment from the phantom's contractility, and LGE pattern, territory
and transmural extent (or that no contrast was given). Each site has its own habits
(``HABITS``): a structured findings + impression template, a terse one with abbreviations (LVEF,
RWMA, DE) or a narrative one; how often it leaves a sentence out. Every report comes twice: with
the impression's diagnosis word (``report``) and without it (``report_without_diagnosis``), where
the impression only restates findings, so that retrieval cannot succeed on the class name alone.

Deterministic for a seed: the text has its own random stream, so adding reports changed no image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ccmr_core.synth.anatomy import SECTOR_ANGLES, TERRITORIES, Heart, scar_transmurality

# AHA segments 1-16 in this project's anatomical frame (angle 0 = mid-septum, 90 = anterior,
# 180 = lateral, 270 = inferior): (name, level, centre angle in degrees, half width in degrees)
_WALLS6 = [("anterior", 90), ("anterolateral", 150), ("inferolateral", 210), ("inferior", 270),
           ("inferoseptal", 330), ("anteroseptal", 30)]
_WALLS4 = [("anterior", 90), ("lateral", 180), ("inferior", 270), ("septal", 0)]
SEGMENTS = ([(f"basal {w}", "basal", a, 30) for w, a in _WALLS6] + [(f"mid {w}", "mid", a, 30) for w, a in _WALLS6]
            + [(f"apical {w}", "apical", a, 45) for w, a in _WALLS4])
LEVELS = {"basal": (0.0, 0.3), "mid": (0.3, 0.58), "apical": (0.58, 1.0)}
HYPOKINETIC, AKINETIC = 0.75, 0.35  # regional contractility below which a reader calls it so

# Ground-truth findings (zero-shot targets); thresholds on the phantom's exact values
FINDINGS = ("lv_dysfunction", "lv_dilation", "lv_hypertrophy", "lge_present", "rv_dysfunction", "rwma")


@dataclass(frozen=True)
class Habits:
    style: str  # "structured", "terse" or "narrative"
    drop: float  # chance that a findings sentence is left out
    round_to: int  # volumes rounded to this many mL


HABITS = {"structured": Habits("structured", 0.05, 1), "terse": Habits("terse", 0.12, 5),
          "narrative": Habits("narrative", 0.08, 1)}
SITE_STYLES = ("structured", "terse", "narrative")  # site index i of a cohort writes SITE_STYLES[i % 3]


def habits_for(site_index: int, kind: str) -> Habits:
    """A site's reporting habits: the federation's sites take turns; the external site and the
    public cohort write narrative reports with their own sentence losses."""
    if kind == "external":
        return Habits("narrative", 0.15, 5)
    if kind.startswith("public"):  # "public" and "public-external"
        return Habits("structured", 0.10, 5)
    return HABITS[SITE_STYLES[site_index % len(SITE_STYLES)]]


def aha_segments(heart: Heart) -> dict[str, tuple[float, float]]:
    """Per AHA segment: mean regional contractility and the largest transmural scar extent."""
    trans = scar_transmurality(heart.scars, heart.z)
    zn = heart.z / heart.z.max() if heart.z.max() > 0 else heart.z
    deg = np.rad2deg(SECTOR_ANGLES)
    out = {}
    for name, level, centre, half in SEGMENTS:
        lo, hi = LEVELS[level]
        rows = (zn >= lo) & (zn <= hi) if level == "apical" else (zn >= lo) & (zn < hi)
        cols = np.abs((deg - centre + 180) % 360 - 180) < half
        if not rows.any():
            rows = np.argmin(np.abs(zn - (lo + hi) / 2)) == np.arange(len(zn))
        out[name] = (round(float(heart.motion[np.ix_(rows, cols)].mean()), 3),
                     round(float(trans[np.ix_(rows, cols)].max()), 3))
    return out


def segment_score(contractility: float) -> int:
    """A segment's AHA wall motion score as the reader grades it: 1 normal, 2 hypokinetic,
    3 akinetic, 4 dyskinetic (moving outwards)."""
    m = contractility
    return 1 if m >= HYPOKINETIC else 2 if m >= AKINETIC else 3 if m >= 0 else 4


def wall_motion_score_index(segs: dict[str, tuple[float, float]]) -> float:
    """The AHA wall motion score index of ``segs`` (from ``aha_segments``): the mean of their
    ``segment_score``, the grading the report's text uses (the same reader)."""
    return float(np.mean([segment_score(m) for m, _ in segs.values()]))


def findings(truth: dict) -> dict[str, bool | None]:
    """Ground truth per finding (None where it cannot be known: LGE without contrast)."""
    m = truth["measurements"]
    segs = truth.get("segments") or {}
    return {
        "lv_dysfunction": m["lvef"] < 50.0,
        "lv_dilation": m["lvedv_ml"] > 150.0,
        "lv_hypertrophy": m["max_wall_mm"] >= 15.0,
        "lge_present": (truth["scar_extent"] > 0.0) if truth["has_lge"] else None,
        "rv_dysfunction": m["rvef"] < 45.0,
        "rwma": any(v[0] < HYPOKINETIC for v in segs.values()) if segs else None,
    }


def _grade(value: float | None, cuts: list[tuple[float, str]], default: str) -> str | None:
    if value is None:
        return None
    for cut, word in cuts:
        if value < cut:
            return word
    return default


def _lv_size(edv):
    return _grade(edv, [(150, "normal size"), (200, "mildly dilated"), (250, "moderately dilated")], "severely dilated")


def _function(ef, normal=55):
    return _grade(ef, [(35, "severely reduced"), (45, "moderately reduced"), (normal, "mildly reduced")], "normal")


def _wall(mm):
    return _grade(mm, [(12, "normal wall thickness"), (15, "mildly increased wall thickness")], "hypertrophy")


def _territory(angle: float) -> str:
    d = {k: abs(np.angle(np.exp(1j * (angle - c)))) for k, (c, _) in TERRITORIES.items()}
    return min(d, key=d.get)


def _segment_list(names: list[str]) -> str:
    return ", ".join(names[:-1]) + (" and " if len(names) > 1 else "") + names[-1]


def _transmural_words(t: float) -> str:
    return _grade(t, [(0.26, "under 25%"), (0.51, "26-50%"), (0.76, "51-75%")], "over 75%")


def write_report(heart: Heart, segs: dict[str, tuple[float, float]], stated: dict, habits: Habits,
                 rng: np.random.Generator) -> tuple[str, str]:
    """(report, report without the diagnosis word) for one patient: ``segs`` from ``aha_segments``,
    ``stated`` the report measurements of labels.csv."""
    terse = habits.style == "terse"
    vol = (lambda v: None if v is None else int(round(v / habits.round_to) * habits.round_to))
    edv, ef = vol(stated.get("lvedv_ml")), stated.get("lvef")
    rvedv, rvef, wall = vol(stated.get("rvedv_ml")), stated.get("rvef"), stated.get("max_wall_mm")
    hypo = [k for k, (m, _) in segs.items() if segment_score(m) == 2]
    akin = [k for k, (m, _) in segs.items() if segment_score(m) >= 3]  # the text calls dyskinesis akinesis too
    sentences: list[str] = []

    # left ventricle
    size, func, wall_w = _lv_size(edv), _function(ef), _wall(wall)
    hcm_kind = "concentric" if heart.variant == "concentric" else "asymmetric septal"
    if terse:
        parts = [f"LVEDV {edv}ml" if edv is not None else None, f"LVEF {ef:.0f}%" if ef is not None else None,
                 f"max WT {wall:.0f}mm" if wall is not None else None]
        sentences.append(" ".join(p for p in parts if p) + "." if any(parts) else "")
        if wall_w == "hypertrophy":
            sentences.append(f"{hcm_kind.capitalize()} LVH.")
    elif habits.style == "structured":
        if size:
            sentences.append(f"Left ventricle: {size}" + (f" (LVEDV {edv} mL)." if edv is not None else "."))
        if func:
            sentences.append(f"LV systolic function {func}, LVEF {ef:.0f}%.")
        if wall_w:
            w = f"{hcm_kind} hypertrophy" if wall_w == "hypertrophy" else wall_w
            sentences.append(f"Wall thickness: {w}, maximum {wall:.0f} mm.")
    else:
        if size:
            sentences.append(f"The left ventricle is {size}" + (f" with an end-diastolic volume of {edv} mL." if edv is not None else "."))
        if func:
            sentences.append(f"Systolic function is {func} (ejection fraction {ef:.0f}%).")
        if wall_w:
            w = f"There is {hcm_kind} hypertrophy" if wall_w == "hypertrophy" else f"The myocardium shows {wall_w}"
            sentences.append(f"{w}, measuring up to {wall:.0f} mm.")

    # regional wall motion
    if segs:
        if not hypo and not akin:
            sentences.append("No RWMA." if terse else "No regional wall motion abnormality.")
        else:
            bits = []
            if akin:
                bits.append(f"akinesis of the {_segment_list(akin)} segment{'s' if len(akin) > 1 else ''}")
            if hypo:
                bits.append(f"hypokinesis of the {_segment_list(hypo)} segment{'s' if len(hypo) > 1 else ''}")
            text = "; ".join(bits)
            sentences.append(f"RWMA: {text}." if terse else f"Regional wall motion: {text}.")

    # right ventricle
    rv_size = "dilated" if heart.rv_scale > 1.3 else "normal size"
    rv_func = _function(rvef, normal=45)
    if terse:
        parts = [f"RVEDV {rvedv}ml" if rvedv is not None else None, f"RVEF {rvef:.0f}%" if rvef is not None else None]
        sentences.append(("RV dilated, " if rv_size == "dilated" else "") + " ".join(p for p in parts if p) + "."
                         if any(parts) else f"RV {rv_size}.")
    else:
        rv = f"Right ventricle: {rv_size}" if habits.style == "structured" else f"The right ventricle is {rv_size}"
        extra = f" (RVEDV {rvedv} mL)" if rvedv is not None else ""
        f_text = f", {rv_func} function (RVEF {rvef:.0f}%)" if rv_func else ""
        sentences.append(f"{rv}{extra}{f_text}.")

    # LGE
    if not heart.has_lge:
        sentences.append("No contrast given." if terse else "Contrast was not given.")
    elif not heart.scars:
        sentences.append("DE: none." if terse else "No late gadolinium enhancement.")
    else:
        for sc in heart.scars:
            scarred = [k for k, (_, t) in segs.items() if t > 0.1]
            where = f" in the {_segment_list(scarred)} segments" if scarred else ""
            if sc.kind == "subendocardial":
                t = _transmural_words(max((t for _, t in segs.values()), default=sc.depth[1]))
                terr = _territory(sc.centre)
                sentences.append(f"DE: subendocardial, {t} transmural, {terr} territory." if terse else
                                 f"Subendocardial late gadolinium enhancement{where}, {t} transmural, "
                                 f"in the {terr} territory.")
            elif sc.kind == "midwall":
                sentences.append("DE: midwall septal." if terse else f"Mid-wall late gadolinium enhancement{where}.")
            else:
                sentences.append("DE: patchy at RV insertion points." if terse else
                                 "Patchy late gadolinium enhancement at the RV insertion points.")

    sentences = [s for s in sentences if s and rng.uniform() >= habits.drop]
    impression, blind = _impressions(heart, size, func, wall_w, rv_size, rv_func, hypo + akin)
    lead = {"structured": ("FINDINGS: ", " IMPRESSION: "), "terse": ("", " Imp: "),
            "narrative": ("", " Conclusion: ")}[habits.style]
    body = lead[0] + " ".join(sentences)
    return body + lead[1] + impression, body + lead[1] + blind


def _impressions(heart, size, func, wall_w, rv_size, rv_func, rwma) -> tuple[str, str]:
    dx = heart.diagnosis
    terr = _territory(heart.scars[0].centre) if dx == "MINF" and heart.scars else None
    with_dx = {"NOR": "Normal cardiac MRI.", "DCM": "Dilated cardiomyopathy.",
               "MINF": f"Prior myocardial infarction in the {terr} territory." if terr else "Prior myocardial infarction.",
               "HCM": "Hypertrophic cardiomyopathy.",
               "ARV": "Arrhythmogenic right ventricular cardiomyopathy."}[dx]
    words = []
    if size and size != "normal size":
        words.append(f"{size} LV")
    if func and func != "normal":
        words.append(f"{func} LV systolic function")
    if wall_w == "hypertrophy":
        words.append("LV hypertrophy")
    if rwma:
        words.append("regional wall motion abnormality")
    if rv_size == "dilated":
        words.append("dilated RV")
    if rv_func and rv_func != "normal":
        words.append(f"{rv_func} RV function")
    blind = "; ".join(words) + "." if words else "No abnormality described."
    blind = blind[0].upper() + blind[1:]
    return with_dx, blind
