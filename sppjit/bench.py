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
from .defaults import (
    BATCH_SIZES,
    BENCH_ACCESSES,
    BENCH_END_TO_END_ACCESSES,
    BENCH_END_TO_END_SCENARIO,
    BENCH_REFERENCE_SAMPLE,
    BENCH_SCENARIOS,
)
from .errors import InputError

DEFAULT_SCENARIOS = BENCH_SCENARIOS


def check_scenarios(names, label: str = "scenarios") -> tuple[str, ...]:
    """The scenario names, checked (InputError starting with ``label`` for an unknown one)."""
    names = tuple(names)
    for name in names:
        if name not in BENCH_SCENARIOS:
            raise InputError(f"{label}: unknown scenario {name!r} (one of "
                             f"{', '.join(BENCH_SCENARIOS)})")
    return names


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
    from .replay import Replay, discard_exits

    vm = _vm_for(scenario)
    # As `sppjit replay --summary` runs: every exit is written to the kernel's log buffer,
    # counted and dropped (the exit log's Arrow conversion is output work, measured by
    # --end-to-end).
    session = Replay(vm, engine, on_exits=discard_exits)
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
    _replay_seconds(tiny, "reference", 200, 512)  # the KVM rules it calls are compiled too
    return time.perf_counter() - t


def run_bench(
    scenarios=DEFAULT_SCENARIOS,
    accesses: int = BENCH_ACCESSES,
    reference_sample: int = BENCH_REFERENCE_SAMPLE,
    seed: int = 0,
    batch_size: int = BATCH_SIZES["jit"],
    repeat: int = 3,
) -> dict:
    """Run the benchmark; returns a JSON-ready dict (see ``format_bench``).

    The JIT figure is the best of ``repeat`` replays (machines are shared and noisy); the
    reference engine runs once on its sample; the numpy pass is the best of three.
    """
    from .datasets import scenarios as S

    scenarios = check_scenarios(scenarios)
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
        "repeat": repeat,
        "compile_seconds": warm_up(),
        "scenarios": {},
    }
    for name in scenarios:
        sc = S.make(name, accesses, seed)
        # Best of `repeat` replays, each on a fresh VM (a replay changes its VM's state).
        jit_s, summary = min(
            (_replay_seconds(sc, "jit", len(sc), batch_size) for _ in range(repeat)), key=lambda r: r[0]
        )
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
        f"reference on {result['reference_sample']:,}, seed {result['seed']}, jit best of {result['repeat']}, "
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


# ----------------------------------------------------------------------------- end to end
E2E_CHUNK = 1 << 20


def _write_e2e_traces(directory: str, scenario: str, accesses: int, seed: int) -> dict[str, str]:
    """The trace as uncompressed Parquet and as an Arrow IPC file, written chunk by chunk (each
    chunk is the scenario generated with its own derived seed, so memory stays bounded)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .datasets import scenarios as S
    from .io.trace import schema_metadata

    schema = pa.schema(
        [("gpa", pa.uint64()), ("size", pa.uint16()), ("vcpu", pa.uint16()), ("kind", pa.uint8())],
        metadata=schema_metadata(),
    )
    paths = {"parquet": os.path.join(directory, "trace.parquet"), "arrow": os.path.join(directory, "trace.arrow")}
    with pq.ParquetWriter(paths["parquet"], schema, compression="none") as pw, pa.OSFile(
        paths["arrow"], "wb"
    ) as sink, pa.ipc.new_file(sink, schema) as aw:
        done = 0
        chunk_index = 0
        while done < accesses:
            n = min(E2E_CHUNK, accesses - done)
            sc = S.make(scenario, n, seed * 1_000_003 + chunk_index)
            cols = sc.columns()
            rb = pa.record_batch([pa.array(cols[f.name]) for f in schema], schema=schema)
            pw.write_batch(rb)
            aw.write_batch(rb)
            done += n
            chunk_index += 1
    return paths


def _run_cli(args: list[str]) -> tuple[float, int, str]:
    """Run ``sppjit`` in a child process: (wall seconds, its own peak RSS in bytes, stdout)."""
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "sppjit.cli", *args], stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's rusage, not all children's
        wall = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise RuntimeError(f"sppjit {' '.join(args)} failed: {err.read().decode().strip()}")
        return wall, usage.ru_maxrss * 1024, out.read().decode()


def run_end_to_end(
    scenario: str = BENCH_END_TO_END_SCENARIO, accesses: int = BENCH_END_TO_END_ACCESSES, seed: int = 0,
    workdir: str | None = None, repeat: int = 2
) -> dict:
    """Replay a generated trace from uncompressed Parquet and from Arrow IPC through the
    command line, once with the summary and exit log only and once with the per-access
    results too; rows/s (wall clock of the whole command, start-up included) and peak RSS."""
    import json
    import tempfile

    check_scenarios([scenario], "scenario")
    result = {"scenario": scenario, "accesses": accesses, "seed": seed, "repeat": repeat, "runs": []}
    with tempfile.TemporaryDirectory(dir=workdir, prefix="sppjit-e2e-") as d:
        t = time.perf_counter()
        paths = _write_e2e_traces(d, scenario, accesses, seed)
        result["generate_seconds"] = time.perf_counter() - t
        # Write the traces back to disk now, so the replays are not timed against the
        # write-back of the gigabytes just generated.
        if hasattr(os, "sync"):
            os.sync()
        startup, _, _ = _run_cli(["--version"])
        result["startup_seconds"] = startup
        for fmt in ("arrow", "parquet"):
            for with_results in (False, True):
                args = ["replay", paths[fmt], "--json", "--no-progress",
                        "--summary", os.path.join(d, "summary.json"), "--exits", os.path.join(d, "exits.parquet")]
                if with_results:  # results in the input's format
                    args += ["--out", os.path.join(d, f"results.{fmt}")]
                # Best wall time of `repeat` runs (the machine is shared); the largest RSS.
                runs = [_run_cli(args) for _ in range(repeat)]
                wall = min(r[0] for r in runs)
                rss = max(r[1] for r in runs)
                summary = json.loads(min(runs, key=lambda r: r[0])[2])
                result["runs"].append(
                    {
                        "format": fmt,
                        "outputs": "summary+exits+results" if with_results else "summary+exits",
                        "wall_seconds": wall,
                        "rows_per_second": accesses / wall,
                        "replay_rows_per_second": summary["accesses_per_second"],
                        "peak_rss_bytes": rss,
                    }
                )
    return result


def format_end_to_end(result: dict) -> str:
    rows = [
        f"end to end: {result['accesses']:,} rows of {result['scenario']} (generated in "
        f"{result['generate_seconds']:.1f} s; 'sppjit --version' takes {result['startup_seconds']:.2f} s; "
        f"best wall time of {result['repeat']} runs each, largest RSS)",
        f"{'input':<8} {'outputs':<22} {'wall s':>8} {'rows/s (wall)':>14} {'rows/s (replay)':>16} {'peak RSS':>10}",
    ]
    for r in result["runs"]:
        rows.append(
            f"{r['format']:<8} {r['outputs']:<22} {r['wall_seconds']:>8.2f} {r['rows_per_second'] / 1e6:>12.1f} M "
            f"{r['replay_rows_per_second'] / 1e6:>14.1f} M {r['peak_rss_bytes'] / 2**20:>8.0f} MiB"
        )
    return "\n".join(rows)


# ----------------------------------------------------------------------------- parallel
PARALLEL_ACCESSES = 4_000_000


def _write_trace(scenario, path: str) -> None:
    """The scenario's trace as `sppjit generate` writes it (Parquet, sppjit's writer)."""
    import pyarrow as pa

    from .io.output import TableWriter

    table = pa.table(scenario.columns())
    with TableWriter(path, table.schema) as writer:
        writer.write_batch(table)


def _serial_replays(scenario, trace, configs, batch_size: int) -> tuple[dict, list[dict]]:
    """Wall seconds (total, and the replay loops alone) of replaying the trace once per
    configuration, one after the other, each reading (decoding) it again, as running
    ``sppjit replay`` per configuration does."""
    from .io.trace import open_trace
    from .replay import Replay, discard_exits
    from .vm import VM

    t = time.perf_counter()
    summaries = []
    loops = 0.0
    for config in configs:
        vm = VM(memory=scenario.memory, vcpus=scenario.vcpus, profile=config.profile,
                granularity=config.granularity, subpage_check=config.subpage_check)
        if scenario.protect_gfn.shape[0]:
            vm.protect(scenario.protect_gfn, scenario.protect_access)
        session = Replay(vm, "jit", on_exits=discard_exits)
        loop = time.perf_counter()
        for batch in open_trace(trace, batch_size=batch_size, vcpus=vm.vcpus):
            session.run(batch, keep=False)
        loops += time.perf_counter() - loop
        summaries.append(session.summary())
    return {"total": time.perf_counter() - t, "replay": loops}, summaries


def _sweep_seconds(scenario, trace, configs, batch_size: int, threads: int) -> tuple[dict, list[dict]]:
    """Wall seconds (total, and the pass over the trace alone) of one sweep of the same
    configurations (the trace decoded once)."""
    from .io.protect import AccessMaps
    from .sweep import sweep

    protection = None
    if scenario.protect_gfn.shape[0]:
        protection = AccessMaps(gfn=scenario.protect_gfn, access=scenario.protect_access)
    t = time.perf_counter()
    result = sweep(trace, configs, protection=protection, memory=scenario.memory,
                   vcpus=scenario.vcpus, batch_size=batch_size, threads=threads)
    seconds = {"total": time.perf_counter() - t, "replay": result.document["seconds"]["replay"]}
    return seconds, [result.summaries[c.label] for c in configs]


def machine_parallelism(threads: int, nbytes: int = 1 << 25, repeat: int = 3) -> float:
    """How much faster ``threads`` threads hash ``threads`` buffers than one thread does,
    now: the ceiling this machine gives any GIL-free work at this minute (hashlib releases
    the GIL; on a shared machine the other tenants decide it as much as the cores do)."""
    import hashlib
    import threading

    data = bytes(nbytes)
    best_serial = best_parallel = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(threads):
            hashlib.sha256(data).digest()
        best_serial = min(best_serial, time.perf_counter() - t)
        workers = [threading.Thread(target=lambda: hashlib.sha256(data).digest()) for _ in range(threads)]
        t = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best_parallel = min(best_parallel, time.perf_counter() - t)
    return best_serial / best_parallel


def _sharded_replays(scenario, batch_size: int, repeat: int, threads: int) -> dict:
    """One trace replayed serially and on ``threads`` shards (docs/parallel.md), in memory and
    interleaved, best of ``repeat`` each, as `sppjit replay --summary` runs (exits counted, the
    log dropped); the figures must match (RuntimeError otherwise)."""
    from .io.trace import open_trace
    from .replay import Replay, discard_exits

    cols = scenario.columns()
    best: dict[int, float] = {}
    figures: dict[int, tuple] = {}
    stats = {}
    for _ in range(repeat):
        for t in (1, threads):
            session = Replay(_vm_for(scenario), "jit", on_exits=discard_exits, threads=t)
            for batch in open_trace(cols, batch_size=batch_size):
                session.run(batch, keep=False)
            best[t] = min(best.get(t, float("inf")), session.seconds)
            figures[t] = _figures(session.summary()) + (session.summary()["tlb_flushes"],)
            if session._shards is not None:
                r = session._shards
                stats = {"sharded_pieces": r.parallel_pieces, "segments": r.segments, "barriers": r.barriers}
    if figures[1] != figures[threads]:
        raise RuntimeError(f"{scenario.name}: the sharded replay's figures differ from the serial one's")
    return {"threads": threads, "serial_seconds": best[1], "sharded_seconds": best[threads],
            "speedup": best[1] / best[threads], **stats}


def _figures(summary: dict) -> tuple:
    return (summary["counts"], summary["exits"], summary["pages"])


def run_parallel(scenarios=DEFAULT_SCENARIOS, accesses: int = PARALLEL_ACCESSES, seed: int = 0,
                 batch_size: int = 1 << 20, repeat: int = 3, threads: int | None = None) -> dict:
    """A 3-configuration sweep (page, spp_v4, spp_v12: compare's) against three serial
    replays of the same trace, per scenario, in one run: wall seconds (best of ``repeat``),
    the sweep on 1 thread and on ``threads`` (default: the cores), and their ratios. The
    trace is a Parquet file, as `sppjit generate` writes it, in a temporary directory: each
    serial replay reads and decodes it, the sweep once. Every sweep's figures are checked
    equal to the serial replays' (RuntimeError otherwise)."""
    import tempfile

    from .datasets import scenarios as S
    from .sweep import DEFAULT_CONFIGS

    threads = threads or os.cpu_count() or 1
    configs = list(DEFAULT_CONFIGS)
    result = {
        "sppjit_version": __version__,
        "machine": {"processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "python": platform.python_version()},
        "accesses": accesses, "seed": seed, "batch_size": batch_size, "repeat": repeat,
        "threads": threads, "configs": [c.label for c in configs],
        "compile_seconds": warm_up(), "scenarios": {},
    }
    for name in scenarios:
        sc = S.make(name, accesses, seed)
        serial, one, many = [], [], []
        with tempfile.TemporaryDirectory(prefix="sppjit-parallel-") as d:
            trace = os.path.join(d, "trace.parquet")
            _write_trace(sc, trace)
            for _ in range(repeat):  # interleaved, so that a noisy minute hits all three alike
                serial.append(_serial_replays(sc, trace, configs, batch_size))
                one.append(_sweep_seconds(sc, trace, configs, batch_size, 1))
                many.append(_sweep_seconds(sc, trace, configs, batch_size, threads))
        expect = [_figures(s) for s in serial[0][1]]
        for _seconds, summaries in one + many:
            if [_figures(s) for s in summaries] != expect:
                raise RuntimeError(f"{name}: a sweep's figures differ from the serial replays'")
        entry = {"description": sc.description, "accesses": len(sc)}
        for part in ("replay", "total"):  # the pass over the trace; with set-up and summaries
            serial_s, one_s, many_s = (min(r[0][part] for r in runs) for runs in (serial, one, many))
            entry[part] = {
                "serial_seconds": serial_s,
                "sweep_1_thread_seconds": one_s,
                "sweep_seconds": many_s,
                "sweep_1_thread_speedup": serial_s / one_s,
                "sweep_speedup": serial_s / many_s,
                "replays_per_second": len(configs) * len(sc) / many_s,
            }
        entry["shards"] = _sharded_replays(sc, batch_size, repeat, max(2, threads))
        result["scenarios"][name] = entry
    result["machine_parallelism"] = machine_parallelism(threads)
    return result


def format_parallel(result: dict) -> str:
    rows = [
        f"sppjit {result['sppjit_version']} bench --parallel: {result['accesses']:,} accesses, "
        f"configurations {', '.join(result['configs'])}, sweep on {result['threads']} threads "
        f"({result['machine']['cpus']} cores), best of {result['repeat']}, seed {result['seed']}",
        "replay: the pass over the trace (serial: the three replay loops, each reading and "
        "decoding the Parquet trace); total: with building and protecting the VMs and the "
        "summaries",
        f"machine: {result['threads']} threads hashing ran {result['machine_parallelism']:.2f}x "
        "one thread, in this run (the ceiling)",
        f"{'scenario':<12} {'part':<7} {'serial s':>9} {'sweep1 s':>9} {'sweep s':>9} "
        f"{'x (1 thr)':>10} {'x':>7} {'M acc/s':>9}",
    ]
    for name, entry in result["scenarios"].items():
        for part in ("replay", "total"):
            s = entry[part]
            rows.append(
                f"{name:<12} {part:<7} {s['serial_seconds']:>9.3f} {s['sweep_1_thread_seconds']:>9.3f} "
                f"{s['sweep_seconds']:>9.3f} {s['sweep_1_thread_speedup']:>9.2f}x "
                f"{s['sweep_speedup']:>6.2f}x {s['replays_per_second'] / 1e6:>9.1f}"
            )
    rows.append("one trace on shards (replay --threads N, in memory, the serial replay in the same run):")
    rows.append(f"{'scenario':<12} {'threads':>7} {'serial s':>9} {'sharded s':>10} {'x':>7} "
                f"{'segments':>9} {'barriers':>9}")
    for name, entry in result["scenarios"].items():
        s = entry["shards"]
        rows.append(f"{name:<12} {s['threads']:>7} {s['serial_seconds']:>9.3f} {s['sharded_seconds']:>10.3f} "
                    f"{s['speedup']:>6.2f}x {s.get('segments', 0):>9} {s.get('barriers', 0):>9}")
    return "\n".join(rows)
