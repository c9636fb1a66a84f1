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

from .analysis import KINDS, group_keys, top_pages
from .document import compare_configs, is_compare, read_summary
from .options import DEFAULT_TOP

# Figures: 12 x 8 inches at 100 dpi = 1200 x 800 pixels, saved without tight cropping.
FIG_SIZE = (12.0, 8.0)
FIG_DPI = 100
MATPLOTLIB_MISSING = "sppjit report --plot needs matplotlib: pip install 'sppjit[plot]'"
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


def require_matplotlib():
    """matplotlib, or InputError saying how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise InputError(MATPLOTLIB_MISSING) from None
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


def plot_exits_over_time(epochs: pa.Table, path: str | os.PathLike, *,
                         title: str | None = None) -> str:
    """Exits per epoch over the trace, stacked by exit kind (one bar per epoch)."""
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
        ax.set_title(title or f"VM exits over the trace: {int(total.sum()):,} exits, "
                              f"{epochs.num_rows:,} epochs over {rows:,} accesses")
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


def plot_violations_heatmap(per_subpage: pa.Table, path: str | os.PathLike, *,
                            top: int = DEFAULT_TOP, per_page: pa.Table | None = None,
                            title: str | None = None) -> str:
    """Page x sub-page heatmap of protection exits for the ``top`` hottest protected pages:
    one row per gfn (hex, with its exit count), one column per 128-byte sub-page."""
    import matplotlib as mpl
    from matplotlib.colors import LogNorm, Normalize
    from matplotlib.ticker import FuncFormatter

    require_matplotlib()
    gfns, totals, matrix = heatmap_matrix(per_subpage, top=top, per_page=per_page)
    with mpl.rc_context(_RC):
        fig = _new_figure()
        ax = fig.add_subplot()
        ax.set_xlabel("sub-page (128 bytes each: byte offset = 128 x index)")
        ax.set_ylabel("gfn (protection exits on the page)")
        ax.set_xticks(range(B.SUBPAGES_PER_PAGE))
        ax.tick_params(axis="x", labelsize=10)
        if gfns.shape[0] == 0:
            ax.set_xlim(-0.5, B.SUBPAGES_PER_PAGE - 0.5)
            ax.set_yticks([])
            _empty_note(ax, "no protection exits (spp_violation, write_protect) in this replay")
            ax.set_title(title or "Protection exits by sub-page")
            return _save(fig, path)
        cmap = mpl.colormaps["YlOrRd"].with_extremes(bad="#eeeeee")
        vmax = int(matrix.max())
        positive = matrix[matrix > 0]
        log = vmax >= 1000 * max(int(positive.min()), 1)  # else the few hot cells hide the rest
        norm = LogNorm(vmin=1, vmax=vmax) if log else Normalize(vmin=0, vmax=vmax)
        shown = np.ma.masked_equal(matrix, 0)
        image = ax.imshow(shown, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
        # cell borders, while the cells are large enough to show them
        ax.set_xticks(np.arange(-0.5, B.SUBPAGES_PER_PAGE, 1), minor=True)
        if gfns.shape[0] <= 64:
            ax.set_yticks(np.arange(-0.5, gfns.shape[0], 1), minor=True)
        ax.grid(which="minor", color="white", linewidth=0.8)
        ax.tick_params(which="minor", length=0)
        for spine in ax.spines.values():
            spine.set_visible(False)
        step = max(1, -(-gfns.shape[0] // 48))  # at most ~48 labels
        ticks = np.arange(0, gfns.shape[0], step)
        ax.set_yticks(ticks)
        ax.set_yticklabels([f"{int(gfns[i]):#x}  ({int(totals[i]):,})" for i in ticks],
                           fontsize=10 if gfns.shape[0] <= 32 else 8, family="monospace")
        bar = fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02,
                           format=FuncFormatter(_thousands))
        bar.set_label("protection exits whose faulting bytes touch the sub-page")
        ax.set_title(title or f"Protection exits by sub-page: the {gfns.shape[0]} hottest "
                              f"protected page{'s' if gfns.shape[0] != 1 else ''}")
        return _save(fig, path)


def plot_compare_bars(document: dict | str | os.PathLike, path: str | os.PathLike, *,
                      title: str | None = None) -> str:
    """Exits by kind under each configuration of a compare document: grouped bars, one group
    per exit kind (and the total), one bar per configuration."""
    import matplotlib as mpl
    from matplotlib.ticker import FuncFormatter

    require_matplotlib()
    doc = read_summary(os.fspath(document)) if isinstance(document, (str, os.PathLike)) else document
    if not is_compare(doc):
        raise InputError("summary: not a compare document (no \"configs\"): compare bars need "
                         "the output of sppjit compare --json")
    configs = compare_configs(doc)
    kinds = [k for k in KINDS if any(c.get(k) for _, c in configs)]
    extra = sorted({k for _, c in configs for k in c} - set(KINDS) - {"total"})
    groups = kinds + [k for k in extra if any(c.get(k) for _, c in configs)]
    if any("total" in c for _, c in configs) or not groups:
        groups.append("total")
    values = np.array([[float(c.get(g, 0) or 0) for g in groups] for _, c in configs])
    with mpl.rc_context(_RC):
        fig = _new_figure()
        ax = fig.add_subplot()
        x = np.arange(len(groups), dtype=np.float64)
        width = 0.8 / len(configs)
        palette = mpl.colormaps["tab10"]
        positive = values[values > 0]
        log = positive.size > 0 and positive.max() >= 100 * positive.min()
        for j, (name, _) in enumerate(configs):
            bars = ax.bar(x - 0.4 + width * (j + 0.5), values[j], width=width * 0.95,
                          label=name, color=palette(j % 10))
            ax.bar_label(bars, labels=[f"{v:,.0f}" for v in values[j]], padding=2,
                         fontsize=9 if len(configs) * len(groups) <= 24 else 7,
                         rotation=0 if len(configs) <= 3 else 90)
        ax.set_xticks(x)
        ax.set_xticklabels(groups)
        ax.set_xlabel("exit kind")
        ax.set_ylabel("VM exits" + (" (log scale)" if log else ""))
        if log:
            ax.set_yscale("log")
            ax.set_ylim(bottom=max(positive.min() / 2, 0.5), top=positive.max() * 3)
        elif positive.size:
            ax.set_ylim(0, positive.max() * 1.12)
            ax.yaxis.set_major_formatter(FuncFormatter(_thousands))
        else:
            ax.set_ylim(0, 1)
            _empty_note(ax, "no VM exits under any configuration")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(title="configuration", loc="upper left", framealpha=0.9)
        trace = doc.get("input", {}).get("path") if isinstance(doc.get("input"), dict) else None
        ax.set_title(title or ("VM exits by configuration" + (f": {os.path.basename(str(trace))}"
                                                               if trace else "")))
        return _save(fig, path)

