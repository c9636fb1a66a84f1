"""The exits the replay's fast loop takes in place (kernels.replay.fast_rows) leave exactly
what the reference engine leaves: results, exit log, counters, state. Here each is made the
common case on purpose (the property tests of test_equivalence.py meet them among others)."""

from __future__ import annotations

import numpy as np
import pytest

from sppjit import bits as B
from sppjit.vm import VM

from strategies import state_arrays


def _trace(gfns, rng, kinds=(B.ACCESS_WRITE,)):
    n = gfns.shape[0]
    return {"gpa": (gfns << np.uint64(12)) | (rng.integers(0, 512, n, dtype=np.uint64) << np.uint64(3)),
            "size": rng.choice(np.array([1, 8, 64], np.uint16), n),
            "vcpu": rng.integers(0, 2, n).astype(np.uint16),
            "kind": rng.choice(np.array(kinds, np.uint8), n),
            "insn_len": rng.integers(0, 16, n).astype(np.uint8)}


@pytest.mark.parametrize("granularity", ["page", "spp"])
@pytest.mark.parametrize("profile", ["v4", "v12"])
def test_refused_writes_in_the_fast_loop_match_the_reference(granularity, profile):
    rng = np.random.default_rng(11)
    pages = np.arange(1024, 1024 + 600, dtype=np.uint64)
    prot = pages[rng.random(pages.shape[0]) < 0.6]
    maps = rng.choice(np.array([0, 0xFFFF0000, 0x0F0F0F0F, 0xFFFFFFFF], np.uint32), prot.shape[0])
    vms = {}
    for engine in ("reference", "jit"):
        vm = VM(memory="64M", vcpus=2, profile=profile, granularity=granularity)
        vm.protect(prot, maps)
        first = vm.replay(_trace(pages, rng := np.random.default_rng(5)), engine=engine)  # faults in
        second = vm.replay(_trace(rng.permutation(np.repeat(pages, 4)), rng,
                                  (B.ACCESS_WRITE, B.ACCESS_WRITE, B.ACCESS_READ)), engine=engine)
        vms[engine] = (vm, first, second)
    (ref, r1, r2), (jit, j1, j2) = vms["reference"], vms["jit"]
    for a, b in ((r1, j1), (r2, j2)):
        assert a.table.equals(b.table) and a.exits.equals(b.exits)
        assert a.summary["counts"] == b.summary["counts"] and a.summary["exits"] == b.summary["exits"]
    kind = "write_protect" if granularity == "page" else "spp_violation"
    assert j2.summary["exits"][kind] > 500  # the case under test is the common one
    for name, x in state_arrays(ref).items():
        assert np.array_equal(x, state_arrays(jit)[name]), name
