"""Write a seeded scenario as files: the trace (Parquet or Arrow IPC) and its protection.

``sppjit generate`` is a thin shell over ``write_scenario``. The trace is written chunk by
chunk as it is drawn (datasets.scenarios.stream), so memory stays bounded whatever the
number of accesses; both files are published all-or-nothing.
"""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pyarrow as pa

from sppjit.datasets.scenarios import Scenario, stream
from sppjit.io.atomic import Outputs, atomic_path
from sppjit.io.output import TableWriter

TRACE_SCHEMA = pa.schema([("gpa", pa.uint64()), ("size", pa.uint16()), ("vcpu", pa.uint16()),
                          ("kind", pa.uint8()), ("seq", pa.uint64())])


def write_scenario(name: str, accesses: int, seed: int, out: str, *,
                   protect_out: str | None = None, protect_format: str | None = None,
                   rows: int | None = None) -> Scenario:
    """Write ``accesses`` rows of scenario ``name`` under ``out`` and, with ``protect_out``,
    its protection in ``protect_format`` (parquet, arrow, csv, json, jsonl); returns the
    scenario's layout (memory, vCPUs, protection). Batches hold at most ``rows`` rows."""
    layout, chunks = stream(name, accesses, seed, rows)
    with contextlib.ExitStack() as stack:
        stack.enter_context(Outputs())
        _write_trace(layout, chunks, seed, out)
        if protect_out is not None:
            _write_protection(layout, protect_out, protect_format)
    return layout


def _write_trace(layout: Scenario, chunks, seed: int, out: str) -> None:
    schema = TRACE_SCHEMA.with_metadata({
        b"sppjit.scenario": layout.name.encode(), b"sppjit.seed": str(seed).encode(),
        b"sppjit.memory": str(int(layout.memory)).encode(),
        b"sppjit.vcpus": str(int(layout.vcpus)).encode()})
    first = 0
    with TableWriter(out, schema, option="--out") as writer:
        for chunk in chunks:
            n = len(chunk["gpa"])
            arrays = [pa.array(np.ascontiguousarray(chunk[name]), type=schema.field(name).type)
                      for name in ("gpa", "size", "vcpu", "kind")]
            arrays.append(pa.array(np.arange(first, first + n, dtype=np.uint64)))
            writer.write_batch(pa.record_batch(arrays, schema=schema))
            first += n


def protection_table(layout: Scenario) -> pa.Table:
    """The scenario's protection as a table: byte ranges with names (the hook form) where the
    scenario has them, else gfn and access maps (contract, "Protection")."""
    if layout.hook_gpa is not None:
        schema = pa.schema([("gpa", pa.uint64()), ("length", pa.uint32()), ("name", pa.string())])
        return pa.table([pa.array(layout.hook_gpa), pa.array(layout.hook_length),
                         pa.array(layout.hook_name, type=pa.string())], schema=schema)
    schema = pa.schema([("gfn", pa.uint64()), ("access", pa.uint32())])
    return pa.table([pa.array(np.asarray(layout.protect_gfn, dtype=np.uint64)),
                     pa.array(np.asarray(layout.protect_access, dtype=np.uint32))],
                    schema=schema)


def _write_protection(layout: Scenario, path: str, fmt: str | None) -> None:
    table = protection_table(layout)
    if fmt in ("parquet", "arrow"):
        with TableWriter(path, table.schema, option="--protect-out") as writer:
            writer.write_batch(table)
        return
    with atomic_path(path) as temporary:
        if fmt == "csv":
            import pyarrow.csv as pacsv

            pacsv.write_csv(table, temporary)
            return
        rows = (json.dumps(row) for row in table.to_pylist())
        with open(temporary, "w", encoding="utf-8") as handle:
            if fmt == "jsonl":
                for row in rows:
                    handle.write(row + "\n")
            else:
                handle.write("[\n" + ",\n".join(rows) + "\n]\n")
