"""The one decorator every kernel uses, and the typed constants kernels compute with.

numba freezes module-level globals as compile-time constants. Python ints above 2**63 and
mixed int64/uint64 arithmetic are the classic traps (numba promotes int64 op uint64 to
float64), so every bit constant a kernel touches is re-declared here as ``np.uint64``.
"""

import hashlib
import os

import numba
import numpy as np

from sppjit import bits as B
from sppjit import compilation


def _prepare_cache() -> bool:
    """Whether kernels may use numba's on-disk cache, after dropping a stale one.

    numba keys a cached function on its own file only, but our kernels inline helpers from
    other modules and freeze sppjit.bits constants: a change there would leave stale machine
    code behind. So the cache is stamped with a digest of every file the kernels compile from,
    and wiped when that digest changes, with the compiled helpers of sppjit's own modules
    (which inline kernels). SPPJIT_NUMBA_CACHE=0 turns caching off; so does a
    read-only install (numba would otherwise write to a shared user directory).
    """
    if os.environ.get("SPPJIT_NUMBA_CACHE", "1").lower() in ("0", "false", "no"):
        return False
    if os.environ.get("NUMBA_CACHE_DIR"):
        return True  # the user chose where the cache lives; numba's own rules apply
    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(f for f in os.listdir(here) if f.endswith(".py"))
    h = hashlib.sha256()
    for name in sources:
        with open(os.path.join(here, name), "rb") as f:
            h.update(name.encode() + b"\0" + f.read())
    with open(B.__file__, "rb") as f:
        h.update(f.read())
    h.update(numba.__version__.encode())
    digest = h.hexdigest()
    cache_dir = os.path.join(here, "__pycache__")
    stamp = os.path.join(cache_dir, "sppjit-kernels.sha256")
    try:
        os.makedirs(cache_dir, exist_ok=True)
        if not os.access(cache_dir, os.W_OK):
            return False
        with open(stamp) as f:
            if f.read().strip() == digest:
                return True
    except OSError:
        pass
    try:
        # sppjit's own compiled helpers (sppjit/shards.py) inline kernels too: theirs go as well.
        library_cache = os.path.join(os.path.dirname(os.path.abspath(B.__file__)), "__pycache__")
        for directory in (cache_dir, library_cache):
            if not os.path.isdir(directory):
                continue
            for name in os.listdir(directory):
                if name.endswith((".nbi", ".nbc")):
                    os.remove(os.path.join(directory, name))
        with open(stamp, "w") as f:
            f.write(digest)
    except OSError:
        return False
    return True


NUMBA_CACHE = _prepare_cache()
compilation.install()  # says when the kernels compile, and times it apart from replaying


def kernel(*args, **kwargs):
    """``numba.njit`` with sppjit's defaults: cached, GIL released, no bounds checks."""
    kwargs.setdefault("cache", NUMBA_CACHE)
    kwargs.setdefault("nogil", True)
    kwargs.setdefault("_nrt", False)
    return numba.njit(*args, **kwargs)


def inline(fn):
    """A small helper always inlined into its callers (walk steps, bit tests)."""
    return numba.njit(inline="always", cache=NUMBA_CACHE, nogil=True, _nrt=False)(fn)


U0 = np.uint64(0)
U1 = np.uint64(1)
U_PAGE_SHIFT = np.uint64(B.PAGE_SHIFT)
U_PAGE_OFFSET = np.uint64(B.PAGE_SIZE - 1)
U_PT_INDEX_MASK = np.uint64(B.PT_ENTRIES - 1)
U_SUBPAGE_SHIFT = np.uint64(B.SUBPAGE_SHIFT)
U_SUBPAGE_INDEX_MASK = np.uint64(B.SUBPAGES_PER_PAGE - 1)
U_R = np.uint64(B.VMX_EPT_READABLE_MASK)
U_W = np.uint64(B.VMX_EPT_WRITABLE_MASK)
U_X = np.uint64(B.VMX_EPT_EXECUTABLE_MASK)
U_RWX = np.uint64(B.VMX_EPT_RWX_MASK)
U_MT_SHIFT = np.uint64(B.VMX_EPT_MT_EPTE_SHIFT)
U_PS = np.uint64(B.PT_PAGE_SIZE_MASK)
U_SPP = np.uint64(B.PT64_SPP_MASK)
U_ADDR = np.uint64(B.PT64_BASE_ADDR_MASK)
U_ADDR_RSVD = np.uint64(B.EPT_ADDR_RESERVED_MASK)
U_NONLEAF_RSVD_L4 = np.uint64(0xF8)  # bits 7:3 of a level-4 EPT entry
U_NONLEAF_RSVD = np.uint64(0x78)  # bits 6:3 of a level-3/2 EPT entry pointing to a table
U_EPT_NONLEAF = np.uint64(B.EPT_NONLEAF_FLAGS)
U_EPT_LEAF = np.uint64(B.EPT_LEAF_FLAGS)
U_MMIO_SPTE = np.uint64(B.VMX_EPT_MISCONFIG_WX_VALUE)
U_SPPT_PRESENT = np.uint64(B.SPPT_PRESENT_MASK)
U_SPPT_NONLEAF_RSVD = np.uint64(B.SPPT_NONLEAF_RESERVED_MASK)
U_SPPT_LEAF_RSVD = np.uint64(B.SPPT_LEAF_RESERVED_MASK)
U_FULL_VECTOR = np.uint64(B.FULL_SPP_VECTOR)
U_TABLE_POOL_HPA = np.uint64(B.TABLE_POOL_HPA)
U_GUEST_RAM_HPA = np.uint64(B.GUEST_RAM_HPA)
U_GUEST_RAM_OFFSET = np.uint64(B.GUEST_RAM_SIZE - 1)
U_REMAP_HPA = np.uint64(B.REMAP_HPA)
U_PHYS_LIMIT = np.uint64(1 << B.MAXPHYADDR)
U_SEC_EPT = np.uint64(B.SECONDARY_EXEC_ENABLE_EPT)
U_SEC_SPP = np.uint64(B.SECONDARY_EXEC_ENABLE_SPP)
U_PROC_ACTIVATE_SECONDARY = np.uint64(B.CPU_BASED_ACTIVATE_SECONDARY_CONTROLS)
U_QUAL_GLA = np.uint64(B.EPT_VIOLATION_GLA_VALID | B.EPT_VIOLATION_GLA_TRANSLATED)
U_QUAL_RWX_SHIFT = np.uint64(B.EPT_VIOLATION_RWX_SHIFT)
U_QUAL_SPP_MISS = np.uint64(B.SPPT_INDUCED_EXIT_TYPE)
FULL_ACCESS_U32 = np.uint32(B.FULL_SPP_ACCESS)


# ------------------------------------------------------------------ software prefetch
# The replay of a random trace is bound by the latency of one cache miss per access (the EPT
# leaf of a page nobody touched lately). Asking for the leaf of an access a few rows ahead
# lets those misses overlap. llvm.prefetch is only a hint: it never faults and changes no
# result, so under NUMBA_DISABLE_JIT it is simply a no-op.
if numba.config.DISABLE_JIT:

    def prefetch(address):
        pass

else:
    from llvmlite import ir
    from numba.core import cgutils, types
    from numba.extending import intrinsic

    @intrinsic
    def prefetch(typingctx, address):
        if not isinstance(address, types.Integer):
            return None

        def codegen(context, builder, signature, args):
            i8p = ir.IntType(8).as_pointer()
            i32 = ir.IntType(32)
            fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
            fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")
            ptr = builder.inttoptr(args[0], i8p)
            # read (0), high temporal locality (3), data cache (1)
            builder.call(fn, [ptr, i32(0), i32(3), i32(1)])
            return context.get_dummy_value()

        return types.void(address), codegen
