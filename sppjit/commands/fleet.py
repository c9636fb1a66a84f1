"""``sppjit fleet``: replay every trace x configuration of a manifest on a Dask cluster.

The logic is sppjit.fleet (also the Python API); this module parses the options, checks the
table's path before any work, writes it all-or-nothing and prints a row per job.
"""

from __future__ import annotations

import os
from typing import Annotated

import typer

from sppjit.commands import PANEL_OUTPUT, NoProgressOpt, print_result
from sppjit.commands.progress import Shown, wanted
from sppjit.errors import InputError

HELP = (
    "Replay many traces under many configurations as jobs on a Dask cluster.\n\n"
    "MANIFEST (Parquet, CSV or JSON) lists the jobs: a row per trace and configuration "
    "(columns trace, config: a spec as sppjit sweep --config takes, protect, ops, vcpus, "
    "memory, ...), or one JSON object with a list of traces and a list of configs, crossed "
    "(docs/fleet.md). Each job runs on a worker of a local cluster (--workers N processes, "
    "default the cores) or of an existing one (--scheduler ADDRESS), reading its trace from "
    "its path. Prints a row per job, as sppjit sweep does; a job that fails fails its row "
    "(the error column) and the others complete; the exit code is then 2."
)
EPILOG = ("Example: sppjit fleet jobs.json --workers 2 --out fleet.parquet --outdir runs/; "
          "on a cluster: sppjit fleet /nfs/sppjit/jobs.csv --scheduler tcp://head:8786")


def fleet(
    manifest: Annotated[str, typer.Argument(
        metavar="MANIFEST", show_default=False,
        help="The jobs: a table (Parquet, Arrow, CSV, JSON) or a JSON object of traces and "
             "configs to cross.")],
    scheduler: Annotated[str | None, typer.Option(
        "--scheduler", metavar="ADDRESS",
        help="An existing Dask scheduler (tcp://host:8786); not with --workers.")] = None,
    workers: Annotated[int | None, typer.Option(
        "--workers", metavar="N", min=1, max=1024, show_default="the cores",
        help="Worker processes of a local cluster started for this fleet.")] = None,
    jobs_per_task: Annotated[int | None, typer.Option(
        "--jobs-per-task", metavar="N", min=1, show_default="two tasks per worker thread",
        help="At most N jobs of one trace run together in one task, reading the trace "
             "once; 1: a task per job.")] = None,
    out: Annotated[str | None, typer.Option(
        "--out", metavar="TABLE", rich_help_panel=PANEL_OUTPUT,
        help="The table, a row per job (.parquet or .arrow).")] = None,
    outdir: Annotated[str | None, typer.Option(
        "--outdir", metavar="DIR", rich_help_panel=PANEL_OUTPUT,
        help="An existing directory (shared by the workers): TRACE.CONFIG.summary.json and "
             "TRACE.CONFIG.exits.parquet for every job whose row names no outputs.")] = None,
    json_out: Annotated[bool, typer.Option(
        "--json", rich_help_panel=PANEL_OUTPUT,
        help="Print the table and every job's summary as JSON instead of the table.")] = False,
    no_progress: NoProgressOpt = False,
) -> None:
    run_fleet(manifest=manifest, scheduler=scheduler, workers=workers,
              jobs_per_task=jobs_per_task, out=out, outdir=outdir, json_out=json_out,
              progress=wanted(no_progress))


def run_fleet(*, manifest: str, scheduler: str | None = None, workers: int | None = None,
              jobs_per_task: int | None = None, out: str | None = None, outdir: str | None = None,
              json_out: bool = False, progress: bool = False) -> dict:
    """The fleet command without typer: check, run, write, print; returns the document."""
    from sppjit.fleet import fleet as run
    from sppjit.fleet import format_fleet
    from sppjit.io.output import TableWriter, check_output_path

    if scheduler is not None and workers is not None:
        raise InputError("--scheduler and --workers cannot be used together (--workers "
                         "starts a local cluster)")
    if out is not None:
        check_output_path(out, option="--out", table=True)
    if outdir is not None and not os.path.isdir(outdir):
        raise InputError(f"--outdir: {outdir} is not an existing directory")
    with Shown(progress) as shown:
        jobs = shown.rows("fleet", "jobs")
        result = run(manifest, scheduler=scheduler, workers=workers, outdir=outdir,
                     jobs_per_task=jobs_per_task, progress=lambda done, total, row: jobs(done, total))
    written = []
    if out is not None:  # written whole under a temporary name, then renamed
        with TableWriter(out, result.table.schema, option="--out") as writer:
            writer.write_batch(result.table)
        written.append(out)
    document = result.document
    print_result(document, lambda: format_fleet(document, written), json_out=json_out,
                 notes=[f"{task['name']}: {task['note']}" for task in document["tasks"]
                        if task["note"]])
    if result.errors:
        raise InputError(f"{len(result.errors)} of {len(result.tasks)} jobs failed (their "
                         "rows say why)")
    return document
