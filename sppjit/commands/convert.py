"""``sppjit convert``: turn a valgrind lackey, Intel Pin pinatrace, DynamoRIO drmemtrace view
or CSV text trace into an sppjit trace, with the page mapping beside it."""

from __future__ import annotations

import re
import shlex
import sys
from typing import Annotated

import typer

from sppjit.commands import format_size
from sppjit.errors import InputError

# sppjit.convert.FORMATS, repeated here so that --help imports nothing heavy; a test checks
# that the two agree.
FORMAT_NAMES = ("lackey", "pinatrace", "drmemtrace", "csv")

HELP = (
    "Convert a text memory trace (lackey, pinatrace, drmemtrace, csv) to an sppjit trace.\n\n"
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
    "line number. A malformed line stops the conversion with its line number (exit code "
    "2, no output), unless --skip-bad skips and counts such lines."
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
    return [name for name in FORMAT_NAMES if name.startswith(incomplete)]


def convert(
    fmt: Annotated[str, typer.Argument(
        metavar="FORMAT", show_default=False, autocompletion=_complete_format,
        help=f"Input format: {', '.join(FORMAT_NAMES)}.")],
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
) -> None:
    run_convert(format=fmt, source=source, out=out, mapping_out=mapping_out,
                skip_bad=skip_bad, page_size=parse_page_size(page_size))


def run_convert(*, format: str, source: str, out: str, mapping_out: str | None = None,
                skip_bad: bool = False, page_size: int = 4096,
                chunk_lines: int | None = None) -> str:
    """Convert, print one line saying what was written and how to replay it; returns it."""
    if format not in FORMAT_NAMES:
        raise InputError(f"unknown format '{format}' (one of {', '.join(FORMAT_NAMES)})")
    from sppjit.convert import DEFAULT_CHUNK_LINES, convert_trace

    result = convert_trace(format, source, out, mapping_out=mapping_out, skip_bad=skip_bad,
                           page_size=page_size,
                           chunk_lines=chunk_lines or DEFAULT_CHUNK_LINES)
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
