"""``sppjit compare``: replay one trace under page-granular protection and SPP, side by side.

The logic is sppjit.compare (also the Python API); this module checks the options and paths
before any work, writes the outputs all-or-nothing (sppjit.commands.Outputs) and prints the
table or the JSON document.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from enum import Enum
from typing import Annotated

import typer

from sppjit.commands import (
    DEFAULT_VCPUS,
    PANEL_INPUT,
    PANEL_OUTPUT,
    PANEL_VM,
    BatchSizeOpt,
    Engine,
    EngineOpt,
    HugepagesOpt,
    MemoryOpt,
    MemslotsOpt,
    NoProgressOpt,
    Outputs,
    TraceArg,
    VcpusOpt,
    check_distinct,
    err,
    format_size,
)
from sppjit.commands import vmprotect
from sppjit.errors import InputError

# Mirrors of sppjit.compare's defaults (not imported: that module pulls in numpy); a test
# checks they agree.
DEFAULT_EXIT_COST_US = 3.0
DEFAULT_KERNEL_EXIT_COST_US = 1.0
PROGRESS_INTERVAL_S = 0.1

HELP = (
    "Compare page-granular write protection with SPP on one trace.\n\n"
    "Replays TRACE once per configuration, each on a fresh VM given the same --protect: "
    "page (page-granular write protection, the baseline), spp_v4 and spp_v12 (with "
    "--subpage-check both: each SPP profile with all and with first). Prints them side by "
    "side: exits by kind, exits per 1,000 writes, protection exits avoided against page, "
    "protected pages left writable, SPPT memory, and an estimated guest overhead; with "
    "byte-range protection (hooks), relevant and irrelevant protection exits and their "
    "noise ratio. --json prints the whole comparison as JSON.\n\n"
    "Estimated overhead = exits to userspace x --exit-cost-us + exits KVM resolves in the "
    f"kernel x --kernel-exit-cost-us. The defaults ({DEFAULT_EXIT_COST_US:g} us and "
    f"{DEFAULT_KERNEL_EXIT_COST_US:g} us) are order-of-magnitude figures for an Ice "
    "Lake-era KVM host, not measurements: an exit to the userspace VMM and back costs about "
    "3x an in-kernel exit (kvm-unit-tests x86/vmexit.c, inl_from_qemu against "
    "inl_from_kernel), and an in-kernel exit about 2,000 cycles of world switch plus its "
    "handler (SplitX, USENIX WIOV 2011). An introspection tool that gets its events over a "
    "socket (KVMI) pays more per exit: raise --exit-cost-us. Sources in "
    "sppjit/compare.py."
)

EPILOG = ("Example: sppjit generate kernel-guard --accesses 1000000 --out t.parquet "
          "--protect-out hooks.parquet, then sppjit compare t.parquet --protect "
          "hooks.parquet --memory 4GiB --vcpus 4 --hooks-out per-hook.parquet")

_COST = "Cost model"


class SubpageCheck(str, Enum):
    all = "all"
    first = "first"
    both = "both"


def compare(
    trace: TraceArg,
    protect: Annotated[str | None, typer.Option(
        "--protect", metavar="FILE", show_default=False, rich_help_panel=PANEL_INPUT,
        help="Protection applied before the first access in every configuration (Parquet, "
             "Arrow, CSV or JSON): access maps (gfn, access) or byte ranges (gpa, length, "
             "optional name), which also give relevant and irrelevant exits per hook. "
             "Required, unless --protect-virtual or --protect-symbols gives it.")] = None,
    memory: MemoryOpt = None,
    memslots: MemslotsOpt = None,
    vcpus: VcpusOpt = None,
    hugepages: HugepagesOpt = False,
    subpage_check: Annotated[SubpageCheck, typer.Option(
        "--subpage-check", rich_help_panel=PANEL_VM, case_sensitive=False,
        help="SPP checks every sub-page a write touches (all), only its first (first), or "
             "compare both.")] = SubpageCheck.all,
    exit_cost_us: Annotated[float, typer.Option(
        "--exit-cost-us", metavar="US", min=0.0, rich_help_panel=_COST,
        help="Cost of one exit to userspace and back, in microseconds.")] = DEFAULT_EXIT_COST_US,
    kernel_exit_cost_us: Annotated[float, typer.Option(
        "--kernel-exit-cost-us", metavar="US", min=0.0, rich_help_panel=_COST,
        help="Cost of one exit KVM resolves in the kernel, in "
             "microseconds.")] = DEFAULT_KERNEL_EXIT_COST_US,
    engine: EngineOpt = Engine.jit,
    json_out: Annotated[bool, typer.Option(
        "--json", rich_help_panel=PANEL_OUTPUT,
        help="Print the comparison as JSON on standard output instead of the table.")] = False,
    summary: Annotated[str | None, typer.Option(
        "--summary", metavar="FILE", rich_help_panel=PANEL_OUTPUT,
        help="Write the comparison JSON to FILE.")] = None,
    hooks_out: Annotated[str | None, typer.Option(
        "--hooks-out", metavar="FILE", rich_help_panel=PANEL_OUTPUT,
        help="Per-hook table (.parquet or .arrow; byte-range protection only): hook, then "
             "<config>_relevant and <config>_irrelevant per configuration, gpa, "
             "length. An irrelevant exit counts for every hook protecting the page "
             "(page) or the sub-pages (SPP) it hit, so per-hook irrelevant counts may add "
             "up to more than the total.")] = None,
    batch_size: BatchSizeOpt = None,
    no_progress: NoProgressOpt = False,
    # ---- whole-VM protection: by virtual address or kernel symbol (commands/vmprotect.py)
    protect_virtual: vmprotect.ProtectVirtualOpt = None, mapping: vmprotect.MappingOpt = None,
    protect_symbols: vmprotect.ProtectSymbolsOpt = None, symbols: vmprotect.SymbolsOpt = None,
    phys_base: vmprotect.PhysBaseOpt = None,
) -> None:
    protect_from = vmprotect.resolve(protect=protect, protect_virtual=protect_virtual,
                                     mapping=mapping, protect_symbols=protect_symbols,
                                     symbols=symbols, phys_base=phys_base)
    if protect_from is None and protect is None:
        raise InputError("--protect (or --protect-virtual or --protect-symbols) is required")
    run_compare(protect_from=protect_from,
        trace=trace, protect=protect, memory=memory, memslots=memslots, vcpus=vcpus,
        hugepages=hugepages, subpage_check=subpage_check.value, exit_cost_us=exit_cost_us,
        kernel_exit_cost_us=kernel_exit_cost_us, engine=engine.value, json_out=json_out,
        summary_path=summary, hooks_out=hooks_out, batch_size=batch_size,
        progress=not no_progress and _is_tty(sys.stderr),
    )


def _is_tty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def run_compare(*, trace: str, protect: str, memory: str | None = None,
                memslots: str | None = None, vcpus: int | None = None,
                hugepages: bool = False, subpage_check: str = "all",
                exit_cost_us: float = DEFAULT_EXIT_COST_US,
                kernel_exit_cost_us: float = DEFAULT_KERNEL_EXIT_COST_US,
                engine: str = "jit", json_out: bool = False, summary_path: str | None = None,
                hooks_out: str | None = None, batch_size: int | None = None,
                progress: bool = False, protect_from=None) -> dict:
    """The compare command without typer: check, compare, write, print; returns the
    document."""
    from sppjit.io.output import check_output_path, json_default

    # ---- options and paths, before any work
    if memory is not None and memslots is not None:
        raise InputError("--memory and --memslots cannot be used together (--memslots "
                         "defines the memory)")
    if summary_path is not None:
        check_output_path(summary_path, option="--summary")
    if hooks_out is not None:
        check_output_path(hooks_out, option="--hooks-out", table=True)
    check_distinct([("TRACE", trace), ("--protect", protect), ("--memslots", memslots),
                    ("--summary", summary_path), ("--hooks-out", hooks_out)])

    from sppjit.commands.replay import _generated_hint, _trace_format
    from sppjit.compare import compare as run
    from sppjit.io.memslots import read_memslots
    from sppjit.io.protect import ByteRanges, read_protection
    from sppjit.io.trace import open_trace

    reader = open_trace(trace, vcpus=vcpus or DEFAULT_VCPUS)
    if reader.num_rows == 0:
        raise InputError("trace: no rows")
    hint = _generated_hint(reader.schema, memory=memory, memslots=memslots, vcpus=vcpus)
    slots = read_memslots(memslots) if memslots is not None else None
    if protect_from is not None:  # --protect-virtual/--protect-symbols, resolved (vmprotect)
        protect = protect_from.protection
    if hooks_out is not None and not isinstance(
            protect if protect_from is not None else read_protection(protect), ByteRanges):
        raise InputError(f"--hooks-out: {protect} holds access maps; a per-hook table needs "
                         "byte ranges (columns gpa, length, optional name)")

    # ---- the comparison (sppjit.compare reads the protection and hashes the inputs)
    shown = _Progress(reader.num_rows, enabled=progress)
    try:
        document = run(
            trace, protect, memory=memory, memslots=slots, vcpus=vcpus or DEFAULT_VCPUS,
            hugepages=hugepages, subpage_check=subpage_check, exit_cost_us=exit_cost_us,
            kernel_exit_cost_us=kernel_exit_cost_us, engine=engine, batch_size=batch_size,
            progress=shown.update, inputs={"memslots": memslots},
        )
    except InputError as exc:
        if hint and str(exc).startswith("trace:"):
            raise InputError(f"{exc} ({hint})") from None
        raise
    finally:
        shown.close()
    if document["input"]["rows"] == 0:
        raise InputError("trace: no rows")
    document["input"]["format"] = _trace_format(trace)
    if protect_from is not None:  # the shared protection_info dict: every config shows it
        document["protection"]["path"] = protect_from.label
    document["config"]["memslots_file"] = memslots
    for config in document["configs"]:
        config["summary"]["input"]["format"] = document["input"]["format"]
        config["summary"]["config"]["memslots_file"] = memslots

    # ---- outputs, all or nothing
    written = _write_outputs(document, summary_path=summary_path, hooks_out=hooks_out)

    # ---- report
    if json_out:
        sys.stdout.write(json.dumps(document, indent=2, default=json_default) + "\n")
    else:
        sys.stdout.write(format_comparison(document, written))
    sys.stdout.flush()
    if hint:
        err(f"sppjit: note: {hint}")
    return document


def _write_outputs(document: dict, *, summary_path: str | None,
                   hooks_out: str | None) -> list[str]:
    from sppjit.io.output import TableWriter, write_json_atomic

    with contextlib.ExitStack() as stack:
        outputs = stack.enter_context(Outputs())
        if hooks_out is not None:
            from sppjit.compare import hooks_table

            table = hooks_table(document)
            with TableWriter(hooks_out, table.schema, option="--hooks-out") as writer:
                writer.write_batch(table)
            outputs.add(hooks_out)
        if summary_path is not None:
            write_json_atomic(summary_path, document)
            outputs.add(summary_path)
        return list(outputs.committed)


class _Progress:
    """``compare: <config> rows/total`` on standard error, at most every
    PROGRESS_INTERVAL_S, only when enabled (a terminal, no --no-progress)."""

    def __init__(self, total: int | None, *, enabled: bool, stream=None):
        self.total = total
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.last = float("-inf")
        self.shown = False

    def update(self, name: str, rows: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.last < PROGRESS_INTERVAL_S:
            return
        self.last = now
        total = f"/{self.total:,}" if self.total else ""
        self.stream.write(f"\rcompare: {name} {rows:,}{total} rows\033[K")
        self.stream.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.shown = False


# ------------------------------------------------------------------------------ the table

def _count(value) -> str:
    return "-" if value is None else f"{value:,}"


def _number(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _seconds(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}"


def _bytes(value: int) -> str:
    if value == 0:
        return "0"
    return format_size(value) if value % 1024 == 0 else f"{value:,} B"


def format_comparison(document: dict, written: list[str] | None = None) -> str:
    """The human-readable comparison: a header, then one column per configuration."""
    from sppjit import bits as B

    info, protection, config = document["input"], document["protection"], document["config"]
    configs = document["configs"]
    slots = config["memslots"]
    memory = (format_size(config["memory_bytes"]) if len(slots) == 1
              else f"{format_size(config['memory_bytes'])} in {len(slots)} memslots")
    facts = [f"{info.get('format', 'in memory')}", f"{info['rows']:,} rows"]
    if info.get("scenario") is not None:
        facts.append(f"scenario {info['scenario']}")
    if info.get("seed") is not None:
        facts.append(f"seed {info['seed']}")
    what = (f"{protection['ranges']:,} byte ranges on {protection['pages']:,} pages"
            if protection["form"] == "byte_ranges"
            else f"access maps on {protection['pages']:,} pages")
    header = [
        ("trace", f"{info.get('path')} ({', '.join(facts)})"),
        ("protection", f"{protection.get('path')} ({what})"),
        ("vm", f"{config['vcpus']} vCPU{'s' if config['vcpus'] != 1 else ''}, {memory}"
               f"{', hugepages' if config['hugepages'] else ''}, engine {config['engine']}"),
        ("exit cost", f"{document['exit_cost_us']:g} us to userspace, "
                      f"{document['kernel_exit_cost_us']:g} us in the kernel (estimates)"),
    ]
    width = max(len(label) for label, _ in header)
    out = "".join(f"{label:<{width}}  {text}\n" for label, text in header)

    baseline = document.get("baseline")
    rows: list[tuple[str, list[str]]] = [
        ("writes", [_count(c["derived"]["writes"]) for c in configs]),
        ("exits", [_count(c["derived"]["exits"]) for c in configs]),
    ]
    for kind in B.EXIT_KIND_NAMES:
        rows.append((f"  {kind}", [_count(c["summary"]["exits"][kind]) for c in configs]))
    rows += [
        ("exits / 1,000 writes", [_number(c["derived"]["exits_per_1000_writes"]) for c in configs]),
        ("protection exits", [_count(c["derived"]["protection_exits"]) for c in configs]),
        (f"exits avoided (vs {baseline})" if baseline else "exits avoided",
         [_count(c["derived"]["exits_avoided"]) for c in configs]),
        ("exits to userspace", [_count(c["derived"]["exits_to_userspace"]) for c in configs]),
        ("exits in kernel", [_count(c["derived"]["exits_in_kernel"]) for c in configs]),
        ("protected left writable",
         [_count(c["derived"]["protected_left_writable"]) for c in configs]),
        ("SPPT memory", [_bytes(c["derived"]["sppt_bytes"]) for c in configs]),
        ("est. overhead (s)", [_seconds(c["derived"]["overhead_seconds"]) for c in configs]),
        ("  per M accesses (s)",
         [_seconds(c["derived"]["overhead_seconds_per_million_accesses"]) for c in configs]),
    ]
    if configs and configs[0]["derived"]["hooks"] is not None:
        hooks = [c["derived"]["hooks"] for c in configs]
        rows += [
            ("relevant exits", [_count(h["relevant"]) for h in hooks]),
            ("irrelevant exits", [_count(h["irrelevant"]) for h in hooks]),
            ("noise ratio", [_number(h["noise_ratio"], 3) for h in hooks]),
        ]
    label_width = max(len(label) for label, _ in rows)
    widths = [max(len(c["name"]), *(len(values[i]) for _, values in rows))
              for i, c in enumerate(configs)]
    out += "\n" + " " * label_width + "".join(
        f"  {c['name']:>{w}}" for c, w in zip(configs, widths)) + "\n"
    for label, values in rows:
        out += f"{label:<{label_width}}" + "".join(
            f"  {v:>{w}}" for v, w in zip(values, widths)) + "\n"
    if written:
        out += f"\nwrote {', '.join(written)}\n"
    return out
