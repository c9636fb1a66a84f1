"""Trace reading: every source format, batching, defaults, zero-copy and each input error."""

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest

from sppjit.errors import InputError
from sppjit.io.trace import (
    DEFAULT_KIND,
    DEFAULT_SIZE,
    DEFAULT_VCPU,
    GPA_LIMIT,
    TraceBatch,
    open_trace,
    schema_metadata,
)

ROWS = 23


def sample() -> dict[str, np.ndarray]:
    """A trace with every known column plus a pass-through one, of mixed values."""
    rng = np.random.default_rng(7)
    return {
        "gpa": rng.integers(0, 1 << 40, ROWS, dtype=np.uint64),
        "size": rng.integers(1, 4097, ROWS).astype(np.uint16),
        "vcpu": rng.integers(0, 4, ROWS).astype(np.uint16),
        "kind": rng.integers(0, 3, ROWS).astype(np.uint8),
        "seq": np.arange(ROWS, dtype=np.uint64) * 10,
        "note": np.array([f"n{i}" for i in range(ROWS)]),
    }


def table_of(columns: dict) -> pa.Table:
    return pa.table(columns)


def write_ipc_file(path, table: pa.Table, chunk: int | None = None) -> None:
    with ipc.new_file(str(path), table.schema) as writer:
        writer.write_table(table, max_chunksize=chunk)


def write_ipc_stream(path, table: pa.Table, chunk: int | None = None) -> None:
    with ipc.new_stream(str(path), table.schema) as writer:
        writer.write_table(table, max_chunksize=chunk)


def collect(reader) -> tuple[list[TraceBatch], dict[str, np.ndarray]]:
    """All batches, and each typed array concatenated over them."""
    batches = list(reader)
    arrays = {name: np.concatenate([getattr(b, name) for b in batches])
              for name in ("gpa", "size", "vcpu", "kind")}
    return batches, arrays


class CStreamOnly:
    """A foreign object that only exports the Arrow C stream interface (like polars)."""

    def __init__(self, table: pa.Table):
        self._table = table

    def __arrow_c_stream__(self, requested_schema=None):
        return self._table.__arrow_c_stream__(requested_schema)


def make_source(kind: str, tmp_path, table: pa.Table):
    """The sample trace in the form ``kind``."""
    if kind == "ipc_file":
        write_ipc_file(tmp_path / "t.arrow", table, chunk=5)
        return tmp_path / "t.arrow"
    if kind == "ipc_stream":
        write_ipc_stream(tmp_path / "t.arrows", table, chunk=5)
        return str(tmp_path / "t.arrows")
    if kind == "parquet":
        pq.write_table(table, tmp_path / "t.parquet", row_group_size=6)
        return tmp_path / "t.parquet"
    if kind == "parquet_named_arrow":  # the extension lies; the magic bytes decide
        pq.write_table(table, tmp_path / "t.arrow")
        return tmp_path / "t.arrow"
    if kind == "ipc_file_named_parquet":
        write_ipc_file(tmp_path / "t.parquet", table)
        return tmp_path / "t.parquet"
    if kind == "parquet_dir":
        (tmp_path / "ds").mkdir()
        for part, start in enumerate(range(0, table.num_rows, 7)):
            pq.write_table(table.slice(start, 7), tmp_path / "ds" / f"part-{part}.parquet")
        return tmp_path / "ds"
    if kind == "table":
        return table
    if kind == "record_batch":
        return table.combine_chunks().to_batches()[0]
    if kind == "reader":
        return pa.RecordBatchReader.from_batches(table.schema, table.to_batches(max_chunksize=4))
    if kind == "dict":
        return {name: table.column(name).to_numpy() for name in table.column_names}
    if kind == "dict_of_lists":
        return {name: table.column(name).to_pylist() for name in table.column_names
                if name != "note"}
    if kind == "c_stream":
        return CStreamOnly(table)
    raise AssertionError(kind)


SOURCES = ["ipc_file", "ipc_stream", "parquet", "parquet_named_arrow", "ipc_file_named_parquet",
           "parquet_dir", "table", "record_batch", "reader", "dict", "dict_of_lists", "c_stream"]


@pytest.mark.parametrize("kind", SOURCES)
def test_every_source_gives_the_same_arrays(kind, tmp_path):
    data = sample()
    reader = open_trace(make_source(kind, tmp_path, table_of(data)), batch_size=8)
    batches, arrays = collect(reader)
    for name in ("gpa", "size", "vcpu", "kind"):
        np.testing.assert_array_equal(arrays[name], data[name])
    assert [b.gpa.dtype for b in batches[:1]] == [np.uint64]
    assert (batches[0].size.dtype, batches[0].vcpu.dtype, batches[0].kind.dtype) == (
        np.uint16, np.uint16, np.uint8)
    assert all(b.gpa.flags.c_contiguous for b in batches)
    # first_row is the running row count, and the record batches carry the input columns.
    assert [b.first_row for b in batches] == list(np.cumsum([0] + [len(b) for b in batches])[:-1])
    assert all(1 <= len(b) <= 8 for b in batches)
    seq = np.concatenate([b.record_batch.column("seq").to_numpy() for b in batches])
    np.testing.assert_array_equal(seq, data["seq"])
    assert reader.rows_seen == ROWS
    if kind in ("ipc_stream", "reader", "c_stream"):
        assert reader.num_rows is None
    else:
        assert reader.num_rows == ROWS
    assert "seq" in reader.schema.names


def test_path_is_reported_for_files_only(tmp_path):
    source = make_source("parquet", tmp_path, table_of(sample()))
    assert open_trace(source).path == str(source)
    assert open_trace(table_of(sample())).path is None


def test_parquet_batches_cross_row_groups_with_global_rows(tmp_path):
    data = sample()
    pq.write_table(table_of(data), tmp_path / "t.parquet", row_group_size=10)
    batches = list(open_trace(tmp_path / "t.parquet", batch_size=4))
    # Row groups of 10: the batch at row 8 spans two of them.
    assert [b.first_row for b in batches] == [0, 4, 8, 12, 16, 20]
    for batch in batches:
        expected = data["gpa"][batch.first_row:batch.first_row + len(batch)]
        np.testing.assert_array_equal(batch.gpa, expected)
        np.testing.assert_array_equal(batch.record_batch.column("gpa").to_numpy(), expected)


def test_parquet_directory_is_read_in_natural_file_order(tmp_path):
    # pyarrow's own writers name parts part-0 .. part-10: "part-10" must come after "part-2".
    (tmp_path / "ds").mkdir()
    for part in reversed(range(12)):
        gpa = np.full(3, part, dtype=np.uint64)
        pq.write_table(pa.table({"gpa": gpa}), tmp_path / "ds" / f"part-{part}.parquet")
    batches = list(open_trace(tmp_path / "ds", batch_size=5))
    gpa = np.concatenate([b.gpa for b in batches])
    np.testing.assert_array_equal(gpa, np.repeat(np.arange(12, dtype=np.uint64), 3))
    # Two 3-row files do not fit one batch of 5, so each file is a batch of its own.
    assert [b.first_row for b in batches] == list(range(0, 36, 3))


def test_empty_directory_is_an_input_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no Parquet files"):
        open_trace(tmp_path / "empty")


def test_small_batches_are_merged_and_large_ones_sliced(tmp_path):
    data = sample()
    write_ipc_file(tmp_path / "small.arrow", table_of(data), chunk=3)
    assert [len(b) for b in open_trace(tmp_path / "small.arrow", batch_size=8)] == [6, 6, 6, 5]
    write_ipc_file(tmp_path / "big.arrow", table_of(data))
    assert [len(b) for b in open_trace(tmp_path / "big.arrow", batch_size=8)] == [8, 8, 7]


def test_uint64_gpa_from_ipc_file_is_zero_copy(tmp_path):
    write_ipc_file(tmp_path / "t.arrow", table_of(sample()))
    batches = list(open_trace(tmp_path / "t.arrow", batch_size=10))
    for batch in batches:
        column = batch.record_batch.column("gpa")
        buffer = np.frombuffer(column.buffers()[1], dtype=np.uint64)
        assert np.shares_memory(batch.gpa, buffer)
        assert batch.gpa.ctypes.data == column.buffers()[1].address + 8 * column.offset
        assert not batch.gpa.flags.owndata


def test_defaults_for_missing_optional_columns():
    gpa = np.array([0x1000, 0x2000, 0x3000], dtype=np.uint64)
    (batch,) = list(open_trace({"gpa": gpa}))
    np.testing.assert_array_equal(batch.gpa, gpa)
    assert batch.size.dtype == np.uint16 and (batch.size == DEFAULT_SIZE).all()
    assert batch.vcpu.dtype == np.uint16 and (batch.vcpu == DEFAULT_VCPU).all()
    assert batch.kind.dtype == np.uint8 and (batch.kind == DEFAULT_KIND).all()
    assert batch.record_batch.schema.names == ["gpa"]


def test_other_integer_types_are_cast_when_values_fit():
    (batch,) = list(open_trace({
        "gpa": pa.array([0, 1 << 47], pa.int64()),
        "size": pa.array([1, 4096], pa.int32()),
        "vcpu": pa.array([0, 65535], pa.uint64()),
        "kind": pa.array([2, 0], pa.int8()),
    }))
    assert batch.gpa.tolist() == [0, 1 << 47] and batch.gpa.dtype == np.uint64
    assert batch.size.tolist() == [1, 4096] and batch.size.dtype == np.uint16
    assert batch.vcpu.tolist() == [0, 65535] and batch.vcpu.dtype == np.uint16
    assert batch.kind.tolist() == [2, 0] and batch.kind.dtype == np.uint8


def test_empty_trace_yields_no_batches():
    reader = open_trace(pa.table({"gpa": pa.array([], pa.uint64())}))
    assert list(reader) == [] and reader.rows_seen == 0 and reader.num_rows == 0
    assert reader.schema.names == ["gpa"]


# --------------------------------------------------------------------------- value errors

def bad_trace(column: str, row: int, value, arrow_type: pa.DataType | None = None) -> dict:
    """A 10-row trace whose ``column`` holds ``value`` at ``row``."""
    data = {
        "gpa": [0x1000 * i for i in range(10)],
        "size": [8] * 10,
        "vcpu": [0] * 10,
        "kind": [1] * 10,
        "seq": list(range(10)),
    }
    data[column][row] = value
    types = {"gpa": pa.uint64(), "size": pa.uint16(), "vcpu": pa.uint16(), "kind": pa.uint8(),
             "seq": pa.uint64()}
    if arrow_type is not None:
        types[column] = arrow_type
    return {name: pa.array(values, types[name]) for name, values in data.items()}


@pytest.mark.parametrize("column, value, arrow_type, message", [
    ("size", 0, None, "trace: column 'size' has value 0 at row 6 (must be 1..4096)"),
    ("size", 4097, None, "trace: column 'size' has value 4097 at row 6 (must be 1..4096)"),
    ("size", -1, pa.int32(), "trace: column 'size' has a negative value at row 6"),
    ("gpa", None, None, "trace: column 'gpa' has a null at row 6"),
    ("gpa", -4096, pa.int64(), "trace: column 'gpa' has a negative value at row 6"),
    ("vcpu", -1, pa.int16(), "trace: column 'vcpu' has a negative value at row 6"),
    ("vcpu", 70000, pa.uint32(), "trace: column 'vcpu' has value 70000 at row 6 "
                                 "(must be 0..65535)"),
    ("kind", 7, None, "trace: column 'kind' has value 7 at row 6 "
                      "(must be 0 read, 1 write, 2 fetch)"),
    ("seq", None, None, "trace: column 'seq' has a null at row 6"),
    ("gpa", GPA_LIMIT - 4, None, "trace: access at row 6 ends beyond the 48-bit "
                                 "guest-physical space"),
    ("gpa", (1 << 64) - 1, None, "trace: access at row 6 ends beyond the 48-bit "
                                 "guest-physical space"),
])
def test_bad_value_names_column_and_global_row_in_a_later_batch(column, value, arrow_type,
                                                                message):
    reader = open_trace(bad_trace(column, 6, value, arrow_type), batch_size=4)
    first = next(reader)  # rows 0..3 are fine: reading is lazy, the error comes with its batch
    assert first.first_row == 0
    with pytest.raises(InputError) as caught:
        next(reader)
    assert str(caught.value) == message
    assert reader.rows_seen == 4


def test_access_ending_exactly_at_the_limit_is_fine():
    (batch,) = list(open_trace({"gpa": pa.array([GPA_LIMIT - 8], pa.uint64())}))
    assert batch.gpa.tolist() == [GPA_LIMIT - 8]


def test_vcpu_outside_the_vm():
    with pytest.raises(InputError) as caught:
        list(open_trace(bad_trace("vcpu", 0, 9), vcpus=4))
    assert str(caught.value) == "trace: column 'vcpu' has value 9 at row 0 but the VM has 4 vCPUs"
    assert len(list(open_trace(bad_trace("vcpu", 0, 3), vcpus=4))) == 1


def test_earliest_bad_row_wins_across_columns_and_within_one():
    data = bad_trace("kind", 5, 9)
    data["size"] = pa.array([8, 8, 8, 0, 8, 8, 8, 8, 8, 8], pa.uint16())
    with pytest.raises(InputError, match=r"column 'size' has value 0 at row 3"):
        list(open_trace(data))
    # Within one column: an out-of-range value before a negative one, a null before both.
    data = bad_trace("size", 2, 5000, pa.int32())
    data["size"] = pa.array([8, 8, 5000, -1, 8, 8, 8, 8, 8, 8], pa.int32())
    with pytest.raises(InputError, match=r"has value 5000 at row 2"):
        list(open_trace(data))
    data["size"] = pa.array([8, None, 5000, -1, 8, 8, 8, 8, 8, 8], pa.int32())
    with pytest.raises(InputError, match=r"column 'size' has a null at row 1$"):
        list(open_trace(data))
    data["size"] = pa.array([8, 8, 0, None, 8, 8, 8, 8, 8, 8], pa.int32())
    with pytest.raises(InputError, match=r"column 'size' has value 0 at row 2"):
        list(open_trace(data))


def test_bad_row_in_a_later_parquet_file_of_a_directory(tmp_path):
    (tmp_path / "ds").mkdir()
    pq.write_table(pa.table(bad_trace("kind", 0, 1)), tmp_path / "ds" / "part-0.parquet")
    pq.write_table(pa.table(bad_trace("kind", 3, 5)), tmp_path / "ds" / "part-1.parquet")
    with pytest.raises(InputError, match=r"column 'kind' has value 5 at row 13 "):
        list(open_trace(tmp_path / "ds", batch_size=4))


# --------------------------------------------------------------------------- schema errors

@pytest.mark.parametrize("columns, message", [
    ({"size": pa.array([8], pa.uint16())}, "trace: column 'gpa' is missing"),
    ({"gpa": pa.array(["0x1000"])}, "trace: column 'gpa' has type string, "
                                    "expected an unsigned integer"),
    ({"gpa": pa.array([1], pa.uint64()), "size": pa.array([8.0])},
     "trace: column 'size' has type double, expected an unsigned integer"),
    ({"gpa": pa.array([1], pa.uint64()), "kind": pa.array([True])},
     "trace: column 'kind' has type bool, expected an unsigned integer"),
])
def test_schema_errors_are_raised_on_open(columns, message):
    with pytest.raises(InputError) as caught:
        open_trace(pa.table(columns))
    assert str(caught.value) == message


def test_all_null_column_reports_its_first_row():
    with pytest.raises(InputError, match=r"column 'vcpu' has a null at row 0"):
        list(open_trace({"gpa": [1, 2], "vcpu": [None, None]}))


def test_duplicate_column_is_refused():
    table = pa.Table.from_arrays([pa.array([1], pa.uint64())] * 2, names=["gpa", "gpa"])
    with pytest.raises(InputError, match="column 'gpa' appears 2 times"):
        open_trace(table)


def test_schema_version(tmp_path):
    table = pa.table({"gpa": pa.array([1], pa.uint64())})
    current = table.replace_schema_metadata(schema_metadata())
    pq.write_table(current, tmp_path / "ok.parquet")
    assert len(list(open_trace(tmp_path / "ok.parquet"))) == 1
    newer = table.replace_schema_metadata({b"sppjit.schema_version": b"2"})
    pq.write_table(newer, tmp_path / "new.parquet")
    with pytest.raises(InputError) as caught:
        open_trace(tmp_path / "new.parquet")
    assert str(caught.value) == "trace: schema version 2 is not supported (this sppjit reads 1)"


def test_mismatched_dict_columns_and_foreign_objects():
    with pytest.raises(InputError, match="cannot build a table"):
        open_trace({"gpa": np.zeros(3, np.uint64), "size": np.ones(2, np.uint16)})
    with pytest.raises(TypeError):
        open_trace(42)


# --------------------------------------------------------------------------- file errors

def test_missing_file(tmp_path):
    with pytest.raises(InputError) as caught:
        open_trace(tmp_path / "nope.parquet")
    assert str(caught.value) == f"trace: no such file: {tmp_path / 'nope.parquet'}"


def test_truncated_parquet_file(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(table_of(sample()), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(InputError) as caught:
        list(open_trace(path))
    message = str(caught.value)
    assert message.startswith(f"trace: cannot read {path}: ") and "\n" not in message


def test_truncated_ipc_stream_fails_while_reading(tmp_path):
    path = tmp_path / "t.arrows"
    write_ipc_stream(path, table_of(sample()), chunk=5)
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    reader = open_trace(path, batch_size=5)
    with pytest.raises(InputError, match=f"trace: cannot read {path}: "):
        list(reader)
    assert reader.rows_seen > 0  # the complete batches before the cut were read


@pytest.mark.parametrize("content", [b"", b"gpa,size\n4096,8\n", b"ARROW1 but not really"])
def test_unreadable_files(content, tmp_path):
    path = tmp_path / "t.bin"
    path.write_bytes(content)
    with pytest.raises(InputError, match=f"trace: cannot read {path}: "):
        list(open_trace(path))


def test_text_file_is_named_as_no_trace_format(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("gpa,size\n4096,8\n")
    with pytest.raises(InputError) as caught:
        open_trace(path)
    assert str(caught.value) == (f"trace: cannot read {path}: not an Arrow IPC file or "
                                 "stream, nor a Parquet file; a CSV text trace? convert it "
                                 f"first: sppjit convert csv {path} --out TRACE.parquet")
