"""Memory follows what the trace touches and what is protected, not the guest's size.

Before the state was sparse, a replay held about 5 bytes per guest page even with SPP unused:
``--memory 16TiB`` took 20 GiB for a 200-row trace, 256 TiB ended in a MemoryError and a memslot
of 16 pages at the top of the 48-bit space asked for 64 GiB (the summary's touched count). Each
case runs in a child process under an 8 GiB address-space limit and reports its peak RSS.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import sppjit

CHILD = r"""
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))
import numpy as np, sppjit
from sppjit.rss import own_peak_rss
kw = json.loads(sys.argv[1])
out = {}
for engine in ("jit", "reference"):
    vm = sppjit.VM(**kw)
    slots = vm.config.memslots
    base, n = slots[-1]
    rng = np.random.default_rng(3)
    gfns = np.unique(rng.integers(base, base + n, 200, dtype=np.uint64))[:200]
    prot = gfns[:: 2][:50]
    vm.protect(prot, np.full(prot.size, 0xFFFF0000, np.uint32))
    gpa = np.concatenate([gfns << np.uint64(12), gfns << np.uint64(12)]) + np.uint64(64)
    res = vm.replay({"gpa": gpa, "kind": np.ones(gpa.size, np.uint8)}, engine=engine)
    out[engine] = {"summary": {k: res.summary[k] for k in ("counts", "exits", "pages")},
                   "outcome": res.table["outcome"].to_pylist(), "gfns": int(gfns.size), "protected": int(prot.size)}
out["maxrss_mib"] = own_peak_rss() >> 20  # the child's own peak (sppjit.rss)
print(json.dumps(out))
"""

CASES = {
    "16TiB": dict(memory="16TiB", vcpus=2),
    "256TiB": dict(memory="256TiB"),
    "16 pages at the top": dict(memslots=[[(1 << 36) - 16, 16]], profile="v12"),
}


@pytest.mark.parametrize("name", CASES)
def test_a_small_trace_on_a_huge_guest_takes_little_memory(name):
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(CASES[name])], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    jit, ref = out["jit"], out["reference"]
    assert jit == ref
    s = jit["summary"]
    assert s["pages"]["touched"] == jit["gfns"]
    assert s["pages"]["protected"] == jit["protected"]
    # Every gfn is RAM (backing addresses stay valid however large the guest): one fault-in
    # each, then each protected page's two writes to sub-page 0 are refused.
    assert s["exits"]["mmio"] == 0 and s["exits"]["ept_fault"] == jit["gfns"]
    assert s["counts"]["spp_violation"] == 2 * jit["protected"]
    assert out["maxrss_mib"] < 1536, out["maxrss_mib"]


def test_the_touched_set_grows_in_the_kernel():
    """A trace over 40 GiB of a 64 GiB guest: the touched set's pool starts with 4 blocks (4
    GiB) and the kernel asks for more (STATUS_NEED_TOUCHED) mid-batch; both engines count every
    distinct page, including the second page of a page-crossing access."""
    rng = np.random.default_rng(5)
    gfns = (np.arange(40, dtype=np.uint64) << np.uint64(18)) + rng.integers(0, 1 << 18, 40).astype(np.uint64)
    gfns = np.concatenate([gfns, gfns[:5]])
    gpa = (gfns << np.uint64(12)) + np.uint64(4092)  # 8 bytes: crosses into gfn + 1
    trace = {"gpa": gpa, "size": np.full(gpa.size, 8, np.uint16)}
    expected = len(set(gfns.tolist()) | {g + 1 for g in gfns.tolist()})
    for engine in ("jit", "reference"):
        res = sppjit.VM(memory="64GiB").replay(trace, engine=engine)
        assert res.summary["pages"]["touched"] == expected, engine


LAZY_CHILD = r"""
import json, resource, threading
import numpy as np
import sppjit
from sppjit.kernels.layout import lazy_zeros

sppjit.VM(memory="16GiB")  # the first VM loads the control plane's kernels: not measured
out = {}

def work():
    for name, make in (("lazy_zeros", lambda: lazy_zeros(8 << 20, np.uint32)),  # 32 MiB
                       ("VM", lambda: sppjit.VM(memory="16GiB"))):  # a 32 MiB pool, a 32 MiB write view
        freed = np.ones(12 << 20, np.uint32)  # 48 MiB written, then freed: the arena recycles it
        del freed
        r0 = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        made = make()
        out[name] = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - r0
        if name == "VM":
            st = made.state
            out["reserved_pages"] = (st.tables.nbytes + st.write_view.nbytes) >> 12
            out["zero"] = not (st.tables[int(st.scal[0]):].any() or st.write_view.any())
        else:
            out["zero"] = not made.any() and made.flags.writeable

t = threading.Thread(target=work)  # a thread's arena: there glibc's calloc writes recycled memory
t.start()
t.join()
print(json.dumps(out))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread fault counts are Linux's")
def test_a_vm_reserves_its_pool_without_writing_it_even_in_recycled_memory():
    """The table pool, the region caches and the write view are reserved for the whole guest
    and touched only where the trace goes. np.zeros keeps that promise only when the allocator
    takes fresh memory from the system: served from memory it recycles (a thread's arena that
    held a freed array, once the mmap threshold has risen, as glibc raises it by itself after
    large frees) calloc writes every page, and building this VM took 8,700 page faults (its
    whole pool and view) instead of a few dozen. kernels.layout.lazy_zeros never writes them."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 30))
    proc = subprocess.run([sys.executable, "-c", LAZY_CHILD], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["zero"], out
    assert out["reserved_pages"] >= 16_000, out
    assert out["lazy_zeros"] < 64, out
    assert out["VM"] < 1_000, out
