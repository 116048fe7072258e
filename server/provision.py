"""Where a simulated federation's data come from: the bundled synthetic cohort (generated once,
then reused), the coordinator-held validation set and the public pretraining cohort (separate
synthetic cohorts, never a site's data)."""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import json
import shutil
import time
from pathlib import Path

import torch

from ccmr_core.config import ExperimentConfig
from ccmr_core.data.sources import MultiSite, default_cache_root, find_sites, prepare
from ccmr_core.synth.cohort import cohort_matches, generate_cohort

VALIDATION_SEED_OFFSET = 7777
PUBLIC_SEED_OFFSET = 9191
PUBLIC_SITES = 2
PUBLIC_RETRY_SEED_STEP = 1000  # a public pretraining that fails the floor is retrained with seed + this
# train settings that change how a pretraining runs, not what it learns: a public model cached under
# other values of these is reused (a site's thread count or train.compile does not retrain it)
HOW_NOT_WHAT = ("threads", "device", "compile")


def cohort_dir(cfg: ExperimentConfig, data_dir: str = "") -> Path:
    if data_dir:
        return Path(data_dir).expanduser().absolute()
    s = cfg.data.synth
    return default_cache_root() / "cohorts" / f"synth-s{s.sites}-p{s.patients}-seed{s.seed}"


def ensure_cohort(cfg: ExperimentConfig, data_dir: str = "", progress: bool = False) -> Path:
    """The federation's data folder; the synthetic cohort is generated the first time only."""
    path = cohort_dir(cfg, data_dir)
    s = cfg.data.synth
    if data_dir and path.exists():
        find_sites(path)  # a given folder is used as it is (real sites or an existing cohort)
        return path
    if not cohort_matches(path, s.sites, s.patients, s.seed):
        print(f"generating the synthetic cohort ({s.sites} sites, {s.patients} patients, seed {s.seed}) "
              f"in {path} (once; later runs reuse it)", flush=True)
        generate_cohort(path, sites=s.sites, patients=s.patients, seed=s.seed, progress=progress, force=True)
    return path


def validation_set(cfg: ExperimentConfig) -> MultiSite | None:
    """The coordinator's own labelled validation cohort (synthetic, never from a hospital)."""
    n = cfg.federated.validation_patients
    if n <= 0:
        return None
    sites = cfg.data.synth.sites
    seed = cfg.data.synth.seed + VALIDATION_SEED_OFFSET
    path = default_cache_root() / "cohorts" / f"validation-s{sites}-p{n}-seed{seed}"
    if not cohort_matches(path, sites, max(n, sites), seed):
        generate_cohort(path, sites=sites, patients=max(n, sites), seed=seed, progress=False, force=True)
    caches = prepare(path, cfg, progress=False)
    return MultiSite(caches, cfg)


class PublicModelError(RuntimeError):
    """No public pretraining attempt reached federated.public_min_accuracy."""


def public_model(cfg: ExperimentConfig, progress: bool = False) -> dict[str, torch.Tensor]:
    """The global model's starting point, trained at the coordinator on a public cohort (in
    simulation: synthetic, with scanners of its own and its own seed, kept apart from every site):
    no privacy cost. The weights of the last of ``public_runs``."""
    from ccmr_core.checkpoint import load_model

    return load_model(public_runs(cfg, progress)[-1] / "model.pt")[1]["state_dict"]


def public_runs(cfg: ExperimentConfig, progress: bool = False) -> list[Path]:
    """The run folders of the public pretraining attempts, the last the one kept. A pretraining
    seed can go wrong, and the sites' heads cannot repair a poor frozen encoder, so the model must
    reach federated.public_min_accuracy on the public cohort's own validation patients before any
    site trains from it; otherwise the next seed is tried, up to federated.public_attempts. Each
    attempt is trained once per configuration and cached."""
    f = cfg.federated
    tried, runs = [], []
    for k in range(f.public_attempts):
        seed = cfg.train.seed + k * PUBLIC_RETRY_SEED_STEP
        out = _public_attempt(cfg, seed, progress)
        runs.append(out)
        acc, n = public_validation(out)
        tried.append(f"seed {seed}: {acc:.3f}")
        if acc >= f.public_min_accuracy:
            print(f"public model: pretraining seed {seed}, validation accuracy {acc:.3f} on {n} public patients "
                  f"(federated.public_min_accuracy {f.public_min_accuracy:g})", flush=True)
            return runs
        more = k + 1 < f.public_attempts
        print(f"public model: pretraining seed {seed} reached validation accuracy {acc:.3f} on {n} public patients, "
              f"below federated.public_min_accuracy {f.public_min_accuracy:g}"
              + ("; training again with another seed" if more else ""), flush=True)
    raise PublicModelError(
        f"no public pretraining reached federated.public_min_accuracy {f.public_min_accuracy:g} in "
        f"{f.public_attempts} attempt(s) ({'; '.join(tried)} validation accuracy): no site trains from it. Give the "
        "coordinator more public data or epochs (federated.public_patients, federated.public_epochs), more "
        "attempts (federated.public_attempts), or lower the floor")


def public_validation(run: Path) -> tuple[float, int]:
    """Accuracy of a trained run's final model on its validation patients (the last epoch's row of
    metrics.jsonl: the model kept is the last epoch's) and their number."""
    rows = (run / "metrics.jsonl").read_text().splitlines()
    n = json.loads((run / "metrics.json").read_text())["n_val"]
    return float(json.loads(rows[-1])["val"]["accuracy"]), int(n)


def _public_attempt(cfg: ExperimentConfig, seed: int, progress: bool) -> Path:
    """The run folder of one public pretraining with training seed ``seed`` (trained if not cached)."""
    from ccmr_core.config import validate
    from ccmr_core.synth.cohort import GENERATOR_VERSION
    from ccmr_core import training

    f = cfg.federated
    # the run's architecture exactly (its resolved alignment too), trained without DP on public data
    pcfg = validate({**cfg.model_dump(mode="json"), "privacy": {"mode": "none"},
                     "model": {**cfg.model.model_dump(mode="json"), "alignment": cfg.alignment},
                     "train": {**cfg.train.model_dump(mode="json"), "epochs": f.public_epochs, "seed": seed}},
                    "public pretraining")
    spec = {"generator": GENERATOR_VERSION, "patients": f.public_patients, "seed": cfg.data.synth.seed,
            "public_generator": f.public_generator,
            "data": pcfg.data.model_dump(mode="json", exclude={"synth"}), "model": pcfg.model.model_dump(mode="json"),
            "train": pcfg.train.model_dump(mode="json", exclude=set(HOW_NOT_WHAT))}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    out = default_cache_root() / "pretrained" / f"{cfg.model.name}-{key}"
    if (out / "model.pt").is_file():
        return out
    cohort_seed = cfg.data.synth.seed + PUBLIC_SEED_OFFSET
    kind = "public" if f.public_generator == "project" else "public-external"
    cohort = default_cache_root() / "cohorts" / f"{kind}-s{PUBLIC_SITES}-p{f.public_patients}-seed{cohort_seed}"
    if not cohort_matches(cohort, PUBLIC_SITES, f.public_patients, cohort_seed, kind=kind):
        generate_cohort(cohort, sites=PUBLIC_SITES, patients=f.public_patients, seed=cohort_seed, progress=progress,
                        force=True, kind=kind)
    print(f"pretraining {cfg.model.name} on the public cohort ({f.public_patients} synthetic patients, scanners "
          f"of its own, {f.public_generator} phantom) at the coordinator, {f.public_epochs} epochs, seed {seed}: no "
          "privacy cost", flush=True)
    t0 = time.perf_counter()
    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    m = training.train_central(cohort, tmp, pcfg, progress=progress)
    tmp.rename(out)
    print(f"public pretraining done in {(time.perf_counter() - t0) / 60:.1f} min (public test accuracy "
          f"{m['test']['accuracy']:.3f}, n={m['test']['n']})", flush=True)
    return out


def initial_state(cfg: ExperimentConfig, model, deployed: bool) -> str | None:
    """Load where the federation starts into ``model``: a model file the coordinator supplies, or
    public pretraining (simulation). Returns what was loaded, in words (None: random)."""
    from ccmr_core.checkpoint import load_model
    from ccmr_core.schedule import starts_pretrained

    f = cfg.federated
    if f.initial_model:
        _, blob = load_model(f.initial_model)
        if blob["model"] != cfg.model.name:
            raise ValueError(f"federated.initial_model {f.initial_model} is a {blob['model']} model; this run trains "
                             f"{cfg.model.name}")
        model.load_state_dict(blob["state_dict"])
        return f"the coordinator's model {f.initial_model}"
    if starts_pretrained(cfg):
        if deployed:
            raise ValueError("a deployed run that starts pretrained needs federated.initial_model: a model.pt the "
                             "coordinator supplies (e.g. trained on public data with 'ccmr train')")
        model.load_state_dict(public_model(cfg))
        return "public pretraining"
    return None


def run_key(out: Path) -> str:
    """The run's name at the sites (privacy ledger, optimiser state): the folder's name plus a
    hash of its full path, so that two runs in folders of the same name never share a ledger,
    while a resumed run (same folder) finds its own."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", out.name)[:64].lstrip(".") or "run"
    return f"{name}-{hashlib.sha256(str(Path(out).absolute()).encode()).hexdigest()[:10]}"


def run_dir(out_dir: str, model: str) -> Path:
    """Absolute run folder, never inside the app directory (Flower would bundle it)."""
    base = Path.home() / "ccmr-runs"
    if out_dir:
        p = Path(out_dir).expanduser()
        return p if p.is_absolute() else base / p
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return base / f"{stamp}-{model}"
