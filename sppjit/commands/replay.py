"""``sppjit replay``: replay an access trace on a simulated VM and write the results.

Every option and path is checked before any work; the outputs are written batch by batch to
temporary names and renamed at the end, all under one ExitStack, so that a failed or
interrupted run leaves no output file at all (see sppjit.commands.Outputs).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from enum import Enum
from typing import Annotated

import typer

from sppjit.commands import (
    DEFAULT_BATCH_JIT,
    DEFAULT_BATCH_REFERENCE,
    DEFAULT_MEMORY,
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

# Rows per batch: large for the compiled engine (the per-batch cost is amortised), small for
# the plain-Python reference engine so that the progress line moves.
PROGRESS_INTERVAL_S = 0.1  # at most ~10 progress updates per second

HELP = (
    "Replay a memory-access trace on a simulated VM with EPT and SPP.\n\n"
    "TRACE is a Parquet file, a directory of Parquet files, or an Arrow IPC file or "
    "stream with the columns gpa (required), size, vcpu, kind and seq. It is read "
    "batch by batch, so memory stays bounded whatever its length. A summary (counts, "
    "outcomes, exits by kind, pages, time) is printed, or the summary JSON with "
    "--json."
)

EPILOG = ("Example: sppjit generate guarded --accesses 100000 --out t.parquet "
          "--protect-out p.parquet, then sppjit replay t.parquet --protect p.parquet "
          "--vcpus 2 --out r.parquet --exits e.parquet --summary s.json")


class Profile(str, Enum):
    v4 = "v4"
    v12 = "v12"


class SubpageCheck(str, Enum):
    all = "all"
    first = "first"


class Granularity(str, Enum):
    spp = "spp"
    page = "page"


def replay(
    trace: TraceArg,
    protect: Annotated[str | None, typer.Option(
        "--protect", metavar="FILE", rich_help_panel=PANEL_INPUT,
        help="Protection applied before the first access (Parquet, Arrow, CSV or JSON): "
             "access maps (columns gfn, access; bit i = sub-page i writable) or byte ranges "
             "(gpa, length, optional name; none may cross a 4 KiB page). With byte ranges "
             "the exit log tells relevant from irrelevant protection exits per hook.")] = None,
    ops: Annotated[str | None, typer.Option(
        "--ops", metavar="FILE", rich_help_panel=PANEL_INPUT,
        help="Timeline (Parquet, CSV or JSON Lines: at, op, gfn, npages, access): "
             "set_subpages, zap, remap or delete_memslot, applied before the access at row "
             "'at'.")] = None,
    memory: MemoryOpt = None,
    memslots: MemslotsOpt = None,
    vcpus: VcpusOpt = None,
    profile: Annotated[Profile, typer.Option(
        "--profile", rich_help_panel=PANEL_VM, case_sensitive=False,
        help="KVM SPP series to follow: v4 (the RESEND v4 of 2019) or v12 (its last "
             "posting, 2020).")] = Profile.v4,
    hugepages: HugepagesOpt = False,
    subpage_check: Annotated[SubpageCheck, typer.Option(
        "--subpage-check", rich_help_panel=PANEL_VM, case_sensitive=False,
        help="Check every sub-page a write touches, or only its first.")] = SubpageCheck.all,
    granularity: Annotated[Granularity, typer.Option(
        "--granularity", rich_help_panel=PANEL_VM, case_sensitive=False,
        help="Protect with SPP (spp) or write-protect whole pages (page, the "
             "baseline).")] = Granularity.spp,
    engine: EngineOpt = Engine.jit,
    out: Annotated[str | None, typer.Option(
        "--out", metavar="FILE", rich_help_panel=PANEL_OUTPUT,
        help="Per-access results (.parquet or .arrow): the trace columns plus outcome, "
             "exits and exit_reason.")] = None,
    exits: Annotated[str | None, typer.Option(
        "--exits", metavar="FILE", rich_help_panel=PANEL_OUTPUT,
        help="Exit log (.parquet or .arrow): one row per VM exit.")] = None,
    summary: Annotated[str | None, typer.Option(
        "--summary", metavar="FILE", rich_help_panel=PANEL_OUTPUT,
        help="Summary JSON file.")] = None,
    save_state: Annotated[str | None, typer.Option(
        "--save-state", metavar="FILE", rich_help_panel=PANEL_OUTPUT,
        help="Save the VM state after the replay (.npz; see sppjit inspect).")] = None,
    json_out: Annotated[bool, typer.Option(
        "--json", rich_help_panel=PANEL_OUTPUT,
        help="Print the summary JSON on standard output instead of the table.")] = False,
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
    run_replay(protect_from=protect_from,
        trace=trace, protect=protect, ops=ops, memory=memory, memslots=memslots, vcpus=vcpus,
        profile=profile.value, hugepages=hugepages, subpage_check=subpage_check.value,
        granularity=granularity.value, engine=engine.value, out=out, exits=exits,
        summary_path=summary, save_state_path=save_state, json_out=json_out,
        batch_size=batch_size, progress=not no_progress and _is_tty(sys.stderr),
    )


def _is_tty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def run_replay(*, trace: str, protect: str | None = None, ops: str | None = None,
               memory: str | None = None,
               memslots: str | None = None, vcpus: int | None = None, profile: str = "v4",
               hugepages: bool = False, subpage_check: str = "all", granularity: str = "spp",
               engine: str = "jit", out: str | None = None, exits: str | None = None,
               summary_path: str | None = None, save_state_path: str | None = None,
               json_out: bool = False, batch_size: int | None = None,
               progress: bool = False, protect_from=None) -> dict:
    """The replay command without typer: check everything, replay, write, print; returns
    the summary."""
    from sppjit.io.output import check_output_path, json_default

    # ---- options and paths, before any work
    if memory is not None and memslots is not None:
        raise InputError("--memory and --memslots cannot be used together (--memslots "
                         "defines the memory)")
    for option, path, table in (("--out", out, True), ("--exits", exits, True),
                                ("--summary", summary_path, False),
                                ("--save-state", save_state_path, False)):
        if path is not None:
            check_output_path(path, option=option, table=table)
    check_distinct([("TRACE", trace), ("--protect", protect), ("--ops", ops), ("--memslots", memslots),
                    ("--out", out), ("--exits", exits), ("--summary", summary_path),
                    ("--save-state", save_state_path)])
    if batch_size is None:
        batch_size = DEFAULT_BATCH_JIT if engine == "jit" else DEFAULT_BATCH_REFERENCE

    # The inputs are hashed for the summary on another thread, from now on: a large trace
    # takes about as long to hash as to replay, and the imports and checks below overlap it.
    from sppjit.provenance import BackgroundDigests

    digests = BackgroundDigests({"trace": trace, "protect": protect, "ops": ops, "memslots": memslots})

    # ---- inputs (each reader raises InputError naming the file, column and row)
    from sppjit.io.memslots import read_memslots
    from sppjit.io.protect import read_protection
    from sppjit.io.trace import open_trace

    reader = open_trace(trace, batch_size=batch_size, vcpus=vcpus or DEFAULT_VCPUS)
    if reader.num_rows == 0:
        raise InputError("trace: no rows")
    trace_format = _trace_format(trace)
    hint = _generated_hint(reader.schema, memory=memory, memslots=memslots, vcpus=vcpus)
    slots = read_memslots(memslots) if memslots is not None else None
    protection = read_protection(protect) if protect is not None else None
    if protect_from is not None:  # --protect-virtual/--protect-symbols, resolved (vmprotect)
        protection, protect = protect_from.protection, protect_from.label
    from sppjit.io.ops import read_ops

    timeline = read_ops(ops) if ops is not None else []

    from sppjit.vm import VM

    vm = VM(memory=memory or DEFAULT_MEMORY, vcpus=vcpus or DEFAULT_VCPUS, profile=profile,
            hugepages=hugepages, subpage_check=subpage_check, granularity=granularity,
            memslots=slots)
    if timeline:
        vm.init_spp()  # the VMM enables SPP before its first set, as the protection does
    protection_info = None
    hooks = None
    if protection is not None:
        protection_info = _apply_protection(vm, protection, protect)
        if protection_info["form"] == "byte_ranges":
            from sppjit.hooks import HookIndex

            hooks = HookIndex.from_ranges(protection)

    # ---- replay, writing as we go (the inputs are hashed meanwhile, on another thread)
    shown = Progress(reader.num_rows, enabled=progress)
    try:
        summary, written = _replay_and_write(
            vm, reader, engine=engine, out=out, exits=exits, summary_path=summary_path,
            save_state_path=save_state_path, progress=shown, hint=hint,
            input_info={"path": trace, "format": trace_format},
            config_extra={"engine": engine, "protection": protection_info,
                          "memslots_file": memslots, "ops_file": ops},
            hooks=hooks, timeline=timeline,
            digests=digests,
        )
    finally:
        shown.close()

    # ---- report
    if json_out:
        sys.stdout.write(json.dumps(summary, indent=2, default=json_default) + "\n")
    else:
        sys.stdout.write(format_summary(summary, written))
    sys.stdout.flush()
    if hint:
        err(f"sppjit: note: {hint}")
    return summary


def _replay_and_write(vm, reader, *, engine, out, exits, summary_path, save_state_path,
                      progress, hint, input_info, config_extra, hooks=None,
                      timeline=(), digests=None) -> tuple[dict, list[str]]:
    from sppjit.io.output import TableWriter, write_json_atomic
    from sppjit.provenance import generator_info
    from sppjit.replay import Replay, discard_exits

    with contextlib.ExitStack() as stack:
        outputs = stack.enter_context(Outputs())
        with contextlib.ExitStack() as tables:
            session = Replay(vm, engine=engine, on_exits=discard_exits, hooks=hooks,
                             ops=list(timeline))
            if exits is not None:
                tables.push(outputs.track(exits))  # before the writer: runs after its exit
                exit_writer = tables.enter_context(
                    TableWriter(exits, session.exit_schema, option="--exits"))
                session.on_exits = exit_writer.write_batch
            out_writer = None
            try:
                for batch in reader:
                    result = session.run(batch, keep=out is not None)
                    if out is not None:
                        if out_writer is None:  # the schema is the first result's
                            tables.push(outputs.track(out))
                            out_writer = tables.enter_context(
                                TableWriter(out, result.schema, option="--out"))
                        out_writer.write_batch(result)
                    progress.update(session.rows)
            except InputError as exc:
                if hint:
                    raise InputError(f"{exc} ({hint})") from None
                raise
            if session.rows == 0:
                raise InputError("trace: no rows")
        summary = session.summary(input_info, digests.result() if digests else None,
                                  generator_info(reader.schema))
        summary["config"].update(config_extra)
        if save_state_path is not None:
            from sppjit.savestate import save_state

            save_state(vm, save_state_path)
            outputs.add(save_state_path)
        if summary_path is not None:
            write_json_atomic(summary_path, summary)
            outputs.add(summary_path)
        written = [path for path in (out, exits, save_state_path, summary_path)
                   if path is not None and path in outputs.committed]
    return summary, written


# ------------------------------------------------------------------------------ protection

def _apply_protection(vm, protection, path: str) -> dict:
    """Check every protected page is in a memslot, then init_spp + set_subpages over runs."""
    import numpy as np

    from sppjit.io.protect import AccessMaps, check_in_memslots, ranges_to_maps
    from sppjit.io.space import PAGE_SHIFT

    if isinstance(protection, AccessMaps):
        check_in_memslots(protection.gfn, vm.config.memslots)
        maps, form, extra = protection, "access_maps", {}
    else:
        check_in_memslots(protection.gpa >> np.uint64(PAGE_SHIFT), vm.config.memslots)
        maps, form = ranges_to_maps(protection), "byte_ranges"
        extra = {"ranges": int(len(protection.gpa))}
    vm.protect(maps.gfn, maps.access)
    return {"path": path, "form": form, "pages": int(len(maps.gfn)), **extra}



# ------------------------------------------------------------------------------ trace facts

def _trace_format(path: str) -> str:
    """"parquet", "parquet-dataset", "arrow" (IPC file) or "arrow-stream", from the content."""
    from sppjit.io.formats import ARROW_FILE_MAGIC, PARQUET_MAGIC, read_magic

    if os.path.isdir(path):
        return "parquet-dataset"
    magic = read_magic(path, "trace")
    if magic.startswith(PARQUET_MAGIC):
        return "parquet"
    if magic.startswith(ARROW_FILE_MAGIC):
        return "arrow"
    return "arrow-stream"


def _generated_hint(schema, *, memory, memslots, vcpus) -> str | None:
    """If ``sppjit generate`` wrote the trace for another VM than the one asked for (memory or
    vCPUs left at their defaults), the options that would match it."""
    meta = schema.metadata or {}
    scenario = meta.get(b"sppjit.scenario")
    if scenario is None:
        return None
    suggest = []
    try:
        want_memory = int(meta.get(b"sppjit.memory", b"0"))
        want_vcpus = int(meta.get(b"sppjit.vcpus", b"0"))
    except ValueError:
        return None
    if memory is None and memslots is None and want_memory:
        from sppjit.io.sizes import parse_size

        if want_memory != parse_size(DEFAULT_MEMORY):
            suggest.append(f"--memory {format_size(want_memory)}")
    if vcpus is None and want_vcpus and want_vcpus != DEFAULT_VCPUS:
        suggest.append(f"--vcpus {want_vcpus}")
    if not suggest:
        return None
    return (f"the trace was generated for scenario {scenario.decode(errors='replace')}: "
            f"replay it with {' '.join(suggest)}")


# ------------------------------------------------------------------------------ progress

class Progress:
    """A progress line on standard error (rows, rows/s, ETA when the total is known), redrawn
    at most every PROGRESS_INTERVAL_S; only when enabled (a terminal, no --no-progress)."""

    def __init__(self, total: int | None, *, enabled: bool, stream=None):
        self.total = total
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.start = time.monotonic()
        self.last = float("-inf")
        self.shown = False

    def update(self, rows: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.last < PROGRESS_INTERVAL_S:
            return
        self.last = now
        elapsed = now - self.start
        rate = rows / elapsed if elapsed > 0 else 0.0
        if self.total:
            text = f"replay: {rows:,}/{self.total:,} rows ({100 * rows / self.total:.0f}%)"
        else:
            text = f"replay: {rows:,} rows"
        text += f"  {rate:,.0f} rows/s"
        if self.total and rate > 0 and rows < self.total:
            text += f"  ETA {_duration((self.total - rows) / rate)}"
        self.stream.write("\r" + text + "\033[K")
        self.stream.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.shown = False


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


# ------------------------------------------------------------------------------ summary table

def _pairs(items) -> str:
    return "  ".join(f"{name} {value:,}" for name, value in items)


def format_summary(summary: dict, written: list[str]) -> str:
    """The human-readable summary: one labelled line per block."""
    from sppjit import bits as B

    config, counts, exits = summary["config"], summary["counts"], summary["exits"]
    info = summary["input"]
    slots = config["memslots"]
    memory = (format_size(config["memory_bytes"]) if len(slots) == 1
              else f"{format_size(config['memory_bytes'])} in {len(slots)} memslots")
    vm = (f"profile {config['profile']}, {config['vcpus']} vCPU"
          f"{'s' if config['vcpus'] != 1 else ''}, {memory}, granularity "
          f"{config['granularity']}, subpage-check {config['subpage_check']}"
          f"{', hugepages' if config['hugepages'] else ''}, engine {summary['engine']}")
    protection = config.get("protection")
    rows = [
        ("trace", f"{info.get('path')} ({info.get('format', '?')}, {info['rows']:,} rows)"),
        ("vm", vm),
    ]
    if protection:
        rows.append(("protection", f"{protection['path']} ({protection['form']}, "
                                   f"{protection['pages']:,} pages)"))
    rows += [
        ("accesses", _pairs([("total", counts["accesses"]), ("reads", counts["reads"]),
                             ("writes", counts["writes"]), ("fetches", counts["fetches"])])),
        ("outcomes", _pairs((name, counts[name.lower()]) for name in B.OUTCOME_NAMES)),
        ("exits", _pairs([("total", exits["total"])]
                         + [(name, exits[name]) for name in B.EXIT_KIND_NAMES])),
        ("pages", _pairs((name, value) for name, value in summary["pages"].items())),
        *([("hooks", f"relevant {summary['hooks']['relevant']:,}  irrelevant "
                     f"{summary['hooks']['irrelevant']:,}  ({len(summary['hooks']['per_hook']):,} hooks)")]
          if "hooks" in summary else []),
        ("time", f"{summary['seconds']:.3f} s, "
                 f"{summary['accesses_per_second']:,.0f} accesses/s"
                 + (f" (kernels compiled or loaded in {summary['compile_seconds']:.1f} s)"
                    if summary.get("compile_seconds", 0) >= 0.05 else "")),
    ]
    if written:
        rows.append(("wrote", ", ".join(written)))
    width = max(len(label) for label, _ in rows)
    return "".join(f"{label:<{width}}  {text}\n" for label, text in rows)
