"""Every name and default the library and the command line share, written once.

Only plain Python here (no numpy, numba or pyarrow): the command modules build their typer
enums and option defaults from this module, and ``sppjit --help`` must stay fast. The order
of PROFILES, GRANULARITIES and SUBPAGE_CHECKS is the kernels' code for each value
(kernels/layout.py stores ``PROFILES.index(profile)`` in the VM's configuration array).
"""

from __future__ import annotations

# ---- what a VM is
PROFILES = ("v4", "v12")  # the KVM SPP series followed: RESEND v4 (2019), v12 (2020)
GRANULARITIES = ("spp", "page")  # SPP, or whole-page write protection (the baseline)
SUBPAGE_CHECKS = ("all", "first")  # which sub-pages of a write are checked
DEFAULT_PROFILE = "v4"
DEFAULT_GRANULARITY = "spp"
DEFAULT_SUBPAGE_CHECK = "all"
DEFAULT_MEMORY = "4GiB"  # one memslot from gfn 0
DEFAULT_VCPUS = 1
MAX_VCPUS = 1024

# ---- how a trace is replayed
ENGINES = ("jit", "reference")
DEFAULT_ENGINE = "jit"
# Rows per batch: large for the compiled engine (the per-batch cost is amortised), small for
# the plain-Python reference engine so that the progress line moves.
BATCH_SIZES = {"jit": 1 << 20, "reference": 1 << 12}
MAX_BATCH = 1 << 32  # rows; a batch is held in memory whole, and 2**63 overflows pyarrow
TIMELINE_OPS = ("set_subpages", "zap", "remap", "delete_memslot")

# ---- sppjit compare
COMPARE_SUBPAGE_CHECKS = SUBPAGE_CHECKS + ("both",)  # "both": each SPP profile with each check
# Order-of-magnitude exit costs for an Ice Lake-era KVM host (sources: docs/compare.md §3).
DEFAULT_EXIT_COST_US = 3.0
DEFAULT_KERNEL_EXIT_COST_US = 1.0
# What completing a legitimate write costs the monitor (docs/compare.md, "Letting a write
# through"): nothing counted (none), emulating it in the exit (emulate), or single-stepping it
# with the monitor trap flag (mtf: one or two more exits).
WRITE_THROUGH = ("none", "emulate", "mtf")
DEFAULT_WRITE_THROUGH = "none"
DEFAULT_EMULATION_COST_US = 1.0

# ---- sppjit bench
# The seeded scenarios of sppjit.datasets.scenarios, in that module's order (it builds its
# registry from these names), and the longest trace one may ask for: fault-storm touches a
# new page per access, and 2**36 pages fill the 48-bit guest-physical space.
SCENARIO_NAMES = ("uniform", "hotset", "sequential", "fault-storm", "guarded", "kernel-guard")
MAX_ACCESSES = 1 << 36
# The converters' formats: one user process's trace (sppjit.convert), a whole VM's
# (sppjit.convert.vm).
CONVERT_FORMATS = ("lackey", "pinatrace", "drmemtrace", "csv")
VM_CONVERT_FORMATS = ("qemu", "gem5")
BENCH_SCENARIOS = ("uniform", "hotset", "sequential", "fault-storm", "guarded")
BENCH_ACCESSES = 10_000_000
BENCH_END_TO_END_ACCESSES = 100_000_000
BENCH_END_TO_END_SCENARIO = "hotset"
BENCH_REFERENCE_SAMPLE = 20_000


def default_batch_size(engine: str) -> int:
    """The batch size of ``engine`` when none is given."""
    return BATCH_SIZES.get(engine, BATCH_SIZES[DEFAULT_ENGINE])
