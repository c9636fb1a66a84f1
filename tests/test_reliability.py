"""Reliability of the I/O and the command line (docs/reliability.md): every Arrow flavour
reads the same, corrupt or hostile inputs give one line and exit 2, a failed or interrupted
run leaves every output path as it was, and signals end a run cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
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


# ------------------------------------------------- a failed run leaves every path as it was (4)

def _small_trace(path: Path, rows: int = 3000) -> Path:
    table = pa.table({"gpa": np.arange(rows, dtype=np.uint64) * 64,
                      "seq": np.arange(rows, dtype=np.uint64)})
    pq.write_table(table, path, row_group_size=500)
    return path


def test_failed_run_restores_the_files_it_replaced(tmp_path, monkeypatch):
    import errno

    import sppjit.io.output as output

    trace = _small_trace(tmp_path / "t.parquet")
    (tmp_path / "r.parquet").write_bytes(b"the user's earlier results")
    (tmp_path / "s.json").write_text("the user's earlier summary")
    before = sorted(os.listdir(tmp_path))

    def disk_full(path, obj):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    # --out is published over the older file before the summary fails.
    monkeypatch.setattr(output, "write_json_atomic", disk_full)
    result = invoke("replay", trace, "--memory", "1MiB", "--out", tmp_path / "r.parquet",
                    "--summary", tmp_path / "s.json", "--batch-size", 1000)
    assert result.exit_code == 1, result.output
    assert result.stderr.splitlines() == [
        f"sppjit: error: No space left on device: {tmp_path / 's.json'}"]
    assert sorted(os.listdir(tmp_path)) == before  # no temporary, no kept-aside file
    assert (tmp_path / "r.parquet").read_bytes() == b"the user's earlier results"
    assert (tmp_path / "s.json").read_text() == "the user's earlier summary"


@pytest.mark.parametrize("hard_links", [True, False])
def test_outputs_restore_old_files_and_drop_them_on_success(tmp_path, monkeypatch, hard_links):
    import errno

    from sppjit.io.atomic import Outputs, atomic_path

    if not hard_links:  # a file system without them (FAT, some network mounts)
        def no_link(*args, **kwargs):
            raise OSError(errno.EPERM, "Operation not permitted")

        monkeypatch.setattr(os, "link", no_link)
    old, new = tmp_path / "old.txt", tmp_path / "new.txt"
    old.write_text("old")
    with pytest.raises(RuntimeError):
        with Outputs():
            for path in (old, new):
                with atomic_path(path) as temporary:
                    Path(temporary).write_text("replacement")
            assert old.read_text() == new.read_text() == "replacement"
            raise RuntimeError("a later output failed")
    assert old.read_text() == "old" and not new.exists()
    assert sorted(os.listdir(tmp_path)) == ["old.txt"]
    with Outputs():
        with atomic_path(old) as temporary:
            Path(temporary).write_text("replacement")
    assert old.read_text() == "replacement"
    assert sorted(os.listdir(tmp_path)) == ["old.txt"]  # the kept-aside file is gone


# ------------------------------------------------------------------------------ signals (5, 9)

def _signal_at_second_batch(monkeypatch, signum):
    """The replay receives ``signum`` from the OS while replaying its second batch."""
    import sppjit.replay as replay_module

    run = replay_module.Replay.run
    calls = []

    def run_then_signal(self, batch, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            signal.raise_signal(signum)
        return run(self, batch, **kwargs)

    monkeypatch.setattr(replay_module.Replay, "run", run_then_signal)


@pytest.mark.parametrize("signum, code, line", [(signal.SIGINT, 130, "sppjit: interrupted"),
                                                 (signal.SIGTERM, 143, "sppjit: terminated")])
def test_signal_mid_run_restores_every_output(tmp_path, monkeypatch, signum, code, line):
    trace = _small_trace(tmp_path / "t.parquet")
    (tmp_path / "r.parquet").write_bytes(b"earlier")
    before = sorted(os.listdir(tmp_path))
    _signal_at_second_batch(monkeypatch, signum)
    result = invoke("replay", trace, "--memory", "1MiB", "--out", tmp_path / "r.parquet",
                    "--summary", tmp_path / "s.json", "--batch-size", 1000)
    assert result.exit_code == code, result.output
    assert result.stderr.splitlines() == [line]
    assert sorted(os.listdir(tmp_path)) == before
    assert (tmp_path / "r.parquet").read_bytes() == b"earlier"


def test_swallowed_interrupt_still_ends_the_run(tmp_path, monkeypatch):
    """numba's dispatcher clears pending Python errors while it loads a cached kernel: the
    KeyboardInterrupt raised there never reaches sppjit, but the run must not succeed."""
    import sppjit.replay as replay_module

    compile_ = replay_module.Replay._compile

    def compile_swallowing(self, *args):
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            pass  # what a C extension clearing the error amounts to
        return compile_(self, *args)

    monkeypatch.setattr(replay_module.Replay, "_compile", compile_swallowing)
    trace = _small_trace(tmp_path / "t.parquet")
    result = invoke("replay", trace, "--memory", "1MiB", "--summary", tmp_path / "s.json")
    assert result.exit_code == 130, result.output
    assert result.stderr.splitlines() == ["sppjit: interrupted"]
    assert sorted(os.listdir(tmp_path)) == ["t.parquet"]


_KILLED_RUN = """
import os, signal, sys
import sppjit.replay as replay_module
run = replay_module.Replay.run
calls = []
def run_then_kill(self, batch, **kwargs):
    calls.append(1)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.{signal})
    return run(self, batch, **kwargs)
replay_module.Replay.run = run_then_kill
from sppjit.cli import main
main(sys.argv[1:])
"""


def _run_killed(tmp_path, signame, *args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", _KILLED_RUN.format(signal=signame),
                           *map(str, args)], capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=240)


def test_sigterm_in_a_real_process(tmp_path):
    _small_trace(tmp_path / "t.parquet")
    (tmp_path / "r.parquet").write_bytes(b"earlier")
    done = _run_killed(tmp_path, "SIGTERM", "replay", "t.parquet", "--memory", "1MiB",
                       "--out", "r.parquet", "--exits", "e.arrow", "--batch-size", 1000)
    assert done.returncode == 143, done.stderr
    assert done.stderr.splitlines() == ["sppjit: terminated"]
    assert sorted(os.listdir(tmp_path)) == ["r.parquet", "t.parquet"]
    assert (tmp_path / "r.parquet").read_bytes() == b"earlier"


def test_next_run_removes_what_a_killed_run_left(tmp_path):
    from sppjit.io import atomic

    _small_trace(tmp_path / "t.parquet")
    done = _run_killed(tmp_path, "SIGKILL", "replay", "t.parquet", "--memory", "1MiB",
                       "--out", "r.parquet", "--exits", "e.arrow", "--batch-size", 1000)
    assert done.returncode == -signal.SIGKILL
    left = sorted(set(os.listdir(tmp_path)) - {"t.parquet"})
    assert len(left) == 2 and all(name.startswith(".sppjit-") for name in left), left
    # Temporaries of a live process and of another host are not this run's to remove.
    alive = f".sppjit-{atomic._HOST}-{os.getpid()}-0123abcd.tmp"
    other = ".sppjit-zzzz-1-0123abcd.tmp"
    for name in (alive, other):
        (tmp_path / name).write_bytes(b"")
    done = run_cli("replay", "t.parquet", "--memory", "1MiB", "--out", "r.parquet",
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert sorted(os.listdir(tmp_path)) == sorted([alive, other, "r.parquet", "t.parquet"])


def test_a_255_byte_output_name_works(tmp_path):
    trace = _small_trace(tmp_path / "t.parquet")
    name = "r" * (255 - len(".parquet")) + ".parquet"
    result = invoke("replay", trace, "--memory", "1MiB", "--out", tmp_path / name,
                    "--summary", tmp_path / ("s" * 250 + ".json"))
    assert result.exit_code == 0, result.output
    assert pq.read_table(tmp_path / name).num_rows == 3000


@pytest.mark.parametrize("option", ["--out", "--summary", "--exits"])
def test_unwritable_output_found_before_the_replay(tmp_path, option):
    # The trace is corrupt: an error about it would mean the outputs were checked after.
    (tmp_path / "t.parquet").write_bytes(b"PAR1 not really")
    too_long = tmp_path / ("x" * 300 + (".json" if option == "--summary" else ".parquet"))
    result = invoke("replay", tmp_path / "t.parquet", "--memory", "1MiB", option, too_long)
    line = assert_one_error_line(result)
    assert line.startswith(f"sppjit: error: {option}: file name longer than the 255 bytes"), line
    if os.path.isdir("/proc"):  # a directory that takes no new file, even from root
        result = invoke("replay", tmp_path / "t.parquet", "--memory", "1MiB", option,
                        "/proc/r" + too_long.suffix)
        line = assert_one_error_line(result)
        assert line.startswith(f"sppjit: error: {option}: "), line
        assert "t.parquet" not in line
    assert sorted(os.listdir(tmp_path)) == ["t.parquet"]


def test_v12_quirk_is_one_note_line(tmp_path):
    trace = _small_trace(tmp_path / "t.parquet", rows=20)
    (tmp_path / "m.csv").write_text("slot,base_gfn,npages\n0,0,256\n1,256,256\n")
    (tmp_path / "p.csv").write_text("gfn,access\n3,0\n")
    (tmp_path / "o.csv").write_text("at,op,gfn\n5,delete_memslot,300\n")
    result = invoke("replay", trace, "--memslots", tmp_path / "m.csv", "--protect",
                    tmp_path / "p.csv", "--ops", tmp_path / "o.csv", "--profile", "v12")
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == [
        "sppjit: note: profile v12: deleting memslot 1 cleared spp_active for the whole VM "
        "(kvm_spp_free_memslot); SPP calls now fail with ENODEV until SPP is enabled again"]


def test_closed_stdout_is_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "sppjit.cli", "--version"], stdout=None,
                          stderr=subprocess.PIPE, text=True, timeout=120, close_fds=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)},
                          preexec_fn=lambda: os.close(1))
    assert done.returncode == 1
    assert done.stderr.splitlines() == ["sppjit: error: standard output is closed"]


def test_broken_pipe_is_one_line(tmp_path):
    trace = _small_trace(tmp_path / "t.parquet")
    reader, writer = os.pipe()
    os.close(reader)  # nobody reads: the first write gets EPIPE
    try:
        done = subprocess.run([sys.executable, "-m", "sppjit.cli", "replay", str(trace),
                               "--memory", "1MiB", "--summary", "s.json"], stdout=writer,
                              stderr=subprocess.PIPE, text=True, timeout=240, cwd=tmp_path,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    finally:
        os.close(writer)
    assert done.returncode == 1
    assert done.stderr.splitlines() == ["sppjit: error: standard output was closed "
                                        "(broken pipe)"]


def test_parquet_directory_of_mixed_types_is_refused(tmp_path):
    directory = tmp_path / "trace"
    directory.mkdir()
    pq.write_table(pa.table({"gpa": np.arange(10, dtype=np.uint64)}), directory / "part-1.parquet")
    pq.write_table(pa.table({"gpa": np.arange(10, dtype=np.int32)}), directory / "part-2.parquet")
    line = assert_one_error_line(invoke("replay", directory, "--memory", "1MiB"))
    assert line == (f"sppjit: error: trace: {directory / 'part-2.parquet'} differs from "
                    f"{directory / 'part-1.parquet'} in the same directory ('gpa' int32); "
                    "every file of a directory trace must have the same columns and types")


# ------------------------------------------------------------------ bad input, exit 2 (8)

def test_corrupt_gzip_input_to_convert(tmp_path):
    import gzip

    body = "addr,size\n" + "".join(f"0x{i * 64:x},8\n" for i in range(2000))
    data = bytearray(gzip.compress(body.encode()))
    data[len(data) // 2] ^= 0x10  # inside the deflate stream: zlib's own error, not OSError
    (tmp_path / "t.csv.gz").write_bytes(bytes(data))
    result = invoke("convert", "csv", tmp_path / "t.csv.gz", "--out", tmp_path / "o.parquet")
    line = assert_one_error_line(result)
    assert line.startswith(f"sppjit: error: convert: cannot read {tmp_path / 't.csv.gz'}: "), line
    assert sorted(os.listdir(tmp_path)) == ["t.csv.gz"]


def _non_utf8_name(path: Path, suffix: str) -> None:
    table = pa.table({"gpa": np.arange(4, dtype=np.uint64), "zzzz": np.arange(4, dtype=np.uint64)})
    if suffix == ".parquet":
        pq.write_table(table, path)
    else:
        with ipc.new_file(path, table.schema) as writer:
            writer.write_table(table)
    path.write_bytes(path.read_bytes().replace(b"zzzz", b"\xff\xfe\xfd\xfc"))


@pytest.mark.parametrize("suffix", [".parquet", ".arrow"])
def test_column_name_not_utf8(tmp_path, suffix):
    _non_utf8_name(tmp_path / f"t{suffix}", suffix)
    line = assert_one_error_line(invoke("replay", tmp_path / f"t{suffix}", "--memory", "1MiB"))
    assert line == (f"sppjit: error: trace: cannot read {tmp_path / f't{suffix}'}: a column "
                    "name is not valid UTF-8")
    _non_utf8_name(tmp_path / f"p{suffix}", suffix)
    line = assert_one_error_line(invoke("replay", _small_trace(tmp_path / "ok.parquet"),
                                        "--memory", "1MiB", "--protect", tmp_path / f"p{suffix}"))
    assert line.startswith(f"sppjit: error: protection: cannot read {tmp_path / f'p{suffix}'}: "
                           "not valid UTF-8"), line


@pytest.mark.parametrize("option, name, text", [
    ("--protect", "p.json", "[" * 100_000 + "]" * 100_000),
    ("--protect", "p.jsonl", '{"gfn": ' + "[" * 100_000 + "]" * 100_000 + "}\n"),  # segfaulted
    ("--memslots", "m.json", '[{"slot": 0, "base_gfn": ' + "[" * 5000 + "]" * 5000 + "}]"),
    ("--ops", "o.jsonl", '{"at": ' + "{\"a\": " * 5000 + "1" + "}" * 5000 + "}\n"),
])
def test_deeply_nested_json(tmp_path, option, name, text):
    trace = _small_trace(tmp_path / "t.parquet", rows=10)
    (tmp_path / name).write_text(text)
    args = ["--memory", "1MiB"] if option != "--memslots" else []
    # A subprocess: pyarrow.json's parser overflowed its stack on the JSON Lines file.
    done = run_cli("replay", trace, *args, option, name, cwd=tmp_path)
    assert done.returncode == 2, (done.returncode, done.stderr)
    lines = done.stderr.splitlines()
    what = {"--protect": "protection", "--memslots": "memslots", "--ops": "ops"}[option]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"sppjit: error: {what}: cannot read {name}: JSON nested "), lines


def test_file_name_not_utf8(tmp_path):
    done = subprocess.run([sys.executable, "-m", "sppjit.cli", "replay", b"t\xff.parquet",
                           "--memory", "1MiB"], capture_output=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert done.returncode == 2
    assert done.stderr.decode().splitlines() == [
        "sppjit: error: argument is not valid UTF-8: t\\xff.parquet (sppjit reads and writes "
        "UTF-8 file names only)"]


@pytest.mark.parametrize("args", [
    ["replay", "t.parquet", "--memory", "1MiB", "--batch-size", 2 ** 63],
    ["replay", "t.parquet", "--memory", "1MiB", "--batch-size", 2 ** 64 + 1],
    ["generate", "uniform", "--accesses", 10 ** 12, "--out", "g.parquet"],
    ["generate", "uniform", "--accesses", 10 ** 30, "--out", "g.parquet"],
])
def test_numbers_too_large(tmp_path, args):
    _small_trace(tmp_path / "t.parquet", rows=10)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        line = assert_one_error_line(invoke(*args))
    finally:
        os.chdir(cwd)
    assert "Invalid value for" in line and "less than or equal to" in line, line
    assert sorted(os.listdir(tmp_path)) == ["t.parquet"]


_GENERATE_RSS = """
import sys
from sppjit.cli import main
from sppjit.rss import own_peak_rss
try:
    main(["generate", "uniform", "--accesses", sys.argv[1], "--out", sys.argv[2]])
except SystemExit as exit:
    assert exit.code == 0, exit.code
print(own_peak_rss() // 1024)  # KiB, this process's own (not the test process's: sppjit.rss)
"""


def test_generate_streams_in_bounded_memory(tmp_path):
    """Peak RSS does not grow with the number of rows: 1 M against 5 M rows (holding the
    rows took ~38 bytes each, 150 MiB more for the larger run)."""
    peaks = []
    for rows in (1 << 20, 5 << 20):
        done = subprocess.run([sys.executable, "-c", _GENERATE_RSS, str(rows),
                               str(tmp_path / f"{rows}.parquet")], capture_output=True,
                              text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                              timeout=240)
        assert done.returncode == 0, done.stderr
        peaks.append(int(done.stdout.split()[-1]))
        assert pq.read_metadata(tmp_path / f"{rows}.parquet").num_rows == rows
    assert peaks[1] - peaks[0] < 40 * 1024, peaks


def test_streamed_scenarios_are_the_whole_draw():
    """Up to one chunk, streaming draws exactly what one call did; past it, chunks continue
    the trace (row numbers, fault-storm's new page per access) in any piece size."""
    from sppjit.datasets import scenarios as S

    for name in S.SCENARIOS:
        whole = S.make(name, 5000, 9)
        layout, chunks = S.stream(name, 5000, 9, rows=700)
        pieces = list(chunks)
        assert max(len(piece["gpa"]) for piece in pieces) == 700
        for key in ("gpa", "size", "vcpu", "kind"):
            assert np.array_equal(np.concatenate([p[key] for p in pieces]), getattr(whole, key))
        assert np.array_equal(layout.protect_gfn, whole.protect_gfn)
    total = S.CHUNK_ROWS * 2 + 3
    layout, chunks = S.stream("fault-storm", total, 1)
    gfn = np.concatenate([piece["gpa"] for piece in chunks]) >> np.uint64(12)
    assert len(gfn) == total and len(np.unique(gfn)) == total
    assert int(gfn.max()) < layout.memory // 4096


# ---------------------------------------------------------- a trace shrinking mid-replay (7)

_SHRINK = """
import os, sys
import numpy as np, pyarrow as pa, pyarrow.ipc as ipc
from sppjit.errors import InputError
from sppjit.io.trace import open_trace
path = sys.argv[1]
table = pa.table({"gpa": np.arange(400_000, dtype=np.uint64) * 8})
with ipc.new_file(path, table.schema) as writer:
    writer.write_table(table, max_chunksize=100_000)
reader = open_trace(path, batch_size=100_000)
first = next(reader)
os.truncate(path, 4096)  # another process rewrites the file under the replay
try:
    for batch in reader:
        int(batch.gpa.sum())
except InputError as exc:
    print(exc)
"""


def test_trace_shrinking_during_the_replay(tmp_path):
    done = subprocess.run([sys.executable, "-c", _SHRINK, str(tmp_path / "t.arrow")],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, (done.returncode, done.stderr)  # was -7: SIGBUS
    assert done.stdout.startswith(f"trace: cannot read {tmp_path / 't.arrow'}: "), done.stdout


# ------------------------------------------------------------------ the digest thread (9)

def test_digest_of_a_directory_with_a_name_not_utf8(tmp_path):
    from sppjit.provenance import BackgroundDigests, file_digest

    (tmp_path / "a.parquet").write_bytes(b"data")
    with open(os.path.join(os.fsencode(tmp_path), b"\xff.parquet"), "wb") as handle:
        handle.write(b"more")
    digest = file_digest(tmp_path)  # was UnicodeEncodeError, printed by the thread
    assert digest.startswith("blake3:") and digest != file_digest(tmp_path / "a.parquet")
    assert BackgroundDigests({"trace": str(tmp_path)}).result() == {"trace": digest}


def test_digest_thread_records_unexpected_errors(tmp_path, monkeypatch, capsys):
    import sppjit.provenance as provenance

    def broken(path):
        raise RuntimeError("something unexpected")

    monkeypatch.setattr(provenance, "file_digest", broken)
    result = provenance.BackgroundDigests({"trace": str(tmp_path)}).result()
    assert result == {"trace": "unavailable: RuntimeError: something unexpected"}
    assert capsys.readouterr().err == ""  # no traceback from the thread


def test_text_not_utf8_in_json_lines(tmp_path):
    """Found by tests/test_fuzz.py: pyarrow.json lets invalid UTF-8 through into a string
    column, which failed later as an internal UnicodeDecodeError."""
    trace = _small_trace(tmp_path / "t.parquet", rows=10)
    (tmp_path / "o.jsonl").write_bytes(b'{"at": 5, "op": "zap\xff\xfe", "gfn": 1}\n')
    line = assert_one_error_line(invoke("replay", trace, "--memory", "1MiB", "--ops",
                                        tmp_path / "o.jsonl"))
    assert line == (f"sppjit: error: ops: cannot read {tmp_path / 'o.jsonl'}: not valid UTF-8 "
                    "(a column name or the text)")


_INTERRUPT_AT_IMPORT = """
import os, runpy, signal, sys
class SignalAtImport:
    def find_spec(self, name, path=None, target=None):
        if name == "typer":  # the first slow import of the command line
            os.kill(os.getpid(), signal.{signal})
        return None
sys.meta_path.insert(0, SignalAtImport())
sys.argv = ["sppjit", "--version"]
runpy.run_module("sppjit.cli", run_name="__main__")
"""


@pytest.mark.parametrize("signame, code, line", [("SIGINT", 130, "sppjit: interrupted"),
                                                  ("SIGTERM", 143, "sppjit: terminated")])
def test_signal_during_imports_is_one_line(signame, code, line):
    done = subprocess.run([sys.executable, "-c", _INTERRUPT_AT_IMPORT.format(signal=signame)],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == code, done.stderr
    assert done.stderr.splitlines() == [line]


@pytest.mark.parametrize("text", ["0x-1ffff0000", "+-5", "--5"])
def test_sign_inside_a_number(tmp_path, text):
    """Found by tests/test_fuzz.py: Python's int() takes the sign after "0x" (or a second
    one), and the negative value reached pyarrow as an internal OverflowError."""
    trace = _small_trace(tmp_path / "t.parquet", rows=10)
    (tmp_path / "p.json").write_text(json.dumps([{"gfn": 1, "access": text},
                                                 {"gfn": 5, "access": 7}]))
    line = assert_one_error_line(invoke("replay", trace, "--memory", "1MiB", "--protect",
                                        tmp_path / "p.json"))
    assert line == (f"sppjit: error: protection: column 'access' has value '{text}' at row 0, "
                    "not a decimal or 0x-hex integer")
