"""set_subpages / get_subpages from other threads while a replay runs.

KVM serialises the SPP ioctls with slots_lock (outside) and mmu_lock (inside); the replay
engines take mmu_lock around the kernels that touch the state. So a call from another thread
takes effect between two batches of the replay session, and the result must equal a replay in
which the same calls are applied at those row boundaries, one after the other.

- test_calls_between_batches_equal_sequential: the protocol: after chosen batches the
  main thread signals a worker (threading.Event) and waits for its calls to finish.
- test_calls_blocked_by_the_lock_take_effect_at_the_boundary: the main thread holds mmu_lock
  (a re-entrant lock, as the engines re-take it) while it replays a batch, having woken the
  worker first; the worker's call must stay blocked until the batch is done.
- test_free_running_calls_are_atomic: a worker hammers set/get with no synchronisation; every
  get sees whole set calls (never a half-applied one), and the final EPT state agrees with
  the final maps.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import sppjit
from sppjit.io.trace import open_trace
from sppjit.kernels import layout as L
from sppjit.replay import Replay

ENGINES = ("reference", "jit")
PROFILES = ("v4", "v12")
FULL = 0xFFFFFFFF
BATCH = 16
BASES = (0x400, 0x440, 0x5F0)  # 0x400/0x440 share a 2 MiB block; 0x5F0 is in the next one


def make_trace(rows: int = 240, seed: int = 7) -> dict:
    rng = np.random.default_rng(seed)
    gfn = rng.choice(np.array([b + k for b in BASES for k in range(8)]), size=rows)
    return {
        "gpa": (gfn.astype(np.uint64) << np.uint64(12)) + rng.integers(0, 4096 - 8, size=rows).astype(np.uint64),
        "size": rng.choice([1, 4, 8], size=rows).astype(np.uint16),
        "vcpu": rng.integers(0, 2, size=rows).astype(np.uint16),
        "kind": rng.choice([0, 1, 1, 1], size=rows).astype(np.uint8),
    }


# The calls made after batch k (k -> [(base_gfn, maps)]): protect, change, unprotect.
CALLS = {
    1: [(0x400, [0x0000FFFF] * 8)],
    3: [(0x440, [0] * 4 + [0xF0F0F0F0] * 4), (0x5F0, [0xFFFF0000] * 8)],
    6: [(0x400, [FULL] * 4 + [0] * 4)],
    9: [(0x440, [FULL] * 8), (0x5F0, [0x1] * 8)],
    12: [(0x400, [0x80000001] * 8)],
}


def new_vm(profile: str):
    vm = sppjit.VM(profile=profile, vcpus=2, memory="16MiB")
    vm.init_spp()
    return vm


def do_calls(vm, calls, log: list) -> None:
    for base, maps in calls:
        assert vm.set_subpages(base, maps) == len(maps)
        log.append(vm.get_subpages(base, len(maps)).tolist())


def results(session: Replay, batches: list, log: list) -> dict:
    import pyarrow as pa

    summary = session.summary()
    return {
        "table": pa.Table.from_batches(batches),
        "exits": session.exit_table(),
        "summary": {k: v for k, v in summary.items() if k not in ("seconds", "compile_seconds", "accesses_per_second")},
        "log": log,
    }


def state_of(vm) -> dict:
    st = vm.state
    n = int(st.scal[0])
    map_gfns, maps = L.stored_maps(st)
    return {"tables": st.tables[:n].copy(), "maps": maps, "map_gfns": map_gfns, "vmcs": st.vmcs.copy(),
            "scal": st.scal.copy(), "sppt_root": st.sppt_root.copy(), "requests": st.requests.copy()}


def assert_same(a: dict, b: dict, sa: dict, sb: dict) -> None:
    assert a["table"].equals(b["table"])
    assert a["exits"].equals(b["exits"])
    assert a["summary"] == b["summary"]
    assert a["log"] == b["log"]
    for k in sa:
        assert np.array_equal(sa[k], sb[k]), k


def sequential(profile: str, engine: str) -> tuple[dict, dict]:
    """The reference: the same calls applied in this thread at the same row boundaries."""
    vm = new_vm(profile)
    session, batches, log = Replay(vm, engine), [], []
    for k, batch in enumerate(open_trace(make_trace(), batch_size=BATCH, vcpus=vm.vcpus)):
        batches.append(session.run(batch))
        if k in CALLS:
            do_calls(vm, CALLS[k], log)
    return results(session, batches, log), state_of(vm)


class Worker(threading.Thread):
    """Performs the calls of one boundary each time it is woken."""

    def __init__(self, vm):
        super().__init__(daemon=True)
        self.vm = vm
        self.go = threading.Event()
        self.done = threading.Event()
        self.calls = None
        self.log: list = []
        self.error: BaseException | None = None
        self.stop = False

    def run(self):
        while True:
            self.go.wait()
            self.go.clear()
            if self.stop:
                return
            try:
                do_calls(self.vm, self.calls, self.log)
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                self.error = exc
            self.done.set()

    def wake(self, calls):
        self.calls = calls
        self.done.clear()
        self.go.set()

    def finish(self):
        self.stop = True
        self.go.set()
        self.join(10)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("profile", PROFILES)
def test_calls_between_batches_equal_sequential(profile, engine):
    vm = new_vm(profile)
    worker = Worker(vm)
    worker.start()
    session, batches = Replay(vm, engine), []
    try:
        for k, batch in enumerate(open_trace(make_trace(), batch_size=BATCH, vcpus=vm.vcpus)):
            batches.append(session.run(batch))
            if k in CALLS:
                worker.wake(CALLS[k])
                assert worker.done.wait(30), "the worker's calls did not finish"
                assert worker.error is None, worker.error
    finally:
        worker.finish()
    got = results(session, batches, worker.log)
    want, want_state = sequential(profile, engine)
    assert_same(got, want, state_of(vm), want_state)
    assert got["summary"]["counts"]["spp_violation"] > 0  # the calls did protect something


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("profile", PROFILES)
def test_calls_blocked_by_the_lock_take_effect_at_the_boundary(profile, engine):
    vm = new_vm(profile)
    worker = Worker(vm)
    worker.start()
    session, batches = Replay(vm, engine), []
    blocked = 0
    try:
        for k, batch in enumerate(open_trace(make_trace(), batch_size=BATCH, vcpus=vm.vcpus)):
            with vm.mmu_lock:
                batches.append(session.run(batch))
                if k in CALLS:
                    # Woken while this thread still holds mmu_lock: the calls wait for it, and
                    # so take effect after batch k, before batch k+1 (as in the sequential run).
                    worker.wake(CALLS[k])
                    time.sleep(0.02)
                    # Still held by this thread: the worker is blocked inside set_subpages.
                    assert not worker.done.is_set(), "set_subpages ran while mmu_lock was held"
                    blocked += 1
            if k in CALLS:
                assert worker.done.wait(30)
                assert worker.error is None, worker.error
    finally:
        worker.finish()
    assert blocked == len(CALLS)
    got = results(session, batches, worker.log)
    want, want_state = sequential(profile, engine)
    assert_same(got, want, state_of(vm), want_state)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("profile", PROFILES)
def test_free_running_calls_are_atomic(profile, engine):
    vm = new_vm(profile)
    n = vm.page_limit  # one whole call: 64 pages (v4) or 512 (v12)
    base = 0x400
    stop = threading.Event()
    seen: list[set] = []
    errors: list[BaseException] = []

    def hammer():
        try:
            i = 0
            while not stop.is_set():
                value = (0x0000FFFF, 0xFFFF0000, FULL, 0)[i % 4]
                assert vm.set_subpages(base, [value] * n) == n
                got = vm.get_subpages(base, n)
                seen.append(set(got.tolist()))
                i += 1
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    rng = np.random.default_rng(3)
    rows = 3000
    gfn = base + rng.integers(0, n, size=rows)
    trace = {
        "gpa": (gfn.astype(np.uint64) << np.uint64(12)) + rng.integers(0, 4088, size=rows).astype(np.uint64),
        "kind": rng.choice([0, 1], size=rows).astype(np.uint8),
        "vcpu": rng.integers(0, 2, size=rows).astype(np.uint16),
    }
    t = threading.Thread(target=hammer, daemon=True)
    t.start()
    try:
        res = vm.replay(trace, engine=engine, batch_size=50)
    finally:
        stop.set()
        t.join(30)
    assert not errors, errors
    assert seen, "the worker made no call"
    # get never observed a half-applied set: each saw one value over the whole range
    assert all(len(s) == 1 for s in seen), [s for s in seen if len(s) != 1][:3]
    assert res.table.num_rows == rows
    # the final EPT leaves agree with the final maps
    final = vm.get_subpages(base, n)
    assert len(set(final.tolist())) == 1
    m = int(final[0])
    for g in range(base, base + n):
        last = vm.walk(g << 12)["ept"][-1]
        if not (last["present"] and last["leaf"]):
            continue
        if m != FULL:
            assert (last["w"], last["spp"]) == (False, True), (hex(g), last)
        else:
            assert not last["spp"], (hex(g), last)
