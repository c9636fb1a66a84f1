"""The command line: help and version, generate -> replay round trips in Parquet and Arrow,
the bad-input matrix (exit 2, one line on stderr, no output file), interrupts and internal
errors, inspect, and a real subprocess run of ``python -m sppjit.cli``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import sppjit
from sppjit import bits as B
from sppjit.cli import app
from sppjit.commands.generate import SCENARIO_NAMES
from sppjit.io.protect import read_protection

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()

# Keys of the summary that depend on the run, not on the simulation.
TIMING = ("seconds", "compile_seconds", "accesses_per_second")


def invoke(*args, env=None):
    return runner.invoke(app, [str(a) for a in args], env=env)


def read_table(path) -> pa.Table:
    path = str(path)
    if path.endswith(".parquet"):
        return pq.read_table(path)
    return ipc.open_file(path).read_all()


def listing(directory) -> list[str]:
    """Every entry of a directory, hidden temporary files included."""
    return sorted(os.listdir(directory))


def assert_one_error_line(result, code: int = 2) -> str:
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("sppjit: error:"), lines[0]
    assert "Traceback" not in result.output
    return lines[0]


def comparable(summary: dict) -> dict:
    """A summary without its timing and the facts about the input file's name and format."""
    out = {key: value for key, value in summary.items() if key not in TIMING}
    out["input"] = {key: value for key, value in summary["input"].items()
                    if key not in ("path", "format")}
    config = dict(summary["config"])
    if config.get("protection"):
        config["protection"] = {key: value for key, value in config["protection"].items()
                                if key != "path"}
    out["config"] = config
    # The input files differ byte for byte (Parquet against Arrow): so do their digests.
    out["provenance"] = {key: value for key, value in summary["provenance"].items()
                         if key != "digests"}
    return out


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """A small guarded scenario (2 vCPUs, protected pages) as Parquet and Arrow traces."""
    base = tmp_path_factory.mktemp("guarded")
    for ext, protect in (("parquet", "parquet"), ("arrow", "csv")):
        result = invoke("generate", "guarded", "--accesses", 3000, "--seed", 7,
                        "--out", base / f"t.{ext}", "--protect-out", base / f"p.{protect}")
        assert result.exit_code == 0, result.output
    return base


# ------------------------------------------------------------------------------ help, version

@pytest.mark.parametrize("args", [["--help"], ["-h"], ["replay", "--help"],
                                  ["generate", "--help"], ["inspect", "-h"]])
def test_help_everywhere(args):
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert "Usage" in result.stdout


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"sppjit {sppjit.__version__}"


def test_no_arguments_shows_help():
    result = invoke()
    assert result.exit_code == 2
    assert "replay" in result.stdout and "generate" in result.stdout


def test_unknown_command_and_option_are_one_line():
    assert_one_error_line(invoke("bogus"))
    assert_one_error_line(invoke("replay", "t.parquet", "--bogus"))
    line = assert_one_error_line(invoke("replay", "t.parquet", "--vcpus", "many"))
    assert "--vcpus" in line


def test_generate_help_names_every_scenario():
    assert all(name in invoke("generate", "--help").stdout for name in SCENARIO_NAMES)


def test_help_does_not_import_heavy_modules():
    code = ("import sys; sys.argv = ['sppjit', '--help']\n"
            "from sppjit.cli import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('numba', 'pyarrow', 'numpy') if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert "HEAVY []" in done.stdout, done.stdout + done.stderr


# ------------------------------------------------------------------------------ subprocess

def run_cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("SPPJIT_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "sppjit.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


def test_subprocess_replay_and_errors(tmp_path, guarded):
    done = run_cli("--version", cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == f"sppjit {sppjit.__version__}"
    done = run_cli("replay", guarded / "t.parquet", "--vcpus", 2, "--protect",
                   guarded / "p.parquet", "--json", "--out", tmp_path / "r.parquet",
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["counts"]["accesses"] == 3000
    assert summary["counts"]["spp_violation"] > 0
    assert "\r" not in done.stderr and "sppjit:" not in done.stderr  # no progress, no note
    assert read_table(tmp_path / "r.parquet").num_rows == 3000
    done = run_cli("replay", tmp_path / "missing.parquet", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.splitlines() == ["sppjit: error: trace: no such file: "
                                        f"{tmp_path / 'missing.parquet'}"]


# ------------------------------------------------------------------------------ round trips

def test_parquet_and_arrow_inputs_give_identical_results(tmp_path, guarded):
    summaries = {}
    for ext, protect in (("parquet", "parquet"), ("arrow", "csv")):
        out = tmp_path / ext
        out.mkdir()
        result = invoke("replay", guarded / f"t.{ext}", "--protect", guarded / f"p.{protect}",
                        "--vcpus", 2, "--out", out / "r.parquet", "--exits",
                        out / "e.arrow", "--summary", out / "s.json", "--batch-size", 1000)
        assert result.exit_code == 0, result.output
        summaries[ext] = json.loads((out / "s.json").read_text())
        assert sorted(os.listdir(out)) == ["e.arrow", "r.parquet", "s.json"]
    assert comparable(summaries["parquet"]) == comparable(summaries["arrow"])
    for name in ("r.parquet", "e.arrow"):
        a, b = read_table(tmp_path / "parquet" / name), read_table(tmp_path / "arrow" / name)
        assert a.equals(b), name
    summary = summaries["parquet"]
    assert summary["input"] == {"path": str(guarded / "t.parquet"), "format": "parquet",
                                "rows": 3000, "seed": 7}  # generated with --seed 7
    assert summaries["arrow"]["input"]["format"] == "arrow"
    assert summary["config"]["engine"] == "jit"
    assert summary["config"]["protection"]["form"] == "access_maps"
    assert summary["config"]["protection"]["pages"] == summary["pages"]["protected"]
    results = read_table(tmp_path / "parquet" / "r.parquet")
    assert results.column_names == ["gpa", "size", "vcpu", "kind", "seq", "outcome", "exits",
                                    "exit_reason"]
    assert results.column("seq").to_pylist() == list(range(3000))
    exits = read_table(tmp_path / "parquet" / "e.arrow")
    assert exits.num_rows == summary["exits"]["total"]
    outcomes = np.bincount(results.column("outcome").to_numpy(), minlength=5)
    assert outcomes[B.OUTCOME_SPP_VIOLATION] == summary["counts"]["spp_violation"]


def test_json_summary_on_stdout(guarded):
    result = invoke("replay", guarded / "t.arrow", "--vcpus", 2, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    for key in ("schema_version", "sppjit_version", "config", "input", "counts", "exits",
                "pages", "seconds", "accesses_per_second"):
        assert key in summary
    assert summary["counts"]["accesses"] == 3000
    assert summary["config"]["protection"] is None


def test_human_summary_table(guarded):
    result = invoke("replay", guarded / "t.parquet", "--vcpus", 2, "--protect",
                    guarded / "p.csv")
    assert result.exit_code == 0, result.output
    labels = [line.split()[0] for line in result.stdout.splitlines()]
    assert labels == ["trace", "vm", "protection", "accesses", "outcomes", "exits", "pages",
                      "time"]
    assert "SPP_VIOLATION" in result.stdout and "accesses/s" in result.stdout


def test_a_generated_trace_replays_on_the_vm_it_records(guarded):
    # The guarded trace uses vCPU 1: without --vcpus the trace's own 2 vCPUs are taken (it
    # used to be an error that suggested --vcpus 2); --vcpus 1 still says what is wrong.
    result = invoke("replay", guarded / "t.parquet")
    assert result.exit_code == 0, result.output
    assert "2 vCPUs" in result.stdout and "from the trace's metadata" in result.stdout
    line = assert_one_error_line(invoke("replay", guarded / "t.parquet", "--vcpus", "1"))
    assert "the VM has 1 vCPU" in line


def test_byte_ranges_memslots_and_reference_engine(tmp_path):
    trace = tmp_path / "t.parquet"
    gpa = np.array([0x1000, 0x1010, 0x1100, 0x2000, 0x3000, 0x40_0000], dtype=np.uint64)
    pq.write_table(pa.table({"gpa": gpa, "size": np.full(6, 8, np.uint16)}), trace)
    (tmp_path / "hooks.csv").write_text("gpa,length,name\n0x1000,16,a\n0x3000,4096,b\n")
    (tmp_path / "slots.csv").write_text("slot,base_gfn,npages\n0,0,16\n")
    summaries = []
    for engine in ("jit", "reference"):
        result = invoke("replay", trace, "--protect", tmp_path / "hooks.csv", "--memslots",
                        tmp_path / "slots.csv", "--engine", engine, "--json")
        assert result.exit_code == 0, result.output
        summaries.append(json.loads(result.stdout))
    jit, reference = summaries
    assert reference["engine"] == reference["config"]["engine"] == "reference"
    for summary in summaries:
        del summary["engine"], summary["config"]["engine"]
    assert comparable(jit) == comparable(reference)
    assert jit["config"]["protection"]["form"] == "byte_ranges"
    assert jit["config"]["protection"]["ranges"] == 2
    # Sub-page 0 of gfn 1 and all of gfn 3 are protected: 0x1000, 0x1010 and 0x3000 fault
    # (0x1010 lies beside the hooked bytes, in the same sub-page); 0x40_0000 is beyond the
    # 16-page memslot.
    assert jit["counts"]["spp_violation"] == 3
    assert jit["counts"]["mmio"] == 1


# ------------------------------------------------------------------------------ bad input

def _trace(path, **columns):
    pq.write_table(pa.table(columns), path)


def _bad_missing_gpa(d):
    _trace(d / "t.parquet", size=pa.array([8, 8], pa.uint16()))
    return ["t.parquet"], "column 'gpa' is missing"


def _bad_nulls(d):
    _trace(d / "t.parquet", gpa=pa.array([0, None, 4096], pa.uint64()))
    return ["t.parquet"], "null at row 1"


def _bad_size_0(d):
    _trace(d / "t.parquet", gpa=pa.array([0, 8, 16], pa.uint64()),
           size=pa.array([8, 0, 8], pa.uint16()))
    return ["t.parquet"], "row 1"


def _bad_size_4097_late(d):
    # The bad row is in the third batch: outputs were already being written.
    gpa = np.arange(12, dtype=np.uint64) * 8
    size = np.full(12, 8, np.uint16)
    size[10] = 4097
    _trace(d / "t.parquet", gpa=gpa, size=size)
    return ["t.parquet", "--batch-size", "4"], "row 10"


def _bad_negative(d):
    _trace(d / "t.parquet", gpa=pa.array([4096, -4096], pa.int64()))
    return ["t.parquet"], "row 1"


def _bad_truncated(d):
    _trace(d / "t.parquet", gpa=np.arange(1000, dtype=np.uint64) * 64)
    data = (d / "t.parquet").read_bytes()
    (d / "t.parquet").write_bytes(data[: len(data) // 2])
    return ["t.parquet"], "cannot read"


def _bad_empty_parquet(d):
    _trace(d / "t.parquet", gpa=pa.array([], pa.uint64()))
    return ["t.parquet"], "trace: no rows"


def _bad_empty_stream(d):
    schema = pa.schema([("gpa", pa.uint64())])
    with ipc.new_stream(str(d / "t.arrows"), schema):
        pass
    return ["t.arrows"], "trace: no rows"


def _bad_protection_outside(d):
    _trace(d / "t.parquet", gpa=pa.array([0, 4096], pa.uint64()))
    (d / "p.csv").write_text("gfn,access\n1,0\n0x1000,0xffff0000\n")
    return ["t.parquet", "--memory", "16MiB", "--protect", "p.csv"], "gfn 0x1000 at row 1"


def _bad_range_crossing(d):
    _trace(d / "t.parquet", gpa=pa.array([0, 4096], pa.uint64()))
    (d / "p.csv").write_text("gpa,length\n0x1000,8\n0x2ff0,32\n")
    return ["t.parquet", "--protect", "p.csv"], "crosses a 4 KiB page"


def _bad_profile(d):
    _trace(d / "t.parquet", gpa=pa.array([0], pa.uint64()))
    return ["t.parquet", "--profile", "v7"], "v7"


def _bad_memory(d):
    _trace(d / "t.parquet", gpa=pa.array([0], pa.uint64()))
    return ["t.parquet", "--memory", "12345"], "--memory"


@pytest.mark.parametrize("make", [
    _bad_missing_gpa, _bad_nulls, _bad_size_0, _bad_size_4097_late, _bad_negative,
    _bad_truncated, _bad_empty_parquet, _bad_empty_stream, _bad_protection_outside,
    _bad_range_crossing, _bad_profile, _bad_memory,
], ids=lambda make: make.__name__[5:])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, monkeypatch, make):
    monkeypatch.chdir(tmp_path)
    args, expected = make(tmp_path)
    before = listing(tmp_path)
    result = invoke("replay", *args, "--out", "r.parquet", "--exits", "e.arrow",
                    "--summary", "s.json", "--save-state", "st.npz")
    line = assert_one_error_line(result)
    assert expected in line
    assert listing(tmp_path) == before


def test_interrupted_replay_leaves_no_file(tmp_path, monkeypatch):
    from sppjit.replay import Replay

    monkeypatch.chdir(tmp_path)
    _trace(tmp_path / "t.parquet", gpa=np.arange(40, dtype=np.uint64) * 4096)
    before = listing(tmp_path)
    original = Replay.run
    calls = []

    def run(self, batch, keep=True):
        calls.append(len(batch))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, batch, keep)

    monkeypatch.setattr(Replay, "run", run)
    result = invoke("replay", "t.parquet", "--batch-size", 8, "--out", "r.parquet",
                    "--exits", "e.parquet", "--summary", "s.json")
    assert result.exit_code == 130, result.output
    assert result.stderr.splitlines() == ["sppjit: interrupted"]
    assert calls == [8, 8]
    assert listing(tmp_path) == before


def test_failure_after_tables_commit_removes_them(tmp_path, monkeypatch):
    """A failure while writing the summary takes back the tables already renamed."""
    import sppjit.io.output as output

    monkeypatch.chdir(tmp_path)
    _trace(tmp_path / "t.parquet", gpa=np.arange(10, dtype=np.uint64) * 4096)
    before = listing(tmp_path)

    def broken(path, obj):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(output, "write_json_atomic", broken)
    result = invoke("replay", "t.parquet", "--out", "r.parquet", "--exits", "e.parquet",
                    "--summary", "s.json")
    assert result.exit_code == 1
    assert result.stderr.splitlines() == ["sppjit: error: No space left on device: s.json"]
    assert listing(tmp_path) == before


def test_internal_error_is_one_line_and_debug_shows_traceback(tmp_path, monkeypatch):
    from sppjit.replay import Replay

    _trace(tmp_path / "t.parquet", gpa=np.arange(4, dtype=np.uint64))

    def run(self, batch, keep=True):
        raise RuntimeError("boom")

    monkeypatch.setattr(Replay, "run", run)
    monkeypatch.delenv("SPPJIT_DEBUG", raising=False)
    result = invoke("replay", tmp_path / "t.parquet")
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("sppjit: internal error: RuntimeError: boom")
    result = invoke("replay", tmp_path / "t.parquet", env={"SPPJIT_DEBUG": "1"})
    assert result.exit_code == 1
    assert "Traceback" in result.stderr and "boom" in result.stderr


def test_output_checks_come_before_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _trace(tmp_path / "t.parquet", gpa=np.arange(4, dtype=np.uint64))
    before = listing(tmp_path)
    for args, expected in (
        (["--out", "r.csv"], "--out: unknown output format"),
        (["--exits", "missing/e.parquet"], "--exits: directory does not exist"),
        (["--out", "t.parquet"], "same file as TRACE"),
        (["--out", "r.parquet", "--exits", "r.parquet"], "same file as --out"),
        (["--memory", "1GiB", "--memslots", "slots.csv"], "cannot be used together"),
    ):
        line = assert_one_error_line(invoke("replay", "t.parquet", *args))
        assert expected in line, line
    assert listing(tmp_path) == before


# ------------------------------------------------------------------------------ generate

def test_generate_writes_what_replay_reads(tmp_path):
    line = None
    for ext in ("csv", "json", "jsonl", "arrow"):
        result = invoke("generate", "guarded", "--accesses", 50, "--seed", 1, "--out",
                        tmp_path / f"t{ext}.parquet", "--protect-out", tmp_path / f"p.{ext}")
        assert result.exit_code == 0, result.output
        line = result.stdout.strip()
        maps = read_protection(tmp_path / f"p.{ext}")
        assert len(maps.gfn) > 0
    assert "--memory 4GiB --vcpus 2" in line and "sppjit replay" in line
    assert len(line.splitlines()) == 1
    tables = [pq.read_table(tmp_path / f"t{ext}.parquet") for ext in ("csv", "json")]
    assert tables[0].equals(tables[1])  # same scenario, same seed, same trace
    schema = tables[0].schema
    assert [(f.name, str(f.type)) for f in schema] == [
        ("gpa", "uint64"), ("size", "uint16"), ("vcpu", "uint16"), ("kind", "uint8"),
        ("seq", "uint64")]
    meta = schema.metadata
    assert meta[b"sppjit.scenario"] == b"guarded" and meta[b"sppjit.vcpus"] == b"2"
    assert meta[b"sppjit.seed"] == b"1" and b"sppjit.schema_version" in meta


def test_generate_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = listing(tmp_path)
    for args, expected in (
        (["nope", "--accesses", 5, "--out", "t.parquet"], "unknown scenario"),
        (["uniform", "--accesses", 0, "--out", "t.parquet"], "--accesses"),
        (["uniform", "--accesses", 5, "--out", "t.txt"], "--out"),
        (["uniform", "--accesses", 5, "--out", "t.parquet", "--protect-out", "p.xml"],
         "--protect-out"),
        (["uniform", "--accesses", 5, "--out", "t.parquet", "--protect-out", "p.json"],
         "protects no pages"),
    ):
        line = assert_one_error_line(invoke("generate", *args))
        assert expected in line, line
    assert listing(tmp_path) == before
    # Without protection the CSV form still says which columns it has.
    result = invoke("generate", "uniform", "--accesses", 5, "--out", "t.arrow",
                    "--protect-out", "p.csv")
    assert result.exit_code == 0, result.output
    assert len(read_protection(tmp_path / "p.csv").gfn) == 0
    assert invoke("replay", "t.arrow", "--protect", "p.csv").exit_code == 0


# ------------------------------------------------------------------------------ inspect

def test_save_state_then_inspect(tmp_path):
    trace = tmp_path / "t.parquet"
    gpa = np.array([0x5000, 0x5080, 0x6000], dtype=np.uint64)
    vcpu = np.array([0, 1, 0], dtype=np.uint16)  # vCPU 1 takes the SPP violation
    pq.write_table(pa.table({"gpa": gpa, "vcpu": vcpu}), trace)
    (tmp_path / "p.csv").write_text("gfn,access\n5,0xfffffffd\n")
    result = invoke("replay", trace, "--protect", tmp_path / "p.csv", "--vcpus", 2,
                    "--save-state", tmp_path / "s.npz")
    assert result.exit_code == 0, result.output
    result = invoke("inspect", tmp_path / "s.npz", "--gpa", "0x5080", "--gpa", 24576)
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "vCPU 0" in text and "vCPU 1" in text
    assert "ENABLE_EPT ENABLE_SPP" in text and "ACTIVATE_SECONDARY_CONTROLS" in text
    assert "EPT_VIOLATION" in text
    assert "gpa 0x5080" in text and "gpa 0x6000" in text
    assert "SPP 1" in text  # the protected page's EPT leaf
    assert "10111111 11111111 11111111 11111111" in text  # sub-page 1 write-protected
    result = invoke("inspect", tmp_path / "s.npz", "--gpa", "0x5080", "--vcpu", 1, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [cpu["vcpu"] for cpu in report["vcpus"]] == [1]
    assert report["vcpus"][0]["decoded"]["spp_enabled"]
    (walk,) = report["walks"]
    assert walk["vcpu"] == 1 and walk["subpage"] == 1
    leaf = walk["ept"][-1]
    assert leaf["level"] == 1 and leaf["spp"] and not leaf["w"]
    assert walk["sppt"][-1]["subpages"][:2] == "10"
    for args, expected in ((["--vcpu", 2], "--vcpu"), (["--gpa", "0xzz"], "--gpa"),
                           (["--gpa", str(1 << 48)], "48-bit")):
        line = assert_one_error_line(invoke("inspect", tmp_path / "s.npz", *args))
        assert expected in line
    assert "not an sppjit state" in assert_one_error_line(invoke("inspect", trace))
    assert "no such file" in assert_one_error_line(invoke("inspect", tmp_path / "x.npz"))
