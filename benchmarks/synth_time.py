"""Time to generate the default synthetic cohort (3 sites, 231 patients), as `ccmr synth` does.

    python -m benchmarks.synth_time
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine, update_block
from ccmr_core.synth.cohort import generate_cohort


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="ccmr-synth-"))
    try:
        times = {}
        for workers in (1, None):
            shutil.rmtree(work / "c", ignore_errors=True)
            t = time.perf_counter()
            generate_cohort(work / "c", progress=False, workers=workers)
            times[workers] = time.perf_counter() - t
        files = sum(1 for p in (work / "c").rglob("*") if p.is_file())
        size = sum(p.stat().st_size for p in (work / "c").rglob("*") if p.is_file()) / 2**30
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = f"""## Synthetic cohort generation (`python -m benchmarks.synth_time`)

Machine: {machine()}.
Default cohort: 3 sites, 231 patients, {files} files ({size:.1f} GiB of DICOM and tables).

| processes | seconds | ratio to 1 process |
|---|---|---|
| 1 | {times[1]:.1f} | 1.00 |
| one per core | {times[None]:.1f} | {times[None] / times[1]:.2f} |

Target: under 2 minutes on 2 cores.
"""
    update_block("synth", text)
    print(text)


if __name__ == "__main__":
    main()
