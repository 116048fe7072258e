"""Write MR Image Storage series as scanners do: one file per frame per slice.

pydicom serialises one template file per series; each instance is that template with its
per-instance values (UIDs, InstanceNumber, position, trigger time, pixels) patched in at known
byte offsets. Every patched value has a fixed width that is valid for its VR, so the bytes are
exactly what pydicom would write for the same values padded with spaces, about 20x faster.
A test reads every kind of written file back with pydicom.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, MRImageStorage, PYDICOM_IMPLEMENTATION_UID

UID_ROOT = "2.25."
_UID_DIGITS = 38
_UID_MARK = UID_ROOT + "1" * _UID_DIGITS  # 43 characters, like every generated UID
_NUM_W = 11  # fixed width of patched DS values
_MARKS = {
    "ipp": ("-11111.1111", "-22222.2222", "-33333.3333"),
    "loc": "-44444.4444",
    "trig": "-55555.5555",
    "inst": "975319",
}


def stable_uid(*parts: object) -> str:
    """A deterministic UID under 2.25 (ISO/IEC 9834-8 style) with exactly 38 digits."""
    h = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=16).digest()
    n = int.from_bytes(h, "big") % (9 * 10 ** (_UID_DIGITS - 1)) + 10 ** (_UID_DIGITS - 1)
    return UID_ROOT + str(n)


def _fmt(v: float) -> str:
    s = f"{v:{_NUM_W}.4f}"
    if len(s) != _NUM_W:
        raise ValueError(f"value {v} does not fit a {_NUM_W}-character DS")
    return s


@dataclass
class SeriesTemplate:
    """A serialised series header with the byte offsets of every per-instance value."""

    data: bytes
    offsets: dict[str, list[int]]
    pixel_offset: int

    @classmethod
    def build(cls, ds: Dataset, pixel_bytes: int, implicit_vr: bool, slice_location: bool) -> SeriesTemplate:
        ds.SOPInstanceUID = _UID_MARK
        ds.file_meta.MediaStorageSOPInstanceUID = _UID_MARK
        ds.InstanceNumber = _MARKS["inst"]
        ds.ImagePositionPatient = list(_MARKS["ipp"])
        if slice_location:
            ds.SliceLocation = _MARKS["loc"]
        if "TriggerTime" in ds:
            ds.TriggerTime = _MARKS["trig"]
        ds.PixelData = b"\0" * pixel_bytes
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit_vr else ExplicitVRLittleEndian
        buf = BytesIO()
        dcmwrite(buf, ds, enforce_file_format=True)
        data = buf.getvalue()
        header = data[: len(data) - pixel_bytes]
        offsets: dict[str, list[int]] = {}
        for key, mark in [("uid", _UID_MARK), ("inst", _MARKS["inst"]), ("loc", _MARKS["loc"]),
                          ("trig", _MARKS["trig"])] + [(f"ipp{i}", m) for i, m in enumerate(_MARKS["ipp"])]:
            found, start = [], 0
            while (i := header.find(mark.encode(), start)) >= 0:
                found.append(i)
                start = i + 1
            offsets[key] = found
        expect = {"uid": 2, "inst": 1, "ipp0": 1, "ipp1": 1, "ipp2": 1,
                  "loc": int(slice_location), "trig": int("TriggerTime" in ds)}
        for key, n in expect.items():
            if len(offsets[key]) != n:  # pragma: no cover - guards the template invariant
                raise RuntimeError(f"template marker {key} found {len(offsets[key])} times, expected {n}")
        return cls(data, offsets, len(data) - pixel_bytes)

    def instance(self, uid: str, number: int, position: np.ndarray, pixels: bytes,
                 slice_location: float | None = None, trigger_time: float | None = None) -> bytes:
        out = bytearray(self.data)
        if len(uid) != len(_UID_MARK):
            raise ValueError(f"UID {uid!r} must have {len(_UID_MARK)} characters")
        for off in self.offsets["uid"]:
            out[off : off + len(uid)] = uid.encode()
        patch = {"inst": f"{number:{len(_MARKS['inst'])}d}"}
        for i in range(3):
            patch[f"ipp{i}"] = _fmt(float(position[i]))
        if self.offsets["loc"]:
            patch["loc"] = _fmt(float(slice_location))
        if self.offsets["trig"]:
            patch["trig"] = _fmt(float(trigger_time))
        for key, text in patch.items():
            for off in self.offsets[key]:
                out[off : off + len(text)] = text.encode()
        if len(pixels) != len(out) - self.pixel_offset:
            raise ValueError("pixel data size differs from the template's")
        out[self.pixel_offset :] = pixels
        return bytes(out)


def base_dataset(
    *,
    patient_id: str,
    study_uid: str,
    series_uid: str,
    frame_of_reference: str,
    series_number: int,
    series_description: str,
    manufacturer: str,
    model: str,
    field_strength: float,
    rows: int,
    cols: int,
    pixel_spacing: float,
    slice_thickness: float,
    spacing_between_slices: float,
    orientation: np.ndarray,
    signed: bool,
    study_date: str,
    cardiac: dict[str, float] | None = None,
    inversion_time: float | None = None,
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "M", "ND"),
) -> Dataset:
    """The attributes every instance of an MR series shares."""
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = MRImageStorage
    fm.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = fm
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = list(image_type)
    ds.SOPClassUID = MRImageStorage
    ds.StudyDate = ds.SeriesDate = study_date
    ds.StudyTime = "101500"
    ds.Modality = "MR"
    ds.Manufacturer = manufacturer
    ds.ManufacturerModelName = model
    ds.StudyDescription = "CARDIAC MRI"
    ds.SeriesDescription = series_description
    ds.PatientName = patient_id
    ds.PatientID = patient_id
    ds.BodyPartExamined = "HEART"
    ds.ScanningSequence = ["GR", "IR"] if inversion_time is not None else ["GR"]
    ds.SequenceVariant = ["SP", "MP"] if inversion_time is not None else ["SS"]
    ds.MRAcquisitionType = "2D"
    ds.SliceThickness = f"{slice_thickness:.2f}"
    ds.SpacingBetweenSlices = f"{spacing_between_slices:.2f}"
    ds.RepetitionTime = "3.1" if inversion_time is None else "6.5"
    ds.EchoTime = "1.3" if inversion_time is None else "3.2"
    ds.MagneticFieldStrength = f"{field_strength:.1f}"
    ds.FlipAngle = "55" if inversion_time is None else "25"
    if inversion_time is not None:
        ds.InversionTime = f"{inversion_time:.1f}"
    if cardiac is not None:
        ds.TriggerTime = "0"
        ds.NominalInterval = f"{cardiac['rr']:.0f}"
        ds.HeartRate = f"{60000.0 / cardiac['rr']:.0f}"
        ds.CardiacNumberOfImages = int(cardiac["frames"])
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.AcquisitionNumber = 1
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
    ds.FrameOfReferenceUID = frame_of_reference
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.PixelSpacing = [f"{pixel_spacing:.4f}", f"{pixel_spacing:.4f}"]
    ds.BitsAllocated = 16
    ds.BitsStored = 12 if not signed else 16
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(signed)
    ds.WindowCenter = "600"
    ds.WindowWidth = "1200"
    return ds


def write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
