"""Exactness of the sharded replay (sppjit.shards, docs/parallel.md): threads=N must equal the
serial replay of either engine on every output column, the exit log, every summary counter and
the final state, tables compared by content along every walk (their host-physical addresses,
i.e. pool indices, may differ), and give byte-identical outputs run after run.

The sharding heuristics (smallest piece, smallest segment, balance) are switched off here so
that traces of a few hundred rows are sharded, and barriers are everywhere.
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import pytest
from hypothesis import given, note, settings
from hypothesis import strategies as st
from test_equivalence import assert_results_equal

import sppjit.shards as SH
from sppjit import bits as B
from sppjit.errors import InputError, SppError, VmEntryError
from sppjit.kernels import layout as L
from sppjit.statecheck import check_write_view

import strategies as S  # noqa: E402  (tests/ on sys.path: conftest.py)

EXAMPLES = S.EXAMPLES


@contextlib.contextmanager
def shard_everything():
    saved = SH.MIN_PIECE_ROWS, SH.MIN_SEGMENT_ROWS, SH.MIN_GAIN, SH.SAMPLE_ROWS, SH.MIN_REGIONS
    SH.MIN_PIECE_ROWS, SH.MIN_SEGMENT_ROWS, SH.MIN_GAIN, SH.MIN_REGIONS = 0, 0, 0.0, 0
    try:
        yield
    finally:
        SH.MIN_PIECE_ROWS, SH.MIN_SEGMENT_ROWS, SH.MIN_GAIN, SH.SAMPLE_ROWS, SH.MIN_REGIONS = saved


class Runner(S.Runner):
    """strategies.Runner with the replay's threads."""

    def __init__(self, spec, engine, threads=1, batch_size=None):
        super().__init__(spec, engine, batch_size)
        self.threads = threads
        self.sharded = 0
        self.view_segments = 0

    def replay(self, phase):
        import pyarrow as pa

        from sppjit.io.trace import open_trace
        from sppjit.reference import ModelLivelock
        from sppjit.replay import Replay, ReplayResult

        res = S.PhaseResult()
        batch = phase.batch_size if self.batch_size is None else self.batch_size
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                session = Replay(self.vm, self.engine, ops=phase.timeline_ops(), threads=self.threads)
                out = [session.run(b) for b in open_trace(S.trace_arrays(phase.trace), batch_size=batch)]
                res.result = ReplayResult(table=pa.Table.from_batches(out), exits=session.exit_table(),
                                          summary=session.summary())
                if session._shards is not None:
                    self.sharded += session._shards.parallel_pieces
                    self.view_segments += session._shards.view_segments
                # The write view the shards shared (or left zero) holds against the tables.
                assert check_write_view(self.vm.state) == ""
            except (ModelLivelock, VmEntryError, InputError, SppError) as exc:
                res.error = (type(exc).__name__, str(exc))
        res.warnings = tuple(type(w.message).__name__ for w in caught)
        return res


# ------------------------------------------------------------------------------ comparison
_ADDR = B.PT64_BASE_ADDR_MASK


def _index(st_, e: int) -> int:
    a = e & _ADDR
    if a < B.TABLE_POOL_HPA:
        return -1
    i = (a - B.TABLE_POOL_HPA) >> B.PAGE_SHIFT
    return i if i < int(st_.scal[L.SC_NTABLES]) else -1


def _walk(st_, t: int, level: int, ept: bool, prefix: tuple, out: dict, seen: set) -> None:
    """Every non-zero entry reachable from table ``t``, keyed by its path; pointers to tables
    with their address bits cleared (the pool index is the part that may differ)."""
    seen.add(t)
    for i in np.flatnonzero(st_.tables[t]):
        e = int(st_.tables[t, i])
        key = prefix + (int(i),)
        target = _index(st_, e) if level > 1 else -1
        if ept:
            pointer = level > 1 and e & 7 and not (level <= 3 and e & B.PT_PAGE_SIZE_MASK)
        else:
            pointer = level > 1
        kind = L.TABLE_EPT if ept else L.TABLE_SPPT
        if (pointer and target >= 0 and int(st_.table_kind[target]) == kind
                and int(st_.table_level[target]) == level - 1):
            out[key] = ("table", e & ~_ADDR)
            _walk(st_, target, level - 1, ept, key, out, seen)
        else:
            out[key] = ("entry", e)


def canonical_state(vm) -> dict:
    """The VM's state with table addresses factored out: the EPT and every SPPT tree as
    path -> entry, the tables by kind and level, everything else as it is."""
    st_ = vm.state
    n = int(st_.scal[L.SC_NTABLES])
    seen: set = set()
    trees = {}
    ept: dict = {}
    _walk(st_, int(st_.scal[L.SC_EPT_ROOT]), 4, True, (), ept, seen)
    trees["ept"] = ept
    for root in sorted({int(r) for r in st_.sppt_root if r >= 0} | (
            {int(st_.scal[L.SC_SHARED_SPPT_ROOT])} if st_.scal[L.SC_SHARED_SPPT_ROOT] >= 0 else set())):
        tree: dict = {}
        _walk(st_, root, 4, False, (), tree, seen)
        trees[f"sppt@{root}"] = tree  # roots are allocated by the control plane: same index
    census = {}
    for k, lv in zip(st_.table_kind[:n].tolist(), st_.table_level[:n].tolist()):
        census[(k, lv)] = census.get((k, lv), 0) + 1
    # Tables no root reaches (an SPPT tree replaced by a second init_spp): by content, the
    # addresses in their pointers masked.
    mask = np.uint64(~_ADDR & 0xFFFFFFFFFFFFFFFF)
    orphans = sorted((int(st_.table_kind[t]), int(st_.table_level[t]),
                      tuple((st_.tables[t] & mask if st_.table_level[t] > 1 else st_.tables[t]).tolist()))
                     for t in range(n) if t not in seen)
    arrays = S.state_arrays(vm)
    for name in ("tables", "table_kind", "table_level"):
        del arrays[name]
    return {"trees": trees, "census": census, "orphans": orphans,
            **{k: v.tolist() for k, v in arrays.items()}}


def assert_same_state(vm_a, vm_b, where: str) -> None:
    a, b = canonical_state(vm_a), canonical_state(vm_b)
    for key in a:
        if a[key] != b[key]:
            if key == "trees":
                for t in a[key]:
                    x, y = a[key][t], b[key].get(t, {})
                    diff = sorted(set(x.items()) ^ set(y.items()))[:4]
                    if diff:
                        raise AssertionError(f"{where}: {t} differs: {diff}")
            raise AssertionError(f"{where}: state {key} differs: {a[key]} vs {b[key]}")


def check(scn, oracle_engine: str, threads: int, batch_size=None) -> int:
    """Run ``scn`` serially with ``oracle_engine`` and sharded on ``threads``; returns how many
    pieces ran sharded."""
    a = Runner(scn.vm, oracle_engine, 1, batch_size)
    b = Runner(scn.vm, "jit", threads, batch_size)
    with shard_everything():
        for p, phase in enumerate(scn.phases):
            ca, cb = a.apply_ops(phase), b.apply_ops(phase)
            assert ca == cb, f"phase {p}: the operations differ:\n{ca}\n---\n{cb}"
            ra, rb = a.replay(phase), b.replay(phase)
            assert_results_equal(ra, rb, f"phase {p}")
            if ra.error is not None:
                break  # a failed replay leaves the state where each engine stopped
            assert_same_state(a.vm, b.vm, f"phase {p}, after its replay")
    return b.sharded


# ------------------------------------------------------------------------------ region-heavy traces
@st.composite
def region_scenarios(draw):
    """A VM of several 2 MiB regions (often more than one GiB apart), SPP on with protection, and
    traces aimed at region edges: accesses crossing a 4 KiB page at a 2 MiB boundary, very
    unbalanced regions (one region holding most rows), MMIO, with a timeline now and then."""
    spec = S.VmSpec(
        memslots=draw(st.sampled_from([((0, 4096),), ((0, 2048), (1 << 18, 1024)), ((512, 1536), (3000, 700))])),
        vcpus=draw(st.integers(1, 8)),
        hugepages=draw(st.booleans()),
        subpage_check=draw(st.sampled_from(["all", "first"])),
        granularity=draw(st.sampled_from(["spp", "spp", "page"])),
        profile=draw(st.sampled_from(["v4", "v12"])),
        table_capacity=draw(st.sampled_from([None, 8])),
    )
    slots = spec.memslots
    top = max(b + n for b, n in slots)
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    hot_region = int(rng.integers(0, max(1, top // 512)))
    edges = [r * 512 for r in range(1, top // 512 + 1)]

    def rows(n):
        out = []
        for _ in range(n):
            pick = int(rng.integers(0, 10))
            if pick < 5:  # the hot region
                g = hot_region * 512 + int(rng.integers(0, 512))
                off, size = int(rng.integers(0, 4096)), int(rng.choice([1, 8, 64, 200]))
            elif pick < 8:  # across a region boundary, or just before / after it
                g = int(rng.choice(edges)) - 1 + int(rng.integers(0, 2))
                off, size = int(rng.choice([0xFF8, 0xFFC, 0xF80, 0x0])), int(rng.choice([8, 16, 200, 4096]))
            elif pick < 9:
                g = int(rng.integers(0, top + 600))  # anywhere, MMIO above the top
                off, size = int(rng.integers(0, 4096)), 8
            else:
                g = int(rng.integers(0, 1 << 24))  # far away (MMIO beyond the region caches)
                off, size = 0x10, 4
            out.append((g << 12 | off, size, int(rng.integers(0, spec.vcpus)), int(rng.choice([0, 1, 1, 2]))))
        return tuple(out)

    palette = (0, 0xFFFF0000, 0x0000FFFF, 0x0F0F0F0F, S.FULL)
    ops: list = [("init",)]
    for _ in range(int(rng.integers(1, 6))):
        base, n = slots[int(rng.integers(0, len(slots)))]
        run = int(rng.integers(1, 65))
        g = base + int(rng.integers(0, max(1, n - run)))
        ops.append(("set", g, tuple(int(m) for m in rng.choice(palette, min(run, base + n - g)))))
    if draw(st.booleans()):
        ops = []  # SPP off
    trace = rows(int(rng.integers(50, 400)))
    timeline = ()
    if ops and draw(st.booleans()):
        at = int(rng.integers(0, len(trace)))
        op = str(rng.choice(["set_subpages", "zap", "remap", "delete_memslot"]))
        timeline = ((at, op, int(slots[0][0]) + 3, 64, 0),)
    second = rows(int(rng.integers(20, 200)))
    return S.Scenario(vm=spec, phases=(S.Phase(ops=tuple(ops), trace=trace, timeline=timeline),
                                       S.Phase(trace=second)))


@settings(max_examples=EXAMPLES, **S.SETTINGS)
@given(scn=region_scenarios(), threads=st.integers(1, 4), oracle=st.sampled_from(["jit", "reference"]))
def test_region_edges_equal_serial(scn, threads, oracle):
    note(repr(scn))
    check(scn, oracle, threads)


@settings(max_examples=EXAMPLES, **S.SETTINGS)
@given(scn=S.scenarios(max_total=400), threads=st.integers(2, 4), oracle=st.sampled_from(["jit", "reference"]))
def test_drawn_scenarios_equal_serial(scn, threads, oracle):
    """The equivalence suite's scenarios (pokes, host operations, timelines, 1..8 vCPUs)."""
    note(repr(scn))
    check(scn, oracle, threads)


def test_sharding_happens(monkeypatch):
    """The property tests above would pass with a runner that never shards: make sure it does,
    with barriers and several segments, on a trace of every kind of row; and that compaction
    moves tables whose cache entries have write-view rows, which it keeps (Runner.replay
    holds the view against the tables after every replay)."""
    relocate, kept = SH._relocate, []

    def counting(st_, remap, nt0, end):
        slots = np.flatnonzero(((st_.ept_cache & L.CACHE_PAYLOAD_MASK) >> 4 >= nt0)
                               & ((st_.ept_cache & L.CACHE_PAYLOAD_MASK) >> 4 < end)
                               & (st_.ept_cache != L.CACHE_INVALID))
        before = st_.write_view[:, slots, :].copy()
        relocate(st_, remap, nt0, end)
        if before.any():
            assert np.array_equal(st_.write_view[:, slots, :], before)
            kept.append(int(np.count_nonzero(before)))

    monkeypatch.setattr(SH, "_relocate", counting)
    scn = S.big_scenario(S.VmSpec(memslots=((0, 3 << 18),), vcpus=3, profile="v4"), seed=7)
    a = Runner(scn.vm, "jit", 1)
    b = Runner(scn.vm, "jit", 3)
    with shard_everything():
        for phase in scn.phases:
            a.apply_ops(phase), b.apply_ops(phase)
            assert_results_equal(a.replay(phase), b.replay(phase), "big")
            assert_same_state(a.vm, b.vm, "big")
    assert b.sharded >= 2
    assert b.view_segments >= 1  # the shards shared the write view, and it held (Runner.replay)
    assert kept  # rows under moved tables' entries were kept, and held


@pytest.mark.parametrize("capacity,threads,limit", [(97, 2, 1 << 20), (97, 3, 1 << 20), (97, 2, 200),
                                                    (97, 3, 200), (4096, 2, 1 << 20)])
def test_exit_log_merged_across_flushes(capacity, threads, limit, monkeypatch):
    """The shards' logs are merged in row order, each segment's after the exits of the rows
    before it (barriers, in the replay's log, which fills and is flushed many times here), also
    when a shard's log fills in a segment and hands its rows aside part by part (a limit of
    200 rows)."""
    import pyarrow as pa

    import sppjit.replay as R
    from sppjit.io.trace import open_trace
    from sppjit.replay import Replay, ReplayResult
    from sppjit.summary import ReplaySummary
    from sppjit.vm import VM

    monkeypatch.setattr(R, "EXIT_LOG_CAPACITY", capacity)
    monkeypatch.setattr(SH, "LOG_ROWS_LIMIT", limit)
    rng = np.random.default_rng(5)
    n = 40000
    gpa = (rng.integers(0, 3 << 18, n).astype(np.uint64) << np.uint64(12)) | rng.integers(0, 4096 - 8, n).astype(
        np.uint64)
    trace = {"gpa": gpa, "size": np.full(n, 8, dtype=np.uint16),
             "vcpu": rng.integers(0, 3, n).astype(np.uint16), "kind": rng.integers(0, 3, n).astype(np.uint8),
             "insn_len": rng.integers(1, 16, n).astype(np.uint8)}
    out = []
    for n_threads in (1, threads):
        vm = VM(memory="3GiB", vcpus=3)
        gfns = np.unique(gpa[::7] >> np.uint64(12))
        vm.protect(gfns, np.full(gfns.shape[0], 0x5555_0000, dtype=np.uint32))
        with shard_everything():
            session = Replay(vm, threads=n_threads)
            table = pa.Table.from_batches([session.run(b) for b in open_trace(trace, batch_size=16384)])
            res = ReplayResult(table=table, exits=session.exit_table(), summary=session.summary())
            assert n_threads == 1 or session._shards.parallel_pieces > 0
            if n_threads > 1:
                assert all(log.row.shape[0] == max(limit, capacity) for _, log in session._shards._scratch.values())
        out.append((res, canonical_state(vm)))
    (a, sa), (b, sb) = out
    assert a.exits.num_rows > 8 * capacity  # the merge crossed flushes
    assert a.table.equals(b.table) and a.exits.equals(b.exits)
    timeless = [{k: v for k, v in r.summary.items() if k not in ReplaySummary.TIMINGS} for r in (a, b)]
    assert timeless[0] == timeless[1] and sa == sb


def test_write_view_shared_only_where_no_regions_share_a_cache_entry():
    """The shards use the VM's write view only when every region a piece reaches (a crossing
    row's second piece included) has a region-cache entry of its own; a row beyond them (an
    MMIO address past the memslots, whose region shares an entry with one of RAM) or a VM
    without a view makes them run without it."""
    from sppjit.io.trace import open_trace
    from sppjit.vm import VM

    vm = VM(memory="64MiB", vcpus=2)
    vm.protect(np.arange(4, dtype=np.uint64), np.full(4, 0x5555_0000, dtype=np.uint32))
    runner = _runner(vm, 2)
    entries = vm.state.ept_cache.shape[0]
    assert vm.state.write_view.shape[1] == entries == 32  # one entry per 2 MiB region

    def piece(top):
        gpa = np.array([0, top], dtype=np.uint64)
        return next(iter(open_trace({"gpa": gpa, "size": np.full(2, 8, dtype=np.uint16)})))

    region = 2 << 20
    assert runner._view_shared(piece(entries * region - 4096 - 1))
    assert not runner._view_shared(piece(entries * region - 4096))  # its last byte may reach region 32
    assert not runner._view_shared(piece(1 << 40))
    runner_bare = _runner(VM(memory="64MiB", vcpus=2), 2)
    runner_bare.session.vm.state = runner_bare.session.vm.state._replace(
        write_view=np.zeros((2, 0, 512), dtype=np.uint32))
    assert not runner_bare._view_shared(piece(0))


@pytest.mark.parametrize("profile", ["v4", "v12"])
def test_deterministic(profile):
    """The same N gives byte-identical outputs and state (table addresses included), run
    after run."""
    scn = S.big_scenario(S.VmSpec(memslots=((0, 2 << 18), (5 << 18, 513)), vcpus=2, profile=profile,
                                  hugepages=True), seed=3)
    runs = []
    for _ in range(2):
        r = Runner(scn.vm, "jit", 4)
        with shard_everything():
            outs = []
            for phase in scn.phases:
                r.apply_ops(phase)
                outs.append(r.replay(phase))
        runs.append((r, outs))
    (ra, oa), (rb, ob) = runs
    for x, y in zip(oa, ob):
        assert x.error is None and y.error is None
        assert x.result.table.equals(y.result.table) and x.result.exits.equals(y.result.exits)
        assert x.result.summary["pages"] == y.result.summary["pages"]
    sa, sb = S.state_arrays(ra.vm), S.state_arrays(rb.vm)
    for k in sa:
        assert np.array_equal(sa[k], sb[k]), k
    assert ra.sharded >= 1


def test_threads_argument():
    from sppjit.vm import VM

    vm = VM(memory="8MiB")
    trace = {"gpa": np.arange(0, 8 << 20, 4096, dtype=np.uint64)}
    for bad in (0, -1, 65, 1.5, "x", True):
        with pytest.raises(InputError):
            vm.replay(trace, threads=bad)
    r1 = VM(memory="8MiB").replay(trace)
    with shard_everything():
        r2 = VM(memory="8MiB").replay(trace, threads="auto")
    assert r1.table.equals(r2.table) and r1.summary["pages"] == r2.summary["pages"]


def test_job_and_command(tmp_path):
    """`threads` is a field of the library job (JSON round trip, checked) and `--threads` an
    option of `sppjit replay`: a sharded command run writes the serial run's outputs."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq
    from typer.testing import CliRunner

    from sppjit.cli import app
    from sppjit.datasets import scenarios as D
    from sppjit.job import Job, JobInputs, check

    job = Job(inputs=JobInputs(trace="t.parquet"), threads=3)
    assert Job.from_json(job.to_json()) == job
    assert Job.from_dict({"inputs": {"trace": "t.parquet"}}).threads == 1
    with pytest.raises(InputError, match="threads"):
        check(Job(inputs=JobInputs(trace="t.parquet"), threads=0))

    sc = D.make("guarded", 20000, seed=5)
    trace, prot = tmp_path / "t.parquet", tmp_path / "p.parquet"
    pq.write_table(pa.table(sc.columns()), trace)
    pq.write_table(pa.table({"gfn": sc.protect_gfn, "access": sc.protect_access}), prot)
    cli = CliRunner()
    outs = {}
    with shard_everything():
        for threads in ("1", "2"):
            ex, summ = tmp_path / f"e{threads}.parquet", tmp_path / f"s{threads}.json"
            res = cli.invoke(app, ["replay", str(trace), "--protect", str(prot), "--vcpus", str(sc.vcpus),
                                   "--memory", str(sc.memory), "--threads", threads, "--exits", str(ex),
                                   "--summary", str(summ)])
            assert res.exit_code == 0, res.output
            doc = json.loads(summ.read_text())
            outs[threads] = (pq.read_table(ex), {k: doc[k] for k in ("counts", "exits", "pages", "tlb_flushes")})
        bad = cli.invoke(app, ["replay", str(trace), "--threads", "zero"])
    assert outs["1"][0].equals(outs["2"][0]) and outs["1"][1] == outs["2"][1]
    assert bad.exit_code == 2 and "--threads" in bad.stderr


def test_bench_threads_section():
    from sppjit.bench import format_parallel, run_parallel

    result = run_parallel(["guarded"], accesses=20000, repeat=1, threads=2)
    s = result["scenarios"]["guarded"]["shards"]
    assert s["threads"] == 2 and s["serial_seconds"] > 0 and s["sharded_seconds"] > 0
    assert s["table_serial_seconds"] > 0 and s["table_sharded_seconds"] > 0
    assert s["table_speedup"] == s["table_serial_seconds"] / s["table_sharded_seconds"]
    text = format_parallel(result)
    assert "one trace on shards" in text and f"{s['table_speedup']:.2f}x" in text


def test_bench_shards_refuses_a_table_that_differs(monkeypatch):
    """The bench's table figures are of equal tables: a sharded replay whose results differed
    from the serial one's would be an error, not a timing."""
    import sppjit.bench as BN
    from sppjit.datasets import scenarios

    real = SH.ShardRunner.run_piece

    def off_by_one(self, piece, outcome, exits, reason, keep, first_rows=True):
        real(self, piece, outcome, exits, reason, keep, first_rows)
        if keep and len(outcome):
            outcome[0] ^= 1

    monkeypatch.setattr(SH.ShardRunner, "run_piece", off_by_one)
    with pytest.raises(RuntimeError, match="results or exit log differ"):
        BN._sharded_replays(scenarios.make("uniform", 5000, 0), 1 << 20, 1, 2)


def test_pool_rounds_and_hooks(monkeypatch):
    """Shards whose chunk of the pool runs out while the pool is full wait for another round
    (the pool grows between rounds); hook relevance is annotated on the merged exit log."""
    from sppjit.io.protect import ByteRanges, ranges_to_maps
    from sppjit.replay import Replay, replay
    from sppjit.vm import VM

    rng = np.random.default_rng(11)
    n = 30000
    saved_guess = SH.GUESS_TABLES
    gpa = (rng.integers(0, 3 << 18, n).astype(np.uint64) << np.uint64(12)) | rng.integers(0, 4096 - 8, n).astype(
        np.uint64)
    trace = {"gpa": gpa, "size": np.full(n, 8, dtype=np.uint16),
             "vcpu": rng.integers(0, 2, n).astype(np.uint16), "kind": np.ones(n, dtype=np.uint8)}
    hooks = ByteRanges(gpa=gpa[:300:3] & ~np.uint64(127), length=np.full(100, 64, dtype=np.uint32),
                       name=[f"h{i}" for i in range(100)])
    maps = ranges_to_maps(hooks)
    out = []
    saved = SH.RESERVE
    runners = []

    class Runner_(SH.ShardRunner):
        def __init__(self, *a):
            super().__init__(*a)
            runners.append(self)

    monkeypatch.setattr(SH, "ShardRunner", Runner_)
    monkeypatch.setattr(SH, "HEADROOM", 0)  # no room made for the shards' chunks beforehand
    for threads in (1, 3):
        vm = VM(memory="3GiB", vcpus=2, table_capacity=16)
        vm.protect(maps.gfn, maps.access)
        with shard_everything():
            SH.RESERVE, SH.GUESS_TABLES = 1, False  # first chunks the minimum: shards run out
            try:
                res = replay(vm, trace, hooks=hooks, threads=threads, batch_size=8192)
                session = Replay(vm, threads=threads)  # a second replay on the same state
                again = [session.run(b) for b in __import__("sppjit.io.trace", fromlist=["x"]).open_trace(
                    trace, batch_size=8192)]
            finally:
                SH.RESERVE, SH.GUESS_TABLES = saved, saved_guess
        out.append((res, again, session, canonical_state(vm)))
    (a, a2, _, sa), (b, b2, sb_session, sb) = out
    assert a.table.equals(b.table) and a.exits.equals(b.exits)
    assert "relevant" in b.exits.column_names and a.summary["hooks"] == b.summary["hooks"]
    assert all(x.equals(y) for x, y in zip(a2, b2))
    assert sa == sb
    assert sb_session._shards.parallel_pieces > 0 and sum(r.rounds for r in runners) > 0


# ------------------------------------------------------------------------------ the partition pass
def _runner(vm, threads):
    from sppjit.replay import Replay

    return Replay(vm, threads=threads)._shards


@pytest.mark.parametrize("threads", [2, 3, 4])
def test_partition_gives_each_shard_its_rows_in_order(threads):
    """One pass over the rows, shared by the shards (chunks meeting in pairs, moved together
    afterwards): shard s gets exactly the rows whose region falls in its range, in trace order,
    with all their columns (one constant but for a row near the end among them)."""
    from sppjit.io.trace import open_trace
    from sppjit.vm import VM

    rng = np.random.default_rng(threads)
    n = 50021  # odd: chunks of unequal length
    gpa = (rng.integers(0, 1 << 19, n).astype(np.uint64) << np.uint64(12)) | rng.integers(0, 4000, n).astype(np.uint64)
    size = np.full(n, 8, dtype=np.uint16)
    size[n - 3] = 4  # constant but for a row near the end
    kind = rng.integers(0, 3, n).astype(np.uint8)
    vm = VM(memory="2GiB", vcpus=3)
    batch = next(iter(open_trace({"gpa": gpa, "size": size, "kind": kind,
                                  "vcpu": np.full(n, 2, dtype=np.uint16)}, batch_size=n)))
    runner = _runner(vm, threads)
    with shard_everything():
        bounds, regions, edges = runner._bounds(batch.gpa)
        lay = SH._take_layout(threads, n, [c.dtype for c in SH._kernel_columns(batch)])
        shards, cand, cand_flags, _ = runner._split(batch, lay, bounds, regions, edges)
    assert len(shards) == len(bounds) + 1 >= 2
    sid = np.searchsorted(bounds, gpa >> np.uint64(21), side="right")
    columns = SH._kernel_columns(batch)
    for sh in shards:
        rows = np.flatnonzero(sid == sh.index)
        assert np.array_equal(sh.rows, rows)
        for mine, whole in zip(sh.columns, columns):
            assert mine.dtype == whole.dtype and np.array_equal(mine, whole[rows])
    # Every row of a fresh VM is a candidate (no EPT level-2 table yet), in order.
    assert np.array_equal(cand, np.arange(n)) and np.all(cand_flags & SH.F_EPT)
    SH._give_layout(lay)


def test_hot_working_set_runs_serially():
    """A piece whose sampled rows fall in fewer than MIN_REGIONS regions is replayed serially
    (the rule reads the rows only: the same trace takes the same path every run); one spread
    over many regions is sharded; both equal the serial replay."""
    from sppjit.vm import VM

    rng = np.random.default_rng(5)
    n = 1 << 16
    hot = {"gpa": (rng.integers(0, 8 << 21, n).astype(np.uint64) & ~np.uint64(7))}
    wide = {"gpa": (rng.integers(0, 1 << 31, n).astype(np.uint64) & ~np.uint64(7))}
    for trace, sharded in ((hot, False), (wide, True)):
        serial = VM(memory="2GiB").replay(trace)
        vm = VM(memory="2GiB")
        from sppjit.replay import Replay

        session = Replay(vm, threads=2)
        from sppjit.io.trace import open_trace

        out = [session.run(b) for b in open_trace(trace, batch_size=n)]
        r = session._shards
        assert (r.parallel_pieces, r.hot_pieces) == ((1, 0) if sharded else (0, 1))
        assert serial.table.equals(__import__("pyarrow").Table.from_batches(out))
        assert serial.summary["exits"] == session.summary()["exits"]


@pytest.mark.parametrize("profile", ["v4", "v12"])
def test_spp_bit_in_a_gib_without_maps(profile):
    """A GiB with no stored map skips the per-row SPPT test only when no EPT leaf in it has the
    SPP bit: a leaf given bit 61 by hand (an SPPT miss builds SPPT tables shared by regions)
    keeps its rows barriers, and the sharded replay equals the serial one."""
    from sppjit.vm import VM

    rng = np.random.default_rng(9)
    n = 20000
    gpa = (rng.integers(0, 1 << 19, n).astype(np.uint64) << np.uint64(12)) & np.uint64((1 << 31) - 1)
    trace = {"gpa": gpa, "kind": np.ones(n, dtype=np.uint8)}
    states = []
    for threads in (1, 3):
        vm = VM(memory="2GiB", profile=profile)
        vm.init_spp()
        vm.replay({"gpa": gpa[:2000]})  # map some pages
        st_ = vm.state
        g = int(gpa[5000]) >> 12  # a page mapped by then? map it first to be sure
        vm.replay({"gpa": np.array([g << 12], dtype=np.uint64)})
        t = int(st_.scal[L.SC_EPT_ROOT])
        for level in (4, 3, 2):
            t = _index(st_, int(vm.state.tables[t, (g >> (9 * (level - 1))) & 511]))
        vm.state.tables[t, g & 511] |= np.uint64(B.PT64_SPP_MASK)
        assert not SH._gib_spp_free(vm.state, np.uint64(g >> 18), np.uint64(B.PT64_SPP_MASK))
        with shard_everything():
            res = vm.replay(trace, threads=threads)
        states.append((res, vm))
    (a, va), (b, vb) = states
    assert a.table.equals(b.table) and a.exits.equals(b.exits) and a.summary["exits"] == b.summary["exits"]
    assert_same_state(va, vb, "after")


def test_long_piece_planned_in_parts():
    """A piece longer than MAX_PLAN_ROWS (shard positions are int32) is planned in parts."""
    from sppjit.vm import VM

    rng = np.random.default_rng(2)
    trace = {"gpa": (rng.integers(0, 1 << 31, 5000).astype(np.uint64) & ~np.uint64(7))}
    saved = SH.MAX_PLAN_ROWS
    try:
        SH.MAX_PLAN_ROWS = 1000
        with shard_everything():
            b = VM(memory="2GiB").replay(trace, threads=2)
    finally:
        SH.MAX_PLAN_ROWS = saved
    a = VM(memory="2GiB").replay(trace)
    assert a.table.equals(b.table) and a.summary["exits"] == b.summary["exits"]


@pytest.mark.parametrize("vcpus", [1, 3])
def test_discarded_log_keeps_last_exit_fields(vcpus):
    """With the exit log discarded (`replay --summary`, the bench) the shards write no log:
    each vCPU's last exit is found from the results, and the VMCS exit fields of every vCPU,
    the counters and the whole state still equal the serial replay's."""
    from sppjit.datasets import scenarios as D
    from sppjit.io.trace import open_trace
    from sppjit.replay import Replay, discard_exits
    from sppjit.vm import VM

    sc = D.make("guarded", 60000, seed=4, vcpus=vcpus)
    runs = []
    for threads in (1, 2, 3):
        vm = VM(memory=sc.memory, vcpus=sc.vcpus)
        vm.protect(sc.protect_gfn, sc.protect_access)
        session = Replay(vm, on_exits=discard_exits, threads=threads)
        with shard_everything():
            for b in open_trace(sc.columns(), batch_size=20000):
                session.run(b, keep=False)
        runs.append((session, vm))
    (a, va) = runs[0]
    for b, vb in runs[1:]:
        assert b._shards.parallel_pieces > 0
        sa, sb = a.summary(), b.summary()
        assert (sa["counts"], sa["exits"], sa["pages"], sa["tlb_flushes"]) == (
            sb["counts"], sb["exits"], sb["pages"], sb["tlb_flushes"])
        assert np.array_equal(va.state.vmcs, vb.state.vmcs)
        assert_same_state(va, vb, f"threads={b.threads}")


@pytest.mark.parametrize("profile", ["v4", "v12"])
def test_gib_status_numpy_rule_equals_the_compiled_one(profile):
    """The numpy twin of _mark_lacking (taken when numba is off) marks the same GiBs, on a
    fresh VM and on one whose EPT and SPPT trees have grown over several GiBs (huge pages
    too): the lacking top-level entries and the lacking level-3 entries below present ones."""
    from sppjit.vm import VM

    for hugepages in (False, True):
        vm = VM(memory="8GiB", vcpus=2, profile=profile, hugepages=hugepages)
        fresh = SH.gib_status(vm.state).copy()
        rng = np.random.default_rng(5)
        gfn = np.sort(rng.choice(8 << 18, 300, replace=False)).astype(np.uint64)
        vm.protect(gfn, rng.integers(0, 1 << 32, gfn.shape[0], dtype=np.uint64).astype(np.uint32))
        gpa = rng.integers(0, (8 << 30) // 8, 5000, dtype=np.uint64) * np.uint64(8)
        vm.replay({"gpa": np.concatenate([gfn << np.uint64(12), gpa]),
                   "kind": np.ones(gfn.shape[0] + gpa.shape[0], np.uint8)})
        st_ = vm.state
        used = np.int64(st_.scal[L.SC_NTABLES])
        roots = [(int(st_.scal[L.SC_EPT_ROOT]), SH._U_RWX, SH.G_EPT)]
        roots += [(r, SH._U_SPPT_PRESENT, SH.G_SPPT) for r in SH.sppt_trees(st_)]
        assert len(roots) > 1  # SPPT trees exist
        partial = []
        for root, present, bit in roots:
            a = np.zeros(SH.GIBS, np.uint8)
            b = np.zeros(SH.GIBS, np.uint8)
            SH._mark_lacking(st_, np.int64(root), present, np.uint8(bit), a, used)
            SH._mark_lacking_numpy(st_, np.int64(root), present, np.uint8(bit), b, used)
            assert np.array_equal(a, b)
            partial.append(bool(a.any() and not a.all()))  # some GiBs have their tables
        # the EPT, and with 4 KiB pages an SPPT tree (huge pages stay writable: no SPPT)
        assert partial[0] and (hugepages or any(partial[1:]))
        assert not np.array_equal(fresh, SH.gib_status(st_))
