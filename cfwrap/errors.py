"""The errors cfwrap raises, and the exit codes the CLI maps them to.

Every error says what is wrong and how to fix it in one line (``str(error)``); details that do not
fit one line (a tool's full stderr) are kept on the instance for debug logging.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from pathlib import Path


class ExitCode(enum.IntEnum):
    """The named exit codes of the ``cfwrap`` command.

    A plan's apply makes its changes one member folder at a time, each whole. A stop or a
    failure rolls back what it had not placed yet, and its one line says how many of its
    changes had been made; the same apply again finishes the rest.
    """

    OK = 0
    USAGE = 2  # argparse's own code for bad flags
    INPUT = 3  # a value or input file is wrong
    CONFLICT = 4  # an output exists (no --force), or another cfwrap holds the folder
    TOOL_MISSING = 5  # cfssl not found, or too old
    TOOL_FAILED = 6  # cfssl failed, or returned something unusable
    VERIFY_FAILED = 7  # a check of what exists on disk failed
    FILESYSTEM = 8  # the operating system refused a read or write
    NEEDS_ACTION = 9  # status: a certificate is expiring, expired, missing or changed on disk
    RENEWED = 10  # renew: at least one certificate was renewed (0: nothing was due)
    EXEC_FAILED = 11  # renew: certificates were renewed, but the --exec command failed
    INTERRUPTED = 130  # Ctrl-C (128 + SIGINT); the output was rolled back
    BROKEN_PIPE = 141  # standard output was closed by its reader (128 + SIGPIPE), as Unix tools
    TERMINATED = 143  # SIGTERM (128 + SIGTERM); the output was rolled back


class CfwrapError(Exception):
    """Root of everything cfwrap raises on purpose."""

    exit_code: ExitCode = ExitCode.INPUT

    def __init__(self, message: str, *, fix: str = "") -> None:
        """Keep the message and the fix separately, so callers can inspect either."""
        super().__init__(message)
        self.message = message
        self.fix = fix

    def __str__(self) -> str:
        """Render as one line: what is wrong, then how to fix it."""
        return f"{self.message}; {self.fix}" if self.fix else self.message


class InputError(CfwrapError):
    """A value given to cfwrap (flag, file content) is not acceptable."""

    exit_code = ExitCode.INPUT

    def __init__(self, what: str, why: str, *, fix: str = "") -> None:
        """Name the offending input and say why it is refused."""
        super().__init__(f"{what}: {why}", fix=fix)
        self.what = what
        self.why = why


class ConflictError(CfwrapError):
    """An output already exists, or another process holds the output folder."""

    exit_code = ExitCode.CONFLICT

    def __init__(self, path: Path, why: str, *, fix: str = "") -> None:
        """Name the path that is in the way."""
        super().__init__(f"{path}: {why}", fix=fix)
        self.path = path


class ToolMissingError(CfwrapError):
    """A required outside tool is not installed, or not a version cfwrap accepts."""

    exit_code = ExitCode.TOOL_MISSING

    def __init__(self, tool: str, why: str, *, fix: str) -> None:
        """Name the tool and what is wrong with the one found (or not found)."""
        super().__init__(f"{tool}: {why}", fix=fix)
        self.tool = tool


class ToolFailedError(CfwrapError):
    """An outside tool failed, or exited 0 but produced nothing usable."""

    exit_code = ExitCode.TOOL_FAILED

    def __init__(
        self,
        tool: str,
        why: str,
        *,
        argv: Sequence[str] = (),
        returncode: int | None = None,
        stderr: str = "",
        fix: str = "",
    ) -> None:
        """Keep the tool's argv, exit code and full stderr for debug output."""
        super().__init__(f"{tool} failed: {why}", fix=fix)
        self.tool = tool
        self.argv = tuple(argv)
        self.returncode = returncode
        self.stderr = stderr


class VerificationError(CfwrapError):
    """Something that exists (a certificate, a kit, a manifest) failed a check."""

    exit_code = ExitCode.VERIFY_FAILED

    def __init__(self, what: str, why: str, *, fix: str = "") -> None:
        """Name what was checked and why it failed."""
        super().__init__(f"{what}: {why}", fix=fix)
        self.what = what
        self.why = why


class FileSystemError(CfwrapError):
    """The operating system refused a file operation (permissions, full disk, ...)."""

    exit_code = ExitCode.FILESYSTEM

    def __init__(self, path: Path, error: OSError) -> None:
        """Translate an OSError on ``path`` into one readable line."""
        reason = error.strerror or str(error)
        super().__init__(
            f"{path}: {reason}",
            fix="check the folder's permissions and free space, then run again",
        )
        self.path = path
        self.errno = error.errno
