"""``sppjit sweep``: replay one trace under many configurations in one pass.

The logic is sppjit.sweep (also the Python API); this module parses the options, checks the
paths before any work, writes the outputs all-or-nothing (sppjit.commands.Outputs) and prints
a row per configuration.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
from typing import Annotated

import typer

from sppjit.commands import (
    DEFAULT_VCPUS,
    PANEL_INPUT,
    PANEL_OUTPUT,
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
)
from sppjit.errors import InputError

HELP = (
    "Replay one trace under many configurations, reading it once.\n\n"
    "Each --config is a comma-separated spec: profile=v4|v12, granularity=spp|page, "
    "subpage_check=all|first, hugepages=on|off, vcpus=N, protect=FILE (none: no protection), "
    "ops=FILE (a timeline), name=NAME; bare v4, v12, spp, page, all, first and hugepages say "
    "which field they set. Without --config: page, spp_v4 and spp_v12. The trace is decoded "
    "once and each batch replayed by every configuration's VM on --threads threads. Prints a "
    "row per configuration (exits by kind, violations, pages, hooks, speed); --out writes "
    "that table, --json prints it with every configuration's summary as JSON."
)
EPILOG = ("Example: sppjit sweep t.parquet --protect hooks.parquet --config page "
          "--config v4 --config v12,first --config v12,hugepages --out sweep.parquet "
          "--outdir runs/")


def sweep(
    trace: TraceArg,
    config: Annotated[list[str] | None, typer.Option(
        "--config", metavar="SPEC", rich_help_panel=PANEL_INPUT,
        help="A configuration (repeatable), e.g. profile=v12,granularity=page,protect=FILE.")] = None,
    protect: Annotated[list[str] | None, typer.Option(
        "--protect", metavar="FILE", rich_help_panel=PANEL_INPUT,
        help="Protection for every configuration without protect= of its own (access maps or "
             "byte ranges, as sppjit replay reads them). Repeated: each such configuration "
             "runs once per file, named CONFIG@FILESTEM.")] = None,
    memory: MemoryOpt = None,
    memslots: MemslotsOpt = None,
    vcpus: VcpusOpt = None,
    hugepages: HugepagesOpt = False,
    engine: EngineOpt = Engine.jit,
    threads: Annotated[int | None, typer.Option(
        "--threads", metavar="N", min=1, max=1024, show_default="the cores",
        help="Threads replaying the configurations (at most one per configuration).")] = None,
    out: Annotated[str | None, typer.Option(
        "--out", metavar="TABLE", rich_help_panel=PANEL_OUTPUT,
        help="The table, a row per configuration (.parquet or .arrow).")] = None,
    summary: Annotated[str | None, typer.Option(
        "--summary", metavar="FILE", rich_help_panel=PANEL_OUTPUT,
        help="The table and every configuration's summary as one JSON document.")] = None,
    json_out: Annotated[bool, typer.Option(
        "--json", rich_help_panel=PANEL_OUTPUT,
        help="Print that JSON document on standard output instead of the table.")] = False,
    outdir: Annotated[str | None, typer.Option(
        "--outdir", metavar="DIR", rich_help_panel=PANEL_OUTPUT,
        help="An existing directory: NAME.summary.json and NAME.exits.parquet for every "
             "configuration NAME.")] = None,
    results: Annotated[bool, typer.Option(
        "--results", rich_help_panel=PANEL_OUTPUT,
        help="With --outdir, also NAME.results.parquet: the per-access results.")] = False,
    batch_size: BatchSizeOpt = None,
    no_progress: NoProgressOpt = False,
) -> None:
    run_sweep(trace=trace, configs=config or None, protect=protect or [], memory=memory,
              memslots=memslots, vcpus=vcpus, hugepages=hugepages, engine=engine.value,
              threads=threads, out=out, summary_path=summary, json_out=json_out, outdir=outdir,
              results=results, batch_size=batch_size,
              progress=not no_progress and _is_tty(sys.stderr))


def _is_tty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def run_sweep(*, trace: str, configs: list[str] | None = None, protect: list[str] = (),
              memory: str | None = None, memslots: str | None = None, vcpus: int | None = None,
              hugepages: bool = False, engine: str = "jit", threads: int | None = None,
              out: str | None = None, summary_path: str | None = None, json_out: bool = False,
              outdir: str | None = None, results: bool = False, batch_size: int | None = None,
              progress: bool = False) -> dict:
    """The sweep command without typer: check, sweep, write, print; returns the document."""
    from sppjit.io.output import check_output_path, json_default
    from sppjit.sweep import DEFAULT_CONFIGS, expand_configs

    # ---- options and paths, before any work
    if memory is not None and memslots is not None:
        raise InputError("--memory and --memslots cannot be used together (--memslots "
                         "defines the memory)")
    if results and outdir is None:
        raise InputError("--results needs --outdir (the directory the results go to)")
    expanded = expand_configs(configs if configs is not None else DEFAULT_CONFIGS, protect)
    names = [c.label for c in expanded]
    if out is not None:
        check_output_path(out, option="--out", table=True)
    if summary_path is not None:
        check_output_path(summary_path, option="--summary")
    per_config: dict[str, dict[str, str]] = {}
    if outdir is not None:
        if not os.path.isdir(outdir):
            raise InputError(f"--outdir: {outdir} is not an existing directory")
        for name in names:
            files = {"summary": os.path.join(outdir, f"{name}.summary.json"),
                     "exits": os.path.join(outdir, f"{name}.exits.parquet")}
            if results:
                files["results"] = os.path.join(outdir, f"{name}.results.parquet")
            for kind, path in files.items():
                check_output_path(path, option="--outdir", table=kind != "summary")
            per_config[name] = files
    inputs = [("TRACE", trace), ("--memslots", memslots)]
    inputs += [("--protect", p) for p in protect]
    inputs += [(f"--config {c.label}", p) for c in expanded for p in (c.protect, c.ops)
               if p is not None and p != "none"]
    outputs = [("--out", out), ("--summary", summary_path)]
    outputs += [("--outdir", path) for files in per_config.values() for path in files.values()]
    check_distinct(_without_repeats(inputs) + outputs)

    from sppjit.commands.replay import Progress
    from sppjit.io.formats import trace_format
    from sppjit.io.memslots import read_memslots
    from sppjit.io.trace import open_trace
    from sppjit.provenance import generated_hint

    reader = open_trace(trace)
    if reader.num_rows == 0:
        raise InputError("trace: no rows")
    hint = generated_hint(reader.schema, memory=memory, memslots=memslots, vcpus=vcpus)
    slots = read_memslots(memslots) if memslots is not None else None

    # ---- the sweep, its per-configuration files written as it goes, all or nothing
    from sppjit.io.output import TableWriter, write_json_atomic
    from sppjit.sweep import sweep as run

    shown = Progress(reader.num_rows, enabled=progress)
    rows_done: dict[str, int] = {}

    def update(name: str, rows: int) -> None:  # called one at a time by the runner
        rows_done[name] = rows
        shown.update(min(rows_done.get(n, 0) for n in names))

    with contextlib.ExitStack() as stack:
        written = stack.enter_context(Outputs())
        with contextlib.ExitStack() as tables:
            lock = threading.Lock()  # the sinks are opened from the runner's threads

            def open_writer(path: str, schema, option: str):
                with lock:
                    tables.push(written.track(path))  # before the writer: runs after its exit
                    return tables.enter_context(TableWriter(path, schema, option=option))

            def exit_sink(name, schema):
                return open_writer(per_config[name]["exits"], schema, "--outdir").write_batch

            def results_sink(name):
                writer = None

                def write(batch) -> None:
                    nonlocal writer
                    if writer is None:  # the schema is the first result's
                        writer = open_writer(per_config[name]["results"], batch.schema, "--outdir")
                    writer.write_batch(batch)

                return write

            try:
                result = run(trace, expanded, protection=protect[0] if len(protect) == 1 else None,
                             memory=memory, memslots=slots, vcpus=vcpus or DEFAULT_VCPUS,
                             hugepages=hugepages, engine=engine, batch_size=batch_size,
                             threads=threads, on_exits=exit_sink if outdir is not None else None,
                             on_results=results_sink if results else None, progress=update,
                             inputs={"memslots": memslots})
            except InputError as exc:
                if hint and "trace:" in str(exc):
                    raise InputError(f"{exc} ({hint})") from None
                raise
            finally:
                shown.close()
        document = result.document
        document["input"]["format"] = trace_format(trace)
        document["config"]["memslots_file"] = memslots
        for name, summary in result.summaries.items():
            summary["input"]["format"] = document["input"]["format"]
            summary["config"]["memslots_file"] = memslots
            if outdir is not None:
                write_json_atomic(per_config[name]["summary"], summary)
                written.add(per_config[name]["summary"])
        if out is not None:
            with TableWriter(out, result.table.schema, option="--out") as writer:
                writer.write_batch(result.table)
            written.add(out)
        if summary_path is not None:
            write_json_atomic(summary_path, document)
            written.add(summary_path)
        files = list(written.committed)

    # ---- report
    if json_out:
        sys.stdout.write(json.dumps(document, indent=2, default=json_default) + "\n")
    else:
        sys.stdout.write(format_sweep(document, files))
    sys.stdout.flush()
    if hint:
        err(f"sppjit: note: {hint}")
    return document


def _without_repeats(named_paths):
    """Inputs may be named more than once (one protection for several configurations)."""
    seen, out = set(), []
    for option, path in named_paths:
        if path is not None and os.path.abspath(path) in seen:
            continue
        if path is not None:
            seen.add(os.path.abspath(path))
        out.append((option, path))
    return out


# ------------------------------------------------------------------------------ the table

_COLUMNS = (  # (heading, row key); exits by kind follow "exits"
    ("name", "name"), ("profile", "profile"), ("gran", "granularity"),
    ("check", "subpage_check"), ("huge", "hugepages"), ("vcpus", "vcpus"),
    ("protect", "protect"), ("accesses", "accesses"), ("exits", "exits"),
)


def format_sweep(document: dict, written: list[str] | None = None) -> str:
    """A header, then one line per configuration."""
    from sppjit import bits as B

    info, config = document["input"], document["config"]
    facts = [info.get("format", "in memory"), f"{info['rows']:,} rows"]
    for key in ("scenario", "seed"):
        if info.get(key) is not None:
            facts.append(f"{key} {info[key]}")
    out = (f"trace    {info.get('path')} ({', '.join(facts)})\n"
           f"sweep    {len(document['rows'])} configurations, {config['threads']} "
           f"thread{'s' if config['threads'] != 1 else ''}, engine {config['engine']}\n\n")
    rows = document["rows"]
    hooks = any(r["hooks_relevant"] is not None for r in rows)
    columns = list(_COLUMNS) + [(kind, f"exits_{kind}") for kind in B.EXIT_KIND_NAMES]
    columns += [("touched", "pages_touched"), ("sppt", "pages_sppt_tables")]
    if hooks:
        columns += [("relevant", "hooks_relevant"), ("irrelevant", "hooks_irrelevant")]
    columns += [("M acc/s", "accesses_per_second")]
    cells = [[_cell(key, r[key]) for _, key in columns] for r in rows]
    widths = [max(len(head), *(len(c[i]) for c in cells)) for i, (head, _) in enumerate(columns)]
    left = {"name", "profile", "granularity", "subpage_check", "protect"}

    def line(values):
        return "  ".join(v.ljust(w) if key in left else v.rjust(w)
                         for v, w, (_, key) in zip(values, widths, columns)).rstrip() + "\n"

    out += line([head for head, _ in columns])
    out += "".join(line(c) for c in cells)
    for r in rows:
        if r["error"] is not None:
            out += f"error    {r['error']}\n"
    if written:
        out += f"\nwrote    {', '.join(written)}\n"
    return out


def _cell(key: str, value) -> str:
    if value is None:
        return "-"
    if key == "accesses_per_second":
        return f"{value / 1e6:.1f}"
    if key == "hugepages":
        return "yes" if value else "no"
    if key == "protect":
        return os.path.basename(str(value))
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
