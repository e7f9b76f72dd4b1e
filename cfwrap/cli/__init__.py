"""The ``cfwrap`` command: arguments in, results and one-line errors out, named exit codes.

The only package that prints or decides an exit code. One module per command (its parser beside
its handler: ``configure`` and ``execute``), the shared options in ``options``, output in
``output``; this module parses, dispatches, and maps every error to its exit code in one place.
Each command imports only what it needs when it runs, so ``cfwrap keygen`` does not pay for
cfssl, X.509, pydantic or JSON Schema; a command's own module is imported only when that
command is parsed (tests/test_cold_start.py watches both).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cfwrap import __version__
from cfwrap.cli.options import EPILOG, Parser, find_cfssl
from cfwrap.cli.output import drop_stdout, emit, flush_stdout, say
from cfwrap.errors import CfwrapError, ExitCode, InputError

log = logging.getLogger("cfwrap")

#: The commands, in the order ``--help`` lists them, with the line it shows for each. A command
#: is its module ``cfwrap.cli.<name>`` (``configure`` and ``execute``), imported only when the
#: command is parsed, so a run loads no other command's module; a test holds each line here to
#: the ``help=`` its module gives.
COMMANDS: dict[str, str] = {
    "quickstart": "all of a region's kit: CA, server/client/cli certificates, gossip key, configs",
    "ca": "a new CA in its own folder",
    "cert": "one role certificate from an existing CA",
    "keygen": "a gossip encryption key, or check one",
    "plan": "a cluster plan: every region, node and operator in one file",
    "apply": "issue, renew and rotate a cluster's certificates from a plan",
    "status": "days left and state of every certificate of a plan",
    "doctor": "check certificates, keys and agent config against Nomad's own TLS rules",
    "replay": "run a published guide's steps for real, record them, say where it goes wrong",
    "manifest": "rebuild a kit's manifest from disk and compare",
    "signer": "run a central signer (cfssl multirootca) for a CA",
    "renew": "renew a folder's certificates that expire soon",
}


class _Command(Parser):
    """A command's parser, filled in by its module the first time it parses or shows help."""

    def __init__(self, *args: Any, command: str, **kwargs: Any) -> None:  # noqa: ANN401 (argparse's)
        """A parser for ``command``, empty until :meth:`load`."""
        super().__init__(*args, **kwargs)
        self.command = command
        self.module_help: str | None = None
        self._loaded = False

    def load(self) -> _Command:
        """Import the command's module and let it add its arguments (once)."""
        if not self._loaded:
            self._loaded = True
            module = importlib.import_module(f"cfwrap.cli.{self.command}")
            module.configure(_Filler(self))
        return self

    def parse_known_args(  # type: ignore[override] # argparse's own signature, loaded first
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        """Parse the command's arguments, its module loaded first."""
        self.load()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        """The command's full help, its module loaded first."""
        self.load()
        return super().format_help()

    def format_usage(self) -> str:
        """The command's usage line, its module loaded first."""
        self.load()
        return super().format_usage()

    def add_subparsers(self, **kwargs: Any) -> Any:  # noqa: ANN401 (argparse's own)
        """A command's own verbs (``plan init``) are plain parsers, not commands."""
        kwargs.setdefault("parser_class", Parser)
        return super().add_subparsers(**kwargs)


class _Filler:
    """What a module's ``configure(sub)`` is handed: ``add_parser`` returns its command's parser."""

    def __init__(self, parser: _Command) -> None:
        self._parser = parser

    def add_parser(
        self, name: str, *, help: str, description: str | None = None, epilog: str | None = None
    ) -> _Command:
        """The command's parser, with the module's description and epilog."""
        if name != self._parser.command:
            raise ValueError(f"cfwrap.cli.{self._parser.command} configures {name!r}")
        self._parser.module_help = help
        self._parser.description, self._parser.epilog = description, epilog
        return self._parser


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (exposed for tests and documentation)."""
    parser = Parser(
        prog="cfwrap",
        description="Make Nomad TLS kits (CA, role certificates, gossip key, agent config) with "
        "real cfssl, check them, and describe them in a manifest.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="store_true", help="show versions of cfwrap and cfssl")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs on stderr")
    parser.add_argument(
        "--cfssl-dir",
        type=Path,
        metavar="DIR",
        help="folder holding cfssl 1.6.5 (overrides the search)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Command)
    for name, line in COMMANDS.items():
        sub.add_parser(name, help=line, command=name)
    return parser


def _version(args: argparse.Namespace) -> int:
    info: dict[str, Any] = {"cfwrap": __version__}
    try:
        tool = find_cfssl(args)
    except CfwrapError as e:
        info["cfssl"] = {"error": str(e)}
    else:
        info["cfssl"] = {
            "path": str(tool.path),
            "package": tool.package,
            "version": tool.version,
            "sha256": tool.sha256,
        }
    emit(json.dumps(info, indent=2))
    return ExitCode.OK


def _setup_logging(*, verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("cfwrap: %(levelname)s: %(name)s: %(message)s"))
    root = logging.getLogger("cfwrap")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)
    root.propagate = False


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so every ``with`` block rolls its work back."""


def _on_sigterm(signum: int, frame: object) -> None:
    _stop_tools()
    raise _Terminated


def _on_sigint(signum: int, frame: object) -> None:
    _stop_tools()
    raise KeyboardInterrupt


def _stop_tools() -> None:
    """Kill the tools cfwrap started, before the with blocks remove folders they write into."""
    runner = sys.modules.get("cfwrap.runner")  # not imported: no tool was ever started
    stop_all = getattr(runner, "stop_all", None)  # still being imported: none started either
    if stop_all is not None:
        stop_all()


def _redeliver(unraisable: Any) -> None:  # noqa: ANN401 (sys.UnraisableHookArgs)
    """Raise a stop again when it landed where Python cannot raise it (a ``__del__``).

    A signal handler's exception raised inside a finaliser or weakref callback is printed as
    "Exception ignored" and dropped, so the run would go on; the signal is sent again, and its
    handler runs at the next safe point of the main thread.
    """
    import signal
    import threading
    import time

    stops = {_Terminated: signal.SIGTERM, KeyboardInterrupt: signal.SIGINT}
    for kind, signum in stops.items():
        if isinstance(unraisable.exc_value, kind):
            # From another thread, so the handler runs after this hook has returned (sent from
            # here, it would run inside the hook, and be dropped again).
            def send(signum: int) -> None:
                time.sleep(0.05)  # let the hook return: a handler run inside it is dropped too
                os.kill(os.getpid(), signum)

            threading.Thread(target=send, args=(signum,), daemon=True).start()
            return
    sys.__unraisablehook__(unraisable)


def run() -> None:
    """The ``cfwrap`` program (its console script, and ``python -m cfwrap``): exits with its code.

    Before the interpreter ends, everything still alive is frozen out of the garbage collector:
    its last collection would otherwise walk every object a large command made (80 ms of a
    1,000-node apply, for nothing: the process is ending).
    """
    import gc

    code = main()
    gc.freeze()
    sys.exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the cfwrap command line; returns the exit code."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return _main(argv)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    previous_int = signal.signal(signal.SIGINT, _on_sigint)
    previous_hook, sys.unraisablehook = sys.unraisablehook, _redeliver
    try:
        try:
            return _main(argv)
        except _Terminated as e:  # came while an error was being reported: still a clean stop
            return _stopped(ExitCode.TERMINATED, e)
        except KeyboardInterrupt as e:
            return _stopped(ExitCode.INTERRUPTED, e)
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
        sys.unraisablehook = previous_hook


def _stopped(code: ExitCode, stop: BaseException) -> int:
    """Say that the run stopped, and what it left: nothing half-written, and what had landed.

    A plan's apply notes how many of its changes were made before the stop (each whole).
    """
    notes = getattr(stop, "__notes__", None) or []
    if notes:
        say(f"cfwrap: stopped; nothing was left half-written, but {notes[0]}")
    else:
        say("cfwrap: stopped; nothing was left half-written")
    return code


def _main(argv: Sequence[str] | None) -> int:
    # Paths from argv may hold bytes that are not UTF-8: data on stdout goes back as given,
    # messages on stderr show them escaped.
    for stream, errors in ((sys.stdout, "surrogateescape"), (sys.stderr, "backslashreplace")):
        with contextlib.suppress(AttributeError, ValueError, OSError):
            stream.reconfigure(errors=errors)  # type: ignore[union-attr]
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        _setup_logging(verbose=args.verbose)
        _check_paths(args)
        if args.version:
            code = _version(args)
        else:
            handler: Callable[[argparse.Namespace], int] | None = getattr(args, "handler", None)
            if handler is None:
                parser.print_help(sys.stderr)
                return ExitCode.USAGE
            code = handler(args)
        flush_stdout()
        return code
    except BrokenPipeError:
        drop_stdout()
        return ExitCode.BROKEN_PIPE  # quiet, as Unix tools are when their reader goes away
    except CfwrapError as e:
        detail = getattr(e, "stderr", "")
        if detail:
            log.debug("tool stderr:\n%s", detail)
        notes = getattr(e, "__notes__", None) or []
        say(f"cfwrap: error: {e}" + "".join(f" ({note})" for note in notes))
        return e.exit_code
    except OSError as e:
        # The operating system refused something no command anticipated (a name too long, a
        # permission, a full stdout): one line naming the file, never a traceback.
        where = f"{e.filename}: " if e.filename is not None else ""
        with contextlib.suppress(OSError):
            flush_stdout()  # keep what was printed if stdout can take it; else drop it
        notes = "".join(f" ({note})" for note in getattr(e, "__notes__", None) or [])
        say(f"cfwrap: error: {where}{e.strerror or e}; check the path and try again{notes}")
        return ExitCode.FILESYSTEM
    except (KeyboardInterrupt, _Terminated) as e:
        # The with blocks have already removed staging folders and temporary files.
        return _stopped(
            ExitCode.TERMINATED if isinstance(e, _Terminated) else ExitCode.INTERRUPTED, e
        )


def _check_paths(args: argparse.Namespace) -> None:
    """Refuse a path that is not UTF-8: cfwrap hands paths to cfssl, which takes text argv.

    Raises:
        InputError: the first such path, shown with its bad bytes escaped.
    """
    for name, value in vars(args).items():
        if isinstance(value, Path):
            try:
                str(value).encode("utf-8")
            except UnicodeEncodeError:
                shown = os.fsencode(value).decode("utf-8", "backslashreplace")
                flag = "--" + name.replace("_", "-") if name != "folder" else "DIR"
                raise InputError(
                    f"{flag} {shown}", "is not UTF-8", fix="give a path in UTF-8"
                ) from None
