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
import json
import os
import re
import secrets
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from cfwrap.errors import ConflictError, FileSystemError

SECRET_MODE = 0o600
PUBLIC_MODE = 0o644
DIR_MODE = 0o700

#: The most cfwrap reads from one input file (a PEM, key, CSR JSON, HCL, manifest, gossip key).
#: Real ones are a few KiB; a manifest of a large fleet stays far below this.
MAX_INPUT = 16 * 1024 * 1024

# mkstemp and mkdtemp add eight characters from this alphabet (tempfile._RandomNameSequence).
_RANDOM = r"[a-z0-9_]{8}"
_TEMP_FILE = re.compile(rf"\.cfwrap-{_RANDOM}\.tmp")

_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


class UnreadableInput(OSError):
    """An input path that is not a regular file, or is larger than cfwrap reads.

    An ``OSError``, so every caller that reports an unreadable file reports this one too.
    """


def _size(limit: int) -> str:
    return f"{limit // (1024 * 1024)} MiB" if limit >= 1024 * 1024 else f"{limit} bytes"


def _refuse_special(path: Path, mode: int) -> None:
    for test, kind in _KINDS:
        if test(mode):
            raise UnreadableInput(
                errno.EINVAL, f"is {kind}, not a regular file; give the file itself", str(path)
            )


def read_input(path: Path, *, limit: int = MAX_INPUT) -> bytes:
    """Read a regular file of at most ``limit`` bytes, never blocking on a FIFO or a device.

    Raises:
        UnreadableInput: not a regular file (FIFO, device, socket, folder), or too large.
        OSError: the file cannot be opened or read (missing, permissions).
    """
    _refuse_special(path, path.stat().st_mode)  # before open: opening a device can act
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        _refuse_special(path, info.st_mode)  # it may have been swapped since the stat
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > limit:
        raise UnreadableInput(
            errno.EFBIG, f"is larger than {_size(limit)}; cfwrap reads no input that big", str(path)
        )
    return b"".join(chunks)


def open_input(path: Path, *, limit: int = MAX_INPUT) -> BinaryIO:
    """Open a regular file of at most ``limit`` bytes to read it a piece at a time.

    The checks of :func:`read_input`, for a file too large to hold whole (a fleet's plan
    manifest); the size is its size when opened.

    Raises:
        UnreadableInput: not a regular file (FIFO, device, socket, folder), or too large.
        OSError: the file cannot be opened (missing, permissions).
    """
    _refuse_special(path, path.stat().st_mode)  # as read_input: opening a device can act
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        _refuse_special(path, info.st_mode)
        if info.st_size > limit:
            raise UnreadableInput(
                errno.EFBIG,
                f"is larger than {_size(limit)}; cfwrap reads no input that big",
                str(path),
            )
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def holds(path: Path, data: bytes | Iterable[bytes]) -> bool:
    """True when ``path`` is a regular file holding exactly ``data`` (or its pieces, in order).

    Compared a piece at a time: a large file (a fleet's plan manifest) is never held whole.
    Opened as :func:`open_input` opens an input; anything but a regular file holds nothing.

    Raises:
        OSError: the file cannot be opened or read (missing, permissions).
    """
    try:
        f = open_input(path, limit=sys.maxsize)
    except UnreadableInput:
        return False
    with f:
        for piece in [data] if isinstance(data, bytes) else data:
            if f.read(len(piece)) != piece:
                return False
        return f.read(1) == b""


def is_regular(path: Path) -> bool:
    """True for a regular file (after symlinks), False for anything else.

    Also False for a path that cannot be looked at, where ``Path.is_file`` would raise (a
    folder the caller may not enter).
    """
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except OSError:
        return False


def why_not_regular(path: Path) -> str:
    """Why :func:`is_regular` said no, in words: 'does not exist', 'is a FIFO', ..."""
    try:
        _refuse_special(path, path.stat().st_mode)
    except OSError as e:
        return "does not exist" if isinstance(e, FileNotFoundError) else str(e.strerror)
    return "is a regular file"


def read_input_text(path: Path, *, limit: int = MAX_INPUT) -> str:
    """Read a regular UTF-8 text file of at most ``limit`` bytes (see :func:`read_input`).

    Raises:
        UnreadableInput: as :func:`read_input`, or the file is not UTF-8 text.
        OSError: the file cannot be opened or read.
    """
    data = read_input(path, limit=limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UnreadableInput(
            errno.EINVAL, f"is not UTF-8 text (byte {e.start})", str(path)
        ) from None


@contextlib.contextmanager
def _os_errors(path: Path | str) -> Iterator[None]:
    try:
        yield
    except OSError as e:
        raise FileSystemError(Path(path), e) from e


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _write_temp(folder: Path, data: bytes | Iterable[bytes], mode: int) -> Path:
    """A new temporary file in ``folder`` holding ``data`` (or its pieces, a MiB per write)."""
    fd, name = tempfile.mkstemp(prefix=".cfwrap-", suffix=".tmp", dir=folder)
    temp = Path(name)
    try:
        os.fchmod(fd, mode)
        if isinstance(data, bytes):
            _write_all(fd, data)
        else:
            buffer = bytearray()
            for piece in data:
                buffer += piece
                if len(buffer) >= 1 << 20:
                    _write_all(fd, buffer)
                    buffer.clear()
            _write_all(fd, buffer)
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


def write_replace(path: Path, data: bytes | Iterable[bytes], *, mode: int) -> None:
    """Write ``data`` (or its pieces) to ``path`` atomically with ``mode``, replacing any file.

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


def _lock_path(target: Path) -> Path:
    """The file :class:`FolderLock` locks for ``target``: beside it, named after it.

    One file per folder however the folder is spelled (``.``, ``sub/..``, a symlink to it):
    its real path names the lock.
    """
    real = Path(os.path.realpath(target))
    return real.parent / f".{real.name}.cfwrap.lock"


def lock_held(target: Path) -> bool:
    """Whether a process holds :class:`FolderLock` on ``target`` now (for status, a dry run).

    A probe: a shared flock(2) on the lock file, tried without waiting and let go at once. It
    fails while a writer holds the lock, wherever that writer runs (another PID namespace, a
    container) and on any file system. A writer that meets the probe's moment of a shared lock
    tries again (:data:`PROBE_GRACE`), so a reader never makes an apply fail. A lock file a
    killed writer left holds no lock. One this user cannot open (another user's) is looked up
    in ``/proc/locks`` instead, which sees only this PID namespace's holders.
    """
    path = _lock_path(target)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError:
        return _listed_as_locked(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return True
        raise FileSystemError(path, e) from e
    finally:
        os.close(fd)  # and with it the probe's shared lock
    return False


def _listed_as_locked(path: Path) -> bool:
    """Whether ``/proc/locks`` lists a flock(2) lock on ``path``'s inode (this namespace's)."""
    try:
        info = path.lstat()
        with open("/proc/locks", "rb") as f:  # noqa: PTH123 (one read)
            listed = f.read()
    except OSError:
        return False
    where = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}".encode()
    return any(
        b"FLOCK" in fields and where in fields for fields in map(bytes.split, listed.splitlines())
    )


#: How long a writer taking :class:`FolderLock` tries at least, even without ``wait``: a
#: reader's probe (:func:`lock_held`) holds a shared lock for a moment.
PROBE_GRACE = 0.25


class FolderLock:
    """An exclusive lock on a folder's name, held by flock(2) so it dies with its process.

    Whoever holds it may also sweep what a killed run left behind: staging folders beside the
    target and temporary files in it are only ever made under this lock, so any found while
    holding it are stale.
    """

    def __init__(self, target: Path, *, wait: float = 0.0, sweep_beside: bool = True) -> None:
        """Prepare a lock for ``target`` (the folder need not exist yet); wait up to ``wait`` s.

        ``sweep_beside=False``: leave staging folders beside the target to the next run that
        makes one. Looking for them lists the target's parent, which for a plan's member is a
        region's folder of thousands: once per member, a renewal of the fleet grew with its
        square. Such folders are only made by a command on that one member (never by apply).
        """
        self.target = target
        self.wait = wait
        self.sweep_beside = sweep_beside
        self.path = _lock_path(target)
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
        deadline = time.monotonic() + max(self.wait, PROBE_GRACE)
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
            except BaseException:
                os.close(fd)
                raise
            if same:
                self._fd = fd
                try:
                    self._sweep()
                except BaseException:  # SIGTERM mid-sweep: the lock file goes with the lock
                    self.__exit__(None, None, None)
                    raise
                return self
            os.close(fd)

    def _sweep(self) -> None:
        """Remove staging folders and temporary files that a killed run left.

        Names are matched exactly, never as glob patterns (a target may be called ``*``), and
        only names this target's own runs make: staging folders ``.<name>.cfwrap-XXXXXXXX``
        beside it and temporary files ``.cfwrap-XXXXXXXX.tmp`` in it, all made under the lock
        this process now holds, so no live run owns them.
        """
        staging = re.compile(re.escape(staging_prefix(self.target)) + _RANDOM)
        for stale in _entries(self.target.parent) if self.sweep_beside else []:
            if staging.fullmatch(stale.name) and stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
        if self.target.is_dir() and not self.target.is_symlink():
            with _os_errors(self.target):
                recover(self.target)  # before the kept old files below are removed
            for stale in _entries(self.target):
                name = stale.name
                if (_TEMP_FILE.fullmatch(name) or _OLD_FILE.fullmatch(name)) and not stale.is_dir():
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


#: The longest output folder name: 255 (NAME_MAX) less what the backup name adds to it
#: (``.replaced-YYYYmmddTHHMMSSZ``, and ``-NN`` for a second backup within a second).
MAX_NAME = 255 - 29
_BACKUPS_A_SECOND = 99


def _entries(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except OSError:
        return []


#: A scratch folder in $TMPDIR, named with its owner's pid (local signers' older spelling too).
_SCRATCH = re.compile(rf"cfwrap-(?:signer-)?([0-9]+)-{_RANDOM}")


def sweep_scratch(folder: Path) -> None:
    """Remove this user's cfwrap scratch folders in ``folder`` whose process is gone.

    A SIGKILLed cfwrap cannot clean up, and its scratch folder may still hold a copy of a CA
    key; the owner's pid is in the name, and only the owner's own folders are touched.
    """
    try:
        entries = list(folder.iterdir())
    except OSError:
        return
    for entry in entries:
        match = _SCRATCH.fullmatch(entry.name)
        if match is None or int(match[1]) == os.getpid():
            continue
        try:
            info = entry.lstat()
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
                continue
            os.kill(int(match[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(entry, ignore_errors=True)  # its owner is gone
        except (OSError, OverflowError):
            continue  # alive, not ours to judge, or no pid at all


def new_scratch(kind: str = "") -> Path:
    """A private folder (0700) in $TMPDIR for files a tool must read, such as a CA key's copy.

    Named with this process's pid, so that a later run removes one a SIGKILL left behind
    (:func:`sweep_scratch`, run here first). The caller removes it.

    Raises:
        FileSystemError: it cannot be made.
    """
    folder = Path(tempfile.gettempdir())
    sweep_scratch(folder)
    try:
        path = Path(tempfile.mkdtemp(prefix=f"cfwrap-{kind}{os.getpid()}-"))
        path.chmod(DIR_MODE)  # mkdtemp's 0700 is cut by the umask (077 -> 000)
    except OSError as e:
        raise FileSystemError(folder, e) from e
    return path


@contextlib.contextmanager
def scratch() -> Iterator[Path]:
    """:func:`new_scratch`, removed with everything in it when the block ends."""
    path = new_scratch()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def make_parents(path: Path) -> list[Path]:
    """Make the missing folders above ``path``; return them, topmost first, for :func:`unmake`.

    Raises:
        OSError: a folder cannot be made.
    """
    missing = [p for p in reversed(path.parents) if not p.exists()]
    for folder in missing:
        folder.mkdir(exist_ok=True)
    return missing


def unmake(folders: list[Path]) -> None:
    """Remove ``folders`` (from :func:`make_parents`) that are still empty, deepest first."""
    for folder in reversed(folders):
        with contextlib.suppress(OSError):
            folder.rmdir()


def staging_prefix(target: Path) -> str:
    """The name prefix of ``target``'s staging folders (a random suffix follows)."""
    return f".{target.name}.cfwrap-"


def output_folder(path: Path) -> Path:
    """Normalise an output folder given by the user, refusing ones cfwrap cannot replace whole.

    ``.``, ``..``, ``/`` and any folder that holds the current one have no name of their own to
    stage beside, or would pull the working folder away from under the user.

    Raises:
        InputError: the path is one of those, or has an empty name.
    """
    from cfwrap.errors import InputError

    try:
        here: Path | None = Path.cwd()
    except OSError:  # the working folder was removed
        here = None
    target = Path(os.path.normpath(here / path if here else path))
    if not target.name or (here is not None and (target == here or target in here.parents)):
        raise InputError(
            f"--out {path}",
            "is the current folder or one above it",
            fix="give a new folder for the output, e.g. --out nomad-tls",
        )
    if len(os.fsencode(target.name)) > MAX_NAME:
        raise InputError(
            "--out",
            f"the folder name is {len(os.fsencode(target.name))} bytes; cfwrap needs room beside "
            f"it for a dated backup, so at most {MAX_NAME}",
            fix="choose a shorter folder name",
        )
    return target


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
        if os.path.ismount(self.target):  # the kit is moved into place whole: a rename
            raise ConflictError(
                self.target,
                "is a mount point, which cannot be replaced by a new folder",
                fix=f"give a folder inside it, e.g. --out {self.target / 'nomad-tls'}",
            )
        self._lock.__enter__()
        try:
            check_target_folder(self.target, force=self.force)
            with _os_errors(self.target.parent):
                self._path = Path(
                    tempfile.mkdtemp(prefix=staging_prefix(self.target), dir=self.target.parent)
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
                count = 1
                while os.path.lexists(self.backup) and count < _BACKUPS_A_SECOND:
                    count += 1  # replaced again within the second
                    self.backup = self.target.with_name(
                        f"{self.target.name}.replaced-{stamp}-{count}"
                    )
                self.target.rename(self.backup)
            elif self.target.exists():
                self.target.rmdir()
            try:
                self.path.rename(self.target)
            except BaseException:  # a failure or a stop between the two renames: put it back
                if self.backup is not None and not os.path.lexists(self.target):
                    self.backup.rename(self.target)
                    self.backup = None
                raise
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


#: Written before a :class:`FileSet` moves anything into place, removed once all is in place:
#: while it exists, the folder may hold a mix of old and new files, and the next cfwrap run that
#: locks the folder puts the old ones back.
JOURNAL = ".cfwrap-journal.json"
_OLD_FILE = re.compile(rf"\.cfwrap-{_RANDOM}\.old")


class FileSet:
    """Files that land in an existing folder together or not at all (``cfwrap cert``).

    Every target is checked before anything is written; every file is written to a temporary
    name first (a full disk stops the set there, with nothing in place). Each file about to be
    replaced is kept under a second name, and a journal naming them is written; only then are
    the files moved into place. Until the ``with`` block ends without an error, an error (or
    SIGTERM) puts every old file back and removes every new one; after a SIGKILL, the next run
    that locks the folder does the same from the journal. Removing the journal is the commit.
    ``later`` names files placed after the others (the manifest, built from them) under the
    same guarantee.
    """

    def __init__(self, folder: Path, *, replace: bool, later: tuple[str, ...] = ()) -> None:
        """Prepare a set for ``folder``; ``replace`` allows replacing existing files."""
        self.folder = folder
        self.replace = replace
        self.later = later
        self._files: dict[str, tuple[bytes, int]] = {}
        self._temps: list[Path] = []
        self._old: dict[str, Path | None] = {}  # target name -> the old file's second name
        self._placed: list[str] = []
        self._journal: Path | None = None

    def add(self, name: str, data: bytes, *, mode: int) -> None:
        """Add a file to write (a plain name inside the folder)."""
        self._files[name] = (data, mode)

    @property
    def names(self) -> list[str]:
        """The names added, in order."""
        return list(self._files)

    def check(self) -> None:
        """Refuse, before anything is written, a target that is in the way.

        Raises:
            ConflictError: a target exists (without ``replace``), or is a symlink or a folder.
        """
        for name in self._files:
            path = self.folder / name
            if path.is_symlink() or path.is_dir():
                raise ConflictError(
                    path, "is a symlink or a folder", fix="remove it or choose another --out"
                )
            if path.exists() and not self.replace:
                raise ConflictError(
                    path, "already exists", fix="remove it, or pass --force to replace it"
                )
        for name in self.later:
            path = self.folder / name
            if path.is_symlink() or path.is_dir():
                raise ConflictError(path, "is a symlink or a folder", fix="remove it")

    def apply(self) -> None:
        """Write every file to a temporary name, keep what they replace, then move them in.

        Raises:
            ConflictError: see :meth:`check`.
            FileSystemError: a write or rename failed (nothing is left changed).
        """
        self.check()
        with _os_errors(self.folder):
            new: dict[str, Path] = {}
            for name, (data, mode) in self._files.items():
                new[name] = _write_temp(self.folder, data, mode)
                self._temps.append(new[name])
            for name in [*self._files, *self.later]:
                self._old[name] = self._keep(self.folder / name)
            journal = {"old": {k: v.name if v else None for k, v in self._old.items()}}
            self._journal = self.folder / JOURNAL
            write_new(self._journal, (json.dumps(journal) + "\n").encode(), mode=SECRET_MODE)
            for name, temp in new.items():
                self._place(name, temp)
            _fsync_dir(self.folder)

    def place_later(self, name: str, data: bytes, *, mode: int) -> None:
        """Place one of the ``later`` files, after :meth:`apply`.

        Raises:
            FileSystemError: the write failed (the with block then undoes the set).
        """
        if self._journal is None or name not in self.later:
            raise RuntimeError(f"{name} is not a later file of an applied FileSet")
        with _os_errors(self.folder / name):
            temp = _write_temp(self.folder, data, mode)
            self._temps.append(temp)
            self._place(name, temp)
            _fsync_dir(self.folder)

    def _keep(self, target: Path) -> Path | None:
        """A second name for the file at ``target`` (None if there is none)."""
        if not target.exists():
            return None
        while True:
            old = self.folder / f".cfwrap-{secrets.token_hex(4)}.old"
            try:
                os.link(target, old)
            except FileExistsError:
                continue
            self._temps.append(old)
            return old

    def _place(self, name: str, temp: Path) -> None:
        target = self.folder / name
        if self._old[name] is None:
            try:
                os.link(temp, target)  # refuses a name that appeared since the check
            except FileExistsError:
                raise ConflictError(
                    target, "appeared while cfwrap was writing", fix="run again"
                ) from None
        else:
            temp.replace(target)
        self._placed.append(name)

    def __enter__(self) -> FileSet:
        """Start collecting files."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Commit (remove the journal) or undo; then remove every temporary name."""
        if exc_type is not None:
            for name in reversed(self._placed):
                with contextlib.suppress(OSError):
                    _restore(self.folder, name, self._old[name])
            self._placed.clear()
        if self._journal is not None:
            self._journal.unlink(missing_ok=True)  # the commit point (or the end of the undo)
            with contextlib.suppress(OSError):
                _fsync_dir(self.folder)
            self._journal = None
        for temp in self._temps:
            with contextlib.suppress(OSError):
                temp.unlink()
        self._temps.clear()


def _restore(folder: Path, name: str, old: Path | None) -> None:
    """Put back what was at ``name`` before a FileSet: the kept file, or nothing."""
    if old is None:
        (folder / name).unlink(missing_ok=True)
    elif old.exists():
        old.replace(folder / name)


def recover(folder: Path) -> bool:
    """Undo a FileSet that was killed before it committed (call with the folder locked).

    Returns:
        True when there was something to undo.
    """
    journal = folder / JOURNAL
    try:
        recorded = json.loads(read_input(journal, limit=1024 * 1024))["old"]
    except FileNotFoundError:
        return False
    except (OSError, ValueError, KeyError, TypeError):
        recorded = {}  # a damaged journal was never complete: nothing was moved yet
    if not isinstance(recorded, dict):
        recorded = {}  # not what FileSet writes: undo nothing rather than guess
    for name, old in recorded.items():
        if not isinstance(name, str) or "/" in name or name in ("", ".", ".."):
            continue
        if old is None or (isinstance(old, str) and _OLD_FILE.fullmatch(old)):
            with contextlib.suppress(OSError):
                _restore(folder, name, folder / old if old else None)
    journal.unlink(missing_ok=True)
    _fsync_dir(folder)
    return True


STAGE_PREFIX = ".cfwrap-stage-"
_STAGE = re.compile(rf"{re.escape(STAGE_PREFIX)}[a-z0-9_]{{8}}")


def _syncfs(folder: Path) -> None:
    """Flush every write on ``folder``'s file system with one call (Linux ``syncfs``)."""
    import ctypes

    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syncfs(fd) != 0:  # pragma: no cover (syncfs fails only on a dying disk)
            raise OSError(ctypes.get_errno(), "syncfs failed", str(folder))
    finally:
        os.close(fd)


class TreeStaging:
    """Many new folders at once (a plan's nodes), each placed whole.

    They are written under one private folder in ``root`` without a sync each, flushed with one
    ``syncfs``, then each renamed into its place. Each placed folder appears whole or not at
    all; what was never placed is removed on exit. Use it with ``root`` locked
    (:class:`FolderLock`); :func:`sweep_stages` removes what a killed run left.
    """

    def __init__(self, root: Path) -> None:
        """Prepare a stage inside ``root`` (made on entry)."""
        self.root = root
        self._path: Path | None = None
        self._made: set[str] = set()
        self._present: set[Path] = set()  # folders of the tree placed into, known to exist

    @property
    def path(self) -> Path:
        """The stage folder (only inside the ``with`` block)."""
        if self._path is None:
            raise RuntimeError("TreeStaging.path used outside its with block")
        return self._path

    def __enter__(self) -> TreeStaging:
        """Make the stage folder (0700)."""
        with _os_errors(self.root):
            self._path = Path(tempfile.mkdtemp(prefix=STAGE_PREFIX, dir=self.root))
            self._path.chmod(DIR_MODE)
        return self

    def write(self, relative: str, data: bytes, *, mode: int) -> None:
        """Write a new file at ``relative`` inside the stage (its folders are made 0700)."""
        # Plain strings, not Path objects: a plan writes tens of thousands of these.
        path = f"{self.path}/{relative}"
        with _os_errors(path):  # a Path only for an error
            self._folder(path.rpartition("/")[0])
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
            try:
                os.fchmod(fd, mode)  # the umask cut the mode at creation
                _write_all(fd, data)
            finally:
                os.close(fd)

    def _folder(self, folder: str) -> None:
        if folder in self._made:
            return
        try:
            os.mkdir(folder, DIR_MODE)  # noqa: PTH102 (strings, as above): its parent is there
        except FileNotFoundError:
            os.makedirs(folder, mode=DIR_MODE, exist_ok=True)  # noqa: PTH103 (the first of a kind)
        except FileExistsError:
            if not os.path.isdir(folder):  # noqa: PTH112 (as makedirs with exist_ok)
                raise
        self._made.add(folder)

    def sync(self) -> None:
        """Flush everything written so far to disk: once, before anything is placed."""
        with _os_errors(self.path):
            _syncfs(self.path)

    def place(self, relative: str, target: Path) -> None:
        """Move the staged folder ``relative`` to ``target``, which must not exist yet.

        Raises:
            ConflictError: ``target`` exists.
            FileSystemError: the rename failed.
        """
        if os.path.lexists(target):
            raise ConflictError(target, "already exists", fix="move it away and run again")
        with _os_errors(target):
            self._parents(target.parent)
            os.rename(f"{self.path}/{relative}", target)  # noqa: PTH104 (a string, as above)

    def _parents(self, folder: Path) -> None:
        """Make ``folder`` and its missing parents inside the root (each looked at once a run)."""
        if folder in self._present or not folder.is_relative_to(self.root):
            return
        self._parents(folder.parent)
        if not folder.exists():
            folder.mkdir(mode=DIR_MODE)
        self._present.add(folder)

    def settle(self, *folders: Path) -> None:
        """Make the renames into ``folders`` durable (one fsync per folder)."""
        for folder in dict.fromkeys(folders):
            with _os_errors(folder):
                _fsync_dir(folder)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Remove the stage and whatever in it was not placed."""
        if self._path is not None:
            shutil.rmtree(self._path, ignore_errors=True)
            self._path = None


class StagedFolder:
    """One folder inside a :class:`TreeStaging`, as a place the manifest writer can write to."""

    def __init__(self, stage: TreeStaging, relative: str) -> None:
        """Name the folder ``relative`` inside ``stage``."""
        self.stage = stage
        self.relative = relative

    @property
    def path(self) -> Path:
        """Where the folder is staged now."""
        return self.stage.path / self.relative

    def place_later(self, name: str, data: bytes, *, mode: int) -> None:
        """Write ``name`` into the staged folder (as :meth:`FileSet.place_later` does)."""
        self.stage.write(f"{self.relative}/{name}", data, mode=mode)


def is_stage(name: str) -> bool:
    """A stage's folder name (what :func:`sweep_stages` removes)."""
    return _STAGE.fullmatch(name) is not None


def sweep_stages(root: Path) -> None:
    """Remove stages a killed run left in ``root`` (call with ``root`` locked)."""
    with contextlib.suppress(FileNotFoundError):
        for entry in root.iterdir():
            if _STAGE.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
