"""Each command is a thin shell: its outputs equal those of the library call it makes
(replay: sppjit.job.run; compare: sppjit.compare.compare_files; sweep: sppjit.sweep.sweep_files; inspect:
sppjit.inspect.inspect_state; bench: sppjit.bench.run_bench; generate:
sppjit.datasets.generate.write_scenario; convert: sppjit.convert.convert_trace and
sppjit.convert.vm.convert_vm_trace; report: sppjit.report.write_report)."""

from __future__ import annotations

import json
from pathlib import Path

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


def same_files(a: Path, b: Path, names) -> None:
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_generate_command_writes_what_write_scenario_writes(tmp_path):
    from sppjit.datasets.generate import write_scenario
    from sppjit.errors import InputError

    for side in ("cli", "lib"):
        (tmp_path / side).mkdir()
    for protect in ("p.parquet", "p.csv", "p.jsonl"):
        cli = invoke("generate", "kernel-guard", "--accesses", 3000, "--seed", 5,
                     "--out", tmp_path / "cli/t.arrow", "--protect-out", tmp_path / "cli" / protect)
        made = write_scenario("kernel-guard", 3000, 5, str(tmp_path / "lib/t.arrow"),
                              protect_out=str(tmp_path / "lib" / protect))
        same_files(tmp_path / "cli", tmp_path / "lib", ("t.arrow", protect))
        assert f"({len(made.protect_gfn):,} protected pages)" in cli.stdout
        assert f"--vcpus {made.vcpus}" in cli.stdout
    # the checks are the library's: its messages name its parameters, the command's its options
    before = sorted(p.name for p in tmp_path.rglob("*"))
    for call, cli_args, names in (
        (dict(accesses=5, out="t.txt"), ("--accesses", 5, "--out", tmp_path / "t.txt"),
         ("out: unknown output format", "--out: unknown output format")),
        (dict(accesses=5, out=str(tmp_path / "t.parquet"), protect_out=str(tmp_path / "p.xml")),
         ("--accesses", 5, "--out", tmp_path / "t.parquet", "--protect-out", tmp_path / "p.xml"),
         ("protect_out: unknown format", "--protect-out: unknown format")),
        (dict(accesses=5, out=str(tmp_path / "t.parquet"), protect_out=str(tmp_path / "p.json")),
         ("--accesses", 5, "--out", tmp_path / "t.parquet", "--protect-out", tmp_path / "p.json"),
         ("protect_out: scenario uniform protects no pages",
          "--protect-out: scenario uniform protects no pages")),
        (dict(accesses=5, out=str(tmp_path / "t.parquet"), protect_out=str(tmp_path / "t.parquet")),
         ("--accesses", 5, "--out", tmp_path / "t.parquet", "--protect-out", tmp_path / "t.parquet"),
         ("protect_out: " + str(tmp_path / "t.parquet") + " is the same file as out",
          "is the same file as --out")),
        (dict(accesses=0, out=str(tmp_path / "t.parquet")), None, ("accesses must be 1..", None)),
    ):
        with pytest.raises(InputError) as caught:
            write_scenario("uniform", call.pop("accesses"), 0, call.pop("out"), **call)
        assert str(caught.value).startswith(names[0]), str(caught.value)
        if cli_args is not None:
            result = runner.invoke(app, ["generate", "uniform", *map(str, cli_args)])
            assert result.exit_code == 2 and names[1] in result.stderr, result.stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


FIXTURES = Path(__file__).resolve().parent / "fixtures" / "convert"


@pytest.mark.parametrize("fmt, source, extra", [
    ("pinatrace", "pinatrace_manual.out", {}),
    ("lackey", "lackey_true.txt", {"page_size": 2 << 20}),
    ("drmemtrace", "drmemtrace_view.txt", {}),
    ("csv", "accesses.csv", {}),
])
def test_convert_command_writes_what_convert_trace_writes(tmp_path, fmt, source, extra):
    from sppjit.commands.convert import summary_line
    from sppjit.convert import convert_trace

    for side in ("cli", "lib"):
        (tmp_path / side).mkdir()
    args = ["--page-size", "2MiB"] if extra else []
    cli = invoke("convert", fmt, FIXTURES / source, "--out", tmp_path / "cli/t.parquet", *args)
    result = convert_trace(fmt, FIXTURES / source, tmp_path / "lib/t.parquet", **extra)
    same_files(tmp_path / "cli", tmp_path / "lib", ("t.parquet", "t.parquet.mapping.parquet"))
    expected = summary_line(result).replace(str(tmp_path / "lib"), str(tmp_path / "cli"))
    assert cli.stdout == expected + "\n"


@pytest.mark.parametrize("fmt, source, options, extra", [
    ("qemu", "qemu_execlog_smp.log", ("--default-size", 4), {"default_size": 4}),
    ("qemu", "qemu_memc.log", ("--vcpu", 1), {"vcpu": 1}),
    ("gem5", "gem5_monitor.trc", (), {}),
])
def test_convert_command_writes_what_convert_vm_trace_writes(tmp_path, fmt, source, options,
                                                             extra):
    from sppjit.commands.convert import vm_summary_line
    from sppjit.convert.vm import convert_vm_trace

    for side in ("cli", "lib"):
        (tmp_path / side).mkdir()
    cli = invoke("convert", fmt, FIXTURES / source, "--out", tmp_path / "cli/t.arrow", *options)
    result = convert_vm_trace(fmt, FIXTURES / source, tmp_path / "lib/t.arrow", **extra)
    same_files(tmp_path / "cli", tmp_path / "lib", ("t.arrow",))
    expected = vm_summary_line(result).replace(str(tmp_path / "lib"), str(tmp_path / "cli"))
    assert cli.stdout == expected + "\n"


def test_report_command_writes_what_write_report_writes(files, tmp_path):
    from sppjit.report import write_report

    pytest.importorskip("matplotlib")
    J.run(J.Job(inputs=J.JobInputs(trace=str(files / "t.parquet"),
                                   protection=str(files / "hooks.csv")),
                vm=J.VmSpec(vcpus=2),
                outputs=J.JobOutputs(results=str(tmp_path / "r.parquet"),
                                     exit_log=str(tmp_path / "e.parquet"),
                                     summary=str(tmp_path / "s.json"))))
    inputs = [tmp_path / "r.parquet", "--exits", tmp_path / "e.parquet", "--summary",
              tmp_path / "s.json", "--epochs", 7, "--top", 5]
    cli = invoke("report", *inputs, "--stats", tmp_path / "cli/stats", "--plot",
                 tmp_path / "cli/plot")
    done = write_report(str(tmp_path / "r.parquet"), str(tmp_path / "e.parquet"),
                        summary=str(tmp_path / "s.json"), epochs=7, top=5,
                        stats=str(tmp_path / "lib/stats"), plot=str(tmp_path / "lib/plot"))
    for sub in ("stats", "plot"):
        names = sorted(p.name for p in (tmp_path / "cli" / sub).iterdir())
        assert names == sorted(p.name for p in (tmp_path / "lib" / sub).iterdir())
        assert "report.json" in names and len(names) >= 3
        tables = [n for n in names if n.endswith(".parquet")]
        same_files(tmp_path / "cli" / sub, tmp_path / "lib" / sub, tables)
        for png in (n for n in names if n.endswith(".png")):
            cli_png, lib_png = ((tmp_path / side / sub / png).read_bytes()
                                for side in ("cli", "lib"))
            assert cli_png[:8] == b"\x89PNG\r\n\x1a\n" and cli_png == lib_png, png
        docs = [json.loads((tmp_path / side / sub / "report.json").read_text().replace(
            str(tmp_path / side), "OUT")) for side in ("cli", "lib")]
        assert docs[0] == docs[1]
    assert cli.stdout == done.text.replace(str(tmp_path / "lib"), str(tmp_path / "cli"))
