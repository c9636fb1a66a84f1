"""Each command is a thin shell: its outputs equal those of the library call it makes
(replay: sppjit.job.run; compare: sppjit.compare.compare_files; sweep: sppjit.sweep.sweep_files; inspect:
sppjit.inspect.inspect_state; bench: sppjit.bench.run_bench)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from sppjit import job as J
from sppjit.bench import run_bench
from sppjit.cli import app
from sppjit.compare import compare_files
from sppjit.datasets import scenarios as S
from sppjit.inspect import format_report, inspect_state
from sppjit.summary import ReplaySummary, format_comparison, format_summary

runner = CliRunner()


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return result


def untimed(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k not in ReplaySummary.TIMINGS}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    base = tmp_path_factory.mktemp("parity")
    scenario = S.make("guarded", 2000, seed=9)
    pq.write_table(pa.table(scenario.columns()), base / "t.parquet")
    (base / "hooks.csv").write_text("gpa,length,name\n" + "".join(
        f"{int(g) << 12 | 0x200},100,h{i}\n" for i, g in enumerate(scenario.protect_gfn[:40])))
    return base


def test_replay_command_writes_what_the_job_writes(files, tmp_path):
    (tmp_path / "cli").mkdir()
    (tmp_path / "lib").mkdir()
    cli = invoke("replay", files / "t.parquet", "--protect", files / "hooks.csv", "--vcpus", 2,
                 "--out", tmp_path / "cli/r.arrow", "--exits", tmp_path / "cli/e.parquet",
                 "--summary", tmp_path / "cli/s.json", "--save-state", tmp_path / "cli/st.npz",
                 "--json")
    lib = J.run(J.Job(
        inputs=J.JobInputs(trace=str(files / "t.parquet"), protection=str(files / "hooks.csv")),
        vm=J.VmSpec(vcpus=2),
        outputs=J.JobOutputs(results=str(tmp_path / "lib/r.arrow"),
                             exit_log=str(tmp_path / "lib/e.parquet"),
                             summary=str(tmp_path / "lib/s.json"),
                             saved_state=str(tmp_path / "lib/st.npz"))))
    for name in ("r.arrow", "e.parquet"):
        assert (tmp_path / "cli" / name).read_bytes() == (tmp_path / "lib" / name).read_bytes()
    written = [json.loads((tmp_path / d / "s.json").read_text()) for d in ("cli", "lib")]
    assert untimed(written[0]) == untimed(written[1]) == untimed(lib.summary.to_dict())
    assert untimed(json.loads(cli.stdout)) == untimed(written[0])
    # the table is the library's printer
    text = invoke("replay", files / "t.parquet", "--vcpus", 2).stdout
    alone = J.run(J.Job(inputs=J.JobInputs(trace=str(files / "t.parquet")), vm=J.VmSpec(vcpus=2)))
    untimed_lines = [line for line in text.splitlines() if not line.startswith("time ")]
    assert untimed_lines == [line for line in format_summary(alone.summary).splitlines()
                             if not line.startswith("time ")]
    assert untimed_lines[0].split() == ["trace", str(files / "t.parquet"), "(parquet,", "2,000",
                                        "rows)"]


def test_compare_command_writes_what_compare_files_writes(files, tmp_path):
    invoke("compare", files / "t.parquet", "--protect", files / "hooks.csv", "--vcpus", 2,
           "--subpage-check", "both", "--summary", tmp_path / "cli.json",
           "--hooks-out", tmp_path / "cli.parquet")
    run = compare_files(str(files / "t.parquet"), str(files / "hooks.csv"), vcpus=2,
                        subpage_check="both", summary=str(tmp_path / "lib.json"),
                        hooks_out=str(tmp_path / "lib.parquet"))
    assert (tmp_path / "cli.parquet").read_bytes() == (tmp_path / "lib.parquet").read_bytes()
    docs = [json.loads((tmp_path / f"{d}.json").read_text()) for d in ("cli", "lib")]
    returned = run.document.to_dict()
    for doc in docs + [returned]:
        for config in doc["configs"]:
            config["summary"] = untimed(config["summary"])
    assert docs[0] == docs[1] == json.loads(json.dumps(returned))
    assert run.written == (str(tmp_path / "lib.parquet"), str(tmp_path / "lib.json"))
    text = invoke("compare", files / "t.parquet", "--protect", files / "hooks.csv", "--vcpus",
                  2).stdout
    assert text.splitlines()[:4] == format_comparison(run.document).splitlines()[:4]


def test_inspect_command_prints_what_inspect_state_returns(files, tmp_path):
    invoke("replay", files / "t.parquet", "--protect", files / "hooks.csv", "--vcpus", 2,
           "--save-state", tmp_path / "st.npz")
    args = ("--gpa", "0x1000", "--gpa", 4096 * 5000, "--vcpu", 1)
    cli = invoke("inspect", tmp_path / "st.npz", *args, "--json")
    report = inspect_state(str(tmp_path / "st.npz"), [0x1000, 4096 * 5000], 1)
    assert json.loads(cli.stdout) == json.loads(json.dumps(report))
    assert invoke("inspect", tmp_path / "st.npz", *args).stdout == format_report(report)


def test_bench_command_writes_what_run_bench_returns(tmp_path):
    invoke("bench", "--accesses", 1500, "--scenario", "hotset", "--reference-sample", 100,
           "--seed", 3, "--batch-size", 500, "--json", tmp_path / "b.json")
    cli = json.loads((tmp_path / "b.json").read_text())
    lib = run_bench(("hotset",), accesses=1500, reference_sample=100, seed=3, batch_size=500)
    timed = ("jit_accesses_per_second", "reference_accesses_per_second",
             "numpy_stream_per_second", "jit_over_reference", "jit_over_numpy_stream")
    for doc in (cli, lib):
        doc.pop("compile_seconds")
        for figures in doc["scenarios"].values():
            for key in timed:
                assert figures.pop(key) > 0
    assert cli == json.loads(json.dumps(lib))


def test_sweep_command_writes_what_sweep_files_writes(files, tmp_path):
    from sppjit.sweep import format_sweep, sweep_files

    for side in ("cli", "lib"):
        (tmp_path / side).mkdir()
    configs = ["page", "v4", "v12,first,name=v12f"]
    cli = invoke("sweep", files / "t.parquet", "--protect", files / "hooks.csv", "--vcpus", 2,
                 *[a for c in configs for a in ("--config", c)], "--threads", 2,
                 "--out", tmp_path / "cli/t.parquet", "--outdir", tmp_path / "cli", "--json")
    run = sweep_files(str(files / "t.parquet"), configs, protect=[str(files / "hooks.csv")],
                      vcpus=2, threads=2, out=str(tmp_path / "lib/t.parquet"),
                      outdir=str(tmp_path / "lib"))
    timing = {"seconds", "accesses_per_second", "compile_seconds"}

    def untimed_rows(table):
        return [{k: v for k, v in row.items() if k not in timing} for row in table.to_pylist()]

    tables = [pq.read_table(tmp_path / side / "t.parquet") for side in ("cli", "lib")]
    assert untimed_rows(tables[0]) == untimed_rows(tables[1])
    names = [r["name"] for r in tables[0].to_pylist()]
    assert len(names) == 3 and names[2] == "v12f"
    for name in names:
        exits = [(tmp_path / side / f"{name}.exits.parquet").read_bytes() for side in ("cli", "lib")]
        assert exits[0] == exits[1]
        summaries = [json.loads((tmp_path / side / f"{name}.summary.json").read_text())
                     for side in ("cli", "lib")]
        assert untimed(summaries[0]) == untimed(summaries[1])
    printed = json.loads(cli.stdout)
    assert untimed_rows(pa.Table.from_pylist(printed["rows"])) == untimed_rows(tables[1])
    # the table is the library's printer
    assert format_sweep(run.document, list(run.written)).splitlines()[0].startswith("trace")
