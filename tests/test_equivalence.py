"""Exactness: the JIT engine must agree with the reference engine on everything, always.

Property tests (hypothesis) build two identical VMs from one drawn scenario, apply the same
operations to both (init_spp, set_subpages, zap, remap, delete_memslot, raw SPPT / EPT pokes),
replay the same traces (with the same mid-trace timeline operations) with two engines, or with
one engine in two batchings, and require equality of: what every operation returned (or
raised, and warned), every output column, the whole exit log, every counter of the summary
(counts, exits, pages, tlb_flushes, ops) and the VM state (tables in use, their kinds and
levels, VMCS, requests, access maps, SPPT roots, scalars) after every operation batch and
every replay.

The generators are in strategies.py. On a failure, hypothesis prints the shrunk scenario and a
stand-alone reproducer snippet (the literal calls made). SPPJIT_HYPOTHESIS_EXAMPLES sets the
examples per test (default 60; the slow test takes half); the example sequence is fixed
(derandomized) unless SPPJIT_HYPOTHESIS_RANDOM=1 asks for new examples.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from hypothesis import event, example, given, note, settings
from hypothesis import strategies as st

import sppjit.replay
from sppjit import bits as B
from sppjit.kernels.replay import LOG_MARGIN

import strategies as S  # noqa: E402  (tests/ on sys.path: conftest.py)

EXAMPLES, SETTINGS = S.EXAMPLES, S.SETTINGS
BIG_BATCH = 1 << 20
FULL = B.FULL_SPP_ACCESS


# ------------------------------------------------------------------------------ comparison
def _first_difference(a, b) -> str:
    """Where two Arrow tables first differ, in words."""
    if a.schema != b.schema:
        return f"schemas differ:\n{a.schema}\n---\n{b.schema}"
    if a.num_rows != b.num_rows:
        return f"{a.num_rows} rows vs {b.num_rows} rows"
    for name in a.column_names:
        x, y = a.column(name).to_pylist(), b.column(name).to_pylist()
        if x != y:
            i = next(i for i, (u, v) in enumerate(zip(x, y)) if u != v)
            return (f"column {name!r} differs first at row {i}: {x[i]!r} vs {y[i]!r}\n"
                    f"row A: {a.slice(i, 1).to_pylist()}\nrow B: {b.slice(i, 1).to_pylist()}")
    return "tables differ (metadata or chunk types)"


def assert_states_equal(vm_a, vm_b, where: str) -> None:
    sa, sb = S.state_arrays(vm_a), S.state_arrays(vm_b)
    for name in sa:
        x, y = sa[name], sb[name]
        if x.shape != y.shape or not np.array_equal(x, y):
            if x.shape != y.shape:
                detail = f"shapes {x.shape} vs {y.shape}"
            else:
                idx = tuple(int(i) for i in np.argwhere(x != y)[0])
                detail = f"first at index {idx}: {int(x[idx]):#x} vs {int(y[idx]):#x}"
            raise AssertionError(f"{where}: state.{name} differs, {detail}")


def assert_results_equal(ra, rb, where: str) -> None:
    if (ra.error is None) != (rb.error is None) or ra.error != rb.error:
        raise AssertionError(f"{where}: replay errors differ: {ra.error} vs {rb.error}")
    assert ra.warnings == rb.warnings, f"{where}: warnings differ: {ra.warnings} vs {rb.warnings}"
    if ra.error is not None:
        return
    a, b = ra.result, rb.result
    assert a.table.equals(b.table), f"{where}: results differ: {_first_difference(a.table, b.table)}"
    assert a.exits.equals(b.exits), f"{where}: exit logs differ: {_first_difference(a.exits, b.exits)}"
    for key in ("counts", "exits", "pages", "tlb_flushes", "ops"):
        assert a.summary.get(key) == b.summary.get(key), (
            f"{where}: summary[{key!r}] differs: {a.summary.get(key)} vs {b.summary.get(key)}")
    assert a.summary["input"]["rows"] == b.summary["input"]["rows"]


def _events(phase_result) -> None:
    """Statistics (pytest --hypothesis-show-statistics): which behaviours the examples reach."""
    if phase_result.error is not None:
        event(f"replay raised {phase_result.error[0]}")
        return
    for kind, n in phase_result.result.summary["exits"].items():
        if kind != "total" and n:
            event(f"exit kind {kind}")


@contextlib.contextmanager
def exit_log_capacity(capacity: int | None):
    """Make the replay sessions' exit log small, so that replays flush it (NEED_LOG) often."""
    if capacity is None:
        yield
        return
    saved = sppjit.replay.EXIT_LOG_CAPACITY
    sppjit.replay.EXIT_LOG_CAPACITY = capacity
    try:
        yield
    finally:
        sppjit.replay.EXIT_LOG_CAPACITY = saved


def check_scenario(scn, runs, log_capacity: int | None = None) -> None:
    """Run ``scn`` on two VMs in lock step (runs: (engine, batch size or None) each) and require
    identical operation results, replay results and states after every phase."""
    a = S.Runner(scn.vm, *runs[0])
    b = S.Runner(scn.vm, *runs[1])
    calls: list[list[str]] = []
    try:
        with exit_log_capacity(log_capacity):
            assert_states_equal(a.vm, b.vm, "new VMs")
            for p, phase in enumerate(scn.phases):
                ca, cb = a.apply_ops(phase), b.apply_ops(phase)
                calls.append([c for c, _ in ca])
                for c, r in ca:
                    event(f"op {c.split('(')[0]} -> {r[0]}{' ' + r[1] if r[0] == 'raised' else ''}")
                assert ca == cb, f"phase {p}: the operations differ:\n{ca}\n---\n{cb}"
                assert_states_equal(a.vm, b.vm, f"phase {p}, after its operations")
                ra, rb = a.replay(phase), b.replay(phase)
                _events(ra)
                assert_results_equal(ra, rb, f"phase {p}")
                assert_states_equal(a.vm, b.vm, f"phase {p}, after its replay")
                if ra.error is not None:
                    break
    except AssertionError:
        ran = S.Scenario(vm=scn.vm, phases=scn.phases[: len(calls)])
        note("Reproducer:\n" + S.reproducer(ran, calls, runs=runs, log_capacity=log_capacity))
        raise


# ------------------------------------------------------------------------------ examples
def _hand_made():
    """Scenarios that reach every exit kind and outcome, always run on top of the drawn ones."""
    slots = ((0, 1024), (1536, 600))
    vm = S.VmSpec(memslots=slots, vcpus=2)
    w, r, f = B.ACCESS_WRITE, B.ACCESS_READ, B.ACCESS_FETCH
    g = 0x10
    first = S.Phase(
        ops=(("init",), ("set", g, (0x0000FFFF, 0, FULL, 0x1))),
        trace=(
            (g << 12, 8, 0, r),  # ept_fault
            (g << 12, 8, 0, w),  # sub-page 0 writable
            ((g << 12) + 0x900, 8, 1, w),  # spp_violation (sub-page 18)
            ((g << 12) + 0xFF0, 0x20, 0, w),  # crosses into g+1 (map 0): violation on the 2nd piece
            ((g + 2) << 12, 4096, 1, w),  # FULL map: plain write
            ((g + 3) << 12, 200, 0, w),  # sub-pages 0 and 1: all -> violation
            (1100 << 12, 8, 1, r),  # MMIO in the gap
            (1100 << 12, 8, 0, f),  # MMIO again: EPT misconfiguration
            ((g + 3) << 12, 8, 0, f),
        ),
    )
    second = S.Phase(
        # (set_subpages after the first poke would rebuild the cleared path: same 2 MiB region)
        ops=(("set", g + 2, (0xF0F0F0F0,)), ("sppt_clear", (g,), 0, 2), ("sppt_leaf_odd", (g + 3,), 1, 5)),
        trace=(
            (g << 12, 8, 0, w),  # spp_miss on vCPU 0, then allowed
            ((g + 3) << 12, 8, 1, w),  # spp_misconfig
            ((g + 2) << 12, 128, 0, w),  # now protected
            ((g + 2) << 12, 512, 1, r),
        ),
    )
    page = S.VmSpec(memslots=((0, 2048),), vcpus=1, hugepages=True, granularity="page")
    third = S.Phase(
        ops=(("init",), ("set", 700, (0x1, FULL))),
        trace=((700 << 12, 8, 0, w), (701 << 12, 8, 0, w), (5 << 12, 8, 0, w), (1030 << 12, 4, 0, r)),
    )
    # Slot 0 holds two whole 2 MiB regions (huge leaves, protection left writable); slot 1 holds
    # none (4 KiB leaves). A pool of two tables grows during set_subpages and replays.
    huge = S.VmSpec(memslots=((0, 1024), (2048, 300)), vcpus=3, hugepages=True, subpage_check="first",
                    table_capacity=2)
    fourth = S.Phase(
        ops=(("init",), ("set", 3, (0,) * 64), ("set", 2100, (0x3,) * 3)),
        trace=((3 << 12, 8, 1, w), ((2100 << 12) + 0xF0, 200, 2, w), (2101 << 12, 300, 0, w),
               (2110 << 12, 8, 0, r), (2103 << 12, 8, 0, r), (2099 << 12, 8, 0, w)),
    )
    fifth = S.Phase(
        ops=(("ept_leaf", (2100,), "set_w"), ("ept_leaf", (2110,), "clear_w"), ("ept_leaf", (2103,), "spp_clear_w"),
             ("sppt_nonleaf_rsvd", (2101,), 1, 3, 1), ("sppt_leaf", (2101,), 2, 0x3)),
        trace=((2100 << 12, 8, 0, w), (2110 << 12, 8, 0, w), (2103 << 12, 8, 2, w), (2101 << 12, 8, 1, w),
               (2101 << 12, 0x100, 2, w), (2101 << 12, 0x100, 0, w)),
    )
    # Profile v12: set flushes the SPPT (the next write misses and fills the 2 MiB block), a
    # remap between replays (wp_fault on a FULL page), zap and delete_memslot mid-trace.
    v12 = S.VmSpec(memslots=((0, 600), (1024, 64)), vcpus=2, hugepages=True, profile="v12")
    sixth = S.Phase(
        ops=(("init",), ("set", 40, (0x0F0F0F0F, FULL, 0))),
        trace=((40 << 12, 8, 0, w), ((40 << 12) + 0x80, 8, 1, w), (41 << 12, 64, 1, w), (42 << 12, 8, 0, r),
               (1030 << 12, 8, 0, w)),
    )
    seventh = S.Phase(
        ops=(("remap", 40, 3),),
        trace=((41 << 12, 8, 0, w), (40 << 12, 8, 1, w), (42 << 12, 8, 0, w), (1030 << 12, 8, 1, w),
               (40 << 12, 8, 0, w)),
        timeline=((1, "zap", 40, 1, 0), (3, "delete_memslot", 1030, 1, 0), (4, "remap", 0, 600, 0)),
    )
    return [
        S.Scenario(vm=vm, phases=(first, second)),
        S.Scenario(vm=page, phases=(third,)),
        S.Scenario(vm=huge, phases=(fourth, fifth)),
        S.Scenario(vm=v12, phases=(sixth, seventh)),
    ]


HAND_MADE = _hand_made()


def _with_examples(fn, *args):
    for scn in HAND_MADE:
        fn = example(scn, *args)(fn)
    return fn


# ------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("profile", ("v4", "v12"))
@settings(max_examples=S.BIG_EXAMPLES, **SETTINGS)
@given(data=st.data())
def test_jit_matches_reference_on_big_vms(profile, data):
    """Reference vs JIT on VMs of several GiB with thousands of protected pages, both profiles,
    a timeline: the replay kernel's prefetching loop (a pool of 256 tables or more) included."""
    scn = data.draw(S.big_scenarios(profile), label="scenario")
    check_scenario(scn, (("reference", BIG_BATCH), ("jit", BIG_BATCH)))


FIXED_BIG = S.big_scenario(S.VmSpec(memslots=((0, 2 * S.GIB_PAGES), (3 * S.GIB_PAGES, 513)), vcpus=2), seed=0)


@settings(max_examples=1, **SETTINGS)
@given(st.just(FIXED_BIG))
def test_the_prefetching_loop_is_reached_and_exact(scn):
    """One big scenario, fixed (2 GiB, a 1 GiB gap, v4, 2 vCPUs, 4 KiB pages): after its
    warm-up the pool holds more tables than the threshold at which the replay kernel switches to
    its prefetching copy of the fast loop, and the trace that follows (SPP on, a timeline) is
    identical on both engines, and in one batch and in small ones."""
    from sppjit.kernels.replay import PREFETCH_MIN_TABLES

    assert scn.phases[1].timeline
    for runs in ((("reference", BIG_BATCH), ("jit", BIG_BATCH)), (("jit", BIG_BATCH), ("jit", 97))):
        check_scenario(scn, runs)
    r = S.Runner(scn.vm, "jit")
    r.apply_ops(scn.phases[0])
    r.replay(scn.phases[0])
    assert int(r.vm.state.scal[0]) >= PREFETCH_MIN_TABLES  # SC_NTABLES
    assert r.replay(scn.phases[1]).result.summary["counts"]["spp_violation"] > 0


@settings(max_examples=EXAMPLES, **SETTINGS)
@given(S.scenarios())
@_with_examples
def test_jit_matches_reference(scn):
    """Reference vs JIT on random VMs, protections, pokes and traces: everything identical."""
    check_scenario(scn, (("reference", BIG_BATCH), ("jit", BIG_BATCH)))


@settings(max_examples=EXAMPLES, **SETTINGS)
@given(S.scenarios(batch_sizes=True), st.one_of(st.none(), st.integers(LOG_MARGIN, 64)))
def test_batching_is_invisible(scn, log_capacity):
    """The JIT engine in batches of 1..50 rows (and a tiny exit log that it must flush over and
    over) gives exactly what one batch gives: results, exit log, counters and state."""
    check_scenario(scn, (("jit", None), ("jit", BIG_BATCH)), log_capacity=log_capacity)


@pytest.mark.slow
@settings(max_examples=max(EXAMPLES // 2, 10), **SETTINGS)
@given(S.scenarios(max_phases=4, batch_sizes=True), st.integers(LOG_MARGIN, 64))
def test_reference_matches_jit_in_small_batches(scn, log_capacity):
    """The heaviest mix: reference (one batch) against JIT in small batches with a small exit
    log, up to four phases of operations and pokes on a growing table pool."""
    check_scenario(scn, (("reference", BIG_BATCH), ("jit", None)), log_capacity=log_capacity)


def test_hand_made_scenarios_reach_every_exit_kind():
    """The hand-made examples above really do exercise every exit kind and outcome (so the
    property tests always cover them, whatever hypothesis draws)."""
    kinds, outcomes = set(), set()
    for scn in HAND_MADE:
        runner = S.Runner(scn.vm, "jit", BIG_BATCH)
        for phase in scn.phases:
            calls = runner.apply_ops(phase)
            assert len(calls) == len(phase.ops), f"a hand-made operation was skipped: {calls}"
            res = runner.replay(phase)
            assert res.error is None, res.error
            assert res.result.summary.get("ops", {}).get("applied", 0) == len(phase.timeline)
            kinds |= {k for k, n in res.result.summary["exits"].items() if n and k != "total"}
            outcomes |= set(res.result.table.column("outcome").to_pylist())
    assert kinds == set(B.EXIT_KIND_NAMES), sorted(set(B.EXIT_KIND_NAMES) - kinds)
    assert outcomes == set(range(len(B.OUTCOME_NAMES))), sorted(set(range(len(B.OUTCOME_NAMES))) - outcomes)


def _drop_write_above(vm, gpa: int) -> None:
    """Clear W in the level-2 EPT entry above ``gpa`` (no API does this: KVM's non-leaf entries
    are always RWX), so that every write in that 2 MiB region faults for good."""
    from sppjit.kernels import layout as L
    from sppjit.kernels.mmu import hpa_table

    st_ = vm.state
    t = int(st_.scal[L.SC_EPT_ROOT])
    for level in (4, 3):
        t = int(hpa_table(st_, st_.tables[t, B.level_index(gpa, level)]))
    st_.tables[t, B.level_index(gpa, 2)] &= ~np.uint64(B.VMX_EPT_WRITABLE_MASK)
    vm.invalidate_caches()


@pytest.mark.parametrize("batch_size", [1, 1 << 20])
def test_a_fault_in_whose_retry_still_faults_livelocks_alike(batch_size):
    """The JIT loop takes common fault-ins in place and hands the guest's retry to the slow
    path when it faults again; the exits taken before count towards the livelock bound. Both
    engines must give up on the same access, in the same words, leaving the same state (the
    counters of a replay that raised are not compared: the reference engine counts a batch's
    exits when the batch ends)."""
    from sppjit.io.trace import open_trace
    from sppjit.reference import ModelLivelock
    from sppjit.replay import Replay

    def trace(gpas, kinds):
        n = len(gpas)
        return {"gpa": np.array(gpas, dtype=np.uint64), "size": np.full(n, 8, dtype=np.uint16),
                "vcpu": np.zeros(n, dtype=np.uint16), "kind": np.array(kinds, dtype=np.uint8)}

    seen = {}
    for engine in ("reference", "jit"):
        vm = sppjit.VM(memory="16MiB", vcpus=1)
        vm.protect(np.array([0x300], dtype=np.uint64), np.array([0], dtype=np.uint32))
        session = Replay(vm, engine)
        for batch in open_trace(trace([0x200000], [B.ACCESS_READ])):
            session.run(batch)  # maps page 0x200 at 4 KiB (page 0x300 is protected)
        _drop_write_above(vm, 0x200000)
        # Page 0x200 is read again (its walk fills the region cache, with R and X only), then
        # page 0x201, never mapped, is written: a fault-in, then a write the walk refuses.
        rows = trace([0x200000, 0x201008], [B.ACCESS_READ, B.ACCESS_WRITE])
        with pytest.raises(ModelLivelock) as err:
            for batch in open_trace(rows, batch_size=batch_size):
                session.run(batch)
        seen[engine] = (str(err.value), S.state_arrays(vm))
    ref, jit = seen["reference"], seen["jit"]
    assert ref[0] == jit[0] == "row 1: the guest keeps faulting on 0x201008"
    for name in ref[1]:
        np.testing.assert_array_equal(ref[1][name], jit[1][name], err_msg=name)
