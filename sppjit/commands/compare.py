"""``sppjit compare``: replay one trace under page-granular protection and SPP, side by side.

Option parsing only: sppjit.compare.compare_files checks every option and path before any
work, compares and writes the outputs all or nothing; this prints the table or the JSON
document (sppjit.summary.format_comparison) and the note.
"""

from __future__ import annotations

from typing import Annotated

import typer

from sppjit.commands import (
    PANEL_INPUT,
    PANEL_OUTPUT,
    PANEL_VM,
    BatchSizeOpt,
    CompareSubpageCheck,
    Engine,
    EngineOpt,
    HugepagesOpt,
    MemoryOpt,
    MemslotsOpt,
    NoProgressOpt,
    TraceArg,
    VcpusOpt,
    choices,
    print_result,
    vmprotect,
)
from sppjit.commands.progress import Shown, wanted
from sppjit.defaults import (
    DEFAULT_EMULATION_COST_US,
    DEFAULT_ENGINE,
    DEFAULT_EXIT_COST_US,
    DEFAULT_KERNEL_EXIT_COST_US,
    DEFAULT_SUBPAGE_CHECK,
    DEFAULT_WRITE_THROUGH,
    WRITE_THROUGH,
)

WriteThrough = choices("WriteThrough", WRITE_THROUGH)

# compare_files' parameters as the user gave them here: its errors name these options.
OPTION_NAMES = {
    "trace": "TRACE", "protection": "--protect", "memory": "--memory",
    "memslots": "--memslots", "summary": "--summary", "hooks_out": "--hooks-out",
    "protect_virtual": "--protect-virtual", "mapping": "--mapping",
    "protect_symbols": "--protect-symbols", "symbols": "--symbols",
    "configs": "--config", "subpage_check": "--subpage-check",
}

HELP = (
    "Compare page-granular write protection with SPP on one trace.\n\n"
    "Replays TRACE once per configuration, each on a fresh VM given the same --protect: "
    "page (page-granular write protection, the baseline), spp_v4 and spp_v12 (with "
    "--subpage-check both: each SPP profile with all and with first), or the "
    "configurations given with --config (sppjit sweep's specs: v12,first or "
    "granularity=page,name=base). --protect given twice or more compares the protections "
    "side by side: every configuration runs under each (NAME@STEM), against the page "
    "configuration of the same protection. Prints them side by side: exits by kind, "
    "protection exits per 1,000 writes, the change against page (-45%), exits avoided, "
    "protected pages left writable, SPPT memory, an estimated guest overhead and the price "
    "of letting the protected writes through; with byte-range protection (hooks), relevant "
    "and irrelevant protection exits and their noise ratio; then why v4 and v12 differ, "
    "where they do. --json prints the whole comparison as JSON. What each figure means: "
    "docs/compare.md.\n\n"
    "Estimated overhead = exits to userspace x --exit-cost-us + exits KVM resolves in the "
    f"kernel x --kernel-exit-cost-us. The defaults ({DEFAULT_EXIT_COST_US:g} us and "
    f"{DEFAULT_KERNEL_EXIT_COST_US:g} us) are order-of-magnitude figures for an Ice "
    "Lake-era KVM host, not measurements: an exit to the userspace VMM and back costs about "
    "3x an in-kernel exit (kvm-unit-tests x86/vmexit.c, inl_from_qemu against "
    "inl_from_kernel), and an in-kernel exit about 2,000 cycles of world switch plus its "
    "handler (SplitX, USENIX WIOV 2011). An introspection tool that gets its events over a "
    "socket (KVMI) pays more per exit: raise --exit-cost-us. KVM drops a protection exit's "
    "write; a write the monitor allows must be completed: --write-through emulate adds "
    "--emulation-cost-us per write, mtf the extra exits of single-stepping it with the "
    "monitor trap flag (one more to the monitor; under v12 two more in the kernel). Sources "
    "in docs/compare.md."
)

EPILOG = ("Example: sppjit generate kernel-guard --accesses 1000000 --out t.parquet "
          "--protect-out hooks.parquet, then sppjit compare t.parquet --protect "
          "hooks.parquet --memory 4GiB --vcpus 4 --hooks-out per-hook.parquet")

_COST = "Cost model"


def compare(
    trace: TraceArg,
    protect: Annotated[list[str] | None, typer.Option(
        "--protect", metavar="FILE", show_default=False, rich_help_panel=PANEL_INPUT,
        help="Protection applied before the first access in every configuration (Parquet, "
             "Arrow, CSV or JSON): access maps (gfn, access) or byte ranges (gpa, length, "
             "optional name), which also give relevant and irrelevant exits per hook. Give "
             "it twice or more to compare protections side by side. Required, unless "
             "--protect-virtual or --protect-symbols gives it.")] = None,
    config: Annotated[list[str] | None, typer.Option(
        "--config", metavar="SPEC", show_default=False, rich_help_panel=PANEL_VM,
        help="A configuration to compare instead of the defaults (repeat for more): "
             "sppjit sweep's spec, e.g. v12,first or granularity=page,name=base (keys name, "
             "profile, granularity, subpage_check, protect). The first page-granular one "
             "is the baseline.")] = None,
    memory: MemoryOpt = None,
    memslots: MemslotsOpt = None,
    vcpus: VcpusOpt = None,
    hugepages: HugepagesOpt = False,
    subpage_check: Annotated[CompareSubpageCheck, typer.Option(
        "--subpage-check", rich_help_panel=PANEL_VM, case_sensitive=False,
        help="SPP checks every sub-page a write touches (all), only its first (first), or "
             "compare both.")] = CompareSubpageCheck(DEFAULT_SUBPAGE_CHECK),
    exit_cost_us: Annotated[float, typer.Option(
        "--exit-cost-us", metavar="US", min=0.0, rich_help_panel=_COST,
        help="Cost of one exit to userspace and back, in microseconds.")] = DEFAULT_EXIT_COST_US,
    kernel_exit_cost_us: Annotated[float, typer.Option(
        "--kernel-exit-cost-us", metavar="US", min=0.0, rich_help_panel=_COST,
        help="Cost of one exit KVM resolves in the kernel, in "
             "microseconds.")] = DEFAULT_KERNEL_EXIT_COST_US,
    write_through: Annotated[WriteThrough, typer.Option(
        "--write-through", rich_help_panel=_COST, case_sensitive=False,
        help="Add to the estimated overhead the price of completing the protected writes: "
             "none, emulate (--emulation-cost-us each) or mtf (single-step: its extra "
             "exits). Both prices are always shown.")] = WriteThrough(DEFAULT_WRITE_THROUGH),
    emulation_cost_us: Annotated[float, typer.Option(
        "--emulation-cost-us", metavar="US", min=0.0, rich_help_panel=_COST,
        help="Cost of emulating one write in the monitor, in "
             "microseconds.")] = DEFAULT_EMULATION_COST_US,
    engine: EngineOpt = Engine(DEFAULT_ENGINE),
    json_out: Annotated[bool, typer.Option(
        "--json", rich_help_panel=PANEL_OUTPUT,
        help="Print the comparison as JSON on standard output instead of the table.")] = False,
    summary: Annotated[str | None, typer.Option(
        "--summary", metavar="FILE", rich_help_panel=PANEL_OUTPUT,
        help="Write the comparison JSON to FILE.")] = None,
    hooks_out: Annotated[str | None, typer.Option(
        "--hooks-out", metavar="FILE", rich_help_panel=PANEL_OUTPUT,
        help="Per-hook table (.parquet or .arrow; byte-range protection only): hook, then "
             "<config>_relevant and <config>_irrelevant per configuration, gpa, "
             "length. An irrelevant exit counts for every hook protecting the page "
             "(page) or the sub-pages (SPP) it hit, so per-hook irrelevant counts may add "
             "up to more than the total.")] = None,
    batch_size: BatchSizeOpt = None,
    no_progress: NoProgressOpt = False,
    # ---- whole-VM protection: by virtual address or kernel symbol (commands/vmprotect.py)
    protect_virtual: vmprotect.ProtectVirtualOpt = None, mapping: vmprotect.MappingOpt = None,
    protect_symbols: vmprotect.ProtectSymbolsOpt = None, symbols: vmprotect.SymbolsOpt = None,
    phys_base: vmprotect.PhysBaseOpt = None,
) -> None:
    run_compare(
        protect_virtual=protect_virtual, mapping=mapping, protect_symbols=protect_symbols,
        symbols=symbols, phys_base=vmprotect.phys_base_value(phys_base),
        trace=trace, protect=protect or None, memory=memory, memslots=memslots, vcpus=vcpus,
        hugepages=hugepages, subpage_check=subpage_check.value, exit_cost_us=exit_cost_us,
        kernel_exit_cost_us=kernel_exit_cost_us, write_through=write_through.value,
        emulation_cost_us=emulation_cost_us, configs=config or None, engine=engine.value, json_out=json_out,
        summary_path=summary, hooks_out=hooks_out, batch_size=batch_size,
        progress=wanted(no_progress),
    )


def run_compare(*, trace: str, protect: str | list[str] | None = None, json_out: bool = False,
                summary_path: str | None = None, progress: bool = False, **options) -> dict:
    """The compare command without typer: sppjit.compare.compare_files, then printed;
    returns the document."""
    from sppjit.compare import compare_files
    from sppjit.summary import format_comparison

    protect = protect[0] if isinstance(protect, list) and len(protect) == 1 else protect
    with Shown(progress) as shown:
        run = compare_files(trace, protect, summary=summary_path, progress=shown.named("compare"),
                            names=OPTION_NAMES, **options)
    document = run.document.to_dict()
    print_result(document, lambda: format_comparison(run.document, list(run.written)),
                 json_out=json_out, notes=[run.note])
    return document
