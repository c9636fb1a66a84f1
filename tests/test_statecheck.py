"""A saved state is input: load_state checks every index the kernels trust (sppjit.statecheck).

Each targeted test damages one thing of a real saved state and expects one clear InputError
line naming it (before the checks, most of these made compiled code read or write out of
bounds); the fuzz test runs seeded random damage through load_state and both engines in a child
process and fails on any signal (tests/state_fuzz.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from sppjit import VM, InputError
from sppjit import bits as B
from sppjit.kernels import layout as L
from sppjit.savestate import load_state, save_state

HERE = os.path.dirname(os.path.abspath(__file__))
TRACE = {"gpa": np.array([0x10040, 0x11040, 0x200040, 0x7FF000, 0x2005000], dtype=np.uint64),
         "kind": np.array([1, 1, 1, 0, 1], dtype=np.uint8)}


def saved(tmp_path, profile="v4", **kw):
    """A real state (SPP on, protected pages, faulted-in pages, an MMIO gfn), saved; its arrays."""
    vm = VM(memslots=[(0, 4096), (8192, 1024)], vcpus=2, profile=profile, **kw)
    vm.init_spp()
    vm.protect(np.array([0x10, 0x11, 0x200, 0x2005], np.uint64), np.array([0, 0xFFFF0000, 1, 0xF], np.uint32))
    vm.replay(TRACE)
    path = tmp_path / "good.npz"
    save_state(vm, path)
    with np.load(path) as data:
        return vm, {name: data[name].copy() for name in data.files}


def load_damaged(tmp_path, arrays):
    path = tmp_path / "damaged.npz"
    np.savez(path, **arrays)
    return load_state(path)


def table_of(arrays, kind, level) -> int:
    return int(np.flatnonzero((arrays["table_kind"] == kind) & (arrays["table_level"] == level))[0])


def set_scal(i, v):
    def f(a):
        a["scal"][i] = v
    return f


def eptp_of(a):
    a["vmcs"][1, B.VMCS_COL_EPTP] += np.uint64(4096)


def point_ept_at_sppt(a):
    """The EPT root's first present entry now points at an SPPT level-3 table."""
    root = int(a["scal"][L.SC_EPT_ROOT])
    i = int(np.flatnonzero(a["tables"][root] & np.uint64(7))[0])
    target = table_of(a, L.TABLE_SPPT, 3)
    a["tables"][root, i] = np.uint64(B.TABLE_POOL_HPA + 4096 * target) | np.uint64(B.EPT_NONLEAF_FLAGS)


def point_sppt_at_wrong_level(a):
    t = table_of(a, L.TABLE_SPPT, 4)
    i = int(np.flatnonzero(a["tables"][t] & np.uint64(1))[0])
    a["tables"][t, i] = np.uint64(B.TABLE_POOL_HPA + 4096 * table_of(a, L.TABLE_SPPT, 1)) | np.uint64(1)


def cache_entry(name, value):
    def f(a):
        a[name].reshape(-1)[0] = value
    return f


def map_dir_out_of_range(a):
    a["map_dir"][0] = a["map_nodes"].shape[0]


def map_node_out_of_range(a):
    node = a["map_nodes"][0]
    node[np.flatnonzero(node >= 0)[0]] = a["map_blocks"].shape[0] + 5


def map_blocks_shared(a):
    node = a["map_nodes"][0]
    used = np.flatnonzero(node >= 0)
    node[used[1]] = node[used[0]]


def map_outside_memslots(a):
    """A block of its own for region 8 (gfns 4096..4607, the gap between the memslots) with a
    map stored for gfn 4097."""
    block = np.full((1, 512), B.FULL_SPP_ACCESS, dtype=np.uint32)
    block[0, 1] = 0
    a["map_blocks"] = np.concatenate([a["map_blocks"], block])
    a["scal"][L.SC_MAP_BLOCKS] += 1
    a["map_nodes"][0, 8] = a["map_blocks"].shape[0] - 1


def cut(name):
    def f(a):
        a[name] = a[name][:-1]
    return f


DAMAGE = [
    ("ntables above the pool", set_scal(L.SC_NTABLES, 10**6), "entries in use"),
    ("ntables zero", lambda a: (a.update(tables=a["tables"][:0], table_kind=a["table_kind"][:0],
                                         table_level=a["table_level"][:0]), set_scal(L.SC_NTABLES, 0)(a)),
     "0 tables in use"),
    ("pool shorter than its counter", cut("tables"), "tables"),
    ("map pool shorter than its counter", cut("map_blocks"), "map_blocks"),
    ("EPT root out of the pool", set_scal(L.SC_EPT_ROOT, 10**9), "EPT root"),
    ("EPT root an SPPT table", lambda a: set_scal(L.SC_EPT_ROOT, table_of(a, L.TABLE_SPPT, 4))(a), "EPT root"),
    ("EPT root negative", set_scal(L.SC_EPT_ROOT, -5), "EPT root"),
    ("shared SPPT root out of the pool", set_scal(L.SC_SHARED_SPPT_ROOT, 1 << 40), "shared SPPT root"),
    ("vCPU count", set_scal(L.SC_NVCPUS, 64), "vCPUs"),
    ("spp_active", set_scal(L.SC_SPP_ACTIVE, 7), "spp_active"),
    ("negative counter", set_scal(L.SC_MMIO_PAGES, -1), "mmio_pages"),
    ("remap beyond the host", set_scal(L.SC_REMAP_NEXT, 1 << 50), "remap"),
    ("SPPT root of a vCPU", lambda a: a["sppt_root"].__setitem__(1, 123456), "SPPT root"),
    ("SPPT root an EPT table", lambda a: a["sppt_root"].__setitem__(0, int(a["scal"][L.SC_EPT_ROOT])), "SPPT root"),
    ("table kind", lambda a: a["table_kind"].__setitem__(2, 9), "kind 9"),
    ("table level", lambda a: a["table_level"].__setitem__(2, 0), "level 0"),
    ("EPT entry at an SPPT table", point_ept_at_sppt, "not a level-3 EPT table"),
    ("SPPT entry at a level-1 table", point_sppt_at_wrong_level, "not a level-3 SPPT table"),
    ("EPT_POINTER", eptp_of, "EPT_POINTER"),
    ("requests", lambda a: a["requests"].__setitem__(0, 0x80), "requests"),
    ("memslot base", lambda a: a["slot_base"].__setitem__(1, 9000), "memslot bases"),
    ("memslot size", lambda a: a["slot_npages"].__setitem__(0, 5), "memslot's size"),
    ("settings", lambda a: a["cfg"].__setitem__(L.CF_SUBPAGE_CHECK, 1), "settings"),
    ("map directory", map_dir_out_of_range, "map directory"),
    ("map node", map_node_out_of_range, "map node"),
    ("shared map block", map_blocks_shared, "share a map block"),
    ("map outside every memslot", map_outside_memslots, "no memslot"),
    ("ept_cache table out of the pool", cache_entry("ept_cache", (1 << 36) | (10**6 << 4)), "ept_cache"),
    ("ept_cache tag of another entry", cache_entry("ept_cache", (2 << 36) | (1 << 4)), "ept_cache"),
    ("ept_cache negative", cache_entry("ept_cache", -7), "ept_cache"),
    ("sppt_cache at the EPT root", lambda a: cache_entry("sppt_cache", (1 << 36) | int(a["scal"][L.SC_EPT_ROOT]))(a),
     "sppt_cache"),
]


@pytest.mark.parametrize("what, damage, message", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_damaged_state_is_refused_in_one_line(tmp_path, what, damage, message):
    _, arrays = saved(tmp_path)
    damage(arrays)
    with pytest.raises(InputError, match=message) as ei:
        load_damaged(tmp_path, arrays)
    assert "\n" not in str(ei.value)


def test_v12_vcpus_must_share_the_root(tmp_path):
    _, arrays = saved(tmp_path, profile="v12")
    roots = np.flatnonzero((arrays["table_kind"] == L.TABLE_SPPT) & (arrays["table_level"] == 4))
    assert roots.size == 1
    arrays["sppt_root"][1] = -1
    with pytest.raises(InputError, match="shared root"):
        load_damaged(tmp_path, arrays)


def test_a_legal_odd_state_loads_and_replays(tmp_path):
    """What the checks leave alone: entry values are the hardware's business. An EPT entry
    pointing outside the pool reads as zeros (a fault that KVM cannot repair there is a
    livelock, reported), and well-formed cache entries are accepted, then dropped."""
    vm, arrays = saved(tmp_path)
    root = int(arrays["scal"][L.SC_EPT_ROOT])
    i = int(np.flatnonzero(arrays["tables"][root] & np.uint64(7))[0])
    l1 = table_of(arrays, L.TABLE_EPT, 1)
    arrays["ept_cache"][0] = (1 << 36) | (l1 << 4) | 7  # region 0 (tag 1), a level-1 EPT table
    arrays["tables"][root, i] = np.uint64(B.GUEST_RAM_HPA) | np.uint64(B.EPT_NONLEAF_FLAGS)  # outside the pool
    loaded = load_damaged(tmp_path, arrays)
    assert (loaded.state.ept_cache == L.CACHE_INVALID).all()
    from sppjit.reference import ModelLivelock

    for engine in ("jit", "reference"):
        with pytest.raises(ModelLivelock):
            load_damaged(tmp_path, arrays).replay(TRACE, engine=engine)


def test_caches_are_saved_empty_and_a_loaded_vm_is_equal(tmp_path):
    vm, arrays = saved(tmp_path)
    assert (vm.state.ept_cache != L.CACHE_INVALID).any()  # the replay filled them
    assert (arrays["ept_cache"] == L.CACHE_INVALID).all() and (arrays["sppt_cache"] == L.CACHE_INVALID).all()
    loaded = load_state(tmp_path / "good.npz")
    again = {"gpa": TRACE["gpa"] + np.uint64(8), "kind": TRACE["kind"]}
    a, b = vm.replay(again), loaded.replay(again)
    assert a.table.equals(b.table) and a.exits.equals(b.exits)


def test_caches_saved_empty_by_earlier_releases_load(tmp_path):
    """Releases before the zeroed caches saved an empty entry as -1: such a file loads, with
    its caches empty (a -1 next to a filled entry is still just empty)."""
    vm, arrays = saved(tmp_path)
    arrays["ept_cache"][:] = -1
    arrays["sppt_cache"][:] = -1
    loaded = load_damaged(tmp_path, arrays)
    assert (loaded.state.ept_cache == L.CACHE_INVALID).all()
    again = {"gpa": TRACE["gpa"] + np.uint64(8), "kind": TRACE["kind"]}
    a, b = vm.replay(again), loaded.replay(again)
    assert a.table.equals(b.table) and a.exits.equals(b.exits)


def test_an_older_format_is_refused_clearly(tmp_path):
    _, arrays = saved(tmp_path)
    meta = json.loads(str(arrays["__meta__"]))
    meta["format_version"] = 1
    arrays["__meta__"] = np.array(json.dumps(meta))
    with pytest.raises(InputError, match="format version 1; this sppjit reads 2"):
        load_damaged(tmp_path, arrays)


def test_a_damaged_config_is_one_line(tmp_path):
    _, arrays = saved(tmp_path)
    meta = json.loads(str(arrays["__meta__"]))
    for config in ({**meta["config"], "vcpus": "many"}, {**meta["config"], "memslots": [[0]]},
                   {**meta["config"], "memslots": [[0, -5]]}, {**meta["config"], "profile": 4},
                   {**meta["config"], "memslots": [[0, 4096.5]]}, {**meta["config"], "vcpus": 2.0},
                   {**meta["config"], "hugepages": "yes"}, "not a mapping"):
        arrays["__meta__"] = np.array(json.dumps({**meta, "config": config}))
        with pytest.raises(InputError, match="damaged config") as ei:
            load_damaged(tmp_path, arrays)
        assert "\n" not in str(ei.value)


FUZZ_MUTATIONS = 300


def test_fuzzed_states_never_crash(tmp_path):
    """300 seeded mutations of real states (v4, v12, page granularity) through load_state and a
    replay on both engines: no signal, no internal error (state_fuzz.py exits 3 on those)."""
    proc = subprocess.run([sys.executable, os.path.join(HERE, "state_fuzz.py"), "11", str(FUZZ_MUTATIONS),
                           str(tmp_path)], capture_output=True, text=True, timeout=600)
    last = proc.stdout.strip().splitlines()[-3:]
    assert proc.returncode == 0, f"exit {proc.returncode} after: {last} {proc.stderr[-2000:]}"
    assert last[-1].startswith(f"done: {FUZZ_MUTATIONS} mutations")
