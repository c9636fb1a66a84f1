"""Read a memory layout file: the guest's memslots, with MMIO in the gaps between them."""

import os

import numpy as np

from sppjit.errors import InputError
from sppjit.io.columns import table_columns
from sppjit.io.formats import read_table
from sppjit.io.space import GFN_LIMIT

_BEYOND = "(beyond the 48-bit guest-physical space)"
# (name, dtype, lo, hi, what the error adds); KVM slot ids are 32-bit.
_COLUMNS = [
    ("slot", np.uint64, 0, 0xFFFFFFFF, "(must fit 32 bits)"),
    ("base_gfn", np.uint64, 0, GFN_LIMIT - 1, _BEYOND),
    ("npages", np.uint64, 0, GFN_LIMIT, _BEYOND),
]
_NAMES = [spec[0] for spec in _COLUMNS]


def read_memslots(path: str | os.PathLike) -> list[tuple[int, int]]:
    """Read ``slot, base_gfn, npages`` rows (CSV, JSON or Parquet) as [(base_gfn, npages)].

    The list is in slot order, which is how the VM numbers its slots (so slot ids 0, 4, 9
    become slots 0, 1, 2). Slots must be distinct, non-empty, non-overlapping and inside the
    48-bit guest-physical space. In CSV and JSON, integers may be "0x" hex text.
    """
    table = read_table(path, "memslots")
    missing = [name for name in _NAMES if name not in table.column_names]
    if missing:
        raise InputError(f"memslots: {os.fspath(path)} lacks column(s) {', '.join(missing)}; "
                         f"expected {', '.join(_NAMES)}")
    if not table.num_rows:
        raise InputError(f"memslots: {os.fspath(path)} defines no slots")
    slot, base_gfn, npages = table_columns(table, _COLUMNS, "memslots")
    slots = [(int(s), int(b), int(n)) for s, b, n in zip(slot, base_gfn, npages)]
    return _check_layout(sorted(slots))


def _check_layout(slots: list[tuple[int, int, int]]) -> list[tuple[int, int]]:
    """Refuse duplicate, empty, overflowing or overlapping slots; return (base_gfn, npages)."""
    for (slot, base, npages), following in zip(slots, slots[1:] + [None]):
        if following is not None and following[0] == slot:
            raise InputError(f"memslots: slot {slot} is given twice")
        if npages == 0:
            raise InputError(f"memslots: slot {slot} has npages 0")
        if base + npages > GFN_LIMIT:
            raise InputError(f"memslots: slot {slot} (base_gfn {base:#x}, {npages} pages) ends "
                             "beyond the 48-bit guest-physical space")
    by_base = sorted(slots, key=lambda slot: slot[1])
    for low, high in zip(by_base, by_base[1:]):
        if low[1] + low[2] > high[1]:
            first, second = sorted((low, high))
            raise InputError(f"memslots: slots {first[0]} and {second[0]} overlap (gfns "
                             f"{_span(first)} and {_span(second)})")
    return [(base, npages) for _, base, npages in slots]


def _span(slot: tuple[int, int, int]) -> str:
    """A slot's gfns as first..last in hex."""
    _, base, npages = slot
    return f"{base:#x}..{base + npages - 1:#x}"
