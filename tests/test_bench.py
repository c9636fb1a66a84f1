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
    # the target's measure on the generated Arrow trace, cold and served
    target = result["summary_only"]
    assert target["rows"] == 20_000 and target["served"]["replay_loop_seconds"] > 0
    text = format_end_to_end(result)
    assert "end to end" in text and "served by a resident 'sppjit serve'" in text
    assert list(tmp_path.iterdir()) == []  # the temporary traces are gone


def test_whole_call_against_the_numpy_check():
    """The numpy yardstick answers the same question: on 8-byte writes that never cross a
    sub-page, the writes it finds blocked are the replay's sub-page violations."""
    from sppjit.bench import format_workloads, protected_hotset, run_workloads, whole_call_figures

    sc = protected_hotset(20_000, seed=3)
    f = whole_call_figures(sc, repeat=1)
    assert f["blocked_writes"] == f["numpy_blocked_writes"] > 0
    assert f["whole_summary_over_numpy_check"] == pytest.approx(
        f["whole_summary_per_second"] / f["numpy_check_per_second"])
    result = run_workloads(scale=1e-4, repeat=1)
    assert set(result["workloads"]) == {"protected-hotset", "guarded"}
    assert "x numpy" in format_workloads(result)


def test_exit_costs_take_the_exit_they_measure():
    from sppjit.bench import EXIT_COST_KINDS, format_exit_costs, run_exit_costs

    result = run_exit_costs(pages=3000, repeat=1)
    for kind in EXIT_COST_KINDS:
        k = result["kinds"][kind]
        assert k["exits_of_kind"] == k["exits"] == 3000 and k["exit_ns"] > 0
    assert "write_protect" in format_exit_costs(result)
