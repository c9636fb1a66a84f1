"""The Replay session's exit sinks: keeping the exit log, streaming it, or discarding it.

`discard_exits` is what `sppjit replay` without --exits and `sppjit bench` use: the kernel
still writes every exit into its log buffer and the counters keep the totals, but no Arrow
batch is built, except when hooks must annotate the exits to count relevance.
"""

import numpy as np
import pytest

import sppjit
from sppjit.datasets import scenarios as S
from sppjit.errors import InputError
from sppjit.hooks import HookIndex
from sppjit.io.protect import ByteRanges
from sppjit.io.trace import open_trace
from sppjit.replay import Replay, discard_exits


def _session(engine, on_exits=None, hooks=None, accesses=3000):
    sc = S.make("guarded", accesses, seed=3)
    vm = sppjit.VM(memory=sc.memory, vcpus=sc.vcpus)
    vm.protect(sc.protect_gfn, sc.protect_access)
    session = Replay(vm, engine, on_exits=on_exits, hooks=hooks)
    # Small batches and a small exit log: the log is flushed (or dropped) many times.
    for batch in open_trace(sc.columns(), batch_size=256):
        session.run(batch, keep=False)
    return session


@pytest.mark.parametrize("engine", ["jit", "reference"])
def test_discarding_exits_keeps_every_count(engine):
    kept = _session(engine)
    dropped = _session(engine, on_exits=discard_exits)
    assert kept.exit_table().num_rows == kept.summary()["exits"]["total"] > 0
    assert dropped.exit_table().num_rows == 0
    np.testing.assert_array_equal(dropped.counters, kept.counters)
    assert dropped.summary()["exits"] == kept.summary()["exits"]


def test_discard_with_hooks_still_counts_relevance():
    sc = S.make("guarded", 3000, seed=3)
    # Every protected page hooked whole, in two halves: each sub-page violation is relevant.
    pages = sc.protect_gfn << np.uint64(12)
    hooks = ByteRanges(gpa=np.concatenate([pages, pages + np.uint64(2048)]),
                       length=np.full(2 * pages.shape[0], 2048, dtype=np.uint32),
                       name=[f"h{i}" for i in range(2 * pages.shape[0])])
    streamed = []
    a = _session("jit", on_exits=streamed.append, hooks=HookIndex.from_ranges(hooks))
    b = _session("jit", on_exits=discard_exits, hooks=HookIndex.from_ranges(hooks))
    assert sum(rb.num_rows for rb in streamed) == a.summary()["exits"]["total"]
    assert b.hooks.summary() == a.hooks.summary()
    assert a.hooks.summary()["relevant"] > 0
    np.testing.assert_array_equal(a.counters, b.counters)


def test_a_batch_naming_a_vcpu_beyond_the_vm_is_refused():
    # open_trace without vcpus= cannot know the VM: the session checks before any kernel runs.
    vm = sppjit.VM(memory="16MiB", vcpus=2)
    session = Replay(vm)
    trace = {"gpa": np.array([0, 4096], dtype=np.uint64), "vcpu": np.array([1, 2], dtype=np.uint16)}
    batch = next(iter(open_trace(trace)))
    with pytest.raises(InputError, match="^trace: column 'vcpu' has value 2 at row 1 but the VM has 2 vCPUs$"):
        session.run(batch)
    assert session.counters.sum() == 0
