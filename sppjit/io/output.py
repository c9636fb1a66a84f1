"""Write result files atomically: complete under the requested name, or not there at all.

Each output is written to a hidden temporary name in its destination directory (so the final
rename stays on one file system and is atomic) and published only once complete
(sppjit.io.atomic, which also restores older files when a run fails). A failed or
interrupted run removes the temporary file, leaving nothing behind.
"""

import contextlib
import json
import os
from pathlib import Path
from types import TracebackType

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from sppjit.errors import InputError
from sppjit.io.atomic import probe_directory, publish, remove_quietly, temporary_name
from sppjit.io.trace import schema_metadata

_FORMATS = {".parquet": "parquet", ".pq": "parquet",
            ".arrow": "arrow", ".feather": "arrow", ".ipc": "arrow"}


def table_format(path: str | os.PathLike, option: str = "--out") -> str:
    """"parquet" or "arrow" from the extension of ``path``; InputError for anything else."""
    found = _FORMATS.get(Path(path).suffix.lower())
    if found is None:
        raise InputError(f"{option}: unknown output format for {os.fspath(path)} "
                         "(use .parquet or .arrow)")
    return found


def check_output_path(path: str | os.PathLike, *, option: str = "--out",
                      table: bool = False) -> None:
    """Fail before any work if ``path`` cannot be written: no such directory, not writable
    (a new file is tried there: permissions, a read-only mount), a name too long, a
    directory itself, or (``table``) an extension that names no table format."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise InputError(f"{option}: directory does not exist: {directory}")
    if os.path.isdir(path):
        raise InputError(f"{option}: {path} is a directory")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise InputError(f"{option}: directory is not writable: {directory}")
    if table:
        table_format(path, option)
    probe_directory(path, option)


class TableWriter:
    """Write record batches to a Parquet (.parquet, .pq) or Arrow IPC (.arrow, .feather,
    .ipc) file, batch by batch, appearing under ``path`` only when the ``with`` block ends
    without an exception.

    The schema gains ``sppjit.schema_version`` in its metadata.
    """

    def __init__(self, path: str | os.PathLike, schema: pa.Schema, *, option: str = "--out"):
        self.path = os.fspath(path)
        self.format = table_format(self.path, option)
        self.schema = schema.with_metadata({**(schema.metadata or {}), **schema_metadata()})
        self._temporary: str | None = None
        self._writer = None
        self._sink = None

    def __enter__(self) -> "TableWriter":
        self._temporary = temporary_name(self.path)
        try:
            if self.format == "parquet":
                self._writer = pq.ParquetWriter(self._temporary, self.schema,
                                                use_dictionary=_dictionary_columns(self.schema))
            else:
                self._sink = pa.OSFile(self._temporary, "wb")
                self._writer = ipc.new_file(self._sink, self.schema)
        except BaseException:
            self._close()
            remove_quietly(self._temporary)
            raise
        return self

    def write_batch(self, batch: pa.RecordBatch | pa.Table) -> None:
        """Append rows; their schema must match the writer's (metadata aside)."""
        if self._writer is None:
            raise RuntimeError("TableWriter.write_batch called outside its with block")
        self._writer.write(batch)

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if kind is not None:
            # The exception in flight (KeyboardInterrupt included) is the one to report and
            # propagates after this; a second one from closing a half-written file would hide it.
            with contextlib.suppress(Exception):
                self._close()
            remove_quietly(self._temporary)
            return
        try:
            self._close()
            publish(self._temporary, self.path)
        except BaseException:
            remove_quietly(self._temporary)
            raise

    def _close(self) -> None:
        """Close the writer, then the file under it; safe to call twice."""
        writer, sink = self._writer, self._sink
        self._writer = self._sink = None
        try:
            if writer is not None:
                writer.close()
        finally:
            if sink is not None:
                sink.close()


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as indented JSON (numpy scalars and arrays allowed) under ``path``
    atomically, with a trailing newline."""
    path = os.fspath(path)
    temporary = temporary_name(path)
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(obj, handle, indent=2, sort_keys=False, default=json_default)
            handle.write("\n")
        publish(temporary, path)
    except BaseException:
        remove_quietly(temporary)
        raise


def json_default(value):
    """Summaries are assembled from numpy results: write their scalars as plain numbers."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _dictionary_columns(schema: pa.Schema) -> list[str]:
    """Columns worth dictionary-encoding in Parquet: narrow ones (outcome, kind, vcpu, ...)
    and strings (exit kinds, hook names). Wide integers such as gpa or seq are nearly unique
    per row: trying a dictionary on them costs ~40% of the write time for nothing."""
    narrow = []
    for field in schema:
        t = field.type
        if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_boolean(t):
            narrow.append(field.name)
        elif pa.types.is_integer(t) and t.bit_width <= 16:
            narrow.append(field.name)
    return narrow
