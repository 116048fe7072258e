"""The CC-CMR paper's comparison on the default synthetic cohort, with a held-out site as the
external test set, over several seeds; plus training throughput on this CPU.

    python -m benchmarks.paper_table [--seeds 0 1 2] [--epochs 20] [--workdir DIR]

Models: cine-only CNN-LSTM, dual-path (cine + biomechanics), CC-CMR (cine-only inference) and
lge-only (needs gadolinium). Throughput: patients/s for one optimiser step at the default grid
and batch, and the ratio of the achieved FLOP/s (forward+backward FLOPs counted by PyTorch's
FlopCounterMode) to this machine's measured float32 matmul FLOP/s, all in one process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import machine, update_block
from ccmr_core.config import load_config
from ccmr_core.models.registry import build_model, model_inputs
from ccmr_core.synth.cohort import generate_cohort
from ccmr_core.training import model_kwargs, train_central

MODELS = ["cine-only", "dual-path", "cc-cmr", "lge-only"]


def matmul_flops(n: int = 1024, reps: int = 20) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t)


def throughput(cfg, name: str, batch: int = 8, steps: int = 5) -> tuple[float, float]:
    s, t, h = cfg.data.ingest.slices, cfg.data.ingest.frames, cfg.data.ingest.size
    torch.manual_seed(0)
    b = {"cine": torch.rand(batch, s, t, h, h), "lge": torch.rand(batch, s, h, h), "bio": torch.randn(batch, 4, 32),
         "label": torch.randint(0, 5, (batch,)), "has_lge": torch.ones(batch, dtype=torch.bool)}
    m = build_model(name, **model_kwargs(cfg.model_copy(update={"model": cfg.model.model_copy(update={"name": name})}),
                                         5, s, 4))
    opt = torch.optim.AdamW(m.parameters())

    def step():
        out = m(**model_inputs(m, b, True))
        total, _ = m.losses(out, b)
        opt.zero_grad()
        total.mean().backward()
        opt.step()

    with FlopCounterMode(display=False) as fc:
        step()
    flops = fc.get_total_flops()
    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    dt = (time.perf_counter() - t0) / steps
    return batch / dt, flops / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--test-site", default="site-c")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ccmr-paper-"))
    cohort = work / "cohort"
    generate_cohort(cohort, progress=False)
    results: dict[str, list[dict]] = {m: [] for m in MODELS}
    for seed in args.seeds:
        for name in MODELS:
            cfg = load_config(overrides=[f"model.name={name}", f"train.seed={seed}", f"train.epochs={args.epochs}",
                                         "train.patience=6"])
            out = work / "runs" / f"{name}-seed{seed}"
            if (out / "metrics.json").is_file():
                m = json.loads((out / "metrics.json").read_text())
            else:
                m = train_central(cohort, out, cfg, test_site=args.test_site, progress=False,
                                  cache_root=work / "cache")
            results[name].append(m["test"])
            t = m["test"]
            print(f"seed {seed} {name}: accuracy {t['accuracy']:.3f} AUC {t['macro_auc']:.3f} ECE {t['ece']:.3f}",
                  flush=True)
    cfg = load_config()
    peak = matmul_flops()
    rows = []
    for name in MODELS:
        r = results[name]
        acc = [x["accuracy"] for x in r]
        ci = "; ".join(f"{x['accuracy_ci95'][0]:.2f}-{x['accuracy_ci95'][1]:.2f}" for x in r)
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        used = {"lge-only": "LGE", "dual-path": "cine + biomechanics"}.get(name, "cine only")
        rows.append(f"| {name} | {used} | {statistics.mean(acc):.3f} ± {sd:.3f} "
                    f"| {ci} | {statistics.mean(x['macro_auc'] for x in r):.3f} | {statistics.mean(x['ece'] for x in r):.3f} "
                    f"| {r[0]['n']} |")
    base = statistics.mean(x["accuracy"] for x in results["cine-only"])
    ccmr = statistics.mean(x["accuracy"] for x in results["cc-cmr"])
    tp_rows = []
    for name in MODELS:
        pps, fps = throughput(cfg, name)
        tp_rows.append(f"| {name} | {pps:.1f} | {fps / 1e9:.1f} | {fps / peak:.3f} |")
    text = f"""## CC-CMR vs baselines, external test site (`python -m benchmarks.paper_table`)

Machine: {machine()}.
Default synthetic cohort (3 sites, 231 patients, seed 0); trained on {', '.join(s for s in ('site-a', 'site-b', 'site-c') if s != args.test_site)}
(stratified train/validation split), tested on all of **{args.test_site}** (another scanner and
case mix). Seeds {args.seeds}; up to {args.epochs} epochs, early stopping on validation loss
(patience 6), default config otherwise (grid 8 slices x 16 frames x 64x64, width 8).

| model | inference input | accuracy (mean ± sd over seeds) | 95% bootstrap CI per seed | macro AUC | ECE | test n |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}

CC-CMR minus cine-only: **{100 * (ccmr - base):+.1f} accuracy points** (the paper reports +4.3), with no
gadolinium at inference. {'The claim holds on this cohort.' if ccmr - base >= 4.3 else 'The paper margin is not reproduced here; see the note below the table.'}

Training throughput on this CPU (one AdamW step, batch 8, default grid; FLOPs counted by
`torch.utils.flop_counter`, forward + backward), compared with this machine's float32 matmul
rate ({peak / 1e9:.1f} GFLOP/s measured in the same process):

| model | patients/s | achieved GFLOP/s | ratio to matmul GFLOP/s |
|---|---|---|---|
{chr(10).join(tp_rows)}
"""
    update_block("paper", text)
    print(text)


if __name__ == "__main__":
    main()
