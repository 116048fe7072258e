"""Reading a trained model on one patient's cine study: ``ccmr predict``.

The study is read with the very code that ingests a site (stack recognition by structure,
resampling in patient space onto the model's own grid), so a reader's study is prepared exactly
as the training data were. LGE, when present, is ignored: the model needs cine only.

Output per study: class probabilities (mean over MC-dropout passes), epistemic uncertainty
(mutual information between prediction and dropout mask, nats), a referral decision with the
thresholds stored in the model file, the model's identity, the ingestion notes, and a saliency
figure. Everything is computed before anything is written, and every file is written whole
(temporary name, then rename), so bad input leaves nothing behind.
"""

from __future__ import annotations

import io
import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ccmr_core.checkpoint import load_classifier, load_clip
from ccmr_core.config import IngestConfig, validate
from ccmr_core.data.dicom_read import FileProblem, Frame
from ccmr_core.data.ingest import list_files, read_files
from ccmr_core.data.resample import resample_study
from ccmr_core.data.stacks import StudyError, find_stacks
from ccmr_core.engine import predict
from ccmr_core.files import sha256_file, write_atomic, write_csv
from ccmr_core.measurements import from_outputs
from ccmr_core.models.text import encode
from ccmr_core.referral import refer
from ccmr_core.retrieval import FINDING_PROMPTS


class PredictError(ValueError):
    """The study or the model cannot be used; the message says which file and what to do."""


# --- reading studies -----------------------------------------------------------------------------


@dataclass
class Study:
    uid: str
    patient_id: str
    frames: list[Frame]
    problems: list[FileProblem] = field(default_factory=list)
    files: int = 0


def read_studies(folder: str | Path, workers: int = 1, progress: bool = False) -> tuple[dict[str, Study], list[FileProblem], int]:
    """Every DICOM study under ``folder`` grouped by StudyInstanceUID, the files that could not be
    used (with reasons), and the number of files looked at."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PredictError(f"{folder} is not a folder; give the folder holding one patient's DICOM files")
    files, unlisted = list_files(folder)
    if not files:
        raise PredictError(f"{folder} holds no readable files" + (f" ({unlisted[0].path}: {unlisted[0].reason})"
                                                                  if unlisted else ""))
    frames: dict[str, list[Frame]] = defaultdict(list)
    problems: list[FileProblem] = list(unlisted)
    for result in read_files([p for p, _ in files], folder, workers, progress):
        if isinstance(result, FileProblem):
            problems.append(result)
        else:
            frames[result[0].study_uid].extend(result)
    studies = {uid: Study(uid, frs[0].patient_id, frs, files=len({f.path for f in frs})) for uid, frs in frames.items()}
    return studies, problems, len(files) + len(unlisted)


def prepare_cine(study: Study, ingest: IngestConfig) -> tuple[np.ndarray, list[str]]:
    """The study's cine on the model's grid (S, T, H, W) float32, and notes on what was done."""
    try:
        cine, lge, notes = find_stacks(study.frames, ingest.min_slices, ingest.min_frames)
        arr, _, _ = resample_study(cine, None, ingest)
    except StudyError as e:
        raise PredictError(f"study {study.patient_id} ({study.uid}): {e}") from None
    notes = list(notes)
    if lge is not None:
        notes.append("an LGE series is present and was not used (the model reads cine only)")
    return arr.astype(np.float32), notes


# --- the model -----------------------------------------------------------------------------------


class Predictor:
    """A model file, checked and ready to read cine studies."""

    def __init__(self, model_path: str | Path, mc_samples: int | None = None):
        path = Path(model_path)
        self.model, blob = load_classifier(path)
        self.classes: list[str] = list(blob["classes"])
        name = blob["model"]
        if getattr(self.model, "requires_lge", False) or "lge" in getattr(self.model, "inputs", ()):
            raise PredictError(f"{path} is a {name} model, which reads LGE; prediction uses cine only "
                               "(use a cc-cmr or cine-only model)")
        if "bio" in getattr(self.model, "inputs", ()):
            raise PredictError(f"{path} is a {name} model, which also needs biomechanical time series; prediction "
                               "reads a cine study only (use a cc-cmr or cine-only model)")
        cfg = validate(blob["config"], f"{path} (embedded config)")
        self.ingest = cfg.data.ingest
        self.measurement_names = tuple(cfg.data.measurements)
        g = self.ingest
        with torch.no_grad():
            n_out = self.model.head(self.model.embed(torch.zeros(1, g.slices, g.frames, g.size, g.size))).shape[-1]
        if n_out != len(self.classes) or len(set(self.classes)) != len(self.classes):
            raise PredictError(f"{path} lists classes {self.classes} but its classifier has {n_out} outputs; the "
                               "file was altered or written for other classes; use the model.pt of a run")
        self.mc_samples = int(mc_samples if mc_samples is not None else cfg.model.mc_samples)
        self.augment = cfg.model.test_time_augmentation
        self.thresholds = blob.get("refer")
        info = blob.get("info") or {}
        self.identity = {"file": str(path.resolve()), "sha256": sha256_file(path), "architecture": name,
                         "classes": self.classes, "training_run": info.get("run"), "saved": info.get("saved"),
                         "federated": bool(info.get("federated", False)), "sites": info.get("sites"),
                         "round_or_epoch": info.get("round", info.get("epochs")),
                         **({"members": info["members"]} if "members" in info else {})}

    def check_grid(self, cine: np.ndarray) -> None:
        want = (self.ingest.slices, self.ingest.frames, self.ingest.size, self.ingest.size)
        if tuple(cine.shape) != want:
            raise PredictError(f"prepared cine has shape {tuple(cine.shape)} but the model expects {want}")

    def predict(self, cine: np.ndarray, seed: int = 0) -> dict:
        """Probabilities and epistemic uncertainty for one prepared cine array, through the same
        MC-dropout path as evaluation (engine.predict)."""
        self.check_grid(cine)
        x = torch.from_numpy(cine)[None]
        batch = {"cine": x, "lge": torch.zeros(1, x.shape[1], *x.shape[3:]), "has_lge": torch.tensor([False]),
                 "label": torch.tensor([0]), "bio": torch.zeros(1, 1, 1), "has_bio": torch.tensor([False]),
                 "index": torch.tensor([0])}
        torch.manual_seed(seed)
        out = predict(self.model, [batch], torch.device("cpu"), self.mc_samples, augment=self.augment)
        probs = out["probs"][0]
        k = int(probs.argmax())
        u = float(out["uncertainty"][0]) if self.mc_samples > 1 else None
        ref, reasons = refer(float(probs[k]), u, self.thresholds)
        est = None
        if out["measurements"] is not None and out["measurements"].shape[-1] == len(self.measurement_names):
            est = {n: round(v, 1) for n, v in from_outputs(out["measurements"][0], self.measurement_names).items()}
        return {"predicted": self.classes[k], "probabilities": {c: float(p) for c, p in zip(self.classes, probs)},
                "confidence": float(probs[k]), "epistemic_uncertainty": u, "mc_samples": self.mc_samples,
                "refer": ref, "refer_reasons": reasons, "refer_thresholds": self.thresholds,
                "estimated_measurements": est}

    def saliency(self, cine: np.ndarray, class_name: str) -> np.ndarray:
        """|d logit(class) / d cine| (S, T, H, W), dropout off, smoothed over 3x3 pixels:
        where in space and in the cardiac cycle the evidence for the class sits."""
        self.check_grid(cine)
        x = torch.from_numpy(cine)[None].requires_grad_(True)
        self.model.eval()
        logit = self.model.head(self.model.embed(x))[0, self.classes.index(class_name)]
        (g,) = torch.autograd.grad(logit, x)
        s = g[0].abs()
        s = torch.nn.functional.avg_pool2d(s.flatten(0, 1)[:, None], 3, 1, 1)[:, 0].view_as(s)
        return s.numpy()


# --- figures and files ---------------------------------------------------------------------------


class FindingScorer:
    """A cmr-clip model file that scores a cine study against each finding's prompts (zero-shot):
    the mean cosine similarity of the study with the finding's descriptions. A similarity, not a
    probability: higher means the study looks more like the description; compare between studies."""

    def __init__(self, model_path: str | Path):
        path = Path(model_path)
        self.model, blob = load_clip(path, "--findings: findings need")
        self.ingest = validate(blob["config"], f"{path} (embedded config)").data.ingest
        self.prompts = FINDING_PROMPTS
        with torch.no_grad():
            self.prompt_emb = {f: self.model.embed_text(encode(p)) for f, p in FINDING_PROMPTS.items()}
        self.identity = {"file": str(path.resolve()), "sha256": sha256_file(path), "architecture": "cmr-clip"}

    def score(self, study: Study, cine: np.ndarray, grid: IngestConfig) -> dict:
        """Each finding's score for ``study``; ``cine`` is it prepared on ``grid`` (the classifier's),
        reused when the CLIP model has the same grid."""
        if grid != self.ingest:
            cine = prepare_cine(study, self.ingest)[0]
        with torch.no_grad():
            v = self.model.embed_video(torch.from_numpy(cine).float()[None])[0]
        return {f: round(float((e @ v).mean()), 4) for f, e in self.prompt_emb.items()}


def end_systole(cine: np.ndarray) -> int:
    """The frame with the least bright blood in the centre of the field (smallest LV cavity);
    frame 0 is end-diastole (cine is triggered on the R wave)."""
    s, t, h, w = cine.shape
    centre = cine[:, :, h // 3: 2 * h // 3, w // 3: 2 * w // 3]
    return int(centre.mean(axis=(0, 2, 3)).argmin())


def saliency_png(cine: np.ndarray, sal: np.ndarray, title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, t = cine.shape[:2]
    es = end_systole(cine)
    top = float(np.percentile(sal, 99.5)) or 1.0
    fig = plt.figure(figsize=(1.6 * s, 1.6 * 2 + 1.6), constrained_layout=True)
    grid = fig.add_gridspec(3, s, height_ratios=[1, 1, 0.8])
    for row, (frame, label) in enumerate(((0, "end-diastole"), (es, f"end-systole (frame {es})"))):
        for k in range(s):
            ax = fig.add_subplot(grid[row, k])
            ax.imshow(cine[k, frame], cmap="gray", vmin=0, vmax=1)
            ax.imshow(np.clip(sal[k, frame] / top, 0, 1), cmap="inferno", alpha=0.45, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"slice {k + 1}" + (" (base)" if k == 0 else " (apex)" if k == s - 1 else ""), fontsize=8)
            if k == 0:
                ax.set_ylabel(label, fontsize=8)
    ax = fig.add_subplot(grid[2, :])
    per_frame = sal.sum(axis=(0, 2, 3))
    ax.bar(range(t), per_frame / per_frame.sum(), color="tab:orange")
    ax.axvline(0, color="k", ls=":", lw=1)
    ax.axvline(es, color="k", ls="--", lw=1)
    ax.set_xlabel("cardiac phase (frame; dotted = end-diastole, dashed = end-systole)")
    ax.set_ylabel("share of saliency")
    fig.suptitle(title, fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()


def _problems(problems: list[FileProblem]) -> list[dict]:
    return [{"path": p.path, "reason": p.reason} for p in problems if p.kind == "error"]


def predict_study(study_dir: str | Path, model_path: str | Path, out: str | Path, force: bool = False,
                  mc_samples: int | None = None, predictor: Predictor | None = None,
                  findings: FindingScorer | None = None) -> dict:
    """Predict one patient's study folder; writes OUT/prediction.json and OUT/saliency.png. With
    ``findings`` (a cmr-clip model), also each finding's zero-shot score."""
    out = Path(out)
    if (out / "prediction.json").exists() and not force:
        raise FileExistsError(f"{out / 'prediction.json'} exists; choose another --out or pass --force")
    pred = predictor or Predictor(model_path, mc_samples)
    studies, problems, n_files = read_studies(study_dir)
    if not studies:
        first = next((p for p in problems if p.kind == "error"), problems[0] if problems else None)
        why = f" (e.g. {first.path}: {first.reason})" if first else ""
        raise PredictError(f"{study_dir}: none of its {n_files} files is a readable MR DICOM image{why}")
    if len(studies) > 1:
        ids = ", ".join(sorted(f"{s.patient_id}" for s in studies.values())[:5])
        raise PredictError(f"{study_dir} holds {len(studies)} studies ({ids}); give one patient's study folder, or "
                           "use --batch for a folder of many studies")
    study = next(iter(studies.values()))
    cine, notes = prepare_cine(study, pred.ingest)
    result = pred.predict(cine)
    sal = pred.saliency(cine, result["predicted"])
    png = saliency_png(cine, sal, f"{study.patient_id}: {result['predicted']} "
                                  f"(p={result['confidence']:.2f}{', REFER' if result['refer'] else ''})")
    doc = {"study": str(Path(study_dir).resolve()), "patient_id": study.patient_id, "study_uid": study.uid,
           **result, "model": pred.identity,
           "ingestion": {"files": n_files, "files_used": study.files, "cine_grid": list(cine.shape),
                         "notes": notes, "skipped_files": _problems(problems)},
           "saliency": {"file": "saliency.png", "method": f"absolute gradient of the predicted class's "
                        f"{'log-probability (ensemble)' if pred.identity['architecture'] == 'ensemble' else 'logit'} "
                        "with respect to the cine input, 3x3 smoothed", "end_systole_frame": end_systole(cine)}}
    if findings is not None:
        doc["zero_shot_findings"] = {"scores": findings.score(study, cine, pred.ingest), "prompts": findings.prompts,
                                     "meaning": "mean cosine similarity of the study with the finding's descriptions "
                                     "(not a probability; higher = more alike)", "model": findings.identity}
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "saliency.png", png)
    write_atomic(out / "prediction.json", json.dumps(doc, indent=1).encode())
    return doc


def predict_batch(site: str | Path, model_path: str | Path, out: str | Path, force: bool = False,
                  mc_samples: int | None = None, workers: int | None = None, progress: bool = True,
                  findings: FindingScorer | None = None) -> list[dict]:
    """Every study under SITE (any layout): OUT/predictions.csv, one row per study; a study that
    cannot be read gets its reason in the ``error`` column and the others go on. With ``findings``
    (a cmr-clip model), a ``finding_<name>`` column per finding (zero-shot similarity)."""
    from tqdm import tqdm

    out = Path(out)
    target = out / "predictions.csv"
    if target.exists() and not force:
        raise FileExistsError(f"{target} exists; choose another --out or pass --force")
    pred = Predictor(model_path, mc_samples)
    workers = workers or len(os.sched_getaffinity(0))
    studies, problems, n_files = read_studies(site, workers, progress)
    if not studies:
        raise PredictError(f"{site}: none of its {n_files} files is a readable MR DICOM image")
    rows = []
    for study in tqdm(sorted(studies.values(), key=lambda s: s.patient_id), desc="predicting", unit="study",
                      disable=not progress):
        row = {"patient_id": study.patient_id, "study_uid": study.uid}
        try:
            cine, notes = prepare_cine(study, pred.ingest)
            r = pred.predict(cine)
            row.update(predicted=r["predicted"], confidence=round(r["confidence"], 4),
                       epistemic_uncertainty=None if r["epistemic_uncertainty"] is None else
                       round(r["epistemic_uncertainty"], 6), refer=r["refer"], refer_reasons="; ".join(r["refer_reasons"]),
                       **{f"p_{c}": round(p, 4) for c, p in r["probabilities"].items()}, notes="; ".join(notes), error="")
            if findings is not None:
                row.update({f"finding_{k}": v for k, v in findings.score(study, cine, pred.ingest).items()})
        except PredictError as e:
            row.update(error=str(e))
        rows.append(row)
    cols = ["patient_id", "study_uid", "predicted", "confidence", "epistemic_uncertainty", "refer", "refer_reasons",
            *[f"p_{c}" for c in pred.classes], *(f"finding_{k}" for k in (findings.prompts if findings else ())),
            "notes", "error"]
    out.mkdir(parents=True, exist_ok=True)
    write_csv(target, cols, rows)
    return rows
