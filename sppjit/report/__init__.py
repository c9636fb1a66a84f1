"""Reports on a replay's outputs: per-page and per-sub-page statistics, exits per epoch, plots.

The results (``sppjit replay --out``) and the exit log (``--exits``) are read together, batch by
batch and with only the columns needed, so memory grows with the number of distinct pages and
sub-pages, never with the trace: each batch is grouped with numpy and merged into running
tables, or, for large results, attributed row by row by a compiled kernel (same figures).

Attribution rules (the same in the tables, the text report and the plots):

- An access counts on every page it touches (a write crossing a page boundary counts on both
  pages) and, for ``writes`` per sub-page, on every 128-byte sub-page its bytes touch.
- An exit counts on the page of its logged gpa (the start of the page piece that faulted). A
  protection exit (``spp_violation`` or ``write_protect``) counts, per sub-page, on every
  sub-page its faulting bytes touch: the piece from the logged gpa to the end of the access or
  of the page, whichever comes first.
- Without an exit log the exit kinds are unknown (null columns); ``exits`` then counts the
  results' ``exits`` column on the page of each access's first byte, and ``violations`` counts
  the accesses whose outcome is SPP_VIOLATION or WRITE_PROTECT_VIOLATION on the piece of their
  first page, as the exit log would for accesses that do not cross a page.
- Epochs split the trace rows into ``epochs`` runs of equal length (the first rows of the
  trace in epoch 0): row r is in epoch r * epochs // rows.

One module per concern: ``analysis`` (the statistics), ``document`` (report.json and the summary
it reads), ``plots``, ``text`` (the printed report), ``htmlpage`` (the HTML report), ``writing``
(``write_report``, the whole command as one call) and ``options`` (defaults and file names,
numpy-free). The names below load their module on first use, so that importing the package
costs nothing.

Python API::

    report = write_report(results, exits, summary=s, stats="dir", plot="dir",
                          html="report.html", protect="hooks.parquet")  # all or nothing
    per_page, per_subpage = page_stats(results, exits)        # two pyarrow Tables
    stats = analyze(results, exits, epochs=100)                 # + epochs, totals
    plot_exits_over_time(stats.epochs, "exits.png")
    plot_violations_heatmap(stats.per_subpage, "heat.png", per_page=stats.per_page, top=32,
                            protection=maps_or_ranges, about="t.parquet: SPP v4")
    plot_compare_bars(compare_document, "bars.png")
    summary = read_summary("s.json")  # a ReplaySummary or CompareDocument (sppjit.summary)

``summary`` arguments take the typed document or its JSON as a dict (read with ``as_summary``:
an InputError names a key the contract's shape lacks). write_report's errors name its
parameters (``epochs``, ``plot``); ``names={"epochs": "--epochs", ...}`` renames them, as
``sppjit report`` does.
``results`` and ``exits`` are paths (Parquet, Arrow IPC file or stream), pyarrow Tables or
RecordBatches, or a ``ReplayResult`` (whose ``exits`` is used when ``exits`` is not given).
"""

from __future__ import annotations

import importlib

# name -> the module that defines it
_HOMES = {
    "analysis": ("ReportStats", "analyze", "analyze_exit_log", "page_stats", "top_pages",
                 "KINDS", "PROTECTION_KINDS",
                 "TEXT_TOP", "BATCH_ROWS", "COMPACT_ROWS"),
    "document": ("read_summary", "as_summary", "check_summary", "is_compare", "compare_configs",
                 "compare_figures", "describe", "find_seed", "versions", "report_document",
                 "REPORT_SCHEMA_VERSION"),
    "plots": ("plot_exits_over_time", "plot_violations_heatmap", "plot_compare_bars",
              "heatmap_matrix", "subpage_marks", "require_matplotlib", "install_hint",
              "KIND_COLORS", "FIG_SIZE", "FIG_DPI", "MATPLOTLIB_MISSING"),
    "htmlpage": ("render_html",),
    "text": ("format_report",),
    "writing": ("write_report", "Report", "write_table"),
    "options": ("DEFAULT_EPOCHS", "DEFAULT_TOP", "MAX_EPOCHS", "MAX_TOP", "PLOT_FILES",
                "REPORT_FILE", "STATS_FILES"),
}
_HOME = {name: module for module, names in _HOMES.items() for name in names}
__all__ = list(_HOME)


def __getattr__(name: str):
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module 'sppjit.report' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOME))
