"""Plots of a report: exits over the trace, a page x sub-page heatmap of protection exits,
and exits by configuration of a compare document. 1200 x 800 PNG, drawn on matplotlib's Agg
canvas without pyplot (no global state), written atomically.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sppjit import bits as B
from sppjit.errors import InputError
from sppjit.summary import CompareDocument

from .analysis import KINDS, group_keys, top_pages
from .document import as_summary, compare_figures, describe, is_compare, read_summary
from .options import DEFAULT_TOP

# Figures: 12 x 8 inches at 100 dpi = 1200 x 800 pixels, saved without tight cropping.
FIG_SIZE = (12.0, 8.0)
FIG_DPI = 100
MATPLOTLIB_MISSING = "sppjit report --plot and --html need matplotlib"
# One colour per exit kind, the same in every plot.
KIND_COLORS = {
    "ept_fault": "#4c72b0",
    "mmio": "#8c8c8c",
    "spp_miss": "#55a868",
    "spp_misconfig": "#8172b2",
    "spp_violation": "#c44e52",
    "write_protect": "#dd8452",
    "wp_fault": "#937860",
}


def install_hint() -> str:
    """How to add the plot extra, for the way sppjit was installed: from a checkout (the
    package sits beside the project's pyproject.toml: an editable install) or from a
    package index."""
    import sppjit

    root = os.path.dirname(os.path.dirname(os.path.abspath(sppjit.__file__)))
    if os.path.isfile(os.path.join(root, "pyproject.toml")):
        return f"pip install -e '{root}[plot]'" if root != os.getcwd() else "pip install -e '.[plot]'"
    return "pip install 'sppjit[plot]'"


def require_matplotlib():
    """matplotlib, or InputError saying how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise InputError(f"{MATPLOTLIB_MISSING}: {install_hint()}") from None
    return matplotlib


_RC = {
    "font.size": 12,
    "axes.titlesize": 16,
    "axes.labelsize": 13,
    "xtick.labelsize": 11,
    "ytick.labelsize": 11,
    "legend.fontsize": 11,
    "legend.title_fontsize": 12,
    "axes.spines.top": False,
    "axes.spines.right": False,
}


def _new_figure():
    """A 1200 x 800 figure on the Agg canvas (no pyplot: no global state, thread-safe)."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIG_SIZE, dpi=FIG_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | os.PathLike) -> str:
    """Write the PNG atomically; returns the path."""
    from sppjit.io.atomic import atomic_path

    path = os.fspath(path)
    with atomic_path(path) as temporary:
        fig.savefig(temporary, format="png", dpi=FIG_DPI)
    return path


def _thousands(value, _pos=None) -> str:
    return f"{value:,.0f}"


def _empty_note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=16,
            color="#555555", bbox={"boxstyle": "round,pad=0.6", "fc": "#f4f4f4", "ec": "#bbbbbb"})


def _title(ax, title: str, about: str | None) -> None:
    """The plot's title, with the trace and configuration it shows on a line of its own."""
    ax.set_title(title if not about else f"{title}\n{about}", loc="left")


def plot_exits_over_time(epochs: pa.Table, path: str | os.PathLike, *,
                         title: str | None = None, about: str | None = None) -> str:
    """Exits per epoch over the trace, stacked by exit kind (one bar per epoch). ``about``
    names the trace and configuration (sppjit.report.document.describe), under the title."""
    import matplotlib as mpl
    from matplotlib.ticker import FuncFormatter

    require_matplotlib()
    with mpl.rc_context(_RC):
        fig = _new_figure()
        ax = fig.add_subplot()
        start = epochs.column("first_row").to_numpy()
        width = epochs.column("rows").to_numpy()
        total = epochs.column("exits").to_numpy()
        known = epochs.column(KINDS[0]).null_count == 0
        bottom = np.zeros(epochs.num_rows, dtype=np.float64)
        series = ([(name, epochs.column(name).to_numpy()) for name in KINDS] if known
                  else [("all kinds (no exit log)", total)])
        for name, values in series:
            if not values.any():
                continue
            ax.bar(start, values, width=width, bottom=bottom, align="edge", linewidth=0,
                   color=KIND_COLORS.get(name, "#777777"), label=name)
            bottom += values
        rows = int(start[-1] + width[-1]) if epochs.num_rows else 0
        ax.set_xlim(0, max(rows, 1))
        ax.set_xlabel("trace row (access number)")
        ax.set_ylabel(f"VM exits per epoch (~{rows / max(epochs.num_rows, 1):,.0f} accesses)")
        ax.xaxis.set_major_formatter(FuncFormatter(_thousands))
        ax.yaxis.set_major_formatter(FuncFormatter(_thousands))
        ax.grid(axis="y", alpha=0.3)
        _title(ax, title or f"VM exits over the trace: {int(total.sum()):,} exits, "
                            f"{epochs.num_rows:,} epochs over {rows:,} accesses", about)
        if total.any():
            ax.legend(title="exit kind", loc="upper right", framealpha=0.9)
        else:
            ax.set_ylim(0, 1)
            _empty_note(ax, "no VM exits in this trace")
        return _save(fig, path)


def heatmap_matrix(per_subpage: pa.Table, *, top: int = DEFAULT_TOP,
                   per_page: pa.Table | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(gfns, totals, matrix[gfn, subpage]) of the ``top`` pages with the most protection exits.

    Pages are ranked by per_page's ``violations`` (exits) when given, else by the sum of their
    sub-pages' violations; ties go to the lower gfn. Pages without violations are left out.
    """
    if per_page is not None:
        ranked = top_pages(per_page, top, by="violations")
        gfns = np.array([p["gfn"] for p in ranked], dtype=np.uint64)
        totals = np.array([p["violations"] for p in ranked], dtype=np.int64)
    else:
        keys, inverse, _, _ = group_keys(per_subpage.column("gfn").to_numpy())
        vals = np.bincount(inverse, weights=per_subpage.column("violations").to_numpy(),
                           minlength=keys.shape[0]).astype(np.int64)
        keep = vals > 0
        keys, vals = keys[keep], vals[keep]
        order = np.lexsort((keys, -vals))[:top]
        gfns, totals = keys[order], vals[order]
    matrix = np.zeros((gfns.shape[0], B.SUBPAGES_PER_PAGE), dtype=np.int64)
    if gfns.shape[0]:
        sel = per_subpage.filter(pc.is_in(per_subpage.column("gfn"), value_set=pa.array(gfns)))
        g = sel.column("gfn").to_numpy()
        row = np.searchsorted(np.sort(gfns), g)
        rank = np.argsort(gfns)[row]  # position in the ranking
        np.add.at(matrix, (rank, sel.column("subpage").to_numpy().astype(np.int64)),
                  sel.column("violations").to_numpy())
    return gfns, totals, matrix


def subpage_marks(gfns: np.ndarray, protection) -> tuple[np.ndarray, np.ndarray]:
    """(protected[gfn, subpage], hooked[gfn, subpage]) of the pages ``gfns``: sub-pages
    whose write permission the protection's access map clears, and sub-pages that hold bytes
    of a hook (byte-range protection only; all False otherwise). ``protection`` is an
    AccessMaps or ByteRanges (None: nothing marked)."""
    from sppjit.io.protect import ByteRanges
    from sppjit.protection import protection_maps

    n = gfns.shape[0]
    protected = np.zeros((n, B.SUBPAGES_PER_PAGE), dtype=bool)
    hooked = np.zeros((n, B.SUBPAGES_PER_PAGE), dtype=bool)
    if protection is None or n == 0:
        return protected, hooked
    order = np.argsort(gfns)
    sorted_gfns = gfns[order]

    def rows_of(page: np.ndarray):
        at = np.searchsorted(sorted_gfns, page)
        ok = (at < n) & (sorted_gfns[np.minimum(at, n - 1)] == page)
        return order[np.minimum(at, n - 1)], ok

    maps = protection_maps(protection)
    row, ok = rows_of(np.asarray(maps.gfn, dtype=np.uint64))
    access = np.asarray(maps.access, dtype=np.uint64)[ok]
    bits = (access[:, None] >> np.arange(B.SUBPAGES_PER_PAGE, dtype=np.uint64)) & np.uint64(1)
    protected[row[ok]] |= bits == 0
    if isinstance(protection, ByteRanges) and len(protection.gpa):
        start = np.asarray(protection.gpa, dtype=np.uint64)
        last = start + np.asarray(protection.length, dtype=np.uint64) - np.uint64(1)
        row, ok = rows_of(start >> np.uint64(B.PAGE_SHIFT))
        first_sub = ((start & np.uint64(B.PAGE_SIZE - 1)) >> np.uint64(B.SUBPAGE_SHIFT))[ok]
        last_sub = ((last & np.uint64(B.PAGE_SIZE - 1)) >> np.uint64(B.SUBPAGE_SHIFT))[ok]
        sub = np.arange(B.SUBPAGES_PER_PAGE, dtype=np.uint64)
        inside = (sub[None, :] >= first_sub[:, None]) & (sub[None, :] <= last_sub[:, None])
        np.logical_or.at(hooked, row[ok], inside)
    return protected, hooked


def _relevance_matrices(per_subpage: pa.Table, gfns: np.ndarray):
    """(relevant, irrelevant) matrices of the ranked pages, or None without hook
    relevance in the statistics."""
    if "relevant" not in per_subpage.schema.names or gfns.shape[0] == 0:
        return None
    out = []
    order = np.argsort(gfns)
    for column in ("relevant", "irrelevant"):
        matrix = np.zeros((gfns.shape[0], B.SUBPAGES_PER_PAGE), dtype=np.int64)
        sel = per_subpage.filter(pc.is_in(per_subpage.column("gfn"), value_set=pa.array(gfns)))
        rank = order[np.searchsorted(gfns[order], sel.column("gfn").to_numpy())]
        np.add.at(matrix, (rank, sel.column("subpage").to_numpy().astype(np.int64)),
                  sel.column(column).to_numpy())
        out.append(matrix)
    return out


def plot_violations_heatmap(per_subpage: pa.Table, path: str | os.PathLike, *,
                            top: int = DEFAULT_TOP, per_page: pa.Table | None = None,
                            title: str | None = None, about: str | None = None,
                            protection=None) -> str:
    """Page x sub-page heatmap of protection exits for the ``top`` hottest protected pages:
    one row per gfn (hex, with its exit count), one column per 128-byte sub-page.

    ``protection`` (AccessMaps or ByteRanges) outlines the write-protected sub-pages and
    hatches the hooked ones (those holding a hook's bytes). When the statistics carry hook
    relevance (an exit log of byte-range protection), two panels side by side, on one colour
    scale: the relevant exits (the write touched a hook's bytes) and the irrelevant ones.
    ``about`` names the trace and configuration, under the title."""
    import matplotlib as mpl
    from matplotlib.colors import LogNorm, Normalize
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch, Rectangle
    from matplotlib.ticker import FuncFormatter

    require_matplotlib()
    gfns, totals, matrix = heatmap_matrix(per_subpage, top=top, per_page=per_page)
    relevance = _relevance_matrices(per_subpage, gfns)
    heading = title or (f"Protection exits by sub-page: the {gfns.shape[0]} hottest protected "
                        f"page{'s' if gfns.shape[0] != 1 else ''}" if gfns.shape[0]
                        else "Protection exits by sub-page")
    with mpl.rc_context(_RC):
        fig = _new_figure()
        panels = ([("relevant: the write touched a hook's bytes", relevance[0]),
                   ("irrelevant: a protected sub-page, off the hook's bytes", relevance[1])]
                  if relevance is not None else [(None, matrix)])
        axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
        if gfns.shape[0] == 0:
            ax = axes[0]
            ax.set_xlabel("sub-page (128 bytes each: byte offset = 128 x index)")
            ax.set_xlim(-0.5, B.SUBPAGES_PER_PAGE - 0.5)
            ax.set_xticks(range(0, B.SUBPAGES_PER_PAGE, 2))
            ax.set_yticks([])
            _empty_note(ax, "no protection exits (spp_violation, write_protect) in this replay")
            _title(ax, heading, about)
            return _save(fig, path)
        cmap = mpl.colormaps["YlOrRd"].with_extremes(bad="#f2f2f2")
        vmax = max(int(m.max()) for _, m in panels) or 1
        positive = np.concatenate([m[m > 0] for _, m in panels])
        smallest = int(positive.min()) if positive.size else 1
        log = vmax >= 1000 * max(smallest, 1)  # else the few hot cells hide the rest
        norm = LogNorm(vmin=1, vmax=vmax) if log else Normalize(vmin=0, vmax=vmax)
        protected, hooked = subpage_marks(gfns, protection)
        image = None
        for k, (ax, (label, values)) in enumerate(zip(axes, panels)):
            image = ax.imshow(np.ma.masked_equal(values, 0), cmap=cmap, norm=norm,
                              aspect="auto", interpolation="nearest")
            ax.set_xticks(range(0, B.SUBPAGES_PER_PAGE, 2 if len(panels) > 1 else 1))
            ax.tick_params(axis="x", labelsize=9 if len(panels) > 1 else 10)
            ax.set_xlabel("sub-page (128 bytes each)" if len(panels) > 1
                          else "sub-page (128 bytes each: byte offset = 128 x index)")
            # cell borders, while the cells are large enough to show them
            ax.set_xticks(np.arange(-0.5, B.SUBPAGES_PER_PAGE, 1), minor=True)
            if gfns.shape[0] <= 64:
                ax.set_yticks(np.arange(-0.5, gfns.shape[0], 1), minor=True)
            ax.grid(which="minor", color="white", linewidth=0.8)
            ax.tick_params(which="minor", length=0)
            for spine in ax.spines.values():
                spine.set_visible(False)
            for r, c in zip(*np.nonzero(protected)):
                ax.add_patch(Rectangle((c - 0.46, r - 0.46), 0.92, 0.92, fill=False,
                                       edgecolor="#1a365d", linewidth=1.4))
            rows_hooked, cols_hooked = np.nonzero(hooked)
            if rows_hooked.size:  # a dot in the corner: the cell's colour stays readable
                ax.scatter(cols_hooked - 0.24, rows_hooked - 0.2, s=9, marker="o",
                           color="#1a365d", linewidths=0, zorder=3)
            if label is not None:
                ax.set_title(f"{label}\n{int(values.sum()):,} exits on these pages",
                             fontsize=12, loc="left")
            if k == 0:
                step = max(1, -(-gfns.shape[0] // 48))  # at most ~48 labels
                ticks = np.arange(0, gfns.shape[0], step)
                ax.set_yticks(ticks)
                ax.set_yticklabels([f"{int(gfns[i]):#x}  ({int(totals[i]):,})" for i in ticks],
                                   fontsize=10 if gfns.shape[0] <= 32 else 8,
                                   family="monospace")
                ax.set_ylabel("gfn (protection exits on the page)")
        bar = fig.colorbar(image, ax=list(axes), fraction=0.04, pad=0.02,
                           format=FuncFormatter(_thousands))
        bar.set_label("protection exits whose faulting bytes touch the sub-page")
        handles = []
        if protected.any():
            handles.append(Patch(fill=False, edgecolor="#1a365d", linewidth=1.4,
                                 label="write-protected sub-page"))
        if hooked.any():
            handles.append(Line2D([], [], marker="o", linestyle="", color="#1a365d",
                                  markersize=4, label="hooked sub-page (holds a hook's bytes)"))
        if handles:
            fig.legend(handles=handles, loc="outside lower center", ncols=len(handles),
                       frameon=False)
        fig.suptitle(heading if not about else f"{heading}\n{about}", x=0.01, ha="left",
                     fontsize=16)
        return _save(fig, path)


def plot_compare_bars(document: CompareDocument | dict | str | os.PathLike,
                      path: str | os.PathLike, *,
                      title: str | None = None, about: str | None = None) -> str:
    """A compare document's configurations side by side, on linear scales: protection exits
    (relevant and irrelevant stacked, with hooks) on the left, the estimated guest overhead
    on the right, each bar labelled with its value and its change against the baseline."""
    import matplotlib as mpl
    from matplotlib.ticker import FuncFormatter

    from sppjit.summary import percent_change, readable_seconds

    require_matplotlib()
    doc = read_summary(os.fspath(document)) if isinstance(document, (str, os.PathLike)) else document
    if not is_compare(doc):
        raise InputError("summary: not a compare document (no \"configs\"): compare bars need "
                         "the output of sppjit compare --json")
    doc = as_summary(doc)
    figures = compare_figures(doc)
    names = [f["name"] for f in figures]
    x = np.arange(len(figures), dtype=np.float64)
    hooks = all(f["relevant"] is not None for f in figures)
    overheads = [f["overhead"] for f in figures]
    with mpl.rc_context(_RC):
        fig = _new_figure()
        left, right = fig.subplots(1, 2)
        small = len(figures) > 4
        crowded = len(figures) > 6  # labels on their side, so that they do not overlap
        headroom = 1.45 if crowded else 1.22

        def labels(ax, bars, values, changes, fmt):
            sep = "  " if crowded else "\n"
            texts = [fmt(v) + (f"{sep}baseline" if f["is_baseline"] else "" if c is None
                               else f"{sep}{percent_change(c)}")
                     for v, c, f in zip(values, changes, figures)]
            ax.bar_label(bars, labels=texts, padding=3, fontsize=9 if small else 11,
                         rotation=90 if crowded else 0)

        exits = np.array([f["protection_exits"] for f in figures], dtype=np.float64)
        if hooks:
            rel = np.array([f["relevant"] for f in figures], dtype=np.float64)
            irr = np.array([f["irrelevant"] for f in figures], dtype=np.float64)
            left.bar(x, rel, color=KIND_COLORS["spp_violation"], label="relevant")
            bars = left.bar(x, irr, bottom=rel, color="#f4a582", label="irrelevant")
            left.legend(title="protection exits", loc="upper right", framealpha=0.9)
        else:
            bars = left.bar(x, exits, color=KIND_COLORS["spp_violation"])
        labels(left, bars, exits, [f["change_exits"] for f in figures], lambda v: f"{v:,.0f}")
        left.set_ylabel("protection exits (spp_violation + write_protect)")
        left.set_ylim(0, max(exits.max(), 1) * headroom)
        left.yaxis.set_major_formatter(FuncFormatter(_thousands))
        left.set_title("Protection exits", loc="left", fontsize=13)

        if all(v is not None for v in overheads):
            values = np.array(overheads, dtype=np.float64)
            scale, unit = ((1.0, "s") if values.max() >= 1 else
                           (1e3, "ms") if values.max() >= 1e-3 else (1e6, "us"))
            bars = right.bar(x, values * scale, color="#4c72b0")
            labels(right, bars, values, [f["change_overhead"] for f in figures],
                   readable_seconds)
            policy = (doc.write_through or {}).get("policy", "none")
            right.set_ylabel(f"estimated guest overhead ({unit})"
                             + ("" if policy == "none" else f", writes let through by {policy}"))
            right.set_ylim(0, max(values.max() * scale, 1e-9) * headroom)
        else:
            right.set_ylim(0, 1)
            _empty_note(right, "no overhead figures in this document")
        right.set_title("Estimated overhead (exit-cost model)", loc="left", fontsize=13)
        for ax in (left, right):
            ax.set_xticks(x)
            ax.set_xticklabels(names, rotation=30 if small else 0,
                               ha="right" if small else "center")
            ax.set_xlabel("configuration")
            ax.grid(axis="y", alpha=0.3)
        if about is None:
            about = describe(doc)
        base = doc.baseline
        several = len({f["name"] for f in figures if f["is_baseline"]}) > 1 or any(
            c.baseline for c in doc.configs)
        heading = title or ("Page-granular protection against SPP" + (
            " (changes against the page configuration of each protection)" if several
            else f" (changes against {base})" if base else ""))
        fig.suptitle(f"{heading}\n{about}", x=0.01, ha="left", fontsize=16)
        return _save(fig, path)
