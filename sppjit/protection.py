"""Protection placed on a VM before a replay: one way for every job (replay, compare, sweeps).

A protection is a file or its contents in either form (sppjit.io.protect): access maps
(``AccessMaps``: gfn, access, the KVM form) or byte ranges (``ByteRanges``: the hooks an
introspection tool places, turned into access maps as hvmi does, and kept to tell relevant
from irrelevant protection exits).
"""

from __future__ import annotations

import os

import numpy as np

from .io.protect import AccessMaps, ByteRanges, check_in_memslots, ranges_to_maps
from .io.space import PAGE_SHIFT


def load_protection(protection) -> tuple[AccessMaps | ByteRanges, str | None]:
    """(the protection, the file it was read from or None) for a path or either form."""
    path = None
    if isinstance(protection, (str, os.PathLike)):
        from .io.protect import read_protection

        path = os.fspath(protection)
        protection = read_protection(path)
    if not isinstance(protection, (AccessMaps, ByteRanges)):
        raise TypeError(f"protection must be a path, AccessMaps or ByteRanges, not "
                        f"{type(protection).__name__}")
    return protection, path


def protection_maps(protection: AccessMaps | ByteRanges) -> AccessMaps:
    """The (gfn, access) maps a protection applies: access maps as they are, byte ranges
    through hvmi's reference counting (sppjit.io.protect.ranges_to_maps)."""
    return protection if isinstance(protection, AccessMaps) else ranges_to_maps(protection)


def protection_info(protection: AccessMaps | ByteRanges, path: str | None,
                    maps: AccessMaps | None = None) -> dict:
    """The ``protection`` block of a summary: path, form, pages protected (and ranges)."""
    maps = protection_maps(protection) if maps is None else maps
    if isinstance(protection, AccessMaps):
        return {"path": path, "form": "access_maps", "pages": int(len(maps.gfn))}
    return {"path": path, "form": "byte_ranges", "pages": int(len(maps.gfn)),
            "ranges": int(len(protection.gpa))}


def protected_gfns(protection: AccessMaps | ByteRanges) -> np.ndarray:
    """The gfn of each row of the protection as given (byte ranges: the page of each range),
    so that an error names the row of the user's file."""
    if isinstance(protection, AccessMaps):
        return np.asarray(protection.gfn, dtype=np.uint64)
    return np.asarray(protection.gpa, dtype=np.uint64) >> np.uint64(PAGE_SHIFT)


def check_protection(vm, protection: AccessMaps | ByteRanges) -> None:
    """InputError naming the first row of ``protection`` whose page is in none of ``vm``'s
    memslots."""
    check_in_memslots(protected_gfns(protection), vm.config.memslots)


def apply_protection(vm, protection, maps: AccessMaps | None = None) -> AccessMaps:
    """Check that every protected page is in one of ``vm``'s memslots (InputError naming the
    first row that is not), then protect them: init_spp and set_subpages over runs of
    consecutive gfns (VM.protect). ``protection`` is a path or either form; ``maps``, when
    the caller already has them, saves recomputing them. Returns the maps applied."""
    protection, _ = load_protection(protection)
    check_protection(vm, protection)
    maps = protection_maps(protection) if maps is None else maps
    vm.protect(maps.gfn, maps.access)
    return maps


def hook_index(protection):
    """The hook index of byte-range protection (relevant / irrelevant exits), else None."""
    if not isinstance(protection, ByteRanges):
        return None
    from .hooks import HookIndex

    return HookIndex.from_ranges(protection)
