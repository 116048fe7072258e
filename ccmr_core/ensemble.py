"""``ccmr ensemble``: one model file from several finished runs (a deep ensemble).

The members must be classifiers for the same classes, on the same cine grid, trained on the same
sites with the same train/validation split (runs of one recipe with different ``train.seed``, or
different architectures on one cohort). The ensemble's referral thresholds are set again on those
validation patients, from the ensemble's own confidence and uncertainty: the members' thresholds
were set for a single model. Settings of inference (MC passes, test-time augmentation) are the
first member's. What it costs: every member reads every study.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Subset

from ccmr_core.checkpoint import load_classifier, save_model
from ccmr_core.config import validate
from ccmr_core.data.sources import MultiSite, prepare
from ccmr_core.engine import predict
from ccmr_core.files import sha256_file
from ccmr_core.models.ensemble import DeepEnsemble
from ccmr_core.referral import thresholds_from_outputs
from ccmr_core.training import loader, split_indices


def _same(key: str, values: list, paths: list[Path], what: str) -> None:
    """Every member has the first member's ``values[0]``, else an error naming the one that differs."""
    for p, v in zip(paths[1:], values[1:]):
        if v != values[0]:
            raise ValueError(f"{p} has {key} {v!r} but {paths[0]} has {values[0]!r}: {what}")


def make_ensemble(models: list[str | Path], data: str | Path, out: str | Path, force: bool = False,
                  progress: bool = True, cache_root: Path | None = None) -> dict:
    """Write the ensemble of ``models`` to ``out``, its referral thresholds set on the validation
    patients of ``data`` (the cohort the members were trained on); returns what it wrote."""
    out, paths = Path(out), [Path(m) for m in models]
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; choose another --out or pass --force")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"folder {out.parent} does not exist (--out names the ensemble's file)")
    if len(paths) < 2:
        raise ValueError(f"an ensemble needs two or more model files, got {len(paths)}")
    if len(set(p.resolve() for p in paths)) < len(paths):
        raise ValueError("a model file is given twice; each member is a different run")
    loaded = [load_classifier(p) for p in paths]
    blobs = [b for _, b in loaded]
    for p, b in zip(paths, blobs):
        if b["model"] == DeepEnsemble.name:
            raise ValueError(f"{p} is already an ensemble; give the runs' own model.pt files")
    cfgs = [validate(b["config"], f"{p} (embedded config)") for p, b in zip(paths, blobs)]
    infos = [b.get("info") or {} for b in blobs]
    _same("classes", [b["classes"] for b in blobs], paths, "the members must diagnose the same classes")
    _same("cine grid", [b["ingest"] for b in blobs], paths, "the members must read cine on the same grid")
    _same("training sites", [sorted(i.get("sites") or []) for i in infos], paths,
          "the members must be trained on the same sites")
    _same("test site", [i.get("test_site") for i in infos], paths, "the members must hold out the same site")
    _same("train/validation split", [(c.train.split_seed, c.train.val_fraction, c.train.test_fraction) for c in cfgs],
          paths, "the members must share their validation patients (train.split_seed, val_fraction, test_fraction)")
    ensemble = DeepEnsemble([m for m, _ in loaded])
    cfg, test_site = cfgs[0], infos[0].get("test_site")
    ds = MultiSite(prepare(data, cfg, cache_root, progress), cfg)
    if sorted(ds.site_names) != sorted(infos[0].get("sites") or ds.site_names):
        raise ValueError(f"{data} holds sites {', '.join(ds.site_names)} but the members were trained on "
                         f"{', '.join(infos[0]['sites'])}: give the cohort they were trained on (its validation "
                         "patients set the ensemble's referral thresholds)")
    val = split_indices(ds, cfg, test_site)["val"]
    if not val:
        raise ValueError(f"{data}: the members' split leaves no validation patients to set referral thresholds on")
    torch.manual_seed(cfg.train.seed)
    mc = cfg.model.mc_samples
    vo = predict(ensemble, loader(Subset(ds, val), cfg, shuffle=False), torch.device("cpu"), mc,
                 augment=cfg.model.test_time_augmentation)
    refer = thresholds_from_outputs(vo["probs"], vo["labels"].astype(int), vo["uncertainty"] if mc > 1 else None,
                                    cfg.model.refer_fraction)
    accuracy = float(np.mean(vo["probs"].argmax(1) == vo["labels"]))
    members = [{"file": str(p.resolve()), "sha256": sha256_file(p), "architecture": b["model"], "run": i.get("run")}
               for p, b, i in zip(paths, blobs, infos)]
    info = {"members": members, "sites": infos[0].get("sites"), "test_site": test_site, "n_val": len(val),
            "validation_accuracy": accuracy}
    save_model(out, ensemble.state_dict(), name=DeepEnsemble.name,
               kwargs={"members": [{"model": b["model"], "model_kwargs": b["model_kwargs"]} for b in blobs]},
               classes=blobs[0]["classes"], ingest=blobs[0]["ingest"], config=blobs[0]["config"], info=info,
               refer=refer)
    return {"file": str(out), **info, "refer": refer}
