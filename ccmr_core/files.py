"""Writing files whole: the bytes go to a temporary name in the same folder, are flushed to disk
(fsync), and the name is then renamed over the target (atomic on POSIX) and the folder synced, so
no reader, crash or power cut ever leaves half a file, and a failed write leaves the old file as
it was. Append-only logs (JSON lines) are appended a whole line at a time with fsync; a reader
skips a line torn by a crash, and the next append ends it first so it cannot swallow a row."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from contextlib import contextmanager
from pathlib import Path


def sha256_file(path: str | Path) -> str:
    """The file's SHA-256 (hex), read in 1 MiB chunks: how a model file is identified."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)  # the rename itself
    finally:
        tmp.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def append_jsonl(path: str | Path, rows: list[dict]) -> None:
    """Append ``rows`` to a JSON-lines log, one line each, synced to disk. A last line left without
    its newline by a crash is ended first, so it stays one damaged line that readers skip."""
    if not rows:
        return
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    with open(path, "a+b") as f:
        f.seek(0, os.SEEK_END)
        if f.tell():
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                data = b"\n" + data
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | Path) -> tuple[list[dict], list[int]]:
    """(rows, numbers of the lines that are not a JSON object): a crash mid-append leaves a torn
    line; it is skipped here and the caller says so, instead of the whole log becoming unreadable."""
    path = Path(path)
    if not path.is_file():
        return [], []
    rows, bad = [], []
    for k, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            bad.append(k)
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad.append(k)
    return rows, bad


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
