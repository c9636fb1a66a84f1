"""Compare protection schemes on one trace: page-granular write protection against SPP.

The question a VM-introspection engineer asks before guarding kernel structures: how many VM
exits will I take with SPP, how many without it, and how many of them are noise? ``compare``
replays the same trace under several configurations, each on a fresh VM given the same
protection, and reports them side by side:

- ``page``: page-granular write protection (``granularity="page"``, profile v4), the
  baseline: every write to a protected page exits to userspace;
- ``spp_v4`` and ``spp_v12``: SPP as the KVM series v4 and v12 define it (with
  ``subpage_check="both"``: ``spp_v4_all``, ``spp_v4_first``, ``spp_v12_all``,
  ``spp_v12_first``);

or the configurations the user gives (sweep spec strings, ``configs=``), under one protection
or several side by side (``NAME@STEM``). Each is compared with the page-granular configuration
of its protection: the change in exits, protection exits and estimated overhead
(``change_vs_baseline``), the price of letting the protected writes through (emulation or
single-stepping with MTF), and, where SPP v4 and v12 differ, a note naming the mechanism
(``profile_notes``). What each figure means and where the costs come from: docs/compare.md.

The trace is read once, batch by batch, with sppjit.io.trace.open_trace, and every batch is
replayed by each configuration's VM on a pool of threads (the runner of sppjit.sweep), so
memory stays bounded whatever its length and a one-shot stream is read as it comes.

Estimated guest overhead
------------------------
Each exit is charged a fixed cost: ``exit_cost_us`` for an exit that KVM hands to userspace
(kinds ``mmio``, ``spp_violation``, ``write_protect``, ``spp_misconfig``) and
``kernel_exit_cost_us`` for one KVM resolves itself (``ept_fault``, ``spp_miss``,
``wp_fault``)::

    overhead_seconds = (exits_to_userspace * exit_cost_us
                        + exits_in_kernel * kernel_exit_cost_us) * 1e-6

reported in total and per million accesses. The defaults are order-of-magnitude figures for
an Ice Lake-era host with a current kernel, not measurements of any particular machine:

- ``DEFAULT_EXIT_COST_US = 3.0``: one exit to the userspace VMM and back. That covers the
  VM exit, KVM's handler, the return from the KVM_RUN ioctl, a trivial userspace handler, the
  next KVM_RUN and the VM entry: some 9,000 cycles at 3 GHz. Where it comes from: the
  kvm-unit-tests micro-benchmark ``x86/vmexit.c`` measures exactly this round trip as
  ``inl_from_qemu`` (a port read handled in QEMU) beside ``inl_from_kernel`` (the same read
  handled inside KVM); published runs put the userspace round trip at about 3x the in-kernel
  one (44,826 against 13,518 cycles in the nested vmexit.flat run of Paolo Bonzini's cover
  letter "[PATCH 00/43] VMX optimizations", kvm list, 2019; nesting makes every exit
  dearer, the ratio is the point). On AMD, the KVM_RUN ioctl alone for a trivial exit
  (ioctl entry to return) measures about 2,500 cycles (LKML, December 2020, SVM
  vmsave/vmload thread: lkml.iu.edu/hypermail/linux/kernel/2012.2/00527.html), before any
  userspace handling. An introspection tool that receives its events over a socket (KVMI)
  pays far more per exit: raise ``--exit-cost-us`` for that.
- ``DEFAULT_KERNEL_EXIT_COST_US = 1.0``: one exit KVM handles in the kernel (hardware
  world switch plus the EPT-violation or SPP-miss handler). Landau, Ben-Yehuda and Gordon,
  "SplitX: Split Guest/Hypervisor Execution on Multi-Core" (USENIX WIOV 2011, Table 1)
  measured the direct world-switch cost alone at about 2,000 cycles on KVM (0.7 us on a
  2.93 GHz Xeon X5570), with the handler's own work on top; newer cores switch faster but
  pay for speculative-execution mitigations, so 1 us is kept.

Both are options (``exit_cost_us=``, ``kernel_exit_cost_us=``; ``--exit-cost-us``,
``--kernel-exit-cost-us``); the document records the figures used.

Hooks (byte-range protection)
-----------------------------
With byte ranges, every configuration also counts relevant and irrelevant protection exits
(sppjit.hooks) and their noise ratio ``irrelevant / (relevant + irrelevant)``, the figure
hvmi's own SPP statistics give. Per hook, ``relevant`` counts the exits whose write touched
that hook's bytes (the first such hook, as the exit log names it) and ``irrelevant`` the
irrelevant exits the hook *caused*: those on its page under page-granular protection, those
whose checked sub-pages meet the sub-pages it protects under SPP (``subpage_check="first"``:
the first sub-page the write touches on that page). An irrelevant exit on sub-pages that two
hooks share counts for both, so per-hook irrelevant counts may add up to more than the total.

Reproducibility: the document records the seed and scenario (``sppjit.seed`` and
``sppjit.scenario`` in the trace's schema metadata, when ``sppjit generate`` wrote it) in
``input``, the full configuration in ``config``, and in ``provenance`` (as every replay
summary does, sppjit.provenance) the sppjit, numba, numpy, pyarrow and Python versions and the
digests of the trace and protection files (BLAKE3, docs/contract.md §8; a directory: its files in sorted order).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from . import __version__
from . import bits as B
from .defaults import (
    COMPARE_SUBPAGE_CHECKS,
    DEFAULT_EMULATION_COST_US,
    DEFAULT_ENGINE,
    DEFAULT_EXIT_COST_US,
    DEFAULT_KERNEL_EXIT_COST_US,
    DEFAULT_MEMORY,
    DEFAULT_SUBPAGE_CHECK,
    DEFAULT_VCPUS,
    DEFAULT_WRITE_THROUGH,
    GRANULARITIES,
    PROFILES,
    SUBPAGE_CHECKS,
    WRITE_THROUGH,
    default_batch_size,
)
from .errors import InputError
from .hooks import PROTECTION_EXIT_KINDS, HookIndex
from .protection import (  # noqa: F401  (protection_maps: part of this module's API)
    apply_protection,
    check_protection,
    load_protection,
    protection_info,
    protection_maps,
)
from .summary import CompareDocument

SCHEMA_VERSION = 1
EXIT_COST_SOURCE = (
    "userspace exit round trip ~3 us (kvm-unit-tests x86/vmexit.c inl_from_qemu vs "
    "inl_from_kernel, ~3x an in-kernel exit); in-kernel exit ~1 us (SplitX, WIOV 2011: "
    "~2,000-cycle world switch plus the handler); order-of-magnitude defaults for an Ice "
    "Lake-era KVM host, not a measurement"
)
WRITE_THROUGH_SOURCE = (
    "a protection exit's write is dropped by KVM; an allowed write is completed by emulating "
    "it (KVMI's page-fault event answered CONTINUE: KVM's emulator) or by single-stepping it "
    "with the monitor trap flag (Intel SDM Vol. 3C, Monitor Trap Flag; KVMI's singlestep "
    "event): one more exit to the monitor, two more in the kernel under v12; see "
    "docs/compare.md"
)
# Exits KVM hands to userspace (a KVM_EXIT_* code, or KVM_EXIT_UNKNOWN for an SPPT
# misconfiguration); every other kind is resolved in the kernel and the guest retries.
USERSPACE_EXIT_KINDS = ("mmio", "spp_misconfig", "spp_violation", "write_protect")


@dataclass(frozen=True)
class Config:
    """One configuration of a comparison: how the same protection is enforced."""

    name: str
    granularity: str = "spp"
    profile: str = "v4"
    subpage_check: str = DEFAULT_SUBPAGE_CHECK
    protect: str | None = None  # a protection file of its own (None: the comparison's)

    def as_dict(self) -> dict:
        out = {"name": self.name, "profile": self.profile, "granularity": self.granularity,
               "subpage_check": self.subpage_check}
        if self.protect is not None:
            out["protect"] = self.protect
        return out


def default_configs(subpage_check: str = DEFAULT_SUBPAGE_CHECK) -> list[Config]:
    """page (the baseline), spp_v4 and spp_v12; with "both", each SPP profile twice."""
    if subpage_check not in COMPARE_SUBPAGE_CHECKS:
        raise InputError(f"subpage_check must be one of {', '.join(COMPARE_SUBPAGE_CHECKS)}, "
                         f"not {subpage_check!r}")
    checks = ("all", "first") if subpage_check == "both" else (subpage_check,)
    configs = [Config("page", "page", "v4", checks[0])]
    for profile in PROFILES:
        for check in checks:
            suffix = f"_{check}" if len(checks) > 1 else ""
            configs.append(Config(f"spp_{profile}{suffix}", "spp", profile, check))
    return configs


def config_name(granularity: str, profile: str, subpage_check: str) -> str:
    """compare's name for a configuration: ``page``, ``spp_v4``, ``spp_v12_first``, ..."""
    if granularity == "page":
        return "page" if subpage_check == DEFAULT_SUBPAGE_CHECK else f"page_{subpage_check}"
    suffix = "" if subpage_check == DEFAULT_SUBPAGE_CHECK else f"_{subpage_check}"
    return f"spp_{profile}{suffix}"


def _as_config(value) -> Config:
    """A Config from a Config, a dict {name, granularity, profile, subpage_check, protect},
    a sweep configuration (sppjit.sweep.Config) or a sweep spec string ("v12,first",
    "granularity=page,name=baseline"): sppjit.sweep.parse_config reads the spec. The VM of
    a comparison is one (vCPUs, huge pages) and it applies no timeline: a spec setting
    hugepages, vcpus or ops is refused (sppjit sweep compares those)."""
    from . import sweep

    if isinstance(value, str) or isinstance(value, sweep.Config):
        spec = sweep.parse_config(value)
        shown = value if isinstance(value, str) else spec.spec
        for field in ("hugepages", "vcpus", "ops"):
            if getattr(spec, field) is not None:
                raise InputError(f"configuration {shown!r}: {field} is the same for every "
                                 "configuration of a comparison (give it as an option; "
                                 "sppjit sweep compares configurations that differ in it)")
        if spec.protect == sweep.NO_PROTECTION:
            raise InputError(f"configuration {shown!r}: protect=none: a comparison "
                             "compares protections (sppjit sweep replays unprotected ones)")
        value = Config(spec.name or config_name(spec.granularity, spec.profile,
                                                spec.subpage_check),
                       spec.granularity, spec.profile, spec.subpage_check, spec.protect)
    if isinstance(value, Config):
        config = value
    elif isinstance(value, dict):
        unknown = set(value) - {"name", "granularity", "profile", "subpage_check", "protect"}
        if unknown or "name" not in value:
            raise InputError(f"a configuration is a dict with name, granularity, profile, "
                             f"subpage_check and optional protect, not {value!r}")
        config = Config(**value)
    else:
        raise InputError(f"a configuration is a Config, a dict or a spec string, not "
                         f"{type(value).__name__}")
    for field, allowed in (("granularity", GRANULARITIES), ("profile", PROFILES),
                           ("subpage_check", SUBPAGE_CHECKS)):
        if getattr(config, field) not in allowed:
            raise InputError(f"configuration {config.name!r}: {field} must be one of "
                             f"{', '.join(allowed)}, not {getattr(config, field)!r}")
    return config


def _stems(paths: list[str]) -> list[str]:
    """Short distinct labels of protection files for configuration names (``page@hooks``):
    their stems, or p1, p2, ... when two stems are the same."""
    from .sweep import _stem

    stems = [_stem(p) for p in paths]
    return stems if len(set(stems)) == len(stems) else [f"p{k + 1}" for k in range(len(paths))]


def cross_protections(configs: list[Config], protections: list) -> list[tuple[Config, object]]:
    """Each configuration with the protection it replays under: its own ``protect`` file, or
    the comparison's. With two or more protections, every configuration that names none of
    its own runs once per protection, named ``NAME@STEM`` (as sppjit sweep names them; p1,
    p2, ... for protections given as objects or files of the same stem)."""
    if len(protections) < 2:
        shared = protections[0] if protections else None
        return [(c, c.protect if c.protect is not None else shared) for c in configs]
    paths = all(isinstance(p, (str, os.PathLike)) for p in protections)
    labels = (_stems([os.fspath(p) for p in protections]) if paths
              else [f"p{k + 1}" for k in range(len(protections))])
    crossed = []
    for config in configs:
        if config.protect is not None:
            crossed.append((config, config.protect))
            continue
        for source, label in zip(protections, labels):
            own = os.fspath(source) if isinstance(source, (str, os.PathLike)) else None
            crossed.append((dataclasses.replace(config, name=f"{config.name}@{label}",
                                                protect=own), source))
    return crossed


# ----------------------------------------------------------------------------- hooks

class NoiseHookIndex(HookIndex):
    """A HookIndex that also charges every irrelevant protection exit to the hooks that
    caused it (see the module docstring), for one configuration's granularity and
    sub-page check."""

    def __init__(self, gpa, length, names, *, granularity: str, subpage_check: str):
        super().__init__(gpa, length, names)
        self.irrelevant = np.zeros(len(self.names), dtype=np.int64)
        if granularity == "page":
            self.span_lo = self.start & np.uint64(B.PAGE_MASK)
            self.span_hi = self.span_lo + np.uint64(B.PAGE_SIZE)
        else:  # the sub-pages ranges_to_maps protects for this hook
            sub = np.uint64(B.SUBPAGE_SIZE - 1)
            self.span_lo = self.start & ~sub
            self.span_hi = (self.end + sub) & ~sub
        self._first_only = granularity == "spp" and subpage_check == "first"

    @classmethod
    def for_config(cls, ranges, config: Config) -> NoiseHookIndex:
        return cls(ranges.gpa, ranges.length, list(ranges.name),
                   granularity=config.granularity, subpage_check=config.subpage_check)

    def annotate(self, exits: pa.RecordBatch, row_gpa, row_size, row_kind) -> pa.RecordBatch:
        out = super().annotate(exits, row_gpa, row_size, row_kind)
        relevant = out.column("relevant")
        noise = ~np.asarray(relevant.fill_null(True).to_numpy(zero_copy_only=False), dtype=bool)
        if not noise.any():
            return out
        lo = exits.column("gpa").to_numpy()[noise]
        if self._first_only:
            hi = lo + np.uint64(1)  # only the first sub-page the write touches on the page
        else:
            page_end = (lo | np.uint64(B.PAGE_SIZE - 1)) + np.uint64(1)
            end = np.asarray(row_gpa)[noise] + np.asarray(row_size)[noise].astype(np.uint64)
            hi = np.minimum(end, page_end)
        page = lo & np.uint64(B.PAGE_MASK)
        first = np.searchsorted(self.start, page, side="left")
        stop = np.searchsorted(self.start, page + np.uint64(B.PAGE_SIZE), side="left")
        for k in range(self._per_page):
            idx = first + k
            ok = idx < stop
            cand = np.where(ok, idx, 0)
            hit = ok & (self.span_lo[cand] < hi) & (self.span_hi[cand] > lo)
            np.add.at(self.irrelevant, cand[hit], 1)
        return out

    def summary(self) -> dict:
        out = super().summary()
        for entry, count, start, end in zip(out["per_hook"], self.irrelevant, self.start,
                                            self.end):
            entry.update(irrelevant=int(count), gpa=int(start), length=int(end - start))
        return out


# ----------------------------------------------------------------------------- inputs



# ----------------------------------------------------------------------------- metrics

def _ratio(numerator, denominator, scale=1.0):
    return numerator * scale / denominator if denominator else None


def _change(value, base):
    """The relative change of ``value`` against ``base`` (-0.45: 45% fewer), None when the
    base is 0 (no relative figure)."""
    return (value - base) / base if base else None


def mtf_extra_exits(granularity: str, profile: str) -> tuple[int, int]:
    """(exits to userspace, exits in the kernel) that single-stepping one protection exit's
    write with the monitor trap flag adds (docs/compare.md): the MTF exit after the write
    (SDM Vol. 3C, "Monitor Trap Flag"), handed to the monitor; under v12 also the wp_fault
    of the write on the page just unprotected (set_subpages FULL leaves W off,
    docs/semantics.md §4.3) and the SPPT miss after re-protection (docs/semantics.md §4.3
    clears the level-2 entry). Page granularity and v4 restore W and the protection at once
    (docs/semantics.md §5, §3.4)."""
    if granularity == "spp" and profile == "v12":
        return 1, 2
    return 1, 0


def write_through_cost(protection_exits: int, *, granularity: str, profile: str,
                       exit_cost_us: float, kernel_exit_cost_us: float,
                       emulation_cost_us: float) -> dict:
    """What letting every protection exit's write through costs, per way of doing it:
    ``emulate`` (the monitor emulates the write in the exit it has: ``emulation_cost_us``
    each) and ``mtf`` (single-step it: the extra exits of mtf_extra_exits at the exit
    costs). Every protection exit counts: KVM drops the faulting write, so a write the
    monitor allows must be completed by it (docs/semantics.md §3.9, §4.6)."""
    user, kernel = mtf_extra_exits(granularity, profile)
    return {
        "writes": protection_exits,
        "emulate_seconds": protection_exits * emulation_cost_us * 1e-6,
        "mtf_exits": protection_exits * (user + kernel),
        "mtf_exits_per_write": user + kernel,
        "mtf_seconds": protection_exits * (user * exit_cost_us
                                           + kernel * kernel_exit_cost_us) * 1e-6,
    }


def derive(summary: dict, baseline: dict | None, *, exit_cost_us: float,
           kernel_exit_cost_us: float, write_through: str = DEFAULT_WRITE_THROUGH,
           emulation_cost_us: float = DEFAULT_EMULATION_COST_US) -> dict:
    """The comparison figures of one configuration's replay summary; ``baseline`` is the
    summary of the page-granular configuration it is compared with (None: no exits-avoided
    nor relative figures). ``write_through`` (none, emulate, mtf) says which price of
    completing the allowed writes ``total_overhead_seconds`` adds to the exits' own."""
    exits, counts = summary["exits"], summary["counts"]
    kinds = B.EXIT_KIND_NAMES
    userspace = sum(exits[k] for k in kinds if k in USERSPACE_EXIT_KINDS)
    kernel = sum(exits[k] for k in kinds if k not in USERSPACE_EXIT_KINDS)
    protection = sum(exits[k] for k in PROTECTION_EXIT_KINDS)
    writes, accesses = counts["writes"], counts["accesses"]
    overhead = (userspace * exit_cost_us + kernel * kernel_exit_cost_us) * 1e-6
    config = summary.get("config") or {}
    through = write_through_cost(protection, granularity=config.get("granularity", "spp"),
                                 profile=config.get("profile", "v4"), exit_cost_us=exit_cost_us,
                                 kernel_exit_cost_us=kernel_exit_cost_us,
                                 emulation_cost_us=emulation_cost_us)
    total = overhead + (0.0 if write_through == "none" else through[f"{write_through}_seconds"])
    derived = {
        "accesses": accesses,
        "writes": writes,
        "exits": exits["total"],
        "exits_per_1000_writes": _ratio(exits["total"], writes, 1000.0),
        "protection_exits": protection,
        "protection_exits_per_1000_writes": _ratio(protection, writes, 1000.0),
        "exits_avoided": None,
        "net_exits_avoided": None,
        "exits_to_userspace": userspace,
        "exits_in_kernel": kernel,
        "protected_left_writable": summary["pages"]["protected_left_writable"],
        "sppt_tables": summary["pages"]["sppt_tables"],
        "sppt_bytes": summary["pages"]["sppt_tables"] * B.PAGE_SIZE,
        "overhead_seconds": overhead,
        "overhead_seconds_per_million_accesses": _ratio(overhead, accesses, 1e6),
        "hooks": None,
        "write_through": through,
        "total_overhead_seconds": total,
    }
    if baseline is not None:
        base = sum(baseline["exits"][k] for k in PROTECTION_EXIT_KINDS)
        derived["exits_avoided"] = base - protection
        derived["net_exits_avoided"] = baseline["exits"]["total"] - exits["total"]
        base_derived = derive(baseline, None, exit_cost_us=exit_cost_us,
                              kernel_exit_cost_us=kernel_exit_cost_us,
                              write_through=write_through, emulation_cost_us=emulation_cost_us)
        derived["change_vs_baseline"] = {
            "exits": _change(exits["total"], baseline["exits"]["total"]),
            "protection_exits": _change(protection, base),
            "overhead_seconds": _change(overhead, base_derived["overhead_seconds"]),
            "total_overhead_seconds": _change(total, base_derived["total_overhead_seconds"]),
        }
    if "hooks" in summary:
        relevant, irrelevant = summary["hooks"]["relevant"], summary["hooks"]["irrelevant"]
        derived["hooks"] = {"relevant": relevant, "irrelevant": irrelevant,
                            "noise_ratio": _ratio(irrelevant, relevant + irrelevant)}
    return derived


def _pairs_v4_v12(document: dict):
    """(v4 entry, v12 entry) of the SPP configurations that differ only in their profile."""
    def key(entry):
        return (entry["granularity"], entry["subpage_check"], entry.get("protect"),
                entry["summary"]["config"].get("protection", {}).get("path"))

    by_key: dict = {}
    for entry in document["configs"]:
        if entry["granularity"] == "spp":
            by_key.setdefault(key(entry), {}).setdefault(entry["profile"], entry)
    for profiles in by_key.values():
        if "v4" in profiles and "v12" in profiles:
            yield profiles["v4"], profiles["v12"]


def profile_notes(document: dict) -> list[dict]:
    """Why SPP v4 and v12 differ where they do: one note per mechanism that shows in the
    counts of a v4 / v12 pair (docs/semantics.md §3, §4), none where they are equal. Each
    note: ``configs`` (the pair), ``mechanism`` (lazy_sppt_build, shared_root, sppt_memory,
    huge_pages_left_writable, write_fault_after_unprotect) and ``text``."""
    notes = []
    vcpus = document["config"]["vcpus"]
    for v4, v12 in _pairs_v4_v12(document):
        a, b = v4["summary"]["exits"], v12["summary"]["exits"]
        pair = [v4["name"], v12["name"]]

        def note(mechanism, text, sections, pair=pair):
            refs = ", ".join(f"\u00a7{x}" for x in sections)  # the sections of semantics.md
            notes.append({"configs": pair, "mechanism": mechanism,
                          "text": f"{pair[0]} / {pair[1]}: {text} (docs/semantics.md {refs})"})

        if b["spp_miss"] > a["spp_miss"]:
            note("lazy_sppt_build",
                 f"spp_miss {a['spp_miss']:,} / {b['spp_miss']:,}: v12 builds no SPPT entry "
                 "when the protection is set (lazy SPPT build); the first write under each "
                 "2 MiB block of protected pages misses and fills the block's 512 gfns. v4 "
                 "builds the entries when the protection is set or the page is mapped."
                 + (f" v12's one SPPT root is shared by the {vcpus} vCPUs: a block misses "
                    "once for all of them." if vcpus > 1 else ""),
                 ("4.3", "4.5", "3.4", "3.5") + (("4.1",) if vcpus > 1 else ()))
        elif a["spp_miss"] > b["spp_miss"]:
            note("shared_root",
                 f"spp_miss {a['spp_miss']:,} / {b['spp_miss']:,}: each v4 vCPU has its own "
                 "SPPT root and a miss fills that vCPU's tree only; v12's vCPUs share one "
                 "root, filled once for all.", ("3.2", "3.7", "4.1"))
        tables4, tables12 = v4["derived"]["sppt_tables"], v12["derived"]["sppt_tables"]
        left4 = v4["derived"]["protected_left_writable"]
        left12 = v12["derived"]["protected_left_writable"]
        if tables4 != tables12:
            from .summary import readable_size

            sizes = (f"SPPT memory {readable_size(tables4 * B.PAGE_SIZE)} / "
                     f"{readable_size(tables12 * B.PAGE_SIZE)}: ")
            if tables4 > tables12:
                note("sppt_memory",
                     sizes + "v4 builds the SPPT path of every protected page in each vCPU's "
                     "own tree" + (f" ({vcpus} trees here)" if vcpus > 1 else "")
                     + "; v12 has one tree for all vCPUs (shared root), filled only for the "
                       "2 MiB blocks written.", ("3.2", "3.4", "4.1", "4.5"))
            elif left4 > left12:
                note("sppt_memory",
                     sizes + "v4 builds no SPPT path for the protected pages it leaves "
                     "writable under huge leaves.", ("3.5", "4.4"))
            else:
                note("sppt_memory",
                     sizes + "v12 builds its SPPT paths on SPPT misses, for the 2 MiB blocks "
                     "written; v4 when the protection is set or the page is mapped.",
                     ("4.5", "3.4", "3.5"))
        if left4 != left12:
            note("huge_pages_left_writable",
                 f"protected pages left writable {left4:,} / {left12:,}: v4 maps a 2 MiB "
                 "region whole and leaves its protected pages writable, so writes there take "
                 "no protection exit; v12 maps such regions at 4 KiB. v4's fewer protection "
                 "exits there are protection missed, not exits saved.", ("3.5", "4.4"))
        if a["wp_fault"] != b["wp_fault"]:
            note("write_fault_after_unprotect",
                 f"wp_fault {a['wp_fault']:,} / {b['wp_fault']:,}: v12 leaves a page it "
                 "unprotects (map FULL) read-only until a write fault restores W; v4 "
                 "restores W at once.", ("4.3", "3.4"))
    return notes


def _check_cost(name: str, value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number of microseconds, not {value!r}") from None
    if not math.isfinite(value) or value < 0:
        raise InputError(f"{name} must be a finite number of microseconds >= 0, not {value}")
    return value


# ----------------------------------------------------------------------------- compare

def compare(trace, protection, *, memory: str | int | None = None,
            memslots: Iterable[tuple[int, int]] | None = None, vcpus: int = DEFAULT_VCPUS,
            hugepages: bool = False, configs=None, subpage_check: str = DEFAULT_SUBPAGE_CHECK,
            exit_cost_us: float = DEFAULT_EXIT_COST_US,
            kernel_exit_cost_us: float = DEFAULT_KERNEL_EXIT_COST_US,
            write_through: str = DEFAULT_WRITE_THROUGH,
            emulation_cost_us: float = DEFAULT_EMULATION_COST_US, engine: str = DEFAULT_ENGINE,
            batch_size: int | None = None, threads: int | None = None,
            progress: Callable[[str, int], None] | None = None,
            inputs: dict[str, str | None] | None = None) -> dict:
    """Replay ``trace`` under several configurations with the same ``protection``; return
    the comparison document (see the module docstring, docs/compare.md and ``sppjit compare
    --help``).

    ``trace``: a path (Parquet file or directory, Arrow IPC file or stream), a pyarrow Table
    or RecordBatch, a dict of columns, or a stream (each read once). ``protection``:
    a path (access maps or byte ranges) or a sppjit.io.protect.AccessMaps / ByteRanges, or a
    list of them: with two or more, every configuration runs once under each (named
    ``NAME@STEM``), side by side. ``memory`` (default 4GiB) or ``memslots`` [(base_gfn,
    npages), ...] give the guest memory. ``configs``: Config objects, dicts {name,
    granularity, profile, subpage_check, protect} or sweep spec strings ("v12,first",
    "granularity=page,name=base": sppjit.sweep.parse_config); default:
    ``default_configs(subpage_check)``. Each configuration's baseline (``exits_avoided``,
    ``change_vs_baseline``) is the first page-granular configuration under the same
    protection. The trace is read once: each batch is replayed by every configuration, on
    ``threads`` threads (default: the cores; sppjit.sweep.run_lanes).
    ``progress(config_name, rows_done)`` is called after every configuration's batch.
    ``write_through`` and ``emulation_cost_us``: the price of completing the allowed
    writes added to ``total_overhead_seconds`` (docs/compare.md). ``inputs``: further files
    to record digests of ({"memslots": path}); the trace and protection files are always
    hashed (on a thread, while the replays run).
    """
    from .io.protect import ByteRanges
    from .io.trace import open_trace
    from .provenance import BackgroundDigests, generator_info, versions
    from .replay import Replay, discard_exits
    from .sweep import Lane, first_failure, run_lanes
    from .vm import VM

    if memory is not None and memslots is not None:
        raise InputError("memory and memslots cannot be given together (memslots defines "
                         "the memory)")
    exit_cost_us = _check_cost("exit_cost_us", exit_cost_us)
    kernel_exit_cost_us = _check_cost("kernel_exit_cost_us", kernel_exit_cost_us)
    emulation_cost_us = _check_cost("emulation_cost_us", emulation_cost_us)
    if write_through not in WRITE_THROUGH:
        raise InputError(f"write_through must be one of {', '.join(WRITE_THROUGH)}, not "
                         f"{write_through!r}")
    if configs is None:
        configs = default_configs(subpage_check)
    configs = [_as_config(c) for c in configs]
    if not configs:
        raise InputError("compare needs at least one configuration")
    protections = list(protection) if isinstance(protection, (list, tuple)) else [protection]
    if not protections:
        raise InputError("compare needs a protection")
    planned = cross_protections(configs, protections)
    configs = [c for c, _ in planned]
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise InputError(f"configuration names must be distinct: {', '.join(names)}")
    if batch_size is None:
        batch_size = default_batch_size(engine)
    slots = [(int(b), int(n)) for b, n in memslots] if memslots is not None else None

    # Read once for every configuration (a one-shot stream included); the schema is checked
    # now, before any work, and each batch's vCPUs by every session against its VM.
    reader = open_trace(trace, batch_size=batch_size)
    trace_path, generator = reader.path, generator_info(reader.schema)
    loaded: dict = {}  # each protection read once, whatever the configurations sharing it

    def protection_of(source):
        key = os.fspath(source) if isinstance(source, (str, os.PathLike)) else id(source)
        if key not in loaded:
            obj, path = load_protection(source)
            maps = protection_maps(obj)
            loaded[key] = (key, obj, maps, protection_info(obj, path, maps))
        return loaded[key]

    per_config = [protection_of(source) for _, source in planned]
    # Configurations are checked (VmConfig) and every protection placed before any replay.
    vms = []
    for config, (_, obj, _, _) in zip(configs, per_config):
        vm = VM(memory=memory if memory is not None else DEFAULT_MEMORY, memslots=slots,
                vcpus=vcpus, profile=config.profile, hugepages=hugepages,
                subpage_check=config.subpage_check, granularity=config.granularity)
        check_protection(vm, obj)
        vms.append(vm)
    shared = vms[0].config.as_dict()
    digest_paths = {"trace": trace_path}
    files = [info["path"] for _, _, _, info in loaded.values() if info["path"] is not None]
    if len(files) == 1:
        digest_paths["protect"] = files[0]
    else:
        digest_paths.update({f"protect:{path}": path for path in files})
    digests = BackgroundDigests({**digest_paths, **(inputs or {})})

    # One pass over the trace for every configuration (sppjit.sweep's runner): each batch is
    # decoded once and replayed by every configuration's session, on a pool of threads.
    lanes = []
    for config, vm, (_, obj, maps, _) in zip(configs, vms, per_config):
        apply_protection(vm, obj, maps)
        hooks = (NoiseHookIndex.for_config(obj, config) if isinstance(obj, ByteRanges)
                 else None)
        lanes.append(Lane(config.name, Replay(vm, engine, on_exits=discard_exits, hooks=hooks)))
    del vms  # the lanes hold the VMs now; each is freed with its lane
    run_lanes(reader, lanes, threads, progress=progress)
    failed = first_failure(lanes)
    if failed is not None:
        raise failed.error
    rows = reader.rows_seen
    results = []
    for config, lane, (_, _, _, info) in zip(configs, lanes, per_config):
        summary = lane.session.summary({"path": trace_path}, generator=generator)
        summary["config"]["protection"] = info
        results.append((config, summary))
    del lanes

    provenance = {"versions": versions(), "digests": digests.result(),
                  "generator": dict(generator)}
    for _, summary in results:
        summary["provenance"] = provenance
    # Each configuration is compared with the first page-granular one under its protection.
    baselines: dict = {}
    for (config, summary), (key, _, _, _) in zip(results, per_config):
        if config.granularity == "page" and key not in baselines:
            baselines[key] = (config.name, summary)
    baseline_name = next((c.name for c, _ in results if c.granularity == "page"), None)
    input_info = {"path": trace_path, "rows": rows, **generator}
    entries = []
    for (config, summary), (key, _, _, _) in zip(results, per_config):
        base_name, base = baselines.get(key, (None, None))
        described = config.as_dict()
        own = described.pop("protect", None)
        entry = {**described, "summary": summary,
                 "derived": derive(summary, base, exit_cost_us=exit_cost_us,
                                   kernel_exit_cost_us=kernel_exit_cost_us,
                                   write_through=write_through,
                                   emulation_cost_us=emulation_cost_us)}
        if own is not None:
            entry["protect"] = own
        if base_name is not None and base_name != baseline_name:
            entry["baseline"] = base_name
        entries.append(entry)
    document = {
        "schema_version": SCHEMA_VERSION,
        "sppjit_version": __version__,
        "input": input_info,
        "protection": per_config[0][3],
        "config": {
            "memslots": shared["memslots"],
            "memory_bytes": shared["memory_bytes"],
            "vcpus": shared["vcpus"],
            "hugepages": shared["hugepages"],
            "engine": engine,
            "batch_size": batch_size,
            "subpage_check": subpage_check,
            "configs": [c.as_dict() for c in configs],
        },
        "exit_cost_us": exit_cost_us,
        "kernel_exit_cost_us": kernel_exit_cost_us,
        "exit_cost_source": EXIT_COST_SOURCE,
        "baseline": baseline_name,
        "provenance": provenance,
        "configs": entries,
        "write_through": {"policy": write_through, "emulation_cost_us": emulation_cost_us,
                          "source": WRITE_THROUGH_SOURCE},
    }
    if len(loaded) > 1:
        document["protections"] = [info for _, _, _, info in loaded.values()]
    notes = profile_notes(document)
    if notes:
        document["notes"] = notes
    return document


@dataclass(frozen=True)
class CompareRun:
    """What ``compare_files`` gives back: the document (sppjit.summary.CompareDocument), the
    paths written and a note for the user, or None."""

    document: CompareDocument
    written: tuple[str, ...]
    note: str | None = None


def compare_files(trace: str, protection: str | list[str] | None = None, *,
                  memory: str | int | None = None,
                  memslots: str | None = None, vcpus: int | None = None,
                  hugepages: bool = False, subpage_check: str = DEFAULT_SUBPAGE_CHECK,
                  exit_cost_us: float = DEFAULT_EXIT_COST_US,
                  kernel_exit_cost_us: float = DEFAULT_KERNEL_EXIT_COST_US,
                  write_through: str = DEFAULT_WRITE_THROUGH,
                  emulation_cost_us: float = DEFAULT_EMULATION_COST_US,
                  configs: list[str] | None = None,
                  engine: str = DEFAULT_ENGINE, summary: str | None = None,
                  hooks_out: str | None = None, batch_size: int | None = None,
                  progress: Callable[[str, int, int | None], None] | None = None,
                  names: dict[str, str] | None = None,
                  protect_virtual: str | None = None, mapping: str | None = None,
                  protect_symbols: str | None = None, symbols: str | None = None,
                  phys_base: int | None = None) -> CompareRun:
    """``sppjit compare`` as one library call, on files: check every option and path before
    any work, compare (``compare``), record the trace's format and the memslots file, and
    write the comparison JSON (``summary``) and the per-hook table (``hooks_out``) all or
    nothing. ``memslots`` is a memslot file; ``vcpus`` None is the default, and lets the note
    suggest the VM a generated trace was made for. ``protection``: one file, or a list (each
    configuration runs under each, side by side). ``configs``: sweep spec strings (None:
    compare's defaults, ``subpage_check`` deciding; with specs, ``subpage_check`` must stay
    the default). ``progress(config_name, rows_done,
    rows_total)`` is called after every batch. Errors name the parameters (``memory``,
    ``summary``, ...) or, through ``names``, what the caller calls them. Instead of
    ``protection``, a whole VM's protection by virtual address or by kernel symbol
    (``protect_virtual`` + ``mapping``, ``protect_symbols`` + ``symbols`` [+ ``phys_base``]:
    sppjit.io.symbols.resolve_protection)."""
    from .io.atomic import check_distinct
    from .io.formats import trace_format
    from .io.memslots import read_memslots
    from .io.output import check_output_path
    from .io.protect import ByteRanges
    from .io.trace import open_trace
    from .provenance import vm_settings

    def name(parameter: str) -> str:
        return (names or {}).get(parameter, parameter)

    # ---- options and paths, before any work
    if memory is not None and memslots is not None:
        raise InputError(f"{name('memory')} and {name('memslots')} cannot be used together "
                         f"({name('memslots')} defines the memory)")
    if summary is not None:
        check_output_path(summary, option=name("summary"))
    if hooks_out is not None:
        check_output_path(hooks_out, option=name("hooks_out"), table=True)
    protections = ([] if protection is None else list(protection)
                   if isinstance(protection, (list, tuple)) else [protection])
    if protection is not None and not protections:
        raise InputError(f"{name('protection')}: give a protection file")
    if configs is not None and subpage_check != DEFAULT_SUBPAGE_CHECK:
        raise InputError(f"{name('subpage_check')} chooses among compare's default "
                         f"configurations; with {name('configs')}, give subpage_check in each "
                         f"(e.g. {name('configs')} v12,first)")
    if hooks_out is not None and len(protections) > 1:
        raise InputError(f"{name('hooks_out')}: the per-hook table is for one protection, "
                         f"not {len(protections)}")
    from .io.symbols import check_protection_options

    check_protection_options(protect=protections or None, protect_virtual=protect_virtual,
                             mapping=mapping, protect_symbols=protect_symbols,
                             symbols=symbols, phys_base=phys_base)
    check_distinct([(name("trace"), trace),
                    *((name("protection"), p) for p in protections),
                    (name("memslots"), memslots), (name("summary"), summary),
                    (name("hooks_out"), hooks_out), (name("protect_virtual"), protect_virtual),
                    (name("mapping"), mapping), (name("protect_symbols"), protect_symbols),
                    (name("symbols"), symbols)])
    if memory is not None:
        from .io.sizes import parse_size

        parse_size(memory, name=name("memory"))

    # The memory and vCPUs the trace records are the defaults (options override).
    memory, vcpus, vm_from = vm_settings(open_trace(trace).schema, memory=memory,
                                         memslots=memslots, vcpus=vcpus)
    reader = open_trace(trace, vcpus=vcpus)
    if reader.num_rows == 0:
        raise InputError("trace: no rows")
    slots = read_memslots(memslots) if memslots is not None else None
    from .io.symbols import resolve_protection

    whole_vm = resolve_protection(protect=protections or None, protect_virtual=protect_virtual,
                                  mapping=mapping, protect_symbols=protect_symbols,
                                  symbols=symbols, phys_base=phys_base)
    label = protections[0] if protections else None
    if whole_vm is not None:
        protections, label = [whole_vm.protection], whole_vm.label
    elif not protections:
        raise InputError(f"{name('protection')} (or {name('protect_virtual')} or "
                         f"{name('protect_symbols')}) is required")
    loaded = [load_protection(p)[0] for p in protections]  # each file checked now
    if hooks_out is not None and not isinstance(loaded[0], ByteRanges):
        raise InputError(f"{name('hooks_out')}: {label} holds access maps; a per-hook "
                         "table needs byte ranges (columns gpa, length, optional name)")
    if configs is not None:
        try:
            configs = [_as_config(c) for c in configs]
        except InputError as exc:
            raise InputError(f"{name('configs')}: {exc}") from None

    # ---- the comparison (it reads the protection and hashes the inputs)
    document = compare(
        trace, protections if len(protections) > 1 else protections[0], memory=memory,
        memslots=slots, vcpus=vcpus, hugepages=hugepages,
        configs=configs, subpage_check=subpage_check, exit_cost_us=exit_cost_us,
        kernel_exit_cost_us=kernel_exit_cost_us, write_through=write_through,
        emulation_cost_us=emulation_cost_us, engine=engine, batch_size=batch_size,
        progress=(None if progress is None
                  else lambda config, rows: progress(config, rows, reader.num_rows)),
        inputs={"memslots": memslots},
    )
    if document["input"]["rows"] == 0:
        raise InputError("trace: no rows")
    document["input"]["format"] = trace_format(trace)
    if whole_vm is not None:  # the shared protection facts: every configuration shows it
        document["protection"]["path"] = label
    document["config"]["memslots_file"] = memslots
    document["config"]["vm_from"] = vm_from
    for config in document["configs"]:
        config["summary"]["input"]["format"] = document["input"]["format"]
        config["summary"]["config"]["memslots_file"] = memslots

    # ---- outputs, all or nothing
    written = _write_outputs(document, summary=summary, hooks_out=hooks_out,
                             hooks_name=name("hooks_out"))
    return CompareRun(document=CompareDocument.from_dict(document), written=tuple(written),
                      note=None)


def _write_outputs(document: dict, *, summary: str | None, hooks_out: str | None,
                   hooks_name: str) -> list[str]:
    import contextlib

    from .io.atomic import Outputs
    from .io.output import TableWriter, write_json_atomic

    with contextlib.ExitStack() as stack:
        outputs = stack.enter_context(Outputs())
        if hooks_out is not None:
            table = hooks_table(document)
            with TableWriter(hooks_out, table.schema, option=hooks_name) as writer:
                writer.write_batch(table)
            outputs.add(hooks_out)
        if summary is not None:
            write_json_atomic(summary, document)
            outputs.add(summary)
        return list(outputs.committed)


def hooks_table(document: dict) -> pa.Table:
    """Per hook: ``hook`` (its name), then ``<config>_relevant`` and ``<config>_irrelevant``
    for every configuration, then the hook's ``gpa`` and ``length``. Byte-range protection
    only (InputError otherwise)."""
    configs = document["configs"]
    if not configs or "hooks" not in configs[0]["summary"]:
        raise InputError("a per-hook table needs byte-range protection (columns gpa, length)")
    first = configs[0]["summary"]["hooks"]["per_hook"]
    columns = {"hook": pa.array([h["name"] for h in first], type=pa.string())}
    for config in configs:
        per_hook = config["summary"]["hooks"]["per_hook"]
        for key in ("relevant", "irrelevant"):
            columns[f"{config['name']}_{key}"] = pa.array([h[key] for h in per_hook],
                                                          type=pa.int64())
    columns["gpa"] = pa.array([h["gpa"] for h in first], type=pa.uint64())
    columns["length"] = pa.array([h["length"] for h in first], type=pa.uint32())
    return pa.table(columns)
