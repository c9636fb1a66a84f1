"""Virtual pages to a compact guest-physical space, in first-touch order, and back.

The tools that record address traces (valgrind lackey, Pin, DynamoRIO) see a process's
*virtual* addresses: 64-bit, sparse (code near 0x400000, the heap, libraries near
0x7f..., the stack near 0x7ffd...), far beyond any guest-physical memory. A converted trace
places them in a compact guest-physical space, page by page:

- the input's virtual address space is cut into pages of ``page_size`` bytes (4096 by
  default; any power of two from 4096 up, so 2 MiB pages can be kept whole);
- the first virtual page the trace touches becomes frame 0, the next new one frame 1, and so
  on, in the order of the trace (first-touch order, as a guest kernel's page allocator would
  hand out frames to a fresh process); frame ``f`` starts at gfn ``f * page_size / 4096``;
- the offset inside the page is kept: ``gpa = frame * page_size + (vaddr % page_size)``;
- an access that crosses a virtual page boundary is split into two accesses, one per page
  (same ``seq``), because the next virtual page may have been given a frame that is not the
  next one.

The mapping is saved beside the trace (columns ``vpage``: the virtual page number, that is
``vaddr // page_size``, and ``gfn``: the first 4 KiB guest frame of that page; the page size
is in the schema metadata ``sppjit.page_size``), so that protection given by virtual address
can be moved into the trace's guest-physical space with ``translate_protection``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from sppjit.errors import InputError
from sppjit.io.columns import UINT64_MAX, table_columns
from sppjit.io.formats import read_table
from sppjit.io.protect import ACCESS_MAX, AccessMaps, ByteRanges
from sppjit.io.space import GPA_LIMIT, PAGE_SHIFT, PAGE_SIZE

DEFAULT_PAGE_SIZE = PAGE_SIZE
MAX_PAGE_SIZE = 1 << 30  # a 1 GiB page: the largest x86 page
PAGE_SIZE_KEY = b"sppjit.page_size"
MAPPING_SCHEMA = pa.schema([("vpage", pa.uint64()), ("gfn", pa.uint64())])


def check_page_size(page_size: int, option: str = "--page-size") -> int:
    """``page_size`` if it is a power of two from 4096 to 1 GiB; InputError otherwise."""
    if isinstance(page_size, bool) or not isinstance(page_size, (int, np.integer)):
        raise InputError(f"{option}: page size must be an integer, not {page_size!r}")
    page_size = int(page_size)
    if page_size < PAGE_SIZE or page_size > MAX_PAGE_SIZE or page_size & (page_size - 1):
        raise InputError(f"{option}: page size must be a power of two from 4096 to 1 GiB, "
                         f"not {page_size}")
    return page_size


class PageMapper:
    """First-touch mapping of virtual pages to guest frames, applied batch by batch.

    Holds one entry per virtual page touched so far (never the accesses), so memory grows with
    the trace's footprint, not its length.
    """

    def __init__(self, page_size: int = DEFAULT_PAGE_SIZE):
        self.page_size = check_page_size(page_size)
        self._shift = np.uint64(self.page_size.bit_length() - 1)
        self._mask = np.uint64(self.page_size - 1)
        self._frames: dict[int, int] = {}  # vpage -> frame, in first-touch order
        self.max_frames = GPA_LIMIT // self.page_size

    def __len__(self) -> int:
        return len(self._frames)

    @property
    def gfns_per_page(self) -> int:
        return self.page_size >> PAGE_SHIFT

    @property
    def memory_bytes(self) -> int:
        """Guest-physical bytes the mapped pages span (frames 0 .. len-1)."""
        return len(self._frames) * self.page_size

    def split(self, addr: np.ndarray, size: np.ndarray, *others: np.ndarray
              ) -> tuple[np.ndarray, ...]:
        """Split accesses that cross a virtual page boundary into one access per page.

        ``addr`` uint64, ``size`` (1..4096, at most one page, so at most one crossing);
        ``others`` are per-access columns repeated for both pieces. Returns
        ``(addr, size, *others)`` with the pieces in order.
        """
        addr = np.asarray(addr, dtype=np.uint64)
        size64 = np.asarray(size, dtype=np.uint64)
        offset = addr & self._mask
        cross = offset + size64 > np.uint64(self.page_size)
        if not cross.any():
            return (addr, np.asarray(size, dtype=np.uint16), *others)
        reps = cross.astype(np.intp) + 1
        where = np.flatnonzero(cross)
        first = (np.cumsum(reps) - reps)[where]  # index of the first piece in the output
        head = np.uint64(self.page_size) - offset[where]  # bytes left in the first page
        new_addr = np.repeat(addr, reps)
        new_size = np.repeat(size64, reps)
        new_size[first] = head
        new_addr[first + 1] = addr[where] + head
        new_size[first + 1] = size64[where] - head
        return (new_addr, new_size.astype(np.uint16),
                *(np.repeat(column, reps) for column in others))

    def translate(self, addr: np.ndarray) -> np.ndarray:
        """Guest-physical addresses of virtual ``addr`` (no access may cross a page: split
        first), giving frames to new pages in the order they appear."""
        addr = np.asarray(addr, dtype=np.uint64)
        if not len(addr):
            return addr.copy()
        vpage = addr >> self._shift
        pages, first, inverse = np.unique(vpage, return_index=True, return_inverse=True)
        frames = self._frames
        found = np.fromiter((frames.get(page, -1) for page in pages.tolist()),
                            dtype=np.int64, count=len(pages))
        new = np.flatnonzero(found < 0)
        if len(new):
            order = new[np.argsort(first[new], kind="stable")]  # first-touch order
            start = len(frames)
            if start + len(order) > self.max_frames:
                raise InputError(f"convert: the trace touches more than {self.max_frames:,} "
                                 f"pages of {self.page_size} bytes, beyond the 48-bit "
                                 "guest-physical space")
            for frame, page in enumerate(pages[order].tolist(), start):
                frames[page] = frame
            found[order] = np.arange(start, start + len(order), dtype=np.int64)
        frame_of = found.astype(np.uint64)[inverse.reshape(-1)]
        return (frame_of << self._shift) | (addr & self._mask)

    def table(self) -> pa.Table:
        """The mapping so far, one row per virtual page, by gfn (first-touch order)."""
        vpage = np.fromiter(self._frames.keys(), dtype=np.uint64, count=len(self._frames))
        gfn = np.arange(len(self._frames), dtype=np.uint64) * np.uint64(self.gfns_per_page)
        schema = MAPPING_SCHEMA.with_metadata({PAGE_SIZE_KEY: str(self.page_size).encode()})
        return pa.table([pa.array(vpage), pa.array(gfn)], schema=schema)


# ------------------------------------------------------------------------ reading it back

class Mapping:
    """A saved mapping: sorted virtual pages and their first gfn, with the page size."""

    def __init__(self, vpage: np.ndarray, gfn: np.ndarray, page_size: int, path: str):
        order = np.argsort(vpage, kind="stable")
        self.vpage = vpage[order]
        self.gfn = gfn[order]
        self.page_size = page_size
        self.path = path
        if len(self.vpage) > 1 and (np.diff(self.vpage) == 0).any():
            at = int(np.argmax(np.diff(self.vpage) == 0))
            raise InputError(f"mapping: {path} maps virtual page {int(self.vpage[at]):#x} "
                             "twice")

    def gpa(self, vaddr: np.ndarray, what: str, label) -> np.ndarray:
        """Guest-physical addresses of virtual ``vaddr``; InputError naming the first address
        on a page the trace never touched (``label(i)`` says which input row it came from)."""
        vaddr = np.asarray(vaddr, dtype=np.uint64)
        shift = np.uint64(self.page_size.bit_length() - 1)
        page = vaddr >> shift
        at = np.searchsorted(self.vpage, page)
        at_clipped = np.minimum(at, max(len(self.vpage) - 1, 0))
        hit = (at < len(self.vpage)) & (self.vpage[at_clipped] == page if len(self.vpage)
                                          else np.zeros(len(page), bool))
        if not hit.all():
            i = int(np.argmin(hit))
            raise InputError(f"{what}: {label(i)} is on virtual page {int(page[i]):#x} "
                             f"(page size {self.page_size}), which the trace never touched "
                             f"(not in {self.path})")
        offset = vaddr & np.uint64(self.page_size - 1)
        return (self.gfn[at_clipped] << np.uint64(PAGE_SHIFT)) + offset


def read_mapping(path: str | os.PathLike) -> Mapping:
    """Read a mapping written by ``sppjit convert`` (Parquet or Arrow; CSV/JSON also work)."""
    path = os.fspath(path)
    table = read_table(path, "mapping")
    missing = [name for name in ("vpage", "gfn") if name not in table.column_names]
    if missing:
        raise InputError(f"mapping: {path} has no column {', '.join(missing)} (expected "
                         "vpage and gfn, as sppjit convert writes them)")
    vpage, gfn = table_columns(table, [
        ("vpage", np.uint64, 0, UINT64_MAX, ""),
        ("gfn", np.uint64, 0, (GPA_LIMIT >> PAGE_SHIFT) - 1,
         "(beyond the 48-bit guest-physical space)"),
    ], "mapping")
    raw = (table.schema.metadata or {}).get(PAGE_SIZE_KEY, str(DEFAULT_PAGE_SIZE).encode())
    try:
        page_size = int(raw)
    except ValueError:
        raise InputError(f"mapping: {path} has page size {raw!r} in its metadata") from None
    page_size = check_page_size(page_size, option="mapping")
    return Mapping(np.ascontiguousarray(vpage), np.ascontiguousarray(gfn), page_size, path)


# ------------------------------------------------------------------- protection by address

_ADDRESS_COLUMNS = ("gpa", "addr", "gfn")


def _read_protection_table(path: str) -> pa.Table:
    """read_table, except that CSV address columns are read as text: pyarrow's CSV reader
    would take "0xffff888000000000" as an int64 and wrap it negative."""
    import pyarrow.csv as pacsv

    from sppjit.io.formats import (
        ARROW_FILE_MAGIC,
        ARROW_STREAM_MARKER,
        PARQUET_MAGIC,
        cannot_read,
        read_magic,
    )

    magic = read_magic(path, "protection")
    if magic.startswith((PARQUET_MAGIC, ARROW_FILE_MAGIC, ARROW_STREAM_MARKER)):
        return read_table(path, "protection")
    with open(path, "rb") as handle:
        start = handle.read(4096).decode("utf-8", "replace").lstrip("\ufeff \t\r\n")
    if start[:1] in ("[", "{") or not path.lower().endswith((".csv", ".txt")):
        return read_table(path, "protection")  # JSON keeps big integers as text itself
    try:
        options = pacsv.ConvertOptions(column_types={name: pa.string()
                                                     for name in _ADDRESS_COLUMNS})
        return pacsv.read_csv(path, convert_options=options)
    except (pa.ArrowException, OSError) as exc:
        raise cannot_read("protection", path, exc) from None


def _read_virtual_protection(path: str) -> AccessMaps | ByteRanges:
    """A protection file whose addresses are virtual: like sppjit.io.protect.read_protection,
    but addresses may use all 64 bits (kernel addresses such as 0xffff888000000000)."""
    table = _read_protection_table(path)
    names = set(table.column_names)
    is_maps = {"gfn", "access"} <= names
    is_ranges = {"gpa", "length"} <= names or {"addr", "length"} <= names
    if is_maps == is_ranges:
        found = ", ".join(table.column_names) or "none"
        raise InputError(f"protection: {path} has columns {found}; expected gfn and access "
                         "(access maps by virtual page number) or gpa (or addr) and length, "
                         "optionally name (byte ranges by virtual address)")
    if is_maps:
        gfn, access = table_columns(table, [
            ("gfn", np.uint64, 0, UINT64_MAX >> PAGE_SHIFT, "(beyond the 64-bit space)"),
            ("access", np.uint32, 0, ACCESS_MAX, "(must fit 32 bits, at most 0xFFFFFFFF)"),
        ], "protection")
        return AccessMaps(gfn=gfn, access=access)
    column = "gpa" if "gpa" in names else "addr"
    gpa, length = table_columns(table, [
        (column, np.uint64, 0, UINT64_MAX, ""),
        ("length", np.uint32, 1, PAGE_SIZE, f"(must be 1..{PAGE_SIZE})"),
    ], "protection")
    names_list = (table.column("name").cast(pa.string()).to_pylist()
                  if "name" in table.column_names else [None] * table.num_rows)
    return ByteRanges(gpa=gpa, length=length, name=names_list)


def _as_protection(value) -> AccessMaps | ByteRanges:
    if isinstance(value, (AccessMaps, ByteRanges)):
        return value
    if isinstance(value, (str, os.PathLike)):
        return _read_virtual_protection(os.fspath(value))
    if isinstance(value, Sequence):
        rows = list(value)
        if not all(isinstance(row, (tuple, list)) and len(row) in (2, 3) for row in rows):
            raise TypeError("give protection ranges as (address, length) or "
                            "(address, length, name) tuples")
        return ByteRanges(gpa=np.array([int(r[0]) for r in rows], dtype=np.uint64),
                          length=np.array([int(r[1]) for r in rows], dtype=np.uint32),
                          name=[r[2] if len(r) == 3 else None for r in rows])
    raise TypeError(f"cannot read protection from {type(value).__name__}: give ByteRanges, "
                    "AccessMaps, a file path, or a list of (address, length[, name])")


def translate_protection(mapping_path: str | os.PathLike | Mapping,
                         ranges_or_maps) -> AccessMaps | ByteRanges:
    """Move protection given by *virtual* address into a converted trace's guest-physical
    space, through the mapping ``sppjit convert`` saved beside the trace.

    ``ranges_or_maps`` is one of:

    - ByteRanges (or a list of ``(address, length[, name])`` tuples): ``gpa`` holds virtual
      byte addresses; each range keeps its offset in its page and its length and name. A
      range may not cross a 4 KiB page (as in any protection file).
    - AccessMaps: ``gfn`` holds virtual 4 KiB page numbers (``vaddr >> 12``); each becomes
      the guest frame that virtual page landed on.
    - a path to a protection file in either form (Parquet, Arrow, CSV or JSON), whose
      addresses may use all 64 bits (kernel addresses included); ``addr`` is accepted as
      the column name instead of ``gpa``.

    Returns the same form, guest-physical, ready for ``VM.protect``/``VM.set_subpages`` or to
    be written as a ``--protect`` file. InputError if any range or page lies on a virtual
    page the trace never touched (it has no guest-physical place).
    """
    mapping = mapping_path if isinstance(mapping_path, Mapping) else read_mapping(mapping_path)
    given = _as_protection(ranges_or_maps)
    if isinstance(given, ByteRanges):
        vaddr = np.asarray(given.gpa, dtype=np.uint64)
        length = np.asarray(given.length, dtype=np.uint32)
        if len(length) and (length.min() < 1 or length.max() > PAGE_SIZE):
            i = int(np.argmax((length < 1) | (length > PAGE_SIZE)))
            raise InputError(f"protection: range at row {i} has length {int(length[i])} "
                             f"(must be 1..{PAGE_SIZE})")
        crossing = (vaddr & np.uint64(PAGE_SIZE - 1)) + length.astype(np.uint64) > PAGE_SIZE
        if crossing.any():
            i = int(np.argmax(crossing))
            raise InputError(f"protection: range at row {i} (address {int(vaddr[i]):#x}, "
                             f"length {int(length[i])}) crosses a 4 KiB page boundary")
        gpa = mapping.gpa(vaddr, "protection",
                          lambda i: f"range at row {i} (address {int(vaddr[i]):#x})")
        return ByteRanges(gpa=gpa, length=length.copy(), name=list(given.name))
    vpn = np.asarray(given.gfn, dtype=np.uint64)
    if len(vpn) and int(vpn.max()) > UINT64_MAX >> PAGE_SHIFT:
        i = int(np.argmax(vpn > np.uint64(UINT64_MAX >> PAGE_SHIFT)))
        raise InputError(f"protection: virtual page number {int(vpn[i]):#x} at row {i} is "
                         "beyond the 64-bit space")
    gpa = mapping.gpa(vpn << np.uint64(PAGE_SHIFT), "protection",
                      lambda i: f"page at row {i} (virtual page number {int(vpn[i]):#x})")
    return AccessMaps(gfn=gpa >> np.uint64(PAGE_SHIFT),
                      access=np.asarray(given.access, dtype=np.uint32).copy())
