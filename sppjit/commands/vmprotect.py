"""The options replay and compare share to give protection of a whole VM without a
guest-physical protection file: by virtual address through a converter's mapping, or by
guest-kernel symbol. The logic is sppjit.io.symbols.resolve_protection."""

from __future__ import annotations

from typing import Annotated

import typer

from sppjit.commands import PANEL_INPUT

ProtectVirtualOpt = Annotated[str | None, typer.Option(
    "--protect-virtual", metavar="FILE", rich_help_panel=PANEL_INPUT,
    help="Protection by virtual address (byte ranges addr/gpa, length, name; or access maps "
         "by virtual page number), moved into the trace's guest-physical space through "
         "--mapping. Not with --protect.")]
MappingOpt = Annotated[str | None, typer.Option(
    "--mapping", metavar="FILE", rich_help_panel=PANEL_INPUT,
    help="The page mapping sppjit convert wrote beside the trace (for --protect-virtual).")]
ProtectSymbolsOpt = Annotated[str | None, typer.Option(
    "--protect-symbols", metavar="FILE", rich_help_panel=PANEL_INPUT,
    help="Hooks by guest-kernel symbol (columns symbol, optional offset, length, name; "
         "length defaults to the distance to the next symbol in --symbols), placed at their "
         "x86-64 guest-physical address and named after the symbol. Not with --protect.")]
SymbolsOpt = Annotated[str | None, typer.Option(
    "--symbols", metavar="MAP", rich_help_panel=PANEL_INPUT,
    help="The guest kernel's System.map, /proc/kallsyms or nm -S listing.")]
PhysBaseOpt = Annotated[str | None, typer.Option(
    "--phys-base", metavar="ADDR", rich_help_panel=PANEL_INPUT, show_default="0",
    help="Where the kernel was loaded minus where it was linked (0: no KASLR, or vmlinux "
         "booted by QEMU -kernel); see docs/whole-vm-traces.md.")]


def phys_base_value(text: str | None) -> int | None:
    """``--phys-base`` as the integer the library takes (JobInputs.phys_base)."""
    from sppjit.io.symbols import parse_phys_base

    return parse_phys_base(text)
