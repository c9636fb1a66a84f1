"""The benchmark harness behind ``sppjit bench``: seeded scenarios, every figure from one run.

For each scenario it measures, in the same process and back to back: the JIT engine over the
whole trace (after compilation, which is timed separately), the reference engine on a sample
of the same trace, and a plain numpy pass that only reads the ``gpa`` column (the
memory-streaming limit). Ratios are computed from those same measurements, never against
figures from another run.
"""

from __future__ import annotations

import contextlib
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
    # As `sppjit replay --summary` runs: counts only, no exit-log rows (the exit log's
    # writing is output work, measured by --end-to-end).
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
        if sc.protect_gfn.shape[0]:
            result["scenarios"][name].update(whole_call_figures(sc, batch_size, repeat))
    return result


# ----------------------------------------------------------------------------- the numpy check
def numpy_check(scenario):
    """The check a user could write in numpy instead of a replay, as a function of nothing but
    the trace: a dense u32 map per page of the memslot (FULL where unprotected), and for each
    write ``maps[gpa >> 12] >> ((gpa >> 7) & 31) & 1`` (0: the write's first sub-page is
    protected). Returns (check(), the writes' gpas): check() counts the blocked writes."""
    from . import bits as B

    maps = np.full(scenario.memory >> B.PAGE_SHIFT, B.FULL_SPP_ACCESS, dtype=np.uint32)
    maps[scenario.protect_gfn.astype(np.int64)] = scenario.protect_access
    writes = scenario.gpa[scenario.kind == B.ACCESS_WRITE]

    def check() -> int:
        bits = (maps[writes >> np.uint64(B.PAGE_SHIFT)] >> ((writes >> np.uint64(B.SUBPAGE_SHIFT)) & np.uint64(31))
                ) & np.uint64(1)
        return int(writes.shape[0] - np.count_nonzero(bits))

    return check, writes


def _best(fn, repeat: int) -> tuple[float, object]:
    best, value = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - t)
    return best, value


def whole_call_figures(scenario, batch_size: int = BATCH_SIZES["jit"], repeat: int = 3) -> dict:
    """What a user's whole call costs on a protected scenario, against the numpy check measured
    in the same run (best of ``repeat`` each, one thread: the replay is serial): building the
    VM, placing the protection and replaying, with a summary only (counts only, no result
    columns kept) and through ``vm.replay`` returning the results table. The numpy check
    covers the writes only and includes nothing but the check; the replay covers every row."""
    from .io.trace import open_trace
    from .replay import Replay, discard_exits
    from .vm import VM

    check, writes = numpy_check(scenario)
    np_s, np_blocked = _best(check, repeat)
    cols = scenario.columns()

    def vm():
        v = VM(memory=scenario.memory, vcpus=scenario.vcpus)
        v.protect(scenario.protect_gfn, scenario.protect_access)
        return v

    def summary_only():
        session = Replay(vm(), "jit", on_exits=discard_exits)
        for batch in open_trace(cols, batch_size=batch_size):
            session.run(batch, keep=False)
        return session.summary()

    def results_table():
        return vm().replay(cols, batch_size=batch_size).summary

    summary_s, summary = _best(summary_only, repeat)
    table_s, _ = _best(results_table, repeat)
    protect_s, _ = _best(vm, repeat)
    np_rate = writes.shape[0] / np_s
    return {
        "numpy_check_per_second": np_rate,
        "whole_summary_per_second": len(scenario) / summary_s,
        "whole_table_per_second": len(scenario) / table_s,
        "whole_summary_over_numpy_check": len(scenario) / summary_s / np_rate,
        "whole_table_over_numpy_check": len(scenario) / table_s / np_rate,
        "vm_and_protect_seconds": protect_s,
        "protected_pages": int(scenario.protect_gfn.shape[0]),
        "blocked_writes": summary["counts"]["spp_violation"],
        "numpy_blocked_writes": np_blocked,
    }


def format_bench(result: dict) -> str:
    rows = [
        f"sppjit {result['sppjit_version']} bench: {result['accesses']:,} accesses per scenario, "
        f"reference on {result['reference_sample']:,}, seed {result['seed']}, jit best of {result['repeat']}, "
        f"compile/cache load {result['compile_seconds']:.2f} s",
        f"{'scenario':<12} {'jit M/s':>9} {'ref K/s':>9} {'numpy M/s':>10} {'jit/ref':>9} "
        f"{'jit/numpy':>10} {'exits':>10}",
    ]
    for name, s in result["scenarios"].items():
        rows.append(
            f"{name:<12} {s['jit_accesses_per_second'] / 1e6:>9.1f} "
            f"{s['reference_accesses_per_second'] / 1e3:>9.1f} "
            f"{s['numpy_stream_per_second'] / 1e6:>10.0f} {s['jit_over_reference']:>9.0f}x "
            f"{s['jit_over_numpy_stream']:>10.3f} {s['exits']:>10,}"
        )
    protected = {n: s for n, s in result["scenarios"].items() if "numpy_check_per_second" in s}
    if protected:
        rows.append(WHOLE_CALL_HEADER)
        rows += [format_whole_call(n, s) for n, s in protected.items()]
    return "\n".join(rows)


WHOLE_CALL_HEADER = (
    "whole call (VM + protect + replay, 1 thread) against the numpy check "
    "maps[gpa >> 12] >> ((gpa >> 7) & 31) & 1 on the writes, same run:\n"
    f"{'scenario':<16} {'numpy M/s':>10} {'summary M/s':>12} {'x numpy':>8} {'table M/s':>10} {'x numpy':>8} "
    f"{'setup ms':>9} {'pages':>8}")


def format_whole_call(name: str, s: dict) -> str:
    return (f"{name:<16} {s['numpy_check_per_second'] / 1e6:>10.1f} {s['whole_summary_per_second'] / 1e6:>12.1f} "
            f"{s['whole_summary_over_numpy_check']:>7.2f}x {s['whole_table_per_second'] / 1e6:>10.1f} "
            f"{s['whole_table_over_numpy_check']:>7.2f}x {s['vm_and_protect_seconds'] * 1e3:>9.1f} "
            f"{s['protected_pages']:>8,}")


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


# The command as _run_cli's child runs it: sppjit's main, then the child's own peak RSS
# written to the file named first (wait4's rusage would count this process's resident set
# too: sppjit.rss). Imports nothing before main that the command does not import itself.
_CLI_CHILD = """\
import atexit, sys
def _peak():
    from sppjit.rss import own_peak_rss
    with open(sys.argv[1], "w") as f:
        f.write(str(own_peak_rss()))
atexit.register(_peak)
from sppjit.cli import main
main(sys.argv[2:])
"""


def _run_cli(args: list[str]) -> tuple[float, int, str]:
    """Run ``sppjit`` in a child process: (wall seconds, its own peak RSS in bytes, stdout)."""
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.TemporaryDirectory(prefix="sppjit-peak-") as d:
        peak = os.path.join(d, "peak")
        t = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", _CLI_CHILD, peak, *args], stdout=out, stderr=err)
        _, status, _ = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise RuntimeError(f"sppjit {' '.join(args)} failed: {err.read().decode().strip()}")
        with open(peak) as f:
            return wall, int(f.read()), out.read().decode()


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
    if workdir is not None:  # created when missing, as --plot and --stats are
        try:
            os.makedirs(workdir, exist_ok=True)
        except OSError as exc:
            raise InputError(f"--workdir: cannot create {workdir}: {exc.strerror or exc}") from None
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
        # The target's measure on the Arrow trace: `sppjit replay --summary`, started cold
        # and served by a resident process, against the replay loop plus the interpreter.
        result["summary_only"] = run_end_to_end_file(paths["arrow"], repeat=repeat, workdir=d)
    return result


E2E_TARGET = 1.3  # wall clock of `sppjit replay --summary` / (replay loop + interpreter start-up)


def _interpreter_seconds(repeat: int) -> float:
    """Best wall seconds of the bare interpreter (``python -c pass``) in a child process."""
    import subprocess
    import sys

    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        best = min(best, time.perf_counter() - t)
    return best


# Run in a fresh interpreter (the first thing it does is import): the phases of a replay of
# the given trace measured one after the other, each alone, with the library's own calls.
_PHASES = """
import json, sys, time
t0 = time.perf_counter()
import sppjit.job, sppjit.vm, sppjit.io.trace, sppjit.replay, sppjit.io.output
t1 = time.perf_counter()
from sppjit.bench import e2e_phases
print(json.dumps(e2e_phases(json.loads(sys.argv[1]), imports=t1 - t0)))
"""


def e2e_phases(args: dict, imports: float) -> dict:
    """Seconds of each phase of ``sppjit replay`` (importing, loading the cached kernels,
    reading and checking the trace alone, digesting it alone, the replay loop), measured one
    at a time in this process: where the wall clock of the command goes."""
    from .io.trace import open_trace
    from .job import Job, JobInputs, JobOutputs, VmSpec, run
    from .provenance import default_algorithm, file_digest

    trace, protect = args["trace"], args.get("protect")
    out = {"imports": imports}
    t = time.perf_counter()
    from .vm import VM

    VM(memory="2MiB").replay({"gpa": np.zeros(1, dtype=np.uint64)})  # loads the kernels
    out["kernel_cache_load"] = time.perf_counter() - t
    t = time.perf_counter()
    rows = sum(len(b) for b in open_trace(trace))
    out["read_and_check"] = time.perf_counter() - t
    t = time.perf_counter()
    file_digest(trace)
    out["digest"] = time.perf_counter() - t
    out["digest_algorithm"] = default_algorithm()
    t = time.perf_counter()
    result = run(Job(inputs=JobInputs(trace=trace, protection=protect), vm=VmSpec(**args.get("vm", {})),
                     outputs=JobOutputs()))
    out["job"] = time.perf_counter() - t
    out["replay_loop"] = result.summary.seconds
    out["rows"] = rows
    return out


@contextlib.contextmanager
def _resident_server():
    """A ``sppjit serve`` child listening on a socket of its own, ready (its kernels loaded)
    when this yields the socket's path; stopped after."""
    import subprocess
    import sys
    import tempfile

    from . import resident

    # A short directory of its own: a Unix socket's path has a ~100-byte limit.
    with tempfile.TemporaryDirectory(prefix="sppjit-serve-") as d:
        path = os.path.join(d, "serve.sock")
        proc = subprocess.Popen([sys.executable, "-m", "sppjit", "serve", "--socket", path],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            line = proc.stdout.readline()  # the ready line, once the server listens
            if "serving at" not in line:
                proc.kill()
                raise RuntimeError(f"sppjit serve did not start: {proc.stderr.read().strip()[-400:]}")
            yield path
        finally:
            if proc.poll() is None:
                resident.stop(path)
            proc.wait()


def _run_served(args: list[str], socket_path: str) -> float:
    """Wall seconds of ``sppjit ARGS`` started as a user starts it, with SPPJIT_SERVER set."""
    import subprocess
    import sys

    from . import resident

    env = {**os.environ, resident.ENV_SERVER: socket_path}
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "sppjit", *args], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0 or resident.RUNNING_HERE in proc.stderr:
        raise RuntimeError(f"the served sppjit {' '.join(args)} failed: {proc.stderr.strip()[-400:]}")
    return wall


def run_end_to_end_file(trace: str, protect: str | None = None, *, repeat: int = 2,
                        workdir: str | None = None, extra_args: list[str] | None = None) -> dict:
    """``sppjit replay TRACE [--protect FILE] --summary S`` of a trace the user gives, in a
    child process: its wall clock against the replay loop plus the interpreter's start-up
    (the target: within E2E_TARGET of it), peak RSS, and where the wall goes (each phase
    measured alone in another child: imports, kernel cache load, reading, digest, replay)."""
    import json
    import subprocess
    import sys
    import tempfile

    for path, option in ((trace, "TRACE"), (protect, "--protect")):
        if path is not None and not os.path.exists(path):
            raise InputError(f"{option}: no such file: {path}")
    extra_args = list(extra_args or [])
    result = {"trace": trace, "protect": protect, "repeat": repeat,
              "trace_bytes": _size_of(trace), "target": E2E_TARGET}
    with tempfile.TemporaryDirectory(dir=workdir, prefix="sppjit-e2e-") as d:
        summary_path = os.path.join(d, "summary.json")
        args = ["replay", trace, "--no-progress", "--summary", summary_path, *extra_args]
        if protect is not None:
            args += ["--protect", protect]
        runs = []
        for _ in range(repeat):
            try:
                wall, rss, _ = _run_cli(args)
            except RuntimeError as exc:  # the user's trace or protection is refused
                said = str(exc).splitlines()[-1].rpartition("sppjit: error: ")[2]
                raise InputError(f"--trace: sppjit replay refused it: {said}") from None
            with open(summary_path, encoding="utf-8") as f:
                summary = json.load(f)
            runs.append((wall, rss, summary))
        # The same command again, run by a resident server (sppjit serve): what it pays
        # without the imports and the kernels' load.
        served = []
        with _resident_server() as socket_path:
            for _ in range(repeat + 1):  # the first warms the server's memory, as the cold runs do the page cache
                served_wall = _run_served(args, socket_path)
                with open(summary_path, encoding="utf-8") as f:
                    served.append((served_wall, json.load(f)["seconds"]))
        served = served[1:]
    wall, _, summary = min(runs, key=lambda r: r[0])
    interpreter = _interpreter_seconds(max(repeat, 3))
    startup, _, _ = _run_cli(["--version"])
    rows = summary["counts"]["accesses"]
    loop = summary["seconds"]
    result.update({
        "rows": rows,
        "wall_seconds": wall,
        "replay_loop_seconds": loop,
        "interpreter_seconds": interpreter,
        "cli_version_seconds": startup,
        "wall_over_loop_and_interpreter": wall / (loop + interpreter),
        "rows_per_second": rows / wall,
        "replay_rows_per_second": rows / loop if loop else None,
        "peak_rss_bytes": max(r[1] for r in runs),
        "digests": summary.get("provenance", {}).get("digests", {}),
    })
    served_wall, served_loop = min(served)
    result["served"] = {
        "wall_seconds": served_wall,
        "replay_loop_seconds": served_loop,
        "wall_over_loop_and_interpreter": served_wall / (served_loop + interpreter),
        "rows_per_second": rows / served_wall,
    }
    phase_args = {"trace": trace, "protect": protect}
    proc = subprocess.run([sys.executable, "-c", _PHASES, json.dumps(phase_args)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the phase measurement failed: {proc.stderr.strip()[-400:]}")
    result["phases"] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _size_of(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)
    return os.path.getsize(path)


def format_end_to_end_file(result: dict) -> str:
    r, ph, sv = result, result["phases"], result["served"]
    verdict = "within" if r["wall_over_loop_and_interpreter"] <= r["target"] else "beyond"
    served_verdict = "within" if sv["wall_over_loop_and_interpreter"] <= r["target"] else "beyond"
    rows = [
        f"end to end: sppjit replay {r['trace']}"
        + (f" --protect {r['protect']}" if r["protect"] else "")
        + f" --summary: {r['rows']:,} rows, {r['trace_bytes'] / 1e6:,.0f} MB (best wall of {r['repeat']})",
        f"wall {r['wall_seconds']:.2f} s ({r['rows_per_second'] / 1e6:.1f} M rows/s), replay loop "
        f"{r['replay_loop_seconds']:.2f} s, interpreter start-up {r['interpreter_seconds']:.3f} s "
        f"('sppjit --version' {r['cli_version_seconds']:.2f} s), peak RSS "
        f"{r['peak_rss_bytes'] / 2**20:.0f} MiB",
        f"wall / (replay loop + interpreter) = {r['wall_over_loop_and_interpreter']:.2f} "
        f"({verdict} the {r['target']}x target, started cold)",
        f"served by a resident 'sppjit serve' (SPPJIT_SERVER set): wall {sv['wall_seconds']:.2f} s "
        f"({sv['rows_per_second'] / 1e6:.1f} M rows/s), replay loop {sv['replay_loop_seconds']:.2f} s, "
        f"wall / (replay loop + interpreter) = {sv['wall_over_loop_and_interpreter']:.2f} ({served_verdict} the "
        f"{r['target']}x target)",
        "where the wall goes (each phase alone, in one fresh process): "
        f"imports {ph['imports']:.2f} s, kernel cache load {ph['kernel_cache_load']:.2f} s, "
        f"read and check {ph['read_and_check']:.2f} s, digest ({ph['digest_algorithm']}, on its "
        f"own thread in a replay) {ph['digest']:.2f} s, whole job {ph['job']:.2f} s of which "
        f"replay loop {ph['replay_loop']:.2f} s",
    ]
    return "\n".join(rows)


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
    if "summary_only" in result:
        rows.append(format_end_to_end_file(result["summary_only"]))
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
    interleaved, best of ``repeat`` each, two ways: as `sppjit replay --summary` runs (exits
    counted, the log dropped), and as ``vm.replay`` does (every result column and the exit
    log kept). The figures, and the tables of the second, must match (RuntimeError
    otherwise)."""
    import pyarrow as pa

    from .io.trace import open_trace
    from .replay import Replay, discard_exits

    cols = scenario.columns()
    best: dict[tuple, float] = {}
    figures: dict[int, tuple] = {}
    tables: dict[int, tuple] = {}
    stats = {}
    for _ in range(repeat):
        for t in (1, threads):
            session = Replay(_vm_for(scenario), "jit", on_exits=discard_exits, threads=t)
            for batch in open_trace(cols, batch_size=batch_size):
                session.run(batch, keep=False)
            best[t, "counts"] = min(best.get((t, "counts"), float("inf")), session.seconds)
            figures[t] = _figures(session.summary()) + (session.summary()["tlb_flushes"],)
            if session._shards is not None:
                r = session._shards
                stats = {"sharded_pieces": r.parallel_pieces, "hot_pieces": r.hot_pieces, "segments": r.segments,
                         "barriers": r.barriers}
            session = Replay(_vm_for(scenario), "jit", threads=t)
            results = [session.run(batch) for batch in open_trace(cols, batch_size=batch_size)]
            tables[t] = (pa.Table.from_batches(results), session.exit_table())
            best[t, "table"] = min(best.get((t, "table"), float("inf")), session.seconds)
    if figures[1] != figures[threads]:
        raise RuntimeError(f"{scenario.name}: the sharded replay's figures differ from the serial one's")
    if not all(a.equals(b) for a, b in zip(tables[1], tables[threads])):
        raise RuntimeError(f"{scenario.name}: the sharded replay's results or exit log differ from the serial one's")
    return {"threads": threads, "serial_seconds": best[1, "counts"], "sharded_seconds": best[threads, "counts"],
            "speedup": best[1, "counts"] / best[threads, "counts"],
            "table_serial_seconds": best[1, "table"], "table_sharded_seconds": best[threads, "table"],
            "table_speedup": best[1, "table"] / best[threads, "table"], **stats}


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
    rows.append("one trace on shards (replay --threads N, in memory, the serial replay in the same run): "
                "counts only, as 'replay --summary'; table: every result column and the exit log kept, "
                "as vm.replay")
    rows.append(f"{'scenario':<12} {'threads':>7} {'serial s':>9} {'sharded s':>10} {'x':>7} "
                f"{'x table':>8} {'segments':>9} {'barriers':>9} {'hot':>4}")
    for name, entry in result["scenarios"].items():
        s = entry["shards"]
        rows.append(f"{name:<12} {s['threads']:>7} {s['serial_seconds']:>9.3f} {s['sharded_seconds']:>10.3f} "
                    f"{s['speedup']:>6.2f}x {s['table_speedup']:>7.2f}x {s.get('segments', 0):>9} "
                    f"{s.get('barriers', 0):>9} "
                    f"{s.get('hot_pieces', 0):>4}")
    return "\n".join(rows)


# ----------------------------------------------------------------------------- fleet
FLEET_ACCESSES = 1_000_000
FLEET_TRACES = 4
FLEET_WORKERS = 2
FLEET_SCENARIO = "guarded"


def _fleet_manifest(directory: str, scenario: str, accesses: int, seed: int, traces: int) -> dict:
    """``traces`` seeded traces of ``scenario`` and their protections (Parquet files in
    ``directory``), crossed with compare's three configurations: a fleet manifest."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .datasets import scenarios as S
    from .sweep import DEFAULT_CONFIGS

    entries = []
    for i in range(traces):
        sc = S.make(scenario, accesses, seed + i)
        trace = os.path.join(directory, f"{scenario}-{i}.parquet")
        _write_trace(sc, trace)
        entry = {"trace": trace}
        if sc.protect_gfn.shape[0]:
            entry["protect"] = os.path.join(directory, f"{scenario}-{i}.protect.parquet")
            pq.write_table(pa.table({"gfn": sc.protect_gfn, "access": sc.protect_access}),
                           entry["protect"])
        entries.append(entry)
    return {"traces": entries, "configs": [c.as_dict() for c in DEFAULT_CONFIGS],
            "memory": sc.memory, "vcpus": sc.vcpus}


def _plain_part() -> None:
    """A child of _plain_processes: warm up, read its jobs (a JSON list), say ready, wait
    for the go line, run them one after the other, print the seconds."""
    import json
    import sys

    from . import fleet as F
    from . import job as J

    F.warm_worker()
    jobs = [J.Job.from_dict(j) for j in json.loads(sys.stdin.readline())]
    print("ready", flush=True)
    sys.stdin.readline()
    t = time.perf_counter()
    for job in jobs:
        J.run(job)
    print(time.perf_counter() - t, flush=True)


def _plain_processes(tasks, workers: int) -> float:
    """Wall seconds of the jobs shared out over ``workers`` plain processes (a job in k
    goes to process k mod workers), no Dask: what the machine gives that many processes,
    now."""
    import json
    import subprocess
    import sys

    children = [subprocess.Popen([sys.executable, "-c", "from sppjit.bench import _plain_part; "
                                  "_plain_part()"], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True) for _ in range(workers)]
    try:
        for k, child in enumerate(children):
            child.stdin.write(json.dumps([t.job.to_dict() for t in tasks[k::workers]]) + "\n")
            child.stdin.flush()
        for child in children:
            if child.stdout.readline().strip() != "ready":
                raise RuntimeError("a plain worker process failed to start")
        t = time.perf_counter()
        for child in children:
            child.stdin.write("\n")
            child.stdin.flush()
        for child in children:
            child.stdout.readline()
        return time.perf_counter() - t
    finally:
        for child in children:
            child.stdin.close()
            child.wait()


def run_fleet_bench(scenario: str = FLEET_SCENARIO, accesses: int = FLEET_ACCESSES,
                    seed: int = 0, traces: int = FLEET_TRACES, workers: int = FLEET_WORKERS,
                    repeat: int = 3) -> dict:
    """A fleet of ``traces`` traces x compare's three configurations on a LocalCluster of
    ``workers`` processes against the same jobs run one after the other here (sppjit.job.run:
    the serial sum), in one run: the fleet's wall clock (best of ``repeat``, on a started
    cluster), its ratio to the ideal (serial sum / workers), and where the rest goes: the
    cluster's start, each worker's warm-up (numba's cache load) and the scheduling between
    jobs (the wall clock less the busiest worker's jobs). The fleet's rows are checked equal
    to the serial jobs' (RuntimeError otherwise)."""
    import tempfile

    from . import fleet as F
    from . import job as J
    from .sweep import TIMING_COLUMNS

    check_scenarios([scenario], "scenario")
    distributed = F._dask()

    def timeless(rows):
        return [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in rows]

    result = {"sppjit_version": __version__,
              "machine": {"processor": platform.processor() or platform.machine(),
                          "cpus": os.cpu_count(), "python": platform.python_version()},
              "scenario": scenario, "accesses": accesses, "seed": seed, "traces": traces,
              "workers": workers, "repeat": repeat, "compile_seconds": warm_up()}
    with tempfile.TemporaryDirectory(prefix="sppjit-fleet-") as d:
        manifest = _fleet_manifest(d, scenario, accesses, seed, traces)
        tasks = F.plan(manifest)
        result["jobs"] = len(tasks)
        t = time.perf_counter()
        with F.local_cluster(workers) as cluster, distributed.Client(cluster) as client:
            result["cluster_start_seconds"] = time.perf_counter() - t
            t = time.perf_counter()
            warm = client.run(F.warm_worker)  # every worker at once, as a fleet's first jobs
            result["warm_seconds"] = time.perf_counter() - t
            result["worker_warm_seconds"] = sorted(warm.values())
            # The fleet's own tasks (each trace's jobs together), run one after another here.
            per_task = F.default_jobs_per_task(len(tasks), workers)
            groups = [[tasks[i].job for i in part] for part in F.task_groups(tasks, per_task)]
            serial, grouped, runs, apart, plain = [], [], [], [], []
            for _ in range(repeat):  # interleaved, so that a noisy minute hits all alike
                plain.append(_plain_processes(tasks, workers))
                t = time.perf_counter()
                rows = [F.fleet_row(task, J.run(task.job).summary.to_dict()) for task in tasks]
                serial.append((time.perf_counter() - t, rows))
                t = time.perf_counter()
                for jobs in groups:
                    J.run_many(jobs)
                grouped.append(time.perf_counter() - t)
                t = time.perf_counter()
                run = F.fleet(manifest, scheduler=client)
                runs.append((time.perf_counter() - t, run))
                t = time.perf_counter()
                run = F.fleet(manifest, scheduler=client, jobs_per_task=1)
                apart.append((time.perf_counter() - t, run))
    expect = timeless(serial[0][1])
    for _seconds, run in runs + apart:
        if timeless(run.table.to_pylist()) != expect or run.errors:
            raise RuntimeError("a fleet's rows differ from the serial jobs'")
    serial_s = min(s for s, _ in serial)
    fleet_s, best = min(runs, key=lambda r: r[0])
    apart_s = min(s for s, _ in apart)
    busy: dict = {}
    for task in best.document["tasks"]:
        busy[task["pid"]] = busy.get(task["pid"], 0.0) + task["seconds"]
    ideal = serial_s / workers
    result.update({
        "serial_seconds": serial_s, "ideal_seconds": ideal, "fleet_seconds": fleet_s,
        "fleet_over_ideal": fleet_s / ideal, "speedup": serial_s / fleet_s,
        "jobs_per_task": per_task,
        # the fleet's tasks (a trace's jobs together, reading it once) one after another here
        "serial_grouped_seconds": min(grouped),
        "fleet_over_grouped_ideal": fleet_s / (min(grouped) / workers),
        # the same fleet with a task per job: each job reads its trace
        "fleet_apart_seconds": apart_s, "fleet_apart_over_ideal": apart_s / ideal,
        "worker_busy_seconds": sorted(busy.values()),
        # the workers' jobs against the same jobs here: above 1, the cores gave less than
        # one job each (other tenants, two vCPUs sharing a core), not Dask
        "job_slowdown": sum(busy.values()) / serial_s,
        # the wall clock no worker spent in a job: submitting, scheduling, gathering, idling
        "scheduling_seconds": fleet_s - max(busy.values()),
        "with_start_over_ideal": (result["cluster_start_seconds"] + result["warm_seconds"]
                                  + fleet_s) / ideal,
        "machine_parallelism": machine_parallelism(workers),
        # the same jobs over as many plain processes, no Dask: the machine's own ceiling
        "plain_processes_seconds": min(plain),
        "fleet_over_plain_processes": fleet_s / min(plain),
    })
    return result


def format_fleet_bench(result: dict) -> str:
    busy = ", ".join(f"{s:.2f}" for s in result["worker_busy_seconds"])
    warm = ", ".join(f"{s:.2f}" for s in result["worker_warm_seconds"])
    return "\n".join([
        f"sppjit {result['sppjit_version']} bench --fleet: {result['traces']} traces of "
        f"{result['scenario']} x 3 configurations ({result['jobs']} jobs, "
        f"{result['accesses']:,} accesses each, seed {result['seed']}) on a LocalCluster of "
        f"{result['workers']} workers ({result['machine']['cpus']} cores), best of "
        f"{result['repeat']}",
        f"serial sum        {result['serial_seconds']:8.2f} s  (the jobs one after the other, here)",
        f"ideal             {result['ideal_seconds']:8.2f} s  (serial sum / {result['workers']})",
        f"fleet             {result['fleet_seconds']:8.2f} s  {result['fleet_over_ideal']:.2f}x the "
        f"ideal, {result['speedup']:.2f}x the serial sum ({result['jobs_per_task']} jobs of a "
        "trace a task)",
        f"  its tasks here  {result['serial_grouped_seconds']:8.2f} s  (one after the other: the "
        f"fleet takes {result['fleet_over_grouped_ideal']:.2f}x their sum / {result['workers']})",
        f"a task per job    {result['fleet_apart_seconds']:8.2f} s  "
        f"{result['fleet_apart_over_ideal']:.2f}x the ideal",
        f"  workers busy    {busy} s ({result['job_slowdown']:.2f}x the serial sum); scheduling "
        f"and gathering {result['scheduling_seconds']:.2f} s",
        f"cluster start     {result['cluster_start_seconds']:8.2f} s; warm-up {result['warm_seconds']:.2f} s "
        f"(per worker {warm} s); with both: {result['with_start_over_ideal']:.2f}x the ideal",
        f"plain processes   {result['plain_processes_seconds']:8.2f} s  (the jobs over "
        f"{result['workers']} processes, no Dask): the fleet takes "
        f"{result['fleet_over_plain_processes']:.2f}x that",
        f"machine: {result['workers']} threads hashing ran {result['machine_parallelism']:.2f}x "
        "one thread, in this run",
    ])

# ----------------------------------------------------------------------------- the workloads
WORKLOADS = {"protected-hotset": 20_000_000, "guarded": 10_000_000}


def protected_hotset(accesses: int, seed: int = 0, pages: int = 4096, share: float = 0.3):
    """8-byte writes over a hot set of ``pages`` pages (at 1 GiB in a 4 GiB guest), ``share``
    of them protected with random maps (about half their sub-pages each: ~15% of the writes
    are blocked)."""
    from . import bits as B
    from .datasets import scenarios as S

    rng = np.random.default_rng(seed)
    base = (1 << 30) >> B.PAGE_SHIFT
    prot = np.sort(rng.choice(pages, int(pages * share), replace=False)).astype(np.uint64) + np.uint64(base)
    access = rng.integers(0, 1 << 32, prot.shape[0], dtype=np.uint64).astype(np.uint32)
    gpa = (np.uint64(base << B.PAGE_SHIFT)
           + rng.integers(0, pages * B.PAGE_SIZE // 8, accesses, dtype=np.uint64) * np.uint64(8))
    return S.Scenario("protected-hotset", gpa=gpa, size=np.full(accesses, 8, np.uint16),
                      vcpu=np.zeros(accesses, np.uint16), kind=np.full(accesses, B.ACCESS_WRITE, np.uint8),
                      memory=4 << 30, protect_gfn=prot, protect_access=access,
                      description=f"8-byte writes over {pages} hot pages, {share:.0%} protected by random maps")


def run_workloads(scale: float = 1.0, seed: int = 0, batch_size: int = BATCH_SIZES["jit"], repeat: int = 3) -> dict:
    """The two workloads of the whole-call comparison (a protected hot set, 20 M writes;
    ``guarded``, 10 M writes; ``scale`` shrinks them for tests) through whole_call_figures."""
    from .datasets import scenarios as S

    warm_up()
    result = {"sppjit_version": __version__, "seed": seed, "repeat": repeat, "batch_size": batch_size,
              "threads": 1, "workloads": {}}
    for name, accesses in WORKLOADS.items():
        n = max(1, int(accesses * scale))
        sc = protected_hotset(n, seed) if name == "protected-hotset" else S.make(name, n, seed)
        result["workloads"][name] = dict(whole_call_figures(sc, batch_size, repeat), accesses=n)
    return result


def format_workloads(result: dict) -> str:
    rows = [f"sppjit {result['sppjit_version']} bench --workloads (best of {result['repeat']}, seed "
            f"{result['seed']})", WHOLE_CALL_HEADER]
    rows += [format_whole_call(f"{n} {w['accesses'] / 1e6:.0f}M", w) for n, w in result["workloads"].items()]
    return "\n".join(rows)


# ----------------------------------------------------------------------------- exit costs
EXIT_COST_PAGES = 1 << 18


def _exit_cost_trace(pages: int, seed: int):
    """One write to each of ``pages`` pages in a random order (none the first of its 2 MiB
    region), and the writes to those first pages that map the regions' tables."""
    from . import bits as B

    rng = np.random.default_rng(seed)
    regions = -(-pages // (B.PAGES_PER_2M - 1))
    firsts = np.arange(regions, dtype=np.uint64) * np.uint64(B.PAGES_PER_2M)
    gfns = rng.permutation(np.setdiff1d(np.arange(regions * B.PAGES_PER_2M, dtype=np.uint64), firsts))[:pages]
    gpa = (gfns << np.uint64(B.PAGE_SHIFT)) | (rng.integers(0, 512, gfns.shape[0], dtype=np.uint64) << np.uint64(3))
    write = np.uint8(B.ACCESS_WRITE)
    trace = {"gpa": gpa, "size": np.full(pages, 8, np.uint16), "kind": np.full(pages, write)}
    warm = {"gpa": firsts << np.uint64(B.PAGE_SHIFT), "size": np.full(regions, 8, np.uint16),
            "kind": np.full(regions, write)}
    return gfns, trace, warm, regions * B.PAGES_PER_2M * B.PAGE_SIZE


def _replay_counts(vm, columns, batch_size: int) -> tuple[float, dict]:
    from .io.trace import open_trace
    from .replay import Replay, discard_exits

    session = Replay(vm, "jit", on_exits=discard_exits)
    for batch in open_trace(columns, batch_size=batch_size):
        session.run(batch, keep=False)
    return session.seconds, session.summary()["exits"]


def _exit_cost_case(kind: str, pages: int, seed: int, batch_size: int, repeat: int) -> dict:
    """Seconds of a replay where every access takes a ``kind`` exit, and of the same replay
    with every access allowed (same trace, memory and granularity, SPP on), best of
    ``repeat``; the regions' level-1 tables exist in both (mapped by a first pass)."""
    from .vm import VM

    gfns, trace, warm, memory = _exit_cost_trace(pages, seed)
    granularity = "page" if kind == "write_protect" else "spp"

    def prepared(protect: bool, fault_in: bool):
        vm = VM(memory=memory, granularity=granularity)
        vm.init_spp()
        if protect:
            vm.protect(gfns, np.zeros(gfns.shape[0], np.uint32))
        _replay_counts(vm, warm, batch_size)
        if fault_in:
            _replay_counts(vm, trace, batch_size)
        return vm

    allowed_vm = prepared(False, True)
    allowed = min(_replay_counts(allowed_vm, trace, batch_size)[0] for _ in range(repeat))
    if kind == "ept_fault":  # a fault-in changes the state: a fresh VM per pass
        runs = [_replay_counts(prepared(False, False), trace, batch_size) for _ in range(repeat)]
    else:  # a refused write changes nothing: passes over one VM
        vm = prepared(True, True)
        runs = [_replay_counts(vm, trace, batch_size) for _ in range(repeat)]
    seconds = min(r[0] for r in runs)
    exits = runs[0][1]
    return {"exit_ns": seconds / pages * 1e9, "allowed_ns": allowed / pages * 1e9, "ratio": seconds / allowed,
            "exits": exits["total"], "exits_of_kind": exits[kind]}


EXIT_COST_KINDS = ("spp_violation", "write_protect", "ept_fault")


def run_exit_costs(pages: int = EXIT_COST_PAGES, seed: int = 0, batch_size: int = BATCH_SIZES["jit"],
                   repeat: int = 3) -> dict:
    """Per-access cost of an exit taken on every access, against the same accesses allowed
    (same trace, same memory, same granularity), best of ``repeat`` fresh VMs each: a
    sub-page violation (v4, SPP), a page-granular write-protect exit, a fault-in."""
    warm_up()
    result = {"sppjit_version": __version__, "pages": pages, "seed": seed, "repeat": repeat, "kinds": {}}
    for kind in EXIT_COST_KINDS:
        result["kinds"][kind] = _exit_cost_case(kind, pages, seed, batch_size, repeat)
    return result


def format_exit_costs(result: dict) -> str:
    rows = [f"sppjit {result['sppjit_version']} bench --exit-costs: one write to each of {result['pages']:,} "
            f"pages (random order), best of {result['repeat']}",
            f"{'exit':<14} {'ns/access':>10} {'allowed ns':>11} {'ratio':>7} {'exits':>9}"]
    for kind, k in result["kinds"].items():
        rows.append(f"{kind:<14} {k['exit_ns']:>10.1f} {k['allowed_ns']:>11.1f} {k['ratio']:>6.2f}x "
                    f"{k['exits_of_kind']:>9,}")
    return "\n".join(rows)
