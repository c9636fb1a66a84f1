"""Seeded synthetic scenarios: a trace (numpy columns) and the protection that goes with it.

Used by ``sppjit bench`` and ``sppjit generate``. Every scenario is a pure function of
(accesses, seed): the same arguments give byte-identical traces on every machine.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from sppjit import bits as B
from sppjit.defaults import MAX_ACCESSES, SCENARIO_NAMES  # noqa: F401  (MAX_ACCESSES: API)

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
    # Byte-range protection (the hook form), when the scenario protects structures rather
    # than pages: protect_gfn/protect_access then hold the same protection as access maps.
    hook_gpa: np.ndarray | None = None
    hook_length: np.ndarray | None = None
    hook_name: list[str] | None = None

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


# Each scenario is a layout (memory, vCPUs, protection: drawn first from the seed's
# generator) and accesses, drawn in chunks of at most CHUNK_ROWS rows so that a trace of any
# length takes bounded memory. The first chunk continues the layout's generator, the chunk
# k > 0 has its own, seeded with (seed, k): a trace of up to CHUNK_ROWS accesses is exactly
# what one draw of the whole used to give, and chunks never depend on each other.
CHUNK_ROWS = 1 << 20


@dataclass
class _Plan:
    scenario: Scenario  # memory, vCPUs and protection; no accesses
    draw: object  # draw(rng, first_row, rows) -> dict of gpa, size, vcpu, kind


def _uniform(rng, total: int) -> _Plan:
    def draw(rng, first, n):
        gpa = rng.integers(0, 4 * GiB // 8, n, dtype=np.uint64) * np.uint64(8)
        return _writes(n, gpa)

    return _Plan(_layout("uniform", 4 * GiB, "8-byte writes uniform over 4 GiB"), draw)


def _hotset(rng, total: int) -> _Plan:
    def draw(rng, first, n):
        gpa = rng.integers(0, 16 * MiB // 8, n, dtype=np.uint64) * np.uint64(8) + np.uint64(GiB)
        return _writes(n, gpa)

    return _Plan(_layout("hotset", 4 * GiB, "8-byte writes over a 16 MiB working set"), draw)


def _sequential(rng, total: int) -> _Plan:
    start = rng.integers(0, 1024) * 4096

    def draw(rng, first, n):
        gpa = ((np.arange(first, first + n, dtype=np.uint64) * np.uint64(8) + np.uint64(start))
               % np.uint64(4 * GiB))
        return _writes(n, gpa)

    return _Plan(_layout("sequential", 4 * GiB, "8-byte writes, 8-byte stride"), draw)


def _fault_storm(rng, total: int) -> _Plan:
    pages = max(total, 1 << 20)
    if total <= CHUNK_ROWS:
        order = None  # one chunk: a true random permutation
    else:
        # Longer: page i of the trace is (a*i + c) mod pages, a bijection when gcd(a, pages)
        # is 1, computed per chunk (a < 2**23 and i < 2**36 keep a*i inside uint64).
        a = int(rng.integers(1 << 21, 1 << 23)) | 1
        while math.gcd(a, pages) != 1:
            a += 2
        order = (a, int(rng.integers(0, pages)))

    def draw(rng, first, n):
        if order is None:
            gfn = rng.permutation(pages)[:n].astype(np.uint64)
        else:
            a, c = order
            index = np.arange(first, first + n, dtype=np.uint64)
            gfn = (index * np.uint64(a) + np.uint64(c)) % np.uint64(pages)
        gpa = (gfn << np.uint64(B.PAGE_SHIFT)) | (rng.integers(0, 512, n, dtype=np.uint64)
                                                  << np.uint64(3))
        return _writes(n, gpa)

    return _Plan(_layout("fault-storm", pages * B.PAGE_SIZE, "each access a new page"), draw)


def _guarded(rng, total: int, vcpus: int = 2) -> _Plan:
    """Writes over 256 MiB where 30% of pages are SPP-protected with mixed maps; ~10% of the
    writes hit a write-protected sub-page."""
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
    is_prot = np.zeros(pages, dtype=bool)
    is_prot[prot] = True

    def draw(rng, first_row, n):
        # Writes: pages uniform over the working set; within a protected page, sub-pages
        # chosen so that about 10% of all writes land on a locked sub-page.
        gfn_idx = rng.integers(0, pages, n)
        gpa = (np.uint64(base) + gfn_idx.astype(np.uint64)) << np.uint64(B.PAGE_SHIFT)
        gpa |= rng.integers(0, 4096 // 8, n, dtype=np.uint64) << np.uint64(3)
        pos = np.searchsorted(prot, gfn_idx.astype(np.uint64))
        hit = is_prot[gfn_idx]
        # Inside protected pages, aim 1/3 of writes at the locked run: 30% x 1/3 ~ 10%.
        aim = hit & (rng.random(n) < 1 / 3)
        sub = (first[pos[aim]] + rng.integers(0, 1, aim.sum())) % 32
        gpa[aim] = (gpa[aim] & ~np.uint64(0xFFF)) | (sub.astype(np.uint64) << np.uint64(7))
        return _writes(n, gpa, vcpus=vcpus, rng=rng)

    scenario = _layout(
        "guarded", 4 * GiB,
        "256 MiB, 30% of pages protected with mixed maps, ~10% of writes violating",
        vcpus=vcpus, protect_gfn=prot + np.uint64(base), protect_access=access)
    return _Plan(scenario, draw)


# Kernel structures VM-introspection tools guard with SPP (hvmi: token privileges, the HAL
# dispatch table, the WMI logger's GetCpuClock pointer, ...), with typical sizes in bytes.
_KERNEL_STRUCTURES = (
    ("token_privileges", 24),
    ("hal_dispatch_table", 96),
    ("wmi_get_cpu_clock", 8),
    ("cred", 168),
    ("idt_entry", 16),
    ("syscall_table_slot", 8),
    ("lstar_shadow", 8),
)


def _kernel_guard(rng, total: int, vcpus: int = 4, structures: int = 2000) -> _Plan:
    """Small kernel structures guarded as byte ranges (hooks), with writes that hit them and
    writes that hit their neighbours (same sub-page, same page), from several vCPUs.

    Several structures share a page; ranges never cross a page. Of the accesses, ~20% are
    reads, and of the writes ~25% hit a structure, ~45% its page outside it (half of those in
    a hooked sub-page: the irrelevant exits SPP still takes) and ~30% other kernel memory.
    """
    from sppjit.io.protect import ByteRanges, ranges_to_maps

    region = 64 * MiB // B.PAGE_SIZE  # the guest kernel's data, from 1 GiB up
    base = GiB // B.PAGE_SIZE
    pages = np.sort(rng.choice(region, max(1, structures // 3), replace=False)).astype(np.uint64)
    kinds = rng.integers(0, len(_KERNEL_STRUCTURES), structures)
    length = np.array([_KERNEL_STRUCTURES[k][1] for k in kinds], dtype=np.uint32)
    page = pages[rng.integers(0, pages.shape[0], structures)]
    offset = (rng.integers(0, B.PAGE_SIZE, structures) // 8 * 8).astype(np.uint64)
    offset = np.minimum(offset, np.uint64(B.PAGE_SIZE) - length.astype(np.uint64))
    hook_gpa = ((np.uint64(base) + page) << np.uint64(B.PAGE_SHIFT)) + offset
    names = [f"{_KERNEL_STRUCTURES[k][0]}#{i}" for i, k in enumerate(kinds)]

    def draw(rng, first_row, n):
        pick = rng.integers(0, structures, n)
        what = rng.random(n)
        size = rng.choice(np.array([1, 2, 4, 8], dtype=np.uint16), n)
        # default: anywhere in the kernel region
        gpa = ((np.uint64(base) + rng.integers(0, region, n).astype(np.uint64))
               << np.uint64(B.PAGE_SHIFT))
        gpa += rng.integers(0, B.PAGE_SIZE // 8, n).astype(np.uint64) << np.uint64(3)
        hit = what < 0.25
        inside = rng.integers(0, 1 << 16, n).astype(np.uint64) % length[pick].astype(np.uint64)
        gpa[hit] = hook_gpa[pick[hit]] + inside[hit]
        near = (what >= 0.25) & (what < 0.70)
        page_start = hook_gpa[pick] & ~np.uint64(B.PAGE_SIZE - 1)
        gpa[near] = page_start[near] + (rng.integers(0, B.PAGE_SIZE // 8, near.sum())
                                        .astype(np.uint64) << np.uint64(3))
        gpa &= ~(size.astype(np.uint64) - np.uint64(1))  # naturally aligned: no page crossing
        kind = np.where(rng.random(n) < 0.2, B.ACCESS_READ, B.ACCESS_WRITE).astype(np.uint8)
        vcpu = rng.integers(0, vcpus, n, dtype=np.uint16)
        return dict(gpa=gpa, size=size, vcpu=vcpu, kind=kind)

    maps = ranges_to_maps(ByteRanges(gpa=hook_gpa, length=length, name=names))
    scenario = _layout(
        "kernel-guard", 4 * GiB,
        "kernel structures hooked as byte ranges; writes on them and their neighbours",
        vcpus=vcpus, protect_gfn=maps.gfn, protect_access=maps.access,
        hook_gpa=hook_gpa, hook_length=length, hook_name=names)
    return _Plan(scenario, draw)


def _layout(name: str, memory: int, description: str, **fields) -> Scenario:
    empty = _writes(0, np.zeros(0, dtype=np.uint64))
    return Scenario(name, memory=memory, description=description, **empty, **fields)


# The names are sppjit.defaults' (the command line reads them without importing numpy).
_PLANS = dict(zip(SCENARIO_NAMES, (_uniform, _hotset, _sequential, _fault_storm, _guarded,
                                   _kernel_guard), strict=True))


def stream(name: str, accesses: int, seed: int = 0, rows: int | None = None,
           **params) -> tuple[Scenario, Iterator[dict[str, np.ndarray]]]:
    """The scenario's layout (memory, vCPUs, protection; no accesses) and its accesses as an
    iterator of column dicts (gpa, size, vcpu, kind) of at most ``rows`` rows each
    (CHUNK_ROWS by default): a trace of any length in bounded memory. ``params``: the
    scenario's own settings (guarded: vcpus; kernel-guard: vcpus, structures)."""
    rows = CHUNK_ROWS if rows is None else rows
    if name not in _PLANS:
        from sppjit.errors import InputError

        raise InputError(f"unknown scenario {name!r} (one of {', '.join(_PLANS)})")
    if not 0 <= accesses <= MAX_ACCESSES:
        raise ValueError(f"accesses must be 0..{MAX_ACCESSES}, got {accesses}")
    rng = np.random.default_rng(seed)
    plan = _PLANS[name](rng, accesses, **params)

    def chunks() -> Iterator[dict[str, np.ndarray]]:
        for k, first in enumerate(range(0, accesses, CHUNK_ROWS)):
            chunk_rng = rng if k == 0 else np.random.default_rng([seed, k])
            drawn = plan.draw(chunk_rng, first, min(CHUNK_ROWS, accesses - first))
            for start in range(0, len(drawn["gpa"]), rows):  # smaller pieces on request
                yield {key: value[start:start + rows] for key, value in drawn.items()}

    return plan.scenario, chunks()


def make(name: str, accesses: int, seed: int = 0, **params) -> Scenario:
    """The whole scenario in memory: its layout and every access (bench and the tests; the
    command line writes traces chunk by chunk, with ``stream``)."""
    scenario, chunks = stream(name, accesses, seed, **params)
    drawn = list(chunks)
    for key in ("gpa", "size", "vcpu", "kind"):
        parts = [chunk[key] for chunk in drawn] or [getattr(scenario, key)]
        setattr(scenario, key, np.concatenate(parts))
    return scenario


def uniform(accesses: int, seed: int = 0) -> Scenario:
    """8-byte writes spread uniformly over 4 GiB: every access a random page."""
    return make("uniform", accesses, seed)


def hotset(accesses: int, seed: int = 0) -> Scenario:
    """8-byte writes over a 16 MiB working set."""
    return make("hotset", accesses, seed)


def sequential(accesses: int, seed: int = 0) -> Scenario:
    """8-byte writes with an 8-byte stride (a memset), wrapping at 4 GiB."""
    return make("sequential", accesses, seed)


def fault_storm(accesses: int, seed: int = 0) -> Scenario:
    """Every access a page never touched before (a guest touching fresh memory)."""
    return make("fault-storm", accesses, seed)


def guarded(accesses: int, seed: int = 0, vcpus: int = 2) -> Scenario:
    """Writes over 256 MiB where 30% of pages are SPP-protected with mixed maps; ~10% of the
    writes hit a write-protected sub-page."""
    return make("guarded", accesses, seed, vcpus=vcpus)


def kernel_guard(accesses: int, seed: int = 0, vcpus: int = 4,
                 structures: int = 2000) -> Scenario:
    """Small kernel structures guarded as byte ranges, with writes on them and their
    neighbours, from ``vcpus`` vCPUs."""
    return make("kernel-guard", accesses, seed, vcpus=vcpus, structures=structures)


SCENARIOS = {
    "uniform": uniform,
    "hotset": hotset,
    "sequential": sequential,
    "fault-storm": fault_storm,
    "guarded": guarded,
    "kernel-guard": kernel_guard,
}
