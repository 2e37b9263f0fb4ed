"""Reading preprocessing inputs (main process): JSON Lines, JSON arrays, Parquet and saved
``datasets`` directories -> items ``(location, payload, payload is a JSON line)`` in file order.

JSON Lines are decoded line by line here (not by a text-mode file), so a line that is not valid
UTF-8 becomes one invalid record naming its file, line and byte (its payload is the
``InvalidRecord``), which ``--skip-invalid`` skips like any other, instead of a
``UnicodeDecodeError`` that ends the run without saying where.
"""

import json
import os
from typing import Iterator, Optional, Tuple

from megasimpo.data.formats import InvalidRecord, line_location, row_location

# (location, payload, payload is a JSON line); the payload is a raw JSON line, a decoded row or
# the InvalidRecord of a line that could not be decoded.
Item = Tuple[str, object, bool]


def _count_lines(path: str) -> int:
    with open(path, "rb") as f:
        return sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 20), b""))


def _not_utf8(raw: bytes, err: UnicodeDecodeError) -> Tuple[int, str]:
    """(1-based line, problem) of the first bad byte of ``raw``; the column counts characters."""
    start = raw.rfind(b"\n", 0, err.start) + 1
    column = len(raw[start:err.start].decode("utf-8")) + 1
    return (raw.count(b"\n", 0, err.start) + 1,
            f"not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {column})")


def decode_line(raw: bytes, where: str) -> str:
    """``raw`` (one line) as UTF-8; ``InvalidRecord`` naming ``where``, the first bad byte and its
    column otherwise."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InvalidRecord(where, None, _not_utf8(raw, err)[1]) from None


def _json_lines(path: str) -> Iterator[Item]:
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            where = line_location(path, number)
            try:
                line = decode_line(raw, where)
            except InvalidRecord as err:
                yield where, err, False  # reported (or skipped) in order, like a malformed line
                continue
            if line.strip():  # blank lines (e.g. a trailing one) are not records
                yield where, line, True


def _first_char(path: str) -> str:
    with open(path, "rb") as f:  # bytes: a bad byte further on is reported by _json_lines
        for raw in f:
            if raw.strip():
                return chr(raw.lstrip()[0])
    return ""


def _json_array(path: str) -> list:
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:  # one document: no records to skip to
        line, problem = _not_utf8(raw, err)
        raise ValueError(f"{line_location(path, line)}: {problem}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:  # a broken array has no records to skip to
        raise ValueError(f"{line_location(path, err.lineno)}: malformed JSON: {err.msg} "
                         f"(column {err.colno})") from None


def open_input(path: str) -> Tuple[Optional[int], Iterator[Item]]:
    """(record count or an estimate for the progress bar, items in file order) of one input."""
    if os.path.isdir(path):
        import datasets

        try:
            ds = datasets.load_from_disk(path)
        except (FileNotFoundError, ValueError) as err:
            raise ValueError(f"{path}: not a saved datasets directory: {err}") from None
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds and len(ds) != 1:
                raise ValueError(f"{path}: saved DatasetDict has splits {sorted(ds)}; expected "
                                 "'train' or a single split")
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        return len(ds), ((row_location(path, i), row, False) for i, row in enumerate(ds))
    if not os.path.isfile(path):
        raise ValueError(f"input {path!r} not found")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".parquet":
        import datasets
        import pyarrow.parquet

        try:
            num_rows = pyarrow.parquet.read_metadata(path).num_rows
            ds = datasets.load_dataset("parquet", data_files=path, split="train", streaming=True)
        except Exception as err:  # pyarrow/datasets raise many types for an unreadable file
            raise ValueError(f"{path}: not a readable Parquet file: {err}") from None
        return num_rows, ((row_location(path, i), row, False) for i, row in enumerate(ds))
    if ext == ".jsonl" or (ext == ".json" and _first_char(path) != "["):
        return _count_lines(path), _json_lines(path)
    if ext == ".json":
        rows = _json_array(path)
        return len(rows), ((row_location(path, i), row, False) for i, row in enumerate(rows))
    raise ValueError(f"input {path!r}: unsupported file type {ext!r} (expected .jsonl, .json, "
                     ".parquet or a saved datasets directory)")
