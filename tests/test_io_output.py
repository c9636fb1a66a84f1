"""Atomic outputs: the complete file under the requested name, or nothing at all."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest

from sppjit.errors import InputError
from sppjit.io.output import TableWriter, check_output_path, write_json_atomic
from sppjit.io.trace import open_trace

SCHEMA = pa.schema([("gpa", pa.uint64()), ("outcome", pa.uint8())])


def batch(start: int, rows: int = 4) -> pa.RecordBatch:
    gpa = pa.array(np.arange(start, start + rows, dtype=np.uint64) * 4096)
    outcome = pa.array(np.arange(rows, dtype=np.uint8) % 5)
    return pa.record_batch([gpa, outcome], schema=SCHEMA)


def read_back(path) -> pa.Table:
    if str(path).endswith(".parquet"):
        return pq.read_table(path)
    return ipc.open_file(str(path)).read_all()


@pytest.mark.parametrize("name", ["out.parquet", "out.arrow"])
def test_complete_file_appears_on_success(name, tmp_path):
    path = tmp_path / name
    with TableWriter(path, SCHEMA) as writer:
        writer.write_batch(batch(0))
        assert not path.exists()  # still under its temporary name
        assert len(os.listdir(tmp_path)) == 1
        writer.write_batch(batch(4))
    table = read_back(path)
    assert table.column("gpa").to_pylist() == [i * 4096 for i in range(8)]
    assert table.schema.metadata[b"sppjit.schema_version"] == b"1"
    assert os.listdir(tmp_path) == [name]  # no temporary file left
    # What sppjit writes, sppjit reads (the schema version is its own).
    assert sum(len(b) for b in open_trace(path)) == 8


@pytest.mark.parametrize("name", ["out.parquet", "out.arrow"])
@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_nothing_is_left_on_failure(name, error, tmp_path):
    path = tmp_path / name
    with pytest.raises(error):
        with TableWriter(path, SCHEMA) as writer:
            writer.write_batch(batch(0))
            raise error()
    assert os.listdir(tmp_path) == []


def test_failure_keeps_an_earlier_output_intact(tmp_path):
    path = tmp_path / "out.parquet"
    with TableWriter(path, SCHEMA) as writer:
        writer.write_batch(batch(0, rows=2))
    with pytest.raises(RuntimeError):
        with TableWriter(path, SCHEMA) as writer:
            writer.write_batch(batch(10))
            raise RuntimeError
    assert pq.read_table(path).num_rows == 2
    assert os.listdir(tmp_path) == ["out.parquet"]


@pytest.mark.parametrize("name", ["out.parquet", "out.arrow"])
def test_a_batch_of_the_wrong_schema_leaves_nothing(name, tmp_path):
    wrong = pa.record_batch({"gpa": pa.array([1], pa.int32())})
    with pytest.raises(ValueError, match="schema"):
        with TableWriter(tmp_path / name, SCHEMA) as writer:
            writer.write_batch(wrong)
    assert os.listdir(tmp_path) == []


def test_unknown_format(tmp_path):
    with pytest.raises(InputError) as caught:
        TableWriter(tmp_path / "out.csv", SCHEMA)
    assert str(caught.value) == (f"--out: unknown output format for {tmp_path / 'out.csv'} "
                                 "(use .parquet or .arrow)")
    with pytest.raises(InputError, match="--exits: unknown output format"):
        check_output_path(tmp_path / "exits.txt", option="--exits", table=True)


def test_check_output_path(tmp_path):
    check_output_path(tmp_path / "out.parquet", table=True)
    check_output_path(tmp_path / "summary.json")
    with pytest.raises(InputError, match="--summary: directory does not exist: "):
        check_output_path(tmp_path / "missing" / "s.json", option="--summary")
    with pytest.raises(InputError, match="is a directory"):
        check_output_path(tmp_path)
    assert os.listdir(tmp_path) == []  # checking writes nothing


def test_json_summary(tmp_path):
    path = tmp_path / "summary.json"
    summary = {"schema_version": "1", "counts": {"accesses": np.int64(3)},
               "ratio": np.float32(0.5), "pages": np.array([1, 2], np.uint32)}
    write_json_atomic(path, summary)
    text = path.read_text()
    assert text.endswith("}\n") and text.startswith('{\n  "schema_version"')
    assert json.loads(text) == {"schema_version": "1", "counts": {"accesses": 3},
                                "ratio": 0.5, "pages": [1, 2]}
    assert os.listdir(tmp_path) == ["summary.json"]


def test_json_that_cannot_be_written_leaves_nothing(tmp_path):
    with pytest.raises(TypeError):
        write_json_atomic(tmp_path / "summary.json", {"bad": object()})
    assert os.listdir(tmp_path) == []
