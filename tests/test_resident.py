"""sppjit serve and SPPJIT_SERVER (sppjit.resident, sppjit.launcher): a command run by a
resident server prints, writes and exits exactly as it does run in its own process, in the
client's directory and with the client's settings; and where no server can run it, the
command runs where it was started, saying why."""

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from sppjit import __version__, cli, resident
from sppjit.launcher import forwardable

SAMPLE = Path(__file__).resolve().parents[1] / "datasets" / "sample"
TRACE, PROTECT = SAMPLE / "guarded-200k.parquet", SAMPLE / "guarded-protect.parquet"
TIMING = ("seconds", "compile_seconds", "accesses_per_second")


def _short_dir() -> str:
    # A Unix socket's path has a ~100-byte limit; pytest's tmp_path can be longer.
    return tempfile.mkdtemp(prefix="sppjit-t-")


class Server:
    """resident.serve on a thread of this process, running cli.run."""

    def __init__(self, version: str = __version__):
        self.dir = _short_dir()
        self.path = os.path.join(self.dir, "s.sock")
        self.codes: list[int] = []
        ready = threading.Event()

        def run(argv):
            code = cli.run(argv)
            self.codes.append(code)
            return code

        self.thread = threading.Thread(target=resident.serve, args=(self.path, run, version),
                                       kwargs={"ready": ready.set}, daemon=True)
        self.thread.start()
        assert ready.wait(timeout=120), "the server did not start"

    def close(self):
        resident.stop(self.path)
        self.thread.join(timeout=120)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def _forward(path, argv):
    out, err = io.BytesIO(), io.BytesIO()
    code = resident.forward(path, argv, __version__, stdout=out, stderr=err)
    return code, out.getvalue().decode(), err.getvalue().decode()


def _summary(path: Path) -> dict:
    doc = json.loads(path.read_text())
    for key in TIMING:
        doc.pop(key)
    return doc


def _replay_args(out_dir: str) -> list[str]:
    return ["replay", str(TRACE), "--protect", str(PROTECT), "--vcpus", "2", "--json", "--no-progress",
            "--out", f"{out_dir}/r.parquet", "--exits", f"{out_dir}/e.parquet", "--summary", f"{out_dir}/s.json"]


def test_a_served_replay_equals_one_run_here(server, tmp_path, monkeypatch, capsys):
    """Relative output paths land in the client's directory; the summary printed and written,
    the results and the exit log equal those of the same command run in this process."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "here").mkdir()
    (tmp_path / "served").mkdir()
    assert cli.run(_replay_args("here")) == 0
    printed_here = json.loads(capsys.readouterr().out)
    code, out, err = _forward(server.path, _replay_args("served"))
    assert code == 0, err
    printed_served = json.loads(out)
    for doc in (printed_here, printed_served):
        for key in TIMING:
            doc.pop(key)
    assert printed_served == printed_here
    assert _summary(tmp_path / "served" / "s.json") == _summary(tmp_path / "here" / "s.json")
    for name in ("r.parquet", "e.parquet"):
        assert pq.read_table(tmp_path / "served" / name).equals(pq.read_table(tmp_path / "here" / name))
    assert server.codes == [0]
    assert os.getcwd() == str(tmp_path)  # the server went back to its own directory


def test_bad_input_served_is_one_error_line_and_exit_2(server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = _forward(server.path, ["replay", "missing.parquet"])
    assert code == 2 and out == ""
    assert err.splitlines() == ["sppjit: error: trace: no such file: missing.parquet"]
    # and the server goes on serving
    code, out, _ = _forward(server.path, ["--version"])
    assert (code, out) == (0, f"sppjit {__version__}\n")


def test_the_clients_settings_apply_and_the_servers_come_back(server, tmp_path, monkeypatch):
    """SPPJIT_DEBUG=1 on the client shows an internal error's traceback from the server;
    the server's own environment is as it was after the command."""
    monkeypatch.chdir(tmp_path)
    before = dict(os.environ)
    monkeypatch.setenv("SPPJIT_DEBUG", "1")
    env = resident._client_env()
    assert env["SPPJIT_DEBUG"] == "1" and resident.ENV_SERVER not in env
    monkeypatch.delenv("SPPJIT_DEBUG")
    # A request carrying SPPJIT_DEBUG: the command sees it while it runs, not after.
    seen = {}

    def run(argv):
        seen["debug"] = os.environ.get("SPPJIT_DEBUG")
        seen["cwd"] = os.getcwd()
        sys.stdout.write("out\n")
        sys.stderr.write("err\n")
        return 3

    d = _short_dir()
    path = os.path.join(d, "s.sock")
    ready = threading.Event()
    t = threading.Thread(target=resident.serve, args=(path, run, __version__), kwargs={"ready": ready.set},
                         daemon=True)
    t.start()
    assert ready.wait(timeout=60)
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    monkeypatch.setenv("SPPJIT_DEBUG", "1")
    try:
        code, out, err = _forward(path, ["anything"])
    finally:
        monkeypatch.delenv("SPPJIT_DEBUG")
        resident.stop(path)
        t.join(timeout=60)
        shutil.rmtree(d)
    assert (code, out, err) == (3, "out\n", "err\n")
    assert seen == {"debug": "1", "cwd": str(tmp_path / "sub")}
    assert dict(os.environ) == before


def test_a_command_that_exits_on_its_own_gives_its_code():
    d = _short_dir()
    path = os.path.join(d, "s.sock")
    ready = threading.Event()

    def run(argv):
        sys.exit(int(argv[0]))

    t = threading.Thread(target=resident.serve, args=(path, run, __version__), kwargs={"ready": ready.set},
                         daemon=True)
    t.start()
    assert ready.wait(timeout=60)
    try:
        assert _forward(path, ["7"])[0] == 7
        assert _forward(path, ["0"])[0] == 0  # and the server is still there
    finally:
        resident.stop(path)
        t.join(timeout=60)
        shutil.rmtree(d)


def test_no_server_or_another_version_runs_the_command_here(tmp_path):
    d = _short_dir()
    try:
        code, out, err = _forward(os.path.join(d, "none.sock"), ["--version"])
        assert code is None and out == ""
        assert err.startswith("sppjit: note: no sppjit server answers at ")
        assert err.endswith("; running the command in this process\n")
    finally:
        shutil.rmtree(d)
    other = Server(version="0.0.0-other")
    try:
        code, out, err = _forward(other.path, ["--version"])
        assert code is None and out == ""
        assert f"runs sppjit 0.0.0-other, the client is sppjit '{__version__}'" in err
        assert other.codes == []
    finally:
        other.close()


def test_what_the_client_cannot_send_runs_here(server, tmp_path, monkeypatch):
    """A working directory that was removed, or a standard stream that is closed: the
    command runs in the client's process, which says what is wrong, in the usual way."""
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    code, out, err = _forward(server.path, ["--version"])
    assert code is None and out == "" and "the working directory is gone" in err
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "stdout", None)
    assert resident.forward(server.path, ["--version"], __version__) is None
    assert server.codes == []


class _ClosedPipe(io.RawIOBase):
    def writable(self):
        return True

    def write(self, data):
        raise BrokenPipeError(32, "Broken pipe")


def test_a_closed_standard_output_ends_the_client_as_the_program_ends(server, tmp_path):
    """`sppjit ... | head`: the client drops the rest of the output, says so in one line and
    exits 1, as the program does in place; the command ran to its end on the server."""
    err = io.BytesIO()
    out = tmp_path / "t.parquet"
    code = resident.forward(server.path, ["generate", "hotset", "--accesses", "100", "--out", str(out)],
                            __version__, stdout=_ClosedPipe(), stderr=err)
    assert code == 1
    assert err.getvalue().decode().splitlines() == ["sppjit: error: standard output was closed (broken pipe)"]
    assert server.codes == [0] and pq.read_table(out).num_rows == 100


def test_an_argument_that_is_not_utf8_is_the_commands_error(server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = os.fsdecode(b"t\xff.parquet")  # a file name in another encoding (a lone surrogate)
    code, out, err = _forward(server.path, ["replay", bad])
    assert code == 2 and out == "" and err.startswith("sppjit: error: argument is not valid UTF-8")


def test_a_malformed_request_is_refused_and_serving_goes_on(server):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(server.path)
        resident._send(sock, resident.REQUEST, b"not json")
        channel, payload = resident._recv(sock)
    assert channel == resident.REFUSED and "not JSON" in json.loads(payload)["reason"]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(server.path)
        resident._send(sock, resident.REQUEST, json.dumps(
            {"protocol": resident.PROTOCOL, "version": __version__, "argv": ["--version"],
             "cwd": "/nonexistent/dir"}).encode())
        channel, payload = resident._recv(sock)
    assert channel == resident.REFUSED and "/nonexistent/dir" in json.loads(payload)["reason"]
    assert _forward(server.path, ["--version"])[0] == 0


def test_a_silent_client_does_not_hold_up_the_others(server, monkeypatch):
    """A connection that never sends its request is dropped after REQUEST_TIMEOUT; the next
    client is served. (The timeout is made short here; nothing waits on a clock but the
    server's own socket timeout.)"""
    monkeypatch.setattr(resident, "REQUEST_TIMEOUT", 0.2)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.connect(server.path)
        code, out, _ = _forward(server.path, ["--version"])
        assert (code, out) == (0, f"sppjit {__version__}\n")
        assert silent.recv(1) == b""  # the server closed the silent one without an answer


def test_a_client_gone_mid_command_leaves_the_server_serving(server, tmp_path):
    """A client that closes its connection at once: its command still runs to its end (its
    output goes nowhere), and the next client is served."""
    out = tmp_path / "t.parquet"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(server.path)
        resident._send(sock, resident.REQUEST, json.dumps(
            {"protocol": resident.PROTOCOL, "version": __version__, "cwd": str(tmp_path),
             "argv": ["generate", "hotset", "--accesses", "100", "--out", str(out)]}).encode())
    code, text, _ = _forward(server.path, ["--version"])  # served after the first, in order
    assert code == 0 and text.startswith("sppjit ")
    assert server.codes == [0, 0] and pq.read_table(out).num_rows == 100


def test_one_socket_one_server(server):
    with pytest.raises(resident.ServerError, match="already answers"):
        resident.serve(server.path, cli.run, __version__)


def test_a_stale_socket_file_is_replaced_and_removed_at_the_end():
    d = _short_dir()
    path = os.path.join(d, "s.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)  # a socket file no one listens at (a server that was killed)
    stale.close()
    try:
        ready = threading.Event()
        thread = threading.Thread(target=resident.serve, args=(path, cli.run, __version__),
                                  kwargs={"ready": ready.set}, daemon=True)
        thread.start()
        assert ready.wait(timeout=60)
        assert oct(os.stat(path).st_mode & 0o777) == "0o600"
        assert _forward(path, ["--version"])[0] == 0
        assert resident.stop(path)
        thread.join(timeout=60)
        assert not os.path.exists(path)
        assert not resident.stop(path)  # nothing answers any more
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_what_the_launcher_forwards():
    assert forwardable(["replay", "t.parquet"])
    assert not forwardable([])
    assert not forwardable(["serve"])
    assert not forwardable(["--version"])  # as cheap here as there
    assert not forwardable(["convert", "lackey", "-", "--out", "t.parquet"])  # reads standard input


def test_sppjit_serve_and_a_client_as_processes(tmp_path):
    """The commands themselves: ``sppjit serve`` in one process, a replay with SPPJIT_SERVER in
    another, ``sppjit serve --stop``; a second server on the same socket is refused."""
    d = _short_dir()
    path = os.path.join(d, "s.sock")
    exe = [sys.executable, "-m", "sppjit"]
    server = subprocess.Popen([*exe, "serve", "--socket", path], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert "serving at" in server.stdout.readline()
        env = {**os.environ, "SPPJIT_SERVER": path}
        client = subprocess.run([*exe, *_replay_args(str(tmp_path))], env=env, capture_output=True,
                                text=True, cwd=tmp_path)
        assert client.returncode == 0, client.stderr
        assert client.stderr == ""  # served: no note
        assert json.loads(client.stdout)["counts"]["accesses"] == 200_000
        assert pq.read_table(tmp_path / "r.parquet").num_rows == 200_000
        second = subprocess.run([*exe, "serve", "--socket", path], capture_output=True, text=True)
        assert second.returncode == 2 and "already answers" in second.stderr
        stop = subprocess.run([*exe, "serve", "--stop", "--socket", path], capture_output=True, text=True)
        assert stop.returncode == 0, stop.stderr
        assert server.wait(timeout=120) == 0
        assert not os.path.exists(path)
        again = subprocess.run([*exe, "serve", "--stop", "--socket", path], capture_output=True, text=True)
        assert again.returncode == 2 and again.stderr.startswith("sppjit: error: --socket: no sppjit server")
        # with no server, SPPJIT_SERVER falls back to running here, with the note
        local = subprocess.run([*exe, "generate", "hotset", "--accesses", "10", "--out",
                                str(tmp_path / "x.parquet")], env=env, capture_output=True, text=True)
        assert local.returncode == 0 and "running the command in this process" in local.stderr
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        shutil.rmtree(d, ignore_errors=True)


def test_the_client_side_imports_nothing_heavy():
    """What a forwarded command loads before it sends itself: the standard library and sppjit's
    light modules, none of numba, numpy, pyarrow or typer (the second a command saves)."""
    probe = ("import sys, sppjit.launcher, sppjit.resident; "
             "print(' '.join(m for m in ('numba', 'numpy', 'pyarrow', 'typer') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
