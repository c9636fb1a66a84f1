"""sppjit.io.readahead: a trace read ahead of its replay gives the reader's batches in order,
its error after the batches before it, and stops its thread when left early."""

from __future__ import annotations

import threading

import pytest

from sppjit.errors import InputError
from sppjit.io.readahead import ReadAhead


def _threads() -> int:
    return sum(t.name == "sppjit-read-ahead" for t in threading.enumerate())


def test_batches_in_order_then_the_end():
    with ReadAhead(iter(range(10)), depth=2) as batches:
        assert list(batches) == list(range(10))
        assert next(batches, "end") == "end"  # exhausted stays exhausted
    assert _threads() == 0


def test_an_error_comes_after_the_batches_before_it():
    def reader():
        yield 1
        yield 2
        raise InputError("trace: row 3 is bad")

    got = []
    with ReadAhead(reader()) as batches:
        with pytest.raises(InputError, match="row 3 is bad"):
            for b in batches:
                got.append(b)
    assert got == [1, 2]


def test_leaving_early_stops_the_thread_and_reads_no_further():
    read = []

    def reader():
        for i in range(1000):
            read.append(i)
            yield i

    with ReadAhead(reader(), depth=2) as batches:
        assert next(batches) == 0
    assert _threads() == 0
    # at most the depth, the batch handed out and the one the producer held when stopped
    assert len(read) <= 4


def test_a_job_reads_ahead_and_gives_the_serial_answer(tmp_path):
    """The job's loop over a many-batch trace: the same summary and results as a replay of
    the same trace through vm.replay, which reads in line."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sppjit import job as J
    from sppjit.vm import VM

    rng = np.random.default_rng(3)
    gpa = rng.integers(0, (64 << 20) // 8, 50_000, dtype=np.uint64) * np.uint64(8)
    kind = rng.integers(0, 3, gpa.shape[0], dtype=np.uint8)
    pq.write_table(pa.table({"gpa": gpa, "kind": kind}), tmp_path / "t.parquet")
    out = tmp_path / "r.parquet"
    result = J.run(J.Job(inputs=J.JobInputs(trace=str(tmp_path / "t.parquet")),
                         vm=J.VmSpec(memory="64MiB"), batch_size=4096,
                         outputs=J.JobOutputs(results=str(out))))
    direct = VM(memory="64MiB").replay({"gpa": gpa, "kind": kind}, batch_size=4096)
    for key in ("counts", "exits", "pages"):
        assert result.summary.to_dict()[key] == direct.summary[key]
    table = pq.read_table(out)
    for column in ("outcome", "exits", "exit_reason"):
        assert table.column(column).equals(direct.table.column(column))
    assert _threads() == 0
