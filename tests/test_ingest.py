"""Ingestion copes with what real exports contain (issue section 3), never touches the source,
and re-runs incrementally."""

import hashlib
import io
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (EnhancedMRImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless,
                         JPEGBaseline8Bit, RLELossless, generate_uid)

from ccmr_core.data.ingest import IngestError, ingest

from .conftest import SMALL, labels_of, patient_files, write_labels


def _truth(cohort, site):
    return {t["patient_id"]: t for t in json.loads((cohort / "groundtruth" / f"{site}.json").read_text())}


@pytest.fixture(scope="module")
def pick(cohort):
    """Two (site, patient) pairs with LGE from the tiny cohort."""
    with_lge = [(s, p) for s in ("site-a", "site-b", "site-c") for p, t in _truth(cohort, s).items() if t["has_lge"]]
    return {"lge": with_lge[0], "lge2": with_lge[1]}


def _run(site, tmp_path, name="cache"):
    return ingest(site, tmp_path / name, SMALL, progress=False, workers=1)


def _cine(cache, manifest, pid):
    entry = next(s for s in manifest["studies"] if s["patient_id"] == pid)
    with np.load(Path(cache) / entry["path"]) as z:
        return z["cine"].astype(np.float32), (z["lge"].astype(np.float32) if "lge" in z.files else None)


def _rewrite(files, fn):
    for f in files:
        ds = pydicom.dcmread(f)
        fn(ds)
        ds.save_as(f, enforce_file_format=True)


def _errors_for(manifest, key, value):
    return [e for e in manifest["errors"] if e.get(key) == value]


@pytest.mark.parametrize("site_name", ["site-a", "site-b", "site-c"])
def test_every_site_layout_ingests_cleanly(cohort, tmp_path, site_name):
    """Nested folders with .dcm, hashed names without extension, one flat folder of many studies;
    explicit and implicit VR; named and unnamed series; with and without SliceLocation."""
    m = _run(cohort / site_name, tmp_path)
    labels = labels_of(cohort / site_name)
    assert m["errors"] == []
    assert {s["patient_id"] for s in m["studies"]} == set(labels)
    truth = _truth(cohort, site_name)
    for s in m["studies"]:
        assert s["label"] == labels[s["patient_id"]]
        assert s["cine_shape"] == [4, 8, 32, 32]
        assert (s["lge_shape"] is not None) == truth[s["patient_id"]]["has_lge"]
        assert s["geometry"]["acquired_cine_slices"] == truth[s["patient_id"]]["n_slices"]
        assert (tmp_path / "cache" / s["path"]).is_file()
    assert (tmp_path / "cache" / "manifest.json").is_file()


def test_heart_is_centred_in_the_crop(cohort, tmp_path):
    m = _run(cohort / "site-a", tmp_path)
    for s in m["studies"]:
        cine, _ = _cine(tmp_path / "cache", m, s["patient_id"])
        motion = cine[1:3].std(axis=1).sum(0)  # where the blood pools beat
        yy, xx = np.mgrid[0:32, 0:32]
        cy, cx = (motion * yy).sum() / motion.sum(), (motion * xx).sum() / motion.sum()
        assert abs(cy - 15.5) < 6 and abs(cx - 15.5) < 6


def test_file_order_names_and_folders_do_not_matter(make_site, pick, tmp_path):
    site, pid = pick["lge"]
    a = make_site([(site, pid)], name="a")
    b = make_site([(site, pid)], name="b", layout="shuffled")
    files = sorted(p for p in b.rglob("f*"))
    names = list(range(len(files)))
    random.Random(0).shuffle(names)
    for f, n in zip(files, names):  # shuffle names and nest into random folders, no extension
        dst = b / f"x{n % 7}" / f"IMG{n:06d}"
        dst.parent.mkdir(exist_ok=True)
        f.rename(dst)
    ma, mb = _run(a, tmp_path, "ca"), _run(b, tmp_path, "cb")
    ca, la = _cine(tmp_path / "ca", ma, pid)
    cb, lb = _cine(tmp_path / "cb", mb, pid)
    assert np.array_equal(ca, cb) and np.array_equal(la, lb)


def test_missing_slice_location_unnamed_series_and_implicit_vr(make_site, pick, tmp_path):
    site, pid = pick["lge"]
    a = make_site([(site, pid)], name="a")
    b = make_site([(site, pid)], name="b")

    def strip(ds):
        for k in ("SliceLocation", "SeriesDescription"):
            if k in ds:
                del ds[k]
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian

    _rewrite(patient_files(b, pid), strip)
    ma, mb = _run(a, tmp_path, "ca"), _run(b, tmp_path, "cb")
    assert mb["errors"] == []
    assert np.array_equal(_cine(tmp_path / "ca", ma, pid)[0], _cine(tmp_path / "cb", mb, pid)[0])
    assert mb["studies"][0]["lge_shape"] is not None  # LGE found by its inversion time alone


def test_slices_reversed_along_normal_are_ordered_by_position(make_site, pick, tmp_path):
    """Scrambled InstanceNumbers and no SliceLocation: order comes from IPP along the normal."""
    site, pid = pick["lge"]
    a = make_site([(site, pid)], name="a")
    b = make_site([(site, pid)], name="b")
    _rewrite(patient_files(b, pid), lambda ds: (setattr(ds, "InstanceNumber", 9999 - int(ds.InstanceNumber)),
                                                ds.pop("SliceLocation", None)))
    ma, mb = _run(a, tmp_path, "ca"), _run(b, tmp_path, "cb")
    assert np.array_equal(_cine(tmp_path / "ca", ma, pid)[0], _cine(tmp_path / "cb", mb, pid)[0])


def _compress(ds, syntax):
    arr = ds.pixel_array
    if syntax == JPEGBaseline8Bit:
        img8 = np.clip(arr / max(1, arr.max()) * 255, 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img8).save(buf, format="JPEG", quality=95)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = encapsulate([buf.getvalue()])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    else:
        ds.compress(syntax, arr)


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless, JPEGBaseline8Bit], ids=["rle", "j2k", "jpeg"])
def test_compressed_transfer_syntaxes(make_site, pick, tmp_path, syntax):
    site, pid = pick["lge"]
    a = make_site([(site, pid)], name="a")
    b = make_site([(site, pid)], name="b")
    _rewrite(patient_files(b, pid), lambda ds: _compress(ds, syntax))
    assert pydicom.dcmread(patient_files(b, pid)[0]).file_meta.TransferSyntaxUID == syntax
    ma, mb = _run(a, tmp_path, "ca"), _run(b, tmp_path, "cb")
    assert mb["errors"] == [], mb["errors"][:3]
    ca, cb = _cine(tmp_path / "ca", ma, pid)[0], _cine(tmp_path / "cb", mb, pid)[0]
    if syntax == JPEGBaseline8Bit:  # lossy 8-bit: the same images up to quantisation
        assert np.corrcoef(ca.ravel(), cb.ravel())[0, 1] > 0.98
    else:
        assert np.array_equal(ca, cb)


def _to_enhanced(files, out: Path):
    """Write a patient's cine series as one Enhanced MR multi-frame file with functional groups."""
    dss = [pydicom.dcmread(f) for f in files]
    cine = [d for d in dss if "InversionTime" not in d]
    first = cine[0]
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = EnhancedMRImageStorage
    fm.MediaStorageSOPInstanceUID = uid = generate_uid()
    fm.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = fm
    for k in ("PatientID", "StudyInstanceUID", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit",
              "PixelRepresentation", "SamplesPerPixel", "PhotometricInterpretation", "StudyDate"):
        setattr(ds, k, first.get(k))
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = EnhancedMRImageStorage, uid, "MR"
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription = generate_uid(), 30, "sax cine enhanced"
    ds.NumberOfFrames = len(cine)
    shared = Dataset()
    pm = Dataset()
    pm.PixelSpacing, pm.SliceThickness = first.PixelSpacing, first.SliceThickness
    po = Dataset()
    po.ImageOrientationPatient = first.ImageOrientationPatient
    shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = Sequence([pm]), Sequence([po])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per = []
    for d in cine:
        item = Dataset()
        pp = Dataset()
        pp.ImagePositionPatient = d.ImagePositionPatient
        cs = Dataset()
        cs.NominalCardiacTriggerDelayTime = d.TriggerTime
        item.PlanePositionSequence, item.CardiacSynchronizationSequence = Sequence([pp]), Sequence([cs])
        per.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per)
    ds.PixelData = np.stack([d.pixel_array for d in cine]).astype(first.pixel_array.dtype).tobytes()
    ds.save_as(out, enforce_file_format=True)
    return [f for f, d in zip(files, dss) if "InversionTime" not in d]


def test_multiframe_enhanced_mr(make_site, pick, tmp_path):
    site, pid = pick["lge"]
    a = make_site([(site, pid)], name="a")
    b = make_site([(site, pid)], name="b")
    for f in _to_enhanced(patient_files(b, pid), b / "enhanced.dcm"):
        f.unlink()
    ma, mb = _run(a, tmp_path, "ca"), _run(b, tmp_path, "cb")
    assert mb["errors"] == []
    assert mb["studies"][0]["series"]["cine"] == ["sax cine enhanced"]
    assert np.array_equal(_cine(tmp_path / "ca", ma, pid)[0], _cine(tmp_path / "cb", mb, pid)[0])


def test_duplicates_junk_truncated_and_non_mr(make_site, pick, tmp_path):
    site, pid = pick["lge"]
    a = make_site([(site, pid)], name="a")
    b = make_site([(site, pid)], name="b")
    files = patient_files(b, pid)
    for f in files[:5]:  # duplicate instances (same SOP Instance UID) under other names
        shutil.copy2(f, f.with_name(f.name + ".copy"))
    (b / "README.txt").write_text("exported by PACS\n")
    (b / "random.bin").write_bytes(os.urandom(3000))
    trunc = files[7]
    trunc.write_bytes(trunc.read_bytes()[:-500])
    ct = b / "ct" / "CT0001.dcm"
    ct.parent.mkdir()
    ds = pydicom.dcmread(files[10])
    ds.SOPClassUID, ds.Modality, ds.SeriesInstanceUID, ds.SeriesDescription = (
        pydicom.uid.CTImageStorage, "CT", generate_uid(), "calcium score")
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.save_as(ct, enforce_file_format=True)
    mb = _run(b, tmp_path, "cb")
    reasons = {e.get("path"): e["reason"] for e in mb["errors"]}
    assert "not a DICOM file" in reasons["README.txt"] and "not a DICOM file" in reasons["random.bin"]
    assert "truncated" in reasons[str(trunc.relative_to(b))]
    assert "CT is not MR" in reasons["ct/CT0001.dcm"] and "calcium score" in reasons["ct/CT0001.dcm"]
    assert len(mb["studies"]) == 1  # the study survives a lost frame
    assert any("duplicate" in n for n in mb["studies"][0]["notes"])
    ma = _run(a, tmp_path, "ca")
    ca, cb = _cine(tmp_path / "ca", ma, pid)[0], _cine(tmp_path / "cb", mb, pid)[0]
    assert ca.shape == cb.shape and np.corrcoef(ca.ravel(), cb.ravel())[0, 1] > 0.99


def test_study_without_lge_and_study_without_cine(make_site, pick, tmp_path):
    site, pid = pick["lge"]
    site2, pid2 = pick["lge2"]
    b = make_site([(site, pid), (site2, pid2)], name="b")
    for f in patient_files(b, pid):  # remove pid's LGE
        if "InversionTime" in pydicom.dcmread(f, stop_before_pixels=True):
            f.unlink()
    for f in patient_files(b, pid2):  # remove pid2's cine
        if "InversionTime" not in pydicom.dcmread(f, stop_before_pixels=True):
            f.unlink()
    m = _run(b, tmp_path)
    entry = next(s for s in m["studies"] if s["patient_id"] == pid)
    assert entry["lge_shape"] is None
    errs = _errors_for(m, "patient_id", pid2)
    assert errs and "no cine series" in errs[0]["reason"]
    assert pid2 not in {s["patient_id"] for s in m["studies"]}


def test_label_problems(make_site, pick, tmp_path):
    (site, pid), (site2, pid2) = pick["lge"], pick["lge2"]
    b = make_site([(site, pid), (site2, pid2)], name="b")
    write_labels(b, {pid: "CARDIO", "GHOST-1": "NOR"})  # unknown class, label without images; pid2 unlabelled
    m = _run(b, tmp_path)
    assert m["studies"] == []
    assert "not one of the allowed classes: NOR, MINF, DCM, HCM, ARV" in _errors_for(m, "patient_id", pid)[0]["reason"]
    assert "no images" in _errors_for(m, "patient_id", "GHOST-1")[0]["reason"]
    assert "no row in labels.csv" in _errors_for(m, "patient_id", pid2)[0]["reason"]


def _snapshot(root):
    return {str(p): (p.stat().st_mtime_ns, hashlib.sha1(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_source_untouched_and_rerun_is_incremental(make_site, pick, tmp_path):
    (site, pid), (site2, pid2) = pick["lge"], pick["lge2"]
    b = make_site([(site, pid), (site2, pid2)], name="b")
    before = _snapshot(b)
    m1 = _run(b, tmp_path)
    assert _snapshot(b) == before
    cache = tmp_path / "cache"
    outputs = {s["patient_id"]: cache / s["path"] for s in m1["studies"]}
    stamp = {k: p.stat().st_mtime_ns for k, p in outputs.items()}
    m2 = _run(b, tmp_path)
    assert m2["summary"]["files_read"] == 0
    assert {k: p.stat().st_mtime_ns for k, p in outputs.items()} == stamp
    # change one file of pid: only pid's study is read again
    f = patient_files(b, pid)[3]
    ds = pydicom.dcmread(f)
    ds.PatientName = "changed"
    ds.save_as(f, enforce_file_format=True)
    m3 = _run(b, tmp_path)
    n_pid = len(patient_files(b, pid))
    assert m3["summary"]["files_read"] == n_pid
    assert outputs[pid2].stat().st_mtime_ns == stamp[pid2]
    assert _snapshot(b) == {**before, **{k: v for k, v in _snapshot(b).items() if k == str(f)}}
    assert len(m3["studies"]) == 2


def test_refuses_cache_inside_site_and_missing_labels(make_site, pick, tmp_path):
    b = make_site([pick["lge"]], name="b")
    with pytest.raises(IngestError, match="inside the site folder"):
        ingest(b, b / "cache", SMALL, progress=False)
    (b / "labels.csv").unlink()
    with pytest.raises(IngestError, match="labels.csv not found"):
        ingest(b, tmp_path / "c", SMALL, progress=False)
    assert not (tmp_path / "c").exists()
    with pytest.raises(IngestError, match="does not exist"):
        ingest(tmp_path / "nope", tmp_path / "c", SMALL, progress=False)


def test_hostile_entries_become_error_entries_and_the_ingest_goes_on(make_site, pick, tmp_path):
    """Issue 14 item 8: a dangling symlink, a symlink loop, a FIFO (opening it would block), a
    deflated file that inflates to gigabytes and a header that claims gigabytes of pixels: each is
    an error entry naming the file, and the patient's study is still ingested."""
    site, pid = pick["lge"]
    b = make_site([(site, pid)], name="b")
    (b / "dangling.dcm").symlink_to(b / "nowhere.dcm")
    (b / "loop1").symlink_to(b / "loop2")
    (b / "loop2").symlink_to(b / "loop1")
    os.mkfifo(b / "pipe.dcm")
    ds = pydicom.dcmread(patient_files(b, pid)[0])
    ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PixelData = bytes(300 * 2**20)  # zeros: deflates to ~300 KiB, inflates to 300 MiB
    ds.save_as(b / "bomb.dcm", enforce_file_format=True)
    assert (b / "bomb.dcm").stat().st_size < 2**20
    big = pydicom.dcmread(patient_files(b, pid)[1])
    big.SOPInstanceUID = big.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    big.Rows = big.Columns = 60000  # the header claims 60000 x 60000 x 16 bit: 6.7 GiB
    big.save_as(b / "claims-gigabytes.dcm", enforce_file_format=True)
    m = _run(b, tmp_path, "cb")
    reasons = {e.get("path"): e["reason"] for e in m["errors"]}
    assert "leads nowhere" in reasons["dangling.dcm"]
    assert "leads nowhere" in reasons["loop1"] and "leads nowhere" in reasons["loop2"]
    assert "not a regular file" in reasons["pipe.dcm"]
    assert "inflates beyond 256 MiB" in reasons["bomb.dcm"]
    assert "6866 MiB" in reasons["claims-gigabytes.dcm"] and "above 256 MiB" in reasons["claims-gigabytes.dcm"]
    assert len(m["studies"]) == 1 and m["studies"][0]["patient_id"] == pid


def test_a_labels_file_that_is_not_utf8_is_named_with_the_fix(make_site, pick, tmp_path):
    site, pid = pick["lge"]
    b = make_site([(site, pid)], name="b")
    dx = labels_of(b)[pid]
    (b / "labels.csv").write_bytes(f"patient_id,diagnosis,note\n{pid},{dx},Müller\n".encode("latin-1"))
    with pytest.raises(IngestError, match=r"labels.csv is not UTF-8 text \(line 2.*CSV UTF-8"):
        _run(b, tmp_path, "cb")
    (b / "biomechanics.csv").write_bytes("patient_id,t,strain\nMüller,0,1\n".encode("latin-1"))
    write_labels(b, {pid: dx})
    m = _run(b, tmp_path, "cc")  # an optional table that is not UTF-8: an error entry, the site goes on
    assert any("biomechanics not used" in e["reason"] and "not UTF-8" in e["reason"] for e in m["errors"])
    assert len(m["studies"]) == 1
