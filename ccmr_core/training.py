"""Central training (``ccmr train``) and external evaluation (``ccmr evaluate``).

A run folder holds config.yaml (resolved), metrics.jsonl (one line per epoch), model.pt (the
best model by validation loss, with its config and class list), metrics.json (test metrics) and
report.html.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from ccmr_core.checkpoint import load_model, save_model
from ccmr_core.config import ExperimentConfig, dump_config, validate
from ccmr_core.data.sources import MultiSite, SourceError, prepare, subset
from ccmr_core.data.splits import stratified_split
from ccmr_core.data.transforms import default_augmentation
from ccmr_core.engine import evaluate, make_optimizer, predict, resolve_device, set_threads, train_epoch
from ccmr_core.models.registry import build_model
from ccmr_core.referral import thresholds_from_outputs
from ccmr_core.report import write_report

log = logging.getLogger("ccmr.train")


def model_kwargs(cfg: ExperimentConfig, n_classes: int, slices: int, bio_channels: int) -> dict:
    m = cfg.model
    return dict(n_classes=n_classes, slices=slices, width=m.width, dim=m.dim, proj=m.proj, dropout=m.dropout,
                alignment=m.alignment, temperature=m.temperature, learn_temperature=m.learn_temperature,
                bio_channels=bio_channels, bio_length=m.bio_length)


def loader(ds, cfg: ExperimentConfig, shuffle: bool, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=cfg.train.batch_size, shuffle=shuffle, num_workers=0, generator=g)


def split_indices(ds: MultiSite, cfg: ExperimentConfig, test_site: str | None) -> dict[str, list[int]]:
    t = cfg.train
    if test_site is None:
        return stratified_split(ds.labels, t.val_fraction, t.test_fraction, t.seed, ds.splits)
    if test_site not in ds.site_names:
        raise SourceError(f"--test-site {test_site!r} is not one of the sites: {', '.join(ds.site_names)}")
    rest = [i for i, s in enumerate(ds.sites) if s != test_site]
    sub = stratified_split([ds.labels[i] for i in rest], t.val_fraction / (1 - t.test_fraction), 0.0, t.seed)
    return {"train": [rest[i] for i in sub["train"]], "val": [rest[i] for i in sub["val"]],
            "test": [i for i, s in enumerate(ds.sites) if s == test_site]}


def train_central(data: str | Path, out: str | Path, cfg: ExperimentConfig, test_site: str | None = None,
                  progress: bool = True, cache_root: Path | None = None) -> dict:
    out = Path(out)
    if (out / "model.pt").exists():
        raise FileExistsError(f"{out} already holds a trained model; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    set_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    caches = prepare(data, cfg, cache_root, progress)
    ds = MultiSite(caches, cfg)
    idx = split_indices(ds, cfg, test_site)
    if not idx["train"] or not idx["val"]:
        raise SourceError(f"not enough patients to split ({len(ds)} usable); add data or lower train.val_fraction")
    classes = list(cfg.data.classes)
    kwargs = model_kwargs(cfg, len(classes), ds.cine_shape[0], ds.bio_channels)
    model = build_model(cfg.model.name, **kwargs).to(device)
    train_ds = MultiSite(caches, cfg, transform=default_augmentation() if cfg.train.augment else None)
    train_loader = loader(subset(train_ds, idx["train"]), cfg, shuffle=True, seed=cfg.train.seed)
    val_loader = loader(subset(ds, idx["val"]), cfg, shuffle=False)
    opt = make_optimizer(model, cfg.train)
    (out / "config.yaml").write_text(dump_config(cfg))
    log.info("training %s on %d patients (validation %d, test %d) from %s", cfg.model.name, len(idx["train"]),
             len(idx["val"]), len(idx["test"]), ", ".join(ds.site_names))
    best, best_loss, best_epoch, stale = None, float("inf"), 0, 0
    history = []
    with open(out / "metrics.jsonl", "w") as mf:
        for epoch in range(1, cfg.train.epochs + 1):
            tr = train_epoch(model, train_loader, opt, device, progress=progress, desc=f"epoch {epoch}")
            va = evaluate(model, val_loader, device, classes)
            row = {"epoch": epoch, "train": tr, "val": {k: va[k] for k in ("loss", "accuracy", "macro_auc", "ece")}}
            history.append(row)
            mf.write(json.dumps(row) + "\n")
            mf.flush()
            improved = va["loss"] < best_loss - 1e-4
            if improved:
                best, best_loss, best_epoch, stale = copy.deepcopy(model.state_dict()), va["loss"], epoch, 0
            else:
                stale += 1
            msg = (f"epoch {epoch}: train loss {tr['loss']:.3f}, validation loss {va['loss']:.3f}, "
                   f"accuracy {va['accuracy']:.3f}{' (best so far)' if improved else ''}")
            log.info(msg)
            if progress:
                print(msg, flush=True)
            if stale >= cfg.train.patience:
                log.info("stopping early: no validation improvement for %d epochs", stale)
                break
    model.load_state_dict(best)
    vo = predict(model, val_loader, device, cfg.model.mc_samples)
    refer = thresholds_from_outputs(vo["probs"], vo["labels"].astype(int),
                                    vo["uncertainty"] if cfg.model.mc_samples > 1 else None, cfg.model.refer_fraction)
    log.info("referral thresholds from %d validation patients: confidence below %.2f or uncertainty above %s",
             refer["validation_n"], refer["confidence"], refer["uncertainty"])
    info = {"best_epoch": best_epoch, "sites": ds.site_names, "test_site": test_site,
            "n_train": len(idx["train"]), "n_val": len(idx["val"]), "n_test": len(idx["test"]), "run": out.name}
    save_model(out / "model.pt", model, name=cfg.model.name, kwargs=kwargs, classes=classes,
               ingest=cfg.data.ingest.model_dump(mode="json"), config=cfg.model_dump(mode="json"), info=info,
               refer=refer)
    metrics: dict = {"model": cfg.model.name, **info, "refer": refer}
    if idx["test"]:
        test = evaluate(model, loader(subset(ds, idx["test"]), cfg, shuffle=False), device, classes,
                        mc_samples=cfg.model.mc_samples, seed=cfg.train.seed)
        metrics["test"] = test
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    write_report(out)
    return metrics


def evaluate_saved(model_path: str | Path, data: str | Path, out: str | Path | None = None, progress: bool = True,
                   cache_root: Path | None = None) -> dict:
    """External validation: a saved model on another site's data, ingested with the model's grid."""
    model, blob = load_model(model_path)
    cfg = validate(blob["config"], f"{model_path} (embedded config)")
    caches = prepare(data, cfg, cache_root, progress)
    ds = MultiSite(caches, cfg)
    metrics = {"model": blob["model"], "model_file": str(model_path), "data": str(data), "sites": ds.site_names,
               "test": evaluate(model, loader(ds, cfg, shuffle=False), torch.device("cpu"), blob["classes"],
                                mc_samples=cfg.model.mc_samples)}
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics
