"""The sppjit command line (typer): ``sppjit replay``, ``compare``, ``generate``, ``convert``,
``inspect``, ``report``, ``bench``, ``sweep``, ``fleet`` and ``serve``.

Each command lives in its own module under sppjit/commands/ and is mounted here. Errors are
mapped to exit codes in ONE place, ``SppjitGroup.main``, which both the ``sppjit`` entry point
and typer's CliRunner go through:

- bad usage or bad input (sppjit.InputError, SppError, VmEntryError, a click/typer usage
  error): one line ``sppjit: error: <message>`` on standard error, exit code 2;
- an interrupt (Ctrl-C, SIGINT): ``sppjit: interrupted``, exit code 130; SIGTERM:
  ``sppjit: terminated``, exit code 143 (sppjit.io.signals; outputs are rolled back by the
  commands themselves, so every output path is left as it was);
- an operating-system error (disk full, permission denied while writing): one line
  ``sppjit: error: ...``, exit code 1;
- anything else is a bug: one line ``sppjit: internal error: <type>: <message>``, exit code 1,
  with the traceback only when the environment sets SPPJIT_DEBUG=1.

This module and the command modules import only typer and the standard library at load time
(numpy, numba and pyarrow are imported inside the command functions), so ``sppjit --help``
and ``sppjit --version`` stay fast.
"""

from __future__ import annotations

import os
import signal
import sys


def _end_during_imports(signum, frame) -> None:
    """SIGINT or SIGTERM while the modules below load: nothing is written yet, so end now
    with the one line a run prints, not a traceback from inside an import."""
    name = "interrupted" if signum == signal.SIGINT else "terminated"
    os.write(2, f"sppjit: {name}\n".encode())
    os._exit(128 + signum)


# Only when this is the program (the sppjit script, python -m sppjit.cli), not a module
# imported by another program (tests, a notebook): main() installs the handlers of a run.
if __name__ == "__main__" or os.path.basename(
        getattr(sys.modules.get("__main__"), "__file__", None) or "").startswith("sppjit"):
    for _number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_number, _end_during_imports)

import traceback  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import Annotated, Any  # noqa: E402

import typer  # noqa: E402
from typer.core import TyperGroup  # noqa: E402

from sppjit import __version__  # noqa: E402
from sppjit.commands import bench as _bench  # noqa: E402
from sppjit.commands import compare as _compare  # noqa: E402
from sppjit.commands import convert as _convert  # noqa: E402
from sppjit.commands import fleet as _fleet  # noqa: E402
from sppjit.commands import generate as _generate  # noqa: E402
from sppjit.commands import inspect as _inspect  # noqa: E402
from sppjit.commands import replay as _replay  # noqa: E402
from sppjit.commands import report as _report  # noqa: E402
from sppjit.commands import serve as _serve  # noqa: E402
from sppjit.commands import sweep as _sweep  # noqa: E402
from sppjit.errors import ERRNO_NAMES, InputError, SppError, Terminated, VmEntryError  # noqa: E402
from sppjit.io import signals  # noqa: E402
from sppjit.io.closed import STDOUT_CLOSED, stdout_to_devnull  # noqa: E402

PROG = "sppjit"
EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a process that SIGINT ended
EXIT_TERMINATED = 143  # 128 + SIGTERM


def _one_line(text: str) -> str:
    """Messages are printed as exactly one line: join the lines of a multi-line message."""
    parts = [part.strip() for part in str(text).splitlines() if part.strip()]
    return " ".join(parts)


def _fail(prefix: str, message: str) -> None:
    sys.stderr.write(f"{PROG}: {prefix}: {_one_line(message)}\n")
    sys.stderr.flush()


def _interrupted(signum: int = signal.SIGINT) -> int:
    """The one line of a run that a signal ended, and its exit code."""
    if signum == signal.SIGINT:
        sys.stderr.write(f"{PROG}: interrupted\n")
        code = EXIT_INTERRUPTED
    else:
        sys.stderr.write(f"{PROG}: terminated\n")
        code = 128 + signum
    sys.stderr.flush()
    return code


def _note(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning raised during a run (the v12 memslot quirk, ...) as one ``note`` line, not
    Python's two lines naming a source file."""
    sys.stderr.write(f"{PROG}: note: {_one_line(str(message))}\n")
    sys.stderr.flush()


def _not_utf8(args: Sequence[str]) -> str | None:
    """The first argument that is not valid UTF-8 (a file name in another encoding), as
    printable text; Arrow and the file formats sppjit writes take UTF-8 names only."""
    for arg in args:
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            return os.fsencode(arg).decode("utf-8", errors="backslashreplace")
    return None


def _usage_message(exc: Any) -> str:
    """A click usage error as one line, naming the command and how to get its help."""
    message = exc.format_message()
    ctx = getattr(exc, "ctx", None)
    if ctx is not None:
        path = ctx.command_path
        return f"{message} (see '{path} --help')"
    return message


def _user_error_message(exc: BaseException) -> str:
    if isinstance(exc, SppError):
        name = ERRNO_NAMES.get(exc.errno, f"errno {exc.errno}")
        return f"{exc.strerror} ({name})"
    return str(exc)


class _StdoutClosed(Exception):
    """Writing to standard output met a closed pipe (carried past click, which would exit)."""


class SppjitGroup(TyperGroup):
    """The root command: runs click in non-standalone mode and maps every outcome to an exit
    code here, the single place where errors become messages."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        code = self._run(args, prog_name or PROG, complete_var, extra)
        if standalone_mode:
            sys.exit(code)
        return code

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError as exc:
            # click answers EPIPE with a silent sys.exit(1); say what happened instead.
            raise _StdoutClosed() from exc

    def _run(self, args, prog_name, complete_var, extra) -> int:
        args = sys.argv[1:] if args is None else list(args)
        if (bad := _not_utf8(args)) is not None:
            _fail("error", f"argument is not valid UTF-8: {bad} (sppjit reads and writes "
                           "UTF-8 file names only)")
            return EXIT_USAGE
        if sys.stdout is None:  # started with descriptor 1 closed
            _fail("error", "standard output is closed")
            return EXIT_INTERNAL
        with signals.handled(), warnings.catch_warnings():
            warnings.showwarning = _note
            code = self._run_handled(args, prog_name, complete_var, extra)
            if code == EXIT_OK and (signum := signals.received()) is not None:
                # The signal's exception was swallowed on its way (see sppjit.io.signals):
                # the run still ends as interrupted.
                return _interrupted(signum)
            return code

    def _run_handled(self, args, prog_name, complete_var, extra) -> int:
        try:
            result = super().main(args=args, prog_name=prog_name, complete_var=complete_var,
                                  standalone_mode=False, **extra)
            sys.stdout.flush()  # a closed pipe is found here, while errors are still mapped
        except typer.TyperException as exc:  # click's usage errors (BadParameter, ...)
            if type(exc).__name__ == "NoArgsIsHelpError":
                # A command given no arguments shows its help (with rich installed, the help
                # was already printed while the error was built).
                if text := exc.format_message():
                    sys.stdout.write(text.rstrip("\n") + "\n")
                return EXIT_USAGE
            _fail("error", _usage_message(exc))
            return EXIT_USAGE
        except (InputError, SppError, VmEntryError) as exc:
            _fail("error", _user_error_message(exc))
            return EXIT_USAGE
        except (KeyboardInterrupt, typer.Abort):
            return _interrupted()
        except Terminated as exc:
            return _interrupted(exc.signum)
        except (BrokenPipeError, _StdoutClosed):
            stdout_to_devnull()
            _fail("error", STDOUT_CLOSED)
            return EXIT_INTERNAL
        except OSError as exc:
            # The environment, not sppjit: a full disk, a permission denied on write, ...
            if os.environ.get("SPPJIT_DEBUG") == "1":
                traceback.print_exc()
            where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
            _fail("error", f"{exc.strerror or exc}{where}")
            return EXIT_INTERNAL
        except Exception as exc:  # a bug: say so in one line, traceback on request
            debug = os.environ.get("SPPJIT_DEBUG") == "1"
            if debug:
                traceback.print_exc()
            _fail("internal error", f"{type(exc).__name__}: {exc}"
                                    + ("" if debug else " (SPPJIT_DEBUG=1 shows the traceback)"))
            return EXIT_INTERNAL
        if result == EXIT_INTERRUPTED:
            # typer turns a KeyboardInterrupt raised inside a command into Exit(130).
            return _interrupted()
        return result if isinstance(result, int) else EXIT_OK


app = typer.Typer(
    name=PROG,
    cls=SppjitGroup,
    help="Simulate Intel EPT sub-page write permission (SPP) as the KVM series defines it: "
         "replay guest memory-access traces against EPT and SPP tables, compare SPP with "
         "page-granular protection, convert traces from valgrind, Pin and DynamoRIO, report "
         "and plot results, generate seeded scenarios, inspect saved VM states, and measure "
         "speed.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion and --show-completion (bash, zsh, fish)
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"{PROG} {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool | None,
        typer.Option("--version", callback=_version_callback, is_eager=True,
                     help="Print the version and exit."),
    ] = None,
) -> None:
    """Simulate Intel EPT sub-page write permission (SPP) as the KVM series defines it."""


app.command("replay", no_args_is_help=True, help=_replay.HELP,
            epilog=_replay.EPILOG)(_replay.replay)
app.command("generate", no_args_is_help=True, help=_generate.HELP,
            epilog=_generate.EPILOG)(_generate.generate)
app.command("inspect", no_args_is_help=True, help=_inspect.HELP,
            epilog=_inspect.EPILOG)(_inspect.inspect)
app.command("compare", no_args_is_help=True, help=_compare.HELP,
            epilog=_compare.EPILOG)(_compare.compare)
app.command("convert", no_args_is_help=True, help=_convert.HELP,
            epilog=_convert.EPILOG)(_convert.convert)
app.command("report", no_args_is_help=True, help=_report.HELP,
            epilog=_report.EPILOG)(_report.report)
app.command("bench", help=_bench.HELP, epilog=_bench.EPILOG)(_bench.bench)
app.command("sweep", no_args_is_help=True, help=_sweep.HELP, epilog=_sweep.EPILOG)(_sweep.sweep)
app.command("fleet", no_args_is_help=True, help=_fleet.HELP, epilog=_fleet.EPILOG)(_fleet.fleet)
app.command("serve", help=_serve.HELP, epilog=_serve.EPILOG)(_serve.serve)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the app and exit with its code (the ``sppjit`` program, once sppjit.launcher has
    decided that the command runs in this process)."""
    command = typer.main.get_command(app)
    command.main(args=argv, prog_name=PROG, standalone_mode=True)


def run(argv: Sequence[str]) -> int:
    """Run the app on ``argv`` and return its exit code, as ``sppjit ARGV`` would end (a
    resident server runs its clients' commands with this)."""
    return typer.main.get_command(app).main(args=list(argv), prog_name=PROG, standalone_mode=False)


if __name__ == "__main__":
    main()
