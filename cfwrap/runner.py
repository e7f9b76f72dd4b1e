"""The one door to outside processes. Nothing else in cfwrap imports ``sh`` or ``subprocess``.

Every call passes argv as a list (never a shell string), may feed bytes on stdin, has a timeout,
logs its argv at INFO and its output at DEBUG with private key material removed, and turns sh's
exceptions into cfwrap's errors.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shlex
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cfwrap.errors import ToolFailedError, ToolMissingError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 120.0

# Processes started and not yet finished, so an interrupted cfwrap can stop them before it
# removes its staging folder (a tool still writing there would leave files behind).
_ACTIVE: dict[int, Any] = {}  # by id(): sh's RunningCommand is not hashable

_PEM_PRIVATE = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY-----.*?(?:-----END \1PRIVATE KEY-----|$)", re.S
)
_JSON_KEY_FIELD = re.compile(rb'"key"\s*:\s*"[^"]*"')


def redact(data: bytes) -> bytes:
    """Remove private keys (PEM blocks, and cfssl's JSON ``"key"`` field) from tool output."""
    data = _PEM_PRIVATE.sub(rb"[private key removed]", data)
    return _JSON_KEY_FIELD.sub(rb'"key":"[removed]"', data)


@dataclass(frozen=True)
class Call:
    """One invocation: argv (the first item is the binary's path) and optional stdin."""

    argv: tuple[str, ...]
    stdin: bytes | None = None
    timeout: float = DEFAULT_TIMEOUT
    cwd: Path | None = None

    @classmethod
    def of(
        cls,
        argv: Sequence[str | Path],
        *,
        stdin: bytes | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        cwd: Path | None = None,
    ) -> Call:
        """Build a call from path-or-string arguments."""
        return cls(tuple(str(a) for a in argv), stdin, timeout, cwd)

    @property
    def tool(self) -> str:
        """The tool's short name, for messages."""
        return Path(self.argv[0]).name

    def display(self) -> str:
        """The command as a person would type it."""
        return shlex.join(self.argv) + (" < (stdin)" if self.stdin is not None else "")


@dataclass(frozen=True)
class Result:
    """What a finished call returned."""

    call: Call
    returncode: int
    stdout: bytes = field(repr=False)
    stderr: bytes = field(repr=False)
    seconds: float


def failure_reason(stderr: bytes) -> str:
    """Pick the line of a tool's stderr that says what went wrong.

    cfssl reports errors as JSON (``{"code":2400,"message":"invalid curve"}``), as log lines
    (``[ERROR] ...``, ``[CRITICAL] ...``) or as plain Go errors; prefer them in that order.
    """
    lines = [line.strip() for line in redact(stderr).decode("utf-8", "replace").splitlines()]
    lines = [line for line in lines if line]
    for line in reversed(lines):
        if line.startswith("{"):
            try:
                message = json.loads(line).get("message")
            except (ValueError, AttributeError):
                continue
            if isinstance(message, str) and message:
                return message
    for line in reversed(lines):
        match = re.search(r"\[(?:ERROR|CRITICAL|FATAL)\]\s*(.*)", line)
        if match:
            return match.group(1)
    return lines[-1] if lines else "no error message"


@dataclass
class _Running:
    """A started call: sh's RunningCommand and the watchdog that enforces its timeout."""

    call: Call
    command: Any
    watchdog: threading.Timer
    started: float
    timed_out: threading.Event


def _start(call: Call, *, upstream: _Running | None = None, piped: bool = False) -> _Running:
    """Start a call in the background; ``upstream``'s stdout becomes its stdin (a pipe)."""
    import sh

    log.info("run: %s", call.display())
    try:
        command = sh.Command(call.argv[0])
    except sh.CommandNotFound as e:
        raise ToolMissingError(
            call.tool,
            f"{call.argv[0]} is not an executable file",
            fix="run ./scripts/install-cfssl or point --cfssl-dir at cfssl 1.6.5",
        ) from e
    options: dict[str, Any] = {"_piped": True} if piped else {}
    if call.cwd is not None:
        options["_cwd"] = str(call.cwd)
    running = command(
        *call.argv[1:],
        _in=upstream.command if upstream is not None else call.stdin,
        _tty_in=False,
        _tty_out=False,
        _bg=True,
        _bg_exc=False,
        _return_cmd=True,
        **options,
    )
    timed_out = threading.Event()

    # sh's own _timeout (and wait(timeout=)) polls every 100 ms, which would cost more than a
    # cfssl call takes; a timer that kills the process on expiry costs nothing until then.
    def expire() -> None:
        timed_out.set()
        with contextlib.suppress(OSError):
            running.kill()

    watchdog = threading.Timer(call.timeout, expire)
    watchdog.daemon = True
    watchdog.start()
    _ACTIVE[id(running)] = running
    return _Running(call, running, watchdog, time.monotonic(), timed_out)


def _finish(running: _Running, *, check: bool = True) -> Result:
    import sh

    call = running.call
    try:
        running.command.wait()
    except sh.ErrorReturnCode as e:
        result = Result(call, e.exit_code, e.stdout or b"", e.stderr or b"", _since(running))
        _log_output(result)
        if not check:
            return result
        raise ToolFailedError(
            call.tool,
            f"{failure_reason(result.stderr)} (exit {e.exit_code})",
            argv=call.argv,
            returncode=e.exit_code,
            stderr=redact(result.stderr).decode("utf-8", "replace"),
        ) from e
    except sh.SignalException as e:
        if running.timed_out.is_set():
            raise ToolFailedError(
                call.tool,
                f"no answer within {call.timeout:.0f}s",
                argv=call.argv,
                fix="check that the tool is not waiting on a terminal or a network",
            ) from e
        raise ToolFailedError(
            call.tool, f"killed by signal {-e.exit_code}", argv=call.argv, returncode=e.exit_code
        ) from e
    finally:
        running.watchdog.cancel()
        _ACTIVE.pop(id(running.command), None)
    command = running.command
    result = Result(call, command.exit_code, command.stdout, command.stderr, _since(running))
    _log_output(result)
    return result


def _since(running: _Running) -> float:
    return time.monotonic() - running.started


def _log_output(result: Result) -> None:
    if log.isEnabledFor(logging.DEBUG):
        log.debug(
            "%s exited %d after %.3fs\nstdout: %s\nstderr: %s",
            result.call.tool,
            result.returncode,
            result.seconds,
            redact(result.stdout).decode("utf-8", "replace"),
            redact(result.stderr).decode("utf-8", "replace"),
        )


def run(call: Call) -> Result:
    """Run one call to completion.

    Raises:
        ToolMissingError: the binary does not exist or is not executable.
        ToolFailedError: non-zero exit (message from the tool's stderr), timeout, or signal.
    """
    return run_all([call])[0]


def run_all(calls: Sequence[Call]) -> list[Result]:
    """Run independent calls concurrently and return their results in order.

    Raises:
        ToolMissingError: a binary does not exist.
        ToolFailedError: the first call (in order) that failed; the others are still awaited.
    """
    running = [_start(call) for call in calls]
    results: list[Result] = []
    first_error: ToolFailedError | None = None
    for one in running:
        try:
            results.append(_finish(one))
        except ToolFailedError as e:
            first_error = first_error or e
    if first_error is not None:
        raise first_error
    return results


def run_pipeline(calls: Sequence[Call], *, check: bool = True) -> list[Result]:
    """Run calls joined by pipes, like ``a | b | c``, and return every stage's result.

    Only the last stage's stdout is captured: what flows between stages (a private key in
    cfssl's JSON, say) is never held or logged.

    Raises:
        ToolMissingError: a binary does not exist (nothing was started after it).
        ToolFailedError: with ``check``, the first stage (in pipe order) that failed; always, a
            timeout or a signal.
    """
    started: list[_Running] = []
    for index, call in enumerate(calls):
        upstream = started[-1] if started else None
        started.append(_start(call, upstream=upstream, piped=index < len(calls) - 1))
    results: list[Result] = []
    first_error: ToolFailedError | None = None
    for one in reversed(started):  # the last stage finishes first; earlier ones then see EOF
        try:
            results.append(_finish(one, check=check))
        except ToolFailedError as e:
            first_error = e  # keeps the earliest stage's error: that is the cause
    if first_error is not None:
        raise first_error
    return results[::-1]


def stop_all() -> None:
    """Kill every tool this process started that is still running (on SIGTERM or Ctrl-C).

    Called from a signal handler, so it only sends signals: waiting on sh's objects here could
    deadlock with the wait the main thread was in when the signal came.
    """
    import signal

    for running in list(_ACTIVE.values()):
        with contextlib.suppress(OSError, AttributeError):
            os.kill(running.pid, signal.SIGKILL)
    _ACTIVE.clear()
