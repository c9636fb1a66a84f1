"""Results go straight into Polars and DuckDB, without copies (issue 4).

Each test runs where the library is installed (the test extra installs both) and is skipped
otherwise.
"""

import numpy as np
import pyarrow as pa
import pytest

import sppjit


def _result():
    vm = sppjit.VM(memory="16MiB")
    vm.init_spp()
    vm.set_subpages(0x10, [0xFFFF0000])
    gpa = np.array([0x10000, 0x10800, 0x11000, 0x10008], dtype=np.uint64)
    return vm.replay({"gpa": gpa, "kind": np.array([1, 1, 1, 0], dtype=np.uint8)})


def _data_address(chunked: pa.ChunkedArray) -> int:
    (chunk,) = chunked.chunks
    return chunk.buffers()[1].address


def test_polars_shares_the_result_buffers():
    pl = pytest.importorskip("polars")
    res = _result()
    df = pl.from_arrow(res.table)
    assert df["outcome"].to_list() == [1, 0, 0, 0]
    # Polars adopted Arrow's buffers: exporting them back gives the very same memory.
    back = df.to_arrow()
    assert _data_address(back["outcome"]) == _data_address(res.table["outcome"])
    assert _data_address(back["gpa"]) == _data_address(res.table["gpa"])


def test_duckdb_queries_the_result_tables_in_place():
    duckdb = pytest.importorskip("duckdb")
    res = _result()
    results, exits = res.table, res.exits  # noqa: F841  (DuckDB's replacement scan finds them by name)
    con = duckdb.connect()
    assert con.execute("select count(*) from results where outcome = 1").fetchone() == (1,)
    kinds = dict(con.execute("select kind, count(*) from exits group by kind").fetchall())
    assert kinds == {"ept_fault": 2, "spp_violation": 1}
