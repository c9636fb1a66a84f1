"""Read protection files: access maps (the KVM form) or byte ranges (the hook form).

Access maps go to the VM as init_spp + set_subpages calls, one per run of consecutive gfns
(``runs``). Byte ranges are what introspection tools place; ``ranges_to_maps`` turns them into
access maps the way bitdefender/hvmi does (hook_gpa.c), and the ranges themselves are kept to
tell relevant protection exits from irrelevant ones.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from sppjit.errors import InputError
from sppjit.io.atomic import atomic_path
from sppjit.io.columns import table_columns
from sppjit.io.formats import read_table
from sppjit.io.output import TableWriter, check_output_path
from sppjit.io.space import GFN_LIMIT, GPA_LIMIT, PAGE_SHIFT, PAGE_SIZE, SUBPAGE_SHIFT

ACCESS_MAX = 0xFFFFFFFF
_MAP_COLUMNS = ("gfn", "access")
_RANGE_COLUMNS = ("gpa", "length")
# The formats write_protection writes, by extension; read_protection reads each of them.
PROTECTION_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".arrow": "arrow",
                      ".feather": "arrow", ".ipc": "arrow", ".csv": "csv", ".json": "json",
                      ".jsonl": "jsonl", ".ndjson": "jsonl"}


@dataclass
class AccessMaps:
    """Write-access maps per page: bit i of ``access`` set = sub-page i writable."""

    gfn: np.ndarray  # uint64
    access: np.ndarray  # uint32


@dataclass
class ByteRanges:
    """Write-protected byte ranges, none crossing a 4 KiB page; ``name`` labels the hook."""

    gpa: np.ndarray  # uint64
    length: np.ndarray  # uint32, 1..4096
    name: list[str | None]


def read_protection(path: str | os.PathLike) -> AccessMaps | ByteRanges:
    """Read a protection file (Parquet, Arrow, CSV or JSON), in the form its columns say.

    {gfn, access} gives AccessMaps, {gpa, length} (and optionally name) gives ByteRanges.
    In CSV and JSON, integers may be written in decimal or as "0x" hex text. Rows in error
    messages count from 0, the header not included.
    """
    table = read_table(path, "protection")
    names = set(table.column_names)
    is_maps = set(_MAP_COLUMNS) <= names
    is_ranges = set(_RANGE_COLUMNS) <= names
    if is_maps == is_ranges:
        found = ", ".join(table.column_names) or "none"
        both = "both forms' columns" if is_maps else f"columns {found}"
        raise InputError(f"protection: {os.fspath(path)} has {both}; expected gfn and access "
                         "(access maps) or gpa and length, optionally name (byte ranges)")
    return _access_maps(table) if is_maps else _byte_ranges(table)


def protection_format(path: str | os.PathLike, name: str = "path") -> str:
    """The format write_protection writes to ``path``, from its extension; InputError (its
    message starting with ``name``) for an extension that names none."""
    found = PROTECTION_FORMATS.get(Path(path).suffix.lower())
    if found is None:
        raise InputError(f"{name}: unknown format for {os.fspath(path)} (use .parquet, "
                         ".arrow, .csv, .json or .jsonl)")
    return found


def protection_table(protection: AccessMaps | ByteRanges) -> pa.Table:
    """Protection as the table read_protection reads back: gfn and access, or gpa, length
    and name."""
    if isinstance(protection, ByteRanges):
        schema = pa.schema([("gpa", pa.uint64()), ("length", pa.uint32()), ("name", pa.string())])
        return pa.table([pa.array(np.asarray(protection.gpa, dtype=np.uint64)),
                         pa.array(np.asarray(protection.length, dtype=np.uint32)),
                         pa.array(list(protection.name), type=pa.string())], schema=schema)
    if isinstance(protection, AccessMaps):
        schema = pa.schema([("gfn", pa.uint64()), ("access", pa.uint32())])
        return pa.table([pa.array(np.asarray(protection.gfn, dtype=np.uint64)),
                         pa.array(np.asarray(protection.access, dtype=np.uint32))],
                        schema=schema)
    raise InputError(f"protection must be AccessMaps or ByteRanges, not "
                     f"{type(protection).__name__}")


def check_protection_output(protection: AccessMaps | ByteRanges, path: str | os.PathLike,
                            name: str = "path", format: str | None = None) -> str:
    """Every check write_protection makes before writing; returns the format."""
    check_output_path(path, option=name)
    if format is not None and format not in set(PROTECTION_FORMATS.values()):
        raise InputError(f"format must be one of parquet, arrow, csv, json, jsonl, not "
                         f"{format!r}")
    fmt = format or protection_format(path, name)
    rows = len(protection.gpa if isinstance(protection, ByteRanges) else protection.gfn)
    if rows == 0 and fmt in ("json", "jsonl"):
        raise InputError(f"{name}: the protection has no rows, and JSON without rows cannot "
                         "say which columns it has; use .parquet, .arrow or .csv")
    return fmt


def write_protection(protection: AccessMaps | ByteRanges, path: str | os.PathLike, *,
                     format: str | None = None, name: str = "path") -> str:
    """Write protection to ``path`` in ``format`` (parquet, arrow, csv, json, jsonl; by
    default the one its extension names), all or nothing; read_protection reads it back
    equal. Returns the format. Errors start with ``name`` (what the caller calls ``path``)."""
    fmt = check_protection_output(protection, path, name, format)
    table = protection_table(protection)
    if fmt in ("parquet", "arrow"):
        with TableWriter(path, table.schema, option=name) as writer:
            writer.write_batch(table)
        return fmt
    with atomic_path(path) as temporary:
        if fmt == "csv":
            import pyarrow.csv as pacsv

            pacsv.write_csv(table, temporary)
            return fmt
        rows = (json.dumps(row) for row in table.to_pylist())
        with open(temporary, "w", encoding="utf-8") as handle:
            if fmt == "jsonl":
                for row in rows:
                    handle.write(row + "\n")
            else:
                handle.write("[\n" + ",\n".join(rows) + "\n]\n")
    return fmt


def _access_maps(table: pa.Table) -> AccessMaps:
    gfn, access = table_columns(table, [
        ("gfn", np.uint64, 0, GFN_LIMIT - 1, "(beyond the 48-bit guest-physical space)"),
        ("access", np.uint32, 0, ACCESS_MAX, "(must fit 32 bits, at most 0xFFFFFFFF)"),
    ], "protection")
    return AccessMaps(gfn=gfn, access=access)


def _byte_ranges(table: pa.Table) -> ByteRanges:
    gpa, length = table_columns(table, [
        ("gpa", np.uint64, 0, GPA_LIMIT - 1, "(beyond the 48-bit guest-physical space)"),
        ("length", np.uint32, 1, PAGE_SIZE, f"(must be 1..{PAGE_SIZE})"),
    ], "protection")
    crossing = (gpa & (PAGE_SIZE - 1)) + length > PAGE_SIZE
    if crossing.any():
        row = int(np.argmax(crossing))
        raise InputError(f"protection: range at row {row} (gpa {int(gpa[row]):#x}, length "
                         f"{int(length[row])}) crosses a 4 KiB page boundary")
    return ByteRanges(gpa=gpa, length=length, name=_names(table))


def _names(table: pa.Table) -> list[str | None]:
    """The optional hook names as text (CSV infers all-digit names as integers); an empty
    name is no name (CSV cannot write a missing one otherwise)."""
    if "name" not in table.column_names:
        return [None] * table.num_rows
    column = table.column("name")
    try:
        return [name or None for name in column.cast(pa.string()).to_pylist()]
    except (pa.ArrowException, TypeError):
        raise InputError(f"protection: column 'name' has type {column.type}, "
                         "expected text") from None


def runs(gfns, values, max_pages: int) -> list[tuple[int, np.ndarray]]:
    """Split (gfn, value) pairs into (base_gfn, values) runs of consecutive gfns.

    Each run holds at most ``max_pages`` pages, the most one set_subpages call takes. Pairs are
    sorted by gfn first (stably); a gfn given twice is an InputError.
    """
    if max_pages < 1:
        raise ValueError(f"max_pages must be positive, got {max_pages}")
    gfns = np.asarray(gfns, dtype=np.uint64)
    values = np.asarray(values, dtype=np.uint32)
    if gfns.shape != values.shape or gfns.ndim != 1:
        raise ValueError("gfns and values must be 1-D arrays of the same length")
    order = np.argsort(gfns, kind="stable")
    gfns, values = gfns[order], values[order]
    steps = np.diff(gfns)
    if (steps == 0).any():
        at = int(np.argmax(steps == 0))
        first, second = sorted((int(order[at]), int(order[at + 1])))
        raise InputError(f"protection: gfn {int(gfns[at]):#x} is given twice "
                         f"(rows {first} and {second})")
    # A run starts at row 0 and after every gap; long runs are then cut every max_pages.
    starts = np.flatnonzero(steps != 1) + 1
    bounds = np.concatenate(([0], starts, [len(gfns)])) if len(gfns) else np.zeros(1, np.int64)
    result = []
    for begin, end in zip(bounds[:-1], bounds[1:]):
        for start in range(int(begin), int(end), max_pages):
            stop = min(start + max_pages, int(end))
            result.append((int(gfns[start]), values[start:stop]))
    return result


def ranges_to_maps(ranges: ByteRanges) -> AccessMaps:
    """The access maps that protect ``ranges``, with hvmi's per-sub-page reference counts.

    hvmi (hook_gpa.c) protects sub-pages ``off // 128`` up to ``ceil((off + len) / 128)``
    (exclusive) of each range, counting per sub-page how many ranges cover it, and write-
    protects a sub-page while its count is non-zero. With every range placed and none removed
    the protected set is therefore the union of the ranges' sub-pages, which is what this
    returns: one map per page that has a range (bit i = 1: sub-page i writable), by gfn.
    """
    gpa = np.asarray(ranges.gpa, dtype=np.uint64)
    length = np.asarray(ranges.length, dtype=np.uint64)
    if not len(gpa):
        return AccessMaps(gfn=np.zeros(0, np.uint64), access=np.zeros(0, np.uint32))
    offset = gpa & np.uint64(PAGE_SIZE - 1)
    low = offset >> np.uint64(SUBPAGE_SHIFT)
    high = (offset + length + np.uint64((1 << SUBPAGE_SHIFT) - 1)) >> np.uint64(SUBPAGE_SHIFT)
    one = np.uint64(1)
    protected = ((one << high) - one) ^ ((one << low) - one)  # bits low..high-1; high <= 32
    pages = gpa >> np.uint64(PAGE_SHIFT)
    order = np.argsort(pages, kind="stable")
    pages, protected = pages[order], protected[order]
    starts = np.flatnonzero(np.concatenate(([True], pages[1:] != pages[:-1])))
    union = np.bitwise_or.reduceat(protected, starts)
    access = (~union & np.uint64(ACCESS_MAX)).astype(np.uint32)
    return AccessMaps(gfn=pages[starts], access=access)


def check_in_memslots(gfns, memslots) -> None:
    """InputError naming the first protection row whose page is in no memslot."""
    gfns = np.asarray(gfns, dtype=np.uint64)
    inside = np.zeros(gfns.shape[0], dtype=bool)
    for base, npages in memslots:
        inside |= (gfns >= np.uint64(base)) & (gfns < np.uint64(base + npages))
    if inside.all():
        return
    row = int(np.argmax(~inside))
    spans = ", ".join(f"{base:#x}..{base + npages - 1:#x}" for base, npages in memslots[:4])
    more = f" and {len(memslots) - 4} more" if len(memslots) > 4 else ""
    raise InputError(f"protection: gfn {int(gfns[row]):#x} at row {row} is outside every "
                     f"memslot (gfns {spans}{more})")
