"""``sppjit report``: statistics tables, plots and a text report from a replay's outputs.

Argument juggling only: the work, its checks and its all-or-nothing writing are
sppjit.report.write_report; this prints its text and notes.
"""

from __future__ import annotations

from typing import Annotated

import typer

from sppjit.commands import NoProgressOpt, print_result
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
    # rich reads [plot] as markup: escaped, so that the help shows it
    "matplotlib: pip install 'sppjit\\[plot]', or pip install -e '.\\[plot]' in a checkout). "
    "--html writes one self-contained HTML file (the summary, the compare table, the plots "
    "inlined, the hottest pages and the per-hook tables) that a browser opens from disk. "
    "--protect (default: the file the summary names, if unchanged) marks the protected and "
    "hooked sub-pages in the heatmap. Each directory gets a report.json with the versions, "
    "the input paths and their digests (BLAKE3), and the summary's configuration and seed. Without "
    "RESULTS, --exits and --summary give every exit figure (per page, epoch and sub-page); "
    "the per-access columns (accesses, reads, writes, fetches) are then null."
)

EPILOG = ("Example: sppjit replay t.parquet --protect p.parquet --out r.parquet --exits "
          "e.parquet --summary s.json, then sppjit report r.parquet --exits e.parquet "
          "--summary s.json --stats stats --plot plots --html report.html")

# write_report's parameters as the user gives them here: its errors name these.
OPTION_NAMES = {
    "results": "RESULTS", "exits": "--exits", "summary": "--summary", "plot": "--plot",
    "stats": "--stats", "html": "--html", "protect": "--protect", "epochs": "--epochs",
    "top": "--top",
}

_INPUT = "Inputs"
_OUTPUT = "Outputs"


def report(
    results: Annotated[str | None, typer.Argument(
        metavar="RESULTS", show_default=False,
        help="Per-access results of sppjit replay (--out): Parquet or Arrow IPC. Without "
             "them, --exits and --summary make the report (the per-access columns are "
             "null).")] = None,
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
    html: Annotated[str | None, typer.Option(
        "--html", metavar="FILE", rich_help_panel=_OUTPUT,
        help="Write the whole report as one self-contained HTML file (plots inlined; opens "
             "in a browser without a server; needs matplotlib).")] = None,
    protect: Annotated[str | None, typer.Option(
        "--protect", metavar="FILE", rich_help_panel=_INPUT,
        help="The protection the replay applied (access maps or byte ranges): the heatmap "
             "marks its protected and hooked sub-pages. Default: the file the summary "
             "names, when unchanged.")] = None,
    epochs: Annotated[int, typer.Option(
        "--epochs", metavar="N", min=1, max=MAX_EPOCHS,
        help="Epochs (equal runs of trace rows) for exits over time.")] = DEFAULT_EPOCHS,
    top: Annotated[int, typer.Option(
        "--top", metavar="N", min=1, max=MAX_TOP,
        help="Hottest protected pages (most protection exits) in the heatmap.")] = DEFAULT_TOP,
    no_progress: NoProgressOpt = False,
) -> None:
    run_report(results=results, exits=exits, summary_path=summary, plot=plot, stats=stats,
               html=html, protect=protect, epochs=epochs, top=top,
               progress=wanted(no_progress))


def run_report(*, results: str | None, exits: str | None = None, summary_path: str | None = None,
               plot: str | None = None, stats: str | None = None, html: str | None = None,
               protect: str | None = None, epochs: int = DEFAULT_EPOCHS,
               top: int = DEFAULT_TOP, progress: bool = False) -> dict:
    """The report command without typer: write_report, then print; returns report.json's
    document."""
    from sppjit.report import write_report

    with Shown(progress) as shown, shown.step("report: reading the results"):
        done = write_report(results, exits, summary=summary_path, plot=plot, stats=stats,
                            html=html, protect=protect, epochs=epochs, top=top,
                            names=OPTION_NAMES)
    print_result(done.document, lambda: done.text, notes=done.notes)
    return done.document
