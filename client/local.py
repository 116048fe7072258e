"""What one SuperNode does with its hospital data, independent of Flower's message types.

A SuperNode hosts one site (deployment: node config ``data-path`` and ``site-name``) or, in a
simulation with fewer SuperNodes than sites, several (sites are dealt out by partition id; each
hosted site still trains and is accounted for separately, and their updates are averaged with
the same num-examples weights the server would use, so the global model is unchanged).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Subset

from ccmr_core.config import ExperimentConfig
from ccmr_core.data.dataset import CacheDataset
from ccmr_core.data.ingest import MANIFEST, ingest
from ccmr_core.data.reports import WithReports, read_reports
from ccmr_core.data.sources import default_cache_root, find_sites, site_cache
from ccmr_core.files import atomic_path, write_atomic
from ccmr_core.frozen_views import FrozenViews, frozen_parameters, same_frozen
from ccmr_core.data.splits import stratified_split
from ccmr_core.data.transforms import default_augmentation
from ccmr_core.models.registry import reads_reports
from ccmr_core.privacy import BudgetExhausted, Ledger
from client.seeds import site_seed


@dataclass
class Site:
    index: int  # position in the federation's site list (for per-site metrics)
    name: str
    cache: Path
    train: CacheDataset | WithReports
    eval: CacheDataset | WithReports  # no augmentation
    split: dict[str, list[int]]


_SITES: dict[tuple, list[Site]] = {}  # a SuperNode process keeps its datasets across rounds


def hosted_sites(node_config: dict, cohort_dir: str) -> list[tuple[int, str, Path]]:
    """(index, name, folder) of the sites this SuperNode serves (a site folder of DICOM, or a cache
    that ``ccmr ingest`` already prepared)."""
    if "data-path" in node_config:
        path = Path(str(node_config["data-path"]))
        name = str(node_config.get("site-name", path.name))
        return [(int(node_config.get("site-index", 0)), name, path)]
    sites = find_sites(cohort_dir)
    pid = int(node_config.get("partition-id", 0))
    n = int(node_config.get("num-partitions", len(sites)))
    return [(k, name, path) for k, (name, path, _) in enumerate(sites) if k % n == pid]


def load_sites(node_config: dict, cfg: ExperimentConfig, cohort_dir: str) -> list[Site]:
    """The hosted sites' datasets and splits, kept for the life of the process; a model that reads
    reports (CMR-CLIP) gets each study's report from the site's own reports.csv."""
    with_reports = reads_reports(cfg.model.name)
    key = (json.dumps(node_config, sort_keys=True, default=str), cohort_dir,
           json.dumps(cfg.data.model_dump(mode="json"), sort_keys=True), cfg.train.split_seed,
           cfg.train.val_fraction, cfg.train.test_fraction, cfg.train.augment, cfg.train.sentence_sampling, with_reports)
    if key in _SITES:
        return _SITES[key]
    out = []
    for index, name, path in hosted_sites(node_config, cohort_dir):
        if (path / MANIFEST).is_file():  # already ingested
            cache = path
        else:  # incremental: the first round ingests, later processes only check what changed
            cache = site_cache(path, cfg)
            ingest(path, cache, cfg.data.ingest, cfg.data.classes, progress=False, workers=1)
        kw = dict(bio_length=cfg.model.bio_length, measurements=cfg.data.measurements)
        train = CacheDataset(cache, cfg.data.classes, transform=default_augmentation() if cfg.train.augment else None,
                             **kw)
        evald = CacheDataset(cache, cfg.data.classes, **kw)
        split = stratified_split(evald.labels, cfg.train.val_fraction, cfg.train.test_fraction, cfg.train.split_seed,
                                 evald.splits)
        if with_reports:  # read where the studies are; the text stays at the site like the images
            reports = read_reports(path, cfg.data.report_column)
            train = WithReports(train, train.patient_ids, reports,
                                sentence_p=cfg.train.sentence_sampling if cfg.train.augment else 0.0)
            evald = WithReports(evald, evald.patient_ids, reports)
        out.append(Site(index, name, cache, train, evald, split))
    _SITES[key] = out
    return out


_VIEWS: dict[str, tuple[tuple, FrozenViews]] = {}  # per site: the latest views of its training patients


def head_views(site: Site, model: torch.nn.Module, cfg: ExperimentConfig, device: torch.device) -> FrozenViews:
    """The site's training patients through the frozen part of ``model`` (heads-only fine-tuning),
    ``privacy.finetune_views`` augmented views each: computed in the first round and kept for the
    life of the process while the frozen weights the coordinator sends stay the same (they do
    when every site trains the heads only). A step draws ``privacy.finetune_multiplicity`` of them
    per patient."""
    idx = site.split["train"]
    spec = (str(site.cache), tuple(idx), cfg.privacy.finetune_views, cfg.train.seed,
            json.dumps(cfg.data.model_dump(mode="json"), sort_keys=True), cfg.train.augment)
    kept = _VIEWS.get(site.name)
    if kept is not None and kept[0] == spec and same_frozen(kept[1].frozen_state, frozen_parameters(model)):
        kept[1].per_step = cfg.privacy.finetune_multiplicity  # what a step draws, not what was computed
        return kept[1]
    t0 = time.perf_counter()
    views = FrozenViews(model, Subset(site.train, idx), cfg.privacy.finetune_views, device,
                        seed=site_seed(cfg.train.seed, "views", 0, site.index),
                        per_step=cfg.privacy.finetune_multiplicity)
    _VIEWS[site.name] = (spec, views)
    print(f"[{site.name}] {cfg.privacy.finetune_views} augmented views of {len(idx)} training patients through the "
          f"frozen encoders in {time.perf_counter() - t0:.1f} s (kept while the encoders stay frozen; the heads "
          "train on them)", flush=True)
    return views


RUN_KEY = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


def check_run_key(run_key: str) -> str:
    """The coordinator names the run; the site uses the name as a folder, so it must be a plain
    name (a hostile ``../..`` would otherwise write outside the site's state folders)."""
    if not RUN_KEY.fullmatch(run_key):
        raise ValueError(f"run key {run_key!r} is not a plain name (letters, digits, '.', '_', '-'; at most 128)")
    return run_key


def ledger_path(site: Site, run_key: str) -> Path:
    """The site's privacy ledger lives at the site (next to its cache), per federated run."""
    root = Path(os.environ.get("CCMR_PRIVACY_DIR", default_cache_root() / "privacy"))
    return root / check_run_key(run_key) / f"{site.name}.json"


def read_ledger(site: Site, run_key: str) -> Ledger:
    p = ledger_path(site, run_key)
    return Ledger.from_json(p.read_text()) if p.is_file() else Ledger()


def write_ledger(site: Site, run_key: str, ledger: Ledger) -> None:
    p = ledger_path(site, run_key)
    p.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(p, ledger.to_json())


def lifetime_ledger(site: Site, run_key: str, current: Ledger) -> Ledger:
    """Everything this site has spent under patient-level DP, in every run it took part in (the
    per-run ledgers at the site; this run's as ``current``): RDP composes over runs on the same
    patients, so a coordinator cannot start a fresh budget by naming a new run."""
    history = []
    for p in sorted(ledger_path(site, run_key).parent.parent.glob(f"*/{site.name}.json")):
        if p.parent.name != run_key:
            try:
                history += Ledger.from_json(p.read_text()).history
            except (ValueError, KeyError, TypeError) as e:  # a damaged ledger cannot be left out silently
                raise BudgetExhausted(f"the privacy ledger {p} cannot be read ({type(e).__name__}); this site "
                                      "declines to train until it is restored") from None
    return Ledger(current.noise_multiplier, history + list(current.history))


def check_lifetime_budget(site: Site, run_key: str, current: Ledger, round_cost: tuple[float, float, int],
                          cap: float | None, delta: float) -> None:
    """Raise BudgetExhausted if the coming round would take the site's lifetime epsilon (all runs,
    at the site's own delta) above its cap (the site's policy; None = no cap)."""
    if cap is None:
        return
    life = lifetime_ledger(site, run_key, current)
    after = life.epsilon(delta, round_cost)
    if after > cap * (1 + 1e-6):
        raise BudgetExhausted(f"this site's lifetime privacy budget: epsilon {life.epsilon(delta):.2f} spent over all "
                              f"runs, the next round would reach {after:.2f} > the site's cap {cap:g} (delta "
                              f"{delta:g}); this site declines to train")


def _site_state_path(kind: str, site: Site, run_key: str) -> Path:
    return default_cache_root() / kind / check_run_key(run_key) / f"{site.name}.pt"


def _load_site_state(p: Path):
    """What a round of this run kept at the site, or None: none yet, or not readable (another
    model's, a damaged file), in which case the caller starts that state again."""
    if not p.is_file():
        return None
    try:
        return torch.load(p, weights_only=True)
    except (ValueError, RuntimeError, EOFError, AttributeError, pickle.UnpicklingError):
        return None


def _keep_site_state(p: Path, state) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(p) as tmp:  # a round stopped half-way leaves the previous state whole
        torch.save(state, tmp)


def optimizer_path(site: Site, run_key: str) -> Path:
    """The site's optimiser state (AdamW moments) between rounds of one run, kept at the site."""
    return _site_state_path("optimizer", site, run_key)


def restore_optimizer(opt: torch.optim.Optimizer, site: Site, run_key: str, rnd: int, stage: str) -> bool:
    """Continue the optimiser of the site's previous round (same run, same stage, round rnd-1):
    rebuilding it each round restarts Adam's moment estimates, whose first steps then move every
    weight by about the full learning rate whatever its gradient. Returns whether it continued."""
    saved = _load_site_state(optimizer_path(site, run_key))
    if not isinstance(saved, dict) or saved.get("round") != rnd - 1 or saved.get("stage") != stage:
        return False
    try:
        opt.load_state_dict(saved["state"])
    except (ValueError, KeyError, RuntimeError):  # another model's
        return False
    return True


def keep_optimizer(opt: torch.optim.Optimizer, site: Site, run_key: str, rnd: int, stage: str) -> None:
    _keep_site_state(optimizer_path(site, run_key), {"round": rnd, "stage": stage, "state": opt.state_dict()})


def control_path(site: Site, run_key: str) -> Path:
    """The site's SCAFFOLD control variate c_i between rounds of one run, kept at the site."""
    return _site_state_path("control", site, run_key)


def read_control(site: Site, run_key: str, rnd: int) -> dict[str, torch.Tensor] | None:
    """The site's c_i to start round ``rnd`` of this run from: the one it kept after its last round
    before ``rnd`` (SCAFFOLD keeps c_i through rounds a site is not sampled), or, when round ``rnd``
    is being done again (a resumed coordinator redoes the round after its last checkpoint), the one
    it started that round from, so that c_i and the coordinator's checkpointed c agree. None: none
    yet, or not readable, or kept in a later round; the site then starts again from zero, as in the
    first round."""
    saved = _load_site_state(control_path(site, run_key))
    if not isinstance(saved, dict) or not isinstance(saved.get("round"), int):
        return None
    kept = saved.get("c") if saved["round"] < rnd else saved.get("before") if saved["round"] == rnd else None
    if not isinstance(kept, dict):
        return None
    return {str(k): v for k, v in kept.items() if isinstance(v, torch.Tensor)} or None


def keep_control(site: Site, run_key: str, rnd: int, c: dict[str, torch.Tensor],
                 before: dict[str, torch.Tensor] | None) -> None:
    """Keep the site's c_i after round ``rnd`` and the one it started that round from (``before``)."""
    before = {k: v.detach().cpu() for k, v in (before or {}).items()}
    _keep_site_state(control_path(site, run_key), {"round": rnd, "c": c, "before": before})


def average_states(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    total = sum(weights)
    return {k: sum(s[k].float() * (w / total) for s, w in zip(states, weights)).to(states[0][k].dtype)
            for k in states[0]}
