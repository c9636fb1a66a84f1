"""``sppjit sweep``: replay one trace under many configurations in one pass.

The logic is sppjit.sweep (``sweep_files``, the command as one library call, over
``sweep``, the Python API); this module turns the options into that call and prints a row per
configuration.
"""

from __future__ import annotations

from typing import Annotated

import typer

from sppjit.commands import (
    PANEL_INPUT,
    PANEL_OUTPUT,
    BatchSizeOpt,
    Engine,
    EngineOpt,
    HugepagesOpt,
    MemoryOpt,
    MemslotsOpt,
    NoProgressOpt,
    TraceArg,
    VcpusOpt,
    print_result,
)
from sppjit.commands.progress import PREPARING, Shown, wanted

# sweep_files' parameters as the user gave them here: its errors name these options.
OPTION_NAMES = {
    "trace": "TRACE", "configs": "--config", "protect": "--protect", "memory": "--memory",
    "memslots": "--memslots", "out": "--out", "summary": "--summary", "outdir": "--outdir",
    "results": "--results",
}

HELP = (
    "Replay one trace under many configurations, reading it once.\n\n"
    "Each --config is a comma-separated spec: profile=v4|v12, granularity=spp|page, "
    "subpage_check=all|first, hugepages=on|off, vcpus=N, protect=FILE (none: no protection), "
    "ops=FILE (a timeline), name=NAME; bare v4, v12, spp, page, all, first and hugepages say "
    "which field they set. Without --config: page, spp_v4 and spp_v12. The trace is decoded "
    "once and each batch replayed by every configuration's VM on --threads threads. Prints a "
    "row per configuration (exits by kind, violations, pages, hooks, speed); --out writes "
    "that table, --json prints it with every configuration's summary as JSON."
)
EPILOG = ("Example: sppjit sweep t.parquet --protect hooks.parquet --config page "
          "--config v4 --config v12,first --config v12,hugepages --out sweep.parquet "
          "--outdir runs/")


def sweep(
    trace: TraceArg,
    config: Annotated[list[str] | None, typer.Option(
        "--config", metavar="SPEC", rich_help_panel=PANEL_INPUT,
        help="A configuration (repeatable), e.g. profile=v12,granularity=page,protect=FILE.")] = None,
    protect: Annotated[list[str] | None, typer.Option(
        "--protect", metavar="FILE", rich_help_panel=PANEL_INPUT,
        help="Protection for every configuration without protect= of its own (access maps or "
             "byte ranges, as sppjit replay reads them). Repeated: each such configuration "
             "runs once per file, named CONFIG@FILESTEM.")] = None,
    memory: MemoryOpt = None,
    memslots: MemslotsOpt = None,
    vcpus: VcpusOpt = None,
    hugepages: HugepagesOpt = False,
    engine: EngineOpt = Engine.jit,
    threads: Annotated[int | None, typer.Option(
        "--threads", metavar="N", min=1, max=1024, show_default="the cores",
        help="Threads replaying the configurations (at most one per configuration).")] = None,
    out: Annotated[str | None, typer.Option(
        "--out", metavar="TABLE", rich_help_panel=PANEL_OUTPUT,
        help="The table, a row per configuration (.parquet or .arrow).")] = None,
    summary: Annotated[str | None, typer.Option(
        "--summary", metavar="FILE", rich_help_panel=PANEL_OUTPUT,
        help="The table and every configuration's summary as one JSON document.")] = None,
    json_out: Annotated[bool, typer.Option(
        "--json", rich_help_panel=PANEL_OUTPUT,
        help="Print that JSON document on standard output instead of the table.")] = False,
    outdir: Annotated[str | None, typer.Option(
        "--outdir", metavar="DIR", rich_help_panel=PANEL_OUTPUT,
        help="An existing directory: NAME.summary.json and NAME.exits.parquet for every "
             "configuration NAME.")] = None,
    results: Annotated[bool, typer.Option(
        "--results", rich_help_panel=PANEL_OUTPUT,
        help="With --outdir, also NAME.results.parquet: the per-access results.")] = False,
    batch_size: BatchSizeOpt = None,
    no_progress: NoProgressOpt = False,
) -> None:
    run_sweep(trace=trace, configs=config or None, protect=protect or [], memory=memory,
              memslots=memslots, vcpus=vcpus, hugepages=hugepages, engine=engine.value,
              threads=threads, out=out, summary=summary, json_out=json_out, outdir=outdir,
              results=results, batch_size=batch_size,
              progress=wanted(no_progress))


def run_sweep(*, json_out: bool = False, progress: bool = False, **options) -> dict:
    """The sweep command without typer: sppjit.sweep.sweep_files, then printed; returns the
    document."""
    from sppjit.sweep import format_sweep, sweep_files

    with Shown(progress) as shown:
        run = sweep_files(progress=shown.rows("sweep", preparing=PREPARING),
                          names=OPTION_NAMES, **options)
    print_result(run.document, lambda: format_sweep(run.document, list(run.written)),
                 json_out=json_out, notes=[run.note])
    return run.document
