"""``sppjit generate``: write a seeded synthetic scenario as a trace and a protection file."""

from __future__ import annotations

import shlex
import sys
from typing import Annotated

import typer

from sppjit.commands import format_size
from sppjit.defaults import MAX_ACCESSES, SCENARIO_NAMES

# The names of datasets/scenarios.py SCENARIOS, for --help without importing numpy; a test
# checks the two agree.

HELP = (
    f"Write a seeded synthetic trace (and the protection that goes with it).\n\n"
    f"SCENARIO is one of {', '.join(SCENARIO_NAMES)}. The same SCENARIO, --accesses "
    "and --seed give the same trace on every machine. The trace is Parquet (.parquet) "
    "or Arrow IPC (.arrow) by the extension of --out, with the columns gpa, size, "
    "vcpu, kind and seq (the row number); its schema metadata records the scenario, "
    "seed, memory and vCPUs."
)

EPILOG = ("Example: sppjit generate guarded --accesses 100000 --seed 1 --out t.parquet "
          "--protect-out p.parquet")

def _complete_scenario(incomplete: str) -> list[str]:
    return [name for name in SCENARIO_NAMES if name.startswith(incomplete)]


def generate(
    scenario: Annotated[str, typer.Argument(
        metavar="SCENARIO", show_default=False, autocompletion=_complete_scenario,
        help=f"Scenario: {', '.join(SCENARIO_NAMES)}.")],
    accesses: Annotated[int, typer.Option(
        "--accesses", metavar="N", min=1, max=MAX_ACCESSES, show_default=False,
        help="Number of accesses (trace rows).")],
    out: Annotated[str, typer.Option(
        "--out", metavar="TRACE", show_default=False,
        help="Trace to write: .parquet or .arrow.")],
    seed: Annotated[int, typer.Option(
        "--seed", metavar="S", min=0, help="Random seed.")] = 0,
    protect_out: Annotated[str | None, typer.Option(
        "--protect-out", metavar="FILE",
        help="Protection to write (gfn, access): .parquet, .arrow, .csv, .json or "
             ".jsonl.")] = None,
) -> None:
    run_generate(scenario=scenario, accesses=accesses, seed=seed, out=out,
                 protect_out=protect_out)


# The library's parameters as this command's options: its errors name these.
OPTION_NAMES = {"accesses": "--accesses", "out": "--out", "protect_out": "--protect-out"}


def run_generate(*, scenario: str, accesses: int, seed: int, out: str,
                 protect_out: str | None = None) -> str:
    """write_scenario (which checks everything first and writes all-or-nothing), then one
    line saying what was written and how to replay it; returns the line."""
    from sppjit.datasets.generate import write_scenario

    made = write_scenario(scenario, accesses, seed, out, protect_out=protect_out,
                          names=OPTION_NAMES)
    pages = int(len(made.protect_gfn))
    command = ["sppjit", "replay", out]
    if protect_out is not None:
        command += ["--protect", protect_out]
    command += ["--memory", format_size(made.memory), "--vcpus", str(made.vcpus)]
    what = f"wrote {out} ({accesses:,} accesses, scenario {scenario}, seed {seed})"
    if protect_out is not None:
        what += f" and {protect_out} ({pages:,} protected pages)"
    line = f"{what}; replay with: {shlex.join(command)}"
    sys.stdout.write(line + "\n")
    return line
