"""Read one file into 2D image frames with the geometry and timing ingestion needs.

Handles single-frame MR and multi-frame Enhanced MR (per-frame functional groups), implicit and
explicit VR, and compressed transfer syntaxes through pydicom's decoders (pylibjpeg-openjpeg,
pillow, python-gdcm). Uncompressed little-endian pixel data is decoded with ``np.frombuffer``
directly, which is what ``pixel_array`` computes, without its plugin overhead.

Problems never raise: :func:`read_file` returns either frames or a :class:`FileProblem` whose
``reason`` says what is wrong and what to do.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import (DeflatedExplicitVRLittleEndian, EnhancedMRImageStorage, ExplicitVRLittleEndian,
                         ImplicitVRLittleEndian, MRImageStorage)

MR_STORAGE = {str(MRImageStorage), str(EnhancedMRImageStorage)}
# the most one file may decode to (pixels, or a deflated dataset inflated): real MR objects are at
# most tens of MiB; a small crafted file can claim gigabytes (a decompression bomb)
MAX_DECODED_BYTES = 256 * 2**20
DEFLATED = str(DeflatedExplicitVRLittleEndian)
_NATIVE = {str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)}


@dataclass
class Frame:
    """One 2D image and what ingestion needs to place it in space and time."""

    path: str
    frame: int
    patient_id: str
    study_uid: str
    series_uid: str
    series_number: int
    series_description: str
    sop_uid: str
    instance: int
    position: np.ndarray | None  # ImagePositionPatient (3,)
    orientation: np.ndarray | None  # ImageOrientationPatient (6,)
    spacing: tuple[float, float] | None  # (between rows, between columns) mm
    slice_location: float | None
    trigger_time: float | None
    inversion_time: float | None
    cardiac_images: int | None
    temporal_index: int | None
    pixels: np.ndarray = field(repr=False)

    @property
    def normal(self) -> np.ndarray | None:
        if self.orientation is None:
            return None
        n = np.cross(self.orientation[:3], self.orientation[3:])
        norm = np.linalg.norm(n)
        return n / norm if norm > 0 else None


@dataclass
class FileProblem:
    path: str
    reason: str
    kind: str = "error"  # "error", "not-dicom", "not-mr"
    series_uid: str | None = None
    series_description: str = ""
    modality: str = ""


def _float(v) -> float | None:
    try:
        return None if v is None or v == "" else float(v)
    except (TypeError, ValueError):
        return None


def _floats(v, n: int) -> np.ndarray | None:
    try:
        a = np.asarray([float(x) for x in v], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return a if a.shape == (n,) else None


def _group(ds, i: int, name: str):
    """Item of functional group ``name`` for frame i: per-frame first, then shared."""
    for seq_name in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
        seq = ds.get(seq_name)
        if not seq:
            continue
        item = seq[i] if seq_name.startswith("PerFrame") and i < len(seq) else seq[0]
        sub = item.get(name)
        if sub:
            return sub[0]
    return None


class _Raw:
    """Fast access to a dataset's elements without pydicom's value conversion.

    Numeric strings (DS, IS), UIDs and code strings are ASCII by definition and US values are
    little-endian in the transfer syntaxes this reads, so their raw bytes are parsed directly;
    anything already converted, or any other encoding, goes through pydicom.
    """

    def __init__(self, ds):
        self.ds = ds
        self.le = ds.file_meta.get("TransferSyntaxUID", ImplicitVRLittleEndian) != "1.2.840.10008.1.2.2"

    def _bytes(self, tag: int):
        el = self.ds.get_item(tag)
        if el is None:
            return None
        v = el.value
        return v if isinstance(v, (bytes, bytearray)) and getattr(el, "is_raw", False) else el

    def text(self, tag: int) -> str:
        v = self._bytes(tag)
        if v is None:
            return ""
        if isinstance(v, (bytes, bytearray)):
            return v.decode("ascii", "replace").strip("\x00 ")
        return str(self.ds[tag].value or "")

    def numbers(self, tag: int) -> list[float] | None:
        v = self._bytes(tag)
        if v is None:
            return None
        if isinstance(v, (bytes, bytearray)):
            parts = v.decode("ascii", "replace").strip("\x00 ").split("\\")
        else:
            val = self.ds[tag].value
            parts = list(val) if isinstance(val, (list, tuple, MultiValue)) else [val]
        try:
            return [float(x) for x in parts if str(x).strip() != ""]
        except (TypeError, ValueError):
            return None

    def number(self, tag: int) -> float | None:
        v = self.numbers(tag)
        return v[0] if v else None

    def us(self, tag: int, default: int = 0) -> int:
        v = self._bytes(tag)
        if v is None:
            return default
        if isinstance(v, (bytes, bytearray)) and self.le and len(v) >= 2:
            return int.from_bytes(v[:2], "little")
        return int(self.ds[tag].value)


def _native_pixels(ds, raw: _Raw) -> np.ndarray | None:
    """Decode uncompressed little-endian single-sample data without the plugin machinery."""
    ts = str(ds.file_meta.get("TransferSyntaxUID", ""))
    if ts not in _NATIVE or raw.us(0x00280002, 1) != 1 or 0x7FE00010 not in ds:
        return None
    bits = raw.us(0x00280100)
    stored = raw.us(0x00280101, bits)
    if bits not in (8, 16):
        return None
    signed = raw.us(0x00280103) == 1
    if signed and stored != bits:
        return None  # sign extension of partial words: leave it to pydicom
    rows, cols = raw.us(0x00280010), raw.us(0x00280011)
    n = int(raw.number(0x00280008) or 1)
    dtype = np.dtype(("<i" if signed else "<u") + str(bits // 8))
    data = ds.get_item(0x7FE00010).value
    need = rows * cols * n * dtype.itemsize
    if len(data) < need:
        raise ValueError(f"pixel data is truncated: {len(data)} bytes, expected {need}")
    arr = np.frombuffer(data, dtype=dtype, count=rows * cols * n)
    if not signed and stored < bits:
        arr = arr & np.array((1 << stored) - 1, dtype=dtype)
    return arr.reshape((n, rows, cols) if n > 1 else (rows, cols))


def _inflated_too_big(path: Path, limit: int = MAX_DECODED_BYTES) -> bool:
    """A Deflated Explicit VR Little Endian file inflates past ``limit`` (pydicom would inflate it
    whole into memory before reading a tag). Inflated in bounded steps: never more than ``limit``."""
    with open(path, "rb") as f:
        head = f.read(132 + 12)
        if len(head) < 144 or head[128:132] != b"DICM" or head[132:136] != b"\x02\x00\x00\x00":
            return False
        meta_len = int.from_bytes(head[140:144], "little")  # (0002,0000) UL: the rest of the file meta
        meta = f.read(meta_len)
        if DEFLATED.encode() not in meta:
            return False
        z = zlib.decompressobj(-zlib.MAX_WBITS)
        total = 0
        while chunk := f.read(1 << 16):
            data = z.decompress(chunk, limit + 1 - total)
            total += len(data)
            while z.unconsumed_tail and total <= limit:
                total += len(z.decompress(z.unconsumed_tail, limit + 1 - total))
            if total > limit:
                return True
    return False


def _pixel_bytes(raw) -> int:
    """What the pixel data of a file decodes to, from its header (rows x columns x frames x samples x bits)."""
    rows, cols = raw.us(0x00280010), raw.us(0x00280011)
    frames = int(raw.number(0x00280008) or 1)
    samples, bits = raw.us(0x00280002, 1), raw.us(0x00280100, 16)
    return rows * cols * max(frames, 1) * max(samples, 1) * max(bits, 1) // 8


def read_file(path: Path, root: Path) -> list[Frame] | FileProblem:
    rel = str(path.relative_to(root))
    limit = f"{MAX_DECODED_BYTES >> 20} MiB"
    try:
        if _inflated_too_big(path):
            return FileProblem(rel, f"a deflated DICOM file that inflates beyond {limit}; skipped (damaged or "
                                    "crafted: no MR object is that large)")
    except OSError as e:
        return FileProblem(rel, f"cannot be read ({e.strerror}); skipped")
    try:
        try:
            ds = pydicom.dcmread(path)
        except InvalidDicomError:
            ds = pydicom.dcmread(path, force=True)  # files written without the 128-byte preamble
            if "SOPClassUID" not in ds and "PixelData" not in ds:
                return FileProblem(rel, "not a DICOM file; ignored", kind="not-dicom")
            if "TransferSyntaxUID" not in ds.file_meta:
                ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    except Exception as e:  # noqa: BLE001 - any parser failure is a property of the file
        return FileProblem(rel, f"cannot be parsed as DICOM ({type(e).__name__}: {e}); the file may be "
                                "truncated or corrupt: re-export it from the PACS")
    try:
        return _frames(ds, rel)
    except _Skip as s:
        return s.problem
    except Exception as e:  # noqa: BLE001
        ts = ds.file_meta.get("TransferSyntaxUID")
        tsname = getattr(ts, "name", str(ts))
        return FileProblem(rel, f"pixel data cannot be decoded ({tsname}): {e}. If the file is complete, "
                                "install a decoder for this transfer syntax (python-gdcm covers most)",
                           series_uid=str(ds.get("SeriesInstanceUID", "")) or None)


class _Skip(Exception):
    def __init__(self, problem: FileProblem):
        self.problem = problem


def _frames(ds, rel: str) -> list[Frame]:
    raw = _Raw(ds)
    sop_class = raw.text(0x00080016)
    modality = raw.text(0x00080060)
    series_uid = raw.text(0x0020000E) or None
    desc = str(ds.get("SeriesDescription", "") or "")
    if sop_class not in MR_STORAGE or (modality and modality != "MR"):
        what = modality or (getattr(ds.get("SOPClassUID"), "name", "") or "unknown SOP class")
        raise _Skip(FileProblem(rel, f"{what} is not MR imaging; skipped", kind="not-mr", series_uid=series_uid,
                                series_description=desc, modality=what))
    if 0x7FE00010 not in ds:
        raise _Skip(FileProblem(rel, "MR object without pixel data; skipped", kind="not-mr",
                                series_uid=series_uid, series_description=desc, modality="MR (no pixels)"))
    study_uid = raw.text(0x0020000D)
    missing = [k for k, v in (("StudyInstanceUID", study_uid), ("SeriesInstanceUID", series_uid)) if not v]
    if missing:
        raise _Skip(FileProblem(rel, f"missing {', '.join(missing)}; the file cannot be grouped into a study"))
    size = _pixel_bytes(raw)
    if size > MAX_DECODED_BYTES:
        raise _Skip(FileProblem(rel, f"pixel data would decode to {size >> 20} MiB (rows x columns x frames x bits "
                                     f"in its header), above {MAX_DECODED_BYTES >> 20} MiB for one file; skipped "
                                     "(damaged or crafted)", series_uid=series_uid, series_description=desc))
    pixels = _native_pixels(ds, raw)
    if pixels is None:
        pixels = ds.pixel_array
    slope = raw.number(0x00281053) or 1.0
    intercept = raw.number(0x00281052) or 0.0
    n = int(raw.number(0x00280008) or 1)
    if n == 1 and pixels.ndim == 3:
        pixels = pixels[0]
    frames_px = [pixels] if n == 1 else list(pixels)
    common = dict(
        path=rel,
        patient_id=str(ds.get("PatientID", "") or ""),
        study_uid=study_uid,
        series_uid=series_uid,
        series_number=int(raw.number(0x00200011) or 0),
        series_description=desc,
        sop_uid=raw.text(0x00080018),
        instance=int(raw.number(0x00200013) or 0),
        slice_location=raw.number(0x00201041),
        cardiac_images=int(raw.number(0x00181090) or 0) or None,
    )
    out = []
    for i, px in enumerate(frames_px):
        if n == 1:
            pos = _floats(raw.numbers(0x00200032), 3)
            ori = _floats(raw.numbers(0x00200037), 6)
            sp = _floats(raw.numbers(0x00280030), 2)
            trig = raw.number(0x00181060)
            inv = raw.number(0x00180082)
            temporal = None
        else:  # Enhanced MR: geometry and timing live in the functional groups
            g = _group(ds, i, "PlanePositionSequence")
            pos = _floats(g.get("ImagePositionPatient"), 3) if g else None
            g = _group(ds, i, "PlaneOrientationSequence")
            ori = _floats(g.get("ImageOrientationPatient"), 6) if g else None
            g = _group(ds, i, "PixelMeasuresSequence")
            sp = _floats(g.get("PixelSpacing"), 2) if g else _floats(raw.numbers(0x00280030), 2)
            g = _group(ds, i, "CardiacSynchronizationSequence")
            trig = _float(g.get("NominalCardiacTriggerDelayTime")) if g else None
            g = _group(ds, i, "MRModifierSequence")
            inv = _float(g.get("InversionTimes")[0]) if g and g.get("InversionTimes") else raw.number(0x00180082)
            g = _group(ds, i, "FrameContentSequence")
            temporal = int(g.get("TemporalPositionIndex")) if g and g.get("TemporalPositionIndex") else None
        if slope != 1.0 or intercept != 0.0:
            px = px.astype(np.float32) * slope + intercept
        out.append(
            Frame(
                frame=i,
                position=pos,
                orientation=ori,
                spacing=(float(sp[0]), float(sp[1])) if sp is not None else None,
                trigger_time=trig,
                inversion_time=inv,
                temporal_index=temporal,
                pixels=px,
                **common,
            )
        )
    return out
