"""The benchmark harness runs and reports what it claims (not how fast: that is its job)."""

import json

import pytest
from typer.testing import CliRunner

from sppjit.bench import format_bench, run_bench
from sppjit.cli import app
from sppjit.datasets import scenarios as S


def test_run_bench_reports_every_figure_from_one_run():
    result = run_bench(("hotset", "guarded"), accesses=3000, reference_sample=300, repeat=2, batch_size=1000)
    assert set(result["scenarios"]) == {"hotset", "guarded"}
    for s in result["scenarios"].values():
        assert s["accesses"] == 3000
        for key in ("jit_accesses_per_second", "reference_accesses_per_second", "numpy_stream_per_second"):
            assert s[key] > 0
        assert s["jit_over_reference"] == pytest.approx(
            s["jit_accesses_per_second"] / s["reference_accesses_per_second"])
        assert s["jit_over_numpy_stream"] == pytest.approx(s["jit_accesses_per_second"] / s["numpy_stream_per_second"])
    # the exits counted are the replay's: a hot set of 4096 pages faults each page in once
    assert result["scenarios"]["hotset"]["exits"] == len(set((S.make("hotset", 3000).gpa >> 12).tolist()))
    assert result["compile_seconds"] >= 0
    text = format_bench(result)
    assert "hotset" in text and "guarded" in text


def test_bench_command_writes_json(tmp_path):
    out = tmp_path / "b.json"
    r = CliRunner().invoke(app, ["bench", "--accesses", "2000", "--scenario", "sequential",
                                 "--reference-sample", "200", "--json", str(out)])
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    assert list(doc["scenarios"]) == ["sequential"] and doc["accesses"] == 2000


def test_bench_command_rejects_unknown_scenario(tmp_path):
    r = CliRunner().invoke(app, ["bench", "--scenario", "nope", "--json", str(tmp_path / "b.json")])
    assert r.exit_code == 2 and "unknown scenario" in r.stderr
    assert not (tmp_path / "b.json").exists()


def test_end_to_end_bench_small(tmp_path):
    from sppjit.bench import format_end_to_end, run_end_to_end

    result = run_end_to_end("hotset", accesses=20_000, seed=1, workdir=str(tmp_path))
    assert [(r["format"], r["outputs"]) for r in result["runs"]] == [
        ("arrow", "summary+exits"), ("arrow", "summary+exits+results"),
        ("parquet", "summary+exits"), ("parquet", "summary+exits+results")]
    assert all(r["peak_rss_bytes"] > 0 and r["rows_per_second"] > 0 for r in result["runs"])
    assert "end to end" in format_end_to_end(result)
    assert list(tmp_path.iterdir()) == []  # the temporary traces are gone
