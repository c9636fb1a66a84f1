"""gem5 memory traces: the packet trace a ``MemTraceProbe`` writes (src/mem/probes/mem_trace.cc).

The file (gzip-compressed when its name ends in .gz; either is read) is the 4 bytes ``gem5``,
then protobuf messages, each preceded by its length as a varint (gem5's ProtoOutputStream):
first a ``PacketHeader`` (obj_id, ver, tick_freq, and id_strings: requestor id -> name),
then one ``Packet`` per request the probe saw (tick, cmd, addr, size, flags, pkt_id = the
requestor id, pc), as gem5's src/proto/packet.proto defines them. The varints are decoded
here, without the protobuf package; unknown fields are skipped as the wire format says.

- Addresses are physical (the memory system's), sizes in bytes.
- ``cmd`` is gem5's MemCmd index (src/mem/packet.hh, as of gem5 24.0): the CPU-level
  requests become accesses: ReadReq (1) a read, or an instruction fetch when the request
  flags have INST_FETCH (0x100, src/mem/request.hh); WriteReq (4) a write; LoadLockedReq
  (26) and LockedRMWReadReq (30) reads; StoreCondReq (27) and LockedRMWWriteReq (32)
  writes; SwapReq (34) a read then a write. ReadReq and WriteReq have kept their numbers
  across gem5 versions; the others moved when commands were inserted before them (gem5
  before 20.1 numbers them differently). Every other command (cache fills, writebacks,
  evictions, prefetches, responses, fences) is cache traffic, not a CPU access: skipped and
  counted by name. Put the probe between a CPU and its L1 to trace what the CPU does.
- vCPU: the requestor's name from the header, whose first ``cpuN``/``coresN`` component
  gives N (``system.cpu1.data`` -> 1, ``system.cpu.inst`` -> 0, a page-table walker under a
  CPU counts as that CPU). Packets from requestors that are not under a CPU (DMA devices,
  ...) are skipped and counted. A header without id_strings (old gem5) puts every access on
  vCPU 0.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator

from sppjit.convert.engine import BadLine, check_access
from sppjit.convert.physical import PhysicalResult, Records
from sppjit.errors import InputError

MAGIC = b"gem5"
INST_FETCH = 0x100  # gem5 Request::INST_FETCH
READ, WRITE, FETCH = 0, 1, 2
# MemCmd index -> kinds of the accesses it makes (gem5 24.0 numbering)
CPU_COMMANDS = {1: (READ,), 4: (WRITE,), 26: (READ,), 30: (READ,), 27: (WRITE,),
                32: (WRITE,), 34: (READ, WRITE)}
COMMAND_NAMES = (
    "InvalidCmd ReadReq ReadResp ReadRespWithInvalidate WriteReq WriteResp "
    "WriteCompleteResp WritebackDirty WritebackClean WriteClean CleanEvict SoftPFReq "
    "SoftPFExReq HardPFReq SoftPFResp HardPFResp WriteLineReq UpgradeReq SCUpgradeReq "
    "UpgradeResp SCUpgradeFailReq UpgradeFailResp ReadExReq ReadExResp ReadCleanReq "
    "ReadSharedReq LoadLockedReq StoreCondReq StoreCondFailReq StoreCondResp "
    "LockedRMWReadReq LockedRMWReadResp LockedRMWWriteReq LockedRMWWriteResp SwapReq "
    "SwapResp").split()
READ_BLOCK = 4 << 20
MAX_MESSAGE = 1 << 20  # a packet message is a few dozen bytes; a header a few KiB
_CPU = re.compile(r"(?:cpu|cores?)(\d*)", re.IGNORECASE)


class Truncated(Exception):
    pass


def _varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """(value, next position) of the varint at ``pos``; Truncated if it runs past ``end``."""
    result = shift = 0
    while True:
        if pos >= end:
            raise Truncated
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise BadLine("varint longer than 10 bytes")


def fields(buf: bytes, pos: int, end: int) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of the protobuf message in ``buf[pos:end]``: an int for a
    varint, bytes for a length-delimited field; fixed-width fields are skipped."""
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            yield number, value
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise BadLine(f"field {number} runs past the end of its message")
            yield number, buf[pos:pos + length]
            pos += length
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            raise BadLine(f"field {number} has wire type {wire}, which protobuf does not "
                          "define")
    if pos != end:
        raise BadLine("a fixed-width field runs past the end of its message")


def cpu_of(name: str) -> int | None:
    """The vCPU of a requestor name, or None for a requestor that is not under a CPU."""
    for part in name.split("."):
        found = _CPU.fullmatch(part)
        if found is not None:
            return int(found.group(1) or 0)
    return None


def _messages(stream, label: str) -> Iterator[tuple[int, int, bytes, int, int]]:
    """(index from 1, byte offset, buffer, start, end) per length-prefixed message after
    the magic, reading ``READ_BLOCK`` bytes at a time."""
    magic = stream.read(len(MAGIC))
    if magic != MAGIC:
        raise InputError(f"convert: {label} is not a gem5 trace (it does not start with "
                         f"the magic {MAGIC.decode()}, but with {magic!r})")
    buf = b""
    pos = 0
    offset = len(MAGIC)  # of buf[0] in the file
    index = 0
    eof = False
    while True:
        if len(buf) - pos < MAX_MESSAGE + 10 and not eof:
            more = stream.read(READ_BLOCK)
            eof = not more
            offset += pos
            buf = buf[pos:] + more
            pos = 0
        if pos >= len(buf):
            return
        index += 1
        try:
            length, start = _varint(buf, pos, len(buf))
        except Truncated:
            raise _truncated(label, index, offset + pos) from None
        if length > MAX_MESSAGE:
            raise InputError(f"convert: {label}, message {index} (byte {offset + pos}): "
                             f"length {length:,} is beyond any gem5 message: not a packet "
                             "trace, or corrupt")
        if start + length > len(buf):
            raise _truncated(label, index, offset + pos)
        yield index, offset + pos, buf, start, start + length
        pos = start + length


def _truncated(label: str, index: int, at: int) -> InputError:
    return InputError(f"convert: {label}, message {index} (byte {at}): the file ends inside "
                      "it (truncated trace?)")


def _open(source: str):
    from sppjit.convert.engine import _decompressed
    from sppjit.io.formats import read_magic

    if source == "-":
        raise InputError("convert: a gem5 trace is binary: give its path, not -")
    read_magic(source, "convert")
    try:
        raw = open(source, "rb")  # noqa: SIM115 (closed by the caller)
    except OSError as exc:
        raise InputError(f"convert: cannot read {source}: {exc.strerror or exc}") from None
    return raw, _decompressed(raw, raw.peek(8)[:8])


def chunks(source: str, *, chunk_records: int):
    """The ``chunks`` function sppjit.convert.physical.run takes, for a gem5 trace."""

    def generate(result: PhysicalResult, bad) -> Iterator[Records]:
        import zlib

        raw, stream = _open(source)
        label = source
        vcpus: dict[int, int | None] | None = None
        skipped_cmds: Counter[str] = Counter()
        non_cpu: Counter[str] = Counter()
        records = Records()
        try:
            for index, at, buf, start, end in _messages(stream, label):
                result.records = index
                if vcpus is None:
                    vcpus = _header(buf, start, end, label)
                    continue
                try:
                    packet = _packet(buf, start, end)
                    tick, cmd, addr, size, flags, requestor = packet
                    kinds = CPU_COMMANDS.get(cmd)
                    if kinds is None:
                        name = (COMMAND_NAMES[cmd] if cmd < len(COMMAND_NAMES)
                                else f"cmd {cmd}")
                        skipped_cmds[name] += 1
                        continue
                    if vcpus:
                        if requestor not in vcpus:
                            raise BadLine(f"requestor {requestor} is not in the header's "
                                          "id_strings")
                        vcpu = vcpus[requestor]
                        if vcpu is None:
                            non_cpu[f"requestor {requestor}"] += 1
                            continue
                    else:
                        vcpu = 0
                    check_access(addr, size)
                except BadLine as error:
                    bad(index, f"byte {at}", error)
                    continue
                if kinds == (READ,) and flags & INST_FETCH:
                    kinds = (FETCH,)
                for kind in kinds:
                    records.add(addr, size, kind, vcpu, index, 0)
                if len(records) >= chunk_records:
                    yield records
                    records = Records()
        except (OSError, EOFError, zlib.error) as exc:
            raise InputError(f"convert: cannot read {label}: {exc}") from None
        finally:
            stream.close()
            raw.close()
        if vcpus is None:
            raise InputError(f"convert: {label} holds no header message")
        yield records
        result.counts = {"packets": max(result.records - 1, 0),
                         "requestors": len(vcpus),
                         "non-CPU requestor packets skipped": sum(non_cpu.values()),
                         "cache-traffic packets skipped": sum(skipped_cmds.values()),
                         **{f"skipped {name}": n for name, n in skipped_cmds.most_common()}}
        if not vcpus:
            result.notes.append("the header names no requestors: every access is on vCPU 0")

    return generate


def _header(buf: bytes, start: int, end: int, label: str) -> dict[int, int | None]:
    """Requestor id -> vCPU (None: not a CPU) from the PacketHeader."""
    names: dict[int, str] = {}
    seen = set()
    try:
        for number, value in fields(buf, start, end):
            seen.add(number)
            if number == 4 and isinstance(value, bytes):
                key, name = 0, ""
                for sub, sub_value in fields(value, 0, len(value)):
                    if sub == 1 and isinstance(sub_value, int):
                        key = sub_value
                    elif sub == 2 and isinstance(sub_value, bytes):
                        name = sub_value.decode("utf-8", "replace")
                names[key] = name
    except (BadLine, Truncated) as error:
        raise InputError(f"convert: {label}, message 1: not a gem5 PacketHeader "
                         f"({error or 'truncated field'})") from None
    if not {1, 3} <= seen:
        raise InputError(f"convert: {label}, message 1: not a gem5 PacketHeader (obj_id and "
                         "tick_freq, its required fields, are missing)")
    return {key: cpu_of(name) for key, name in names.items()}


def _packet(buf: bytes, start: int, end: int) -> tuple[int, int, int, int, int, int]:
    """(tick, cmd, addr, size, flags, pkt_id) of a Packet; BadLine without its required
    fields. Every Packet field is a varint with a one-byte key: decoded inline (the general
    ``fields`` takes the rest), as a trace holds hundreds of millions of them."""
    values = [None, None, None, None, None, 0, 0, None]  # by field number, 1..7
    pos = start
    while pos < end:
        key = buf[pos]
        if key >= 0x80 or key & 7 or key >> 3 > 7:
            try:
                for number, value in fields(buf, pos, end):  # anything else, to the end
                    if isinstance(value, int) and number <= 7:
                        values[number] = value
            except Truncated:
                raise BadLine("a field runs past the end of its message") from None
            break
        pos += 1
        value = shift = 0
        while True:
            if pos >= end:
                raise BadLine("a field runs past the end of its message")
            byte = buf[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                break
            shift += 7
            if shift > 63:
                raise BadLine("varint longer than 10 bytes")
        values[key >> 3] = value
    tick, cmd, addr, size, flags, pkt_id = values[1:7]
    if tick is None or cmd is None or addr is None or size is None:
        missing = [name for number, name in ((1, "tick"), (2, "cmd"), (3, "addr"),
                                             (4, "size")) if values[number] is None]
        raise BadLine(f"not a gem5 Packet: no {', '.join(missing)}")
    return tick, cmd, addr, size, flags or 0, pkt_id or 0
