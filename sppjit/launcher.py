"""The ``sppjit`` program's entry point: a command goes to a resident server when SPPJIT_SERVER
names one (sppjit.resident), and runs in this process otherwise.

It decides before anything heavy is imported: a forwarded command costs the interpreter's
start-up and a socket round trip, not the second numba, pyarrow and the kernels take to load.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from sppjit.resident import ENV_SERVER, forward

# Commands that stay here: the server itself, and any command line that reads standard input
# ('-' as a file), which the server does not have.
_LOCAL_COMMANDS = ("serve",)
_STDIN = "-"


def forwardable(argv: Sequence[str]) -> bool:
    """Whether a server may run this command line (it names a command, and not one of the
    server's own; it reads no standard input)."""
    return bool(argv) and argv[0] not in _LOCAL_COMMANDS and not argv[0].startswith("-") and _STDIN not in argv


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    server = os.environ.get(ENV_SERVER)
    if server and forwardable(args):
        from sppjit import __version__

        code = forward(server, args, __version__)
        if code is not None:
            sys.exit(code)
    from sppjit.cli import main as cli_main

    cli_main(args)


if __name__ == "__main__":
    main()
