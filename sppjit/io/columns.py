"""Turn one Arrow integer column into a checked numpy array, or find its first bad row.

Every input file (trace, protection, memslots) has integer columns that must be free of nulls,
non-negative and inside a range. The checks live here once so that every error names the
column and the first bad row the same way.
"""

import numpy as np
import pyarrow as pa

from sppjit.errors import InputError

UINT64_MAX = (1 << 64) - 1


class BadValue(Exception):
    """The first bad row of one column; callers add their prefix and pick the earliest row."""

    def __init__(self, row: int, message: str):
        super().__init__(message)
        self.row = row
        self.message = message


def type_problem(name: str, arrow_type: pa.DataType, *, strings: bool = False) -> str | None:
    """Why column ``name`` of type ``arrow_type`` cannot hold integers, or None if it can.

    ``strings`` admits text columns, which text formats use for hex ("0xFFFF0000").
    """
    if pa.types.is_integer(arrow_type):
        return None
    if strings and (pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)):
        return None
    # All-null columns from CSV/JSON/dicts have type null; report the null itself instead.
    if pa.types.is_null(arrow_type):
        return None
    return f"column '{name}' has type {arrow_type}, expected an unsigned integer"


def int_column(
    column: pa.Array | pa.ChunkedArray,
    *,
    name: str,
    dtype: type[np.integer],
    lo: int = 0,
    hi: int = UINT64_MAX,
    must: str = "",
    first_row: int = 0,
) -> np.ndarray:
    """Return ``column`` as a ``dtype`` array after checking every value is in ``lo..hi``.

    Raises BadValue for the first null, negative or out-of-range row (``first_row`` is added so
    that rows are global across batches). ``must`` completes "has value V at row R ...".
    The array is a zero-copy view when the column already has ``dtype`` and no nulls.
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        column = _parse_strings(column, name, first_row)
    if pa.types.is_null(column.type):
        if len(column):
            raise BadValue(first_row, f"column '{name}' has a null at row {first_row}")
        return np.zeros(0, dtype)
    if column.null_count:
        # Values before the first null may hold an earlier bad row; the null is next.
        first_null = int(np.argmax(column.is_null().to_numpy(zero_copy_only=False)))
        check_range(column.slice(0, first_null).to_numpy(zero_copy_only=False),
                    name, lo, hi, must, first_row)
        row = first_row + first_null
        raise BadValue(row, f"column '{name}' has a null at row {row}")
    values = column.to_numpy(zero_copy_only=True)
    check_range(values, name, lo, hi, must, first_row)
    return values.astype(dtype, copy=False)


def check_range(values: np.ndarray, name: str, lo: int, hi: int, must: str,
                first_row: int) -> None:
    """Raise BadValue for the first value outside ``lo..hi`` (negative ones said as such)."""
    info = np.iinfo(values.dtype)
    check_lo, check_hi = lo > info.min, hi < info.max  # bounds the type itself cannot break
    if values.size == 0 or not (check_lo or check_hi):
        return
    # min/max are one cheap pass each and allocate nothing: the usual, valid case ends here.
    if (not check_lo or int(values.min()) >= lo) and (not check_hi or int(values.max()) <= hi):
        return
    bad = np.zeros(values.shape, dtype=bool)
    if check_lo:
        bad |= values < lo
    if check_hi:
        bad |= values > hi
    index = int(np.argmax(bad))
    value, row = int(values[index]), first_row + index
    if value < 0:
        raise BadValue(row, f"column '{name}' has a negative value at row {row}")
    raise BadValue(row, f"column '{name}' has value {value} at row {row} {must}".rstrip())


def _parse_strings(column: pa.Array, name: str, first_row: int) -> pa.Array:
    """Parse decimal or "0x" hex text into uint64; text formats cannot type such a column."""
    values: list[int | None] = []
    for index, text in enumerate(column.to_pylist()):
        if text is None:
            values.append(None)
            continue
        row = first_row + index
        stripped = text.strip()
        negative = stripped.startswith("-")
        digits = stripped[1:] if stripped[:1] in ("+", "-") else stripped
        try:
            if digits[:2].lower() == "0x":
                value = int(digits[2:], 16)
            else:
                value = int(digits, 10)
            if value < 0:  # a second sign, after the first or the 0x: "0x-1", "+-5"
                raise ValueError(text)
        except ValueError:
            raise BadValue(row, f"column '{name}' has value '{text}' at row {row}, "
                                "not a decimal or 0x-hex integer") from None
        if negative and value:
            raise BadValue(row, f"column '{name}' has a negative value at row {row}")
        if value > UINT64_MAX:
            raise BadValue(row, f"column '{name}' has value {text} at row {row}, "
                                "too large for 64 bits")
        values.append(value)
    return pa.array(values, pa.uint64())


def table_columns(table: pa.Table, specs: list[tuple[str, type[np.integer], int, int, str]],
                  what: str) -> list[np.ndarray]:
    """Checked integer columns ``(name, dtype, lo, hi, must)`` of a small table read whole.

    Text columns are accepted (decimal or "0x" hex, as CSV and JSON users write them). The
    InputError names the earliest bad row among the columns, prefixed with ``what``.
    """
    arrays, problems = [], []
    for name, dtype, lo, hi, must in specs:
        if len(table.schema.get_all_field_indices(name)) > 1:
            raise InputError(f"{what}: column '{name}' appears more than once")
        column = table.column(name)
        if problem := type_problem(name, column.type, strings=True):
            raise InputError(f"{what}: {problem}")
        try:
            arrays.append(int_column(column, name=name, dtype=dtype, lo=lo, hi=hi, must=must))
        except BadValue as bad:
            problems.append(bad)
    if problems:
        raise InputError(f"{what}: " + min(problems, key=lambda bad: bad.row).message)
    return arrays
