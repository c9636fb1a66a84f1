"""Sweeps (sppjit.sweep): every configuration's outputs equal its serial replay alone.

The property test draws a guest memory layout, a trace, two protections (access maps and byte
ranges, written to files) and a timeline, then 1..4 configurations mixing profile,
granularity, sub-page check, huge pages, vCPUs, protection (the sweep's, another file, none)
and timeline; it replays each configuration alone (sppjit.replay.replay, the serial oracle)
and sweeps them all, on 1 and on 2 threads, in small batches (so lanes run at different
paces through many batches). Every configuration's per-access results, exit log and summary
counters must be equal, a configuration that fails must fail with the serial replay's error
(named) while the others complete, and two sweeps must give identical tables but for the
timing columns.
"""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from hypothesis import given, note, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import sppjit.cli as cli
from sppjit import bits as B
from sppjit import sweep as W
from sppjit.errors import InputError, SppError, VmEntryError
from sppjit.io.protect import AccessMaps, ByteRanges, check_in_memslots, ranges_to_maps

import strategies as S  # noqa: E402  (tests/ on sys.path: conftest.py)

SUMMARY_KEYS = ("counts", "exits", "pages", "tlb_flushes", "hooks", "ops")


# ------------------------------------------------------------------------ the serial oracle

def serial(config: W.Config, trace, *, memslots, vcpus, protections, batch_size):
    """One configuration replayed alone, as sppjit replay does: ("ok", ReplayResult) or
    ("raised", type name, message)."""
    from sppjit.io.ops import read_ops
    from sppjit.io.protect import read_protection
    from sppjit.reference import ModelLivelock
    from sppjit.replay import replay
    from sppjit.vm import VM

    vm = VM(memslots=memslots, vcpus=config.vcpus or vcpus, profile=config.profile,
            hugepages=bool(config.hugepages), subpage_check=config.subpage_check,
            granularity=config.granularity)
    ops = read_ops(config.ops) if config.ops else []
    if ops:
        vm.init_spp()
    path = protections if config.protect is None else config.protect
    hooks = None
    if path != W.NO_PROTECTION:
        prot = read_protection(path)
        maps = prot if isinstance(prot, AccessMaps) else ranges_to_maps(prot)
        check_in_memslots(maps.gfn, vm.config.memslots)
        vm.protect(maps.gfn, maps.access)
        hooks = prot if isinstance(prot, ByteRanges) else None
    try:
        return ("ok", replay(vm, trace, batch_size=batch_size, hooks=hooks, ops=ops))
    except (InputError, SppError, VmEntryError, ModelLivelock) as exc:
        return ("raised", type(exc).__name__, str(exc))


def figures(summary: dict) -> dict:
    return {k: summary.get(k) for k in SUMMARY_KEYS}


def timeless(table: pa.Table) -> pa.Table:
    return table.drop_columns(list(W.TIMING_COLUMNS))


# ------------------------------------------------------------------------ drawn inputs

@st.composite
def protections(draw, space: S.Space):
    """(access maps, byte ranges) over the space's hot gfns."""
    gfns = draw(st.lists(st.sampled_from(space.hot), min_size=1, max_size=4, unique=True))
    maps = AccessMaps(gfn=np.array(gfns, np.uint64),
                      access=np.array([draw(st.one_of(st.sampled_from(space.palette),
                                                      S.access_maps())) for _ in gfns], np.uint32))
    ranges = []
    for g in draw(st.lists(st.sampled_from(space.hot), min_size=1, max_size=4)):
        offset = draw(st.integers(0, B.PAGE_SIZE - 1))
        length = draw(st.integers(1, B.PAGE_SIZE - offset))
        ranges.append((g * B.PAGE_SIZE + offset, length))
    return maps, ranges


def write_inputs(directory: str, maps: AccessMaps, ranges, timeline) -> dict[str, str]:
    paths = {"maps": os.path.join(directory, "maps.parquet"),
             "ranges": os.path.join(directory, "ranges.parquet"),
             "ops": os.path.join(directory, "ops.csv")}
    pq.write_table(pa.table({"gfn": maps.gfn, "access": maps.access}), paths["maps"])
    pq.write_table(pa.table({"gpa": pa.array([g for g, _ in ranges], pa.uint64()),
                             "length": pa.array([n for _, n in ranges], pa.uint32()),
                             "name": [f"h{i}" for i in range(len(ranges))]}), paths["ranges"])
    rows = [{"at": at, "op": op, "gfn": gfn, "npages": npages, "access": access}
            for at, op, gfn, npages, access in timeline]
    table = pa.Table.from_pylist(rows, schema=pa.schema([("at", pa.int64()), ("op", pa.string()),
                                                         ("gfn", pa.int64()), ("npages", pa.int64()),
                                                         ("access", pa.int64())]))
    pacsv.write_csv(table, paths["ops"])
    return paths


@st.composite
def configs(draw, vcpus: int):
    out = []
    for i in range(draw(st.integers(1, 4))):
        out.append(dict(
            name=f"c{i}",
            profile=draw(st.sampled_from(["v4", "v4", "v12"])),
            granularity=draw(st.sampled_from(["spp", "spp", "page"])),
            subpage_check=draw(st.sampled_from(["all", "first"])),
            hugepages=draw(st.sampled_from([None, False, True])),
            # fewer vCPUs than the trace uses: that configuration fails, alone
            vcpus=draw(st.sampled_from([None, None, None, max(1, vcpus - 1), vcpus + 1])),
            protect=draw(st.sampled_from([None, None, "ranges", W.NO_PROTECTION])),
            ops=draw(st.sampled_from([None, None, "ops"])),
        ))
    return out


@settings(max_examples=S.EXAMPLES, **S.SETTINGS)
@given(st.data())
def test_each_configuration_equals_its_serial_replay(data):
    spec = data.draw(S.vm_specs(max_vcpus=4))
    space = data.draw(S.spaces(spec.memslots))
    rows = data.draw(S.traces(space, spec.vcpus, max_size=150))
    trace = S.trace_arrays(rows)
    maps, ranges = data.draw(protections(space))
    timeline = data.draw(S.timelines(space, len(rows)))
    drawn = data.draw(configs(spec.vcpus))
    batch_size = data.draw(st.sampled_from([1, 3, 7, 50, 1 << 20]))
    with tempfile.TemporaryDirectory() as d:
        paths = write_inputs(d, maps, ranges, timeline)
        cfgs = [W.Config(**{**c, "protect": paths.get(c["protect"], c["protect"]),
                            "ops": paths[c["ops"]] if c["ops"] else None}) for c in drawn]
        note(f"configs: {[c.spec for c in cfgs]}")
        common = dict(memslots=[tuple(s) for s in spec.memslots], vcpus=spec.vcpus,
                      batch_size=batch_size)
        expect = {c.label: serial(c, trace, protections=paths["maps"], **common) for c in cfgs}
        swept = [W.sweep(trace, cfgs, protection=paths["maps"], threads=threads,
                         keep=("results", "exits"), on_error="record", **common)
                 for threads in (1, 2, 2)]
    for result in swept:
        assert [r["name"] for r in result.table.to_pylist()] == [c.label for c in cfgs]
        for name, want in expect.items():
            if want[0] == "raised":
                assert result.errors[name] == f"configuration {name}: {want[2]}"
                assert name not in result.summaries
                continue
            got = result.outputs[name]
            assert name not in result.errors
            assert got.table.equals(want[1].table), name
            assert got.exits.equals(want[1].exits), name
            assert figures(got.summary) == figures(want[1].summary), name
            assert got.summary["input"]["rows"] == want[1].summary["input"]["rows"]
            row = result.table.to_pylist()[[c.label for c in cfgs].index(name)]
            assert row["exits"] == want[1].summary["exits"]["total"]
            assert row["exits_spp_violation"] == want[1].summary["exits"]["spp_violation"]
            assert row["pages_touched"] == want[1].summary["pages"]["touched"]
    # deterministic: the same inputs give the same table, whatever the threads
    assert timeless(swept[0].table).equals(timeless(swept[1].table))
    assert timeless(swept[1].table).equals(timeless(swept[2].table))


def test_a_failing_configuration_stops_the_sweep_with_its_named_error():
    trace = {"gpa": np.array([0x1000, 0x2000], np.uint64), "vcpu": np.array([0, 1], np.uint16)}
    configs = [W.Config("ok", vcpus=2), W.Config("small", vcpus=1)]
    with pytest.raises(InputError, match=r"^configuration small: trace: column 'vcpu' has value 1 at row 1"):
        W.sweep(trace, configs, memory="1MiB", batch_size=1)
    result = W.sweep(trace, configs, memory="1MiB", batch_size=1, on_error="record")
    rows = result.table.to_pylist()
    assert rows[0]["error"] is None and rows[0]["accesses"] == 2
    assert rows[1]["error"].startswith("configuration small: trace:") and rows[1]["accesses"] is None


# ------------------------------------------------------------------------ the runner

class FakeSession:
    """Records the batches it is given; fails at batch ``fail_at``."""

    def __init__(self, fail_at=None):
        self.fail_at = fail_at
        self.seen = []
        self.rows = 0

    def run(self, batch, keep=False):
        if self.fail_at is not None and len(self.seen) == self.fail_at:
            raise InputError(f"boom at {self.fail_at}")
        self.seen.append(batch)
        self.rows += len(batch)


def fake_reader(nbatches: int, rows: int = 4, counter=None):
    from sppjit.io.trace import open_trace

    gpa = np.arange(nbatches * rows, dtype=np.uint64) * np.uint64(8)
    for batch in open_trace({"gpa": gpa}, batch_size=rows):
        if counter is not None:
            counter.append(batch.first_row)
        yield batch


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_lanes_share_each_batch_read_only_and_see_every_batch_in_order(threads):
    lanes = [W.Lane(f"l{i}", FakeSession()) for i in range(3)]
    W.run_lanes(fake_reader(9), lanes, threads)
    first = lanes[0].session.seen
    assert [b.first_row for b in first] == list(range(0, 36, 4))
    for lane in lanes[1:]:
        for a, b in zip(first, lane.session.seen):
            assert a.first_row == b.first_row
            for column in ("gpa", "size", "vcpu", "kind", "insn_len"):
                x, y = getattr(a, column), getattr(b, column)
                assert np.shares_memory(x, y)  # one decoded batch, not a copy per lane
                assert not x.flags.writeable and not y.flags.writeable


def test_decoded_batches_stay_within_the_lookahead_window():
    produced = []
    consumed = {i: 0 for i in range(2)}
    ahead = []

    class Slow(FakeSession):
        def __init__(self, index):
            super().__init__()
            self.index = index

        def run(self, batch, keep=False):
            ahead.append(len(produced) - min(consumed.values()))
            super().run(batch)
            consumed[self.index] += 1

    lanes = [W.Lane(f"l{i}", Slow(i)) for i in range(2)]
    W.run_lanes(fake_reader(20, counter=produced), lanes, 2)
    assert len(produced) == 20 and all(len(lane.session.seen) == 20 for lane in lanes)
    assert max(ahead) <= W.LOOKAHEAD


@pytest.mark.parametrize("threads", [1, 2])
def test_stop_on_error_reports_the_first_failure_in_batch_then_lane_order(threads):
    lanes = [W.Lane("a", FakeSession(fail_at=5)), W.Lane("b", FakeSession(fail_at=2)),
             W.Lane("c", FakeSession(fail_at=2)), W.Lane("d", FakeSession())]
    W.run_lanes(fake_reader(10), lanes, threads, stop_on_error=True)
    assert W.first_failure(lanes).name == "b"
    assert str(lanes[1].error) == "boom at 2" and lanes[1].failed_batch == 2
    # the others stop after the failing batch: no lane runs past it
    assert len(lanes[3].session.seen) == 3 and len(lanes[0].session.seen) == 3
    lanes = [W.Lane("a", FakeSession(fail_at=5)), W.Lane("d", FakeSession())]
    W.run_lanes(fake_reader(10), lanes, threads, stop_on_error=False)
    assert len(lanes[1].session.seen) == 10 and lanes[0].failed_batch == 5


@pytest.mark.parametrize("threads", [1, 2])
def test_a_bad_row_in_the_trace_is_raised_once_for_all_lanes(threads):
    from sppjit.io.trace import open_trace

    gpa = np.arange(12, dtype=np.uint64)
    size = np.full(12, 8, np.uint16)
    size[9] = 0  # bad
    lanes = [W.Lane(f"l{i}", FakeSession()) for i in range(2)]
    with pytest.raises(InputError, match="row 9"):
        W.run_lanes(open_trace({"gpa": gpa, "size": size}, batch_size=4), lanes, threads)
    assert all(len(lane.session.seen) <= 2 for lane in lanes)


@pytest.mark.skipif(os.environ.get("NUMBA_DISABLE_JIT") == "1", reason="no compiled kernels")
def test_the_kernels_release_the_gil():
    """The sweep's threads replay in parallel only because every compiled kernel is nogil."""
    import numba

    from sppjit.kernels import exits, mmu, replay

    dispatchers = [obj for module in (replay, exits, mmu) for obj in vars(module).values()
                   if isinstance(obj, numba.core.registry.CPUDispatcher)]
    assert replay.replay_batch in dispatchers
    assert all(d.targetoptions.get("nogil") for d in dispatchers), [
        d.py_func.__name__ for d in dispatchers if not d.targetoptions.get("nogil")]


# ------------------------------------------------------------------------ configurations

def test_spec_strings_dicts_and_their_errors():
    c = W.parse_config("profile=v12, granularity=page,subpage-check=first,hugepages=on,vcpus=2")
    assert c == W.Config(profile="v12", granularity="page", subpage_check="first",
                         hugepages=True, vcpus=2)
    assert c.label == "v12_page_first_huge_2vcpu"
    assert W.parse_config("v12,first,hugepages") == W.Config(profile="v12", subpage_check="first",
                                                            hugepages=True)
    assert W.parse_config(c.as_dict()) == c
    assert W.parse_config(c.spec) == c
    assert W.parse_config("name=x,protect=dir/hooks.parquet").label == "x"
    assert W.parse_config("protect=dir/hooks.parquet").label == "v4_spp_all_hooks"
    json.dumps(c.as_dict())  # plain data
    for bad, message in (("profile=v5", "profile must be one of"), ("colour=red", "unknown key"),
                         ("", "empty spec"), ("v4,,page", "empty item"), ("v4,v12", "given twice"),
                         ("hugepages=maybe", "on or off"), ("vcpus=two", "number"),
                         ("vcpus=0", "1..1024"), ("name=a b", "name"), ("protect=", "needs a value"),
                         ("banana", "cannot read")):
        with pytest.raises(InputError, match=message):
            W.parse_config(bad)
    with pytest.raises(InputError, match="unknown field"):
        W.parse_config({"profile": "v4", "engine": "jit"})
    with pytest.raises(InputError, match="spec string"):
        W.parse_config(42)


def test_several_protections_cross_the_configurations():
    out = W.expand_configs(["v4", "v12,protect=own.csv"], ["a/hooks.parquet", "b/maps.csv"])
    assert [(c.label, c.protect) for c in out] == [
        ("v4_spp_all@hooks", "a/hooks.parquet"), ("v4_spp_all@maps", "b/maps.csv"),
        ("v12_spp_all_own", "own.csv")]
    with pytest.raises(InputError, match="distinct"):
        W.expand_configs(["v4", "profile=v4"])


def test_default_sweep_equals_compare():
    """compare's document comes from the same runner: its summaries' figures equal the
    default sweep's (page, spp_v4, spp_v12) with the same protection."""
    from sppjit.compare import compare

    page = 0x100 << 12
    trace = {"gpa": np.array([page + 124, page + 200, page + 1000, page + 4090], np.uint64),
             "size": np.array([8, 8, 8, 16], np.uint16)}
    hooks = ByteRanges(gpa=np.array([page + 120], np.uint64), length=np.array([16], np.uint32),
                       name=["cred"])
    doc = compare(trace, hooks, memory="16MiB", threads=2)
    import sppjit

    result = sppjit.sweep(trace, protection=hooks, memory="16MiB", threads=2)  # the module calls sweep
    for c in doc["configs"]:
        ours = result.summaries[c["name"]]
        assert {k: c["summary"].get(k) for k in ("counts", "exits", "pages")} == \
               {k: ours.get(k) for k in ("counts", "exits", "pages")}
        assert c["summary"]["hooks"]["relevant"] == ours["hooks"]["relevant"]
        assert c["summary"]["hooks"]["irrelevant"] == ours["hooks"]["irrelevant"]


# ------------------------------------------------------------------------ command line

runner = CliRunner()


@pytest.fixture()
def files(tmp_path):
    page = 0x100 << 12
    trace = tmp_path / "t.parquet"
    pq.write_table(pa.table({"gpa": pa.array([page + 124, page + 200, page + 1000], pa.uint64()),
                             "vcpu": pa.array([0, 1, 0], pa.uint16())}), trace)
    protect = tmp_path / "hooks.csv"
    protect.write_text(f"gpa,length,name\n{page + 120},16,cred\n")
    out = tmp_path / "out"
    out.mkdir()
    return tmp_path, trace, protect, out


def one_error_line(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("sppjit: error:"), result.stderr
    return lines[0]


def test_cli_writes_the_table_and_each_configurations_outputs(files):
    tmp, trace, protect, out = files
    args = ["sweep", str(trace), "--protect", str(protect), "--memory", "16MiB", "--vcpus", "2",
            "--config", "page", "--config", "v4", "--config", "v12,first,name=v12f",
            "--threads", "2", "--outdir", str(out), "--results"]
    result = runner.invoke(cli.app, args + ["--out", str(tmp / "s.parquet"), "--summary",
                                            str(tmp / "s.json")])
    assert result.exit_code == 0, result.output
    for text in ("v4_page_all", "v4_spp_all", "v12f", "write_protect", "relevant"):
        assert text in result.stdout
    table = pq.read_table(tmp / "s.parquet")
    assert table.column("name").to_pylist() == ["v4_page_all", "v4_spp_all", "v12f"]
    assert table.column("exits_write_protect").to_pylist() == [3, 0, 0]
    assert table.column("exits_spp_violation").to_pylist() == [0, 2, 2]  # 124 and 200: sub-pages 0, 1
    assert table.column("hooks_relevant").to_pylist() == [1, 1, 1]
    assert sorted(os.listdir(out)) == sorted(f"{n}.{k}" for n in ("v4_page_all", "v4_spp_all", "v12f")
                                             for k in ("summary.json", "exits.parquet", "results.parquet"))
    summary = json.loads((out / "v12f.summary.json").read_text())
    assert summary["config"]["subpage_check"] == "first" and summary["input"]["format"] == "parquet"
    assert pq.read_table(out / "v4_page_all.exits.parquet").num_rows == 4  # ept_fault + 3
    assert pq.read_table(out / "v4_spp_all.results.parquet").column("outcome").to_pylist() == [1, 1, 0]
    doc = json.loads((tmp / "s.json").read_text())
    assert [r["name"] for r in doc["rows"]] == ["v4_page_all", "v4_spp_all", "v12f"]
    # the same inputs give the same table (but for the timing columns)
    again = runner.invoke(cli.app, args[:-3] + ["--out", str(tmp / "again.parquet")])
    assert again.exit_code == 0, again.output
    assert timeless(pq.read_table(tmp / "again.parquet")).equals(timeless(table))
    result = runner.invoke(cli.app, ["sweep", str(trace), "--protect", str(protect), "--memory",
                                     "16MiB", "--vcpus", "2", "--json"])
    assert result.exit_code == 0, result.output
    assert [r["name"] for r in json.loads(result.stdout)["rows"]] == ["page", "spp_v4", "spp_v12"]


def test_cli_errors_are_one_line_and_leave_no_output(files):
    tmp, trace, protect, out = files
    base = ["sweep", str(trace), "--memory", "16MiB"]
    assert "cannot read" in one_error_line(runner.invoke(cli.app, base + ["--config", "v5"]))
    assert "distinct" in one_error_line(runner.invoke(cli.app, base + ["--config", "v4", "--config", "v4"]))
    assert "--outdir" in one_error_line(runner.invoke(cli.app, base + ["--outdir", str(tmp / "nope")]))
    assert "--results needs" in one_error_line(runner.invoke(cli.app, base + ["--results"]))
    assert "--out" in one_error_line(runner.invoke(cli.app, base + ["--out", str(tmp / "s.csv")]))
    assert "no such file" in one_error_line(runner.invoke(cli.app, base + ["--protect", str(tmp / "x.csv")]))
    # a configuration with too few vCPUs fails after the others wrote their first batches
    line = one_error_line(runner.invoke(cli.app, base + [
        "--vcpus", "2", "--config", "v4", "--config", "v12,vcpus=1", "--outdir", str(out),
        "--results", "--out", str(tmp / "s.parquet"), "--batch-size", "1"]))
    assert line.startswith("sppjit: error: configuration v12_spp_all_1vcpu: trace: column 'vcpu'")
    assert os.listdir(out) == [] and not (tmp / "s.parquet").exists()
