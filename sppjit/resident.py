"""A resident sppjit: one process that keeps the libraries imported and the kernels loaded, and
runs the command lines other processes send it over a Unix socket.

A command pays about a second before it reads its first row (importing numba and pyarrow,
loading the cached kernels: docs/performance.md, "End to end"); a resident process pays it once.
``serve`` answers requests one at a time, in the order they arrive; ``forward`` is the client
side, which the ``sppjit`` launcher calls when SPPJIT_SERVER names a socket, before it imports
anything heavy. This module imports the standard library only, so that a forwarded command
costs the interpreter's start-up and little more.

The protocol (PROTOCOL), over one connection per command, every message a frame: one channel
byte, a 4-byte big-endian length, the payload.

- client -> server: REQUEST, a JSON object: protocol, version (sppjit's), argv, cwd, env (the
  client's SPPJIT_* settings and its terminal width), or {"stop": true};
- server -> client: STDOUT and STDERR frames as the command writes, then one EXIT frame with the
  JSON {"code": n}; or one REFUSED frame ({"reason": ...}) when the server will not run it (an
  other version, an other protocol), in which case the client runs the command itself.

The server runs a command as the ``sppjit`` program would, in the client's working directory
with the client's SPPJIT_* settings, and restores its own after each one.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import struct
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence

from sppjit.io.closed import STDOUT_CLOSED, stdout_to_devnull

PROTOCOL = 1
ENV_SERVER = "SPPJIT_SERVER"

REQUEST = b"q"
STDOUT = b"1"
STDERR = b"2"
EXIT = b"x"
REFUSED = b"r"

_HEADER = struct.Struct(">cI")
_MAX_REQUEST = 1 << 24  # a command line, its directory and settings: far below this
_BACKLOG = 64  # clients waiting while a command runs
REQUEST_TIMEOUT = 10.0  # seconds a client has to send its request once connected
# The client's settings a command reads: SPPJIT_DEBUG and the like, and the width a table or
# a help text is laid out for.
_FORWARDED_ENV = ("COLUMNS", "NO_COLOR")
# What the client's note ends with when it runs the command itself.
RUNNING_HERE = "running the command in this process"


class ServerError(OSError):
    """A server cannot start (its socket is in use or cannot be made)."""


def default_socket() -> str:
    """Where ``sppjit serve`` listens unless told: the user's runtime directory when there is
    one, else the temporary directory, in a name of this user's."""
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return os.path.join(base, f"sppjit-{os.getuid()}.sock")


# ----------------------------------------------------------------------------- frames
def _send(sock: socket.socket, channel: bytes, payload: bytes) -> None:
    sock.sendall(_HEADER.pack(channel, len(payload)) + payload)


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    chunks, left = [], n
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _recv(sock: socket.socket, limit: int | None = None) -> tuple[bytes, bytes] | None:
    """One frame (channel, payload), or None when the peer closed the connection first."""
    header = _recv_exact(sock, _HEADER.size)
    if header is None:
        return None
    channel, n = _HEADER.unpack(header)
    if limit is not None and n > limit:
        return None
    payload = _recv_exact(sock, n)
    return None if payload is None else (channel, payload)


class _FrameStream(io.RawIOBase):
    """A command's standard output or error, sent to the client as frames. A client that went
    away takes the rest of the output with it: the command still runs to its end."""

    def __init__(self, sock: socket.socket, channel: bytes):
        self._sock, self._channel, self.gone = sock, channel, False

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        data = bytes(data)
        if data and not self.gone:
            try:
                _send(self._sock, self._channel, data)
            except OSError:
                self.gone = True
        return len(data)


def _text_stream(sock: socket.socket, channel: bytes) -> io.TextIOWrapper:
    return io.TextIOWrapper(io.BufferedWriter(_FrameStream(sock, channel)), encoding="utf-8",
                            errors="backslashreplace", write_through=True, line_buffering=True)


# ----------------------------------------------------------------------------- the client
def _setting(key: str) -> bool:
    """Whether an environment variable is one of sppjit's settings (SPPJIT_*, but the server's
    address, which is the client's business)."""
    return key.startswith("SPPJIT_") and key != ENV_SERVER


def _forwarded(key: str) -> bool:
    return _setting(key) or key in _FORWARDED_ENV


def _client_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if _forwarded(k)}
    if "COLUMNS" not in env:
        with contextlib.suppress(OSError, ValueError):
            env["COLUMNS"] = str(os.get_terminal_size(sys.stdout.fileno()).columns)
    return env


def forward(path: str, argv: Sequence[str], version: str, *, stdout=None, stderr=None) -> int | None:
    """Run ``sppjit ARGV`` on the server at ``path``, copying its output to ``stdout`` and
    ``stderr`` (binary streams; the process's own by default) as it comes. Returns the
    command's exit code, or None when no server ran it (none answers at ``path``, or it is an
    other version of sppjit): the caller then runs the command itself, having been told why
    on ``stderr``."""
    if (stdout is None and sys.stdout is None) or (stderr is None and sys.stderr is None):
        return None  # started with a standard stream closed: the command itself says so
    out = stdout if stdout is not None else sys.stdout.buffer
    err = stderr if stderr is not None else sys.stderr.buffer

    def note(text: str) -> None:
        err.write(f"sppjit: note: {text}; {RUNNING_HERE}\n".encode())
        err.flush()

    try:
        cwd = os.getcwd()
    except OSError as exc:  # the working directory was removed: the server could not enter it
        note(f"the working directory is gone ({exc.strerror or exc})")
        return None
    request = {"protocol": PROTOCOL, "version": version, "argv": list(argv), "cwd": cwd,
               "env": _client_env()}
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError as exc:
        note(f"cannot reach the server at {path} ({exc.strerror or exc})")
        return None
    with sock:
        try:
            sock.connect(path)
            _send(sock, REQUEST, json.dumps(request).encode())
        except OSError as exc:
            note(f"no sppjit server answers at {path} ({exc.strerror or exc})")
            return None
        started = False
        out_closed = False
        while True:
            try:
                frame = _recv(sock)
            except OSError:
                frame = None
            if frame is None:
                if not started:
                    note(f"the sppjit server at {path} closed the connection")
                    return None
                err.write(b"sppjit: error: the sppjit server ended during the command\n")
                err.flush()
                return 1
            channel, payload = frame
            if channel == REFUSED:
                note(f"the sppjit server at {path} refused the command: "
                     f"{json.loads(payload).get('reason', 'no reason given')}")
                return None
            started = True
            if channel == EXIT:
                code = int(json.loads(payload)["code"])
                if out_closed:  # as the program itself ends when its standard output is closed
                    err.write(f"sppjit: error: {STDOUT_CLOSED}\n".encode())
                    err.flush()
                    return code or 1
                return code
            if channel == STDOUT and out_closed:
                continue
            stream = out if channel == STDOUT else err
            try:
                stream.write(payload)
                stream.flush()
            except BrokenPipeError:
                if channel != STDOUT:
                    raise
                out_closed = True  # the rest of the output goes nowhere; the command runs on
                if stdout is None:
                    stdout_to_devnull()


def stop(path: str) -> bool:
    """Ask the server at ``path`` to stop once its current command is done. Returns whether
    one answered; it has stopped listening when this returns True."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(path)
            _send(sock, REQUEST, json.dumps({"stop": True}).encode())
            frame = _recv(sock)
        except OSError:
            return False
    return frame is not None and frame[0] == EXIT


# ----------------------------------------------------------------------------- the server
def _answers(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(path)
        except OSError:
            return False
    return True


def _listen(path: str) -> socket.socket:
    """A socket listening at ``path`` that only this user can connect to. A socket file that
    no server answers at any more (one that ended without cleaning up) is replaced."""
    if os.path.exists(path):
        if _answers(path):
            raise ServerError(f"an sppjit server already answers at {path} "
                              f"(stop it with 'sppjit serve --stop --socket {path}')")
        if not _is_socket(path):
            raise ServerError(f"{path} exists and is not a socket")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # the socket file is the user's alone: rw-------
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise ServerError(f"cannot listen at {path}: {exc.strerror or exc}") from None
    finally:
        os.umask(old)
    sock.listen(_BACKLOG)
    return sock


def _is_socket(path: str) -> bool:
    import stat

    with contextlib.suppress(OSError):
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    return False


@contextlib.contextmanager
def _as_client(conn: socket.socket, request: dict) -> Iterator[None]:
    """The process as the client's command sees it: its directory, its SPPJIT_* settings, its
    standard output and error going back to it. Everything restored after."""
    saved_cwd, saved_env = os.getcwd(), dict(os.environ)
    env = {k: v for k, v in request.get("env", {}).items()
           if isinstance(k, str) and isinstance(v, str) and _forwarded(k)}
    saved_streams = sys.stdout, sys.stderr
    out, err = _text_stream(conn, STDOUT), _text_stream(conn, STDERR)
    try:
        os.chdir(request["cwd"])
        for k in list(os.environ):
            if _setting(k):
                del os.environ[k]
        os.environ.update(env)
        sys.stdout, sys.stderr = out, err
        yield
    finally:
        sys.stdout, sys.stderr = saved_streams
        with contextlib.suppress(OSError, ValueError):
            out.flush()
            err.flush()
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(saved_cwd)


def _refuse(conn: socket.socket, reason: str) -> None:
    with contextlib.suppress(OSError):
        _send(conn, REFUSED, json.dumps({"reason": reason}).encode())


def _serve_one(conn: socket.socket, run: Callable[[list[str]], int], version: str) -> tuple[bool, int | None]:
    """One connection: (whether the server should stop, the command's exit code or None)."""
    # A client that connects and sends nothing must not hold up the ones waiting behind it.
    conn.settimeout(REQUEST_TIMEOUT)
    try:
        frame = _recv(conn, limit=_MAX_REQUEST)
    except OSError:  # socket.timeout included
        return False, None
    conn.settimeout(None)
    if frame is None or frame[0] != REQUEST:
        return False, None
    try:
        request = json.loads(frame[1])
    except ValueError:
        _refuse(conn, "the request is not JSON")
        return False, None
    if not isinstance(request, dict):
        _refuse(conn, "the request is not a JSON object")
        return False, None
    if request.get("stop") is True:
        with contextlib.suppress(OSError):
            _send(conn, EXIT, b'{"code": 0}')
        return True, None
    if request.get("protocol") != PROTOCOL:
        _refuse(conn, f"it speaks protocol {PROTOCOL}, the client {request.get('protocol')!r}")
        return False, None
    if request.get("version") != version:
        _refuse(conn, f"it runs sppjit {version}, the client is sppjit {request.get('version')!r}")
        return False, None
    argv, cwd = request.get("argv"), request.get("cwd")
    if not (isinstance(argv, list) and all(isinstance(a, str) for a in argv) and isinstance(cwd, str)):
        _refuse(conn, "the request has no command line or directory")
        return False, None
    if not (os.path.isdir(cwd) and os.access(cwd, os.X_OK)):
        _refuse(conn, f"the client's directory {cwd} is not one the server can enter")
        return False, None
    with _as_client(conn, request):
        try:
            code = run(argv)
        except SystemExit as exc:  # a command that exits on its own: its code, as the program's
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    with contextlib.suppress(OSError):
        _send(conn, EXIT, json.dumps({"code": code}).encode())
    return False, code


def serve(path: str, run: Callable[[list[str]], int], version: str, *,
          ready: Callable[[], None] | None = None, stop_codes: Sequence[int] = ()) -> None:
    """Listen at ``path`` and run each command line a client sends with ``run(argv) -> exit
    code``, one at a time, until a client asks the server to stop (``stop``) or a command ends
    with one of ``stop_codes`` (the exit codes of a signal the server itself received). The
    socket file is removed on the way out, whatever ends the server. ``ready`` is called once
    the socket listens."""
    listener = _listen(path)
    try:
        if ready is not None:
            ready()
        while True:
            conn, _ = listener.accept()
            with conn:
                ending, code = _serve_one(conn, run, version)
            if ending or (code is not None and code in stop_codes):
                return
    finally:
        listener.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
