"""Parse memory sizes given on the command line (``--memory 4GiB``)."""

import re
from fractions import Fraction

from sppjit.errors import InputError
from sppjit.io.space import GPA_LIMIT, PAGE_SIZE

# K, M, G, T are binary multiples with or without the "i" (as `free`, `qemu -m` and KVM users
# read them); "B" is optional. Fractions are allowed when the result is a whole page count.
_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(?:([kmgt])(i?))?(b?)", re.IGNORECASE)
_SHIFT = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}


def parse_size(text: str | int) -> int:
    """Return the size in bytes of ``text`` ("4GiB", "512MiB", "4G", "4096", "1TiB", "2M").

    The size must be a positive multiple of the 4 KiB page and fit the 48-bit guest-physical
    space; anything else raises InputError.
    """
    if isinstance(text, bool):  # bool is an int subclass, but never a size
        raise InputError(f"--memory: cannot parse size '{text}'")
    if isinstance(text, int):
        size = text
    else:
        match = _SIZE.fullmatch(str(text).strip())
        if match is None:
            raise InputError(f"--memory: cannot parse size '{text}'")
        number, unit, _, _ = match.groups()
        exact = Fraction(number) * (1 << _SHIFT[(unit or "").lower()])
        if exact.denominator != 1:
            raise InputError(f"--memory: size '{text}' is not a whole number of bytes")
        size = int(exact)
    if size <= 0:
        raise InputError(f"--memory: size must be positive, got '{text}'")
    if size % PAGE_SIZE:
        raise InputError(f"--memory: size '{text}' ({size} bytes) is not a multiple of 4096 "
                         "(one page)")
    if size > GPA_LIMIT:
        raise InputError(f"--memory: size '{text}' exceeds the 48-bit guest-physical space "
                         "(256 TiB)")
    return size
