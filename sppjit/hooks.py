"""Hook relevance: was a protection exit caused by a write to the guarded bytes, or only to
their neighbourhood (the same page, or the same 128-byte sub-page)?

VM-introspection tools place protection as byte ranges ("hooks"; docs/contract.md §2.2).
Every exit that blocks a write (``spp_violation``, ``write_protect``) is *relevant* when the
bytes the access writes on that page overlap a hooked range, *irrelevant* otherwise: hvmi
filters those out in its hook callback and counts them as noise (its WMI SPP statistics).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from . import bits as B

PROTECTION_EXIT_KINDS = ("spp_violation", "write_protect")


class HookIndex:
    """Byte ranges sorted by address, with a per-hook count of relevant exits."""

    def __init__(self, gpa: np.ndarray, length: np.ndarray, names):
        gpa = np.asarray(gpa, dtype=np.uint64)
        length = np.asarray(length, dtype=np.uint64)
        names = [
            n if n is not None else f"{int(g):#x}+{int(size)}" for n, g, size in zip(names, gpa, length)
        ]
        order = np.argsort(gpa, kind="stable")
        self.start = gpa[order]
        self.end = self.start + length[order]
        self.names = [names[i] for i in order]
        self.relevant = np.zeros(len(self.names), dtype=np.int64)
        self.irrelevant_total = 0
        pages = self.start >> np.uint64(B.PAGE_SHIFT)
        # The most ranges that share one page bounds the candidate scan below.
        self._per_page = int(np.unique(pages, return_counts=True)[1].max()) if len(pages) else 0

    @classmethod
    def from_ranges(cls, ranges) -> HookIndex:
        return cls(ranges.gpa, ranges.length, list(ranges.name))

    def first_overlap(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """Index of the lowest-addressed range overlapping [lo, hi) (one page), -1 for none."""
        page = lo & ~np.uint64(B.PAGE_SIZE - 1)
        first = np.searchsorted(self.start, page, side="left")
        stop = np.searchsorted(self.start, hi, side="left")  # ranges starting before hi
        found = np.full(lo.shape[0], -1, dtype=np.int64)
        for k in range(self._per_page):
            idx = first + k
            ok = idx < stop
            cand = np.where(ok, idx, 0)
            hit = ok & (found < 0) & (self.end[cand] > lo)
            found[hit] = idx[hit]
        return found

    def annotate(self, exits: pa.RecordBatch, row_gpa, row_size, row_kind) -> pa.RecordBatch:
        """Add ``relevant`` and ``hook`` to an exit-log batch; ``row_*`` describe the access of
        each exit (aligned with the batch). Updates the counters.

        ``hook`` names the first range the access's written bytes on that page overlap, so it
        is null for reads and fetches; ``relevant`` is null except on protection exits.
        """
        kind = exits.column("kind").to_numpy(zero_copy_only=False)
        protection = np.isin(kind, PROTECTION_EXIT_KINDS)
        lo = exits.column("gpa").to_numpy()
        page_end = (lo | np.uint64(B.PAGE_SIZE - 1)) + np.uint64(1)
        hi = np.minimum(row_gpa + row_size.astype(np.uint64), page_end)
        found = self.first_overlap(lo, hi)
        found[row_kind != B.ACCESS_WRITE] = -1
        relevant = protection & (found >= 0)
        np.add.at(self.relevant, found[relevant], 1)
        self.irrelevant_total += int(np.count_nonzero(protection & (found < 0)))
        names = np.array(self.names + [None], dtype=object)
        hook = names[np.where(found >= 0, found, len(self.names))]
        return exits.append_column(
            pa.field("relevant", pa.bool_()), pa.array(relevant, mask=~protection)
        ).append_column(pa.field("hook", pa.string()), pa.array(hook, type=pa.string()))

    def summary(self) -> dict:
        return {
            "relevant": int(self.relevant.sum()),
            "irrelevant": self.irrelevant_total,
            "per_hook": [{"name": n, "relevant": int(c)} for n, c in zip(self.names, self.relevant)],
        }
