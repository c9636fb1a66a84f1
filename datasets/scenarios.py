"""Seeded synthetic scenarios: a trace (numpy columns) and the protection that goes with it.

Used by ``sppjit bench`` and ``sppjit generate``. Every scenario is a pure function of
(accesses, seed): the same arguments give byte-identical traces on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from sppjit import bits as B

GiB = 1 << 30
MiB = 1 << 20


@dataclass
class Scenario:
    name: str
    gpa: np.ndarray  # uint64
    size: np.ndarray  # uint16
    vcpu: np.ndarray  # uint16
    kind: np.ndarray  # uint8
    memory: int  # bytes of the one memslot from gfn 0
    vcpus: int = 1
    protect_gfn: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint64))
    protect_access: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint32))
    description: str = ""

    def columns(self) -> dict[str, np.ndarray]:
        return {"gpa": self.gpa, "size": self.size, "vcpu": self.vcpu, "kind": self.kind}

    def __len__(self) -> int:
        return int(self.gpa.shape[0])


def _writes(n: int, gpa: np.ndarray, size: int = 8, vcpus: int = 1, rng=None) -> dict:
    vcpu = np.zeros(n, dtype=np.uint16) if vcpus == 1 else rng.integers(0, vcpus, n, dtype=np.uint16)
    return dict(
        gpa=gpa.astype(np.uint64),
        size=np.full(n, size, dtype=np.uint16),
        vcpu=vcpu,
        kind=np.full(n, B.ACCESS_WRITE, dtype=np.uint8),
    )


def uniform(accesses: int, seed: int = 0) -> Scenario:
    """8-byte writes spread uniformly over 4 GiB: every access a random page."""
    rng = np.random.default_rng(seed)
    gpa = rng.integers(0, 4 * GiB // 8, accesses, dtype=np.uint64) * np.uint64(8)
    return Scenario("uniform", memory=4 * GiB, description="8-byte writes uniform over 4 GiB", **_writes(accesses, gpa))


def hotset(accesses: int, seed: int = 0) -> Scenario:
    """8-byte writes over a 16 MiB working set."""
    rng = np.random.default_rng(seed)
    gpa = rng.integers(0, 16 * MiB // 8, accesses, dtype=np.uint64) * np.uint64(8) + np.uint64(GiB)
    return Scenario("hotset", memory=4 * GiB, description="8-byte writes over a 16 MiB working set", **_writes(accesses, gpa))


def sequential(accesses: int, seed: int = 0) -> Scenario:
    """8-byte writes with an 8-byte stride (a memset), wrapping at 4 GiB."""
    start = np.random.default_rng(seed).integers(0, 1024) * 4096
    gpa = (np.arange(accesses, dtype=np.uint64) * np.uint64(8) + np.uint64(start)) % np.uint64(4 * GiB)
    return Scenario("sequential", memory=4 * GiB, description="8-byte writes, 8-byte stride", **_writes(accesses, gpa))


def fault_storm(accesses: int, seed: int = 0) -> Scenario:
    """Every access a page never touched before (a guest touching fresh memory)."""
    rng = np.random.default_rng(seed)
    pages = max(accesses, 1 << 20)
    memory = pages * B.PAGE_SIZE
    gfn = rng.permutation(pages)[:accesses].astype(np.uint64)
    gpa = (gfn << np.uint64(B.PAGE_SHIFT)) | (rng.integers(0, 512, accesses, dtype=np.uint64) << np.uint64(3))
    return Scenario("fault-storm", memory=memory, description="each access a new page", **_writes(accesses, gpa))


def guarded(accesses: int, seed: int = 0, vcpus: int = 2) -> Scenario:
    """Writes over 256 MiB where 30% of pages are SPP-protected with mixed maps; ~10% of the
    writes hit a write-protected sub-page."""
    rng = np.random.default_rng(seed)
    pages = 256 * MiB // B.PAGE_SIZE
    base = GiB // B.PAGE_SIZE
    prot = np.sort(rng.choice(pages, int(pages * 0.3), replace=False)).astype(np.uint64)
    # Mixed maps: each protected page locks a contiguous run of 1..8 sub-pages (a structure),
    # a few lock everything.
    first = rng.integers(0, 32, prot.shape[0])
    count = rng.integers(1, 9, prot.shape[0])
    locked = np.zeros(prot.shape[0], dtype=np.uint64)
    for k in range(8):
        sel = count > k
        locked[sel] |= np.uint64(1) << ((first[sel] + k) % 32).astype(np.uint64)
    locked[rng.random(prot.shape[0]) < 0.05] = np.uint64(0xFFFFFFFF)
    access = (~locked & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    # Writes: pages uniform over the working set; within a protected page, sub-pages chosen so
    # that about 10% of all writes land on a locked sub-page.
    gfn_idx = rng.integers(0, pages, accesses)
    gpa = (np.uint64(base) + gfn_idx.astype(np.uint64)) << np.uint64(B.PAGE_SHIFT)
    gpa |= rng.integers(0, 4096 // 8, accesses, dtype=np.uint64) << np.uint64(3)
    is_prot = np.zeros(pages, dtype=bool)
    is_prot[prot] = True
    pos = np.searchsorted(prot, gfn_idx.astype(np.uint64))
    hit = is_prot[gfn_idx]
    # Inside protected pages, aim 1/3 of writes at the locked run: 30% x 1/3 ~ 10%.
    aim = hit & (rng.random(accesses) < 1 / 3)
    sub = (first[pos[aim]] + rng.integers(0, 1, aim.sum())) % 32
    gpa[aim] = (gpa[aim] & ~np.uint64(0xFFF)) | (sub.astype(np.uint64) << np.uint64(7))
    return Scenario(
        "guarded",
        memory=4 * GiB,
        vcpus=vcpus,
        protect_gfn=prot + np.uint64(base),
        protect_access=access,
        description="256 MiB, 30% of pages protected with mixed maps, ~10% of writes violating",
        **_writes(accesses, gpa, vcpus=vcpus, rng=rng),
    )


SCENARIOS = {
    "uniform": uniform,
    "hotset": hotset,
    "sequential": sequential,
    "fault-storm": fault_storm,
    "guarded": guarded,
}


def make(name: str, accesses: int, seed: int = 0) -> Scenario:
    try:
        return SCENARIOS[name](accesses, seed)
    except KeyError:
        from sppjit.errors import InputError

        raise InputError(f"unknown scenario {name!r} (one of {', '.join(SCENARIOS)})") from None
