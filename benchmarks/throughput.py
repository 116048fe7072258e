"""Training throughput against the machine's matmul rate, eager and with ``train.compile``, and
what compiling does to a whole central training run.

    python -m benchmarks.throughput [--train-epochs 40] [--workdir DIR] [--steps-only]

Step rates: one AdamW step of each model at the default grid and batch, FLOPs counted by
``torch.utils.flop_counter`` on the eager model (forward + backward), the best of 3 timings of 4
steps; compiled rows time the same steps after a first one that compiles (its seconds are shown).
Against the float32 matmul rate measured in the same process (the best of 5 timings): a shared
virtual machine's other tenants only ever slow a timing down.

End to end: ``ccmr train`` of CC-CMR on the default cohort (site-c held out, seed 0), eager and
with ``--set train.compile=true``, side by side with one torch thread each, each in a fresh
process with an empty inductor cache (a site's first run; later runs reuse the cache): wall time,
compile included, and site-c accuracy, which must agree up to float rounding's effect on training.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import code_version, machine, update_block
from ccmr_core.config import load_config
from ccmr_core.data.sources import prepare
from ccmr_core.models.compiled import compile_encoders
from ccmr_core.models.registry import build_model, model_inputs, model_kwargs, training_model
from ccmr_core.synth.cohort import generate_cohort

MODELS = {"cc-cmr": ["model.name=cc-cmr"], "cc-cmr, LGE terms off": ["model.name=cc-cmr", "model.use_lge=false"],
          "cine-only CNN-LSTM": ["model.name=cine-only"]}


def matmul_flops(n: int = 1024, reps: int = 20, trials: int = 5) -> float:
    """The machine's float32 matmul rate: the best of ``trials`` timings of ``reps`` products
    (a shared virtual machine's other tenants only ever slow a timing down)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(trials):
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 * reps / best


def throughput(cfg, stage: str | None, steps: int = 4, trials: int = 3,
               compiled: bool = False) -> tuple[float, float, float]:
    """Patients/s and FLOP/s of one AdamW step at the config's grid and batch size (the best of
    ``trials`` timings of ``steps`` steps, as for the matmul rate it is compared with), and the
    seconds of the first step after counting (with ``compiled``: the compilation)."""
    s, t, h = cfg.data.ingest.slices, cfg.data.ingest.frames, cfg.data.ingest.size
    b = cfg.train.batch_size
    torch.manual_seed(0)
    batch = {"cine": torch.rand(b, s, t, h, h), "lge": torch.rand(b, s, h, h), "bio": torch.randn(b, 4, 32),
             "label": torch.randint(0, 5, (b,)), "has_lge": torch.ones(b, dtype=torch.bool),
             "meas": torch.randn(b, len(cfg.data.measurements)),
             "has_meas": torch.ones(b, len(cfg.data.measurements), dtype=torch.bool), "index": torch.arange(b)}
    m = build_model(cfg.model.name, **model_kwargs(cfg, 4))
    if stage:
        m.set_stage(stage)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad])

    def step():
        total, _ = m.losses(m(**model_inputs(m, batch, True)), batch)
        opt.zero_grad()
        total.mean().backward()
        opt.step()

    with FlopCounterMode(display=False) as fc:
        step()
    flops = fc.get_total_flops()
    if compiled:
        compile_encoders(m, torch.device("cpu"))
    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    dt = float("inf")
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        dt = min(dt, (time.perf_counter() - t0) / steps)
    return b / dt, flops / dt, first


def step_rows(peak: float) -> list[str]:
    rows = []
    for v, overrides in MODELS.items():
        cfg = load_config(overrides=overrides)
        for st in (["teacher", "student"] if v == "cc-cmr" else [None]):
            name = f"{v}{f' ({st} stage)' if st else ''}"
            eager = throughput(cfg, st)
            comp = throughput(cfg, st, compiled=True)
            print(f"{name}: {eager[0]:.1f} -> {comp[0]:.1f} patients/s", flush=True)
            rows.append(f"| {name} | {eager[0]:.1f} / {comp[0]:.1f} | {eager[1] / 1e9:.1f} / {comp[1] / 1e9:.1f} | "
                        f"{eager[1] / peak:.3f} / **{comp[1] / peak:.3f}** | {comp[0] / eager[0]:.2f}x | "
                        f"{comp[2]:.0f} s |")
    return rows


def epoch_rows(work: Path, rounds: int = 3) -> list[str]:
    """CC-CMR's teacher stage over one epoch of the real training batches (site-a + site-b, augmented,
    as ``ccmr train`` draws them), eager and compiled in turns, the best of ``rounds`` epochs each
    (the compiled model's first epoch, which compiles, is not counted)."""
    from torch.utils.data import Subset

    from ccmr_core.data.sources import MultiSite
    from ccmr_core.data.transforms import default_augmentation
    from ccmr_core.engine import train_epoch
    from ccmr_core.training import loader, split_indices

    cfg = load_config()
    caches = prepare(work / "cohort", cfg, work / "cache", progress=False)
    ds = MultiSite(caches, cfg)
    idx = split_indices(ds, cfg, "site-c")
    batches = list(loader(Subset(MultiSite(caches, cfg, transform=default_augmentation()), idx["train"]), cfg, True))
    runs = []
    for compiled in (False, True):
        torch.manual_seed(0)
        m = training_model(load_config(overrides=[f"train.compile={str(compiled).lower()}"]),
                           model_kwargs(cfg, ds.bio_channels), torch.device("cpu"))
        m.set_stage("teacher")
        runs.append((m, torch.optim.AdamW([p for p in m.parameters() if p.requires_grad])))
    best = [float("inf")] * 2
    for r in range(rounds + 1):
        for k, (m, opt) in enumerate(runs):
            t = train_epoch(m, batches, opt, torch.device("cpu"))["seconds"]
            if r:  # round 0 warms up (and compiles)
                best[k] = min(best[k], t)
    n = len(idx["train"])
    print(f"real batches, teacher epoch: {best[0]:.1f} -> {best[1]:.1f} s", flush=True)
    return [f"| {label} | {t:.1f} s | {n / t:.1f} |" for label, t in (("eager", best[0]), ("compiled", best[1]))] + [
        f"| speed-up | {best[0] / best[1]:.2f}x | |"]


def end_to_end(work: Path, epochs: int) -> list[str]:
    """Both trainings at once, one torch thread each, so that the shared machine's drift in speed
    falls on both alike (two runs one after the other once saw the matmul rate move by a fifth)."""
    cohort = work / "cohort"
    generate_cohort(cohort, progress=False)
    prepare(cohort, load_config(), work / "cache", progress=False)  # ingested before either run is timed
    outs = {label: work / f"train-{label}-e{epochs}-t1" for label in ("eager", "compiled")}
    runs = {}
    for label, flag in (("eager", "false"), ("compiled", "true")):
        out = outs[label]
        if not (out / "metrics.json").is_file():
            env = {**os.environ, "CCMR_CACHE": str(work / "cache"),
                   "TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix="inductor-", dir=work)}
            cmd = [sys.executable, "-m", "ccmr_core.cli", "train", "--data", str(cohort), "--out", str(out),
                   "--test-site", "site-c", "--quiet", "--model", "cc-cmr", "--set", f"train.epochs={epochs}",
                   "--set", "train.threads=1", "--set", f"train.compile={flag}"]
            runs[label] = (out, time.perf_counter(), subprocess.Popen(cmd, env=env))
    running = dict(runs)
    while running:  # each run's end as it comes; both waited for, so a failure leaves no training running
        time.sleep(1)
        for label, (out, t0, proc) in list(running.items()):
            if proc.poll() is not None:
                del running[label]
                if proc.returncode == 0:
                    (out / "wall_s.txt").write_text(f"{time.perf_counter() - t0:.1f}\n")
    failed = [f"{label} (exit {p.returncode}, output {out})" for label, (out, _, p) in runs.items() if p.returncode]
    if failed:
        raise SystemExit(f"end-to-end training failed: {'; '.join(failed)}")
    rows = []
    for label, out in outs.items():
        m = json.loads((out / "metrics.json").read_text())["test"]
        wall = float((out / "wall_s.txt").read_text())
        rows.append(f"| {label} | {wall / 60:.1f} min | {m['accuracy']:.3f} | {m['macro_auc']:.3f} | {m['n']} |")
        print(f"end to end, {label}: {wall / 60:.1f} min, site-c accuracy {m['accuracy']:.3f}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-epochs", type=int, default=40, help="epochs of the end-to-end runs (the default's 40)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--steps-only", action="store_true", help="the step rates alone (no training runs)")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ccmr-throughput-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work folder {work}", flush=True)
    peak = matmul_flops()
    rows = step_rows(peak)
    e2e = [] if args.steps_only else end_to_end(work, args.train_epochs)
    real = [] if args.steps_only else epoch_rows(work)
    b = load_config().train.batch_size
    text = f"""## Training throughput, eager and compiled (`python -m benchmarks.throughput`)

Machine: {machine()}. Code: commit {code_version()}. No GPU was lent to this task.
One AdamW step, batch {b}, default grid, {torch.get_num_threads()} torch threads; FLOPs counted by
`torch.utils.flop_counter` on the eager model (forward + backward); the best of 3 timings of 4 steps, against this
machine's float32 matmul rate ({peak / 1e9:.0f} GFLOP/s, 1024 x 1024 products, best of 5 timings, the same process).
Compiled: `train.compile: true` (`ccmr_core/models/compiled.py`: the image encoders through `torch.compile`,
batch dimension dynamic; the CNN-LSTM's convolution stack only); its first step compiles (seconds in the last column; in this process the eager rows ran
first and earlier models' kernels are reused, so later rows compile less).

| model | patients/s, eager / compiled | achieved GFLOP/s | ratio to matmul | speed-up | first compiled step |
|---|---|---|---|---|---|
{chr(10).join(rows)}
""" + (f"""
End to end: `ccmr train --model cc-cmr --test-site site-c` on the default cohort, {args.train_epochs} epochs, seed 0,
eager and compiled side by side with one torch thread each (`--set train.threads=1`), each a fresh process with an
empty inductor cache (compilation included; the cohort ingested before either is timed):

| training | wall time | site-c accuracy | macro AUC | test n |
|---|---|---|---|---|
{chr(10).join(e2e)}

The same teacher-stage step on the real training batches instead of the random batch above: one epoch of site-a +
site-b's training patients as `ccmr train` draws them (augmented, LGE missing for some, a smaller last
batch), eager and compiled in turns, the best of 3 epochs each (the compiling epoch not counted):

| teacher stage, one epoch | seconds | patients/s |
|---|---|---|
{chr(10).join(real)}
""" if e2e else "")
    update_block("throughput", text)
    print(text)


if __name__ == "__main__":
    main()
