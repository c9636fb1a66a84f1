"""``sppjit bench``: the benchmark harness (seeded scenarios, all figures from one run).

Option parsing only: the library calls are sppjit.bench.run_bench and run_end_to_end, the
printers format_bench and format_end_to_end.
"""

from __future__ import annotations

from typing import Annotated

import typer

from sppjit.commands import NoProgressOpt
from sppjit.defaults import (
    BATCH_SIZES,
    BENCH_ACCESSES,
    BENCH_END_TO_END_ACCESSES,
    BENCH_END_TO_END_SCENARIO,
    BENCH_REFERENCE_SAMPLE,
    BENCH_SCENARIOS,
    MAX_BATCH,
)

SCENARIO_NAMES = BENCH_SCENARIOS

HELP = (
    "Measure replay speed on seeded synthetic scenarios.\n\n"
    "For each scenario, in one run: the JIT engine over the whole trace (after compilation, "
    "which is timed separately), the reference engine on a sample of the same trace, and a "
    "numpy pass that only reads the gpa column (the memory-streaming limit), with their "
    "ratios. Accesses per second are per core: the replay is serial."
)
EPILOG = "Example: sppjit bench --accesses 10000000 --scenario hotset --json bench.json"


def bench(
    accesses: Annotated[int | None, typer.Option(
        "--accesses", metavar="N", min=1, show_default=False,
        help=f"Accesses per scenario (default {BENCH_ACCESSES:,}; "
             f"{BENCH_END_TO_END_ACCESSES:,} with --end-to-end; see --parallel).")] = None,
    scenario: Annotated[list[str] | None, typer.Option(
        "--scenario", metavar="NAME",
        help=f"Scenario to run (repeatable): {', '.join(SCENARIO_NAMES)}. Default: all.")] = None,
    reference_sample: Annotated[int, typer.Option(
        "--reference-sample", metavar="N", min=1,
        help="Accesses replayed by the reference engine (it is ~1000x slower).")
    ] = BENCH_REFERENCE_SAMPLE,
    seed: Annotated[int, typer.Option("--seed", metavar="S", min=0, help="Random seed.")] = 0,
    batch_size: Annotated[int, typer.Option(
        "--batch-size", metavar="N", min=1, max=MAX_BATCH,
        help="Rows per replay batch.")] = BATCH_SIZES["jit"],
    json_out: Annotated[str | None, typer.Option(
        "--json", metavar="FILE", help="Also write the figures as JSON.")] = None,
    end_to_end: Annotated[bool, typer.Option(
        "--end-to-end",
        help="Instead: generate a trace (--accesses, default 100M, first --scenario, default "
             f"{BENCH_END_TO_END_SCENARIO}) as uncompressed Parquet and Arrow IPC in a "
             "temporary directory and replay it through the command line, reporting rows/s "
             "and peak RSS; then, on the Arrow trace, what --trace reports.")] = False,
    workdir: Annotated[str | None, typer.Option(
        "--workdir", metavar="DIR", help="Where --end-to-end writes its traces (needs ~50 bytes "
             "per row).")] = None,
    trace: Annotated[str | None, typer.Option(
        "--trace", metavar="FILE",
        help="With --end-to-end: time 'sppjit replay FILE --summary' on this trace instead of "
             "a generated one (VM defaults), against its replay loop plus the interpreter's "
             "start-up, started cold and served by a resident 'sppjit serve', and show where "
             "the wall clock goes.")] = None,
    protect: Annotated[str | None, typer.Option(
        "--protect", metavar="FILE", help="With --end-to-end --trace: the protection to "
             "replay it with.")] = None,
    workloads: Annotated[bool, typer.Option(
        "--workloads",
        help="Instead: the whole call (VM, protection, replay; summary only and with the "
             "results table) against the numpy check on a protected hot set (20M writes) and "
             "guarded (10M writes).")] = False,
    exit_costs: Annotated[bool, typer.Option(
        "--exit-costs",
        help="Instead: the per-access cost of an exit taken on every access (sub-page "
             "violation, page-granular write protect, fault-in) against the same accesses "
             "allowed.")] = False,
    parallel: Annotated[bool, typer.Option(
        "--parallel",
        help="Instead: a 3-configuration sweep (page, spp_v4, spp_v12) against three serial "
             "replays of the same trace (--accesses, default 4M), on 1 thread and on every "
             "core, per scenario.")] = False,
    no_progress: NoProgressOpt = False,
    fleet: Annotated[bool, typer.Option(
        "--fleet",
        help="Instead: a fleet of 4 traces (first --scenario, default guarded; --accesses "
             "each, default 1M) x 3 configurations on a local Dask cluster of 2 workers, "
             "against the same jobs run one after the other (needs sppjit[dask]).")] = False,
) -> None:
    from sppjit.bench import check_scenarios
    from sppjit.commands.progress import Shown, wanted

    shown = Shown(wanted(no_progress))

    names = check_scenarios(scenario or SCENARIO_NAMES, "--scenario")
    if json_out is not None:
        from sppjit.io.output import check_output_path

        check_output_path(json_out, option="--json")

    if fleet or workloads or exit_costs:
        from sppjit import bench as B

        if fleet:
            result = B.run_fleet_bench(names[0] if scenario else B.FLEET_SCENARIO,
                                       accesses=accesses or B.FLEET_ACCESSES, seed=seed)
            typer.echo(B.format_fleet_bench(result))
        elif workloads:
            result = B.run_workloads(seed=seed, batch_size=batch_size)
            typer.echo(B.format_workloads(result))
        else:
            result = B.run_exit_costs(seed=seed, batch_size=batch_size)
            typer.echo(B.format_exit_costs(result))
        if json_out is not None:
            from sppjit.io.output import write_json_atomic

            write_json_atomic(json_out, result)
        return

    if parallel:
        from sppjit.bench import PARALLEL_ACCESSES, format_parallel, run_parallel

        with shown, shown.step("bench: sweeps against serial replays"):
            result = run_parallel(names, accesses=accesses or PARALLEL_ACCESSES, seed=seed,
                                  batch_size=batch_size)
        typer.echo(format_parallel(result))
        if json_out is not None:
            from sppjit.io.output import write_json_atomic

            write_json_atomic(json_out, result)
        return

    if (trace is not None or protect is not None) and not end_to_end:
        from sppjit.errors import InputError

        raise InputError("--trace and --protect go with --end-to-end")
    if protect is not None and trace is None:
        from sppjit.errors import InputError

        raise InputError("--protect needs --trace")
    if end_to_end and trace is not None:
        from sppjit.bench import format_end_to_end_file, run_end_to_end_file

        result = run_end_to_end_file(trace, protect, workdir=workdir)
        typer.echo(format_end_to_end_file(result))
    elif end_to_end:
        from sppjit.bench import format_end_to_end, run_end_to_end

        with shown, shown.step("bench: end to end"):
            result = run_end_to_end(names[0] if scenario else BENCH_END_TO_END_SCENARIO,
                                    accesses or BENCH_END_TO_END_ACCESSES, seed, workdir)
        typer.echo(format_end_to_end(result))
    else:
        from sppjit.bench import format_bench, run_bench

        with shown, shown.step(f"bench: {', '.join(names)}"):
            result = run_bench(names, accesses=accesses or BENCH_ACCESSES,
                               reference_sample=reference_sample, seed=seed,
                               batch_size=batch_size)
        typer.echo(format_bench(result))
    if json_out is not None:
        from sppjit.io.output import write_json_atomic

        write_json_atomic(json_out, result)
