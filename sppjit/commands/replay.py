"""``sppjit replay``: replay an access trace on a simulated VM and write the results.

Option parsing only: the options become a sppjit.job.Job, sppjit.job.run checks everything
before any work, replays and writes the outputs all or nothing; this prints the summary (or
its JSON) and the job's note.
"""

from __future__ import annotations

from typing import Annotated

import typer

from sppjit.commands import (
    PANEL_INPUT,
    PANEL_OUTPUT,
    PANEL_VM,
    BatchSizeOpt,
    Engine,
    EngineOpt,
    Granularity,
    HugepagesOpt,
    MemoryOpt,
    MemslotsOpt,
    NoProgressOpt,
    Profile,
    SubpageCheck,
    TraceArg,
    VcpusOpt,
    print_result,
    vmprotect,
)
from sppjit.commands.progress import PREPARING, Shown, wanted
from sppjit.defaults import (
    DEFAULT_ENGINE,
    DEFAULT_GRANULARITY,
    DEFAULT_PROFILE,
    DEFAULT_SUBPAGE_CHECK,
)

# The job's parameters as the user gave them here: its errors name these options.
OPTION_NAMES = {
    "trace": "TRACE", "protection": "--protect", "timeline": "--ops", "memory": "--memory",
    "memslots": "--memslots", "vcpus": "--vcpus", "engine": "--engine",
    "batch_size": "--batch-size", "threads": "--threads", "results": "--out", "exit_log": "--exits",
    "summary": "--summary", "saved_state": "--save-state",
    "protect_virtual": "--protect-virtual", "mapping": "--mapping",
    "protect_symbols": "--protect-symbols", "symbols": "--symbols",
}

HELP = (
    "Replay a memory-access trace on a simulated VM with EPT and SPP.\n\n"
    "TRACE is a Parquet file, a directory of Parquet files, or an Arrow IPC file or "
    "stream with the columns gpa (required), size, vcpu, kind and seq. It is read "
    "batch by batch, so memory stays bounded whatever its length. A summary (counts, "
    "outcomes, exits by kind, pages, time) is printed, or the summary JSON with "
    "--json."
)

EPILOG = ("Example: sppjit generate guarded --accesses 100000 --out t.parquet "
          "--protect-out p.parquet, then sppjit replay t.parquet --protect p.parquet "
          "--vcpus 2 --out r.parquet --exits e.parquet --summary s.json")


def replay(
    trace: TraceArg,
    protect: Annotated[str | None, typer.Option(
        "--protect", metavar="FILE", rich_help_panel=PANEL_INPUT,
        help="Protection applied before the first access (Parquet, Arrow, CSV or JSON): "
             "access maps (columns gfn, access; bit i = sub-page i writable) or byte ranges "
             "(gpa, length, optional name; none may cross a 4 KiB page). With byte ranges "
             "the exit log tells relevant from irrelevant protection exits per hook.")] = None,
    ops: Annotated[str | None, typer.Option(
        "--ops", metavar="FILE", rich_help_panel=PANEL_INPUT,
        help="Timeline (Parquet, CSV or JSON Lines: at, op, gfn, npages, access): "
             "set_subpages, zap, remap or delete_memslot, applied before the access at row "
             "'at'.")] = None,
    memory: MemoryOpt = None,
    memslots: MemslotsOpt = None,
    vcpus: VcpusOpt = None,
    profile: Annotated[Profile, typer.Option(
        "--profile", rich_help_panel=PANEL_VM, case_sensitive=False,
        help="KVM SPP series to follow: v4 (the RESEND v4 of 2019) or v12 (its last "
             "posting, 2020).")] = Profile(DEFAULT_PROFILE),
    hugepages: HugepagesOpt = False,
    subpage_check: Annotated[SubpageCheck, typer.Option(
        "--subpage-check", rich_help_panel=PANEL_VM, case_sensitive=False,
        help="Check every sub-page a write touches, or only its first.")] = SubpageCheck(
            DEFAULT_SUBPAGE_CHECK),
    granularity: Annotated[Granularity, typer.Option(
        "--granularity", rich_help_panel=PANEL_VM, case_sensitive=False,
        help="Protect with SPP (spp) or write-protect whole pages (page, the "
             "baseline).")] = Granularity(DEFAULT_GRANULARITY),
    engine: EngineOpt = Engine(DEFAULT_ENGINE),
    out: Annotated[str | None, typer.Option(
        "--out", metavar="FILE", rich_help_panel=PANEL_OUTPUT,
        help="Per-access results (.parquet or .arrow): the trace columns plus outcome, "
             "exits and exit_reason.")] = None,
    exits: Annotated[str | None, typer.Option(
        "--exits", metavar="FILE", rich_help_panel=PANEL_OUTPUT,
        help="Exit log (.parquet or .arrow): one row per VM exit.")] = None,
    summary: Annotated[str | None, typer.Option(
        "--summary", metavar="FILE", rich_help_panel=PANEL_OUTPUT,
        help="Summary JSON file.")] = None,
    save_state: Annotated[str | None, typer.Option(
        "--save-state", metavar="FILE", rich_help_panel=PANEL_OUTPUT,
        help="Save the VM state after the replay (.npz; see sppjit inspect).")] = None,
    json_out: Annotated[bool, typer.Option(
        "--json", rich_help_panel=PANEL_OUTPUT,
        help="Print the summary JSON on standard output instead of the table.")] = False,
    batch_size: BatchSizeOpt = None,
    threads: Annotated[str, typer.Option(
        "--threads", metavar="N", rich_help_panel=PANEL_VM,
        help="Replay each batch on N threads, sharded by 2 MiB region (auto: the cores); the "
             "results equal the serial replay's (docs/parallel.md).")] = "1",
    no_progress: NoProgressOpt = False,
    # ---- whole-VM protection: by virtual address or kernel symbol (commands/vmprotect.py)
    protect_virtual: vmprotect.ProtectVirtualOpt = None, mapping: vmprotect.MappingOpt = None,
    protect_symbols: vmprotect.ProtectSymbolsOpt = None, symbols: vmprotect.SymbolsOpt = None,
    phys_base: vmprotect.PhysBaseOpt = None,
) -> None:
    run_replay(
        protect_virtual=protect_virtual, mapping=mapping, protect_symbols=protect_symbols,
        symbols=symbols, phys_base=vmprotect.phys_base_value(phys_base),
        trace=trace, protect=protect, ops=ops, memory=memory, memslots=memslots, vcpus=vcpus,
        profile=profile.value, hugepages=hugepages, subpage_check=subpage_check.value,
        granularity=granularity.value, engine=engine.value, out=out, exits=exits,
        summary_path=summary, save_state_path=save_state, json_out=json_out,
        batch_size=batch_size, threads=threads, progress=wanted(no_progress),
    )


def make_job(*, trace: str, protect: str | None = None, ops: str | None = None,
             memory: str | None = None, memslots: str | None = None, vcpus: int | None = None,
             profile: str = DEFAULT_PROFILE, hugepages: bool = False,
             subpage_check: str = DEFAULT_SUBPAGE_CHECK, granularity: str = DEFAULT_GRANULARITY,
             engine: str = DEFAULT_ENGINE, out: str | None = None,
             exits: str | None = None, summary_path: str | None = None,
             save_state_path: str | None = None, batch_size: int | None = None,
             threads: int | str = 1, **whole_vm_protection):
    """The options of sppjit replay as the library job they describe (``whole_vm_protection``:
    protect_virtual, mapping, protect_symbols, symbols, phys_base, as JobInputs takes them)."""
    from sppjit.job import Job, JobInputs, JobOutputs, VmSpec

    return Job(
        inputs=JobInputs(trace=trace, protection=protect, timeline=ops, **whole_vm_protection),
        vm=VmSpec(memory=memory, memslots=memslots, vcpus=vcpus, profile=profile,
                  hugepages=hugepages, subpage_check=subpage_check, granularity=granularity),
        outputs=JobOutputs(results=out, exit_log=exits, summary=summary_path,
                           saved_state=save_state_path),
        engine=engine, batch_size=batch_size,
        threads=int(threads) if isinstance(threads, str) and threads.strip().isdigit() else threads)


def run_replay(*, json_out: bool = False, progress: bool = False, **options) -> dict:
    """The replay command without typer: the job of ``options`` (see make_job), run, then
    printed; returns the summary JSON."""
    from sppjit import job as J
    from sppjit.summary import format_summary

    with Shown(progress) as shown:
        result = J.run(make_job(**options), names=OPTION_NAMES,
                       progress=shown.rows("replay", preparing=PREPARING))
    summary = result.summary.to_dict()
    print_result(summary, lambda: format_summary(result.summary, result.written),
                 json_out=json_out, notes=[result.note])
    return summary
