"""What the CLI prints: data on stdout, one-line messages for people on stderr.

A full or closed stdout is an error of the run that wrote it (with the file named), never a
traceback at exit; a message for people is one line whatever its input held.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys

from cfwrap.text import printable


def emit(*values: object, end: str = "\n") -> None:
    """Print data on stdout; a failed write names standard output in the error."""
    if sys.stdout is None:  # started with stdout closed (>&-)
        raise OSError(errno.EBADF, "Bad file descriptor (closed)", "standard output")
    try:
        print(*values, end=end)
    except BrokenPipeError:
        raise
    except OSError as e:
        drop_stdout()
        raise OSError(e.errno, e.strerror, "standard output") from None


def say(line: str) -> None:
    """One line for people on stderr; a closed or full stderr is not worth a traceback.

    Control characters from the input (a newline in a flag's value, an escape sequence) are
    shown escaped, so the line stays one line and cannot rewrite the terminal.
    """
    if sys.stderr is None:  # started with stderr closed (2>&-): nobody to tell
        return
    with contextlib.suppress(OSError, ValueError):
        print(printable(line), file=sys.stderr, flush=True)


def flush_stdout() -> None:
    """Flush what the command printed; a full stdout (``> /dev/full``) is this run's error."""
    if sys.stdout is None:
        return
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as e:
        drop_stdout()
        raise OSError(e.errno, e.strerror, "standard output") from None


def drop_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush cannot fail again."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


class ProgressBar:
    """A one-line bar on stderr while long work runs, shown only on a terminal.

    Piped or redirected, it prints nothing at all, so logs and scripts see no carriage returns.
    """

    def __init__(self, what: str) -> None:
        """Show progress of ``what`` (if stderr is a terminal)."""
        self.what = what
        stream = sys.stderr
        self.shown = stream is not None and stream.isatty()
        self._last = -1

    def __call__(self, done: int, total: int) -> None:
        """Redraw at each whole percent."""
        if not self.shown or total <= 0:
            return
        percent = done * 100 // total
        if percent == self._last and done != total:
            return
        self._last = percent
        width = 30
        filled = width * done // total
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.write(
                f"\r{self.what} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}"
            )
            if done == total:
                sys.stderr.write("\n")
            sys.stderr.flush()
