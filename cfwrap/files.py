"""Every file cfwrap writes goes through here: atomic, explicit modes, never a silent overwrite.

A file is written to a temporary name in its own folder, fsynced, then linked (new files: fails
if the name exists) or renamed (replacements: a new inode, so a too-open old key file is not
rewritten in place) into place. Modes are set with fchmod, so the umask cannot widen them.
A kit is built in a staging folder beside its target and moved into place as a whole.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

from cfwrap.errors import ConflictError, FileSystemError

SECRET_MODE = 0o600
PUBLIC_MODE = 0o644
DIR_MODE = 0o700


@contextlib.contextmanager
def _os_errors(path: Path) -> Iterator[None]:
    try:
        yield
    except OSError as e:
        raise FileSystemError(path, e) from e


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_temp(folder: Path, data: bytes, mode: int) -> Path:
    fd, name = tempfile.mkstemp(prefix=".cfwrap-", suffix=".tmp", dir=folder)
    temp = Path(name)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        temp.unlink(missing_ok=True)
        raise
    os.close(fd)
    return temp


def write_new(path: Path, data: bytes, *, mode: int) -> None:
    """Write ``data`` to a new file at ``path`` atomically with ``mode``.

    Raises:
        ConflictError: ``path`` exists (also as a dangling symlink).
        FileSystemError: the folder refused the write.
    """
    with _os_errors(path):
        temp = _write_temp(path.parent, data, mode)
        try:
            os.link(temp, path)  # unlike rename, link refuses an existing name: no race
        except FileExistsError:
            raise ConflictError(
                path, "already exists", fix="remove it, or pass --force to replace it"
            ) from None
        finally:
            temp.unlink(missing_ok=True)
        _fsync_dir(path.parent)


def write_replace(path: Path, data: bytes, *, mode: int) -> None:
    """Write ``data`` to ``path`` atomically with ``mode``, replacing any file there.

    Raises:
        ConflictError: ``path`` is a symlink or a folder (cfwrap never writes through links).
        FileSystemError: the folder refused the write.
    """
    if path.is_symlink() or path.is_dir():
        raise ConflictError(
            path, "is a symlink or a folder", fix="remove it or choose another path"
        )
    with _os_errors(path):
        temp = _write_temp(path.parent, data, mode)
        try:
            temp.replace(path)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)


def check_absent(paths: list[Path]) -> None:
    """Refuse before any work starts when an output already exists.

    Raises:
        ConflictError: the first path that exists.
    """
    for path in paths:
        if path.exists() or path.is_symlink():
            raise ConflictError(
                path, "already exists", fix="remove it, or pass --force to replace it"
            )


class FolderLock:
    """An exclusive lock on a folder's name, held by flock(2) so it dies with its process.

    Whoever holds it may also sweep what a killed run left behind: staging folders beside the
    target and temporary files in it are only ever made under this lock, so any found while
    holding it are stale.
    """

    def __init__(self, target: Path, *, wait: float = 0.0) -> None:
        """Prepare a lock for ``target`` (the folder need not exist yet); wait up to ``wait`` s."""
        self.target = target
        self.wait = wait
        self.path = target.parent / f".{target.name}.cfwrap.lock"
        self._fd: int | None = None

    def __enter__(self) -> FolderLock:
        """Take the lock (waiting up to ``wait`` seconds), then sweep a killed run's leftovers.

        The lock file is removed on release. A process that opened it just before then holds
        a lock on an unlinked file, so after locking it checks that the name still points at
        the file it locked, and tries again if not.

        Raises:
            ConflictError: another process holds the lock (after ``wait``).
            FileSystemError: the lock file cannot be made.
        """
        deadline = time.monotonic() + self.wait
        while True:
            with _os_errors(self.path):
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise FileSystemError(self.path, e) from e
                if time.monotonic() >= deadline:
                    raise ConflictError(
                        self.target,
                        "another cfwrap is writing here",
                        fix="wait for it to finish, or pass --wait SECONDS",
                    ) from None
                time.sleep(0.05)
                continue
            try:
                same = self.path.stat().st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                self._sweep()
                return self
            os.close(fd)

    def _sweep(self) -> None:
        """Remove staging folders and temporary files that a killed run left."""
        for stale in self.target.parent.glob(f".{self.target.name}.cfwrap-*"):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
        if self.target.is_dir() and not self.target.is_symlink():
            for stale in self.target.glob(".cfwrap-*.tmp"):
                stale.unlink(missing_ok=True)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Remove the lock file and release the lock."""
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None


def check_target_folder(target: Path, *, force: bool) -> None:
    """Refuse a target that is a symlink or a file, or a non-empty folder without ``force``.

    Raises:
        ConflictError: the target is in the way.
    """
    if target.is_symlink():
        raise ConflictError(target, "is a symlink", fix="give the real folder, or another path")
    if target.exists() and not target.is_dir():
        raise ConflictError(target, "exists and is not a folder", fix="choose another --out")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise ConflictError(
            target,
            "already exists and is not empty",
            fix="choose another --out, or pass --force (the old folder is kept as a backup)",
        )


class Staging:
    """A private folder beside ``target`` in which a kit is built, then moved into place whole."""

    def __init__(self, target: Path, *, force: bool, wait: float = 0.0) -> None:
        """Check the target now; the folder itself is made on entry."""
        self.target = target
        self.force = force
        self._lock = FolderLock(target, wait=wait)
        self._path: Path | None = None
        self.backup: Path | None = None

    @property
    def path(self) -> Path:
        """The staging folder (only inside the ``with`` block)."""
        if self._path is None:
            raise RuntimeError("Staging.path used outside its with block")
        return self._path

    def __enter__(self) -> Staging:
        """Lock the target's name, check it, and make the staging folder (0700)."""
        if not self.target.parent.is_dir():
            raise ConflictError(
                self.target.parent, "is not an existing folder", fix="create it first"
            )
        check_target_folder(
            self.target, force=self.force
        )  # before the lock: a refusal leaves no trace
        self._lock.__enter__()
        try:
            check_target_folder(self.target, force=self.force)
            with _os_errors(self.target.parent):
                self._path = Path(
                    tempfile.mkdtemp(prefix=f".{self.target.name}.cfwrap-", dir=self.target.parent)
                )
                self._path.chmod(DIR_MODE)
        except BaseException:
            self._lock.__exit__(None, None, None)
            raise
        return self

    def commit(self) -> None:
        """Move the staged folder into place; an old folder is renamed to a dated backup.

        Raises:
            FileSystemError: a rename failed (the staged folder is then removed on exit).
        """
        with _os_errors(self.target):
            if self.target.exists() and any(self.target.iterdir()):
                stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
                self.backup = self.target.with_name(f"{self.target.name}.replaced-{stamp}")
                self.target.rename(self.backup)
            elif self.target.exists():
                self.target.rmdir()
            self.path.rename(self.target)
            _fsync_dir(self.target.parent)
        self._path = None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Remove what is left of the staging folder (after a failure) and release the lock."""
        try:
            if self._path is not None:
                shutil.rmtree(self._path, ignore_errors=True)
                self._path = None
        finally:
            self._lock.__exit__(exc_type, exc, tb)
