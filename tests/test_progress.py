"""Progress and the first-run compile note (sppjit/commands/progress.py, sppjit/compilation.py)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sppjit import compilation
from sppjit.commands.progress import Shown, wanted


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_drawn_only_on_a_terminal_and_without_no_progress():
    assert wanted(False, _Terminal()) and not wanted(True, _Terminal())
    assert not wanted(False, io.StringIO())


def test_a_disabled_display_writes_nothing_and_hides_the_compile_note():
    stream = io.StringIO()
    with Shown(False, stream=stream) as shown:
        shown.rows("replay")(10, 100)
        shown.named("compare")("page", 10, 100)
        with shown.step("report"):
            pass
        # A compile inside a command that does not draw: not even the Python API's line.
        compilation._presenter.compile_started(compilation.NOTE)
        compilation._presenter.compile_finished()
    assert stream.getvalue() == ""
    assert compilation._presenter is compilation._default  # restored after the block


def test_an_enabled_display_draws_steps_and_the_compile_note_then_clears():
    stream = _Terminal()
    with Shown(True, stream=stream, width=160) as shown:
        shown.rows("replay")(500, 1000)
        shown.bytes("convert")(1 << 20, 4 << 20)
        compilation._presenter.compile_started(compilation.NOTE)
        shown._progress.refresh()
        text = stream.getvalue()
        compilation._presenter.compile_finished()
        assert len(shown._progress.tasks) == 2  # the compile spinner is gone once compiled
    assert "replay" in text and "500/1,000 rows" in text and "compiling the kernels" in text
    assert "1MiB/4MiB" in text


def test_the_python_api_says_the_compile_note_once(capsys):
    presenter = compilation._OneLine()
    presenter.compile_started(compilation.NOTE)
    presenter.compile_started(compilation.NOTE)
    err = capsys.readouterr().err
    assert err.count("compiling the kernels") == 1 and err.startswith("sppjit: note: ")


@pytest.mark.skipif(os.environ.get("NUMBA_DISABLE_JIT") == "1", reason="nothing compiles")
def test_a_first_run_reports_compilation_apart_from_replaying(tmp_path):
    """On a fresh numba cache every kernel compiles, the timeline's too (they compile
    lazily inside the replay loop): the summary's seconds must not count that."""
    gpa = np.arange(2000, dtype=np.uint64) * 64
    pq.write_table(pa.table({"gpa": gpa}), tmp_path / "t.parquet")
    # set_subpages and remap call kernels the replay kernel does not: they compile lazily,
    # inside the replay loop, when the trace reaches them.
    (tmp_path / "ops.csv").write_text("at,op,gfn,npages,access\n10,set_subpages,5,2,0\n"
                                      "20,zap,0,1,\n30,remap,1,1,\n")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    run = subprocess.run(
        [sys.executable, "-m", "sppjit", "replay", str(tmp_path / "t.parquet"), "--ops",
         str(tmp_path / "ops.csv"), "--json"],
        env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["ops"] == {"count": 3, "applied": 3}
    # Compiling takes tens of seconds; replaying 2,000 rows a few milliseconds. Before the
    # fix the timeline kernels' compile landed in seconds: 6.2 s measured here (1M rows).
    assert summary["compile_seconds"] > 1.0
    assert summary["seconds"] < 1.0
    assert "compiling the kernels" not in run.stderr  # not a terminal: quiet


def test_convert_reports_the_bytes_of_its_input(tmp_path, monkeypatch):
    import gzip

    from sppjit.convert import convert_trace, engine

    monkeypatch.setattr(engine, "PROGRESS_LINES", 100)
    lines = "".join(f" S {0x1000 + 8 * i:x},8\n" for i in range(1000))
    source = tmp_path / "t.lackey.gz"
    source.write_bytes(gzip.compress(lines.encode()))
    calls = []
    convert_trace("lackey", source, tmp_path / "t.parquet",
                  progress=lambda done, total: calls.append((done, total)))
    size = source.stat().st_size
    assert len(calls) >= 2 and all(total == size for _, total in calls)
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)  # never back
    assert calls[-1] == (size, size)  # the compressed file's bytes, read to the end
