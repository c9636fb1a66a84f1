"""Runs the hand-derived conformance table (tests/conformance_cases.py) on both engines.

For every access of a case: its rows of ``res.exits`` (reason, qualification, kind,
userspace_exit, gpa, vcpu, in order) and its ``res.table`` row (outcome, exits, exit_reason)
must equal the hand-derived values; the summary's exit and outcome counters must add up.
Also here: the per-vCPU VMCS behaviour of init (KVM_REQ_LOAD_CR3 served at each vCPU's next
entry) and the per-vCPU SPPT roots.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

import sppjit

import conformance_cases as C  # noqa: E402  (tests/ on sys.path: conftest.py)

ENGINES = ("reference", "jit")
OUTCOME_KEYS = ("allowed", "spp_violation", "write_protect_violation", "mmio", "spp_misconfig")
EXIT_KINDS = ("ept_fault", "mmio", "spp_miss", "spp_misconfig", "spp_violation", "write_protect", "wp_fault")




POOL_HPA = 0x10_0000_0000  # architecture: table-pool index i lives at this hpa + 4096 * i
ADDR_MASK = 0x000F_FFFF_FFFF_F000  # bits 51:12


def _table(vm, hpa: int) -> np.ndarray:
    return vm.state.tables[(hpa - POOL_HPA) >> 12]


def sppt_entry(vm, gpa: int, level: int, vcpu: int) -> int:
    """The raw SPPT entry of ``level`` on ``gpa``'s path in ``vcpu``'s tree, read from the pool
    (setup only; deliberately not through vm.walk, which is under test elsewhere)."""
    hpa = vm.vcpu(vcpu).sppt_root
    for lvl in range(4, level, -1):
        e = int(_table(vm, hpa)[(gpa >> (12 + 9 * (lvl - 1))) & 511])
        assert e & 1, f"no level-{lvl - 1} SPPT table on the path of {gpa:#x}"
        hpa = e & ADDR_MASK
    return int(_table(vm, hpa)[(gpa >> (12 + 9 * (level - 1))) & 511])


def ept_leaf(vm, gpa: int) -> int:
    """The raw EPT leaf mapping ``gpa`` (KVM's view, from the pool)."""
    from sppjit.stats import ept_leaves

    leaf, level, _ = ept_leaves(vm.state, np.array([gpa >> 12], dtype=np.uint64))
    assert int(level[0]) > 0, f"{gpa:#x} has no EPT leaf"
    return int(leaf[0])


def apply(vm, step) -> None:
    if isinstance(step, C.Init):
        assert vm.init_spp() == 0
    elif isinstance(step, C.SetMaps):
        assert vm.set_subpages(step.gfn, list(step.maps)) == len(step.maps)
    elif isinstance(step, C.PokeEptFlags):
        vm.poke_ept_leaf(step.gpa, (ept_leaf(vm, step.gpa) & ADDR_MASK) | step.flags)
    elif isinstance(step, C.PokeSppt):
        vm.poke_sppt(step.gpa, step.level, step.value, step.vcpu)
    elif isinstance(step, C.OrSppt):
        old = sppt_entry(vm, step.gpa, step.level, step.vcpu)
        assert old & 1, "OrSppt is for a present entry"
        vm.poke_sppt(step.gpa, step.level, old | step.bits, step.vcpu)
    elif isinstance(step, C.VmcsWrite):
        vm.vcpu(step.vcpu).vmcs.write(step.field, step.value)
    else:  # pragma: no cover
        raise TypeError(step)


def groups(steps):
    """Steps with consecutive accesses gathered into lists (one replay each)."""
    out, run = [], []
    for s in steps:
        if isinstance(s, C.Access):
            run.append(s)
            continue
        if run:
            out.append(run)
            run = []
        out.append(s)
    if run:
        out.append(run)
    return out


def check_replay(case, accesses, res, where: str) -> None:
    exits = res.exits.to_pylist()
    table = res.table.to_pylist()
    assert len(table) == len(accesses), where
    by_row: dict[int, list] = {}
    for e in exits:
        by_row.setdefault(e["row"], []).append(e)
    assert set(by_row) <= set(range(len(accesses))), f"{where}: exit rows {sorted(by_row)}"
    kinds, outcomes = Counter(), Counter()
    for i, a in enumerate(accesses):
        label = f"{where} access {i} ({['read', 'write', 'fetch'][a.kind]} {a.gpa:#x}+{a.size} vCPU {a.vcpu})"
        got = [
            (e["reason"], e["qualification"], e["kind"], e["userspace_exit"], e["gpa"], e["vcpu"])
            for e in by_row.get(i, [])
        ]
        want = [
            (x.reason, x.qualification, x.kind, x.userspace_exit, a.gpa if x.gpa is None else x.gpa, a.vcpu)
            for x in a.exits
        ]
        assert got == want, f"{label}: exits\n got  {fmt(got)}\n want {fmt(want)}"
        row = table[i]
        want_row = (a.outcome, len(a.exits), a.exits[-1].reason if a.exits else 0)
        got_row = (row["outcome"], row["exits"], row["exit_reason"])
        assert got_row == want_row, f"{label}: (outcome, exits, exit_reason) got {got_row}, want {want_row}"
        kinds.update(x.kind for x in a.exits)
        outcomes[a.outcome] += 1
    s = res.summary
    assert s["exits"]["total"] == sum(len(a.exits) for a in accesses), where
    for k in EXIT_KINDS:
        assert s["exits"][k] == kinds[k], f"{where}: summary exits.{k}"
    for code, key in enumerate(OUTCOME_KEYS):
        assert s["counts"][key] == outcomes[code], f"{where}: summary counts.{key}"
    assert s["counts"]["accesses"] == len(accesses)


def fmt(rows) -> str:
    return "[" + ", ".join(f"({r[0]}, {r[1]:#x}, {r[2]}, {r[3]}, gpa={r[4]:#x}, vcpu={r[5]})" for r in rows) + "]"


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case", C.CASES, ids=C.CASE_IDS)
def test_case(case, engine):
    vm = sppjit.VM(**case.vm)
    last = None
    for n, g in enumerate(groups(case.steps)):
        if isinstance(g, list):
            last = vm.replay(C.trace_of(g), engine=engine)
            check_replay(case, g, last, f"{case.id} [{engine}] replay #{n}")
        else:
            apply(vm, g)
    assert last is not None
    for key, want in case.summary.items():
        section, name = key.split(".")
        assert last.summary[section][name] == want, f"{case.id} [{engine}]: summary {key}"


def test_table_covers_the_issue():
    """The table holds every required kind of case (guards against an accidental trim)."""
    kinds = Counter()
    for c in C.CASES:
        for s in c.steps:
            if isinstance(s, C.Access):
                kinds.update(x.kind for x in s.exits)
                if s.size > 1 and (s.gpa & 0xFFF) + s.size > 0x1000:
                    kinds["cross_page"] += 1
        kinds.update(f"vm:{k}={v}" for k, v in c.vm.items() if k != "memslots")
        kinds.update(type(s).__name__ for s in c.steps)
    for need in ("ept_fault", "mmio", "spp_miss", "spp_misconfig", "spp_violation", "write_protect", "cross_page",
                 "vm:hugepages=True", "vm:subpage_check=first", "vm:subpage_check=all", "vm:granularity=page",
                 "vm:vcpus=2", "vm:vcpus=3", "PokeEptFlags", "PokeSppt", "OrSppt"):
        assert kinds[need] > 0, need


# ---------------------------------------------------------------- VMCS after init, per vCPU
def one(gpa, vcpu, kind=C.READ):
    return {
        "gpa": np.array([gpa], dtype=np.uint64),
        "size": np.array([8], dtype=np.uint16),
        "vcpu": np.array([vcpu], dtype=np.uint16),
        "kind": np.array([kind], dtype=np.uint8),
    }


SPPTP = 0x2030
SPPTP_HIGH = 0x2031
SECONDARY = 0x401E
SEC_EPT = 0x2
SEC_SPP = 0x800000


@pytest.mark.parametrize("engine", ENGINES)
def test_init_load_cr3_served_at_each_vcpus_next_entry(engine):
    vm = sppjit.VM(vcpus=3)
    for i in range(3):
        assert vm.vcpu(i).vmcs.read(SPPTP) == 0
        assert vm.vcpu(i).vmcs.read(SECONDARY) == SEC_EPT
        assert vm.vcpu(i).sppt_root is None
    assert vm.init_spp() == 0
    roots = [vm.vcpu(i).sppt_root for i in range(3)]
    assert all(r is not None for r in roots)
    assert len(set(roots)) == 3, "v4: each vCPU has its own SPPT root"
    for r in roots:
        assert r % 4096 == 0 and 0 < r < 1 << 46  # 4 KiB-aligned, within MAXPHYADDR
    # Nothing is loaded before a vCPU enters.
    for i in range(3):
        assert vm.vcpu(i).vmcs.read(SPPTP) == 0
        assert vm.vcpu(i).vmcs.read(SECONDARY) == SEC_EPT
    vm.replay(one(0x5000, 1), engine=engine)
    assert vm.vcpu(1).vmcs.read(SPPTP) == roots[1]
    assert vm.vcpu(1).vmcs.read(SPPTP_HIGH) == roots[1] >> 32
    assert vm.vcpu(1).vmcs.read(SECONDARY) == SEC_EPT | SEC_SPP == 0x800002
    for i in (0, 2):
        assert vm.vcpu(i).vmcs.read(SPPTP) == 0
        assert vm.vcpu(i).vmcs.read(SECONDARY) == SEC_EPT
    vm.replay(one(0x5000, 2), engine=engine)
    assert vm.vcpu(2).vmcs.read(SPPTP) == roots[2]
    assert vm.vcpu(0).vmcs.read(SPPTP) == 0
    vm.replay(one(0x6000, 0, C.WRITE), engine=engine)
    for i in range(3):
        assert vm.vcpu(i).vmcs.read(SPPTP) == roots[i]
        assert vm.vcpu(i).vmcs.read(SECONDARY) == 0x800002
        assert vm.vcpu(i).requests == 0


@pytest.mark.parametrize("engine", ENGINES)
def test_init_after_the_vcpu_ran(engine):
    """A vCPU that already ran gets SPPTP only at its next entry after init."""
    vm = sppjit.VM(vcpus=2)
    vm.replay(one(0x5000, 0), engine=engine)
    assert vm.vcpu(0).vmcs.read(SPPTP) == 0
    vm.init_spp()
    assert vm.vcpu(0).vmcs.read(SPPTP) == 0
    assert vm.vcpu(0).vmcs.read(SECONDARY) == SEC_EPT
    vm.replay(one(0x5000, 0), engine=engine)
    assert vm.vcpu(0).vmcs.read(SPPTP) == vm.vcpu(0).sppt_root
    assert vm.vcpu(0).vmcs.read(SECONDARY) == 0x800002
    assert vm.vcpu(1).vmcs.read(SPPTP) == 0


@pytest.mark.parametrize("engine", ENGINES)
def test_init_twice_keeps_roots_and_maps(engine):
    vm = sppjit.VM(vcpus=2)
    vm.init_spp()
    roots = [vm.vcpu(i).sppt_root for i in range(2)]
    vm.set_subpages(0x40, [0x1234])
    assert vm.init_spp() == 0
    assert [vm.vcpu(i).sppt_root for i in range(2)] == roots
    assert int(vm.get_subpages(0x40, 1)[0]) == 0x1234
    res = vm.replay(one(0x40000, 1, C.WRITE), engine=engine)
    # map 0x1234: sub-page 0 not writable -> fault-in then the violation
    assert [(e["reason"], e["qualification"], e["kind"]) for e in res.exits.to_pylist()] == [
        (48, 0x182, "ept_fault"),
        (48, 0x1AA, "spp_violation"),
    ]


@pytest.mark.parametrize("engine", ENGINES)
def test_vm_entry_fails_for_bad_spp_controls(engine):
    """VM entry fails if SPP=1 and EPT=0, or SPPTP is unaligned or beyond the address width."""
    for field, value in ((SECONDARY, SEC_SPP), (SPPTP, None), (SPPTP, 1 << 46)):
        vm = sppjit.VM()
        vm.init_spp()
        vm.replay(one(0x1000, 0), engine=engine)
        if value is None:
            value = vm.vcpu(0).vmcs.read(SPPTP) | 0x800  # not 4 KiB-aligned
        vm.vcpu(0).vmcs.write(field, value)
        with pytest.raises(sppjit.VmEntryError):
            vm.replay(one(0x1000, 0), engine=engine)
