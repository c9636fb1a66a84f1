"""sppjit report in bounded batches, and a report from the exit log and the summary alone.

Structural, not timed: every batch the analysis sees holds at most ``batch_size`` rows and
only the columns it reads; Arrow IPC results are read, not memory-mapped; the grouping by
counting equals the grouping by sorting; a report without results equals the full report on
every figure the exit log tells, and leaves the per-access columns null.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import sppjit
from sppjit.cli import app
from sppjit.commands.report import EPILOG, HELP, report
from sppjit.report import analysis as A

if "report" not in {c.name for c in app.registered_commands}:
    app.command("report", help=HELP, epilog=EPILOG)(report)

runner = CliRunner()
BASE_GFN = 0x400


def _replay(rows: int = 3000, seed: int = 0):
    """A reference-engine replay (no kernel to compile) of writes and reads of mixed sizes
    over 16 pages, 8 of them SPP-protected with random maps: many exits of every common
    kind, accesses crossing sub-pages and pages."""
    rng = np.random.default_rng(seed)
    vm = sppjit.VM(memory="64MiB")
    vm.init_spp()
    for k in range(8):
        vm.set_subpages(BASE_GFN + 2 * k, [int(rng.integers(0, 1 << 32))])
    gpa = (BASE_GFN << 12) + rng.integers(0, 16 * 4096 - 300, rows)
    trace = {"gpa": gpa.astype(np.uint64),
             "size": rng.choice([1, 4, 8, 64, 256], rows).astype(np.uint16),
             "kind": rng.choice([0, 1, 1, 1], rows).astype(np.uint8)}
    return vm.replay(trace, engine="reference")


@pytest.fixture(scope="module")
def replayed(tmp_path_factory):
    d = tmp_path_factory.mktemp("stream")
    res = _replay()
    with ipc.new_file(str(d / "r.arrow"), res.table.schema) as w:
        for batch in res.table.to_batches(max_chunksize=700):  # several batches in the file
            w.write_batch(batch)
    pq.write_table(res.exits, d / "e.parquet", row_group_size=97)
    (d / "s.json").write_text(json.dumps(res.summary))
    return d, res


def test_batches_are_bounded_and_hold_only_the_columns_read(replayed, monkeypatch):
    d, res = replayed
    seen = []
    real = A._int_column

    def spy(batch, name, *args, **kwargs):
        seen.append((batch.num_rows, tuple(batch.schema.names), name))
        return real(batch, name, *args, **kwargs)

    monkeypatch.setattr(A, "_int_column", spy)
    A.analyze(str(d / "r.arrow"), str(d / "e.parquet"), batch_size=256)
    assert seen and max(rows for rows, _, _ in seen) == 256
    wanted = {"gpa", "size", "kind", "outcome", "exits", "row"}
    assert {n for _, names, _ in seen for n in names} <= wanted  # no exit_reason, no vcpu
    results_rows = sum(rows for rows, names, name in seen if "outcome" in names and name == "gpa")
    assert results_rows == res.table.num_rows


def test_arrow_results_are_read_not_memory_mapped(replayed, monkeypatch):
    """Once the row count is taken from the headers, no batch comes from a memory map (a
    mapped file's pages count in the RSS: 1.2 GB for 100 M rows)."""
    d, res = replayed
    src = A._open_source(str(d / "r.arrow"), "results", ("gpa", "outcome"))
    assert src.num_rows == res.table.num_rows

    def refuse(*args, **kwargs):
        raise AssertionError("memory-mapped")

    monkeypatch.setattr(pa, "memory_map", refuse)
    batches = list(src.batches(512))
    assert [b.num_rows for b in batches] == [512, 188] * 4 + [200]  # 700-row batches
    assert all(b.schema.names == ["gpa", "outcome"] for b in batches)


def test_small_batches_give_the_one_batch_figures(replayed):
    d, _ = replayed
    one = A.analyze(str(d / "r.arrow"), str(d / "e.parquet"), epochs=7, batch_size=1 << 20)
    small = A.analyze(str(d / "r.arrow"), str(d / "e.parquet"), epochs=7, batch_size=128)
    for name in ("per_page", "per_subpage", "epochs"):
        assert getattr(small, name).equals(getattr(one, name)), name
    assert small.totals == one.totals


@pytest.mark.parametrize("spread", [False, True])
def test_grouping_by_counting_equals_grouping_by_sorting(spread):
    rng = np.random.default_rng(1)
    keys = rng.integers(0, 5000, 20_000).astype(np.uint64) + np.uint64(1 << 40)
    if spread:  # a key far away: sorted, not counted
        keys[7] = np.uint64(1 << 47)
    unique, inverse = A.group_index(keys)
    expect, expect_inverse, _, _ = A.group_keys(keys)
    np.testing.assert_array_equal(unique, expect)
    np.testing.assert_array_equal(inverse, expect_inverse)
    np.testing.assert_array_equal(unique[inverse], keys)


def test_report_from_the_exit_log_and_summary_alone(replayed):
    d, res = replayed
    full = A.analyze(str(d / "r.arrow"), str(d / "e.parquet"), epochs=9)
    alone = A.analyze(None, str(d / "e.parquet"), epochs=9, summary=res.summary,
                      batch_size=200)
    exit_columns = ["gfn", "exits", *A.KINDS, "violations"]
    with_exits = full.per_page.filter(pc.greater(full.per_page.column("exits"), 0))
    assert alone.per_page.select(exit_columns).equals(with_exits.select(exit_columns))
    for name in ("accesses", "reads", "writes", "fetches"):
        assert alone.per_page.column(name).null_count == alone.per_page.num_rows
    epoch_columns = ["epoch", "first_row", "rows", "accesses", "exits", *A.KINDS, "violations"]
    assert alone.epochs.select(epoch_columns).equals(full.epochs.select(epoch_columns))
    assert alone.epochs.column("writes").null_count == 9
    assert alone.totals["exits"] == full.totals["exits"]
    assert alone.totals["counts"] == full.totals["counts"]
    assert alone.totals["violations"] == full.totals["violations"]
    assert alone.totals["pages"]["with_violations"] == full.totals["pages"]["with_violations"]
    assert alone.totals["pages"]["touched"] == res.summary["pages"]["touched"]
    # Per sub-page: each protection exit on its logged gpa's sub-page; the full report counts
    # every sub-page the faulting bytes touch, so it holds at least as many.
    sub = {(r["gfn"], r["subpage"]): r["violations"] for r in alone.per_subpage.to_pylist()}
    whole = {(r["gfn"], r["subpage"]): r["violations"] for r in full.per_subpage.to_pylist()}
    exits = res.exits.to_pylist()
    first = {}
    for e in exits:
        if e["kind"] in ("spp_violation", "write_protect"):
            key = (e["gpa"] >> 12, (e["gpa"] >> 7) & 31)
            first[key] = first.get(key, 0) + 1
    assert sub == first and sum(sub.values()) == full.totals["violations"]
    assert all(whole.get(k, 0) >= v for k, v in sub.items())
    assert alone.warnings and "need the results" in alone.warnings[0]


def test_cli_report_without_results(replayed, tmp_path):
    d, _ = replayed
    out = tmp_path / "stats"
    result = runner.invoke(app, ["report", "--exits", str(d / "e.parquet"), "--summary",
                                 str(d / "s.json"), "--stats", str(out)])
    assert result.exit_code == 0, result.output
    assert "none: from the exit log and the summary" in result.stdout
    doc = json.loads((out / "report.json").read_text())
    assert doc["inputs"]["results"] is None and doc["totals"]["exits_source"] == "exit_log"
    per_page = pq.read_table(out / "per_page.parquet")
    assert per_page.column("writes").null_count == per_page.num_rows


@pytest.mark.parametrize("args, message", [
    (["--exits", "E"], "RESULTS is missing"),
    (["--summary", "S"], "RESULTS is missing"),
    ([], "Usage"),  # nothing at all: the usage, as for every command
])
def test_cli_report_without_results_needs_exits_and_summary(replayed, args, message):
    d, _ = replayed
    paths = {"E": str(d / "e.parquet"), "S": str(d / "s.json")}
    result = runner.invoke(app, ["report", *[paths.get(a, a) for a in args]])
    assert result.exit_code == 2 and message in result.output


def test_summary_without_rows_is_refused(replayed, tmp_path):
    d, res = replayed
    # a summary of the contract's shape whose input names no rows and that counted no access
    summary = dict(res.summary, input={"path": "t.parquet"},
                   counts=dict(res.summary["counts"], accesses=0))
    with pytest.raises(sppjit.InputError, match="records no number of rows"):
        A.analyze(None, str(d / "e.parquet"), summary=summary)
