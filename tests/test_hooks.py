"""Hook relevance (docs/contract.md §2.2, the byte-range form), computed by hand.

One hook of 16 bytes at offset 120 of gfn 0x100 covers sub-pages 0 and 1 (bytes 0..255 are
write-protected under SPP; the whole page under page granularity).
"""

import numpy as np
import pyarrow.compute as pc
import pytest

import sppjit
from sppjit.io.protect import ByteRanges, ranges_to_maps
from sppjit.replay import replay

PAGE = 0x100 << 12
HOOK = ByteRanges(gpa=np.array([PAGE + 120], dtype=np.uint64), length=np.array([16], dtype=np.uint32),
                  name=["cred"])


def only(res, kind):
    return res.exits.filter(pc.equal(res.exits["kind"], kind))


def run(granularity, engine, offsets, kinds=None):
    vm = sppjit.VM(memory="16MiB", granularity=granularity)
    maps = ranges_to_maps(HOOK)
    vm.protect(maps.gfn, maps.access)
    n = len(offsets)
    trace = {
        "gpa": np.array([PAGE + o for o in offsets], dtype=np.uint64),
        "size": np.full(n, 8, dtype=np.uint16),
        "kind": np.array(kinds if kinds is not None else [1] * n, dtype=np.uint8),
    }
    return replay(vm, trace, engine=engine, hooks=HOOK)


@pytest.mark.parametrize("engine", ["jit", "reference"])
def test_hand_computed_relevance(engine):
    # offsets: 124 (inside the hook), 200 (sub-page 1, outside the hook), 1000 (sub-page 7)
    spp = run("spp", engine, [124, 200, 1000])
    page = run("page", engine, [124, 200, 1000])
    spp_prot = only(spp, "spp_violation").to_pylist()
    page_prot = only(page, "write_protect").to_pylist()
    assert [(e["row"], e["relevant"], e["hook"]) for e in spp_prot] == [(0, True, "cred"), (1, False, None)]
    assert [(e["row"], e["relevant"], e["hook"]) for e in page_prot] == [
        (0, True, "cred"), (1, False, None), (2, False, None)]
    assert spp.summary["hooks"] == {"relevant": 1, "irrelevant": 1, "per_hook": [{"name": "cred", "relevant": 1}]}
    assert page.summary["hooks"]["irrelevant"] == 2
    # exits that are not protection exits carry a null `relevant`
    faults = only(spp, "ept_fault").to_pylist()
    assert faults and all(e["relevant"] is None for e in faults)


@pytest.mark.parametrize("engine", ["jit", "reference"])
def test_write_straddling_the_hook_end_is_relevant_and_reads_name_no_hook(engine):
    # 8 bytes at 132 overlap the hook's last 4 bytes (120..135); a read at 124 names no hook
    res = run("spp", engine, [132, 124], kinds=[1, 0])
    prot = only(res, "spp_violation").to_pylist()
    assert [(e["row"], e["relevant"], e["hook"]) for e in prot] == [(0, True, "cred")]
    assert res.table["outcome"].to_pylist() == [1, 0]


def test_overlapping_hooks_reference_count_and_first_hook_named():
    ranges = ByteRanges(gpa=np.array([PAGE + 0, PAGE + 64, PAGE + 300], dtype=np.uint64),
                        length=np.array([100, 16, 8], dtype=np.uint32), name=["a", "b", "c"])
    maps = ranges_to_maps(ranges)
    # a covers sub-page 0, b sub-page 0 too, c sub-page 2
    assert maps.access.tolist() == [0xFFFFFFFF & ~0b101]
    vm = sppjit.VM(memory="16MiB")
    vm.protect(maps.gfn, maps.access)
    res = replay(vm, {"gpa": np.array([PAGE + 70], dtype=np.uint64)}, hooks=ranges)
    prot = only(res, "spp_violation").to_pylist()
    assert [(e["relevant"], e["hook"]) for e in prot] == [(True, "a")]
