"""Reliability of the I/O and the command line (docs/reliability.md): every Arrow flavour
reads the same, corrupt or hostile inputs give one line and exit 2, a failed or interrupted
run leaves every output path as it was, and signals end a run cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from sppjit.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
TIMING = ("seconds", "compile_seconds", "accesses_per_second")


def invoke(*args, env=None):
    return runner.invoke(app, [str(a) for a in args], env=env)


def assert_one_error_line(result, code: int = 2) -> str:
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("sppjit: error:"), lines[0]
    assert "Traceback" not in result.output
    return lines[0]


def run_cli(*args, cwd, env=None, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    env.pop("SPPJIT_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "sppjit.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=240,
                          **kwargs)


def read_table(path) -> pa.Table:
    path = str(path)
    if path.endswith(".parquet"):
        return pq.read_table(path)
    return ipc.open_file(path).read_all()


def counts_of(summary: dict) -> dict:
    """What a replay found, without what depends on the run or on the input file."""
    return {key: summary[key] for key in ("counts", "exits", "pages")}


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """A guarded scenario (2 vCPUs, protected pages, violations) as an uncompressed Arrow
    IPC trace, with its protection, and a string column passed through."""
    base = tmp_path_factory.mktemp("guarded")
    result = invoke("generate", "guarded", "--accesses", 4000, "--seed", 3,
                    "--out", base / "g.parquet", "--protect-out", base / "p.parquet")
    assert result.exit_code == 0, result.output
    table = pq.read_table(base / "g.parquet")
    note = pa.array([f"row-{i}" for i in range(table.num_rows)])
    table = table.append_column("note", note)
    with ipc.new_file(base / "t.arrow", table.schema) as writer:
        writer.write_table(table, max_chunksize=1000)
    return base


def replay(trace, base, out_dir, *extra):
    out_dir.mkdir()
    result = invoke("replay", trace, "--protect", base / "p.parquet", "--vcpus", 2,
                    "--memory", "4GiB", "--out", out_dir / "r.parquet",
                    "--summary", out_dir / "s.json", "--batch-size", 1500, *extra)
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(out_dir)) == ["r.parquet", "s.json"]
    return (json.loads((out_dir / "s.json").read_text()),
            pq.read_table(out_dir / "r.parquet"))


# ------------------------------------------------------------------ every Arrow flavour (1)

def _flavours(table: pa.Table, directory: Path) -> list[Path]:
    written = []
    path = directory / "feather-default.feather"
    feather.write_feather(table, path, chunksize=1000)  # Feather V2: lz4 unless told
    written.append(path)
    for codec in ("lz4", "zstd", None):
        path = directory / f"ipc-{codec}.arrow"
        options = ipc.IpcWriteOptions(compression=codec)
        with ipc.new_file(path, table.schema, options=options) as writer:
            writer.write_table(table, max_chunksize=700)
        written.append(path)
        path = directory / f"stream-{codec}.arrows"
        with ipc.new_stream(path, table.schema, options=options) as writer:
            writer.write_table(table, max_chunksize=700)
        written.append(path)
    for codec in ("snappy", "gzip", "brotli", "zstd", "lz4", "none"):
        if codec != "none" and not pa.Codec.is_available(codec):
            continue
        path = directory / f"parquet-{codec}.parquet"
        pq.write_table(table, path, compression=codec, row_group_size=900)
        written.append(path)
    return written


def test_every_compression_gives_the_uncompressed_answer(tmp_path, guarded):
    reference, results = replay(guarded / "t.arrow", guarded, tmp_path / "reference")
    assert reference["counts"]["spp_violation"] > 0
    table = ipc.open_file(guarded / "t.arrow").read_all()
    flavours = tmp_path / "flavours"
    flavours.mkdir()
    paths = _flavours(table, flavours)
    assert feather.read_table(paths[0]).num_rows == table.num_rows
    for path in paths:
        summary, out = replay(path, guarded, tmp_path / path.name)
        assert summary["input"]["rows"] == table.num_rows, path.name
        assert counts_of(summary) == counts_of(reference), path.name
        assert out.equals(results), path.name


# -------------------------------------------------------- pass-through columns checked (2)

def _corrupt_strings(path: Path) -> None:
    n = 1000
    offsets = np.arange(n + 1, dtype=np.int32) * 2
    offsets[500] = 1 << 30  # far past the 2,000 bytes of data
    note = pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(offsets.tobytes()),
                                                  pa.py_buffer(b"ab" * n)])
    table = pa.table({"gpa": np.arange(n, dtype=np.uint64) * 8, "note": note})
    with ipc.new_file(path, table.schema) as writer:
        writer.write_table(table)


@pytest.mark.parametrize("out", ["r.parquet", "r.arrow"])
def test_corrupt_pass_through_column_is_refused(tmp_path, out):
    _corrupt_strings(tmp_path / "bad.arrow")
    # A subprocess: before the check, the Parquet writer read out of bounds (SIGSEGV).
    done = run_cli("replay", "bad.arrow", "--memory", "1MiB", "--out", out, cwd=tmp_path)
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert done.stderr.splitlines() == [
        "sppjit: error: trace: column 'note' of bad.arrow is corrupt: Offset invariant "
        "failure: offset for slot 500 out of bounds: 1073741824 > 2000"]
    assert sorted(os.listdir(tmp_path)) == ["bad.arrow"]
