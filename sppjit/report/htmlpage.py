"""The HTML report (``sppjit report --html FILE``): one self-contained file that a browser
opens from disk, without a server or a network: the summary, the compare table, the plots as
base64 PNG data URIs, the hottest pages and the per-hook tables. No script, no external style
sheet, font or image: everything is in the file.
"""

from __future__ import annotations

import base64
import html
import os

from sppjit import __version__
from sppjit.summary import CompareDocument, ReplaySummary

from .analysis import KINDS, TEXT_TOP, ReportStats, top_pages
from .document import Summary, as_summary

# Rows of a per-hook table at most (the hooks with the most exits first); the whole table is
# in --stats and in compare --hooks-out.
HOOK_ROWS = 200

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1280px; padding: 0 1em; color: #1a202c; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #cbd5e0; }
p.about { color: #4a5568; margin-top: 0; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.92em; }
th, td { border: 1px solid #e2e8f0; padding: 0.25em 0.6em; }
th { background: #edf2f7; text-align: left; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #e2e8f0; }
figcaption { color: #4a5568; font-size: 0.9em; }
ul.notes li { margin-bottom: 0.4em; }
footer { margin-top: 3em; color: #718096; font-size: 0.85em; }
"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _cell(value) -> str:
    text = "-" if value is None else (f"{value:,}" if isinstance(value, int) else str(value))
    numeric = isinstance(value, (int, float)) or text.lstrip("+-").replace(",", "").replace(
        ".", "").replace("%", "").split(" ")[0].isdigit()
    return f'<td class="n">{_e(text)}</td>' if numeric else f"<td>{_e(text)}</td>"


def _table(header: list[str], rows: list[list], *, table_id: str) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(_cell(v) if k else f"<th>{_e(v)}</th>"
                                    for k, v in enumerate(row)) + "</tr>" for row in rows)
    return f'<table id="{_e(table_id)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _summary_rows(stats: ReportStats, *, results: str, exits: str | None,
                  summary_path: str | None) -> list[list]:
    t = stats.totals
    counts, ex = t["counts"], t["exits"]
    rows = [["results", f"{results} ({stats.inputs['results']['format']}, {stats.rows:,} rows)"]]
    if exits is not None:
        rows.append(["exit log", exits])
    if summary_path is not None:
        rows.append(["summary", summary_path])
    rows += [["accesses", counts["accesses"]], ["reads", counts["reads"]],
             ["writes", counts["writes"]], ["fetches", counts["fetches"]],
             ["VM exits", ex["total"]]]
    if stats.exit_log:
        rows += [[f"  {k}", ex[k]] for k in KINDS]
    per_k = t["protection_exits_per_1000_writes"]
    rows.append(["protection exits", t["violations"]])
    rows.append(["  per 1,000 writes", "-" if per_k is None else f"{per_k:,.1f}"])
    if "hooks" in t:
        rows += [["relevant exits", t["hooks"]["relevant"]],
                 ["irrelevant exits", t["hooks"]["irrelevant"]]]
    rows += [["pages touched", t["pages"]["touched"]],
             ["pages with exits", t["pages"]["with_exits"]],
             ["pages with protection exits", t["pages"]["with_violations"]]]
    return rows


def _hook_tables(summary: Summary | None) -> list[tuple[str, list[str], list[list]]]:
    """(caption, header, rows) of the per-hook tables a summary holds: a replay's hooks, or
    a compare document's relevant / irrelevant per configuration (for each protection)."""
    if summary is None:
        return []
    if isinstance(summary, ReplaySummary):
        per_hook = (summary.hooks or {}).get("per_hook")
        if not per_hook:
            return []
        rows = sorted(per_hook, key=lambda h: -(h.get("relevant", 0) + h.get("irrelevant", 0)))
        return [("hooks of this replay" + _shown(len(rows)), ["hook", "relevant", "irrelevant"],
                 [[h.get("name"), h.get("relevant"), h.get("irrelevant")]
                  for h in rows[:HOOK_ROWS]])]
    groups: dict = {}
    for c in summary.configs:
        per_hook = (c.summary.hooks or {}).get("per_hook")
        if not per_hook:
            continue
        protection = (c.summary.config.get("protection") or {}).get("path")
        groups.setdefault(protection, []).append((c.name, per_hook))
    tables = []
    for protection, members in groups.items():
        first = members[0][1]
        header = ["hook"] + [f"{name} {key}" for name, _ in members
                             for key in ("relevant", "irrelevant")]
        rows = []
        for i, hook in enumerate(first):
            row = [hook.get("name")]
            for _, per_hook in members:
                entry = per_hook[i] if i < len(per_hook) else {}
                row += [entry.get("relevant"), entry.get("irrelevant")]
            rows.append(row)
        rows.sort(key=lambda r: -sum(v for v in r[1:] if isinstance(v, int)))
        caption = "hooks" + (f" of {protection}" if protection else "") + _shown(len(rows))
        tables.append((caption, header, rows[:HOOK_ROWS]))
    return tables


def render_html(stats: ReportStats, *, about: str, results: str, exits: str | None,
                summary_path: str | None, summary: Summary | None,
                plots: list[tuple[str, str, bytes]], notes: list[str]) -> str:
    """The report page. ``plots``: (id, caption, PNG bytes), inlined as data URIs."""
    from sppjit.summary import comparison_rows, savings_lines

    summary = None if summary is None else as_summary(summary)

    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>sppjit report: {_e(about)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>sppjit report</h1>",
        f'<p class="about">{_e(about)}</p>',
        "<h2>Summary</h2>",
        _table(["", "value"], _summary_rows(stats, results=results, exits=exits,
                                            summary_path=summary_path), table_id="summary"),
    ]
    if notes:
        parts.append('<ul class="notes">' + "".join(f"<li>note: {_e(n)}</li>" for n in notes)
                     + "</ul>")
    if isinstance(summary, CompareDocument):
        names, rows = comparison_rows(summary)
        parts += ["<h2>Comparison</h2>",
                  _table([""] + names, [[label.strip() if not label.startswith("  ")
                                         else "\u2003" + label.strip(), *cells]
                                        for label, cells in rows], table_id="compare")]
        savings = savings_lines(summary.to_dict())
        if savings:
            parts.append('<ul class="notes">' + "".join(f"<li>{_e(s)}</li>" for s in savings)
                         + "</ul>")
        if summary.notes:
            parts.append("<h3>Why v4 and v12 differ here</h3><ul class=\"notes\">"
                         + "".join(f"<li>{_e(n['text'])}</li>" for n in summary.notes)
                         + "</ul>")
    if plots:
        parts.append("<h2>Plots</h2>")
        for plot_id, caption, png in plots:
            data = base64.b64encode(png).decode("ascii")
            parts.append(f'<figure><img id="{_e(plot_id)}" alt="{_e(caption)}" width="1200" '
                         f'height="800" src="data:image/png;base64,{data}">'
                         f"<figcaption>{_e(caption)}</figcaption></figure>")
    top = top_pages(stats.per_page, TEXT_TOP)
    if top:
        parts += [f"<h2>Pages with the most exits ({len(top)} of "
                  f"{stats.totals['pages']['with_exits']:,})</h2>",
                  _table(["gfn", "exits", "protection exits", "writes", "first row", "last row"],
                         [[f"{p['gfn']:#x}", p["exits"], p["violations"], p["writes"],
                           p["first_row"], p["last_row"]] for p in top], table_id="top-pages")]
    for k, (caption, header, rows) in enumerate(_hook_tables(summary)):
        parts += [f"<h2>Per hook: {_e(caption)}</h2>",
                  _table(header, rows, table_id=f"hooks-{k}")]
    parts.append(f"<footer>sppjit {_e(__version__)}: "
                 f"{_e(os.path.basename(str(results)))}</footer></body></html>")
    return "\n".join(parts) + "\n"


def _shown(count: int) -> str:
    return (f" (the {HOOK_ROWS:,} with the most exits, of {count:,})" if count > HOOK_ROWS
            else "")
