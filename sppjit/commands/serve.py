"""``sppjit serve``: keep sppjit resident, and run the commands sent to it (sppjit.resident).

Option parsing only: sppjit.resident.serve listens and runs each command line it receives
as the ``sppjit`` program would (sppjit.cli.run); this warms the kernels first, says where it
listens, and stops a server with --stop.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

HELP = (
    "Keep sppjit resident and run the commands other processes send it.\n\n"
    "A command started with the environment variable SPPJIT_SERVER set to the socket "
    "runs here, in its own working directory and with its own SPPJIT_* settings, and "
    "prints and exits as it would have itself; it skips the second or so that importing "
    "numba and pyarrow and loading the kernels cost. One command runs at a time; the "
    "others wait their turn. A command that reads standard input ('-') runs where it was "
    "started, as does any command when no server answers or the server runs another "
    "sppjit version (with a note). The server ends on Ctrl-C, SIGTERM or 'sppjit serve "
    "--stop'; the socket is the user's alone (mode 600)."
)

EPILOG = ("Example: sppjit serve & export SPPJIT_SERVER=$(sppjit serve --print-socket); "
          "sppjit replay t.parquet --summary s.json")


def serve(
    socket_path: Annotated[str | None, typer.Option(
        "--socket", metavar="PATH", show_default="$XDG_RUNTIME_DIR/sppjit-UID.sock, or in "
        "the temporary directory",
        help="The Unix socket to listen at.")] = None,
    stop: Annotated[bool, typer.Option(
        "--stop", help="Stop the server listening at --socket (after its current command) "
                       "instead.")] = False,
    print_socket: Annotated[bool, typer.Option(
        "--print-socket", help="Print the socket path (--socket, or the default) and exit.")] = False,
) -> None:
    run_serve(socket_path=socket_path, stop=stop, print_socket=print_socket)


def run_serve(*, socket_path: str | None, stop: bool = False, print_socket: bool = False) -> None:
    from sppjit import __version__, resident
    from sppjit.errors import InputError

    path = socket_path or resident.default_socket()
    if print_socket:
        typer.echo(path)
        return
    if stop:
        if not resident.stop(path):
            raise InputError(f"--socket: no sppjit server answers at {path}")
        typer.echo(f"sppjit: stopped the server at {path}")
        return

    from sppjit import cli
    from sppjit.bench import warm_up

    warm_up()  # every kernel a replay calls, loaded (or compiled) before the first client

    def ready() -> None:
        typer.echo(f"sppjit: serving at {path} (commands run here when SPPJIT_SERVER={path})")
        sys.stdout.flush()

    def run(argv: list[str]) -> int:
        if argv and argv[0] == "serve":
            sys.stderr.write("sppjit: error: a server does not run 'sppjit serve'\n")
            return cli.EXIT_USAGE
        return cli.run(argv)

    try:
        resident.serve(path, run, __version__, ready=ready,
                       stop_codes=(cli.EXIT_INTERRUPTED, cli.EXIT_TERMINATED))
    except resident.ServerError as exc:
        raise InputError(f"--socket: {exc}") from None
