"""Timeline operations (docs/semantics.md §3.10 host remap / reclaim and §3.11 memslot delete;
docs/contract.md §4): vm.zap, vm.remap, vm.delete_memslot and vm.apply, in both profiles and
on both engines, with hand-derived expectations; then random timelines on which the two
engines must leave identical results and states.

Numbers of the model used below (architecture / bits): guest RAM of gfn g at host page
0x1000_0000_0000 + 4096 g; the k-th page handed out by a remap at 0x2000_0000_0000 + 4096 k.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import sppjit
from sppjit.kernels import layout as L

import conformance_cases as C  # noqa: E402  (tests/ on sys.path: conftest.py)

ENGINES = ("reference", "jit")
PROFILES = ("v4", "v12")
FULL = 0xFFFFFFFF
EFAULT, ENODEV = 14, 19
GUEST_RAM_HPA = 0x1000_0000_0000
REMAP_HPA = 0x2000_0000_0000
SC_TLB_FLUSHES = 6

W, R, sub = C.W, C.R, C.sub
FAULT_W, FAULT_R, SPP_MISS = C.FAULT_W, C.FAULT_R, C.SPP_MISS
WP_FAULT = C.X(48, 0x1AA, "wp_fault", 0)
G = 0x1234
GPA = G << 12


def spp_viol(profile):
    return C.X(48, 0x1AA, "spp_violation", 29 if profile == "v12" else 28)


def first_write(profile):
    """Exits of the first write to an unmapped protected gfn whose written sub-page is
    writable: v4 builds the SPPT in the fault path; v12 misses once and fills the block."""
    return [FAULT_W] if profile == "v4" else [FAULT_W, SPP_MISS]








def leaf(vm, gpa) -> dict | None:
    last = vm.walk(gpa)["ept"][-1]
    return last if last["present"] and last["leaf"] else None


def expect(fn, want):
    """A step that checks fn(vm) == want."""
    def step(vm):
        got = fn(vm)
        assert got == want, f"got {got!r}, want {want!r}"
    return step


def tlb(vm) -> int:
    return int(vm.state.scal[SC_TLB_FLUSHES])


# ====================================================================== zap
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("profile", PROFILES)
def test_zap_refaults_and_reprotects(profile, engine):
    """zap removes the EPT leaves; the SPPT and the stored maps stay; the next access faults
    and the lazy path re-protects from the stored map (W=0, bit 61), with no SPPT miss in
    either profile since the SPPT was not touched."""
    vm = sppjit.VM(profile=profile)
    flushes = {}
    C.run(vm, [
        C.Init(),
        C.SetMaps(G, (0x0000FFFF,)),
        W(sub(G, 0), exits=first_write(profile)),
        R(sub(G + 1, 0), exits=[FAULT_R]),
        lambda vm: flushes.setdefault("before", tlb(vm)),
        expect(lambda vm: vm.zap(G, 2), 2),
        lambda vm: flushes.setdefault("after", tlb(vm)),
        expect(lambda vm: (leaf(vm, GPA), leaf(vm, GPA + 0x1000)), (None, None)),
        expect(lambda vm: vm.walk(GPA)["sppt"][-1]["value"], 0x55555555),  # SPPT untouched
        W(sub(G, 20), exits=[FAULT_W, spp_viol(profile)], outcome=C.SPP_VIOLATION),
        R(sub(G + 1, 0), exits=[FAULT_R]),
        W(sub(G, 1)),
        expect(lambda vm: (leaf(vm, GPA)["w"], leaf(vm, GPA)["spp"]), (False, True)),
        expect(lambda vm: vm.get_subpages(G, 1).tolist(), [0x0000FFFF]),
        expect(lambda vm: vm.zap(G + 5, 1), 0),  # nothing there: no TLB flush
    ], engine)
    assert flushes["after"] == flushes["before"] + 1
    assert tlb(vm) == flushes["after"]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("profile", PROFILES)
def test_zap_huge_leaf_whole_and_mmio(profile, engine):
    """A huge leaf covering any zapped gfn goes whole; an MMIO entry goes too, so the gfn's next
    access is a first MMIO access again (48, not 49)."""
    vm = sppjit.VM(profile=profile, hugepages=True, memslots=[(0, 0x400)])
    res = C.run(vm, [
        R(0x200000, exits=[FAULT_R]),
        R(0x500000, exits=[C.MMIO_FIRST_R], outcome=C.MMIO),
        expect(lambda vm: leaf(vm, 0x3FF000)["level"], 2),
        expect(lambda vm: vm.zap(0x3FF, 1), 1),
        expect(lambda vm: leaf(vm, 0x200000), None),
        R(0x200000, exits=[FAULT_R]),
        R(0x3FF000),
        R(0x500000, exits=[C.MMIO_LATER], outcome=C.MMIO),
        expect(lambda vm: vm.zap(0x4FF, 2), 1),
        R(0x500000, exits=[C.MMIO_FIRST_R], outcome=C.MMIO),
    ], engine)
    assert res.summary["pages"]["mapped_2m"] == 1
    # mmio_pages counts the MMIO entries KVM installed (cumulative): 2
    assert res.summary["pages"]["mmio_pages"] == 2


# ====================================================================== remap
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("profile", PROFILES)
def test_remap_new_host_page_write_protected(profile, engine):
    """change_pte: every mapped gfn of the range gets the next remap page (in gfn order), W off;
    the protected one gets bit 61 back and keeps its sub-page permissions; the unprotected one
    takes one wp_fault (48, 0x1AA) that sets W, then writes pass."""
    vm = sppjit.VM(profile=profile)
    C.run(vm, [
        C.Init(),
        C.SetMaps(G, (0x0000FFFF,)),
        W(sub(G, 0), exits=first_write(profile)),
        W(sub(G + 1, 0), exits=[FAULT_W]),
        expect(lambda vm: leaf(vm, GPA + 0x1000)["address"], GUEST_RAM_HPA + ((G + 1) << 12)),
        expect(lambda vm: vm.remap(G, 3), 2),  # G+2 is not mapped
        expect(lambda vm: [(e["address"], e["w"], e["spp"]) for e in (leaf(vm, GPA), leaf(vm, GPA + 0x1000))],
               [(REMAP_HPA, False, True), (REMAP_HPA + 0x1000, False, False)]),
        W(sub(G + 1, 0), exits=[WP_FAULT]),
        W(sub(G + 1, 9)),
        expect(lambda vm: leaf(vm, GPA + 0x1000)["w"], True),
        W(sub(G, 0)),  # the SPPT still allows sub-page 0
        W(sub(G, 20), exits=[spp_viol(profile)], outcome=C.SPP_VIOLATION),
        expect(lambda vm: vm.remap(G, 1), 1),
        expect(lambda vm: leaf(vm, GPA)["address"], REMAP_HPA + 0x2000),
        expect(lambda vm: vm.remap(G + 100, 4), 0),
    ], engine)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("profile", PROFILES)
def test_remap_resets_bit61_from_the_map(profile, engine):
    """change_pte builds bit 61 from the stored map, not from the old entry: a protected leaf
    that lost bit 61 and got W (poked: R|W|X, WB, ignore-PAT = 0x77) lets every write through;
    remap makes it W=0 + bit 61 again and the sub-page permissions apply."""
    vm = sppjit.VM(profile=profile)
    C.run(vm, [
        C.Init(),
        C.SetMaps(G, (0x0000FFFF,)),
        W(sub(G, 0), exits=first_write(profile)),
        lambda vm: vm.poke_ept_leaf(GPA, GUEST_RAM_HPA + GPA | 0x77),
        W(sub(G, 20)),
        expect(lambda vm: vm.remap(G, 1), 1),
        expect(lambda vm: (leaf(vm, GPA)["address"], leaf(vm, GPA)["w"], leaf(vm, GPA)["spp"]),
               (REMAP_HPA, False, True)),
        W(sub(G, 20), exits=[spp_viol(profile)], outcome=C.SPP_VIOLATION),
        W(sub(G, 15)),
    ], engine)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("profile", PROFILES)
def test_remap_page_granularity(profile, engine):
    """Page baseline: remap clears W only; a write to the unprotected page is one wp_fault, a
    write to the protected one is the baseline's write_protect exit (39)."""
    vm = sppjit.VM(profile=profile, granularity="page")
    C.run(vm, [
        C.Init(),
        C.SetMaps(G, (0x0000FFFF,)),
        R(GPA, exits=[FAULT_R]),
        R(GPA + 0x1000, exits=[FAULT_R]),
        expect(lambda vm: vm.remap(G, 2), 2),
        expect(lambda vm: [(e["w"], e["spp"]) for e in (leaf(vm, GPA), leaf(vm, GPA + 0x1000))],
               [(False, False), (False, False)]),
        W(GPA + 0x1000, exits=[WP_FAULT]),
        W(GPA, exits=[C.WRITE_PROT], outcome=C.WRITE_PROTECT_VIOLATION),
    ], engine)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("profile", PROFILES)
def test_remap_zaps_huge_leaf(profile, engine):
    vm = sppjit.VM(profile=profile, hugepages=True)
    C.run(vm, [
        R(0x200000, exits=[FAULT_R]),
        expect(lambda vm: vm.remap(0x250, 1), 1),
        expect(lambda vm: leaf(vm, 0x200000), None),
        R(0x250000, exits=[FAULT_R]),
        expect(lambda vm: leaf(vm, 0x200000)["level"], 2),
    ], engine)


# ====================================================================== delete_memslot
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("profile", PROFILES)
def test_delete_memslot_turns_gfns_mmio(profile, engine):
    vm = sppjit.VM(profile=profile, memslots=[(0, 0x400), (0x1000, 0x400)])
    steps = [
        C.Init(),
        C.SetMaps(0x1010, (0,)),
        W(0x1010000, exits=[FAULT_W] + ([SPP_MISS] if profile == "v12" else []) + [spp_viol(profile)],
          outcome=C.SPP_VIOLATION),
        R(0x1200000, exits=[FAULT_R]),
    ]
    C.run(vm, steps, engine)
    before = tlb(vm)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert vm.delete_memslot(0x1010) == 1
    assert tlb(vm) == before + 1
    assert [type(w.message).__name__ for w in caught] == (["SppQuirkWarning"] if profile == "v12" else [])
    assert vm.spp_active == (profile == "v4")
    assert (leaf(vm, 0x1010000), leaf(vm, 0x1200000)) == (None, None)
    assert vm.memslot_of(0x1010) == -1 and vm.memslot_of(0x10) == 0
    res = C.run(vm, [
        W(0x1010000, exits=[C.MMIO_FIRST_W], outcome=C.MMIO),
        R(0x1010000, exits=[C.MMIO_LATER], outcome=C.MMIO),
        R(0x1200000, exits=[C.MMIO_FIRST_R], outcome=C.MMIO),
        R(0x10000, exits=[FAULT_R]),
    ], engine)
    assert res.summary["pages"]["protected"] == 0
    if profile == "v4":
        with pytest.raises(sppjit.SppError) as ei:
            vm.get_subpages(0x1010, 1)
        assert ei.value.errno == EFAULT
    with pytest.raises(sppjit.InputError, match="no memslot"):
        vm.delete_memslot(0x1010)


# ====================================================================== apply
@pytest.mark.parametrize("profile", PROFILES)
def test_apply_dispatch(profile):
    vm = sppjit.VM(profile=profile)
    with pytest.raises(sppjit.SppError) as ei:
        vm.apply({"op": "set_subpages", "gfn": 0x100, "npages": 1, "access": 0})
    assert ei.value.errno == ENODEV  # no implicit init
    vm.init_spp()
    before = tlb(vm)
    assert vm.apply({"op": "set_subpages", "gfn": 0x100, "npages": 100, "access": 0xF0}) == 100
    # v4: calls of at most 64 pages (64 + 36): 2 flushes; v12: one call of 100
    assert tlb(vm) == before + (2 if profile == "v4" else 1)
    assert vm.get_subpages(0x100, 64).tolist() == [0xF0] * 64
    assert vm.get_subpages(0x140, 36).tolist() == [0xF0] * 36
    assert vm.get_subpages(0x164, 1).tolist() == [FULL]
    vm.replay({"gpa": np.array([0x100000, 0x163000], dtype=np.uint64), "kind": np.array([0, 0], dtype=np.uint8)})
    assert vm.apply({"op": "remap", "gfn": 0x100, "npages": 0x100}) == 2
    assert vm.apply({"op": "zap", "gfn": 0x100, "npages": 0x100}) == 2
    assert vm.apply({"op": "zap", "gfn": np.uint64(0x100)}) == 0  # npages defaults to 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert vm.apply({"op": "delete_memslot", "gfn": 0x5}) == 0
    for bad in ({}, {"op": "resize", "gfn": 1}, {"op": "zap"}, {"op": "zap", "gfn": -1},
                {"op": "zap", "gfn": 1, "npages": 0}, {"op": "zap", "gfn": 1.5},
                {"op": "remap", "gfn": 1 << 36, "npages": 1},
                {"op": "set_subpages", "gfn": 1, "npages": 1},
                {"op": "set_subpages", "gfn": 1, "npages": 1, "access": 1 << 32}, "zap"):
        with pytest.raises(sppjit.InputError):
            vm.apply(bad)


# ====================================================================== both engines, random timelines
MEMSLOTS = [(0, 0x600), (0x800, 0x400)]  # gaps 0x600..0x7FF and from 0xC00: MMIO
TOP_GFN = 0xD00


def near(rng, hot) -> int:
    """A gfn next to one of the hot gfns (most timeline activity happens there)."""
    return int(rng.choice(hot)) + int(rng.integers(-2, 3))


def random_ops(rng, hot, late: bool) -> list[dict]:
    ops = []
    for _ in range(rng.integers(0, 5)):
        kind = str(rng.choice(["set_subpages", "zap", "remap", "delete_memslot"],
                              p=[0.5, 0.22, 0.2, 0.08] if late else [0.5, 0.25, 0.25, 0.0]))
        gfn = near(rng, hot) if rng.random() < 0.8 else int(rng.integers(0, TOP_GFN))
        gfn = max(gfn, 0)
        npages = int(rng.choice([1, 1, 2, 5, 40, 600]))
        if kind == "set_subpages":
            access = int(rng.choice([0, FULL, FULL, 0x0000FFFF, 0xFFFF0000, int(rng.integers(0, 1 << 32))]))
            ops.append({"op": kind, "gfn": gfn, "npages": npages, "access": access})
        elif kind == "delete_memslot":
            ops.append({"op": kind, "gfn": gfn})
        else:
            ops.append({"op": kind, "gfn": gfn, "npages": npages})
    return ops


def random_trace(rng, hot, vcpus: int, n: int) -> dict:
    gfn = np.array([near(rng, hot) if rng.random() < 0.85 else int(rng.integers(0, TOP_GFN)) for _ in range(n)])
    gfn = np.maximum(gfn, 0)
    off = rng.integers(0, 4096, size=n)
    size = rng.choice([1, 4, 8, 64, 200], size=n)
    return {
        "gpa": (gfn.astype(np.uint64) << np.uint64(12)) + off.astype(np.uint64),
        "size": size.astype(np.uint16),
        "vcpu": rng.integers(0, vcpus, size=n).astype(np.uint16),
        "kind": rng.choice([0, 1, 1, 1, 2], size=n).astype(np.uint8),
    }


def outcome_of(vm, op):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ("ok", vm.apply(op))
    except (sppjit.SppError, sppjit.InputError) as exc:
        return ("raised", type(exc).__name__, getattr(exc, "errno", None))


def comparable_summary(s: dict) -> dict:
    out = {k: v for k, v in s.items() if k not in ("seconds", "compile_seconds", "accesses_per_second", "engine")}
    out["config"] = {k: v for k, v in s["config"].items() if k != "engine"}
    return out


def state_of(vm) -> dict:
    st = vm.state
    n = int(st.scal[0])
    map_gfns, maps = L.stored_maps(st)
    return {"tables": st.tables[:n], "kind": st.table_kind[:n], "level": st.table_level[:n],
            "scal": st.scal, "vmcs": st.vmcs, "requests": st.requests, "sppt_root": st.sppt_root,
            "maps": maps, "map_gfns": map_gfns, "slot_npages": st.slot_npages}


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("profile", PROFILES)
def test_engines_agree_on_random_timelines(profile, seed):
    rng = np.random.default_rng(1000 * seed + len(profile))
    kw = dict(profile=profile, memslots=MEMSLOTS, vcpus=int(rng.integers(1, 3)),
              hugepages=bool(rng.integers(0, 2)), granularity=str(rng.choice(["spp", "spp", "page"])),
              subpage_check=str(rng.choice(["all", "first"])))
    ref, jit = sppjit.VM(**kw), sppjit.VM(**kw)
    # hot gfns: in slot 0 (two of them in one 2 MiB block), in slot 1, and one in the MMIO gap
    hot = np.array([0x1F0, 0x1F8, int(rng.integers(0, 0x5F0)), int(rng.integers(0x800, 0xBF0)), 0x700])
    for vm in (ref, jit):
        vm.init_spp()
    for phase in range(6):
        ops = random_ops(rng, hot, late=phase >= 4)
        if phase == 0:
            ops.insert(0, {"op": "set_subpages", "gfn": 0x1E8, "npages": 40, "access": 0x0F0F0F0F})
        for op in ops:
            a, b = outcome_of(ref, op), outcome_of(jit, op)
            assert a == b, (op, a, b)
        if not ref.spp_active and rng.random() < 0.5:  # after the v12 quirk: enable again
            assert ref.init_spp() == jit.init_spp() == 0
        trace = random_trace(rng, hot, kw["vcpus"], int(rng.integers(20, 80)))
        ra = ref.replay(trace, engine="reference")
        rb = jit.replay(trace, engine="jit", batch_size=int(rng.integers(1, 40)))
        where = f"{kw} phase {phase} ops {ops}"
        assert ra.table.equals(rb.table), where
        assert ra.exits.equals(rb.exits), where
        assert comparable_summary(ra.summary) == comparable_summary(rb.summary), where
        sa, sb = state_of(ref), state_of(jit)
        for k in sa:
            assert np.array_equal(sa[k], sb[k]), f"{where}: state {k}"


def test_saved_state_keeps_timeline_effects(tmp_path):
    """A v12 VM after remap and a memslot deletion saves and loads as an equal VM (deleted slot,
    remap counter, shared root and spp_active included) that replays the same way."""
    from sppjit.savestate import load_state, save_state

    vm = sppjit.VM(profile="v12", vcpus=2, memslots=[(0, 0x400), (0x1000, 0x400)])
    vm.init_spp()
    vm.set_subpages(0x10, [0x0000FFFF])
    trace = {"gpa": np.array([0x10000, 0x11000, 0x1000000], dtype=np.uint64),
             "kind": np.array([1, 1, 0], dtype=np.uint8), "vcpu": np.array([0, 1, 0], dtype=np.uint16)}
    vm.replay(trace)
    vm.remap(0x10, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vm.delete_memslot(0x1000)
    save_state(vm, tmp_path / "s.npz")
    back = load_state(tmp_path / "s.npz")
    a, b = state_of(vm), state_of(back)
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    assert back.memslot_of(0x1000) == -1 and not back.spp_active
    ra, rb = vm.replay(trace, engine="reference"), back.replay(trace, engine="jit")
    assert ra.table.equals(rb.table) and ra.exits.equals(rb.exits)
