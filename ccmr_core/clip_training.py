"""Central CMR-CLIP training and its evaluation (retrieval, zero-shot findings, probes).

The same training loop as every other model (``engine.train_epoch``) over the same ingested
caches; the supervision is each site's ``reports.csv``, never the diagnosis. The diagnosis is
used only to evaluate (class-aware precision, zero-shot classes, probes).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from ccmr_core.checkpoint import load_clip, save_model
from ccmr_core.config import ExperimentConfig, dump_config, validate
from ccmr_core.data.reports import WithReports, read_reports
from ccmr_core.data.sources import MultiSite, find_sites, prepare
from ccmr_core.data.transforms import default_augmentation
from ccmr_core.engine import make_optimizer, set_threads, train_epoch
from ccmr_core.models.cmr_clip import CMRCLIP
from ccmr_core.models.registry import model_kwargs, training_model
from ccmr_core.models.text import encode
from ccmr_core.report import write_report
from ccmr_core.retrieval import (CLASS_PROMPTS, FINDING_PROMPTS, class_precision_at_k, finding_aucs, linear_probe,
                                 prototype_probe, retrieval, zero_shot_classes)
from ccmr_core.retrieval_stats import RetrievalStats
from ccmr_core.schedule import plan_for
from ccmr_core.training import split_indices

log = logging.getLogger("ccmr.clip")


def site_reports(data: str | Path, column: str = "report") -> dict[str, str]:
    """'site/patient_id' -> report for every site under ``data``."""
    return {f"{name}/{pid}": text for name, path, _ in find_sites(data) for pid, text in read_reports(path, column).items()}


@torch.no_grad()
def embeddings(model: CMRCLIP, ds, batch_size: int = 16) -> dict[str, np.ndarray]:
    """Of ``ds`` in order: study and report embeddings, labels and whether each has a report."""
    model.eval()
    out: dict[str, list] = {"video": [], "text": [], "label": [], "has_report": []}
    # its own generator: a loader otherwise draws its worker seed from the global RNG, so validating
    # between epochs would change the training that follows
    for b in DataLoader(ds, batch_size=batch_size, shuffle=False, generator=torch.Generator()):
        out["video"].append(model.embed_video(b["cine"]))
        out["text"].append(model.embed_text(b["report"]))
        out["label"].append(b["label"])
        out["has_report"].append(b["has_report"])
    return {k: torch.cat(v).numpy() for k, v in out.items()}


def embed(model: CMRCLIP, ds, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(video embeddings, report embeddings, labels) of ``ds`` in order."""
    e = embeddings(model, ds, batch_size)
    return e["video"], e["text"], e["label"]


@torch.no_grad()
def embed_prompts(model: CMRCLIP, prompts: list[str]) -> np.ndarray:
    model.eval()
    return model.embed_text(encode(prompts)).numpy()


def gallery_stats(model: CMRCLIP, ds, classes: list[str]) -> RetrievalStats:
    """Retrieval statistics of one gallery (``ds``: a site's studies of one split, with reports);
    patients without a report are left out. What a site sends about a CMR-CLIP model."""
    if not len(ds):
        return RetrievalStats()
    e = embeddings(model, ds)
    has = e["has_report"].astype(bool)
    class_emb = [embed_prompts(model, CLASS_PROMPTS[c]) for c in classes] if all(c in CLASS_PROMPTS for c in classes) \
        else []
    return RetrievalStats.from_embeddings(e["video"][has], e["text"][has], e["label"][has], class_emb, model.temperature)


def validation_loss(model: CMRCLIP, ds) -> dict[str, float]:
    """The contrastive loss and video->report retrieval of ``ds`` (the validation patients with a
    report) as one gallery, from the statistics a federated site reports (``gallery_stats``): its
    chance loss is log(gallery size)."""
    s = gallery_stats(model, ds, []).summary()
    if s["n"] < 2:
        return {}
    r = s["retrieval"]["video_to_report"]
    return {"loss": s["loss"], "chance_loss": float(np.log(s["n"])), "R@5": r["R@5"], "mean_rank": r["mean_rank"],
            "gallery": s["n"]}


def train_clip(data: str | Path, out: str | Path, cfg: ExperimentConfig, test_site: str,
               cache_root: Path | None = None, progress: bool = False) -> tuple[CMRCLIP, dict]:
    """Train CMR-CLIP on every site but ``test_site`` (on reports.csv's ``data.report_column``),
    validating every epoch on the validation patients; returns the model ``train.keep_model`` names
    and the split's rows (``kept_epoch``: the epoch of the model returned; ``best``: the state and
    epoch of the lowest validation loss)."""
    out = Path(out)
    set_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    caches = prepare(data, cfg, cache_root, progress)
    reports = site_reports(data, cfg.data.report_column)
    ds = MultiSite(caches, cfg)
    idx = split_indices(ds, cfg, test_site)
    aug = MultiSite(caches, cfg, transform=default_augmentation() if cfg.train.augment else None)
    train = Subset(WithReports(aug, ds.patient_ids, reports,
                               sentence_p=cfg.train.sentence_sampling if cfg.train.augment else 0.0), idx["train"])
    val = WithReports(ds, ds.patient_ids, reports)
    val = Subset(val, [i for i in idx["val"] if ds.patient_ids[i] in reports])
    model = training_model(cfg, model_kwargs(cfg, ds.bio_channels), torch.device("cpu"), name="cmr-clip")
    g = torch.Generator().manual_seed(cfg.train.seed)
    loader = DataLoader(train, batch_size=cfg.train.batch_size, shuffle=True, generator=g, drop_last=True)
    plan = plan_for(model, cfg.train.epochs, 0.5)
    opt = make_optimizer(model, cfg.train)
    log.info("CMR-CLIP on %d patients' studies and reports (test site %s), %d epochs", len(idx["train"]), test_site,
             plan.epochs)
    best: dict = {"loss": float("inf"), "epoch": None, "state": None}
    out.mkdir(parents=True, exist_ok=True)  # only now: a run refused for its data leaves no folder
    with open(out / "metrics.jsonl", "w") as f:
        for epoch in range(plan.epochs):
            tr = train_epoch(model, loader, opt, torch.device("cpu"), lr_at=lambda x, e=epoch: plan.lr_factor(e + x),
                             progress=progress, desc=f"epoch {epoch + 1}")
            va = validation_loss(model, val)
            if "measure" not in tr:  # the contrastive loss alone is what chance compares with
                # batches are full (drop_last); a patient without a report would lower it
                tr["chance_loss"] = float(np.log(cfg.train.batch_size))
            f.write(json.dumps({"epoch": epoch + 1, "train": tr, "val": va}) + "\n")
            f.flush()
            if va and va["loss"] < best["loss"]:
                best = {"loss": va["loss"], "epoch": epoch + 1,
                        "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
            log.info("epoch %d/%d: contrastive loss %.3f%s (train)%s", epoch + 1, plan.epochs,
                     tr.get("clip", tr["loss"]), f" + measurements {tr['measure']:.3f}" if "measure" in tr else "",
                     f", {va['loss']:.3f} (validation, {va['gallery']} patients; chance {va['chance_loss']:.3f})"
                     if va else "")
    kept = plan.epochs
    if cfg.train.keep_model == "best-validation":
        if best["state"] is None:
            raise ValueError(f"train.keep_model 'best-validation' needs at least 2 validation patients with a report "
                             f"({len(val)} here); raise train.val_fraction or keep the last model")
        model.load_state_dict(best["state"])
        kept = best["epoch"]
        log.info("kept the model of epoch %d (lowest validation contrastive loss %.3f)", kept, best["loss"])
    return model, {"idx": idx, "ds": WithReports(ds, ds.patient_ids, reports), "patient_ids": ds.patient_ids,
                   "kept_epoch": kept, "best": best}


def evaluate_clip(model: CMRCLIP, ds, idx: dict, classes: list[str], truth: dict[str, list] | None = None,
                  shots: tuple[int, ...] = (1, 4, 16), draws: int = 20, seed: int = 0,
                  test_embedding: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> dict:
    """Metrics on the test rows (retrieval within the test site's gallery), probes fitted on the
    training rows. ``truth``: per finding, the test rows' ground truth (None where unknown);
    ``test_embedding``: ``embed`` of the test rows where the caller has it already."""
    tv, tt, ty = test_embedding if test_embedding is not None else embed(model, Subset(ds, idx["test"]))
    sim = tv @ tt.T
    res = {"retrieval": retrieval(sim), "class_precision@5": class_precision_at_k(sim, ty, 5)}
    class_emb = [embed_prompts(model, CLASS_PROMPTS[c]) for c in classes]
    scores = zero_shot_classes(tv, class_emb)
    res["zero_shot_accuracy"] = float((scores.argmax(1) == ty).mean())
    if truth is not None:
        res["findings"] = finding_aucs(tv, {f: embed_prompts(model, p) for f, p in FINDING_PROMPTS.items()}, truth)
    trv, _, try_ = embed(model, Subset(ds, idx["train"]))
    rng = np.random.default_rng(seed)
    res["few_shot"] = {str(k): float(np.mean([(prototype_probe(trv, try_, tv, k, len(classes), rng) == ty).mean()
                                              for _ in range(draws)])) for k in shots}
    res["linear_probe"] = float((linear_probe(trv, try_, tv) == ty).mean())
    res["test_n"] = int(len(ty))
    return res


def synthetic_truth(data: str | Path, patient_ids: list[str], rows: list[int]) -> dict[str, list] | None:
    """Per finding, the ground truth of ``rows`` when ``data`` is a synthetic cohort (its
    groundtruth/ folder); None for a hospital's data, which has no phantom truth."""
    from ccmr_core.synth.reports import FINDINGS, findings

    gt_dir = Path(data) / "groundtruth"
    if not gt_dir.is_dir():
        return None
    gt = {}
    for f in gt_dir.glob("*.json"):
        gt.update({f"{f.stem}/{t['patient_id']}": t for t in json.loads(f.read_text())})
    if not all(patient_ids[i] in gt for i in rows):
        return None
    per = [findings(gt[patient_ids[i]]) for i in rows]
    return {f: [p[f] for p in per] for f in FINDINGS}


def train_clip_run(data: str | Path, out: str | Path, cfg: ExperimentConfig, test_site: str | None,
                   progress: bool = True, cache_root: Path | None = None) -> dict:
    """``ccmr train --preset cmr-clip`` (model cmr-clip): a run folder with config.yaml, metrics.jsonl, model.pt and
    (with a test site) metrics.json of the evaluation above."""
    out = Path(out)
    if (out / "model.pt").exists():
        raise FileExistsError(f"{out} already holds a trained model; choose another --out")
    if test_site is None:
        raise ValueError("CMR-CLIP is evaluated on a held-out site: pass --test-site SITE")
    model, s = train_clip(data, out, cfg, test_site, cache_root=cache_root, progress=progress)
    (out / "config.yaml").write_text(dump_config(cfg))
    classes = list(cfg.data.classes)
    info = {"sites": sorted({p.split("/", 1)[0] for p in s["patient_ids"]}), "test_site": test_site,
            "kept_epoch": s["kept_epoch"],
            "n_train": len(s["idx"]["train"]), "n_test": len(s["idx"]["test"]), "report_column": cfg.data.report_column}
    save_model(out / "model.pt", model.state_dict(), name="cmr-clip", kwargs=model_kwargs(cfg, 1), classes=classes,
               ingest=cfg.data.ingest.model_dump(mode="json"), config=cfg.model_dump(mode="json"), info=info)
    m = evaluate_clip(model, s["ds"], s["idx"], classes, synthetic_truth(data, s["patient_ids"], s["idx"]["test"]),
                      seed=cfg.train.seed)
    metrics = {"model": "cmr-clip", **info, "test": m}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    write_report(out)
    return metrics


def search(model_path: str | Path, site: str | Path, text: str, top: int = 5, cache_root: Path | None = None,
           progress: bool = False) -> list[tuple[str, float]]:
    """The ``top`` studies of ``site`` nearest to ``text`` (patient id, cosine similarity), run
    at the site: the studies are ingested with the model's grid and never leave it."""
    if not text.strip():
        raise ValueError("--text is empty; describe the studies to find, e.g. 'dilated LV with mid-wall LGE'")
    model, blob = load_clip(model_path, "search needs")
    cfg = validate(blob["config"], f"{model_path} (embedded config)")
    caches = prepare(site, cfg, cache_root, progress)
    ds = MultiSite(caches, cfg)
    with torch.no_grad():
        video = torch.cat([model.embed_video(b["cine"]) for b in DataLoader(ds, batch_size=16)])
        query = model.embed_text(encode([text]))[0]
    sim = (video @ query).numpy()
    order = np.argsort(-sim)[:top]
    return [(ds.patient_ids[i], float(sim[i])) for i in order]
