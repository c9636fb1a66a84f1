"""A replay whose exit log nobody reads (``on_exits=discard_exits``, no hooks: what
``sppjit replay --summary`` without ``--exits`` runs) keeps counts only: the JIT kernel writes
no exit-log rows. Everything else must be as in the logging mode: the result columns, every
counter of the summary, the state the replay leaves, on random scenarios (operations between
phases, timelines inside them, small batches and a small log for the logging side)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sppjit.replay as R
from sppjit.errors import InputError, SppError, VmEntryError
from sppjit.io.trace import open_trace
from sppjit.kernels.replay import LOG_MARGIN
from sppjit.reference import ModelLivelock

import strategies as S


def marked(log):
    """``log`` with every column of every row set to its dtype's largest value (its buffers are
    np.empty: a row nobody wrote holds whatever the memory held)."""
    for column in log[:-1]:
        column.fill(np.iinfo(column.dtype).max)
    return log


def untouched(log) -> bool:
    return all(bool((column == np.iinfo(column.dtype).max).all()) for column in log[:-1])


def run_phase(vm, phase, on_exits, batch_size):
    """(result columns, summary figures, error, the session) of one phase's replay."""
    session = R.Replay(vm, "jit", on_exits=on_exits, ops=phase.timeline_ops())
    marked(session._log)
    columns, error = [], None
    try:
        for batch in open_trace(S.trace_arrays(phase.trace), batch_size=batch_size, vcpus=vm.vcpus):
            rb = session.run(batch)
            columns.append([rb.column(c).to_pylist() for c in ("outcome", "exits", "exit_reason")])
    except (ModelLivelock, VmEntryError, InputError, SppError) as exc:
        error = (type(exc).__name__, str(exc))
    s = session.summary()
    figures = (s["counts"], s["exits"], s["pages"], s["tlb_flushes"], s.get("ops"))
    return columns, figures, error, session


def flat(batches):
    """Per result column, its values over all batches."""
    return [sum((b[i] for b in batches), []) for i in range(3)]


@pytest.mark.filterwarnings("ignore::sppjit.vm.SppQuirkWarning")
@settings(max_examples=S.EXAMPLES, **S.SETTINGS)
@given(S.scenarios(batch_sizes=True), st.integers(LOG_MARGIN, 64))
def test_counts_only_equals_the_logging_mode(scn, log_capacity):
    logging, counting = S.Runner(scn.vm, "jit"), S.Runner(scn.vm, "jit")
    saved = R.EXIT_LOG_CAPACITY
    for p, phase in enumerate(scn.phases):
        assert logging.apply_ops(phase) == counting.apply_ops(phase)
        logged = []
        R.EXIT_LOG_CAPACITY = log_capacity  # the logging side flushes mid-batch
        try:
            a = run_phase(logging.vm, phase, logged.append, phase.batch_size)
        finally:
            R.EXIT_LOG_CAPACITY = saved
        b = run_phase(counting.vm, phase, R.discard_exits, 1 << 20)
        assert b[3].counts_only and not a[3].counts_only
        assert a[2] == b[2], f"phase {p}: errors differ"
        if a[2] is None:
            assert flat(a[0]) == flat(b[0]), f"phase {p}: results differ"
            assert a[1] == b[1], f"phase {p}: summary figures differ"
            assert sum(rb.num_rows for rb in logged) == a[1][1]["total"]
        # Counts only: not one row was written into the log buffer.
        log = b[3]._log
        assert int(log.n[0]) == 0 and untouched(log)
        for name, x in S.state_arrays(logging.vm).items():
            assert np.array_equal(x, S.state_arrays(counting.vm)[name]), f"phase {p}: {name} differs"
        if a[2] is not None:
            break


def test_counts_only_is_off_with_hooks_or_a_sink():
    from sppjit.vm import VM

    vm = VM(memory="16M")
    assert R.Replay(vm, on_exits=R.discard_exits).counts_only
    assert not R.Replay(vm).counts_only
    assert not R.Replay(vm, on_exits=lambda rb: None).counts_only
    hooks = R.HookIndex.from_ranges(_ranges())
    assert not R.Replay(vm, on_exits=R.discard_exits, hooks=hooks).counts_only


def _ranges():
    from sppjit.io.protect import ByteRanges

    return ByteRanges(gpa=np.array([0x1000], np.uint64), length=np.array([8], np.uint32), name=["h"])
