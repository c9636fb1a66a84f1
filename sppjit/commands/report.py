"""``sppjit report``: statistics tables, plots and a text report from a replay's outputs.

Every option and path is checked before any work (matplotlib included, when plots are asked
for); the files are written to temporary names and renamed, all under one Outputs, so that a
failed or interrupted run leaves none of them (and removes an output directory it created).
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Annotated

import typer

from sppjit.commands import Outputs, check_distinct, err
from sppjit.errors import InputError

DEFAULT_EPOCHS = 100  # sppjit.report.DEFAULT_EPOCHS (not imported here: it pulls in pyarrow)
DEFAULT_TOP = 32  # sppjit.report.DEFAULT_TOP
MAX_EPOCHS = 100_000
MAX_TOP = 4096

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
) -> None:
    run_report(results=results, exits=exits, summary_path=summary, plot=plot, stats=stats,
               epochs=epochs, top=top)


def _check_directory(path: str, option: str) -> bool:
    """InputError if ``path`` cannot be an output directory; True if it must be created."""
    if os.path.isdir(path):
        if not os.access(path, os.W_OK | os.X_OK):
            raise InputError(f"{option}: directory is not writable: {path}")
        return False
    if os.path.exists(path):
        raise InputError(f"{option}: {path} exists and is not a directory")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(parent):  # the nearest existing ancestor must be writable
        parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{option}: cannot create {path}: directory is not writable: {parent}")
    return True


def _missing_levels(path: str) -> list[str]:
    """The directories os.makedirs(path) would create, outermost first."""
    missing = []
    path = os.path.abspath(path)
    while not os.path.exists(path):
        missing.append(path)
        path = os.path.dirname(path)
    return missing[::-1]


def run_report(*, results: str, exits: str | None = None, summary_path: str | None = None,
               plot: str | None = None, stats: str | None = None,
               epochs: int = DEFAULT_EPOCHS, top: int = DEFAULT_TOP) -> dict:
    """The report command without typer: check, analyse, write, print; returns report.json's
    document."""
    if epochs < 1 or epochs > MAX_EPOCHS:
        raise InputError(f"--epochs must be 1..{MAX_EPOCHS}, not {epochs}")
    if top < 1 or top > MAX_TOP:
        raise InputError(f"--top must be 1..{MAX_TOP}, not {top}")

    # ---- outputs and inputs, before any work
    from sppjit import report as R

    if plot is not None:
        R.require_matplotlib()
    if stats is not None and plot is not None and os.path.abspath(stats) == os.path.abspath(plot):
        plot = stats  # one directory for both: one report.json
    create = {}
    for option, directory in (("--stats", stats), ("--plot", plot)):
        if directory is not None:
            create[directory] = _check_directory(directory, option)
    summary_doc = R.read_summary(summary_path) if summary_path is not None else None
    compare = summary_doc is not None and R.is_compare(summary_doc)
    if compare:
        R.compare_configs(summary_doc)  # a malformed document fails now, not after the work
    planned: list[tuple[str, str]] = []  # (option, path) of every file to write
    if stats is not None:
        planned += [("--stats", os.path.join(stats, name)) for name in R.STATS_FILES.values()]
    if plot is not None:
        names = ["exits_over_time", "violations_heatmap"] + (["compare_bars"] if compare else [])
        planned += [("--plot", os.path.join(plot, R.PLOT_FILES[n])) for n in names]
    for directory in dict.fromkeys(d for d in (stats, plot) if d is not None):
        planned.append(("--stats" if directory == stats else "--plot",
                        os.path.join(directory, R.REPORT_FILE)))
    check_distinct([("RESULTS", results), ("--exits", exits), ("--summary", summary_path)]
                   + planned)

    # ---- the work (InputError for unreadable or inconsistent inputs)
    analysis = R.analyze(results, exits, epochs=epochs)

    written: list[str] = []
    made_dirs: list[str] = []
    try:
        with contextlib.ExitStack() as stack:
            outputs = stack.enter_context(Outputs())
            for directory, needed in create.items():
                if needed:
                    made_dirs += _missing_levels(directory)
                    os.makedirs(directory, exist_ok=True)

            in_dir: dict[str, list[str]] = {d: [] for d in (stats, plot) if d is not None}

            def done(path: str, directory: str) -> None:
                outputs.add(path)
                written.append(path)
                in_dir[directory].append(os.path.basename(path))

            if stats is not None:
                for key, table in (("per_page", analysis.per_page),
                                   ("per_subpage", analysis.per_subpage),
                                   ("epochs", analysis.epochs)):
                    done(R.write_table(table, os.path.join(stats, R.STATS_FILES[key])), stats)
            if plot is not None:
                done(R.plot_exits_over_time(
                    analysis.epochs, os.path.join(plot, R.PLOT_FILES["exits_over_time"])), plot)
                done(R.plot_violations_heatmap(
                    analysis.per_subpage, os.path.join(plot, R.PLOT_FILES["violations_heatmap"]),
                    top=top, per_page=analysis.per_page), plot)
                if compare:
                    done(R.plot_compare_bars(
                        summary_doc, os.path.join(plot, R.PLOT_FILES["compare_bars"])), plot)
            document = R.report_document(
                analysis, results=results, exits=exits, summary_path=summary_path,
                summary=summary_doc, epochs=epochs, top=top,
                outputs=[os.path.basename(p) for p in written])
            from sppjit.io.output import write_json_atomic

            for directory, names in in_dir.items():
                path = os.path.join(directory, R.REPORT_FILE)
                write_json_atomic(path, {**document, "outputs": list(names)})
                done(path, directory)
    except BaseException:
        for directory in reversed(made_dirs):  # only the ones this run created, if empty
            with contextlib.suppress(OSError):
                os.rmdir(directory)
        raise

    sys.stdout.write(R.format_report(analysis, results=results, exits=exits,
                                     summary_path=summary_path, summary=summary_doc,
                                     written=written))
    sys.stdout.flush()
    for warning in analysis.warnings:
        err(f"sppjit: note: {warning}")
    if summary_doc is not None and not compare:
        rows = (summary_doc.get("input") or {}).get("rows")
        if isinstance(rows, int) and rows != analysis.rows:
            err(f"sppjit: note: the summary counts {rows:,} rows, the results {analysis.rows:,}: "
                "not the summary of this replay?")
    return document
