"""Read a timeline file: control operations applied between accesses (docs/contract.md §4)."""

import os

import numpy as np
import pyarrow as pa

from sppjit.defaults import TIMELINE_OPS
from sppjit.errors import InputError
from sppjit.io.columns import table_columns
from sppjit.io.formats import read_table
from sppjit.io.space import GFN_LIMIT


def read_ops(path: str | os.PathLike) -> list[dict]:
    """Read ``at, op, gfn[, npages][, access]`` rows (Parquet, CSV or JSON Lines) as a list of
    operation dicts sorted by ``at`` (rows with the same ``at`` keep their file order).

    ``npages`` defaults to 1; ``access`` is required by set_subpages (a u32, decimal or "0x"
    hex text). Errors name the column and the first bad row.
    """
    table = read_table(path, "ops")
    for name in ("at", "op", "gfn"):
        if name not in table.column_names:
            raise InputError(f"ops: {os.fspath(path)} lacks column '{name}'; expected at, op, gfn, npages, access")
    n = table.num_rows
    if "npages" not in table.column_names:
        table = table.append_column("npages", pa.array(np.ones(n, dtype=np.uint64)))
    has_access = "access" in table.column_names
    specs = [
        ("at", np.uint64, 0, (1 << 63) - 1, "(a 0-based trace row)"),
        ("gfn", np.uint64, 0, GFN_LIMIT - 1, "(beyond the 48-bit guest-physical space)"),
        ("npages", np.uint64, 1, GFN_LIMIT, "(must be >= 1)"),
    ]
    at, gfn, npages = table_columns(table, specs, "ops")
    names = table.column("op").to_pylist()
    access_column = table.column("access") if has_access else None
    ops = []
    for row, name in enumerate(names):
        if name not in TIMELINE_OPS:
            raise InputError(f"ops: column 'op' has value {name!r} at row {row} (one of {', '.join(TIMELINE_OPS)})")
        op = {"at": int(at[row]), "op": name, "gfn": int(gfn[row]), "npages": int(npages[row])}
        if name == "set_subpages":
            value = access_column[row].as_py() if access_column is not None else None
            op["access"] = _u32(value, row)
        ops.append(op)
    ops.sort(key=lambda op: op["at"])
    return ops


def _u32(value, row: int) -> int:
    if isinstance(value, str):
        try:
            value = int(value, 0)
        except ValueError:
            raise InputError(f"ops: column 'access' has value {value!r} at row {row} (not an integer)") from None
    if value is None or isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0xFFFFFFFF:
        raise InputError(f"ops: column 'access' has value {value!r} at row {row} (set_subpages needs a u32)")
    return value
