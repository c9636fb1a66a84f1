"""VM.protect places a whole protection in one kernel call (kernels.mmu.kvm_set_subpages_runs):
it must leave exactly what the set_subpages calls it stands for leave, one after the other
(init_spp, then one call per run of sppjit.io.protect.runs): every state array (the caches
and the pools' capacities too), the TLB-flush count, the return value, the EFAULT at the
first gfn with no memslot with the pages before it applied, and every replay after it."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sppjit.errors import InputError, SppError
from sppjit.io.protect import runs
from sppjit.vm import VM, _protection_runs

from strategies import (
    EXAMPLES,
    SETTINGS,
    access_maps,
    mmio_gfns,
    ram_gfns,
    spaces,
    trace_arrays,
    traces,
    vm_specs,
)


def per_call_protect(vm, gfns, maps):
    """VM.protect as it was: init_spp, then one set_subpages call per run."""
    if not vm.spp_active:
        vm.init_spp()
    calls = 0
    for base, values in runs(np.asarray(gfns, np.uint64), np.asarray(maps, np.uint32), vm.page_limit):
        vm.set_subpages(int(base), values)
        calls += 1
    return calls


def outcome(fn):
    try:
        return ("ok", fn())
    except (SppError, InputError) as exc:
        return (type(exc).__name__, str(exc))


def assert_same_state(a, b):
    for name, x, y in zip(a.state._fields, a.state, b.state):
        assert x.shape == y.shape and x.dtype == y.dtype, name
        assert np.array_equal(x, y), name


@st.composite
def protections(draw, spec, space):
    """(gfn, map) pairs: hot gfns and their neighbours, dense runs (across the 64- and
    512-page call limits and 2 MiB regions), anywhere in RAM, and sometimes one gfn with no
    memslot (EFAULT) or a gfn given twice (InputError)."""
    slot_ends = {b + n for b, n in spec.memslots}
    gfns: list[int] = []
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.integers(0, 3))
        if kind == 0:  # a dense run, possibly running off its memslot's end
            base = draw(st.one_of(st.sampled_from(space.hot), ram_gfns(spec.memslots)))
            gfns += range(base, base + draw(st.sampled_from([1, 63, 64, 65, 511, 512, 513, 700])))
        elif kind == 1:
            gfns += draw(st.lists(ram_gfns(spec.memslots), max_size=20))
        else:
            g = draw(st.sampled_from(space.hot))
            gfns += [g - 1, g, g + 1]
    gfns = [g for g in dict.fromkeys(gfns) if g >= 0]
    if draw(st.integers(0, 5)) == 0:
        gfns.append(draw(mmio_gfns(spec.memslots)))
    gfns = [g for g in dict.fromkeys(gfns) if g not in slot_ends or draw(st.booleans())]
    if gfns and draw(st.integers(0, 9)) == 0:
        gfns.insert(draw(st.integers(0, len(gfns))), draw(st.sampled_from(gfns)))  # duplicate
    if draw(st.booleans()):
        gfns.reverse()  # not ascending: sorted by the call
    one_map = st.one_of(st.sampled_from(space.palette), access_maps())
    maps = [draw(one_map) for _ in gfns]
    return np.array(gfns, dtype=np.uint64), np.array(maps, dtype=np.uint32)


@st.composite
def cases(draw):
    spec = draw(vm_specs())
    space = draw(spaces(spec.memslots))
    before = draw(st.one_of(st.just(()), traces(space, spec.vcpus, max_size=80)))
    init_first = draw(st.booleans())
    first = draw(protections(spec, space))
    second = draw(st.one_of(st.none(), protections(spec, space)))
    after = draw(traces(space, spec.vcpus, max_size=80))
    return spec, before, init_first, first, second, after


def replay_figures(vm, rows):
    if not rows:
        return None
    r = vm.replay(trace_arrays(rows))
    s = r.summary
    return (r.table.column("outcome").to_pylist(), r.table.column("exits").to_pylist(),
            r.table.column("exit_reason").to_pylist(), r.exits.to_pylist(), s["counts"], s["exits"],
            s["tlb_flushes"], s["pages"])


@settings(max_examples=EXAMPLES, **SETTINGS)
@given(cases())
def test_batch_protect_equals_per_call(case):
    spec, before, init_first, first, second, after = case
    batch, calls = spec.build(), spec.build()
    assert replay_figures(batch, before) == replay_figures(calls, before)
    if init_first:
        batch.init_spp()
        calls.init_spp()
    for prot in (first, second):
        if prot is None:
            continue
        got = outcome(lambda p=prot: batch.protect(*p))
        want = outcome(lambda p=prot: per_call_protect(calls, *p))
        assert got == want
        assert_same_state(batch, calls)
    assert replay_figures(batch, after) == replay_figures(calls, after)
    assert_same_state(batch, calls)


@pytest.mark.parametrize("profile", ["v4", "v12"])
@pytest.mark.parametrize("granularity", ["spp", "page"])
@pytest.mark.parametrize("hugepages", [False, True])
def test_batch_protect_over_mapped_huge_pages(profile, granularity, hugepages):
    """Protection placed after a replay mapped the memory (2 MiB leaves with huge pages):
    the batch zaps and marks leaves, builds SPPT paths and grows the pools exactly as the
    calls; the pool starts tiny, so it grows inside the protection."""
    rng = np.random.default_rng(7)
    slots = [(0, 4096), (5000, 1500)]
    trace = {"gpa": (rng.integers(0, 4096, 3000, dtype=np.uint64) << np.uint64(12)),
             "size": np.full(3000, 8, np.uint16), "vcpu": rng.integers(0, 3, 3000).astype(np.uint16),
             "kind": rng.integers(0, 3, 3000).astype(np.uint8)}
    gfns = np.unique(np.concatenate([rng.integers(0, 4096, 900), np.arange(1000, 1700),
                                     np.arange(5000, 5600)])).astype(np.uint64)
    maps = rng.integers(0, 1 << 32, gfns.size, dtype=np.uint64).astype(np.uint32)
    maps[::5] = 0xFFFFFFFF
    vms = [VM(memslots=slots, vcpus=3, profile=profile, granularity=granularity, hugepages=hugepages,
              table_capacity=4) for _ in range(2)]
    for vm in vms:
        vm.replay(trace)
    assert vms[0].protect(gfns, maps) == per_call_protect(vms[1], gfns, maps)
    assert_same_state(*vms)
    assert vms[0].state.scal[6] > 0  # flushes were counted (SC_TLB_FLUSHES)
    a, b = (vm.replay(trace) for vm in vms)
    assert a.table.equals(b.table) and a.exits.equals(b.exits)
    assert_same_state(*vms)


def test_efault_applies_the_pages_before_it():
    vm = VM(memslots=[(0, 100), (200, 100)])
    gfns = np.arange(90, 110, dtype=np.uint64)  # 100 is in no memslot
    with pytest.raises(SppError) as exc:
        vm.protect(gfns, np.zeros(20, np.uint32))
    assert "0x64" in str(exc.value)
    assert vm.get_subpages(90, 10).tolist() == [0] * 10
    assert int(vm.state.scal[6]) == 1  # the call that stopped had applied pages: one flush


def test_runs_match_io_protect_runs():
    rng = np.random.default_rng(3)
    for limit in (1, 2, 64, 512):
        for _ in range(20):
            g = np.unique(rng.integers(0, 3000, rng.integers(1, 2000))).astype(np.uint64)
            rng.shuffle(g)
            m = rng.integers(0, 1 << 32, g.size, dtype=np.uint64).astype(np.uint32)
            sg, sm, base, offset, length = _protection_runs(g, m, limit)
            want = runs(g, m, limit)
            assert [(int(b), sm[o:o + n].tolist()) for b, o, n in zip(base, offset, length)] == \
                [(b, v.tolist()) for b, v in want]
    dup = np.array([7, 0x42, 3, 0x42], np.uint64), np.zeros(4, np.uint32)
    assert outcome(lambda: _protection_runs(*dup, 8)) == outcome(lambda: runs(*dup, 8))
    assert outcome(lambda: runs(*dup, 8))[0] == "InputError"


def test_control_plane_resets_caches_a_replay_filled():
    """invalidate_caches skips its memset only while no replay ran (sppjit.vm): after one, the
    next control-plane call resets every entry, and a replaced state counts as filled."""
    from sppjit.kernels import layout as L

    vm = VM(memory="64M")
    trace = {"gpa": np.arange(0, 1 << 24, 1 << 12, dtype=np.uint64), "size": np.full(4096, 8, np.uint16)}
    for change in (lambda: vm.protect([5], [0]), lambda: vm.zap(7), lambda: vm.set_subpages(9, [1])):
        vm.replay(trace)
        assert (vm.state.ept_cache != L.CACHE_INVALID).any()
        change()
        assert (vm.state.ept_cache == L.CACHE_INVALID).all() and (vm.state.sppt_cache == L.CACHE_INVALID).all()
    vm.replay(trace)
    filled = vm.state.ept_cache.copy()
    fresh = VM(memory="64M")
    fresh.state = vm.state._replace(ept_cache=filled)  # as loading a saved state does
    fresh.invalidate_caches()
    assert (fresh.state.ept_cache == L.CACHE_INVALID).all()
