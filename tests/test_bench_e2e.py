"""sppjit bench --end-to-end --trace FILE: the command's wall clock on a user's trace, what it
is compared with, and where it goes (what the figures are, not how fast they are)."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from sppjit.cli import app


@pytest.fixture(scope="module")
def user_trace(tmp_path_factory):
    d = tmp_path_factory.mktemp("e2e")
    trace = d / "t.arrow"
    table = pa.table({"gpa": (np.arange(3000, dtype=np.uint64) * np.uint64(136)) % np.uint64(1 << 20)})
    with pa.OSFile(str(trace), "wb") as sink, ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    protect = d / "p.parquet"
    pq.write_table(pa.table({"gfn": np.array([3, 7], dtype=np.uint64),
                             "access": np.array([0, 0xFFFF0000], dtype=np.uint32)}), protect)
    return trace, protect


def test_end_to_end_on_a_user_trace(user_trace, tmp_path):
    """One run, through the command: its JSON holds every figure, consistent with itself."""
    from sppjit.bench import format_end_to_end_file

    trace, protect = user_trace
    out = tmp_path / "e2e.json"
    result = CliRunner().invoke(app, ["bench", "--end-to-end", "--trace", str(trace),
                                      "--protect", str(protect), "--json", str(out),
                                      "--workdir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "where the wall goes" in result.output and "1.3x target" in result.output
    r = json.loads(out.read_text())
    assert r["trace"] == str(trace) and r["protect"] == str(protect)
    assert r["rows"] == 3000 and r["phases"]["rows"] == 3000
    assert r["trace_bytes"] == trace.stat().st_size
    assert r["wall_over_loop_and_interpreter"] == pytest.approx(
        r["wall_seconds"] / (r["replay_loop_seconds"] + r["interpreter_seconds"]))
    assert 0 < r["replay_loop_seconds"] < r["wall_seconds"]
    assert r["peak_rss_bytes"] > 0
    # the summary's digests name their algorithm, and the phases measured the same one
    assert r["digests"]["trace"].startswith(r["phases"]["digest_algorithm"] + ":")
    assert set(r["digests"]) == {"trace", "protect"}
    for phase in ("imports", "kernel_cache_load", "read_and_check", "digest", "job"):
        assert r["phases"][phase] > 0
    # the same command run by a resident server, against its own replay loop
    sv = r["served"]
    assert 0 < sv["replay_loop_seconds"] < sv["wall_seconds"]
    assert sv["wall_over_loop_and_interpreter"] == pytest.approx(
        sv["wall_seconds"] / (sv["replay_loop_seconds"] + r["interpreter_seconds"]))
    assert "served by a resident 'sppjit serve'" in result.output
    assert format_end_to_end_file(r).splitlines()[0] in result.output


@pytest.mark.parametrize("args, message", [
    (["--trace", "T"], "--trace and --protect go with --end-to-end"),
    (["--end-to-end", "--protect", "T"], "--protect needs --trace"),
    (["--end-to-end", "--trace", "/nonexistent/t.arrow"], "no such file"),
])
def test_bench_end_to_end_options_are_checked(user_trace, args, message):
    trace, _ = user_trace
    r = CliRunner().invoke(app, ["bench", *[str(trace) if a == "T" else a for a in args]])
    assert r.exit_code == 2 and message in r.output


def test_bench_end_to_end_on_a_bad_trace_is_one_error_line(tmp_path):
    bad = tmp_path / "bad.arrow"
    bad.write_bytes(b"ARROW1\0\0 not really")
    r = CliRunner().invoke(app, ["bench", "--end-to-end", "--trace", str(bad)])
    assert r.exit_code == 2 and "--trace:" in r.output and "Traceback" not in r.output
