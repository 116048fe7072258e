"""Central training (``ccmr train``) and external evaluation (``ccmr evaluate``).

Training follows a fixed schedule (ccmr_core/schedule.py: stages, warm-up, cosine to zero) and
keeps the model at its end; validation is monitored every epoch, and afterwards sets the
calibration temperature and the referral thresholds. A run folder holds config.yaml (resolved),
metrics.jsonl (one line per epoch), model.pt (the model with its config and class list),
metrics.json (test metrics) and report.html.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from ccmr_core.calibration import fit_temperature, nll_sums
from ccmr_core.checkpoint import load_classifier, save_model
from ccmr_core.config import ExperimentConfig, dump_config, validate
from ccmr_core.data.sources import MultiSite, SourceError, prepare
from ccmr_core.data.splits import labelled_subset, stratified_split
from ccmr_core.data.transforms import default_augmentation
from ccmr_core.engine import evaluate, make_optimizer, predict, resolve_device, set_threads, summarize, train_epoch
from ccmr_core.models.registry import changed_settings, model_kwargs, training_model
from ccmr_core.files import write_csv
from ccmr_core.referral import referred, thresholds_from_outputs
from ccmr_core.report import write_report
from ccmr_core.schedule import plan_for, set_stage

log = logging.getLogger("ccmr.train")


def loader(ds, cfg: ExperimentConfig, shuffle: bool, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=cfg.train.batch_size, shuffle=shuffle, num_workers=0, generator=g)


def split_indices(ds: MultiSite, cfg: ExperimentConfig, test_site: str | None) -> dict[str, list[int]]:
    t = cfg.train
    if test_site is None:
        return stratified_split(ds.labels, t.val_fraction, t.test_fraction, t.split_seed, ds.splits)
    if test_site not in ds.site_names:
        raise SourceError(f"--test-site {test_site!r} is not one of the sites: {', '.join(ds.site_names)}")
    rest = [i for i, s in enumerate(ds.sites) if s != test_site]
    sub = stratified_split([ds.labels[i] for i in rest], t.val_fraction / (1 - t.test_fraction), 0.0, t.split_seed)
    return {"train": [rest[i] for i in sub["train"]], "val": [rest[i] for i in sub["val"]],
            "test": [i for i, s in enumerate(ds.sites) if s == test_site]}


def calibrate(model: nn.Module, val_loader, device: torch.device) -> float:
    """Fit the model's calibration temperature on the validation patients' raw logits and store it."""
    vo = predict(model, val_loader, device)
    model.calibration.fill_(fit_temperature(nll_sums(vo["logits"], vo["labels"].astype(int))))
    return float(model.calibration)


def unstated_measurements(ds: MultiSite, rows: list[int], names: tuple[str, ...]) -> list[str]:
    """The measurements of ``names`` that no patient of ``rows`` has a value for."""
    return [m for m in names if not any(m in ds.stated_measurements[i] for i in rows)]


def train_central(data: str | Path, out: str | Path, cfg: ExperimentConfig, test_site: str | None = None,
                  progress: bool = True, cache_root: Path | None = None,
                  splits: dict[str, list[int]] | None = None, start_from: str | Path | None = None) -> dict:
    """Train on ``data`` (see the module's docstring). ``splits``: given train/val/test rows of the
    cohort (e.g. the very patients each site of a federation holds out), instead of a split here.
    ``start_from``: a model file of the same model and settings (e.g. the federation's) whose last
    stage is fine-tuned, instead of training from random initialisation."""
    out = Path(out)
    if (out / "model.pt").exists():
        raise FileExistsError(f"{out} already holds a trained model; choose another --out")
    set_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    caches = prepare(data, cfg, cache_root, progress)
    ds = MultiSite(caches, cfg)
    idx = splits if splits is not None else split_indices(ds, cfg, test_site)
    if not idx["train"] or not idx["val"]:
        raise SourceError(f"not enough patients to split ({len(ds)} usable); add data or lower train.val_fraction")
    classes = list(cfg.data.classes)
    if absent := unstated_measurements(ds, idx["train"], cfg.data.measurements):
        log.warning("no training patient's labels.csv states %s, so the model learns no target for it (a "
                    "synthetic cohort made before the column existed lacks it: regenerate it with ccmr synth "
                    "--force, or leave it out of data.measurements)", ", ".join(absent))
    kwargs = model_kwargs(cfg, ds.bio_channels)
    model = training_model(cfg, kwargs, device)
    if start_from is not None:
        load_start(model, start_from, cfg.model.name, kwargs)
    train_ds = MultiSite(caches, cfg, transform=default_augmentation() if cfg.train.augment else None)
    labelled = labelled_subset(ds.labels, idx["train"], cfg.train.label_fraction, cfg.train.seed)
    train_ds.hidden_labels = frozenset(idx["train"]) - frozenset(labelled)
    train_loader = loader(Subset(train_ds, idx["train"]), cfg, shuffle=True, seed=cfg.train.seed)
    val_loader = loader(Subset(ds, idx["val"]), cfg, shuffle=False)
    plan = plan_for(model, cfg.train.epochs, cfg.model.teacher_share, pretrained=start_from is not None)
    out.mkdir(parents=True, exist_ok=True)  # only now: a run refused for its data or settings leaves no folder
    (out / "config.yaml").write_text(dump_config(cfg))
    log.info("training %s on %d patients (validation %d, test %d) from %s; %s", cfg.model.name, len(idx["train"]),
             len(idx["val"]), len(idx["test"]), ", ".join(ds.site_names),
             ", then ".join(f"{st} for {hi - lo} epochs" for st, lo, hi in plan.bounds()))
    stage, opt = None, None
    with open(out / "metrics.jsonl", "w") as mf:
        for epoch in range(plan.epochs):
            if plan.stage_at(epoch) != stage:
                stage = plan.stage_at(epoch)
                set_stage(model, stage)
                opt = make_optimizer(model, cfg.train)
            tr = train_epoch(model, train_loader, opt, device, lr_at=lambda f, e=epoch: plan.lr_factor(e + f),
                             progress=progress, desc=f"epoch {epoch + 1} ({stage})")
            va = evaluate(model, val_loader, device, classes)
            row = {"epoch": epoch + 1, "stage": stage, "train": tr,
                   "val": {k: va[k] for k in ("loss", "accuracy", "macro_auc", "ece")}}
            if hasattr(model, "weighting"):
                row["task_weights"] = model.weighting.weights()
            mf.write(json.dumps(row) + "\n")
            mf.flush()
            diag = tr.get("cls", tr.get("teacher_cls", tr["loss"]))  # the weighted total can be negative
            msg = (f"epoch {epoch + 1}/{plan.epochs} ({stage}): diagnosis loss {diag:.3f} (train), {va['loss']:.3f} "
                   f"(validation), validation accuracy {va['accuracy']:.3f}")
            log.info(msg)
            if progress:
                print(msg, flush=True)
    set_stage(model, plan.stages[-1])
    calibrate(model, val_loader, device)
    tta = cfg.model.test_time_augmentation
    vo = predict(model, val_loader, device, cfg.model.mc_samples, augment=tta)
    refer = thresholds_from_outputs(vo["probs"], vo["labels"].astype(int),
                                    vo["uncertainty"] if cfg.model.mc_samples > 1 else None, cfg.model.refer_fraction)
    log.info("calibration temperature %.2f; referral thresholds from %d validation patients: confidence below %.2f "
             "or uncertainty above %s", float(model.calibration), refer["validation_n"], refer["confidence"],
             refer["uncertainty"])
    info = {"epochs": plan.epochs, "sites": ds.site_names, "test_site": test_site, "n_train": len(idx["train"]),
            "n_train_labelled": len(labelled),
            "n_val": len(idx["val"]), "n_test": len(idx["test"]), "run": out.name,
            "calibration_temperature": float(model.calibration),
            **({"start_from": str(Path(start_from).absolute())} if start_from is not None else {})}
    save_model(out / "model.pt", model.state_dict(), name=cfg.model.name, kwargs=kwargs, classes=classes,
               ingest=cfg.data.ingest.model_dump(mode="json"), config=cfg.model_dump(mode="json"), info=info,
               refer=refer)
    metrics: dict = {"model": cfg.model.name, **info, "refer": refer}
    if idx["test"]:
        torch.manual_seed(cfg.train.seed)  # the MC-dropout draws: evaluate_saved repeats them exactly
        to = predict(model, loader(Subset(ds, idx["test"]), cfg, shuffle=False), device, cfg.model.mc_samples,
                     augment=tta)
        metrics["test"] = summarize(to, classes, cfg.model.mc_samples, cfg.train.seed, refer)
        write_predictions(out / "test_predictions.csv", to, ds, classes, refer)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    write_report(out)
    return metrics


def load_start(model: nn.Module, path: str | Path, name: str, kwargs: dict) -> None:
    """Load the weights of model file ``path`` into ``model`` (model ``name`` built from ``kwargs``)
    to fine-tune from; a file of another model, or of the same model built with other settings, is
    refused naming what differs."""
    _, blob = load_classifier(path)
    if blob["model"] != name:
        raise ValueError(f"--start-from {path} is a {blob['model']} model; this run trains {name}: fine-tune it as a "
                         f"{blob['model']} model (its own config is the default with --start-from)")
    changed = [f"{k}: {a!r} in the file, {b!r} here" for k, a, b in changed_settings(name, blob["model_kwargs"], kwargs)]
    if changed:
        raise ValueError(f"--start-from {path} was built with other settings than this run's ({'; '.join(changed)}); "
                         "leave the architecture as the file's own config sets it")
    model.load_state_dict(blob["state_dict"])


def write_predictions(path: Path, out: dict, ds: MultiSite, classes: list[str], refer: dict | None) -> None:
    """Per-patient outputs of a central run's test (they stay with the researcher who trained it):
    patient, site, truth, prediction, calibrated probabilities, uncertainty, referral."""
    conf = out["probs"].max(1)
    unc = out["uncertainty"]
    ref = referred(conf, unc, refer) if refer else np.zeros(len(conf), bool)
    header = ["patient_id", "site", "label", "predicted", "confidence", "uncertainty", "referred",
              *(f"p_{c}" for c in classes)]
    rows = [[ds.patient_ids[i].split("/", 1)[1], ds.sites[i], classes[int(out["labels"][k])],
             classes[int(out["probs"][k].argmax())], f"{conf[k]:.5f}", f"{unc[k]:.6g}", int(ref[k]),
             *(f"{v:.5f}" for v in out["probs"][k])] for k, i in enumerate(out["index"].astype(int))]
    write_csv(path, header, rows)


def evaluate_saved(model_path: str | Path, data: str | Path, out: str | Path | None = None, progress: bool = True,
                   cache_root: Path | None = None) -> dict:
    """External validation: a saved model on another site's data, ingested with the model's grid."""
    model, blob = load_classifier(model_path)
    cfg = validate(blob["config"], f"{model_path} (embedded config)")
    caches = prepare(data, cfg, cache_root, progress)
    ds = MultiSite(caches, cfg)
    torch.manual_seed(cfg.train.seed)
    o = predict(model, loader(ds, cfg, shuffle=False), torch.device("cpu"), cfg.model.mc_samples,
                augment=cfg.model.test_time_augmentation)
    metrics = {"model": blob["model"], "model_file": str(model_path), "data": str(data), "sites": ds.site_names,
               "test": summarize(o, blob["classes"], cfg.model.mc_samples, thresholds=blob.get("refer"))}
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "metrics.json").write_text(json.dumps(metrics, indent=1))
        write_predictions(Path(out) / "predictions.csv", o, ds, blob["classes"], blob.get("refer"))
    return metrics
