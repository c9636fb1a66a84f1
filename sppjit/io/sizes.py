"""Sizes and addresses given as text: ``--memory 4GiB``, ``--gpa 0x1000``; sizes printed back.

Standard library only (the command modules import it at load time)."""

import re
from fractions import Fraction

from sppjit.errors import InputError
from sppjit.io.space import GPA_LIMIT, PAGE_SIZE

# K, M, G, T are binary multiples with or without the "i" (as `free`, `qemu -m` and KVM users
# read them); "B" is optional. Fractions are allowed when the result is a whole page count.
_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(?:([kmgt])(i?))?(b?)", re.IGNORECASE)
_SHIFT = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}


def parse_size(text: str | int, name: str = "--memory") -> int:
    """Return the size in bytes of ``text`` ("4GiB", "512MiB", "4G", "4096", "1TiB", "2M").

    The size must be a positive multiple of the 4 KiB page and fit the 48-bit guest-physical
    space; anything else raises InputError, whose message starts with ``name``.
    """
    if isinstance(text, bool):  # bool is an int subclass, but never a size
        raise InputError(f"{name}: cannot parse size '{text}'")
    if isinstance(text, int):
        size = text
    else:
        match = _SIZE.fullmatch(str(text).strip())
        if match is None:
            raise InputError(f"{name}: cannot parse size '{text}'")
        number, unit, _, _ = match.groups()
        exact = Fraction(number) * (1 << _SHIFT[(unit or "").lower()])
        if exact.denominator != 1:
            raise InputError(f"{name}: size '{text}' is not a whole number of bytes")
        size = int(exact)
    if size <= 0:
        raise InputError(f"{name}: size must be positive, got '{text}'")
    if size % PAGE_SIZE:
        raise InputError(f"{name}: size '{text}' ({size} bytes) is not a multiple of 4096 "
                         "(one page)")
    if size > GPA_LIMIT:
        raise InputError(f"{name}: size '{text}' exceeds the 48-bit guest-physical space "
                         "(256 TiB)")
    return size


def format_size(nbytes: int) -> str:
    """Bytes in the largest binary unit that divides them exactly: 4294967296 -> "4GiB"."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if nbytes >= 1 << shift and nbytes % (1 << shift) == 0:
            return f"{nbytes >> shift}{unit}"
    return str(nbytes)


def parse_address(text: str, name: str, *, limit_bits: int = GPA_LIMIT.bit_length() - 1) -> int:
    """An address given as text: hex with 0x, or decimal; underscores allowed. Errors start
    with ``name`` (the parameter or option the address came from)."""
    raw = str(text).strip().lower().replace("_", "")
    try:
        value = int(raw[2:], 16) if raw.startswith("0x") else int(raw, 10)
    except ValueError:
        raise InputError(f"{name}: cannot parse address '{text}' (use hex 0x... or "
                         "decimal)") from None
    if value < 0 or value >= 1 << limit_bits:
        raise InputError(f"{name}: address '{text}' is beyond the {limit_bits}-bit "
                         "guest-physical space")
    return value
