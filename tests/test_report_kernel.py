"""sppjit report's compiled path (kernels/report.py) equals its numpy path.

Every statistics table (column for column, schema and metadata included), the totals, the
warnings and every error message, on random results and exit logs (hypothesis: working sets
in the kernel's dense window, keys spread over the whole 48-bit space through its hash
tables, both at once, accesses crossing sub-pages and pages, absent size and kind columns,
logs with and without hook relevance, many small batches), and on the bundled kernel-guard
scenario, whose whole report (statistics files, report.json, the text and the HTML report)
is byte for byte the same. .ci/run runs this file with NUMBA_DISABLE_JIT=1 too: the
kernel's Python body must be right as well.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sppjit
from sppjit import bits as B
from sppjit.datasets import scenarios
from sppjit.errors import InputError
from sppjit.io.protect import ByteRanges, ranges_to_maps
from sppjit.replay import replay
from sppjit.report import analysis as A
from sppjit.report.writing import write_report

import strategies as S

GPA_LIMIT = 1 << 48
HOT_BASE = 0x40000 << 12


def assert_same_stats(a: A.ReportStats, b: A.ReportStats) -> None:
    for name in ("per_page", "per_subpage", "epochs"):
        ta, tb = getattr(a, name), getattr(b, name)
        assert ta.schema.equals(tb.schema, check_metadata=True), name
        assert ta.num_rows == tb.num_rows, name
        for column in ta.column_names:
            assert ta.column(column).equals(tb.column(column)), (name, column)
    assert (a.totals, a.rows, a.exit_log, a.hooks, a.inputs, a.warnings) == \
        (b.totals, b.rows, b.exit_log, b.hooks, b.inputs, b.warnings)


class kernel_used:
    """Inside the block, counts the batches that went through the kernel (``.batches``)."""

    def __enter__(self):
        self.batches, self._mp = 0, pytest.MonkeyPatch()
        real = A._kernel_batch

        def counted(*args, **kwargs):
            self.batches += 1
            return real(*args, **kwargs)

        self._mp.setattr(A, "_kernel_batch", counted)
        return self

    def __exit__(self, *exc):
        self._mp.undo()


def both(results, exits=None, **kwargs) -> A.ReportStats:
    """Both paths on the same inputs; their figures must be equal. Returns the kernel's."""
    numpy = A.analyze(results, exits, engine="numpy", **kwargs)
    with kernel_used() as used:
        jit = A.analyze(results, exits, engine="jit", **kwargs)
    assert used.batches > 0
    assert_same_stats(numpy, jit)
    return jit


def make_results(rng, rows: int, spread: str, sizes: str, kinds: bool):
    """A results table: gpa (uint64), size (uint16) and kind (uint8) unless absent, outcome and
    exits (uint8), as sppjit replay writes them."""
    size = {"none": np.full(rows, A.DEFAULT_SIZE),
            "small": rng.choice([1, 2, 4, 8, 16, 64, 200], rows),
            "any": rng.integers(1, B.PAGE_SIZE + 1, rows)}[sizes].astype(np.uint16)
    hot = HOT_BASE + rng.integers(0, 24 * B.PAGE_SIZE, rows)  # a working set of 24 pages
    wide = rng.integers(0, GPA_LIMIT - B.PAGE_SIZE, rows)  # anywhere: the hash tables
    gpa = {"hot": hot, "wide": wide, "mixed": np.where(rng.random(rows) < 0.3, wide, hot),
           # the first batch's window is the first rows' pages; later rows move on
           "moving": HOT_BASE + np.arange(rows) * 997 + rng.integers(0, 64, rows)}[spread]
    gpa = gpa.astype(np.uint64)
    top = rng.random(rows) < 0.02  # accesses ending at the very top of the space
    gpa[top] = np.uint64(GPA_LIMIT) - size[top].astype(np.uint64)
    columns = {"gpa": pa.array(gpa, pa.uint64())}
    if sizes != "none":
        columns["size"] = pa.array(size, pa.uint16())
    kind = rng.choice([0, 1, 1, 2], rows).astype(np.uint8) if kinds else \
        np.full(rows, A.DEFAULT_KIND, np.uint8)
    if kinds:
        columns["kind"] = pa.array(kind, pa.uint8())
    columns["outcome"] = pa.array(rng.integers(0, len(B.OUTCOME_NAMES), rows).astype(np.uint8))
    columns["exits"] = pa.array(rng.integers(0, 4, rows).astype(np.uint8))
    return pa.table(columns), gpa, size


def make_exits(rng, gpa, size, hooks: bool) -> pa.Table:
    """An exit log in trace-row order: 0..3 exits on a third of the rows, each at a gpa inside
    its access, of any kind (protection kinds often), relevance True/False/null with hooks."""
    rows = gpa.shape[0]
    count = np.where(rng.random(rows) < 0.35, rng.integers(1, 4, rows), 0)
    row = np.repeat(np.arange(rows), count)
    egpa = gpa[row] + (rng.random(row.shape[0]) * size[row]).astype(np.uint64)
    kinds = np.array(B.EXIT_KIND_NAMES)
    kind = np.where(rng.random(row.shape[0]) < 0.5,
                    rng.choice([B.EXIT_KIND_SPP_VIOLATION, B.EXIT_KIND_WRITE_PROTECT],
                               row.shape[0]),
                    rng.integers(0, len(kinds), row.shape[0]))
    columns = {"row": pa.array(row, pa.int64()), "gpa": pa.array(egpa, pa.uint64()),
               "kind": pa.array(kinds[kind].tolist(), pa.string())}
    if hooks:
        rel = rng.choice([True, False, None], row.shape[0]).tolist()
        columns["relevant"] = pa.array(rel, pa.bool_())
    return pa.table(columns)


@settings(max_examples=S.EXAMPLES, **S.SETTINGS)
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(1, 1500),
       spread=st.sampled_from(["hot", "wide", "mixed", "moving"]),
       sizes=st.sampled_from(["none", "small", "any"]), kinds=st.booleans(),
       log=st.sampled_from(["none", "log", "hooks"]), epochs=st.integers(1, 40),
       batch_size=st.sampled_from([1, 7, 64, 333, 1 << 18]), window=st.booleans())
def test_kernel_equals_numpy_on_random_results(seed, rows, spread, sizes, kinds, log, epochs,
                                               batch_size, window):
    rng = np.random.default_rng(seed)
    results, gpa, size = make_results(rng, rows, spread, sizes, kinds)
    exits = None if log == "none" else make_exits(rng, gpa, size, log == "hooks")
    with pytest.MonkeyPatch.context() as mp:
        # window False: no dense window, every key through the hash tables (and their growth)
        mp.setattr(A, "DENSE_WINDOW", A.DENSE_WINDOW if window else 0)
        both(results, exits, epochs=epochs, batch_size=batch_size)


def test_hash_tables_grow_past_their_first_size(monkeypatch):
    """Thousands of keys spread over the space: the kernel's tables double several times
    (from 1024 slots), and every key keeps its counts."""
    rng = np.random.default_rng(5)
    results, gpa, size = make_results(rng, 6000, "wide", "any", True)
    exits = make_exits(rng, gpa, size, hooks=True)
    monkeypatch.setattr(A, "DENSE_WINDOW", 0)
    stats = both(results, exits, epochs=13, batch_size=1000)
    assert stats.per_page.num_rows > 8000 and stats.per_subpage.num_rows > 8000


def _bad(rng_seed: int = 3):
    rng = np.random.default_rng(rng_seed)
    results, gpa, size = make_results(rng, 900, "hot", "small", True)
    return results, gpa, size, make_exits(rng, gpa, size, hooks=True)


def _set(table: pa.Table, name: str, row: int, value) -> pa.Table:
    values = table.column(name).to_pylist()
    values[row] = value
    i = table.schema.get_field_index(name)
    return table.set_column(i, table.schema.field(name),
                            pa.array(values, table.schema.field(name).type))


def _outside(results, exits):
    row = exits.column("row").to_pylist()[10]
    gpa = results.column("gpa").to_pylist()[row]
    return results, _set(exits, "gpa", 10, gpa + 4096 * 7)


def _unsorted(results, exits):
    rows = exits.column("row").to_pylist()
    return results, _set(exits, "row", 20, rows[20] - 5 if rows[20] >= 5 else rows[20] + 500)


BAD_INPUTS = {
    "size 0": lambda r, e: (_set(r, "size", 600, 0), e),
    "size 5000": lambda r, e: (_set(r, "size", 17, 5000), e),
    "kind 3": lambda r, e: (_set(r, "kind", 450, 3), e),
    "outcome 9": lambda r, e: (_set(r, "outcome", 899, 9), e),
    "null gpa": lambda r, e: (_set(r, "gpa", 301, None), e),
    "null exits": lambda r, e: (_set(r, "exits", 0, None), e),
    # two bad columns in one batch: the numpy path names the column it checks first
    "kind and size": lambda r, e: (_set(_set(r, "kind", 5, 7), "size", 400, 0), e),
    "beyond 48 bits": lambda r, e: (_set(r, "gpa", 700, GPA_LIMIT), e),
    "exit outside its access": _outside,
    "exit log out of order": _unsorted,
    "exit beyond the results": lambda r, e: (r.slice(0, 800), e),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_give_the_same_error_on_both_paths(case):
    results, _, _, exits = _bad()
    results, exits = BAD_INPUTS[case](results, exits)
    messages = []
    for engine in ("numpy", "jit"):
        with pytest.raises(InputError) as raised:
            A.analyze(results, exits, engine=engine, batch_size=256)
        messages.append(str(raised.value))
    assert messages[0] == messages[1]
    assert messages[0].startswith(("results: ", "exits: "))


def test_an_access_beyond_the_48_bit_space_is_refused():
    """As a trace's would be (a replay's results hold none): the report's arithmetic on
    gpa + size could otherwise wrap around."""
    results, _, _, _ = _bad()
    results = _set(_set(results, "gpa", 700, GPA_LIMIT - 1), "size", 700, 8)
    for engine in ("numpy", "jit"):
        with pytest.raises(InputError, match="access at row 700 ends beyond the 48-bit"):
            A.analyze(results, engine=engine)


def test_auto_takes_the_kernel_from_kernel_rows_on(monkeypatch):
    rng = np.random.default_rng(1)
    results, gpa, size = make_results(rng, 500, "hot", "small", True)
    used = []
    for name in ("_numpy_batch", "_kernel_batch"):
        real = getattr(A, name)
        monkeypatch.setattr(A, name, lambda *a, _real=real, _name=name, **k:
                            (used.append(_name), _real(*a, **k))[1])
    monkeypatch.setattr(A, "KERNEL_ROWS", 501)
    A.analyze(results)
    assert set(used) == {"_numpy_batch"}
    used.clear()
    monkeypatch.setattr(A, "KERNEL_ROWS", 500)
    A.analyze(results)
    assert set(used) == {"_kernel_batch"}
    used.clear()
    # columns of other integer types than sppjit replay writes go through numpy
    wide = results.set_column(1, "size", results.column("size").cast(pa.int64()))
    A.analyze(wide, engine="jit")
    assert set(used) == {"_numpy_batch"}
    with pytest.raises(ValueError, match="engine must be one of"):
        A.analyze(results, engine="fast")


# ------------------------------------------------------------------ a bundled scenario

@pytest.fixture(scope="module")
def guarded_replay(tmp_path_factory):
    """The kernel-guard scenario (structures guarded as byte ranges, hooks on each),
    replayed with the reference engine and written as sppjit replay writes its outputs."""
    d = tmp_path_factory.mktemp("kernel-guard")
    sc = scenarios.make("kernel-guard", 6000, seed=2)
    hooks = ByteRanges(gpa=sc.hook_gpa, length=sc.hook_length, name=sc.hook_name)
    vm = sppjit.VM(memory=sc.memory, vcpus=sc.vcpus)
    maps = ranges_to_maps(hooks)
    vm.protect(maps.gfn, maps.access)
    res = replay(vm, sc.columns(), engine="reference", hooks=hooks)
    with ipc.new_file(str(d / "r.arrow"), res.table.schema) as w:
        for batch in res.table.to_batches(max_chunksize=1000):
            w.write_batch(batch)
    pq.write_table(res.exits, d / "e.parquet", row_group_size=500)
    (d / "s.json").write_text(json.dumps(res.summary))
    return d, res


def test_scenario_figures_are_the_same(guarded_replay):
    d, res = guarded_replay
    stats = both(str(d / "r.arrow"), str(d / "e.parquet"), epochs=50, batch_size=700)
    assert stats.hooks and stats.totals["violations"] > 0
    assert stats.totals["hooks"]["relevant"] > 0
    both(str(d / "r.arrow"), epochs=9)  # without the exit log


def _report_files(d, out, monkeypatch, kernel_rows: int) -> dict[str, bytes]:
    """Every file of a whole report (statistics, plots, report.json, HTML) and its printed
    text, with the kernel taken from ``kernel_rows`` rows on; ``out`` is left empty."""
    monkeypatch.setattr(A, "KERNEL_ROWS", kernel_rows)
    out.mkdir()
    with kernel_used() as used:
        report = write_report(str(d / "r.arrow"), str(d / "e.parquet"),
                              summary=str(d / "s.json"), stats=str(out / "stats"),
                              plot=str(out / "plots"), html=str(out / "report.html"), epochs=30)
    assert (used.batches > 0) == (kernel_rows == 0)
    files = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    files["text"] = report.text.encode()
    shutil.rmtree(out)
    return files


def test_scenario_report_is_byte_identical(guarded_replay, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    d, _ = guarded_replay
    out = tmp_path / "out"  # the same paths for both: the text and report.json name them
    numpy = _report_files(d, out, monkeypatch, kernel_rows=1 << 62)
    jit = _report_files(d, out, monkeypatch, kernel_rows=0)
    assert sorted(numpy) == sorted(jit)
    assert {"stats/per_page.parquet", "stats/per_subpage.parquet", "stats/epochs.parquet",
            "stats/report.json", "report.html", "text"} <= set(numpy)
    for name in numpy:
        assert numpy[name] == jit[name], name


def test_a_small_report_loads_no_numba():
    """Below KERNEL_ROWS the numpy path runs, and numba (0.6 s to import) is never loaded;
    from KERNEL_ROWS on the kernel is."""
    code = ("import sys, numpy as np, pyarrow as pa\n"
            "from sppjit.report import analysis as A\n"
            "t = pa.table({'gpa': pa.array(np.arange(100, dtype=np.uint64) * 8),\n"
            "              'outcome': pa.array(np.zeros(100, np.uint8)),\n"
            "              'exits': pa.array(np.zeros(100, np.uint8))})\n"
            "A.analyze(t)\n"
            "assert 'numba' not in sys.modules, 'numba loaded'\n"
            "A.KERNEL_ROWS = 100\n"
            "A.analyze(t)\n"
            "assert 'numba' in sys.modules\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
