"""What a saved VM state holds: each vCPU's VMCS decoded, and EPT/SPPT walks of addresses.

``inspect_state(path, addresses, vcpu)`` is ``sppjit inspect`` as one library call: it loads
a state written by ``save_state`` (``sppjit replay --save-state``) and returns the report as
a JSON-ready dict; ``format_report`` prints it for people.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from sppjit import bits as B
from sppjit.errors import InputError
from sppjit.io.sizes import format_size
from sppjit.walk import MEMTYPES


def inspect_state(path: str, addresses: Iterable[int] = (), vcpu: int | None = None, *,
                  names: Mapping[str, str] | None = None) -> dict:
    """The report of the state saved in ``path``: every vCPU's VMCS (or only ``vcpu``'s)
    and the walk of each address (on ``vcpu``, default 0). Errors name the parameters, or
    what ``names`` calls them."""
    from sppjit.savestate import load_state

    vm = load_state(path)
    if vcpu is not None and not 0 <= vcpu < vm.vcpus:
        label = (names or {}).get("vcpu", "vcpu")
        raise InputError(f"{label}: the VM has {vm.vcpus} vCPU{'s' if vm.vcpus != 1 else ''} "
                         f"(0..{vm.vcpus - 1}), not {vcpu}")
    return build_report(vm, path, list(addresses), vcpu)


# ------------------------------------------------------------------------------ decoding

def _named_bits(value: int, names: dict[int, str]) -> list[str]:
    """The names of the set bits of ``value`` ("bit N" for bits without a name)."""
    out = []
    for bit in range(64):
        mask = 1 << bit
        if value & mask:
            out.append(names.get(mask, f"bit {bit}"))
    return out


def _exit_reason_names() -> dict[int, str]:
    return {value: name[len("EXIT_REASON_"):] for name, value in vars(B).items()
            if name.startswith("EXIT_REASON_") and isinstance(value, int)}


def decode_vmcs(vm, index: int) -> dict:
    """One vCPU's VMCS fields, raw and decoded."""
    from sppjit.kernels import layout as L

    vmcs = vm.vcpu(index).vmcs
    raw = vmcs.as_dict()
    proc = vmcs.read(B.CPU_BASED_VM_EXEC_CONTROL)
    secondary = vmcs.read(B.SECONDARY_VM_EXEC_CONTROL)
    eptp = vmcs.read(B.EPT_POINTER)
    spptp = vmcs.read(B.SPPT_POINTER)
    reason = vmcs.read(B.VM_EXIT_REASON)
    qual = vmcs.read(B.EXIT_QUALIFICATION)
    basic = reason & 0xFFFF
    decoded = {
        "proc_controls": _named_bits(proc, {
            B.CPU_BASED_ACTIVATE_SECONDARY_CONTROLS: "ACTIVATE_SECONDARY_CONTROLS"}),
        "secondary_controls": _named_bits(secondary, {
            B.SECONDARY_EXEC_ENABLE_EPT: "ENABLE_EPT",
            B.SECONDARY_EXEC_ENABLE_SPP: "ENABLE_SPP"}),
        "ept_enabled": bool(proc & B.CPU_BASED_ACTIVATE_SECONDARY_CONTROLS
                            and secondary & B.SECONDARY_EXEC_ENABLE_EPT),
        "spp_enabled": bool(proc & B.CPU_BASED_ACTIVATE_SECONDARY_CONTROLS
                            and secondary & B.SECONDARY_EXEC_ENABLE_SPP),
        "eptp": {
            "root": eptp & B.PT64_BASE_ADDR_MASK,
            "memtype": MEMTYPES.get(eptp & 7, f"reserved({eptp & 7})"),
            "walk_levels": ((eptp >> 3) & 7) + 1,
            "accessed_dirty": bool(eptp & B.VMX_EPTP_AD_ENABLE_BIT),
        },
        "spptp": spptp & B.PT64_BASE_ADDR_MASK if spptp else None,
        "exit": {
            "reason": basic,
            "name": _exit_reason_names().get(basic, "none" if reason == 0 else "unknown"),
            "entry_failure": bool(reason >> 31 & 1),
            "qualification": qual,
            "qualification_decoded": _decode_qualification(basic, qual),
            "gpa": vmcs.read(B.GUEST_PHYSICAL_ADDRESS),
        },
    }
    requests = vm.vcpu(index).requests
    pending = _named_bits(requests, {L.REQ_LOAD_CR3: "LOAD_CR3",
                                     L.REQ_ENTRY_CHECK: "ENTRY_CHECK"})
    return {"vcpu": index, "vmcs": raw, "decoded": decoded, "requests": pending,
            "sppt_root": vm.vcpu(index).sppt_root}


def _decode_qualification(reason: int, qual: int) -> str:
    if reason == B.EXIT_REASON_EPT_VIOLATION:
        access = [name for bit, name in zip(B.ACCESS_TO_QUAL, B.ACCESS_KIND_NAMES)
                  if qual & bit]
        rwx = (qual >> B.EPT_VIOLATION_RWX_SHIFT) & 7
        perms = "".join(ch if rwx & (1 << i) else "-" for i, ch in enumerate("RWX"))
        return f"{'/'.join(access) or 'no access'}; EPT permissions {perms}"
    if reason == B.EXIT_REASON_SPP:
        return "SPPT miss" if qual & B.SPPT_INDUCED_EXIT_TYPE else "SPPT misconfiguration"
    if reason == B.EXIT_REASON_EPT_MISCONFIG:
        return "EPT misconfiguration (no qualification)"
    return ""


def build_report(vm, path: str, addresses: list[int], vcpu: int | None) -> dict:
    from sppjit.kernels import layout as L

    indices = range(vm.vcpus) if vcpu is None else [vcpu]
    walk_vcpu = 0 if vcpu is None else vcpu
    return {
        "state": path,
        "config": vm.config.as_dict(),
        "spp_active": vm.spp_active,
        "tables": int(vm.state.scal[L.SC_NTABLES]),
        "vcpus": [decode_vmcs(vm, i) for i in indices],
        "walks": [_with_vector_use(vm.walk(address, walk_vcpu)) for address in addresses],
    }


def _with_vector_use(walk: dict) -> dict:
    """Whether a write to this gpa consults its SPP vector: only when the EPT leaf is a
    present 4 KiB leaf with the SPP bit (61) and without W (SDM: sub-page permission is
    evaluated for a write that the EPT entry alone would not allow). Otherwise the vector an
    SPPT walk shows is there but not used."""
    leaf = next((entry for entry in reversed(walk["ept"])
                 if entry["present"] and entry["leaf"]), None)
    walk["spp_vector_consulted"] = bool(leaf is not None and leaf["level"] == 1
                                        and leaf["spp"] and not leaf["w"])
    if leaf is None:
        walk["spp_vector_why_not"] = "no EPT leaf maps the gpa"
    elif not walk["spp_vector_consulted"]:
        walk["spp_vector_why_not"] = ("the EPT leaf is writable" if leaf["w"] and leaf["spp"]
                                      else "the EPT leaf is a huge page" if leaf["level"] != 1
                                      else "the EPT leaf has no SPP bit (61)")
    return walk


# ------------------------------------------------------------------------------ text

def _hex(value: int | None) -> str:
    return "-" if value is None else f"{value:#x}"


def _rwx(entry: dict) -> str:
    return "".join(ch if entry[key] else "-" for ch, key in (("R", "r"), ("W", "w"),
                                                               ("X", "x")))


def _ept_line(entry: dict) -> str:
    head = f"  EPT  L{entry['level']}  {entry['hex']}  "
    if not entry["present"]:
        return head + "not present"
    if not entry["leaf"]:
        return head + f"table {_hex(entry['address'])}  {_rwx(entry)}"
    size = {1: "4K", 2: "2M", 3: "1G"}[entry["level"]]
    flags = [f"page {_hex(entry['address'])}", _rwx(entry), entry["memtype"],
             f"{size}{' large page' if entry['large'] else ''}",
             f"SPP {'1' if entry['spp'] else '0'}"]
    if entry["ignore_pat"]:
        flags.insert(3, "ignore-PAT")
    if entry["mmio"]:
        flags.append("MMIO (misconfigured W|X)")
    return head + "  ".join(flags)


def _sppt_line(entry: dict) -> str:
    head = f"  SPPT L{entry['level']}  {entry['hex']}  "
    if entry["level"] == 1:
        groups = " ".join(entry["subpages"][i:i + 8] for i in range(0, 32, 8))
        text = f"sub-pages 0..31 {groups}  (1 = writable; access map {entry['access_map']})"
        return head + text + ("  RESERVED BITS SET" if entry["reserved_bits_set"] else "")
    if not entry["present"]:
        return head + "not present"
    text = f"table {_hex(entry['address'])}"
    return head + text + ("  RESERVED BITS SET" if entry["reserved_bits_set"] else "")


def format_report(report: dict) -> str:
    config = report["config"]
    lines = [
        f"state {report['state']}: profile {config['profile']}, {config['vcpus']} vCPU"
        f"{'s' if config['vcpus'] != 1 else ''}, {format_size(config['memory_bytes'])} in "
        f"{len(config['memslots'])} memslot{'s' if len(config['memslots']) != 1 else ''}, "
        f"granularity {config['granularity']}, SPP {'active' if report['spp_active'] else 'off'}"
        f", {report['tables']} tables",
    ]
    for cpu in report["vcpus"]:
        vmcs, d = cpu["vmcs"], cpu["decoded"]
        ex = d["exit"]
        rows = [
            ("CPU_BASED_VM_EXEC_CONTROL", f"{vmcs['CPU_BASED_VM_EXEC_CONTROL']:#010x}",
             " ".join(d["proc_controls"]) or "-"),
            ("SECONDARY_VM_EXEC_CONTROL", f"{vmcs['SECONDARY_VM_EXEC_CONTROL']:#010x}",
             " ".join(d["secondary_controls"]) or "-"),
            ("EPT_POINTER", f"{vmcs['EPT_POINTER']:#018x}",
             f"root {_hex(d['eptp']['root'])}, {d['eptp']['memtype']}, "
             f"{d['eptp']['walk_levels']}-level walk"),
            ("SPPT_POINTER", f"{vmcs['SPPT_POINTER']:#018x}",
             f"root {_hex(d['spptp'])}" if d["spptp"] is not None else "not loaded"),
            ("VM_EXIT_REASON", str(vmcs["VM_EXIT_REASON"]),
             ex["name"] + (" (VM-entry failure)" if ex["entry_failure"] else "")),
            ("EXIT_QUALIFICATION", f"{ex['qualification']:#x}", ex["qualification_decoded"]),
            ("GUEST_PHYSICAL_ADDRESS", f"{ex['gpa']:#x}", ""),
            ("VM_EXIT_INSTRUCTION_LEN", str(vmcs["VM_EXIT_INSTRUCTION_LEN"]), ""),
        ]
        lines.append("")
        lines.append(f"vCPU {cpu['vcpu']}  (pending requests: "
                     f"{' '.join(cpu['requests']) or 'none'}; mmu->sppt_root "
                     f"{_hex(cpu['sppt_root'])})")
        width = max(len(name) for name, _, _ in rows)
        vwidth = max(len(value) for _, value, _ in rows)
        for name, value, note in rows:
            lines.append(f"  {name:<{width}}  {value:<{vwidth}}  {note}".rstrip())
    for walk in report["walks"]:
        lines.append("")
        slot = "no memslot (MMIO)" if walk["memslot"] is None else f"memslot {walk['memslot']}"
        extra = f", access map {walk['access_map']}" if "access_map" in walk else ""
        lines.append(f"gpa {walk['gpa']:#x}  (gfn {walk['gfn']:#x}, sub-page "
                     f"{walk['subpage']}, {slot}{extra}) on vCPU {walk['vcpu']}")
        lines.extend(_ept_line(entry) for entry in walk["ept"])
        if walk["sppt"]:
            lines.extend(_sppt_line(entry) for entry in walk["sppt"])
        else:
            lines.append("  SPPT     no SPPT loaded (SPPTP is 0)")
        if not walk.get("spp_vector_consulted", True):
            lines.append(f"  a write here does not consult the SPP vector: "
                         f"{walk['spp_vector_why_not']}")
    return "\n".join(lines) + "\n"
