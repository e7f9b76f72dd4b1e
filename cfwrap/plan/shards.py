"""A second process for a large apply: forked, watched, and stopped with its parent.

A fleet's issuance is bound by one Python process (keys, requests, checks, files: the GIL),
while the machine has a second core. :func:`fork` runs part of the work in a child process that
shares the stage folder; the child reports how far it got through a shared counter, hands its
results back as lines in a shared temporary file, and dies with its parent (SIGTERM through
Linux's parent-death signal, then the usual handler stops its cfssl). The two share the work
through :class:`Claims`: whichever is free takes the next few items, so neither waits long for
the other at the end, however their speeds differ.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import signal
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from typing import IO

from cfwrap.errors import CfwrapError, ExitCode

#: Below this many new members a second process costs more (its own cfssl start, the fork)
#: than it saves.
MIN_SHARE = 300

#: Claims hands out items in at least this many at a time, and in at most this many turns: one
#: turn is a 4-byte token, and every token fits in one pipe page before anyone reads.
MIN_CHUNK = 4
MAX_TURNS = 1024

Report = Callable[[int], None]
_OK = "ok"
_END = "end"  # the child's last line: a report without it was cut short
_TOKEN = 4
#: How long a child told to stop may take before it is killed (a stopped one never ends).
STOP_GRACE = 5.0
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


class Claims:
    """The items ``0 .. total-1`` in chunks, for two processes to take as each gets free.

    Made before :func:`fork`: one token per chunk is written into a pipe (4 KiB at most, so the
    write never blocks) and the writing end is closed. A read of one token is atomic, so each
    chunk goes to exactly one reader, whichever asks first; an empty pipe reads as the end.
    Use it in a ``with`` block, in each process.
    """

    def __init__(self, total: int) -> None:
        """Cut ``total`` items into chunks and queue them."""
        self.total = total
        self.chunk = max(MIN_CHUNK, -(-total // MAX_TURNS))
        tokens = b"".join(start.to_bytes(_TOKEN, "little") for start in range(0, total, self.chunk))
        self._read, write = os.pipe()
        try:
            view = memoryview(tokens)
            while view:
                view = view[os.write(write, view) :]
        except BaseException:
            os.close(self._read)
            raise
        finally:
            os.close(write)

    def take(self) -> Iterator[range]:
        """The chunks this process gets, one at a time, until none is left."""
        while token := os.read(self._read, _TOKEN):
            if len(token) != _TOKEN:  # cannot happen: every token was written whole
                raise RuntimeError("a work token was read in part")
            start = int.from_bytes(token, "little")
            yield range(start, min(start + self.chunk, self.total))

    def __enter__(self) -> Claims:
        """The claims, open."""
        return self

    def __exit__(self, *_: object) -> None:
        """Close this process's end of the queue."""
        os.close(self._read)


class HelperFailedError(CfwrapError):
    """The second process failed; its own one-line message and exit code."""

    def __init__(self, message: str, *, code: int) -> None:
        """Carry the child's message and exit code."""
        super().__init__(message)
        try:
            self.exit_code = ExitCode(code)
        except ValueError:
            self.exit_code = ExitCode.TOOL_FAILED


class Helper:
    """A forked child at work."""

    def __init__(self, pid: int, result: IO[bytes], counter: mmap.mmap) -> None:
        """Watch the child ``pid``, which writes to ``result`` and counts in ``counter``."""
        self.pid = pid
        self.result = result
        self.counter = counter
        self._status: int | None = None

    def done(self) -> int:
        """How many items the child has finished."""
        return int.from_bytes(self.counter[:8], "little")

    def join(self, *, on_wait: Callable[[], None]) -> Iterator[str]:
        """Wait for the child (calling ``on_wait`` now and then); its result lines, read as used.

        Read them before :meth:`stop`, which closes their file.

        Raises:
            HelperFailedError: the child failed (its message and exit code).
        """
        while self._status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid == self.pid:
                self._status = status
                break
            on_wait()
            time.sleep(0.01)  # both end together (Claims): a long nap would be the whole wait
        on_wait()
        self.result.seek(0)
        head = self.result.readline().decode("utf-8").removesuffix("\n")
        if os.waitstatus_to_exitcode(self._status) == 0 and head == _OK:
            return self._lines()
        try:
            failure = json.loads(head)
            raise HelperFailedError(str(failure["error"]), code=int(failure["code"]))
        except (ValueError, KeyError, TypeError):
            how = os.waitstatus_to_exitcode(self._status)
            ended = f"exit {how}" if how >= 0 else f"signal {-how}"
            raise HelperFailedError(
                f"the second apply process ended ({ended}) without a report; is the "
                f"temporary folder ({tempfile.gettempdir()}) full?",
                code=ExitCode.TOOL_FAILED,
            ) from None

    def _lines(self) -> Iterator[str]:
        for line in self.result:
            text = line.decode("utf-8").rstrip("\n")
            if text == _END:
                return
            if text:
                yield text
        raise HelperFailedError(
            "the second apply process's report was cut short; is the temporary folder "
            f"({tempfile.gettempdir()}) full?",
            code=ExitCode.FILESYSTEM,
        )

    def failed(self) -> bool:
        """Whether the child has ended, and not well (then stop giving it work to wait for)."""
        if self._status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid != self.pid:
                return False
            self._status = status
        return os.waitstatus_to_exitcode(self._status) != 0

    def stop(self) -> None:
        """End the child if it still runs (an error or a stop in the parent); free its files."""
        if self._status is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            deadline = time.monotonic() + STOP_GRACE
            with contextlib.suppress(ChildProcessError):
                while self._status is None:
                    pid, status = os.waitpid(self.pid, os.WNOHANG)
                    if pid == self.pid:
                        self._status = status
                    elif time.monotonic() > deadline:  # stopped (SIGSTOP), or stuck
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(self.pid, signal.SIGKILL)
                        _, self._status = os.waitpid(self.pid, 0)
                    else:
                        time.sleep(0.01)
        self.result.close()
        self.counter.close()


def fork(run: Callable[[Report], Iterable[str]]) -> Helper:
    """Run ``run`` in a forked child; ``run`` gets a function to report its progress with.

    Call it before this process starts threads of its own (those watching a cfssl): a fork copies
    only the calling thread.
    """
    counter = mmap.mmap(-1, 8)
    result = tempfile.TemporaryFile(prefix="cfwrap-shard-")  # noqa: SIM115 (Helper.stop closes it)
    die_with_parent = _die_with_parent()
    # No stop signal is handled while os.fork runs its hooks (logging's, holding its lock: a
    # handler raising there left that lock held and the run hung); it comes just after.
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    pid = os.fork()
    if pid != 0:
        helper = Helper(pid, result, counter)
        try:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)  # a pending one: raised here
        except BaseException:
            helper.stop()
            raise
        return helper
    status = 1
    try:  # the child: never return into the parent's code (its with blocks would clean up)
        die_with_parent()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)

        def report(done: int) -> None:
            counter[:8] = done.to_bytes(8, "little")

        lines = run(report)
        result.write(_OK.encode("utf-8") + b"\n")
        result.writelines(line.encode("utf-8") + b"\n" for line in lines)
        result.write(_END.encode("utf-8") + b"\n")
        # Blocked from here on: a second stop signal (the group's, then the parent's) must not
        # unwind the child into the parent's code on its way out.
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        result.flush()  # a full temporary folder fails here: reported below, never "ok"
        status = 0
    except BaseException as e:  # reported to the parent, which raises it
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        code = e.exit_code if isinstance(e, CfwrapError) else _code_of(e)
        message = str(e) if isinstance(e, CfwrapError) else _message_of(e)
        with contextlib.suppress(BaseException):
            result.seek(0)
            result.truncate()
            result.write(json.dumps({"error": message, "code": int(code)}).encode("utf-8"))
    finally:
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        with contextlib.suppress(BaseException):
            result.flush()
        os._exit(status)


def _message_of(error: BaseException) -> str:
    if isinstance(error, KeyboardInterrupt) or type(error).__name__ == "_Terminated":
        return "the second apply process was stopped by a signal"
    return f"{type(error).__name__}: {error}"


def _code_of(error: BaseException) -> int:
    if isinstance(error, KeyboardInterrupt):
        return ExitCode.INTERRUPTED
    if type(error).__name__ == "_Terminated":
        return ExitCode.TERMINATED
    if isinstance(error, OSError):
        return ExitCode.FILESYSTEM
    return ExitCode.TOOL_FAILED


def _die_with_parent() -> Callable[[], None]:
    """A step for the child: the kernel sends it SIGTERM when its parent ends.

    libc is looked up here, before the fork.
    """
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return lambda: None
    parent = os.getpid()

    def in_child() -> None:
        prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)

    return in_child
