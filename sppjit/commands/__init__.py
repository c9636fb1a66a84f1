"""The sub-commands of ``sppjit`` (one module each) and the helpers they share.

Only the standard library and typer are imported at module level: ``sppjit --help`` loads
these modules, and numba, numpy and pyarrow would make it slow.
"""

from __future__ import annotations

import sys
from enum import Enum
from typing import Annotated

import typer

from sppjit.errors import InputError
# Outputs and the atomic-file helpers live in the I/O library; re-exported for the commands.
from sppjit.io.atomic import (  # noqa: F401
    Outputs,
    atomic_path,
    check_distinct,
    same_file,
    temporary_name,
)

GPA_BITS = 48  # sppjit.bits.GPA_BITS (not imported here: bits pulls in numpy)


class Engine(str, Enum):
    """--engine of the commands that replay."""

    jit = "jit"
    reference = "reference"


# ---------------------------------------------------------------- options of the replaying commands
# sppjit replay and sppjit compare describe the trace and the VM the same way: one definition.
DEFAULT_MEMORY = "4GiB"
DEFAULT_VCPUS = 1
DEFAULT_BATCH_JIT = 1 << 20
DEFAULT_BATCH_REFERENCE = 1 << 12
MAX_BATCH = 1 << 32  # rows; a batch is held in memory whole, and 2**63 overflows pyarrow
PANEL_INPUT = "Inputs"
PANEL_VM = "Virtual machine"
PANEL_OUTPUT = "Outputs"

TraceArg = Annotated[str, typer.Argument(
    metavar="TRACE", show_default=False,
    help="Trace to replay: Parquet file or directory, or Arrow IPC file or stream.")]
MemoryOpt = Annotated[str | None, typer.Option(
    "--memory", metavar="SIZE", rich_help_panel=PANEL_VM, show_default=DEFAULT_MEMORY,
    help="Guest memory as one memslot from gfn 0 (4GiB, 512MiB, 2G, bytes); "
         "not with --memslots.")]
MemslotsOpt = Annotated[str | None, typer.Option(
    "--memslots", metavar="FILE", rich_help_panel=PANEL_VM,
    help="Memory layout (CSV, JSON or Parquet: slot, base_gfn, npages); gaps are "
         "MMIO. Not with --memory.")]
VcpusOpt = Annotated[int | None, typer.Option(
    "--vcpus", metavar="N", min=1, max=1024, rich_help_panel=PANEL_VM,
    show_default=str(DEFAULT_VCPUS), help="Number of vCPUs.")]
HugepagesOpt = Annotated[bool, typer.Option(
    "--hugepages", rich_help_panel=PANEL_VM,
    help="Back the guest with 2 MiB pages where KVM would.")]
EngineOpt = Annotated[Engine, typer.Option(
    "--engine", case_sensitive=False,
    help="jit (compiled) or reference (the plain-Python oracle, slow).")]
BatchSizeOpt = Annotated[int | None, typer.Option(
    "--batch-size", metavar="N", min=1, max=MAX_BATCH,
    show_default=f"{DEFAULT_BATCH_JIT} (jit), {DEFAULT_BATCH_REFERENCE} (reference)",
    help="Trace rows per batch.")]
NoProgressOpt = Annotated[bool, typer.Option(
    "--no-progress",
    help="No progress line (it is shown only when standard error is a terminal).")]


def parse_address(text: str, option: str, *, limit_bits: int = GPA_BITS) -> int:
    """An address given on the command line: hex with 0x, or decimal; underscores allowed."""
    raw = str(text).strip().lower().replace("_", "")
    try:
        value = int(raw[2:], 16) if raw.startswith("0x") else int(raw, 10)
    except ValueError:
        raise InputError(f"{option}: cannot parse address '{text}' (use hex 0x... or "
                         "decimal)") from None
    if value < 0 or value >= 1 << limit_bits:
        raise InputError(f"{option}: address '{text}' is beyond the {limit_bits}-bit "
                         "guest-physical space")
    return value


def format_size(nbytes: int) -> str:
    """Bytes in the largest binary unit that divides them exactly: 4294967296 -> "4GiB"."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if nbytes >= 1 << shift and nbytes % (1 << shift) == 0:
            return f"{nbytes >> shift}{unit}"
    return str(nbytes)


def err(text: str) -> None:
    """One line on standard error."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()
