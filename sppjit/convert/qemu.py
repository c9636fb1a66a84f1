"""QEMU TCG plugin traces of a whole VM (system emulation): execlog and mem.c.

Both plugins write through ``qemu_plugin_outs`` into QEMU's log (``-d plugin -D FILE``). The
format is told from the file itself (``detect``):

**contrib/plugins/execlog.c** (QEMU 6.1+). One line per executed instruction, printed when
that vCPU executes its next one:
``VCPU, 0xINSN_VADDR, 0xOPCODE, "DISASSEMBLY"`` then one ``, load|store, 0xADDR, DEVICE``
group per memory access, ADDR guest-physical and DEVICE ``RAM`` or the MMIO region's name.

- No access size is printed: it is taken from the disassembly where it says (an AT&T
  mnemonic suffix, ``movl`` = 4; ``movzbl``/``movsbq`` = the source's 1; an Intel
  ``dword ptr``; else the width of the first register operand outside the memory
  reference, ``%rax`` = 8, ``%xmm0`` = 16), else ``default_size`` (flag size_default).
  Instructions whose accesses are not operand-sized (fxsave, lgdt, far jumps, ...) always
  take the default. All accesses of one line get the same size.
- A device access (DEVICE is not ``RAM``) is kept as a row at its physical address, flagged
  ``device``; per-device counts go in the summary. QEMU names an anonymous region after a
  host pointer (``anon679592b0``), so device names differ between runs.
- QEMU 7.2 prints a RAM block's internal offset (``block->offset + offset + mr->addr``), not
  the guest-physical address, for RAM outside the main RAM's low part: a firmware read at
  0xf61c8 shows as ``0x10fff61c8, RAM``. With ``guest_memory`` (QEMU's ``-m``), a RAM row
  outside the ``pc`` machine's RAM layout ([0, low) and [4 GiB, 4 GiB + size - low), low =
  size below 3.5 GiB, else 3 GiB) is kept at the printed address and flagged
  ``rom_offset``, never remapped; without it nothing is flagged.
- With several vCPUs the plugin writes an instruction and its newline in two calls, so
  another vCPU's line can land in between: two records glued on one line, and an empty line
  later. Glued lines are split at each record start (``N, 0x..., 0x..., "``); where the
  vCPU digits could also end the previous device name (``pci01``), the split that leaves a
  device name already seen is taken, else the one giving the shortest vCPU number. Empty
  lines are skipped and counted.
- No instruction fetch rows: execlog prints the instruction's virtual address only.

**tests/tcg/plugins/mem.c** with ``print-accesses=true`` (QEMU 9.2+). A CSV header
``insn_vaddr,insn_symbol,mem_vaddr,mem_hwaddr,access_size,access_type,mem_value``, then a
line per access. The size is in bits; the symbol may hold commas, so the line is split on
its first comma and its last five. There is no vCPU column: every access goes to ``vcpu``.
An access crossing a 4 KiB page comes as one record with its first address: it is kept
whole (the replay splits it at the page itself) and flagged ``page_crossing``. The plugin's
closing lines (``mem accesses: N``, ``io accesses: N``, the region summary and its
``Warning:`` lines) are skipped.
"""

from __future__ import annotations

import functools
import itertools
import re
from collections import Counter
from collections.abc import Iterator

from sppjit.convert.engine import BadLine, check_access, open_lines
from sppjit.convert.physical import (
    FLAG_DEVICE,
    FLAG_PAGE_CROSSING,
    FLAG_ROM_OFFSET,
    FLAG_SIZE_DEFAULT,
    PAGE_SIZE,
    PhysicalResult,
    Records,
)
from sppjit.errors import InputError

DEFAULT_SIZE = 8  # one machine word, as the trace format's own default
DETECT_LINES = 1000  # lines looked at to tell the two formats apart
MAX_GLUED = 64  # records split apart on one line (2 vCPUs glue 2; hostile input, more)
RAM = "RAM"
KIND_READ, KIND_WRITE = 0, 1
_KINDS = {"load": KIND_READ, "store": KIND_WRITE}
GIB = 1 << 30
PC_LOW_LIMIT = 0xE0000000  # pc machine: RAM of 3.5 GiB and more keeps 3 GiB below 4 GiB
PC_LOW_SPLIT = 0xC0000000

# ----------------------------------------------------------------------------- formats

_HEX = r"0x[0-9a-fA-F]+"
_EXECLOG_START = re.compile(rf"(\d+), {_HEX}, {_HEX}, \"")
_EXECLOG = re.compile(
    rf"(\d+), {_HEX}, {_HEX}, \"([^\"]*)\"((?:, (?:load|store), {_HEX}, [^,]+)*)")
_ACCESS = re.compile(rf", (load|store), ({_HEX}), ([^,]+)")
MEMC_HEADER = ("insn_vaddr,insn_symbol,mem_vaddr,mem_hwaddr,access_size,access_type,"
               "mem_value")
_MEMC_TAIL = re.compile(rf"{_HEX},{_HEX},(\d+),(load|store),{_HEX}")
_MEMC_OTHER = re.compile(
    r"(?:mem|io) accesses: \d+|Region Base, Reads, Writes, Seen all"
    rf"|{_HEX}, \d+, \d+, (?:true|false)|Warning: .*")


def detect(lines: list[str], label: str = "the input") -> str:
    """"execlog" or "memc" from the first lines of a QEMU log; InputError otherwise."""
    for line in lines:
        stripped = line.strip()
        if not stripped:
            continue
        if stripped == MEMC_HEADER or _memc_fields(stripped) is not None:
            return "memc"
        if _EXECLOG_START.match(stripped):
            return "execlog"
    raise InputError(f"convert: {label} is not a QEMU plugin log: no execlog record "
                     "('VCPU, 0xADDR, 0xOPCODE, \"disassembly\"...') and no mem.c header or record "
                     f"('{MEMC_HEADER}') in its first {DETECT_LINES:,} lines")


# ------------------------------------------------------------------- sizes (execlog)

_SUFFIX_SIZES = {"b": 1, "w": 2, "l": 4, "q": 8}
_SUFFIXED = frozenset(
    "mov add sub and or xor cmp test inc dec push pop call ret neg not adc sbb xchg cmpxchg "
    "xadd shl shr sal sar rol ror rcl rcr bt bts btr btc stos lods movs cmps scas ins outs "
    "imul mul div idiv movnti iret sysret".split())
_NOT_OPERAND_SIZED = frozenset(
    "fxsave fxsave64 fxrstor fxrstor64 xsave xsave64 xsaveopt xsaveopt64 xsavec xsavec64 "
    "xsaves xsaves64 xrstor xrstor64 xrstors xrstors64 lgdt lidt sgdt sidt lgdtl lidtl "
    "lgdtw lidtw lgdtq lidtq sgdtl sidtl sgdtq sidtq ljmp ljmpl ljmpw ljmpq lcall lcalll "
    "lcallw lcallq lret lretl lretq lretw int int3 into syscall sysenter sysexit cpuid "
    "enter enterq leave leaveq lar lsl verr verw lldt ltr sldt str clflush clflushopt clwb "
    "invlpg prefetch prefetcht0 prefetcht1 prefetcht2 prefetchnta prefetchw".split())
_PREFIXES = frozenset(
    "lock rep repe repz repne repnz data16 data32 addr16 addr32 rex rex.w notrack bnd "
    "xacquire xrelease cs ds es fs gs ss".split())
_PTR = re.compile(r"\b(byte|word|dword|qword|tbyte|tword|fword|xmmword|oword|ymmword|"
                  r"zmmword) ptr\b", re.IGNORECASE)
_PTR_SIZES = {"byte": 1, "word": 2, "dword": 4, "qword": 8, "tbyte": 10, "tword": 10,
              "fword": 6, "xmmword": 16, "oword": 16, "ymmword": 32, "zmmword": 64}
_EXTEND = re.compile(r"mov[sz]([bwl])[wlq]")  # movzbl, movsbq, movslq: the source's size
_REGISTER = re.compile(r"%?\b([a-z][a-z0-9]*)\b")
_MEMORY_OPERAND = re.compile(r"\([^)]*\)|\[[^\]]*\]")


def _register_size(name: str) -> int | None:
    if re.fullmatch(r"[xyz]mm\d+", name):
        return {"x": 16, "y": 32, "z": 64}[name[0]]
    if re.fullmatch(r"r(?:[89]|1[0-5])([dwb]?)", name):
        return {"": 8, "d": 4, "w": 2, "b": 1}[re.fullmatch(r"r\d+([dwb]?)", name).group(1)]
    if re.fullmatch(r"r(?:[abcd]x|[sd]i|[sb]p)", name):
        return 8
    if re.fullmatch(r"e(?:[abcd]x|[sd]i|[sb]p)", name):
        return 4
    if re.fullmatch(r"[abcd]x|[sd]i|[sb]p", name):
        return 2
    if re.fullmatch(r"[abcd][lh]|[sd]il|[sb]pl", name):
        return 1
    if re.fullmatch(r"mm\d", name):
        return 8
    return None


@functools.lru_cache(maxsize=1 << 16)  # disassembly repeats: bounded, and cheap per line
def operand_size(disassembly: str) -> int | None:
    """The size in bytes of the memory operand of an x86 instruction as QEMU prints it
    (AT&T, or Intel with ``ptr``), or None where the disassembly does not say."""
    text = disassembly.strip().lower()
    if not text:
        return None
    words = text.split()
    while len(words) > 1 and words[0] in _PREFIXES:
        words.pop(0)
    mnemonic = words[0]
    operands = " ".join(words[1:])
    if mnemonic in _NOT_OPERAND_SIZED:
        return None
    if (found := _PTR.search(operands)) is not None:
        return _PTR_SIZES[found.group(1).lower()]
    if (found := _EXTEND.fullmatch(mnemonic)) is not None:
        return _SUFFIX_SIZES[found.group(1)]
    if mnemonic.startswith("set") and len(mnemonic) <= 6:  # setcc writes one byte
        return 1
    base, suffix = mnemonic[:-1], mnemonic[-1:]
    if suffix in _SUFFIX_SIZES and (base in _SUFFIXED or base.startswith("cmov")):
        return _SUFFIX_SIZES[suffix]
    outside = _MEMORY_OPERAND.sub(" ", operands)
    for register in _REGISTER.findall(outside):
        if (size := _register_size(register)) is not None:
            return size
    return None


# ------------------------------------------------------------------------------ execlog

class ExeclogParser:
    """execlog lines to accesses; keeps the counts the summary reports."""

    def __init__(self, default_size: int, rom: RamLayout | None):
        self.default_size = default_size
        self.rom = rom
        self.devices: Counter[str] = Counter()
        self.seen_devices: set[str] = {RAM}
        self.glued = 0
        self.empty = 0
        self.inferred = 0
        self.defaulted = 0
        self.instructions = 0

    def parse_chunk(self, lines: list[str], first: int, out: Records, bad) -> None:
        match = _EXECLOG.fullmatch
        for lineno, line in enumerate(lines, first):
            if not line.strip():
                self.empty += 1
                continue
            try:
                found = match(line)
                if found is not None:
                    rows = self._record(found)
                else:
                    spans = self._split(line.rstrip())
                    if spans is None:
                        raise BadLine('not an execlog record of system emulation (VCPU, '
                                      '0xADDR, 0xOPCODE, "disassembly", then ", '
                                      'load|store, 0xADDR, DEVICE" per access)')
                    rows = [row for start, end in spans
                            for row in self._record(match(line, start, end))]
                for addr, size, *_ in rows:
                    check_access(addr, size)
            except BadLine as error:
                bad(lineno, line, error)
                continue
            if found is None and len(spans) > 1:
                self.glued += 1
            self._count(rows)
            for addr, size, kind, vcpu, flags, _device in rows:
                out.add(addr, size, kind, vcpu, lineno, flags)

    def _record(self, found: re.Match) -> list[tuple[int, int, int, int, int]]:
        """The accesses of one record, as (addr, size, kind, vcpu, flags, device)."""
        vcpu_text, disassembly, tail = found.groups()
        self.instructions += 1
        if not tail:
            return []
        vcpu = int(vcpu_text)
        if vcpu > 0xFFFF:
            raise BadLine(f"vCPU {vcpu} is beyond 65535")
        size = operand_size(disassembly)
        flags = 0
        if size is None:
            size, flags = self.default_size, FLAG_SIZE_DEFAULT
        rows = []
        for kind, addr_text, device in _ACCESS.findall(tail):
            addr = int(addr_text, 16)
            row_flags = flags
            if device != RAM:
                row_flags |= FLAG_DEVICE
            elif self.rom is not None and not self.rom.holds(addr):
                row_flags |= FLAG_ROM_OFFSET
            rows.append((addr, size, _KINDS[kind], vcpu, row_flags, device))
        return rows

    def _count(self, rows) -> None:
        for *_, flags, device in rows:
            if flags & FLAG_SIZE_DEFAULT:
                self.defaulted += 1
            else:
                self.inferred += 1
            if flags & FLAG_DEVICE:
                self.devices[device] += 1
                self.seen_devices.add(device)

    def _split(self, line: str) -> list[tuple[int, int]] | None:
        """(start, end) of each record glued on ``line``, or None if it is not such a line."""
        if not _EXECLOG_START.match(line):
            return None
        starts = [m.start() for m in re.finditer(r"\d", line)
                  if m.start() > 0 and _EXECLOG_START.match(line, m.start())]
        if len(starts) >= MAX_GLUED:
            raise BadLine(f"{len(starts) + 1} execlog records on one line (at most "
                          f"{MAX_GLUED} are split apart)")
        memo: dict[int, list[tuple[int, int]] | None] = {}

        def spans(begin: int) -> list[tuple[int, int]] | None:
            # Records from ``begin`` to the end of the line (memoised: each start once).
            if begin in memo:
                return memo[begin]
            found = None
            if _EXECLOG.fullmatch(line, begin):
                found = [(begin, len(line))]
            else:
                candidates = []
                for start in starts:
                    if start <= begin:
                        continue
                    head = _EXECLOG.fullmatch(line, begin, start)
                    if head is None or (rest := spans(start)) is None:
                        continue
                    devices = _ACCESS.findall(head.group(3))
                    known = not devices or devices[-1][2] in self.seen_devices
                    candidates.append((known, start, rest))
                if candidates:  # a known device first, then the latest start
                    known, start, rest = max(candidates, key=lambda c: (c[0], c[1]))
                    found = [(begin, start), *rest]
            memo[begin] = found
            return found

        return spans(0)

    def finish(self, result: PhysicalResult) -> None:
        result.counts = {"instructions": self.instructions,
                         "sizes inferred": self.inferred,
                         "sizes defaulted": self.defaulted,
                         "glued lines split": self.glued,
                         "empty lines": self.empty}
        result.devices = dict(self.devices.most_common())
        result.notes.append("no instruction fetches (execlog prints only their virtual "
                            "address)")
        if self.rom is None:
            result.notes.append("RAM block offsets not checked (give --guest-memory)")


class RamLayout:
    """Guest RAM of QEMU's ``pc`` machine with ``size`` bytes of RAM: the part below 4 GiB
    and the rest from 4 GiB."""

    def __init__(self, size: int):
        self.low = size if size < PC_LOW_LIMIT else PC_LOW_SPLIT
        self.high_end = 4 * GIB + (size - self.low)

    def holds(self, addr: int) -> bool:
        return addr < self.low or 4 * GIB <= addr < self.high_end


# --------------------------------------------------------------------------------- mem.c

def _memc_fields(line: str):
    """(hwaddr, size in bits, kind) of a mem.c record, or None."""
    first = line.find(",")
    if first < 0 or not line.startswith("0x"):
        return None
    tail = line[first + 1:].rsplit(",", 5)
    if len(tail) != 6:
        return None
    found = _MEMC_TAIL.fullmatch(",".join(tail[1:]))
    if found is None:
        return None
    return int(tail[2], 16), int(found.group(1)), found.group(2)


class MemcParser:
    def __init__(self, vcpu: int):
        self.vcpu = vcpu
        self.crossing = 0
        self.skipped = 0

    def parse_chunk(self, lines: list[str], first: int, out: Records, bad) -> None:
        fields = _memc_fields
        vcpu = self.vcpu
        for lineno, line in enumerate(lines, first):
            parsed = fields(line)
            try:
                if parsed is None:
                    stripped = line.strip()
                    if (not stripped or stripped == MEMC_HEADER
                            or _MEMC_OTHER.fullmatch(stripped)):
                        self.skipped += 1
                        continue
                    raise BadLine("not a mem.c record (insn_vaddr,insn_symbol,mem_vaddr,"
                                  "mem_hwaddr,access_size,access_type,mem_value)")
                hwaddr, bits, kind = parsed
                if bits % 8 or bits == 0:
                    raise BadLine(f"access_size {bits} is not a whole number of bytes "
                                  "(mem.c prints bits)")
                size = bits // 8
                flags = 0
                if (hwaddr & (PAGE_SIZE - 1)) + size > PAGE_SIZE:
                    flags = FLAG_PAGE_CROSSING
                    self.crossing += 1
                out.add(hwaddr, size, _KINDS[kind], vcpu, lineno, flags)
            except BadLine as error:
                bad(lineno, line, error)

    def finish(self, result: PhysicalResult) -> None:
        result.counts = {"page-crossing records kept whole": self.crossing,
                         "other lines skipped": self.skipped}
        result.notes.append(f"mem.c has no vCPU column: every access is on vCPU "
                            f"{self.vcpu} (--vcpu)")
        result.notes.append("no instruction fetches, no device names (mem.c prints "
                            "neither)")


# ---------------------------------------------------------------------------- the reader

def chunks(source: str, *, default_size: int = DEFAULT_SIZE, vcpu: int = 0,
           guest_memory: int | None = None, chunk_lines: int):
    """The ``chunks`` function sppjit.convert.physical.run takes, for a QEMU log."""

    def generate(result: PhysicalResult, bad) -> Iterator[Records]:
        with open_lines(source) as (lines, label):
            head = list(itertools.islice(lines, DETECT_LINES))
            fmt = detect(head, label)
            result.format = f"qemu {fmt}"
            parser = (ExeclogParser(default_size,
                                    RamLayout(guest_memory) if guest_memory else None)
                      if fmt == "execlog" else MemcParser(vcpu))
            stream = itertools.chain(head, lines)
            lineno = 0
            while chunk := list(itertools.islice(stream, chunk_lines)):
                records = Records()
                parser.parse_chunk(chunk, lineno + 1, records, bad)
                lineno += len(chunk)
                result.records = lineno
                yield records
            parser.finish(result)

    return generate
