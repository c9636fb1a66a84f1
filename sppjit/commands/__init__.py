"""The sub-commands of ``sppjit`` (one module each) and the helpers they share.

Only the standard library and typer are imported at module level: ``sppjit --help`` loads
these modules, and numba, numpy and pyarrow would make it slow.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from enum import Enum
from typing import Annotated

import typer

from sppjit.defaults import (
    BATCH_SIZES,
    COMPARE_SUBPAGE_CHECKS,
    DEFAULT_MEMORY,
    DEFAULT_VCPUS,
    ENGINES,
    GRANULARITIES,
    MAX_BATCH,
    MAX_VCPUS,
    PROFILES,
    SUBPAGE_CHECKS,
)

# Shared helpers live in the library; re-exported here for the commands that import them.
from sppjit.io.atomic import Outputs, atomic_path, check_distinct, same_file, temporary_name  # noqa: F401
from sppjit.io.sizes import format_size, parse_address  # noqa: F401


def _flags_without_type() -> None:
    """typer's rich help prints a type column, ``<bool>`` for a flag, which reads as if the
    flag took a value: a flag (--json, --help, --hugepages) is shown with no type, and an
    argument named by its metavar (TRACE) without ``<str>``."""
    from typer.core import TyperArgument, TyperOption

    for cls, bare in ((TyperOption, lambda p: p.is_flag),
                      (TyperArgument, lambda p: p.metavar is not None)):
        shown = getattr(cls, "display_type_rich", None)
        if shown is None or getattr(shown, "_sppjit", False):
            continue

        def display_type_rich(self, ctx, _shown=shown, _bare=bare):
            return None if _bare(self) else _shown(self, ctx)

        display_type_rich._sppjit = True
        cls.display_type_rich = display_type_rich


_flags_without_type()


def choices(name: str, values: tuple[str, ...]) -> type[Enum]:
    """A typer choice built from the library's names (sppjit.defaults): one home for each."""
    return Enum(name, [(value, value) for value in values], type=str)


Engine = choices("Engine", ENGINES)  # --engine of the commands that replay
Profile = choices("Profile", PROFILES)
Granularity = choices("Granularity", GRANULARITIES)
SubpageCheck = choices("SubpageCheck", SUBPAGE_CHECKS)
CompareSubpageCheck = choices("CompareSubpageCheck", COMPARE_SUBPAGE_CHECKS)

# ---------------------------------------------------------------- options of the replaying commands
# sppjit replay and sppjit compare describe the trace and the VM the same way: one definition.
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
    "--vcpus", metavar="N", min=1, max=MAX_VCPUS, rich_help_panel=PANEL_VM,
    show_default=str(DEFAULT_VCPUS), help="Number of vCPUs.")]
HugepagesOpt = Annotated[bool, typer.Option(
    "--hugepages", rich_help_panel=PANEL_VM,
    help="Back the guest with 2 MiB pages where KVM would.")]
EngineOpt = Annotated[Engine, typer.Option(
    "--engine", case_sensitive=False,
    help="jit (compiled) or reference (the plain-Python oracle, slow).")]
BatchSizeOpt = Annotated[int | None, typer.Option(
    "--batch-size", metavar="N", min=1, max=MAX_BATCH,
    show_default=", ".join(f"{size} ({engine})" for engine, size in BATCH_SIZES.items()),
    help="Trace rows per batch.")]
NoProgressOpt = Annotated[bool, typer.Option(
    "--no-progress",
    help="No progress line (it is shown only when standard error is a terminal).")]


def is_tty(stream) -> bool:
    """Whether ``stream`` is a terminal (progress lines are shown only there)."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def err(text: str) -> None:
    """One line on standard error."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def print_result(document, text: Callable[[], str], *, json_out: bool = False,
                 notes: Iterable[str | None] = ()) -> None:
    """What a command prints when its work is done: ``document`` as indented JSON (--json)
    or the ``text()`` for people on standard output, then each note on standard error."""
    if json_out:
        from sppjit.io.output import json_default

        sys.stdout.write(json.dumps(document, indent=2, default=json_default) + "\n")
    else:
        sys.stdout.write(text())
    sys.stdout.flush()
    for note in notes:
        if note:
            err(f"sppjit: note: {note}")
