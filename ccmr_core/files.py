"""Writing files whole: the bytes go to a temporary name in the same folder, which is then renamed
over the target (atomic on POSIX), so no reader and no crash ever sees half a file, and a failed
write leaves the old file as it was."""

from __future__ import annotations

import csv
import io
import os
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path, mode: int | None = None):
    """Yield a temporary path for a writer that wants a file name (torch.save, zipfile, onnx);
    on success it replaces ``path`` (with permissions ``mode`` when given), else it is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | Path, data: bytes | str, mode: int | None = None) -> None:
    """Write ``data`` whole. With ``mode`` the file has those permissions from its first byte
    (0o600 for private keys), whatever the umask."""
    raw = data.encode() if isinstance(data, str) else data
    with atomic_path(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666 if mode is None else mode)
        with os.fdopen(fd, "wb") as f:
            if mode is not None:
                os.fchmod(f.fileno(), mode)
            f.write(raw)


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def csv_cell(value):
    """A value for a CSV a person may open in a spreadsheet: text that a spreadsheet would run as a
    formula (it starts with = + - @, tab or CR; e.g. a PatientID from a DICOM header) is kept as text
    by a leading apostrophe (OWASP's CSV-injection advice). Numbers, also written as text, stay."""
    if isinstance(value, str) and value.startswith(FORMULA_START) and not _is_number(value):
        return "'" + value
    return value


def write_csv(path: str | Path, header: list[str], rows: list[list] | list[dict]) -> None:
    """Write a CSV atomically: the csv module quotes commas and quotes, ``csv_cell`` every value;
    a row is a list in the header's order or a dict by column (missing columns stay empty)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        w.writerow([csv_cell(v) for v in ([r.get(c, "") for c in header] if isinstance(r, dict) else r)])
    write_atomic(path, buf.getvalue())
