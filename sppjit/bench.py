"""The benchmark harness behind ``sppjit bench``: seeded scenarios, every figure from one run.

For each scenario it measures, in the same process and back to back: the JIT engine over the
whole trace (after compilation, which is timed separately), the reference engine on a sample
of the same trace, and a plain numpy pass that only reads the ``gpa`` column (the
memory-streaming limit). Ratios are computed from those same measurements, never against
figures from another run.
"""

from __future__ import annotations

import os
import platform
import time

import numpy as np

from . import __version__

DEFAULT_SCENARIOS = ("uniform", "hotset", "sequential", "fault-storm", "guarded")


def _numpy_stream(gpa: np.ndarray, repeat: int = 3) -> float:
    """Best seconds of a numpy pass that reads every gpa once (a reduction, so nothing is
    written and nothing can be skipped)."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        np.bitwise_xor.reduce(gpa)
        best = min(best, time.perf_counter() - t)
    return best


def _vm_for(scenario, granularity: str = "spp"):
    from .vm import VM

    vm = VM(memory=scenario.memory, vcpus=scenario.vcpus, granularity=granularity)
    if scenario.protect_gfn.shape[0]:
        vm.protect(scenario.protect_gfn, scenario.protect_access)
    return vm


def _replay_seconds(scenario, engine: str, rows: int, batch_size: int) -> tuple[float, dict]:
    from .io.trace import open_trace
    from .replay import Replay

    vm = _vm_for(scenario)
    session = Replay(vm, engine)
    cols = {k: v[:rows] for k, v in scenario.columns().items()}
    for batch in open_trace(cols, batch_size=batch_size):
        session.run(batch)
    return session.seconds, session.summary()


def warm_up() -> float:
    """Replay a tiny trace through every kernel path once; returns the seconds it took.

    With numba's on-disk cache warm this is a cache load; on a fresh install it is the compile.
    """
    from .datasets import scenarios as S

    t = time.perf_counter()
    tiny = S.make("guarded", 2000, seed=1)
    _replay_seconds(tiny, "jit", len(tiny), 512)
    return time.perf_counter() - t


def run_bench(
    scenarios=DEFAULT_SCENARIOS,
    accesses: int = 10_000_000,
    reference_sample: int = 20_000,
    seed: int = 0,
    batch_size: int = 1 << 20,
) -> dict:
    """Run the benchmark; returns a JSON-ready dict (see ``format_bench``)."""
    from .datasets import scenarios as S

    result = {
        "sppjit_version": __version__,
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "accesses": accesses,
        "reference_sample": reference_sample,
        "seed": seed,
        "batch_size": batch_size,
        "compile_seconds": warm_up(),
        "scenarios": {},
    }
    for name in scenarios:
        sc = S.make(name, accesses, seed)
        jit_s, summary = _replay_seconds(sc, "jit", len(sc), batch_size)
        sample = min(reference_sample, len(sc))
        ref_s, _ = _replay_seconds(sc, "reference", sample, batch_size)
        np_s = _numpy_stream(sc.gpa)
        jit_rate = len(sc) / jit_s
        ref_rate = sample / ref_s
        np_rate = len(sc) / np_s
        result["scenarios"][name] = {
            "description": sc.description,
            "accesses": len(sc),
            "jit_accesses_per_second": jit_rate,
            "reference_accesses_per_second": ref_rate,
            "numpy_stream_per_second": np_rate,
            "jit_over_reference": jit_rate / ref_rate,
            "jit_over_numpy_stream": jit_rate / np_rate,
            "exits": summary["exits"]["total"],
            "violations": summary["counts"]["spp_violation"],
        }
    return result


def format_bench(result: dict) -> str:
    rows = [
        f"sppjit {result['sppjit_version']} bench: {result['accesses']:,} accesses per scenario, "
        f"reference on {result['reference_sample']:,}, seed {result['seed']}, "
        f"compile/cache load {result['compile_seconds']:.2f} s",
        f"{'scenario':<12} {'jit M/s':>9} {'ref K/s':>9} {'numpy M/s':>10} {'jit/ref':>9} {'jit/numpy':>10} {'exits':>10}",
    ]
    for name, s in result["scenarios"].items():
        rows.append(
            f"{name:<12} {s['jit_accesses_per_second'] / 1e6:>9.1f} "
            f"{s['reference_accesses_per_second'] / 1e3:>9.1f} "
            f"{s['numpy_stream_per_second'] / 1e6:>10.0f} {s['jit_over_reference']:>9.0f}x "
            f"{s['jit_over_numpy_stream']:>10.3f} {s['exits']:>10,}"
        )
    return "\n".join(rows)
