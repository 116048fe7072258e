"""Where a simulated federation's data comes from: the bundled synthetic cohort (generated once,
then reused) and the coordinator-held validation set (a separate synthetic cohort)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from ccmr_core.config import ExperimentConfig
from ccmr_core.data.sources import MultiSite, default_cache_root, find_sites, prepare
from ccmr_core.synth.cohort import cohort_matches, generate_cohort

VALIDATION_SEED_OFFSET = 7777


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


def run_dir(out_dir: str, model: str) -> Path:
    """Absolute run folder, never inside the app directory (Flower would bundle it)."""
    base = Path.home() / "ccmr-runs"
    if out_dir:
        p = Path(out_dir).expanduser()
        return p if p.is_absolute() else base / p
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return base / f"{stamp}-{model}"
