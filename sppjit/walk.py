"""Decoded EPT and SPPT walks of one gpa, for ``vm.walk`` and ``sppjit inspect``."""

from __future__ import annotations

from . import bits as B
from .kernels import layout as L
from .reference import _read

MEMTYPES = {0: "UC", 1: "WC", 4: "WT", 5: "WP", 6: "WB"}


def decode_ept_entry(entry: int, level: int) -> dict:
    leaf = level == 1 or (level in (2, 3) and bool(entry & B.PT_PAGE_SIZE_MASK))
    d = {
        "level": level,
        "value": entry,
        "hex": f"{entry:#018x}",
        "present": bool(entry & B.VMX_EPT_RWX_MASK),
        "address": entry & B.PT64_BASE_ADDR_MASK,
        "r": bool(entry & B.VMX_EPT_READABLE_MASK),
        "w": bool(entry & B.VMX_EPT_WRITABLE_MASK),
        "x": bool(entry & B.VMX_EPT_EXECUTABLE_MASK),
        "leaf": leaf,
    }
    if leaf:
        mt = (entry >> B.VMX_EPT_MT_EPTE_SHIFT) & 7
        d.update(
            memtype=MEMTYPES.get(mt, f"reserved({mt})"),
            ignore_pat=bool(entry & B.VMX_EPT_IPAT_BIT),
            large=level > 1,
            spp=bool(entry & B.PT64_SPP_MASK),
            mmio=(entry & B.VMX_EPT_RWX_MASK) == B.VMX_EPT_MISCONFIG_WX_VALUE,
        )
    return d


def decode_spp_vector(vector: int) -> dict:
    """An SPP vector as 32 sub-pages (1 = writable) plus the KVM access map and reserved bits."""
    return {
        "value": vector,
        "hex": f"{vector:#018x}",
        "access_map": f"{B.vector_to_access_map(vector):#010x}",
        "subpages": "".join("1" if vector >> (2 * i) & 1 else "0" for i in range(B.SUBPAGES_PER_PAGE)),
        "reserved_bits_set": bool(vector & B.SPPT_LEAF_RESERVED_MASK),
    }


def walk(vm, gpa: int, vcpu: int = 0) -> dict:
    """The entries the hardware reads for ``gpa`` on ``vcpu``: EPT from EPTP, SPPT from SPPTP."""
    st = vm.state
    out: dict = {"gpa": gpa, "gfn": gpa >> B.PAGE_SHIFT, "subpage": B.subpage_index(gpa), "vcpu": vcpu}
    ept = []
    table = int(st.vmcs[vcpu, B.VMCS_COL_EPTP]) & B.PT64_BASE_ADDR_MASK
    for level in (4, 3, 2, 1):
        entry = _read(st, table, B.level_index(gpa, level))
        d = decode_ept_entry(entry, level)
        ept.append(d)
        if not d["present"] or d["leaf"]:
            break
        table = entry & B.PT64_BASE_ADDR_MASK
    out["ept"] = ept
    sppt = []
    table = int(st.vmcs[vcpu, B.VMCS_COL_SPPTP])
    if table:
        for level in (4, 3, 2):
            entry = _read(st, table, B.level_index(gpa, level))
            sppt.append(
                {
                    "level": level,
                    "value": entry,
                    "hex": f"{entry:#018x}",
                    "present": bool(entry & B.SPPT_PRESENT_MASK),
                    "address": entry & B.PT64_BASE_ADDR_MASK,
                    "reserved_bits_set": bool(entry & B.SPPT_NONLEAF_RESERVED_MASK),
                }
            )
            if not entry & B.SPPT_PRESENT_MASK:
                break
            table = entry & B.PT64_BASE_ADDR_MASK
        else:
            leaf = _read(st, table, B.level_index(gpa, 1))
            sppt.append(dict(level=1, **decode_spp_vector(leaf)))
    out["sppt"] = sppt
    slot = vm.memslot_of(out["gfn"])
    out["memslot"] = None if slot < 0 else slot
    if slot >= 0 and st.scal[L.SC_SPP_ACTIVE]:
        out["access_map"] = f"{L.stored_map(st, out['gfn']):#010x}"
    return out
