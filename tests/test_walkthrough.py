"""The README's walkthrough runs as written, and what a newcomer meets first.

The walkthrough is the fenced shell block after ``<!-- walkthrough -->`` in README.md: each of
its ``sppjit ...`` lines runs through the command line here, in a temporary directory, with
a smaller --accesses, so that the README cannot rot.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sppjit.cli import app

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
ACCESSES = "20000"  # the README's 200,000, smaller: the commands, not the numbers


def walkthrough() -> list[list[str]]:
    text = README.read_text(encoding="utf-8")
    found = re.search(r"<!-- walkthrough -->\s*```(?:bash|sh|console)?\n(.*?)```", text, re.S)
    assert found, "README.md has no fenced block after <!-- walkthrough -->"
    commands = [shlex.split(line) for line in found.group(1).splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    assert commands and all(c[0] == "sppjit" for c in commands), commands
    return commands


def test_the_walkthrough_has_generate_or_convert_then_replay_compare_report():
    names = [c[1] for c in walkthrough()]
    assert names[0] in ("generate", "convert")
    assert names.index("replay") < names.index("compare") < names.index("report")


def test_the_readme_walkthrough_runs_as_written(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    for command in walkthrough():
        args = command[1:]
        if "--accesses" in args:
            args[args.index("--accesses") + 1] = ACCESSES
        result = runner.invoke(app, args)
        assert result.exit_code == 0, (command, result.output)
    assert (tmp_path / "plots" / "violations_heatmap.png").stat().st_size > 0
    # The README's picture is the one this walkthrough writes.
    assert (ROOT / "docs" / "images" / "violations_heatmap.png").is_file()
    assert "docs/images/violations_heatmap.png" in README.read_text(encoding="utf-8")


def test_a_csv_given_as_a_trace_points_at_sppjit_convert_csv(tmp_path):
    trace = tmp_path / "t.csv"
    trace.write_text("addr,size,kind\n0x1000,8,w\n")
    result = CliRunner().invoke(app, ["replay", str(trace)])
    assert result.exit_code == 2
    assert f"sppjit convert csv {trace} --out" in result.output


def test_python_m_sppjit_is_the_command():
    run = subprocess.run([sys.executable, "-m", "sppjit", "--version"], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.startswith("sppjit "), run.stderr


COMMANDS = ("replay", "generate", "inspect", "compare", "convert", "report", "bench", "sweep")


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_shows_flags_as_flags(command):
    args = ([command] if command else []) + ["--help"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "<bool>" not in result.output  # a flag takes no value
    assert "<str>" not in result.output  # TRACE, FORMAT, ... say what the argument is
    assert "--help" in result.output


def test_bench_help_keeps_its_bracketed_defaults():
    # Square brackets are rich markup: "[default: ...]" in a help text vanished.
    result = CliRunner().invoke(app, ["bench", "--help"], env={"COLUMNS": "200"})
    assert "Accesses per scenario (default 10,000,000;" in result.output


def test_shell_completion_is_offered():
    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert "--install-completion" in result.output and "--show-completion" in result.output


def test_the_license_and_the_typing_marker_ship():
    assert "MIT License" in (ROOT / "LICENSE").read_text()
    assert (ROOT / "sppjit" / "py.typed").is_file()  # hatch packages all of sppjit/


def test_inspect_says_when_a_write_does_not_consult_the_spp_vector(tmp_path):
    import numpy as np

    import sppjit
    from sppjit.inspect import format_report, inspect_state
    from sppjit.savestate import save_state

    vm = sppjit.VM(memory="64MiB")
    vm.init_spp()
    vm.set_subpages(0x100, [0xFFFF0000])  # sub-pages 0..15 of gfn 0x100 protected
    # A write to the protected page and one to gfn 0x101 (its SPPT leaf is shared: the
    # vector shown for 0x101 is the empty one, but its EPT leaf has no SPP bit).
    vm.replay({"gpa": np.array([0x100040, 0x101040], dtype=np.uint64)})
    save_state(vm, tmp_path / "state.npz")
    report = inspect_state(str(tmp_path / "state.npz"), [0x100040, 0x101040, 0x3000000], None)
    protected, plain, unmapped = report["walks"]
    assert protected["spp_vector_consulted"] is True and "spp_vector_why_not" not in protected
    assert plain["spp_vector_consulted"] is False
    assert plain["spp_vector_why_not"] == "the EPT leaf has no SPP bit (61)"
    assert unmapped["spp_vector_why_not"] == "no EPT leaf maps the gpa"
    text = format_report(report)
    assert text.count("does not consult the SPP vector") == 2


# ---------------------------------------------------------------- answers that cannot be wrong

FIXTURES = ROOT / "tests" / "fixtures" / "convert"


@pytest.mark.parametrize("fmt, source, suffix", [
    ("lackey", "lackey_true.txt", ".parquet"), ("lackey", "lackey_true.txt", ".arrow"),
    ("qemu", "qemu_execlog_smp.log", ".parquet"), ("qemu", "qemu_execlog_smp.log", ".arrow")])
def test_a_converted_trace_records_its_vm_and_replays_on_it(tmp_path, fmt, source, suffix):
    import json

    from sppjit.io.trace import open_trace

    out = tmp_path / f"t{suffix}"
    runner = CliRunner()
    converted = runner.invoke(app, ["convert", fmt, str(FIXTURES / source), "--out", str(out)])
    assert converted.exit_code == 0, converted.output
    # The line says how to replay; the trace's metadata says the same.
    said = shlex.split(converted.stdout.strip().split("replay with: ")[1])
    memory = said[said.index("--memory") + 1]
    vcpus = int(said[said.index("--vcpus") + 1]) if "--vcpus" in said else 1
    meta = open_trace(str(out)).schema.metadata
    from sppjit.io.sizes import parse_size

    assert int(meta[b"sppjit.memory"]) == parse_size(memory)
    assert int(meta[b"sppjit.vcpus"]) == vcpus
    replayed = runner.invoke(app, ["replay", str(out), "--json", "--no-progress"])
    assert replayed.exit_code == 0, replayed.output
    config = json.loads(replayed.stdout)["config"]
    assert config["vm_from"] == {"memory": "trace", "vcpus": "trace"}
    assert config["memory_bytes"] == parse_size(memory) and config["vcpus"] == vcpus
