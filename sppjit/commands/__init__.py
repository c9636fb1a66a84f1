"""The sub-commands of ``sppjit`` (one module each) and the helpers they share.

Only the standard library and typer are imported at module level: ``sppjit --help`` loads
these modules, and numba, numpy and pyarrow would make it slow.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
from collections.abc import Iterator
from enum import Enum
from typing import Annotated

import typer

from sppjit.errors import InputError

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
    "--batch-size", metavar="N", min=1,
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


def same_file(a: str, b: str) -> bool:
    """Whether two paths name the same file (existing or not)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def check_distinct(named_paths: list[tuple[str, str | None]]) -> None:
    """Refuse two options naming the same file (an output over an input, or two outputs)."""
    given = [(option, path) for option, path in named_paths if path is not None]
    for i, (first, a) in enumerate(given):
        for second, b in given[i + 1:]:
            if same_file(a, b):
                raise InputError(f"{second}: {b} is the same file as {first}")


def temporary_name(path: str) -> str:
    """A hidden, unique name beside ``path`` (same directory: the rename is atomic)."""
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{name}.{secrets.token_hex(6)}.tmp")


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path to write; it becomes ``path`` only if the block succeeds."""
    temporary = temporary_name(path)
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise


class Outputs:
    """All-or-nothing for a command's several output files.

    Each output is written atomically on its own (temporary name, then rename); this remembers
    the ones renamed so far and, if the command then fails or is interrupted, removes them, so
    that a failed run leaves no output file at all. Use as the first context of an ExitStack.
    """

    def __init__(self) -> None:
        self.committed: list[str] = []

    def __enter__(self) -> "Outputs":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None:
            return
        for path in reversed(self.committed):
            with contextlib.suppress(OSError):
                os.remove(path)
        self.committed.clear()

    def track(self, path: str):
        """An exit callback for ExitStack.push: records ``path`` once its writer committed."""

        def committed(kind, error, traceback) -> None:
            if kind is None:
                self.committed.append(path)

        return committed

    def add(self, path: str) -> None:
        self.committed.append(path)


def err(text: str) -> None:
    """One line on standard error."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()
