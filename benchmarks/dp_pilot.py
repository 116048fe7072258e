"""Pilot of the private fine-tuning options, chosen on validation: what the sites train under DP
(heads, diagnostic layer, class biases), clipping norm, learning rate, augmentation multiplicity,
tail averaging, each against the default at epsilon 3 and, for some, without DP.

    python -m benchmarks.dp_pilot [--seeds 0 1] [--workdir DIR]

The sites' cohort and the coordinator's public pretraining are those of
``python -m benchmarks.federated --dp-only --public-generator external`` (pass its work folder to
reuse them). Every run is the README main job's federation in one process (tests/inprocess.py)
with the YAML and run config shown per row; run folders are kept in the work folder, so a rerun
only prints. Printed per run: the sites' pooled and the coordinator's validation loss, averaged
over the last three rounds (tail-averaging rows: the final, calibrated model's coordinator
validation loss, since only the final model differs), and the test accuracy, for after the choice.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import yaml

from benchmarks.federated import federated
from ccmr_core.synth.cohort import generate_cohort

# row -> (run folder prefix, config beyond the external public cohort, DP at epsilon 3)
VARIANTS = {
    "DP, heads (default), clipping 1": ("head-C1", {"privacy": {"finetune": "head", "max_grad_norm": 1}}, True),
    "DP, heads, 4 views per patient per step": ("head-mult4",
                                                {"privacy": {"finetune": "head", "finetune_multiplicity": 4}}, True),
    "DP, heads, 8 views per patient per step": ("head-mult8",
                                                {"privacy": {"finetune": "head", "finetune_multiplicity": 8}}, True),
    "DP, diagnostic layer alone, clipping 1": ("classifier-C1",
                                               {"privacy": {"finetune": "classifier", "max_grad_norm": 1}}, True),
    "DP, diagnostic layer alone, clipping 0.3": ("classifier-C0.3",
                                                 {"privacy": {"finetune": "classifier", "max_grad_norm": 0.3}}, True),
    "DP, diagnostic layer alone, learning rate 0.02": ("classifier-dp3-lr0.02",
                                                       {"privacy": {"finetune": "classifier", "finetune_lr": 0.02}}, True),
    "DP, diagnostic layer alone, learning rate 0.1": ("classifier-dp3-lr0.1",
                                                      {"privacy": {"finetune": "classifier", "finetune_lr": 0.1}}, True),
    "DP, the 5 class biases alone": ("bias-dp3", {"privacy": {"finetune": "bias"}}, True),
    "no DP, the 5 class biases alone": ("bias-nodp", {"privacy": {"finetune": "bias"}}, False),
    "no DP, diagnostic layer alone": ("classifier-nodp-lr0.002",
                                      {"privacy": {"finetune": "classifier", "finetune_lr": 0.002}}, False),
    "no DP, diagnostic layer alone, learning rate 0.02": ("classifier-nodp-lr0.02",
                                                          {"privacy": {"finetune": "classifier", "finetune_lr": 0.02}},
                                                          False),
    "DP, heads, mean of the last 5 rounds' models": ("head-avg5", {"federated": {"average_last": 5},
                                                                   "privacy": {"finetune": "head"}}, True),
    "DP, heads, mean of all 15 rounds' models": ("head-avg15", {"federated": {"average_last": 15},
                                                                "privacy": {"finetune": "head"}}, True),
}
PUBLIC = {"public_generator": "external", "pretrain": "public"}  # every row's coordinator pretraining


def run(work: Path, cohort: Path, prefix: str, config: dict, dp: bool, seed: int) -> str:
    yaml_path = work / f"{prefix}.yaml"
    yaml_path.write_text(yaml.safe_dump({**config, "federated": {**PUBLIC, **config.get("federated", {})}}))
    out = work / f"{prefix}-s{seed}"
    over = {"train-seed": seed, "alignment": "slice", **({"dp": "sample", "target-epsilon": 3.0} if dp else {})}
    r, _ = federated(cohort, out, **over, config=str(yaml_path))
    test = r["test"]["accuracy"]
    if "average_last" in config.get("federated", {}):  # only the final model differs from the default run
        final = json.loads((out / "metrics.json").read_text())["server_validation"]["loss"]
        return f"final model {final:.3f} (coordinator; test {test:.3f})"
    last = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][-3:]
    sites = sum(x["federated_validation"]["loss"] for x in last) / len(last)
    coord = sum(x["server_validation"]["loss"] for x in last) / len(last)
    return f"{sites:.3f} / {coord:.3f} (test {test:.3f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--workdir", default=None, help="run folders (a rerun reuses them)")
    ap.add_argument("--cohort", default=None, help="the sites' cohort (default: generated in the work folder)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ccmr-dp-pilot-"))
    work.mkdir(parents=True, exist_ok=True)
    cohort = Path(args.cohort) if args.cohort else work / "cohort"
    generate_cohort(cohort, progress=False)
    print(f"work folder {work}; validation loss: sites' / coordinator's (last three rounds)", flush=True)
    print("| run | " + " | ".join(f"seed {s}" for s in args.seeds) + " |\n|---|" + "---|" * len(args.seeds), flush=True)
    for name in args.variants:
        prefix, config, dp = VARIANTS[name]
        print(f"| {name} | " + " | ".join(run(work, cohort, prefix, config, dp, s) for s in args.seeds) + " |", flush=True)


if __name__ == "__main__":
    main()
