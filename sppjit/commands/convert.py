"""``sppjit convert``: turn a valgrind lackey, Intel Pin pinatrace, DynamoRIO drmemtrace view
or CSV text trace into an sppjit trace, with the page mapping beside it; or a whole-VM trace
(QEMU execlog or mem.c plugin log, gem5 packet trace), whose addresses stay guest-physical."""

from __future__ import annotations

import re
import shlex
import sys
from typing import Annotated

import typer

from sppjit.commands import NoProgressOpt, format_size
from sppjit.commands.progress import Shown, wanted
from sppjit.defaults import CONVERT_FORMATS, VM_CONVERT_FORMATS
from sppjit.errors import InputError

# sppjit.convert.FORMATS, repeated here so that --help imports nothing heavy; a test checks
# The formats' names (sppjit.defaults): --help imports nothing heavy.
FORMAT_NAMES = CONVERT_FORMATS
VM_FORMAT_NAMES = VM_CONVERT_FORMATS
ALL_FORMATS = FORMAT_NAMES + VM_FORMAT_NAMES
_VM = "Whole-VM traces (qemu, gem5)"

HELP = (
    "Convert a memory trace (lackey, pinatrace, drmemtrace, csv; qemu, gem5) to an sppjit "
    "trace.\n\n"
    "FORMAT is one of: lackey (valgrind --tool=lackey --trace-mem=yes --log-file=IN: "
    "'I  addr,size' fetches, ' L' loads, ' S' stores, ' M' modifies = a read then a "
    "write); pinatrace (Intel Pin's pinatrace.out: 'IP: R ADDR' / 'IP: W ADDR', with an "
    "optional size after the address, 8 bytes when absent); drmemtrace (the text of "
    "DynamoRIO's view tool, drrun -t drmemtrace -tool view: its ifetch, read and write "
    "records; threads become vCPUs in order of appearance); csv (a header, then an address "
    "column addr/address/vaddr/gpa, optional size, kind r/w/x or read/write/fetch or "
    "0/1/2, and vcpu or tid). IN may be gzip, bzip2 or xz compressed, or - for standard "
    "input; it is read line by line, so memory stays bounded.\n\n"
    "Virtual addresses are placed in a compact guest-physical space page by page: the "
    "first page touched becomes gfn 0, the next new one gfn 1, and so on (first-touch "
    "order), keeping the offset inside the page; an access that crosses a virtual page "
    "boundary is split into one access per page. The mapping (columns vpage, gfn) is "
    "written beside the trace so that protection can be given by virtual address "
    "(sppjit.convert.mapping.translate_protection). The trace's seq column is the input "
    "line number. The trace records the memory and vCPUs it needs in its metadata: sppjit "
    "replay, compare and sweep take them as their defaults. A malformed line stops the "
    "conversion with its line number (exit code 2, no output), unless --skip-bad skips and counts such lines.\n\n"
    "Whole-VM traces keep their guest-physical addresses (no mapping is written) and get a "
    "flags column (1 device, 2 rom_offset, 4 size_default, 8 page_crossing): qemu reads a "
    "QEMU log (-d plugin -D FILE) of contrib/plugins/execlog.c (vCPU, instruction, "
    "load/store, physical address, device; sizes from the disassembly, else "
    "--default-size; device accesses kept at their address) or of tests/tcg/plugins/mem.c "
    "with print-accesses=true (its CSV; sizes in bits; no vCPU column: --vcpu), told "
    "apart from the file itself; gem5 reads a MemTraceProbe packet trace (.gz or not): "
    "reads, writes and instruction fetches by CPU requestors, vCPU from the requestor's "
    "name. See docs/whole-vm-traces.md."
)

EPILOG = ("Example: valgrind --tool=lackey --trace-mem=yes --log-file=ls.lackey ls, then "
          "sppjit convert lackey ls.lackey --out ls.parquet, then sppjit replay ls.parquet")

_SIZE = re.compile(r"(\d+)\s*(?:([kmg])(?:ib?)?b?)?", re.IGNORECASE)
_SHIFT = {None: 0, "k": 10, "m": 20, "g": 30}


def parse_page_size(text: str) -> int:
    """``--page-size``: bytes, or with a K/M/G (KiB/MiB/GiB) suffix: 4096, 4K, 2MiB, 1G."""
    match = _SIZE.fullmatch(str(text).strip())
    if match is None:
        raise InputError(f"--page-size: cannot parse size '{text}' (use 4096, 4KiB, 2MiB "
                         "or 1GiB)")
    number, unit = match.groups()
    return int(number) << _SHIFT[unit.lower() if unit else None]


def _complete_format(incomplete: str) -> list[str]:
    return [name for name in ALL_FORMATS if name.startswith(incomplete)]


def convert(
    fmt: Annotated[str, typer.Argument(
        metavar="FORMAT", show_default=False, autocompletion=_complete_format,
        help=f"Input format: {', '.join(ALL_FORMATS)}.")],
    source: Annotated[str, typer.Argument(
        metavar="IN", show_default=False,
        help="Text trace to read (gzip, bzip2 or xz compressed allowed), or - for standard "
             "input.")],
    out: Annotated[str, typer.Option(
        "--out", metavar="TRACE", show_default=False,
        help="Trace to write: .parquet or .arrow.")],
    mapping_out: Annotated[str | None, typer.Option(
        "--mapping-out", metavar="FILE", show_default=False,
        help="Page mapping to write (vpage, gfn): .parquet or .arrow. Default: "
             "TRACE.mapping.parquet.")] = None,
    skip_bad: Annotated[bool, typer.Option(
        "--skip-bad", help="Skip malformed lines, and report how many there were, instead "
                           "of stopping at the first.")] = False,
    page_size: Annotated[str, typer.Option(
        "--page-size", metavar="SIZE",
        help="Virtual page size of the mapping: a power of two from 4096 to 1GiB (2MiB "
             "keeps huge pages whole).")] = "4096",
    default_size: Annotated[int | None, typer.Option(
        "--default-size", metavar="BYTES", rich_help_panel=_VM, show_default="8",
        help="qemu execlog: size of an access whose disassembly does not say it.")] = None,
    vcpu: Annotated[int | None, typer.Option(
        "--vcpu", metavar="N", rich_help_panel=_VM, show_default="0",
        help="qemu mem.c: the vCPU of every access (mem.c prints none).")] = None,
    guest_memory: Annotated[str | None, typer.Option(
        "--guest-memory", metavar="SIZE", rich_help_panel=_VM,
        help="qemu execlog: the guest's RAM (QEMU's -m, pc machine layout), to flag the "
             "RAM block offsets QEMU 7.2 prints for ROM (rom_offset).")] = None,
    no_progress: NoProgressOpt = False,
) -> None:
    if fmt in VM_FORMAT_NAMES:
        if mapping_out is not None or page_size != "4096":
            raise InputError(f"--mapping-out and --page-size are not for {fmt}: its "
                             "addresses are guest-physical, no mapping is made")
        run_convert_vm(format=fmt, source=source, out=out, skip_bad=skip_bad,
                       default_size=default_size, vcpu=vcpu, guest_memory=guest_memory,
                       progress=wanted(no_progress))
        return
    for name, value in (("--default-size", default_size), ("--vcpu", vcpu),
                        ("--guest-memory", guest_memory)):
        if value is not None:
            raise InputError(f"{name} is for the whole-VM formats ({', '.join(VM_FORMAT_NAMES)})")
    run_convert(format=fmt, source=source, out=out, mapping_out=mapping_out,
                skip_bad=skip_bad, page_size=parse_page_size(page_size),
                progress=wanted(no_progress))


def run_convert(*, format: str, source: str, out: str, mapping_out: str | None = None,
                skip_bad: bool = False, page_size: int = 4096,
                chunk_lines: int | None = None, progress: bool = False) -> str:
    """Convert, print one line saying what was written and how to replay it; returns it."""
    if format not in FORMAT_NAMES:
        raise InputError(f"unknown format '{format}' (one of {', '.join(ALL_FORMATS)})")
    from sppjit.convert import DEFAULT_CHUNK_LINES, convert_trace

    with Shown(progress) as shown:
        result = convert_trace(format, source, out, mapping_out=mapping_out,
                               skip_bad=skip_bad, page_size=page_size,
                               chunk_lines=chunk_lines or DEFAULT_CHUNK_LINES,
                               progress=shown.bytes(f"convert {format}"))
    line = summary_line(result)
    sys.stdout.write(line + "\n")
    return line


def _count(n: int, noun: str, plural: str | None = None) -> str:
    return f"{n:,} {noun if n == 1 else plural or noun + 's'}"


def summary_line(result) -> str:
    """One line: what was read, what was written, what was skipped, how to replay it."""
    source = "standard input" if result.source == "-" else result.source
    what = (f"converted {source} ({result.format}, {_count(result.lines, 'line')}): wrote "
            f"{result.out} ({_count(result.accesses, 'access', 'accesses')}")
    if result.split:
        what += f", {result.split:,} split at a page boundary"
    what += (f"; {_count(result.pages, 'virtual page')} of {format_size(result.page_size)} -> "
             f"{format_size(result.memory_bytes)} guest-physical")
    if result.threads:
        what += f"; {_count(len(result.threads), 'thread')} -> vCPUs 0..{len(result.threads) - 1}"
    what += f") and {result.mapping_out}"
    if result.bad_lines:
        what += (f"; skipped {_count(result.bad_lines, 'malformed line')} (first: line "
                 f"{result.first_bad_line}, {result.first_bad_reason})")
    command = ["sppjit", "replay", result.out, "--memory",
               format_size(result.replay_memory())]
    if result.vcpus > 1:
        command += ["--vcpus", str(result.vcpus)]
    return f"{what}; replay with: {shlex.join(command)}"


# ------------------------------------------------------------------------- whole-VM traces

def run_convert_vm(*, format: str, source: str, out: str, skip_bad: bool = False,
                   default_size: int | None = None, vcpu: int | None = None,
                   guest_memory: str | None = None, chunk: int | None = None,
                   progress: bool = False) -> str:
    """Convert a whole-VM trace, print one line saying what was written; returns it."""
    from sppjit.convert.vm import DEFAULT_CHUNK, convert_vm_trace
    from sppjit.io.sizes import parse_size

    memory = parse_size(guest_memory) if guest_memory else None
    noun = "lines" if format == "qemu" else "messages"
    with Shown(progress) as shown:
        result = convert_vm_trace(format, source, out, skip_bad=skip_bad,
                                  default_size=default_size, vcpu=vcpu, guest_memory=memory,
                                  chunk=chunk or DEFAULT_CHUNK,
                                  progress=shown.rows(f"convert {format}", noun))
    line = vm_summary_line(result)
    sys.stdout.write(line + "\n")
    return line


def vm_summary_line(result) -> str:
    """One line: what was read and written, the counts the format keeps, how to replay."""
    source = "standard input" if result.source == "-" else result.source
    what = (f"converted {source} ({result.format}, "
            f"{_count(result.records, result.record_noun)}): wrote {result.out} "
            f"({_count(result.accesses, 'access', 'accesses')}: {result.reads:,} reads, "
            f"{result.writes:,} writes, {result.fetches:,} fetches; "
            f"{_count(result.vcpus, 'vCPU')}, guest-physical")
    what += ")"
    if result.counts:
        what += "; " + ", ".join(f"{name} {n:,}" for name, n in result.counts.items())
    if result.flagged:
        what += "; flagged " + ", ".join(f"{name} {n:,}" for name, n in result.flagged.items())
    if result.devices:
        what += "; devices " + ", ".join(f"{name} {n:,}" for name, n in result.devices.items())
    if result.bad_records:
        what += (f"; skipped {_count(result.bad_records, 'malformed ' + result.record_noun)} "
                 f"(first: {result.record_noun} {result.first_bad}, "
                 f"{result.first_bad_reason})")
    for note in result.notes:
        what += f"; {note}"
    command = ["sppjit", "replay", result.out, "--memory",
               format_size(result.replay_memory())]
    if result.vcpus > 1:
        command += ["--vcpus", str(result.vcpus)]
    return f"{what}; replay with: {shlex.join(command)}"
