"""``sppjit inspect``: the VMCS of each vCPU of a saved VM state, and EPT/SPPT walks.

Option parsing only: the library call is sppjit.inspect.inspect_state, the printer
sppjit.inspect.format_report.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from sppjit.commands import parse_address

HELP = (
    "Show a saved VM state: the VMCS of each vCPU and the EPT and SPPT walk of "
    "addresses.\n\n"
    "STATE_FILE is written by sppjit replay --save-state. For every vCPU the VMCS "
    "controls are shown with their EPT and SPP bits named, with EPTP, SPPTP and the "
    "last exit (reason, qualification, guest-physical address). Each --gpa adds the "
    "hardware walk of that address: every EPT entry (address, R/W/X, memory type, "
    "large page, SPP bit) and every SPPT entry, the SPP vector as 32 sub-pages (1 = "
    "writable, sub-page 0 first)."
)

EPILOG = "Example: sppjit inspect state.npz --gpa 0x40001000 --gpa 4096 --vcpu 1"


def inspect(
    state_file: Annotated[str, typer.Argument(
        metavar="STATE_FILE", show_default=False,
        help="VM state saved by sppjit replay --save-state (.npz).")],
    gpa: Annotated[list[str] | None, typer.Option(
        "--gpa", metavar="ADDR", show_default=False,
        help="Guest-physical address to walk, hex (0x...) or decimal; repeatable.")] = None,
    vcpu: Annotated[int | None, typer.Option(
        "--vcpu", metavar="N", min=0, show_default=False,
        help="Show only this vCPU's VMCS and walk its SPPT (default: every VMCS, walks on "
             "vCPU 0).")] = None,
    json_out: Annotated[bool, typer.Option(
        "--json", help="Print JSON instead of text.")] = False,
) -> None:
    addresses = [parse_address(text, "--gpa") for text in (gpa or [])]
    from sppjit.commands.progress import Shown, wanted
    from sppjit.inspect import format_report, inspect_state

    with Shown(wanted(False)):  # the compile note, if its walk kernels compile now
        report = inspect_state(state_file, addresses, vcpu, names={"vcpu": "--vcpu"})
    if json_out:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        sys.stdout.write(format_report(report))
    sys.stdout.flush()
