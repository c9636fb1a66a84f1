"""Recognise an input file's format from its first bytes, and read small tables whole.

Formats are told apart by content first (a Parquet file named .arrow still reads), and by
extension only where content cannot tell (CSV against other text).
"""

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.ipc as ipc
import pyarrow.json as pajson
import pyarrow.parquet as pq

from sppjit.errors import InputError

ARROW_FILE_MAGIC = b"ARROW1"
PARQUET_MAGIC = b"PAR1"
# Arrow IPC streams since format 0.15 open with this continuation marker.
ARROW_STREAM_MARKER = b"\xff\xff\xff\xff"
_ARROW_EXTENSIONS = {".arrow", ".arrows", ".ipc", ".feather", ".stream"}
_INT64_MAX = (1 << 63) - 1


def short_reason(exc: BaseException) -> str:
    """One line that says why pyarrow or the OS failed (their messages may span lines)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def cannot_read(what: str, path: str, exc: BaseException | str) -> InputError:
    """The error for a file that exists but is unreadable, truncated or corrupt."""
    reason = exc if isinstance(exc, str) else short_reason(exc)
    return InputError(f"{what}: cannot read {path}: {reason}")


def read_magic(path: str | os.PathLike, what: str) -> bytes:
    """The first 8 bytes of a regular file; InputError if it is missing or unreadable."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(f"{what}: no such file: {path}")
    if os.path.isdir(path):
        raise cannot_read(what, path, "is a directory")
    try:
        with open(path, "rb") as handle:
            return handle.read(8)
    except OSError as exc:
        raise cannot_read(what, path, exc.strerror or exc) from None


def read_table(path: str | os.PathLike, what: str) -> pa.Table:
    """Read a small input file whole: Parquet, Arrow IPC (file or stream), CSV or JSON.

    JSON is either an array of objects or JSON Lines (one object per line). ``what`` names the
    input in error messages ("protection", "memslots").
    """
    path = os.fspath(path)
    magic = read_magic(path, what)
    suffix = Path(path).suffix.lower()
    try:
        table = _read_any(path, what, magic, suffix)
        table.column_names  # noqa: B018 - decoded here: a name that is not UTF-8 fails now
        return _validated(table, what, path)
    except UnicodeDecodeError:
        raise cannot_read(what, path, "not valid UTF-8 (a column name or the text)") from None
    except (pa.ArrowException, OSError) as exc:
        raise cannot_read(what, path, exc) from None


def _read_any(path: str, what: str, magic: bytes, suffix: str) -> pa.Table:
    # Arrow files are read, not memory-mapped: a mapped file that shrinks while it is in
    # use kills the process with SIGBUS.
    if magic.startswith(PARQUET_MAGIC):
        # One file: ParquetFile, not read_table, whose dataset machinery costs ~100 ms of
        # imports (pyarrow.dataset, pyarrow.compute) on every replay with a protection file.
        return pq.ParquetFile(path, memory_map=False).read()
    if magic.startswith(ARROW_FILE_MAGIC):
        return ipc.open_file(pa.OSFile(path, "rb")).read_all()
    if magic.startswith(ARROW_STREAM_MARKER) or suffix in _ARROW_EXTENSIONS:
        return ipc.open_stream(pa.OSFile(path, "rb")).read_all()
    text_start = _first_text_char(path)
    if suffix != ".csv" and text_start in ("[", "{"):
        _check_json_depth(path, what)
    if suffix != ".csv" and text_start == "[":
        return _read_json_array(path, what)
    if suffix != ".csv" and text_start == "{":
        return _read_json_lines(path, what)
    return pacsv.read_csv(path)


def _validated(table: pa.Table, what: str, path: str) -> pa.Table:
    """A table whose buffers were checked against its schema, fully (these files are
    small): a corrupt Arrow offset would make the readers read out of bounds, and text that
    is not UTF-8 (pyarrow.json lets it through) would fail later, where it is used."""
    try:
        table.validate(full=True)
    except pa.ArrowInvalid as exc:
        reason = short_reason(exc)
        if "utf8" in reason.lower() or "utf-8" in reason.lower():
            reason = "not valid UTF-8 (a column name or the text)"
        raise cannot_read(what, path, reason) from None
    return table


MAX_JSON_DEPTH = 16  # rows are objects of scalars: depth 2; far more is not a table


def _check_json_depth(path: str, what: str) -> None:
    """Refuse JSON nested deeper than MAX_JSON_DEPTH before a parser sees it: Python's json
    module runs out of recursion, and pyarrow.json's C++ parser out of stack (a segfault)."""
    import re

    import numpy as np

    with open(path, "rb") as handle:
        data = handle.read()
    # Brackets inside strings do not nest: drop the strings (escapes included) first.
    data = re.sub(rb'"(?:[^"\\]|\\.)*"', b'""', data)
    codes = np.frombuffer(data, dtype=np.uint8)
    step = (np.isin(codes, (ord("["), ord("{"))).astype(np.int64)
            - np.isin(codes, (ord("]"), ord("}"))).astype(np.int64))
    depth = int(np.cumsum(step).max(initial=0))
    if depth > MAX_JSON_DEPTH:
        raise cannot_read(what, path, f"JSON nested {depth} levels deep (a table of rows "
                                      f"needs 2; at most {MAX_JSON_DEPTH} are read)")


def _first_text_char(path: str) -> str:
    """The first non-blank character (byte-order mark skipped), "" for an empty file."""
    with open(path, encoding="utf-8-sig", errors="replace") as handle:
        while chunk := handle.read(4096):
            if stripped := chunk.lstrip():
                return stripped[0]
    return ""


def _read_json_array(path: str, what: str) -> pa.Table:
    """A JSON array of objects (the json module: pyarrow.json reads only JSON Lines)."""
    try:
        with open(path, encoding="utf-8-sig") as handle:
            rows = json.load(handle)
    except json.JSONDecodeError as exc:
        raise cannot_read(what, path, exc) from None
    if not isinstance(rows, list):
        raise cannot_read(what, path, "expected a JSON array of objects")
    return _rows_to_table(rows, what, path)


def _read_json_lines(path: str, what: str) -> pa.Table:
    """JSON Lines through pyarrow.json, falling back to the json module for mixed columns.

    pyarrow.json refuses a column that changes from number to string, which is how users write
    access maps in both decimal and "0x" hex; the json module takes that file line by line.
    """
    try:
        return pajson.read_json(path)
    except pa.ArrowInvalid as arrow_error:
        rows = []
        with open(path, encoding="utf-8-sig") as handle:
            for line in handle:
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise cannot_read(what, path, arrow_error) from None
        return _rows_to_table(rows, what, path)


def _rows_to_table(rows: list, what: str, path: str) -> pa.Table:
    """Columns from a list of JSON objects; a column mixing numbers and text becomes text.

    Text columns are parsed later as decimal or "0x" hex, so keeping every value as text loses
    nothing and lets one column mix both spellings.
    """
    if not all(isinstance(row, dict) for row in rows):
        raise cannot_read(what, path, "expected JSON objects, one per row")
    names = dict.fromkeys(name for row in rows for name in row)
    columns = {}
    for name in names:
        values = [row.get(name) for row in rows]
        as_text = any(isinstance(v, str) or (isinstance(v, int) and v > _INT64_MAX)
                      for v in values)
        if as_text:
            values = [v if v is None or isinstance(v, str) else json.dumps(v) for v in values]
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowException, OverflowError):
            raise InputError(f"{what}: column '{name}' of {path} mixes values of "
                             "different kinds") from None
    return pa.table(columns)


def trace_format(path: str | os.PathLike) -> str:
    """The format name a summary records for a trace file, from its content: "parquet",
    "parquet-dataset" (a directory), "arrow" (IPC file) or "arrow-stream"."""
    if os.path.isdir(path):
        return "parquet-dataset"
    magic = read_magic(path, "trace")
    if magic.startswith(PARQUET_MAGIC):
        return "parquet"
    if magic.startswith(ARROW_FILE_MAGIC):
        return "arrow"
    return "arrow-stream"
