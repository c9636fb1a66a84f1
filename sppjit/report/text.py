"""The report printed by sppjit report: its inputs, the totals and the pages with the most
exits."""

from __future__ import annotations

from sppjit.summary import CompareDocument

from .analysis import KINDS, TEXT_TOP, ReportStats, top_pages
from .document import Summary, as_summary, find_seed


def format_report(stats: ReportStats, *, results: str | None, exits: str | None,
                  summary_path: str | None, summary: Summary | None,
                  written: list[str]) -> str:
    """The printed report: inputs, totals and the pages with the most exits."""
    summary = None if summary is None else as_summary(summary)
    t = stats.totals
    counts, ex = t["counts"], t["exits"]
    if results is None:
        rows = [("results", f"none: from the exit log and the summary ({stats.rows:,} rows)")]
    else:
        fmt = stats.inputs["results"]["format"]
        rows = [("results", f"{results} ({fmt}, {stats.rows:,} rows)")]
    if exits is not None:
        hooks = ", with hook relevance" if stats.hooks else ""
        rows.append(("exits", f"{exits} ({ex['total']:,} exits{hooks})"))
    if isinstance(summary, CompareDocument):
        names = ", ".join(c.name for c in summary.configs)
        rows.append(("summary", f"{summary_path} (compare: {names})"))
    elif summary is not None:
        cfg = summary.config
        bits = [f"{k} {cfg[k]}" for k in ("granularity", "profile", "subpage_check")
                if k in cfg]
        seed = find_seed(summary.to_dict())
        if seed is not None:
            bits.append(f"seed {seed}")
        rows.append(("summary", f"{summary_path}" + (f" ({', '.join(bits)})" if bits else "")))
    rows.append(("accesses", _pairs([("total", counts["accesses"]), ("reads", counts["reads"]),
                                     ("writes", counts["writes"]),
                                     ("fetches", counts["fetches"])])))
    exit_items = [("total", ex["total"])]
    if stats.exit_log:
        exit_items += [(k, ex[k]) for k in KINDS if ex[k]]
    text = _pairs(exit_items)
    if not stats.exit_log:
        text += "  (kinds: give --exits)"
    rows.append(("VM exits", text))
    per_k = t["protection_exits_per_1000_writes"]
    rows.append(("protection", f"{t['violations']:,} exits"
                 + (f" ({per_k:,.1f} per 1,000 writes)" if per_k is not None else "")))
    if "hooks" in t:
        rows.append(("hooks", _pairs([("relevant", t["hooks"]["relevant"]),
                                      ("irrelevant", t["hooks"]["irrelevant"])])))
    rows.append(("pages", _pairs([("touched", t["pages"]["touched"]),
                                  ("with exits", t["pages"]["with_exits"]),
                                  ("with violations", t["pages"]["with_violations"])])))
    top = top_pages(stats.per_page, TEXT_TOP)
    width = max(len(label) for label, _ in rows + [("wrote", "")])
    out = "".join(f"{label:<{width}}  {value}\n" for label, value in rows)
    if top:
        out += f"top pages by exits ({len(top)} of {t['pages']['with_exits']:,}):\n"
        header = ("gfn", "exits", "violations", "writes", "first_row", "last_row")
        table = [header] + [(f"{p['gfn']:#x}", f"{p['exits']:,}", f"{p['violations']:,}",
                             _n(p['writes']), f"{p['first_row']:,}", f"{p['last_row']:,}")
                            for p in top]
        widths = [max(len(r[i]) for r in table) for i in range(len(header))]
        for r in table:
            out += "  " + r[0].ljust(widths[0]) + "".join(
                "  " + c.rjust(w) for c, w in zip(r[1:], widths[1:])) + "\n"
    if written:
        out += f"{'wrote':<{width}}  {', '.join(written)}\n"
    return out


def _pairs(items) -> str:
    return "  ".join(f"{name} {_n(value)}" for name, value in items)


def _n(value) -> str:
    """A count, or "-" where the inputs do not tell it (a report without results)."""
    return "-" if value is None else f"{value:,}"
