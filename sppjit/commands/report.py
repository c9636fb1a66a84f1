"""``sppjit report``: statistics tables, plots and a text report from a replay's outputs.

Argument juggling only: the work, its checks and its all-or-nothing writing are
sppjit.report.write_report; this prints its text and notes.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from sppjit.commands import NoProgressOpt, err
from sppjit.commands.progress import Shown, wanted
from sppjit.report.options import DEFAULT_EPOCHS, DEFAULT_TOP, MAX_EPOCHS, MAX_TOP

HELP = (
    "Statistics, plots and a short text report from the outputs of sppjit replay.\n\n"
    "RESULTS is the --out file of sppjit replay (Parquet or Arrow), read batch by batch: "
    "memory grows with the pages touched, not with the trace. --exits gives the exit log "
    "(exit kinds, protection exits by sub-page, hook relevance); without it the exits are "
    "counted from the results' exits column and violations from their outcome. --stats "
    "writes per_page.parquet, per_subpage.parquet and epochs.parquet (for DuckDB, Polars or "
    "pandas); --plot writes exits_over_time.png, violations_heatmap.png and, when --summary "
    "is a sppjit compare --json document, compare_bars.png (1200 x 800 PNG, needs "
    "matplotlib). Each directory gets a report.json with the versions, the input paths and "
    "their SHA-256, and the summary's configuration and seed."
)

EPILOG = ("Example: sppjit replay t.parquet --protect p.parquet --out r.parquet --exits "
          "e.parquet --summary s.json, then sppjit report r.parquet --exits e.parquet "
          "--summary s.json --stats stats --plot plots")

_INPUT = "Inputs"
_OUTPUT = "Outputs"


def report(
    results: Annotated[str, typer.Argument(
        metavar="RESULTS", show_default=False,
        help="Per-access results of sppjit replay (--out): Parquet or Arrow IPC.")],
    exits: Annotated[str | None, typer.Option(
        "--exits", metavar="FILE", rich_help_panel=_INPUT,
        help="Exit log of the same replay (--exits): exit kinds per page and epoch, "
             "protection exits per sub-page, hook relevance.")] = None,
    summary: Annotated[str | None, typer.Option(
        "--summary", metavar="FILE", rich_help_panel=_INPUT,
        help="Summary JSON of the replay (its configuration and seed go into report.json), "
             "or a sppjit compare --json document (adds compare_bars.png).")] = None,
    plot: Annotated[str | None, typer.Option(
        "--plot", metavar="DIR", rich_help_panel=_OUTPUT,
        help="Write the PNG plots and report.json into DIR (created if missing).")] = None,
    stats: Annotated[str | None, typer.Option(
        "--stats", metavar="DIR", rich_help_panel=_OUTPUT,
        help="Write per_page.parquet, per_subpage.parquet, epochs.parquet and report.json "
             "into DIR (created if missing).")] = None,
    epochs: Annotated[int, typer.Option(
        "--epochs", metavar="N", min=1, max=MAX_EPOCHS,
        help="Epochs (equal runs of trace rows) for exits over time.")] = DEFAULT_EPOCHS,
    top: Annotated[int, typer.Option(
        "--top", metavar="N", min=1, max=MAX_TOP,
        help="Hottest protected pages (most protection exits) in the heatmap.")] = DEFAULT_TOP,
    no_progress: NoProgressOpt = False,
) -> None:
    run_report(results=results, exits=exits, summary_path=summary, plot=plot, stats=stats,
               epochs=epochs, top=top, progress=wanted(no_progress))


def run_report(*, results: str, exits: str | None = None, summary_path: str | None = None,
               plot: str | None = None, stats: str | None = None,
               epochs: int = DEFAULT_EPOCHS, top: int = DEFAULT_TOP,
               progress: bool = False) -> dict:
    """The report command without typer: write_report, then print; returns report.json's
    document."""
    from sppjit.report import write_report

    with Shown(progress) as shown, shown.step("report: reading the results"):
        done = write_report(results, exits, summary=summary_path, plot=plot, stats=stats,
                            epochs=epochs, top=top)
    sys.stdout.write(done.text)
    sys.stdout.flush()
    for note in done.notes:
        err(f"sppjit: note: {note}")
    return done.document
