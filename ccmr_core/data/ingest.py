"""``ccmr ingest SITE --out CACHE``: a hospital's DICOM folder -> one array file per study.

Contract (DESIGN.md): CACHE/manifest.json lists usable ``studies`` and ``errors``; every file or
study that cannot be used becomes an error entry with a reason a person can act on and never
stops the ingest; the source folder is only read.

Re-running is incremental: CACHE/index.json remembers every file's size, modification time and
study. Unchanged files are not read again, and a study is re-processed only when one of its files
was added, changed or removed (or the ingest settings changed).

Each file is read once and decoded at once; a site's decoded pixels are held in memory until the
studies are assembled (about the size of the site's uncompressed pixel data).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import re
import stat
import time
import zipfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ccmr_core.config import IngestConfig
from ccmr_core.data.dicom_read import FileProblem, Frame, read_file
from ccmr_core.data.resample import resample_study
from ccmr_core.data.stacks import StudyError, find_stacks
from ccmr_core.data.tables import BIOMECHANICS, LABELS, REPORTS, TableError, read_biomechanics, read_labels
from ccmr_core.files import atomic_path, write_atomic
from ccmr_core.proc import worker_pool

MANIFEST = "manifest.json"
INDEX = "index.json"
FORMAT = 1
SKIP_NAMES = {LABELS, BIOMECHANICS, REPORTS, "DICOMDIR"}


class IngestError(ValueError):
    """Ingestion cannot start (bad SITE or CACHE path, no labels.csv). Nothing was written."""


@dataclass
class _Study:
    uid: str
    patient_id: str
    files: list[str]
    output: str | None = None
    error: str | None = None
    notes: list[str] | None = None
    cine_shape: list[int] | None = None
    lge_shape: list[int] | None = None
    geometry: dict | None = None
    series: dict | None = None
    date: str = ""


def _config_key(cfg: IngestConfig) -> str:
    d = cfg.model_dump(mode="json")
    d.pop("workers")
    return hashlib.sha1(json.dumps([FORMAT, d], sort_keys=True).encode()).hexdigest()


def list_files(site: Path) -> tuple[list[tuple[Path, os.stat_result]], list[FileProblem]]:
    """Regular files under SITE with their stat; every other entry that a walk meets (a dangling
    symlink, a symlink loop, a FIFO, a socket or device, an unreadable entry) is a problem entry
    and is never opened (opening a FIFO would block the ingest)."""
    out, problems = [], []
    for dirpath, dirnames, filenames in os.walk(site, onerror=lambda e: problems.append(
            FileProblem(_rel(e.filename, site), f"folder cannot be listed ({e.strerror}); skipped"))):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        top = Path(dirpath) == site
        for name in sorted(filenames):
            if name.startswith(".") or (top and name in SKIP_NAMES) or name == "DICOMDIR":
                continue
            p = Path(dirpath) / name
            try:
                st = p.stat()  # follows symlinks: a dangling one or a loop fails here
            except OSError as e:
                what = "a symlink that leads nowhere (or in a loop)" if p.is_symlink() else "unreadable"
                problems.append(FileProblem(_rel(p, site), f"{what} ({e.strerror}); skipped"))
                continue
            if not stat.S_ISREG(st.st_mode):
                problems.append(FileProblem(_rel(p, site), "not a regular file (a pipe, socket or device); skipped"))
                continue
            out.append((p, st))
    return out, problems


def _rel(path, site: Path) -> str:
    try:
        return str(Path(path).relative_to(site))
    except ValueError:
        return str(path)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)[:40] or "unknown"


def save_npz(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    """Write a compressed .npz atomically (deflate level 1: 4x faster than numpy's level 6,
    and nearly as small for float16 images)."""
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for name, arr in arrays.items():
            with zf.open(name + ".npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(arr), allow_pickle=False)


def _atomic_json(path: Path, data) -> None:
    write_atomic(path, json.dumps(data, indent=1))


# --- workers -----------------------------------------------------------------------------------


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)  # forked workers must not enter the parent's OpenMP pool


def _read_one(args: tuple[str, str]):
    path, root = args
    return read_file(Path(path), Path(root))


def read_files(paths: list[Path], root: Path, workers: int, progress: bool, desc: str = "reading DICOM"):
    """Read DICOM files in parallel: for each path, in order, its frames or a FileProblem (paths in
    problems are shown relative to ``root``)."""
    jobs = [(str(p), str(root)) for p in paths]
    return _parallel(_read_one, jobs, workers, desc, "file", progress, 32)


@dataclass
class _StudyJob:
    uid: str
    frames: list[Frame]
    cfg: IngestConfig
    out_path: str


def _process_study(job: _StudyJob) -> tuple[str, dict]:
    """Recognise stacks, resample, write the array file; returns the study's record fields."""
    try:
        cine, lge, notes = find_stacks(job.frames, job.cfg.min_slices, job.cfg.min_frames)
        cine_arr, lge_arr, geometry = resample_study(cine, lge, job.cfg)
    except StudyError as e:
        return job.uid, {"error": str(e)}
    arrays = {"cine": cine_arr}
    if lge_arr is not None:
        arrays["lge"] = lge_arr
    save_npz(job.out_path, arrays)
    return job.uid, {
        "notes": notes,
        "cine_shape": list(cine_arr.shape),
        "lge_shape": list(lge_arr.shape) if lge_arr is not None else None,
        "geometry": geometry,
        "series": {"cine": cine.series, "lge": lge.series if lge is not None else []},
    }


def _parallel(fn, items: list, workers: int, desc: str, unit: str, progress: bool, chunksize: int = 1):
    bar = tqdm(total=len(items), desc=desc, unit=unit, disable=not progress or not items, mininterval=0.5)
    try:
        if workers <= 1 or len(items) < 2:
            for it in items:
                yield fn(it)
                bar.update()
            return
        ctx = mp.get_context("fork" if hasattr(os, "fork") else "spawn")
        with worker_pool(ctx, min(workers, len(items)), initializer=_init_worker) as pool:
            for r in pool.imap(fn, items, chunksize=chunksize):
                yield r
                bar.update()
    finally:
        bar.close()


# --- the ingest ----------------------------------------------------------------------------------


def ingest(
    site: str | Path,
    cache: str | Path,
    cfg: IngestConfig | None = None,
    classes: tuple[str, ...] = ("NOR", "MINF", "DCM", "HCM", "ARV"),
    progress: bool = True,
    workers: int | None = None,
) -> dict:
    """Ingest SITE into CACHE and return the manifest (also written to CACHE/manifest.json)."""
    cfg = cfg or IngestConfig()
    site = Path(site).resolve()
    cache = Path(cache).resolve()
    if not site.is_dir():
        raise IngestError(f"site folder {site} does not exist or is not a folder")
    if cache == site or site in cache.parents:
        raise IngestError(f"the cache {cache} is inside the site folder {site}; choose a cache folder outside "
                          "it (ingestion never writes into the source tree)")
    try:
        labels = read_labels(site, tuple(classes))
    except TableError as e:
        raise IngestError(str(e)) from None
    workers = workers if workers is not None else (cfg.workers or len(os.sched_getaffinity(0)))
    started = time.perf_counter()
    (cache / "studies").mkdir(parents=True, exist_ok=True)

    key = _config_key(cfg)
    old = {}
    if (cache / INDEX).is_file():
        try:
            old = json.loads((cache / INDEX).read_text())
        except ValueError:
            old = {}
        if old.get("config") != key or old.get("site") != str(site):
            old = {}
    old_files: dict[str, dict] = old.get("files", {})
    old_studies: dict[str, dict] = old.get("studies", {})

    files, unlisted = list_files(site)
    stats: dict[str, list[int]] = {}
    to_read: list[str] = []
    file_info: dict[str, dict] = {}
    for p, st in files:
        rel = str(p.relative_to(site))
        stats[rel] = [st.st_size, st.st_mtime_ns]
        prev = old_files.get(rel)
        if prev and prev["stat"] == stats[rel]:
            file_info[rel] = prev
        else:
            to_read.append(rel)
    # studies touched by a changed, added or removed file are processed again
    dirty: set[str] = set()
    for rel, prev in old_files.items():
        if prev.get("study") and (rel not in stats or prev["stat"] != stats[rel]):
            dirty.add(prev["study"])

    frames_by_study: dict[str, list[Frame]] = defaultdict(list)
    problems: list[FileProblem] = list(unlisted)

    def absorb(rel: str, result) -> None:
        if isinstance(result, FileProblem):
            problems.append(result)
            file_info[rel] = {"stat": stats[rel], "problem": result.__dict__}
        else:
            uid = result[0].study_uid
            frames_by_study[uid].extend(result)
            file_info[rel] = {"stat": stats[rel], "study": uid}
            dirty.add(uid)

    for rel, result in zip(to_read, read_files([site / rel for rel in to_read], site, workers, progress)):
        absorb(rel, result)
    # unchanged files of dirty studies must be read too; their old problems are reported again
    reread = [rel for rel, info in file_info.items() if info.get("study") in dirty and rel not in to_read]
    for rel, result in zip(reread, read_files([site / rel for rel in reread], site, workers, progress,
                                              "re-reading changed studies")):
        absorb(rel, result)
    for rel, info in file_info.items():
        if "problem" in info and rel not in to_read and rel not in reread:
            problems.append(FileProblem(**info["problem"]))

    studies: dict[str, _Study] = {}
    for uid, rec in old_studies.items():
        if uid not in dirty and all(file_info.get(r, {}).get("study") == uid for r in rec["files"]):
            if rec.get("output") is None or (cache / rec["output"]).is_file():
                studies[uid] = _Study(**rec)
                continue
        dirty.add(uid)  # its output vanished or files moved: rebuild from what is there
    study_jobs = []
    for uid, frs in frames_by_study.items():
        pid = frs[0].patient_id
        st = _Study(uid=uid, patient_id=pid, files=sorted({f.path for f in frs}))
        studies[uid] = st
        st.output = f"studies/{_safe(pid)}-{hashlib.sha1(uid.encode()).hexdigest()[:10]}.npz"
        study_jobs.append(_StudyJob(uid, frs, cfg, str(cache / st.output)))
    frames_by_study.clear()
    for uid, res in _parallel(_process_study, study_jobs, workers, "resampling studies", "study", progress):
        st = studies[uid]
        if "error" in res:
            st.error, st.output = res["error"], None
        else:
            for k, v in res.items():
                setattr(st, k, v)
    study_jobs.clear()

    manifest = _manifest(site, cache, cfg, classes, labels, studies, problems, len(files) + len(unlisted))
    manifest["summary"]["seconds"] = round(time.perf_counter() - started, 2)
    manifest["summary"]["files_read"] = len(to_read) + len(reread)
    keep = {s.output for s in studies.values() if s.output}
    for f in (cache / "studies").glob("*.npz"):
        if f"studies/{f.name}" not in keep:
            f.unlink()
    _write_biomechanics(site, cache, manifest)
    _atomic_json(cache / MANIFEST, manifest)
    _atomic_json(cache / INDEX, {"config": key, "site": str(site), "files": file_info,
                                 "studies": {u: s.__dict__ for u, s in studies.items()}})
    return manifest


def _write_biomechanics(site: Path, cache: Path, manifest: dict) -> None:
    bio, names, errors = read_biomechanics(site)
    manifest["errors"].extend(errors)
    manifest["biomechanics_signals"] = names
    used = {s["patient_id"] for s in manifest["studies"]}
    arrays = {}
    for pid, (t, x) in bio.items():
        if pid in used:
            arrays[f"{pid}/t"] = t
            arrays[f"{pid}/x"] = x
    for s in manifest["studies"]:
        s["has_biomechanics"] = f"{s['patient_id']}/x" in arrays
    save_npz(cache / "biomechanics.npz", arrays)


def _manifest(site, cache, cfg, classes, labels, studies: dict[str, _Study], problems, n_files) -> dict:
    errors: list[dict] = []
    not_mr: dict[str, list[FileProblem]] = defaultdict(list)
    for p in problems:
        if p.kind == "not-mr":
            not_mr[p.series_uid or p.path].append(p)
        else:
            errors.append({"path": p.path, "reason": p.reason})
    for group in not_mr.values():
        p = group[0]
        name = f"series '{p.series_description}'" if p.series_description else "series"
        errors.append({"path": p.path, "reason": f"{name} ({len(group)} file(s)): {p.reason}"})

    by_patient: dict[str, list[_Study]] = defaultdict(list)
    for st in studies.values():
        if st.error:
            errors.append({"patient_id": st.patient_id, "study_uid": st.uid, "path": st.files[0],
                           "reason": f"study not usable: {st.error}"})
        elif not st.patient_id:
            errors.append({"study_uid": st.uid, "path": st.files[0],
                           "reason": "study has no PatientID, so it cannot be matched to labels.csv"})
        else:
            by_patient[st.patient_id].append(st)
    entries = []
    for pid in sorted(by_patient):
        cands = sorted(by_patient[pid], key=lambda s: (s.lge_shape is not None, s.geometry["acquired_cine_slices"], s.uid),
                       reverse=True)
        st = cands[0]
        notes = list(st.notes or [])
        if len(cands) > 1:
            notes.append(f"{len(cands)} usable studies for this patient; used {st.uid}"
                         f"{' (with LGE)' if st.lge_shape else ''}, ignored {', '.join(c.uid for c in cands[1:])}")
        if pid not in labels.diagnosis:
            if not any(e.get("patient_id") == pid for e in labels.errors):
                errors.append({"patient_id": pid, "path": st.files[0], "reason": "has images but no row in "
                               f"labels.csv; add '{pid},<diagnosis>' to use this study"})
            continue
        entry = {
            "patient_id": pid,
            "label": labels.diagnosis[pid],
            "cine_shape": st.cine_shape,
            "lge_shape": st.lge_shape,
            "path": st.output,
            "study_uid": st.uid,
            "series": st.series,
            "geometry": st.geometry,
            "notes": notes,
        }
        if pid in labels.split:
            entry["split"] = labels.split[pid]
        if pid in labels.measurements:
            entry["measurements"] = labels.measurements[pid]
        entries.append(entry)
    errors.extend(labels.errors)
    have_images = {st.patient_id for st in studies.values()}
    for pid in sorted(set(labels.diagnosis) - have_images):
        errors.append({"patient_id": pid, "reason": f"listed in {LABELS} but no images with this PatientID "
                       "were found under the site folder"})
    mix: dict[str, int] = {}
    for e in entries:
        mix[e["label"]] = mix.get(e["label"], 0) + 1
    return {
        "format": FORMAT,
        "site": str(site),
        "classes": list(classes),
        "ingest": cfg.model_dump(mode="json"),
        "studies": entries,
        "errors": errors,
        "summary": {
            "files": n_files,
            "studies": len(entries),
            "with_lge": sum(e["lge_shape"] is not None for e in entries),
            "classes": dict(sorted(mix.items())),
            "errors": len(errors),
        },
    }


def load_manifest(cache: str | Path) -> dict:
    path = Path(cache) / MANIFEST
    if not path.is_file():
        raise IngestError(f"{path} not found: run 'ccmr ingest SITE --out {cache}' first")
    return json.loads(path.read_text())
