"""`ccmr predict` on one study of the default grid, on the CPU: the whole command (process start,
imports, reading the DICOM, resampling, MC-dropout passes, saliency, writing) and the in-process
call, for CC-CMR with the default settings (8 x 16 x 64 x 64, 20 MC passes).

    python -m benchmarks.predict_time [--studies 5]

The model is the default CC-CMR from random initialisation (its speed does not depend on the
weights), saved as a run's model.pt with referral thresholds; the studies are default-cohort
patients written by `ccmr synth`.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom

from benchmarks.common import machine, update_block
from ccmr_core.checkpoint import save_model
from ccmr_core.config import load_config
from ccmr_core.inference import Predictor, predict_study
from ccmr_core.models.registry import build_model
from ccmr_core.synth.cohort import generate_cohort
from ccmr_core.models.registry import model_kwargs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=5)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ccmr-pred-"))
    cohort = work / "cohort"
    generate_cohort(cohort, sites=1, patients=args.studies, seed=11, progress=False)
    site = cohort / "site-a"
    by_patient: dict[str, list[Path]] = {}
    for p in sorted(site.rglob("*")):
        if p.is_file() and p.name not in ("labels.csv", "biomechanics.csv"):
            pid = str(pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["PatientID"]).PatientID)
            by_patient.setdefault(pid, []).append(p)
    studies = []
    for pid, files in by_patient.items():
        d = work / "studies" / pid
        for i, f in enumerate(files):
            (d / f.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, d / f.parent.name / f"{i}.dcm")
        studies.append(d)
    cfg = load_config()
    model = build_model(cfg.model.name, **model_kwargs(cfg, 4))
    refer = {"fraction": 0.2, "confidence": 0.5, "uncertainty": 0.01, "validation_n": 0}
    save_model(work / "model.pt", model.state_dict(), name=cfg.model.name, kwargs=model_kwargs(cfg, 4),
               classes=list(cfg.data.classes), ingest=cfg.data.ingest.model_dump(mode="json"),
               config=cfg.model_dump(mode="json"), info={"run": "benchmark"}, refer=refer)
    pred = Predictor(work / "model.pt")
    inproc, cli = [], []
    for k, s in enumerate(studies):
        t = time.perf_counter()
        predict_study(s, work / "model.pt", work / f"out-{k}", predictor=pred)
        inproc.append(time.perf_counter() - t)
        t = time.perf_counter()
        subprocess.run([str(Path(sys.executable).with_name("ccmr")), "predict", str(s), "--model",
                        str(work / "model.pt"), "--out", str(work / f"cli-{k}")], check=True, capture_output=True)
        cli.append(time.perf_counter() - t)
    n_files = int(np.mean([len(list(s.rglob("*.dcm"))) for s in studies]))
    text = f"""## `ccmr predict` on one study, CPU (`python -m benchmarks.predict_time`)

Machine: {machine()}.
Default grid (8 slices x 16 frames x 64 x 64), CC-CMR default size, {pred.mc_samples} MC-dropout passes, saliency
figure; {len(studies)} synthetic studies of about {n_files} DICOM files each (cine and LGE; LGE is read and ignored).

| what | median | slowest |
|---|---|---|
| `ccmr predict STUDY ...` as a command (process start, imports, read, resample, predict, saliency, write) | {np.median(cli):.1f} s | {max(cli):.1f} s |
| the same in a running process (model loaded once; e.g. `--batch`) | {np.median(inproc):.1f} s | {max(inproc):.1f} s |

Target: seconds on a CPU.
"""
    update_block("predict", text)
    print(text)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
