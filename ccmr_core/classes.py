"""Diagnostic classes (ACDC convention) and their physical definitions.

The class list is configurable (``data.classes`` in the config); these are the defaults and the
definitions the synthetic cohort implements.
"""

from __future__ import annotations

DEFAULT_CLASSES: tuple[str, ...] = ("NOR", "MINF", "DCM", "HCM", "ARV")

DESCRIPTIONS: dict[str, str] = {
    "NOR": "normal: LV ejection fraction 55-70%, wall 7-11 mm, no scar",
    "MINF": "previous myocardial infarction: regional akinesia and thinning in one coronary "
    "territory, reduced EF, subendocardial-to-transmural scar in that territory",
    "DCM": "dilated cardiomyopathy: dilated LV, EF < 40%, global hypokinesis, thin walls, "
    "mid-wall septal scar in about a third",
    "HCM": "hypertrophic cardiomyopathy: wall >= 15 mm (asymmetric septal in most), normal or "
    "high EF, small cavity, patchy scar at the RV insertion points in about half",
    "ARV": "abnormal right ventricle: dilated, poorly contracting RV with a near-normal LV",
}
