"""The Python API as a pyarrow or polars user meets it: every kind of trace source gives the
same answers, a bad source fails at the call, streaming gives the exit log and the summary,
``import sppjit`` exposes the README's names lazily, and a VM and a result say what they hold
(repr, and a table in a notebook). Hooks without their protection are an error."""

from __future__ import annotations

import json
import subprocess
import sys
from html.parser import HTMLParser

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

import sppjit
from sppjit.datasets import scenarios as S
from sppjit.errors import InputError
from sppjit.io.protect import AccessMaps, ByteRanges, ranges_to_maps
from sppjit.summary import ReplaySummary

ROWS = 3000
BATCH = 700  # several batches per trace, and a last short one


def untimed(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k not in ReplaySummary.TIMINGS}


def answers(summary: dict) -> dict:
    """What a replay found, whatever the source was (no path, no digest)."""
    keep = ("config", "counts", "exits", "pages", "tlb_flushes", "hooks")
    return {k: summary[k] for k in keep if k in summary}


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    """The guarded scenario on 2 vCPUs, as a Parquet file and as a directory of three parts,
    with its hooks (every 5th protected page, 100 bytes at offset 0x200)."""
    base = tmp_path_factory.mktemp("api")
    scenario = S.make("guarded", ROWS, seed=4)
    table = pa.table(scenario.columns())
    pq.write_table(table, base / "t.parquet", row_group_size=1000)
    (base / "parts").mkdir()
    for i, start in enumerate(range(0, ROWS, 1000)):
        pq.write_table(table.slice(start, 1000), base / "parts" / f"part-{i}.parquet")
    gfns = np.asarray(scenario.protect_gfn[::5][:30], dtype=np.uint64)
    hooks = ByteRanges(gpa=(gfns << np.uint64(12)) | np.uint64(0x200),
                       length=np.full(len(gfns), 100, np.uint32),
                       name=[f"h{i}" for i in range(len(gfns))])
    return {"path": base / "t.parquet", "dir": base / "parts", "table": table,
            "hooks": hooks, "base": base}


def hooked_vm(hooks: ByteRanges):
    vm = sppjit.VM(memory="4GiB", vcpus=2)
    maps = ranges_to_maps(hooks)
    vm.protect(maps.gfn, maps.access)
    return vm


SOURCES = {
    "str path": lambda t: str(t["path"]),
    "Path": lambda t: t["path"],
    "directory": lambda t: t["dir"],
    "ParquetFile": lambda t: pq.ParquetFile(t["path"]),
    "Dataset": lambda t: ds.dataset(t["path"]),
    "Dataset of parts": lambda t: ds.dataset([str(t["dir"] / f"part-{i}.parquet")
                                              for i in range(3)]),
    "Table": lambda t: t["table"],
    "RecordBatchReader": lambda t: pa.RecordBatchReader.from_batches(
        t["table"].schema, t["table"].to_batches(max_chunksize=400)),
    "list of batches": lambda t: t["table"].to_batches(max_chunksize=900),
    "generator of batches": lambda t: (b for b in t["table"].to_batches(max_chunksize=250)),
    "dict of columns": lambda t: {name: t["table"][name].to_numpy()
                                  for name in t["table"].column_names},
    "polars DataFrame": lambda t: pytest.importorskip("polars").from_arrow(t["table"]),
}


@pytest.fixture(scope="module")
def expected(trace):
    return hooked_vm(trace["hooks"]).replay(trace["path"], hooks=trace["hooks"])


@pytest.mark.parametrize("kind", list(SOURCES))
def test_every_source_kind_gives_the_same_results(trace, expected, kind):
    source = SOURCES[kind](trace)
    res = hooked_vm(trace["hooks"]).replay(source, hooks=trace["hooks"], batch_size=BATCH)
    assert res.table.equals(expected.table)
    assert res.exits.equals(expected.exits)
    assert answers(res.summary) == answers(expected.summary)
    assert res.summary["counts"]["accesses"] == ROWS
    # and streamed, batch by batch
    stream = hooked_vm(trace["hooks"]).replay_batches(SOURCES[kind](trace), hooks=trace["hooks"],
                                                      batch_size=BATCH)
    batches = list(stream)
    assert max(len(b) for b in batches) <= BATCH
    assert pa.Table.from_batches(batches).equals(expected.table)
    assert stream.exits.equals(expected.exits)
    assert answers(stream.summary) == answers(expected.summary)


@pytest.mark.parametrize("bad, message", [
    (42, "cannot read a trace from int"),
    (np.arange(4, dtype=np.uint64), "cannot read a trace from ndarray"),
    ([1, 2], "holds int items, not record batches"),
    ([], "holds no record batches"),
    ("/nonexistent/t.parquet", "no such file"),
    ({"size": np.ones(3, np.uint16)}, "column 'gpa' is missing"),
    (pa.table({"gpa": pa.array(["a"])}), "gpa"),
])
def test_a_bad_source_fails_at_the_call_not_at_the_first_batch(bad, message):
    vm = sppjit.VM(memory="16MiB")
    with pytest.raises(InputError, match=message):
        vm.replay_batches(bad)  # no next(): the call itself refuses it
    with pytest.raises(InputError, match=message):
        vm.replay(bad)


def test_a_polars_lazy_frame_is_refused_with_what_to_do():
    pl = pytest.importorskip("polars")
    lazy = pl.DataFrame({"gpa": [0x1000]}).lazy()
    with pytest.raises(InputError, match=r"LazyFrame.*collect\(\)"):
        sppjit.VM(memory="16MiB").replay_batches(lazy)


def test_an_unsupported_source_is_still_a_type_error():
    with pytest.raises(TypeError):
        sppjit.VM(memory="16MiB").replay_batches(object())


def test_a_bad_batch_later_in_an_iterable_is_an_input_error_at_that_batch():
    good = pa.record_batch({"gpa": pa.array([0x1000], pa.uint64())})
    other = pa.record_batch({"gpa": pa.array([0x1000], pa.uint64()),
                             "size": pa.array([4], pa.uint16())})
    stream = sppjit.VM(memory="16MiB").replay_batches([good, other])
    with pytest.raises(InputError, match="batch 1 of the list has other columns"):
        list(stream)
    stream = sppjit.VM(memory="16MiB").replay_batches(iter([good, "x"]))
    with pytest.raises(InputError, match="item 1 of the list_iterator is a str"):
        list(stream)


def test_streaming_gives_the_exit_log_and_the_summary_of_replay(trace, expected):
    stream = hooked_vm(trace["hooks"]).replay_batches(str(trace["path"]), hooks=trace["hooks"],
                                                      batch_size=BATCH)
    first = next(stream)
    assert len(first) == BATCH and stream.rows == BATCH
    with pytest.raises(RuntimeError, match="not finished"):
        stream.summary  # noqa: B018
    so_far = stream.exits  # the exit log of the rows replayed: a prefix of the whole one
    assert so_far.num_rows and max(so_far["row"].to_pylist()) < BATCH
    assert so_far.equals(expected.exits.slice(0, so_far.num_rows))
    rest = list(stream)
    assert pa.Table.from_batches([first] + rest).equals(expected.table)
    assert stream.exits.equals(expected.exits)
    # the same summary, provenance and digests included, apart from the timings
    assert untimed(stream.summary) == untimed(expected.summary)
    from sppjit.provenance import default_algorithm

    assert stream.summary["provenance"]["digests"]["trace"].startswith(f"{default_algorithm()}:")
    assert list(stream) == [] and "finished" in repr(stream)


def test_streaming_hands_the_exit_log_to_on_exits(trace, expected):
    got: list[pa.RecordBatch] = []
    stream = hooked_vm(trace["hooks"]).replay_batches(trace["path"], hooks=trace["hooks"],
                                                      batch_size=BATCH, on_exits=got.append)
    for _ in stream:
        pass
    assert pa.Table.from_batches(got).equals(expected.exits)
    assert untimed(stream.summary) == untimed(expected.summary)
    with pytest.raises(RuntimeError, match="on_exits"):
        stream.exits  # noqa: B018


# ------------------------------------------------------------------------- names, lazily

def test_import_sppjit_exposes_the_readme_names_lazily():
    code = """
import sys, sppjit
heavy = {"numpy", "pyarrow", "numba"} & set(sys.modules)
assert not heavy, heavy
names = ("VM", "replay", "abi", "sweep", "job", "read_protection", "write_protection",
         "ranges_to_maps", "load_state", "save_state", "open_trace", "ReplayResult",
         "ReplayStream")
assert set(names) <= set(dir(sppjit)) and set(names) <= set(sppjit.__all__)
import sppjit.replay, sppjit.io.protect, sppjit.savestate, sppjit.abi
assert sppjit.replay.replay is sppjit.replay.__dict__["replay"]
assert sppjit.read_protection is sppjit.io.protect.read_protection
assert sppjit.write_protection is sppjit.io.protect.write_protection
assert sppjit.load_state is sppjit.savestate.load_state
assert sppjit.abi.kvm_subpage
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_sppjit_replay_is_callable_and_still_the_module():
    import sppjit.replay as module

    vm = sppjit.VM(memory="16MiB")
    res = sppjit.replay(vm, {"gpa": np.array([0x1000], np.uint64)})
    assert isinstance(res, sppjit.ReplayResult) and res.summary["counts"]["accesses"] == 1
    assert sppjit.replay is module and module.replay is not module
    assert isinstance(sppjit.abi.kvm_subpage(0x10, [0]), bytearray)


@pytest.mark.parametrize("ext", ["parquet", "arrow", "csv", "json", "jsonl"])
def test_protection_files_are_written_and_read_back(tmp_path, ext):
    maps = AccessMaps(gfn=np.array([0x10, 0x11, 0x200], np.uint64),
                      access=np.array([0, 0xFFFF0000, 0xFFFFFFFE], np.uint32))
    ranges = ByteRanges(gpa=np.array([0x10040, 0x200F00], np.uint64),
                        length=np.array([8, 256], np.uint32), name=["cred", None])
    for what, form in (("maps", maps), ("ranges", ranges)):
        path = tmp_path / f"{what}.{ext}"
        assert sppjit.write_protection(form, path) == ("arrow" if ext == "arrow" else ext)
        back = sppjit.read_protection(path)
        assert type(back) is type(form)
        for field in ("gfn", "access") if what == "maps" else ("gpa", "length"):
            assert getattr(back, field).tolist() == getattr(form, field).tolist()
        if what == "ranges":
            assert back.name == ["cred", None]


def test_writing_protection_checks_before_writing(tmp_path):
    empty = AccessMaps(gfn=np.zeros(0, np.uint64), access=np.zeros(0, np.uint32))
    with pytest.raises(InputError, match="^path: unknown format"):
        sppjit.write_protection(empty, tmp_path / "p.xml")
    with pytest.raises(InputError, match="^protect_out: the protection has no rows"):
        sppjit.write_protection(empty, tmp_path / "p.json", name="protect_out")
    with pytest.raises(InputError, match="directory does not exist"):
        sppjit.write_protection(empty, tmp_path / "no" / "p.csv")
    assert list(tmp_path.iterdir()) == []


def test_a_saved_state_loads_back_from_the_top_level(tmp_path):
    vm = sppjit.VM(memory="64MiB", vcpus=2, profile="v12")
    vm.protect(np.array([5, 6], np.uint64), np.array([0, 0xFFFFFFFD], np.uint32))
    sppjit.save_state(vm, tmp_path / "s.npz")
    back = sppjit.load_state(tmp_path / "s.npz")
    assert repr(back) == repr(vm)
    assert back.get_subpages(5, 2).tolist() == [0, 0xFFFFFFFD]


# ------------------------------------------------------------------------- repr, notebooks

def test_vm_repr_says_what_it_is_and_holds():
    vm = sppjit.VM(memory="64MiB", vcpus=2)
    assert repr(vm) == ("<VM profile v4, granularity spp, subpage_check all, 64MiB in 1 memslot, "
                        "2 vCPUs; SPP off>")
    vm.protect(np.array([1, 2, 3], np.uint64), np.array([0, 0, 0xFFFFFFFE], np.uint32))
    assert repr(vm).endswith("; SPP active, 3 pages protected>")
    vm.set_subpages(3, [0xFFFFFFFF])  # FULL again: no longer protected
    assert repr(vm).endswith("; SPP active, 2 pages protected>")
    other = sppjit.VM(memslots=[(0, 256), (0x1000, 16)], vcpus=1, profile="v12",
                      granularity="page", hugepages=True, subpage_check="first")
    assert repr(other) == ("<VM profile v12, granularity page, subpage_check first, 1088KiB in "
                           "2 memslots, 1 vCPU, hugepages; SPP off>")


def small_result():
    vm = sppjit.VM(memory="64MiB", vcpus=2)
    vm.protect(np.array([1, 2], np.uint64), np.array([0, 0xFFFFFFFE], np.uint32))
    # 0x1000: sub-page 0 of a protected page (violation); 0x5000: unprotected; 0x2008:
    # sub-page 0 of gfn 2, protected (violation); each first touch also takes an EPT fault.
    gpa = np.array([0x1000, 0x5000, 0x2008, 0x2080, 0x5008, 0x6000, 0x7000], np.uint64)
    return vm.replay({"gpa": gpa})


def test_result_repr_says_what_it_holds():
    res = small_result()
    text = repr(res)
    assert text.startswith("<ReplayResult trace in memory, 7 rows; VM profile v4, granularity "
                           "spp, subpage_check all, 64MiB in 1 memslot, 2 vCPUs, engine jit; ")
    assert "accesses 7 (writes 7)" in text
    assert "outcomes allowed 5, spp_violation 2" in text
    # five pages touched (1, 2, 5, 6, 7): five EPT faults, and the two violations
    assert "exits 7 (ept_fault 5, spp_violation 2)" in text
    assert text.endswith(".table 7 x 4, .exits 7 rows, .summary>")
    assert len(text) < 400  # never the tables themselves


class _Tables(HTMLParser):
    """Each <table> of a page as a list of rows, each row a list of cell texts."""

    def __init__(self):
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def test_result_renders_as_html_tables_in_a_notebook():
    res = small_result()
    parser = _Tables()
    parser.feed(res._repr_html_())
    facts, preview = parser.tables
    assert dict(facts)["exits"] == "7 (ept_fault 5, spp_violation 2)"
    assert dict(facts)["outcomes"] == "allowed 5, spp_violation 2"
    header, *rows = preview
    assert header == ["gpa", "outcome", "exits", "exit_reason"]
    assert len(rows) == 5  # the first five of seven rows
    assert rows[0][:3] == ["0x1000", "1", "2"] and rows[1][:3] == ["0x5000", "0", "1"]
    html = res._repr_html_()
    assert "first 5 of 7 rows" in html


def test_html_escapes_what_the_trace_carries():
    vm = sppjit.VM(memory="16MiB")
    res = vm.replay({"gpa": np.array([0x1000], np.uint64), "note": ["<b>x</b>"]})
    html = res._repr_html_()
    assert "<b>x</b>" not in html and "&lt;b&gt;x&lt;/b&gt;" in html


# ------------------------------------------------------------------------- hooks need protection

HOOKS = ByteRanges(gpa=np.array([0x10078, 0x20100], np.uint64),  # sub-pages 0-1; sub-page 2
                   length=np.array([16, 8], np.uint32), name=["cred", "idt"])
TRACE = {"gpa": np.array([0x10080, 0x20100], np.uint64)}


def test_hooks_without_protection_are_an_error_at_the_call():
    vm = sppjit.VM(memory="16MiB")
    with pytest.raises(InputError, match=r"hook 'cred' \(gpa 0x10078, 16 bytes\) is not "
                                         r"write-protected"):
        vm.replay(TRACE, hooks=HOOKS)
    with pytest.raises(InputError, match="hook 'cred'"):
        vm.replay_batches(TRACE, hooks=HOOKS)


def test_the_first_uncovered_hook_is_named():
    vm = sppjit.VM(memory="16MiB")
    maps = ranges_to_maps(HOOKS)
    vm.protect(maps.gfn[:1], maps.access[:1])  # cred's page only
    with pytest.raises(InputError, match="hook 'idt'"):
        vm.replay(TRACE, hooks=HOOKS)
    vm.protect(maps.gfn[1:], maps.access[1:])
    res = vm.replay(TRACE, hooks=HOOKS)
    assert res.summary["hooks"]["relevant"] == 2  # each write lands on its hook


def test_a_hook_half_protected_is_not_protected_under_spp_but_is_under_page():
    # cred spans sub-pages 0 and 1 of gfn 0x10; protect sub-page 0 only
    only_first = np.array([0xFFFFFFFE], np.uint32)
    spp = sppjit.VM(memory="16MiB")
    spp.protect(np.array([0x10, 0x20], np.uint64), np.array([0xFFFFFFFE, 0xFFFFFFFB], np.uint32))
    with pytest.raises(InputError, match="hook 'cred'"):
        spp.replay(TRACE, hooks=HOOKS)
    # granularity page write-protects a whole page for any map that is not FULL
    page = sppjit.VM(memory="16MiB", granularity="page")
    page.protect(np.array([0x10, 0x20], np.uint64), np.concatenate([only_first, only_first]))
    res = page.replay(TRACE, hooks=HOOKS)
    assert res.summary["hooks"]["relevant"] == 2


def test_a_timeline_that_places_the_protection_covers_the_hooks():
    vm = sppjit.VM(memory="16MiB")
    vm.init_spp()
    ops = [{"at": 0, "op": "set_subpages", "gfn": 0x10, "npages": 0x11, "access": 0}]
    res = vm.replay(TRACE, hooks=HOOKS, ops=ops)
    assert res.summary["hooks"]["relevant"] == 2
    late = [{"at": 1, "op": "set_subpages", "gfn": 0x10, "npages": 1, "access": 0}]
    with pytest.raises(InputError, match="hook 'idt'"):  # the timeline covers cred only
        sppjit.VM(memory="16MiB").replay(TRACE, hooks=HOOKS, ops=late)


def test_summary_json_of_a_stream_is_plain_json(trace):
    stream = hooked_vm(trace["hooks"]).replay_batches(trace["path"], hooks=trace["hooks"])
    for _ in stream:
        pass
    assert json.loads(json.dumps(stream.summary))["hooks"]["relevant"] >= 0


def test_a_stream_stopped_by_an_error_has_no_summary():
    good, bad = (pa.record_batch({"gpa": pa.array([0x1000], pa.uint64()),
                                  "vcpu": pa.array([v], pa.uint16())}) for v in (0, 3))
    # vCPU 3: the VM has one
    stream = sppjit.VM(memory="16MiB").replay_batches(iter([good, good, bad]), batch_size=1)
    assert len(next(stream)) == 1
    with pytest.raises(InputError, match="vcpu"):
        list(stream)
    with pytest.raises(RuntimeError, match="stopped at an error"):
        stream.summary  # noqa: B018
    with pytest.raises(RuntimeError, match="stopped at an error"):
        next(stream)
