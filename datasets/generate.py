"""Write a seeded scenario as files: the trace (Parquet or Arrow IPC) and its protection.

``sppjit generate`` is a thin shell over ``write_scenario``, which makes every check itself
before anything is drawn or written. The trace is written chunk by chunk as it is drawn
(datasets.scenarios.stream), so memory stays bounded whatever the number of accesses; both
files are published all-or-nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import numpy as np
import pyarrow as pa

from sppjit.datasets.scenarios import MAX_ACCESSES, SCENARIOS, Scenario, stream
from sppjit.errors import InputError
from sppjit.io.atomic import Outputs, check_distinct
from sppjit.io.output import TableWriter, check_output_path
from sppjit.io.protect import (
    AccessMaps,
    ByteRanges,
    check_protection_output,
    protection_format,
    write_protection,
)

TRACE_SCHEMA = pa.schema([("gpa", pa.uint64()), ("size", pa.uint16()), ("vcpu", pa.uint16()),
                          ("kind", pa.uint8()), ("seq", pa.uint64())])


def write_scenario(name: str, accesses: int, seed: int, out: str, *,
                   protect_out: str | None = None, protect_format: str | None = None,
                   rows: int | None = None, names: Mapping[str, str] | None = None) -> Scenario:
    """Write ``accesses`` rows of scenario ``name`` under ``out`` (.parquet or .arrow) and,
    with ``protect_out``, its protection (.parquet, .arrow, .csv, .json or .jsonl by its
    extension, unless ``protect_format`` names one); returns the scenario's layout (memory,
    vCPUs, protection). Batches hold at most ``rows`` rows.

    Every check comes first (the scenario, the number of accesses, both output paths, the
    protection's format, no path given twice), so a bad call writes nothing. Errors name the
    parameters (``accesses``, ``out``, ``protect_out``); ``names`` maps them to what the
    caller calls them (the command line: ``--accesses``, ``--out``, ``--protect-out``).
    """
    name_of = dict(names or {}).get
    if name not in SCENARIOS:
        raise InputError(f"unknown scenario '{name}' (one of {', '.join(SCENARIOS)})")
    if isinstance(accesses, bool) or not isinstance(accesses, int) \
            or not 1 <= accesses <= MAX_ACCESSES:
        raise InputError(f"{name_of('accesses', 'accesses')} must be 1..{MAX_ACCESSES}, "
                         f"not {accesses!r}")
    check_output_path(out, option=name_of("out", "out"), table=True)
    layout, chunks = stream(name, accesses, seed, rows)  # the protection: nothing drawn yet
    protection = _protection(layout)
    if protect_out is not None:
        option = name_of("protect_out", "protect_out")
        fmt = protect_format or protection_format(protect_out, option)
        if len(layout.protect_gfn) == 0 and fmt in ("json", "jsonl"):
            raise InputError(f"{option}: scenario {name} protects no pages, and JSON without "
                             "rows cannot say which columns it has; use .parquet, .arrow or "
                             ".csv")
        check_protection_output(protection, protect_out, option, fmt)
    check_distinct([(name_of("out", "out"), out),
                    (name_of("protect_out", "protect_out"), protect_out)])
    with contextlib.ExitStack() as stack:
        stack.enter_context(Outputs())
        _write_trace(layout, chunks, seed, out, name_of("out", "out"))
        if protect_out is not None:
            write_protection(protection, protect_out, name=name_of("protect_out", "protect_out"),
                             format=protect_format)
    return layout


def _write_trace(layout: Scenario, chunks, seed: int, out: str, option: str) -> None:
    schema = TRACE_SCHEMA.with_metadata({
        b"sppjit.scenario": layout.name.encode(), b"sppjit.seed": str(seed).encode(),
        b"sppjit.memory": str(int(layout.memory)).encode(),
        b"sppjit.vcpus": str(int(layout.vcpus)).encode()})
    first = 0
    with TableWriter(out, schema, option=option) as writer:
        for chunk in chunks:
            n = len(chunk["gpa"])
            arrays = [pa.array(np.ascontiguousarray(chunk[name]), type=schema.field(name).type)
                      for name in ("gpa", "size", "vcpu", "kind")]
            arrays.append(pa.array(np.arange(first, first + n, dtype=np.uint64)))
            writer.write_batch(pa.record_batch(arrays, schema=schema))
            first += n


def _protection(layout: Scenario) -> AccessMaps | ByteRanges:
    """The scenario's protection: byte ranges with names (the hook form) where the scenario
    has them, else access maps per gfn (contract, "Protection")."""
    if layout.hook_gpa is not None:
        return ByteRanges(gpa=np.asarray(layout.hook_gpa, dtype=np.uint64),
                          length=np.asarray(layout.hook_length, dtype=np.uint32),
                          name=list(layout.hook_name))
    return AccessMaps(gfn=np.asarray(layout.protect_gfn, dtype=np.uint64),
                      access=np.asarray(layout.protect_access, dtype=np.uint32))
