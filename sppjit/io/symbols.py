"""Protection named by guest-kernel symbol (``sys_call_table``, ``idt_table``, ...), placed
at the symbol's guest-physical address.

**The symbol map** (``read_symbol_map``) is a Linux ``System.map`` or ``/proc/kallsyms``
(``ADDRESS TYPE NAME`` per line, kallsyms adding ``[module]`` for module symbols), or the
output of ``nm -S`` (``ADDRESS SIZE TYPE NAME``). System.map and kallsyms give addresses
only: a symbol's size is then taken as the distance to the next higher symbol address in
the map, which is the symbol's size plus any alignment padding after it. ``nm -S`` gives
the real size. Give a ``length`` in the hook file to protect exactly what you mean.

**Virtual to guest-physical, x86-64** (``kernel_gpa``): the kernel image is mapped at
``__START_KERNEL_map`` = 0xffffffff80000000, so ``gpa = vaddr - 0xffffffff80000000 +
phys_base``; the direct map starts at ``page_offset_base`` = 0xffff888000000000 (4-level
paging, no KASLR) and maps guest-physical 0 there, so ``gpa = vaddr - page_offset``.
``phys_base`` is where the kernel was loaded minus where it was linked: 0 for a kernel at its
link address (``nokaslr``, or QEMU ``-kernel vmlinux`` through the PVH entry, which loads the
ELF at its physical addresses). A map cannot tell it under KASLR: read it in the guest as
``phys_base = start of "Kernel code" in /proc/iomem - (_text - 0xffffffff80000000)``, and
give it with ``--phys-base``. Per-CPU symbols (addresses below the kernel maps, offsets into
each CPU's area) have no single address and are refused.

**The hook file** (``read_symbol_hooks``: Parquet, Arrow, CSV or JSON) has a ``symbol``
column and optionally ``offset`` (bytes into the symbol, default 0), ``length`` (default:
the symbol's size as above) and ``name`` (default: the symbol, ``symbol+0xOFF`` with an
offset). Each row becomes one byte range named so, so a compare reports relevant and
irrelevant exits per structure. A range may not cross a 4 KiB page (as in any protection
file): split it into rows with offsets.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np

from sppjit.errors import InputError
from sppjit.io.formats import read_table
from sppjit.io.protect import ByteRanges
from sppjit.io.space import GPA_LIMIT, PAGE_SIZE

START_KERNEL_MAP = 0xFFFFFFFF80000000  # x86-64 __START_KERNEL_map
PAGE_OFFSET = 0xFFFF888000000000  # x86-64 page_offset_base, 4-level paging, no KASLR
DIRECT_MAP_SIZE = 1 << 46  # 64 TiB of direct map with 4-level paging
_LINE = re.compile(r"([0-9a-fA-F]{1,16})\s+(?:([0-9a-fA-F]{1,16})\s+)?([A-Za-z?])\s+(\S+)"
                   r"(?:\s+\[\S+\])?\s*")


@dataclass
class SymbolMap:
    """Symbol names to addresses (and sizes where the map gives them), from one file."""

    path: str
    address: dict[str, int]
    size: dict[str, int]  # only the symbols whose size the map gives (nm -S)
    sorted_addresses: np.ndarray  # every distinct address, ascending

    def lookup(self, name: str) -> tuple[int, int | None]:
        """(address, size) of ``name``; size None at the end of the map."""
        if name not in self.address:
            raise InputError(f"symbols: '{name}' is not in {self.path}")
        address = self.address[name]
        if name in self.size:
            return address, self.size[name]
        at = int(np.searchsorted(self.sorted_addresses, np.uint64(address), side="right"))
        if at >= len(self.sorted_addresses):
            return address, None
        return address, int(self.sorted_addresses[at]) - address


def read_symbol_map(path: str | os.PathLike) -> SymbolMap:
    """Read a System.map, /proc/kallsyms or ``nm -S`` listing; InputError naming the first
    line that is none of them."""
    path = os.fspath(path)
    address: dict[str, int] = {}
    size: dict[str, int] = {}
    try:
        handle = open(path, encoding="utf-8", errors="replace")  # noqa: SIM115
    except OSError as exc:
        raise InputError(f"symbols: cannot read {path}: {exc.strerror or exc}") from None
    with handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            found = _LINE.fullmatch(line.rstrip("\n"))
            if found is None:
                shown = line.rstrip("\n")[:80]
                raise InputError(f"symbols: {path}, line {lineno}: {shown!r} is not a "
                                 "System.map, kallsyms or nm -S line (ADDRESS [SIZE] TYPE "
                                 "NAME)")
            addr, sym_size, _kind, name = found.groups()
            address.setdefault(name, int(addr, 16))  # the first of a repeated local name
            if sym_size is not None:
                size.setdefault(name, int(sym_size, 16))
    if not address:
        raise InputError(f"symbols: {path} holds no symbols")
    values = np.unique(np.fromiter(address.values(), dtype=np.uint64, count=len(address)))
    if len(values) == 1 and int(values[0]) == 0:
        raise InputError(f"symbols: every address in {path} is 0 (kallsyms read without "
                         "the right to see addresses: read it as root)")
    return SymbolMap(path=path, address=address, size=size, sorted_addresses=values)


def kernel_gpa(vaddr: int, phys_base: int = 0, what: str = "address") -> int:
    """The guest-physical address of an x86-64 kernel virtual address (kernel image map or
    direct map); InputError for any other address."""
    if vaddr >= START_KERNEL_MAP:
        gpa = vaddr - START_KERNEL_MAP + phys_base
    elif PAGE_OFFSET <= vaddr < PAGE_OFFSET + DIRECT_MAP_SIZE:
        gpa = vaddr - PAGE_OFFSET
    else:
        raise InputError(f"symbols: {what} {vaddr:#x} is in neither the x86-64 kernel image "
                         f"map ({START_KERNEL_MAP:#x}...) nor the direct map "
                         f"({PAGE_OFFSET:#x}...): a per-CPU or module symbol has no fixed "
                         "guest-physical address")
    if gpa >= GPA_LIMIT:
        raise InputError(f"symbols: {what} {vaddr:#x} is at guest-physical {gpa:#x}, beyond "
                         "the 48-bit guest-physical space (check --phys-base)")
    return gpa


def read_symbol_hooks(path: str | os.PathLike, symbols: SymbolMap,
                      phys_base: int = 0) -> ByteRanges:
    """The byte ranges the hook file ``path`` names by symbol, at guest-physical addresses."""
    path = os.fspath(path)
    table = read_table(path, "protect-symbols")
    if "symbol" not in table.column_names:
        found = ", ".join(table.column_names) or "none"
        raise InputError(f"protect-symbols: {path} has columns {found}; expected symbol, "
                         "optionally offset, length and name")
    try:
        names = [None if v is None else str(v) for v in table.column("symbol").to_pylist()]
    except (TypeError, ValueError):
        raise InputError(f"protect-symbols: {path}: column 'symbol' is not text") from None
    rows = table.num_rows
    offset = _optional_ints(table, "offset", path, 0, PAGE_SIZE - 1)
    length = _optional_ints(table, "length", path, 1, PAGE_SIZE)
    labels = (table.column("name").cast("string").to_pylist()
              if "name" in table.column_names else [None] * rows)
    gpas, lengths, hook_names = [], [], []
    for row, symbol in enumerate(names):
        if not symbol:
            raise InputError(f"protect-symbols: {path}, row {row}: no symbol")
        address, size = symbols.lookup(symbol)
        off = offset[row] or 0
        where = f"protect-symbols: {path}, row {row} ({symbol}"
        if length[row] is not None:
            count = length[row]
        elif size is None:
            raise InputError(f"{where}): the map gives no size for the last symbol; give a "
                             "length")
        else:
            count = size - off
            if count < 1:
                raise InputError(f"{where}): offset {off} is past the symbol's {size} bytes")
        gpa = kernel_gpa(address + off, phys_base, what=f"{symbol}+{off:#x} at")
        if count > PAGE_SIZE or (gpa % PAGE_SIZE) + count > PAGE_SIZE:
            source = "given" if length[row] is not None else (
                "the map's size" if symbol in symbols.size else
                "up to the next symbol in the map")
            raise InputError(f"{where}+{off:#x}, {count} bytes {source}, at gpa {gpa:#x}) "
                             "crosses a 4 KiB page boundary: split it into rows with "
                             "offset and length inside one page each")
        gpas.append(gpa)
        lengths.append(count)
        hook_names.append(labels[row] or (symbol if off == 0 else f"{symbol}+{off:#x}"))
    return ByteRanges(gpa=np.array(gpas, dtype=np.uint64),
                      length=np.array(lengths, dtype=np.uint32), name=hook_names)


def _optional_ints(table, column: str, path: str, lo: int, hi: int) -> list[int | None]:
    """The integers of an optional column (decimal or 0x hex text too); None where the
    column or the cell is empty."""
    if column not in table.column_names:
        return [None] * table.num_rows
    values = []
    for row, value in enumerate(table.column(column).to_pylist()):
        if value is None or (isinstance(value, str) and not value.strip()):
            values.append(None)
            continue
        try:
            text = str(value).strip().lower()
            number = int(text, 16) if text.startswith("0x") else int(text, 10)
        except ValueError:
            raise InputError(f"protect-symbols: {path}, row {row}: {column} {value!r} is "
                             "not an integer") from None
        if not lo <= number <= hi:
            raise InputError(f"protect-symbols: {path}, row {row}: {column} {number} is "
                             f"not {lo}..{hi}")
        values.append(number)
    return values


@dataclass
class Resolved:
    """Protection resolved from --protect-virtual or --protect-symbols: what to apply and
    the label the summaries show in place of a --protect path."""

    protection: object  # ByteRanges or AccessMaps, guest-physical
    label: str


def resolve_protection(*, protect: str | None = None, protect_virtual: str | None = None,
                       mapping: str | None = None, protect_symbols: str | None = None,
                       symbols: str | None = None, phys_base: int | None = None
                       ) -> Resolved | None:
    """Check the protection options of replay and compare, and resolve the whole-VM ones:
    ``--protect-virtual FILE --mapping FILE`` (virtual addresses through a converter's page
    mapping, sppjit.convert.mapping.translate_protection) or ``--protect-symbols FILE
    --symbols MAP [--phys-base ADDR]``. None when neither is given."""
    check_protection_options(protect=protect, protect_virtual=protect_virtual, mapping=mapping,
                             protect_symbols=protect_symbols, symbols=symbols,
                             phys_base=phys_base)
    if protect_virtual is not None:
        from sppjit.convert.mapping import translate_protection

        return Resolved(translate_protection(mapping, protect_virtual),
                        f"{protect_virtual} (virtual, through {mapping})")
    if protect_symbols is not None:
        ranges = read_symbol_hooks(protect_symbols, read_symbol_map(symbols), phys_base or 0)
        return Resolved(ranges, f"{protect_symbols} (symbols of {symbols}, phys_base "
                                f"{phys_base or 0:#x})")
    return None


def parse_phys_base(text: str | None) -> int | None:
    """``--phys-base``: hex with 0x, or decimal (an address below 2**48, as every address the
    command line takes: sppjit.io.sizes.parse_address)."""
    if text is None:
        return None
    from sppjit.io.sizes import parse_address

    return parse_address(text, "--phys-base")


def check_protection_options(*, protect: str | None = None, protect_virtual: str | None = None,
                             mapping: str | None = None, protect_symbols: str | None = None,
                             symbols: str | None = None, phys_base: int | None = None) -> None:
    """The protection options of replay and compare go together as resolve_protection
    needs them (InputError otherwise); reads no file, so it runs before any work."""
    given = [name for name, value in (("--protect", protect),
                                      ("--protect-virtual", protect_virtual),
                                      ("--protect-symbols", protect_symbols)) if value]
    if len(given) > 1:
        raise InputError(f"{' and '.join(given)} cannot be used together: give one protection")
    if (protect_virtual is None) != (mapping is None):
        raise InputError("--protect-virtual and --mapping go together (the mapping sppjit "
                         "convert wrote beside the trace)")
    if (protect_symbols is None) != (symbols is None):
        raise InputError("--protect-symbols and --symbols go together (System.map, "
                         "/proc/kallsyms or nm -S output)")
    if phys_base is not None and protect_symbols is None:
        raise InputError("--phys-base is for --protect-symbols")
