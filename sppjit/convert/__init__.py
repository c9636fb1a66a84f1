"""Converters from the address traces people already have to sppjit traces.

``convert_trace(format, source, out)`` reads a text trace of one of these formats, line by
line in bounded memory, and writes a trace (Parquet or Arrow IPC by the extension of ``out``;
columns gpa uint64, size uint16, vcpu uint16, kind uint8, seq uint64 = the 1-based input
line the access came from) and, beside it, the page mapping (``<out>.mapping.parquet`` by
default):

- ``lackey``: valgrind ``--tool=lackey --trace-mem=yes`` (sppjit.convert.lackey);
- ``pinatrace``: Intel Pin's pinatrace.out (sppjit.convert.pinatrace);
- ``drmemtrace``: DynamoRIO drmemtrace's view tool text (sppjit.convert.drmemtrace);
- ``csv``: plain CSV with an address, size, kind and vcpu or tid columns (sppjit.convert.csv).

Virtual addresses are placed in a compact guest-physical space page by page, in first-touch
order, and accesses crossing a virtual page are split (sppjit.convert.mapping, which also
has ``translate_protection`` to move protection given by virtual address into the trace's
guest-physical space). A malformed line is an InputError naming the input, the line number
and the line, unless ``skip_bad`` counts and skips it. The input may be gzip, bzip2 or xz
compressed, or ``-`` for standard input. Both outputs are written, or neither.
"""

from __future__ import annotations

import os

from sppjit.convert.engine import DEFAULT_CHUNK_LINES, ConvertResult
from sppjit.defaults import CONVERT_FORMATS
from sppjit.errors import InputError

FORMATS = CONVERT_FORMATS  # sppjit.defaults: the command line reads them without numpy

__all__ = ["FORMATS", "ConvertResult", "convert_trace", "default_mapping_path",
           "translate_protection"]


def default_mapping_path(out: str | os.PathLike) -> str:
    """Where the mapping goes when not given: beside the trace, ``<out>.mapping.parquet``."""
    return os.fspath(out) + ".mapping.parquet"


def _parser(fmt: str):
    if fmt == "lackey":
        from sppjit.convert.lackey import LackeyParser
        return LackeyParser
    if fmt == "pinatrace":
        from sppjit.convert.pinatrace import PinatraceParser
        return PinatraceParser
    if fmt == "drmemtrace":
        from sppjit.convert.drmemtrace import DrmemtraceParser
        return DrmemtraceParser
    if fmt == "csv":
        from sppjit.convert.csv import CsvParser
        return CsvParser
    raise InputError(f"convert: unknown format '{fmt}' (one of {', '.join(FORMATS)})")


def convert_trace(fmt: str, source: str | os.PathLike, out: str | os.PathLike, *,
                  mapping_out: str | os.PathLike | None = None, skip_bad: bool = False,
                  page_size: int = 4096, chunk_lines: int = DEFAULT_CHUNK_LINES,
                  progress=None) -> ConvertResult:
    """Convert the text trace ``source`` (a path, or ``-`` for standard input) of format
    ``fmt`` into the trace ``out`` and its page mapping ``mapping_out``.

    Everything is checked before any work (format, page size, output paths, no two paths the
    same); then the input is read ``chunk_lines`` lines at a time. Raises InputError for bad
    input, leaving no output file. ``progress(bytes_read, bytes_total)`` is called as the
    input is read (bytes as stored; the total None for standard input).
    """
    from sppjit.convert import engine
    from sppjit.convert.mapping import check_page_size
    from sppjit.io.atomic import check_distinct
    from sppjit.io.output import check_output_path

    parser = _parser(fmt)
    page_size = check_page_size(page_size)
    source = os.fspath(source)
    out = os.fspath(out)
    mapping_out = default_mapping_path(out) if mapping_out is None else os.fspath(mapping_out)
    check_output_path(out, option="--out", table=True)
    check_output_path(mapping_out, option="--mapping-out", table=True)
    check_distinct([("IN", None if source == "-" else source), ("--out", out),
                    ("--mapping-out", mapping_out)])
    return engine.run(parser, fmt, source, out, mapping_out, skip_bad=skip_bad,
                      page_size=page_size, chunk_lines=chunk_lines, progress=progress)


def __getattr__(name):
    if name == "translate_protection":  # numpy/pyarrow load on first use
        from sppjit.convert.mapping import translate_protection

        return translate_protection
    raise AttributeError(f"module 'sppjit.convert' has no attribute {name!r}")
