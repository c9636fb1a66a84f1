"""write_report: the whole of ``sppjit report`` as one library call.

Every argument and path is checked before any work (matplotlib included, when plots are asked
for); the files are written to temporary names and renamed, all under one Outputs, so that a
failed or interrupted run leaves none of them (and removes the directories it created).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import pyarrow as pa

from sppjit.errors import InputError
from sppjit.io.output import TableWriter, check_output_path, write_json_atomic
from sppjit.summary import CompareDocument

from . import plots
from .analysis import ReportStats, analyze
from .document import Summary, describe, read_summary, report_document
from .options import (
    DEFAULT_EPOCHS,
    DEFAULT_TOP,
    MAX_EPOCHS,
    MAX_TOP,
    PLOT_FILES,
    REPORT_FILE,
    STATS_FILES,
)
from .text import format_report


@dataclass
class Report:
    """What write_report did: the statistics, report.json's document (its "outputs": every
    file written but the report.json files), the printed report, the paths written and the
    notes worth telling the user (a filtered exit log, a summary of another replay)."""

    stats: ReportStats
    document: dict
    text: str
    written: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def write_report(results: str | None, exits: str | None = None, *,
                 summary: str | None = None, plot: str | None = None,
                 stats: str | None = None, html: str | None = None,
                 protect: str | None = None, epochs: int = DEFAULT_EPOCHS,
                 top: int = DEFAULT_TOP, names: dict[str, str] | None = None) -> Report:
    """Analyse a replay's ``results`` (and ``exits`` log) and write the statistics tables into
    the directory ``stats``, the plots into ``plot`` (each with a report.json) and the
    self-contained HTML report into the file ``html``, all or nothing. ``summary`` is the
    replay's summary JSON or a compare document (which adds the compare bars). Without
    ``results`` (None), the report is made from ``exits`` and a replay's ``summary`` alone
    (sppjit.report.analysis.analyze_exit_log: the per-access columns are null). ``protect``
    is the protection file of the replay: the heatmap marks its protected and hooked
    sub-pages (default: the file the summary names, when it is still the one replayed, by
    its digest). InputError for any bad argument or input, before anything is written; it
    names the parameter (``epochs``, ``plot``, ...) or, through ``names``, what the caller
    calls it (sppjit report: its options)."""
    from sppjit.io.atomic import check_distinct

    def n(parameter: str) -> str:
        return (names or {}).get(parameter, parameter)

    if epochs < 1 or epochs > MAX_EPOCHS:
        raise InputError(f"{n('epochs')} must be 1..{MAX_EPOCHS}, not {epochs}")
    if top < 1 or top > MAX_TOP:
        raise InputError(f"{n('top')} must be 1..{MAX_TOP}, not {top}")

    # ---- outputs and inputs, before any work
    if plot is not None or html is not None:
        plots.require_matplotlib()
    if html is not None:
        check_output_path(html, option=n("html"))
    if stats is not None and plot is not None and os.path.abspath(stats) == os.path.abspath(plot):
        plot = stats  # one directory for both: one report.json
    create = {}
    for parameter, directory in (("stats", stats), ("plot", plot)):
        if directory is not None:
            create[directory] = _check_directory(directory, n(parameter))
    if results is None and (exits is None or summary is None):
        raise InputError(f"{n('results')} is missing: give the results of sppjit replay "
                         f"(--out), or {n('exits')} and {n('summary')} for a report without "
                         "them")
    summary_doc = read_summary(summary) if summary is not None else None  # its shape too
    compare = isinstance(summary_doc, CompareDocument)
    protection, protection_note = _protection(protect, summary_doc, option=n("protect"))
    planned: list[tuple[str, str]] = []  # (parameter, path) of every file to write
    if stats is not None:
        planned += [("stats", os.path.join(stats, name)) for name in STATS_FILES.values()]
    if plot is not None:
        drawn = ["exits_over_time", "violations_heatmap"] + (["compare_bars"] if compare else [])
        planned += [("plot", os.path.join(plot, PLOT_FILES[name])) for name in drawn]
    for directory in dict.fromkeys(d for d in (stats, plot) if d is not None):
        planned.append(("stats" if directory == stats else "plot",
                        os.path.join(directory, REPORT_FILE)))
    if html is not None:
        planned.append(("html", html))
    check_distinct([(n(parameter), path) for parameter, path in
                    [("results", results), ("exits", exits), ("summary", summary),
                     ("protect", protect)] + planned])

    # ---- the work (InputError for unreadable or inconsistent inputs)
    analysis = analyze(results, exits, epochs=epochs, summary=summary_doc)
    notes = list(analysis.warnings)
    if protection_note:
        notes.append(protection_note)
    if summary_doc is not None and not compare and results is not None:
        rows = summary_doc.input.get("rows")
        if isinstance(rows, int) and rows != analysis.rows:
            notes.append(f"the summary counts {rows:,} rows, the results {analysis.rows:,}: "
                         "not the summary of this replay?")
    drawing = _Drawing(analysis, summary_doc, protection, top=top, compare=compare,
                       about=describe(summary_doc, results))
    document, written = _write(analysis, create, results=results, exits=exits, summary=summary,
                               summary_doc=summary_doc, compare=compare, plot=plot, stats=stats,
                               html=html, drawing=drawing, notes=notes, epochs=epochs, top=top,
                               stats_option=n("stats"))
    text = format_report(analysis, results=results, exits=exits, summary_path=summary,
                         summary=summary_doc, written=written)
    return Report(stats=analysis, document=document, text=text, written=written, notes=notes)


class _Drawing:
    """The report's plots, drawn the same way into --plot and into the HTML page."""

    def __init__(self, analysis: ReportStats, summary_doc: Summary | None, protection, *,
                 top: int,
                 compare: bool, about: str):
        self.analysis, self.summary_doc, self.protection = analysis, summary_doc, protection
        self.top, self.compare, self.about = top, compare, about

    def names(self) -> list[str]:
        return ["exits_over_time", "violations_heatmap"] + (["compare_bars"] if self.compare
                                                            else [])

    def draw(self, name: str, path: str) -> str:
        a = self.analysis
        if name == "exits_over_time":
            return plots.plot_exits_over_time(a.epochs, path, about=self.about)
        if name == "violations_heatmap":
            return plots.plot_violations_heatmap(a.per_subpage, path, top=self.top,
                                                 per_page=a.per_page, about=self.about,
                                                 protection=self.protection)
        return plots.plot_compare_bars(self.summary_doc, path)


PLOT_CAPTIONS = {
    "exits_over_time": "VM exits per epoch over the trace, by exit kind.",
    "violations_heatmap": "Protection exits by 128-byte sub-page on the hottest protected "
                          "pages; outlined: write-protected sub-pages, dotted: hooked ones.",
    "compare_bars": "Protection exits and estimated overhead by configuration, with the "
                    "change against the baseline.",
}


def _protection(protect: str | None, summary_doc, *, option: str = "protect"):
    """(the protection the heatmap marks or None, a note for the user or None). Given:
    ``protect``. Else the file the summary names (a replay summary's config.protection, a
    compare document's protection), if it is still the one its provenance hashed."""
    from sppjit.protection import load_protection
    from sppjit.provenance import verify_digest

    from .document import as_summary

    if protect is not None:
        try:
            return load_protection(protect)[0], None
        except InputError as exc:
            raise InputError(f"{option}: {exc}") from None
    if summary_doc is None:
        return None, None
    summary_doc = as_summary(summary_doc)
    if isinstance(summary_doc, CompareDocument):
        if summary_doc.protections:
            return None, None  # several: none of them is the heatmap's
        block = summary_doc.protection
    else:
        block = summary_doc.config.get("protection")
    path = block.get("path") if isinstance(block, dict) else None
    if not isinstance(path, str) or not os.path.isfile(path):
        return None, None
    digests = summary_doc.provenance.get("digests") or {}
    recorded = digests.get("protect") if isinstance(digests, dict) else None
    try:  # the summary's algorithm: SHA-256 in older summaries, BLAKE3 now
        same = isinstance(recorded, str) and verify_digest(path, recorded)
    except (ValueError, OSError):
        same = False
    if not same:
        return None, (f"the heatmap does not mark protected sub-pages: {path} is not the "
                      "file the summary's replay read (give --protect)")
    try:
        return load_protection(path)[0], None
    except InputError:
        return None, None


def _write(analysis: ReportStats, create: dict[str, bool], *, results, exits, summary,
           summary_doc, compare, plot, stats, html, drawing, notes, epochs,
           top, stats_option: str = "stats") -> tuple[dict, list[str]]:
    """Every output file, all or nothing: (report.json's document, the paths written)."""
    from sppjit.io.atomic import Outputs

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
                    done(write_table(table, os.path.join(stats, STATS_FILES[key]),
                                     option=stats_option), stats)
            if plot is not None:
                for name in drawing.names():
                    done(drawing.draw(name, os.path.join(plot, PLOT_FILES[name])), plot)
            if html is not None:
                _write_html(html, analysis, drawing, plot=plot, results=results, exits=exits,
                            summary=summary, summary_doc=summary_doc, notes=notes)
                outputs.add(html)
                written.append(html)
            document = report_document(
                analysis, results=results, exits=exits, summary_path=summary,
                summary=summary_doc, epochs=epochs, top=top,
                outputs=[os.path.basename(p) for p in written])
            for directory, names in in_dir.items():
                path = os.path.join(directory, REPORT_FILE)
                write_json_atomic(path, {**document, "outputs": list(names)})
                done(path, directory)
    except BaseException:
        for directory in reversed(made_dirs):  # only the ones this run created, if empty
            with contextlib.suppress(OSError):
                os.rmdir(directory)
        raise
    return document, written


def _write_html(path: str, analysis: ReportStats, drawing: _Drawing, *, plot, results, exits,
                summary, summary_doc, notes) -> None:
    """The HTML report, atomically; its plots are the PNGs of --plot (drawn once) or drawn
    into a temporary directory."""
    import tempfile

    from sppjit.io.atomic import atomic_path

    from .htmlpage import render_html

    pngs = []
    with tempfile.TemporaryDirectory(prefix="sppjit-report-") as scratch:
        for name in drawing.names():
            png = os.path.join(plot, PLOT_FILES[name]) if plot is not None else None
            if png is None or not os.path.isfile(png):
                png = drawing.draw(name, os.path.join(scratch, PLOT_FILES[name]))
            with open(png, "rb") as handle:
                pngs.append((name, PLOT_CAPTIONS[name], handle.read()))
    page = render_html(analysis, about=drawing.about, results=results, exits=exits,
                       summary_path=summary, summary=summary_doc, plots=pngs, notes=notes)
    with atomic_path(path) as temporary, open(temporary, "w", encoding="utf-8") as handle:
        handle.write(page)


def write_table(table: pa.Table, path: str, option: str = "stats") -> str:
    """A statistics table as Parquet, atomically (InputError names ``option``)."""
    with TableWriter(path, table.schema, option=option) as writer:
        writer.write_batch(table)
    return path


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
