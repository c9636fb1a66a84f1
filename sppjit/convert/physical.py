"""The streaming core of the whole-VM converters (QEMU plugins, gem5): traces whose
addresses are guest-physical already.

Unlike a process trace (sppjit.convert.engine), nothing is remapped and no mapping is
written: every access keeps the guest-physical address the tracer printed, so kernel
structures, device registers and the firmware land where the guest saw them. The input is
read in chunks (``chunk`` lines, or ``chunk`` records of a binary trace); each chunk's
accesses become one record batch of the output. Only the current chunk and a few counters
(per device, per requestor) are ever held, so memory stays bounded whatever the length.

Columns written: gpa uint64, size uint16, vcpu uint16, kind uint8, seq uint64 (the 1-based
input line, or record, the access came from) and flags uint8, a bit set per thing the
converter could not take at face value (FLAG_* below); the replay passes it through.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from sppjit.convert import engine
from sppjit.convert.engine import MAX_ACCESS_SIZE, UINT64_LIMIT, BadLine, shown
from sppjit.errors import InputError

# flags column bits
FLAG_DEVICE = 1  # an MMIO access (QEMU's device name is not RAM): a row at its address
FLAG_ROM_OFFSET = 2  # QEMU printed a ROM's internal offset, not a guest-physical address
FLAG_SIZE_DEFAULT = 4  # the tracer gave no size: --default-size was used
FLAG_PAGE_CROSSING = 8  # one record for an access crossing a 4 KiB page, kept whole
FLAG_NAMES = {FLAG_DEVICE: "device", FLAG_ROM_OFFSET: "rom_offset",
              FLAG_SIZE_DEFAULT: "size_default", FLAG_PAGE_CROSSING: "page_crossing"}
PAGE_SIZE = 4096
MIB = 1 << 20


class Records(engine.Records):
    """The accesses of one chunk, as plain lists, with each access's flags (FLAG_*); an
    access is checked as it is added (a whole-VM tracer's line carries no size limit)."""

    __slots__ = ("flags",)

    def __init__(self) -> None:
        super().__init__()
        self.flags: list[int] = []

    def add(self, addr: int, size: int, kind: int, vcpu: int, seq: int, flags: int) -> None:
        if size < 1 or size > MAX_ACCESS_SIZE:
            raise BadLine(f"size {size} is not 1..{MAX_ACCESS_SIZE}")
        if addr + size > UINT64_LIMIT:
            raise BadLine(f"access at {addr:#x} of {size} bytes wraps past the end of the "
                          "64-bit address space")
        super().add(addr, size, kind, vcpu, seq)
        self.flags.append(flags)


@dataclass
class PhysicalResult:
    """What a whole-VM conversion did; sppjit.commands.convert says it in one line."""

    format: str
    source: str
    out: str
    records: int = 0  # input lines (text) or messages (binary) read
    record_noun: str = "line"
    accesses: int = 0
    vcpus: int = 0  # highest vCPU index + 1
    reads: int = 0
    writes: int = 0
    fetches: int = 0
    flagged: dict[str, int] = field(default_factory=dict)  # rows per FLAG_NAMES entry
    counts: dict[str, int] = field(default_factory=dict)  # format-specific, in order
    notes: list[str] = field(default_factory=list)  # what the format cannot say
    devices: dict[str, int] = field(default_factory=dict)  # MMIO rows per device name
    ram_end: int = 0  # end of the highest access that is neither device nor ROM offset
    bad_records: int = 0
    first_bad: int | None = None
    first_bad_reason: str | None = None

    def replay_memory(self) -> int:
        """The smallest --memory (whole MiB) that holds every RAM access (devices and ROM
        offsets beyond it replay as MMIO, as they would under KVM)."""
        return max(MIB, -(-self.ram_end // MIB) * MIB)


def schema(fmt: str, source_label: str):
    import pyarrow as pa

    return pa.schema(
        [("gpa", pa.uint64()), ("size", pa.uint16()), ("vcpu", pa.uint16()),
         ("kind", pa.uint8()), ("seq", pa.uint64()), ("flags", pa.uint8())],
        metadata={b"sppjit.converted_from": fmt.encode(),
                  b"sppjit.source": os.path.basename(source_label).encode(),
                  b"sppjit.address_space": b"guest-physical"})


Chunks = Iterator[Records]
BadHandler = Callable[[int, str, BadLine], None]


def run(fmt: str, source: str, out: str, chunks: Callable[[PhysicalResult, BadHandler], Chunks],
        *, skip_bad: bool, label: str, record_noun: str = "line",
        progress: Callable[[int], None] | None = None) -> PhysicalResult:
    """Write the accesses of ``chunks(result, bad)`` (a generator of Records, one per chunk,
    that keeps ``result.records`` and the format's counts up to date) to ``out``; all or
    nothing: on an InputError no file is left."""
    import numpy as np
    import pyarrow as pa

    from sppjit.io.output import TableWriter

    result = PhysicalResult(format=fmt, source=source, out=out, record_noun=record_noun)
    flagged = Counter()

    def bad(number: int, text: str, error: BadLine) -> None:
        if not skip_bad:
            # a text line is quoted; a binary record is located (``text`` says where)
            where = (f"{record_noun} {number}: {error}: {shown(text)}" if record_noun == "line"
                     else f"{record_noun} {number} ({text}): {error}")
            raise InputError(f"convert: {label}, {where} (--skip-bad skips such "
                             f"{record_noun}s)") from None
        result.bad_records += 1
        if result.first_bad is None:
            result.first_bad = number
            result.first_bad_reason = str(error)

    with TableWriter(out, schema(fmt, label), option="--out") as writer:
        for records in chunks(result, bad):
            if progress is not None:
                progress(result.records)
            if not len(records):
                continue
            gpa = np.array(records.addr, dtype=np.uint64)
            size = np.array(records.size, dtype=np.uint16)
            kind = np.array(records.kind, dtype=np.uint8)
            vcpu = np.array(records.vcpu, dtype=np.uint16)
            flags = np.array(records.flags, dtype=np.uint8)
            writer.write_batch(pa.record_batch(
                [pa.array(gpa), pa.array(size), pa.array(vcpu), pa.array(kind),
                 pa.array(np.array(records.seq, dtype=np.uint64)), pa.array(flags)],
                schema=writer.schema))
            result.accesses += len(gpa)
            result.vcpus = max(result.vcpus, int(vcpu.max()) + 1)
            counts = np.bincount(kind, minlength=3)
            result.reads += int(counts[0])
            result.writes += int(counts[1])
            result.fetches += int(counts[2])
            for bit, name in FLAG_NAMES.items():
                flagged[name] += int(np.count_nonzero(flags & np.uint8(bit)))
            ram = (flags & np.uint8(FLAG_DEVICE | FLAG_ROM_OFFSET)) == 0
            if ram.any():
                end = gpa[ram] + size[ram].astype(np.uint64)
                result.ram_end = max(result.ram_end, int(end.max()))
        if result.accesses == 0:
            what = f"no accesses in {label}"
            if result.bad_records:
                what += f" ({result.bad_records:,} malformed {record_noun}s skipped)"
            raise InputError(f"convert: {what}")
    # The VM it needs, for replay's defaults (known only now that the input is read); the
    # trace goes with it if that fails: all or nothing.
    from sppjit.io.atomic import Outputs
    from sppjit.provenance import record_vm

    with Outputs() as outputs:
        outputs.add(out)
        record_vm(out, memory=result.replay_memory(), vcpus=max(result.vcpus, 1))
    result.flagged = {name: flagged[name] for name in FLAG_NAMES.values() if flagged[name]}
    return result
