"""Tests that kill mutmut's survivors in cfwrap/files.py (scripts/mutation files).

Each judges files.py by the file system (os.stat, listings, flock from another descriptor) or by
exact messages written out here, never by files.py's own helpers.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import hashlib
import os
import re
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from cfwrap import files
from cfwrap.errors import ConflictError, FileSystemError, InputError
from tests.handmade import mounted_tmpfs

MIB = 1024 * 1024
# What a killed run leaves: mkstemp's and mkdtemp's eight random characters.
TEMP = re.compile(r"\.cfwrap-[a-z0-9_]{8}\.tmp")
KNOWN = re.compile(r"\.cfwrap-[a-z0-9_]{8}\.(tmp|old)|\.cfwrap-journal\.json")


@contextlib.contextmanager
def _tmpfs(where: Path) -> Iterator[Path]:
    """A folder on its own file system: a temporary made anywhere else cannot be linked in."""
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", where], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", where], check=True)


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _locked_elsewhere(lock_file: Path) -> bool:
    """True when another open file description cannot take the flock."""
    fd = os.open(lock_file, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


# read_input: the limit is exact, chunks are joined as read, refusals name the file.


def test_a_file_of_exactly_the_limit_is_read_whole(tmp_path):
    data = os.urandom(100)
    (tmp_path / "f").write_bytes(data)
    assert files.read_input(tmp_path / "f", limit=100) == data


@pytest.mark.parametrize(
    ("size", "limit"), [(101, 100), (2 * MIB + 1, 2 * MIB), (3 * MIB, MIB + MIB // 2)]
)
def test_one_byte_or_more_over_the_limit_is_refused(tmp_path, size, limit):
    (tmp_path / "f").write_bytes(b"a" * size)
    with pytest.raises(files.UnreadableInput) as caught:
        files.read_input(tmp_path / "f", limit=limit)
    assert caught.value.errno == errno.EFBIG
    assert caught.value.filename == str(tmp_path / "f")
    size_text = f"{limit // MIB} MiB" if limit >= MIB else f"{limit} bytes"
    assert caught.value.strerror == f"is larger than {size_text}; cfwrap reads no input that big"


def test_a_file_of_several_chunks_comes_back_byte_for_byte(tmp_path):
    data = os.urandom(3 * MIB + 7)
    (tmp_path / "f").write_bytes(data)
    read = files.read_input(tmp_path / "f")
    assert hashlib.sha256(read).hexdigest() == hashlib.sha256(data).hexdigest()


def test_a_fifo_is_refused_naming_it(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(files.UnreadableInput) as caught:
        files.read_input(tmp_path / "fifo")
    assert (caught.value.errno, caught.value.filename) == (errno.EINVAL, str(tmp_path / "fifo"))
    assert caught.value.strerror == "is a FIFO, not a regular file; give the file itself"


def test_text_over_the_limit_and_not_utf8_are_refused_naming_the_file(tmp_path):
    (tmp_path / "big").write_text("a" * 11)
    with pytest.raises(files.UnreadableInput) as big:
        files.read_input_text(tmp_path / "big", limit=10)
    assert big.value.errno == errno.EFBIG
    (tmp_path / "bin").write_bytes(b"ok\xff")
    with pytest.raises(files.UnreadableInput) as binary:
        files.read_input_text(tmp_path / "bin")
    assert (binary.value.errno, binary.value.filename) == (errno.EINVAL, str(tmp_path / "bin"))
    assert binary.value.strerror == "is not UTF-8 text (byte 2)"


def test_is_regular_is_false_for_a_path_that_cannot_be_looked_at(tmp_path):
    (tmp_path / "file").write_text("x")
    assert not files.is_regular(tmp_path / "file" / "below-a-file")
    assert not files.is_regular(tmp_path / "missing")


# Writes: a temporary in the target's own folder, exact refusals.


def test_writes_make_their_temporary_in_the_target_folder(tmp_path):
    """On its own file system, a temporary made in /tmp could not be linked or renamed in."""
    with _tmpfs(tmp_path / "fs") as folder:
        files.write_new(folder / "new", b"one", mode=0o600)
        files.write_replace(folder / "new", b"two", mode=0o644)
        assert (folder / "new").read_bytes() == b"two"
        assert stat.S_IMODE((folder / "new").stat().st_mode) == 0o644
        (folder / "kept").write_bytes(b"old")
        with files.FileSet(folder, replace=True) as batch:
            batch.add("kept", b"new", mode=0o600)
            batch.add("added", b"added", mode=0o644)
            batch.apply()
        assert (folder / "kept").read_bytes() == b"new"
        with files.Staging(folder / "kit", force=False) as staging:
            (staging.path / "a").write_text("a")
            staging.commit()
        assert _names(folder) == ["added", "kept", "kit", "new"]


def test_write_errors_name_the_path(tmp_path):
    target = tmp_path / "missing-folder" / "file"
    for write in (files.write_new, files.write_replace):
        with pytest.raises(FileSystemError) as caught:
            write(target, b"x", mode=0o600)
        assert caught.value.path == target
        assert str(caught.value).startswith(f"{target}: No such file or directory; ")
    (tmp_path / "there").write_text("x")
    with pytest.raises(ConflictError) as exists:
        files.write_new(tmp_path / "there", b"y", mode=0o600)
    assert str(exists.value) == (
        f"{tmp_path / 'there'}: already exists; remove it, or pass --force to replace it"
    )
    assert exists.value.path == tmp_path / "there"
    (tmp_path / "dir").mkdir()
    with pytest.raises(ConflictError) as folder:
        files.write_replace(tmp_path / "dir", b"y", mode=0o600)
    assert str(folder.value) == (
        f"{tmp_path / 'dir'}: is a symlink or a folder; remove it or choose another path"
    )
    assert folder.value.path == tmp_path / "dir"
    assert _names(tmp_path) == ["dir", "there"]


def test_why_not_regular_in_words(tmp_path):
    (tmp_path / "file").write_text("x")
    os.mkfifo(tmp_path / "fifo")
    assert files.why_not_regular(tmp_path / "file") == "is a regular file"
    assert files.why_not_regular(tmp_path / "missing") == "does not exist"
    assert (
        files.why_not_regular(tmp_path) == "is a folder, not a regular file; give the file itself"
    )
    assert files.why_not_regular(tmp_path / "fifo") == (
        "is a FIFO, not a regular file; give the file itself"
    )


# Target folders and output names.


def test_target_folder_refusals_are_exact(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    cases = {
        "link": "is a symlink; give the real folder, or another path",
        "file": "exists and is not a folder; choose another --out",
        "full": "already exists and is not empty; choose another --out, or pass --force "
        "(the old folder is kept as a backup)",
    }
    for name, why in cases.items():
        with pytest.raises(ConflictError) as caught:
            files.check_target_folder(tmp_path / name, force=False)
        assert str(caught.value) == f"{tmp_path / name}: {why}"
        assert caught.value.path == tmp_path / name
    files.check_target_folder(tmp_path / "full", force=True)


def test_output_folder_refuses_the_current_folder_and_names_too_long(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert files.output_folder(Path("kit")) == tmp_path / "kit"
    assert files.output_folder(Path("/elsewhere/kit")) == Path("/elsewhere/kit")
    for given in (".", "..", str(tmp_path)):
        with pytest.raises(InputError) as caught:
            files.output_folder(Path(given))
        assert str(caught.value) == (
            f"--out {given}: is the current folder or one above it; "
            "give a new folder for the output, e.g. --out nomad-tls"
        )
    assert files.output_folder(Path("n" * 226)).name == "n" * 226
    with pytest.raises(InputError) as long:
        files.output_folder(Path("n" * 227))
    assert str(long.value) == (
        "--out: the folder name is 227 bytes; cfwrap needs room beside it for a dated backup, "
        "so at most 226; choose a shorter folder name"
    )


def test_output_folder_without_a_working_folder_keeps_the_path(tmp_path, monkeypatch):
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    assert files.output_folder(Path("/abs/kit")) == Path("/abs/kit")
    assert files.output_folder(Path("rel/kit")) == Path("rel/kit")


# The folder lock.


def test_a_waiting_lock_gets_the_folder_when_the_holder_lets_go(tmp_path):
    target = tmp_path / "kit"
    holder = files.FolderLock(target)
    holder.__enter__()
    threading.Timer(0.2, holder.__exit__, (None, None, None)).start()
    started = time.monotonic()
    with files.FolderLock(target, wait=5) as waiter:
        assert 0.15 < time.monotonic() - started < 0.9  # it polled, briefly
        assert _locked_elsewhere(waiter.path)
    assert not waiter.path.exists()


def test_a_held_lock_refuses_at_once_naming_the_target(tmp_path):
    target = tmp_path / "kit"
    with files.FolderLock(target) as held:
        assert _locked_elsewhere(held.path)
        assert stat.S_IMODE(held.path.stat().st_mode) == 0o600
        started = time.monotonic()
        with pytest.raises(ConflictError) as caught, files.FolderLock(target):
            pass
        assert time.monotonic() - started < 0.5
    assert str(caught.value) == (
        f"{target}: another cfwrap is writing here; wait for it to finish, or pass --wait SECONDS"
    )
    assert caught.value.path == target


def test_a_lock_whose_file_cannot_be_made_names_the_lock_file(tmp_path):
    target = tmp_path / "missing" / "kit"
    with pytest.raises(FileSystemError) as caught, files.FolderLock(target):
        pass
    assert caught.value.path == tmp_path / "missing" / ".kit.cfwrap.lock"


def test_releasing_a_lock_is_safe_when_its_file_is_gone_or_twice(tmp_path):
    lock = files.FolderLock(tmp_path / "kit")
    lock.__exit__(None, None, None)  # never taken
    lock.__enter__()
    lock.path.unlink()
    lock.__exit__(None, None, None)
    lock.__exit__(None, None, None)
    assert _names(tmp_path) == []


def test_the_sweep_removes_a_killed_runs_leftovers_and_only_those(tmp_path):
    target = tmp_path / "kit"
    target.mkdir()
    stale_dir = tmp_path / ".kit.cfwrap-abcd1234"
    (stale_dir / "inner").mkdir(parents=True)
    (stale_dir / "inner" / "f").write_text("x")
    (target / ".cfwrap-abcd1234.tmp").write_text("x")
    keep = [".cfwrap-abcd1234.tmpx", "cfwrap-abcd1234.tmp", "ca.pem"]
    for name in keep:
        (target / name).write_text("x")
    (tmp_path / ".other.cfwrap-abcd1234").mkdir()
    with files.FolderLock(target):
        pass
    assert _names(target) == sorted(keep)
    assert _names(tmp_path) == [".other.cfwrap-abcd1234", "kit"]


def test_the_sweep_leaves_a_symlinked_target_alone(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / ".cfwrap-abcd1234.tmp").write_text("x")
    (tmp_path / "kit").symlink_to(real)
    with files.FolderLock(tmp_path / "kit"):
        pass
    assert _names(real) == [".cfwrap-abcd1234.tmp"]


# Staging and FileSet.


def test_staging_refuses_a_missing_parent_exactly(tmp_path):
    target = tmp_path / "missing" / "kit"
    with pytest.raises(ConflictError) as caught, files.Staging(target, force=False):
        pass
    assert (
        str(caught.value) == f"{tmp_path / 'missing'}: is not an existing folder; create it first"
    )
    assert caught.value.path == tmp_path / "missing"


def test_staging_is_made_beside_the_target_and_removed_on_failure(tmp_path):
    target = tmp_path / "kit"
    with pytest.raises(RuntimeError), files.Staging(target, force=False, wait=0) as staging:
        (staging.path / "half").write_text("x")
        assert staging.path.parent == tmp_path
        assert re.fullmatch(r"\.kit\.cfwrap-[a-z0-9_]{8}", staging.path.name)
        assert stat.S_IMODE(staging.path.stat().st_mode) == 0o700
        raise RuntimeError("killed")
    assert _names(tmp_path) == []


def test_force_keeps_the_old_folder_as_a_dated_backup(tmp_path):
    _force_keeps_a_dated_backup(tmp_path)


def _force_keeps_a_dated_backup(tmp_path: Path) -> None:
    target = tmp_path / "kit"
    target.mkdir()
    (target / "old").write_text("old")
    before = datetime.now(UTC).replace(microsecond=0)
    with files.Staging(target, force=True) as staging:
        (staging.path / "new").write_text("new")
        staging.commit()
    after = datetime.now(UTC)
    backups = [p for p in _names(tmp_path) if p != "kit"]
    assert len(backups) == 1
    match = re.fullmatch(r"kit\.replaced-(\d{8}T\d{6}Z)", backups[0])
    assert match, backups
    when = datetime.strptime(match.group(1), "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    assert before <= when <= after
    assert staging.backup == tmp_path / backups[0]
    assert (tmp_path / backups[0] / "old").read_text() == "old"
    assert _names(target) == ["new"]


def test_without_force_a_full_folder_is_refused_under_the_lock_too(tmp_path):
    target = tmp_path / "kit"
    staging = files.Staging(target, force=False)
    target.mkdir()
    (target / "x").write_text("x")
    with pytest.raises(ConflictError), staging:
        pass
    # The lock was let go: the next run is not told another cfwrap is writing.
    with files.FolderLock(target):
        pass
    assert _names(tmp_path) == ["kit"]


def test_fileset_temporaries_are_named_for_the_sweep(tmp_path):
    (tmp_path / "old").write_text("old")
    with files.FileSet(tmp_path, replace=True) as batch:
        batch.add("old", b"new", mode=0o644)
        batch.add("added", b"added", mode=0o600)
        batch.apply()
        extra = [n for n in _names(tmp_path) if n not in ("old", "added")]
        # Temporaries, kept old files and the journal: all names the next locked run knows.
        assert any(TEMP.fullmatch(n) for n in extra), extra
        assert all(KNOWN.fullmatch(n) for n in extra), extra
    assert _names(tmp_path) == ["added", "old"]


def test_fileset_refusals_are_exact(tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "there").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    cases = {
        "dir": "is a symlink or a folder; remove it or choose another --out",
        "link": "is a symlink or a folder; remove it or choose another --out",
        "there": "already exists; remove it, or pass --force to replace it",
    }
    for name, why in cases.items():
        batch = files.FileSet(tmp_path, replace=name != "there")
        batch.add(name, b"x", mode=0o644)
        with pytest.raises(ConflictError) as caught:
            batch.check()
        assert str(caught.value) == f"{tmp_path / name}: {why}"
        assert caught.value.path == tmp_path / name


def test_fileset_undo_puts_back_every_old_file_and_removes_new_ones(tmp_path):
    (tmp_path / "a").write_bytes(b"old a")
    (tmp_path / "a").chmod(0o640)
    with pytest.raises(RuntimeError), files.FileSet(tmp_path, replace=True) as batch:
        batch.add("a", b"new a", mode=0o600)
        batch.add("b", b"new b", mode=0o600)
        batch.apply()
        raise RuntimeError("the manifest write failed")
    assert _names(tmp_path) == ["a"]
    assert (tmp_path / "a").read_bytes() == b"old a"
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o640


# Second round: what the first run of scripts/mutation files left alive.


def test_a_limit_of_one_mib_is_named_in_mib(tmp_path):
    (tmp_path / "f").write_bytes(b"a" * (MIB + 1))
    with pytest.raises(files.UnreadableInput) as caught:
        files.read_input(tmp_path / "f", limit=MIB)
    assert caught.value.strerror == "is larger than 1 MiB; cfwrap reads no input that big"


def test_a_full_disk_stops_a_fileset_naming_the_folder_and_changing_nothing(tmp_path):
    with mounted_tmpfs(tmp_path / "fs", "size=64k") as folder:
        (folder / "old").write_bytes(b"old")
        batch = files.FileSet(folder, replace=True)
        batch.add("old", b"new", mode=0o644)
        batch.add("big", b"x" * (1024 * 1024), mode=0o644)
        with pytest.raises(FileSystemError) as caught, batch:
            batch.apply()
        assert caught.value.path == folder
        assert caught.value.errno == errno.ENOSPC
        assert _names(folder) == ["old"]
        assert (folder / "old").read_bytes() == b"old"


def test_undo_goes_on_past_a_file_it_cannot_remove(tmp_path):
    (tmp_path / "a").write_bytes(b"old a")
    with pytest.raises(RuntimeError), files.FileSet(tmp_path, replace=True) as batch:
        batch.add("a", b"new a", mode=0o600)
        batch.add("b", b"new b", mode=0o600)
        batch.apply()
        (tmp_path / "b").unlink()  # someone removed a new file already
        raise RuntimeError("the manifest write failed")
    assert _names(tmp_path) == ["a"]
    assert (tmp_path / "a").read_bytes() == b"old a"


def test_a_staging_folder_that_cannot_be_made_names_the_parent_and_frees_the_lock(tmp_path):
    # Two inodes: the folder itself and the lock file. The staging folder gets none.
    with mounted_tmpfs(tmp_path / "fs", "size=64k,nr_inodes=2") as parent:
        with pytest.raises(FileSystemError) as caught, files.Staging(parent / "kit", force=False):
            pass
        assert caught.value.path == parent
        assert _names(parent) == []


def test_leftovers_that_cannot_be_removed_do_not_stop_the_lock_or_the_rollback(tmp_path):
    target = tmp_path / "kit"
    stale = tmp_path / ".kit.cfwrap-abcd1234"
    stale.mkdir()
    with mounted_tmpfs(stale / "busy", "size=64k"):  # a mount point: rmtree cannot remove it
        with files.FolderLock(target) as lock:
            assert _locked_elsewhere(lock.path)
        assert stale.is_dir()
    staging = files.Staging(target, force=False)
    staging.__enter__()
    left = staging.path
    with mounted_tmpfs(left / "busy", "size=64k"):
        staging.__exit__(RuntimeError, RuntimeError("killed"), None)  # must not raise
        assert (left / "busy").is_dir()
    with pytest.raises(RuntimeError, match="outside its with block"):
        _ = staging.path
    with files.FolderLock(target):  # the failed run let go of the lock; this one sweeps
        pass
    assert not left.exists()


def test_staging_path_exists_only_inside_the_with_block(tmp_path):
    staging = files.Staging(tmp_path / "kit", force=False)
    with pytest.raises(RuntimeError, match="outside its with block"):
        _ = staging.path
    with staging:
        (staging.path / "f").write_text("x")
        staging.commit()
        with pytest.raises(RuntimeError, match="outside its with block"):
            _ = staging.path
    assert staging.backup is None
    assert _names(tmp_path / "kit") == ["f"]


def test_staging_fails_at_once_by_default_and_waits_when_asked(tmp_path):
    target = tmp_path / "kit"
    holder = files.FolderLock(target)
    holder.__enter__()
    started = time.monotonic()
    with pytest.raises(ConflictError), files.Staging(target, force=False):
        pass
    assert time.monotonic() - started < 0.5
    threading.Timer(0.2, holder.__exit__, (None, None, None)).start()
    with files.Staging(target, force=False, wait=5) as staging:
        staging.commit()
    assert target.is_dir()


def test_a_commit_that_cannot_move_the_old_folder_names_it_and_keeps_it(tmp_path):
    target = tmp_path / "kit"
    target.mkdir()
    (target / "old").write_text("old")
    now = datetime.now(UTC)
    for seconds in range(5):  # every backup name the next seconds can give is taken
        taken = now.replace(microsecond=0) + dt.timedelta(seconds=seconds)
        stamp = f"kit.replaced-{taken:%Y%m%dT%H%M%SZ}"
        for count in range(1, 100):
            (tmp_path / (stamp if count == 1 else f"{stamp}-{count}") / "x").mkdir(parents=True)
    staging = files.Staging(target, force=True)
    with pytest.raises(FileSystemError) as caught, staging:
        (staging.path / "new").write_text("new")
        staging.commit()
    assert caught.value.path == target
    assert _names(target) == ["old"]
    assert not [n for n in _names(tmp_path) if n.startswith(".kit.cfwrap-")]


def test_a_second_replacement_within_the_second_gets_its_own_backup(tmp_path):
    """`--force` twice within one second: the second backup's name was taken, and the run
    failed with "Directory not empty; check the folder's permissions and free space"."""
    target = tmp_path / "kit"
    target.mkdir()
    (target / "old").write_text("old")
    now = datetime.now(UTC)
    for seconds in range(5):  # the first backup of each of the next seconds is there already
        taken = now.replace(microsecond=0) + dt.timedelta(seconds=seconds)
        (tmp_path / f"kit.replaced-{taken:%Y%m%dT%H%M%SZ}" / "earlier").mkdir(parents=True)
    with files.Staging(target, force=True) as staging:
        (staging.path / "new").write_text("new")
        staging.commit()
    assert _names(target) == ["new"]
    assert staging.backup is not None and staging.backup.name.endswith("Z-2")
    assert _names(staging.backup) == ["old"]


def test_the_backup_is_stamped_in_utc_whatever_the_local_zone(tmp_path, monkeypatch):
    monkeypatch.setenv("TZ", "XYZ-14")  # a POSIX zone 14 hours ahead of UTC
    time.tzset()
    try:
        _force_keeps_a_dated_backup(tmp_path)
    finally:
        monkeypatch.undo()
        time.tzset()


# Third round: the journal that undoes a FileSet killed before its commit (files.recover).


def _journal(folder: Path, old: object) -> None:
    import json

    (folder / ".cfwrap-journal.json").write_text(json.dumps({"old": old}))


def test_recover_without_a_journal_changes_nothing(tmp_path):
    (tmp_path / "a.pem").write_text("a")
    assert files.recover(tmp_path) is False
    assert _names(tmp_path) == ["a.pem"]


def test_recover_puts_kept_files_back_and_removes_new_ones(tmp_path):
    (tmp_path / "a.pem").write_text("new a")
    (tmp_path / ".cfwrap-abcd1234.old").write_text("old a")
    (tmp_path / "b.pem").write_text("new b")
    (tmp_path / "c.pem").mkdir()  # cannot be unlinked: passed over, the rest still undone
    (tmp_path / "d.pem").write_text("new d")
    _journal(tmp_path, {"c.pem": None, "a.pem": ".cfwrap-abcd1234.old", "b.pem": None,
                        "d.pem": ".cfwrap-gone0000.old"})  # fmt: skip
    assert files.recover(tmp_path) is True
    assert _names(tmp_path) == ["a.pem", "c.pem", "d.pem"]
    assert (tmp_path / "a.pem").read_text() == "old a"
    assert (tmp_path / "d.pem").read_text() == "new d"  # its kept file is gone: left as it is


def test_recover_ignores_names_outside_the_folder_and_foreign_old_files(tmp_path):
    folder = tmp_path / "node"
    folder.mkdir()
    (tmp_path / "outside").write_text("keep")
    (folder / "a.pem").write_text("new a")
    (folder / "notes.txt").write_text("keep too")
    _journal(folder, {"../outside": None, "sub/x": None, "a.pem": "notes.txt"})
    assert files.recover(folder) is True
    assert (tmp_path / "outside").read_text() == "keep"
    assert _names(folder) == ["a.pem", "notes.txt"]
    assert (folder / "a.pem").read_text() == "new a"


@pytest.mark.parametrize(
    "journal",
    [
        b"{not json",
        b'{"new": {}}',
        b"x" * (1024 * 1024 + 1),
        b'{"old": [1, 2]}',
        b'{"old": 5}',
        b'{"old": {"a.pem": 5}}',
    ],
)
def test_a_damaged_journal_is_removed_and_nothing_moves(tmp_path, journal):
    (tmp_path / "a.pem").write_text("a")
    (tmp_path / ".cfwrap-journal.json").write_bytes(journal)
    assert files.recover(tmp_path) is True
    assert _names(tmp_path) == ["a.pem"]


def test_a_fileset_killed_after_apply_is_undone_from_its_journal(tmp_path):
    """What SIGKILL leaves after apply (copied as it is) is put back by recover."""
    import shutil

    node = tmp_path / "node"
    node.mkdir()
    (node / "a.pem").write_text("old a")
    (node / "keep.txt").write_text("untouched")
    with files.FileSet(node, replace=True) as batch:
        batch.add("a.pem", b"new a", mode=0o644)
        batch.add("b.pem", b"new b", mode=0o600)
        batch.apply()
        assert (node / "a.pem").read_text() == "new a"
        killed = tmp_path / "killed"
        shutil.copytree(node, killed)
    assert (killed / ".cfwrap-journal.json").stat().st_mode & 0o777 == 0o600
    assert files.recover(killed) is True
    # Its temporaries are left for the sweep of the next lock.
    assert [n for n in _names(killed) if not TEMP.fullmatch(n)] == ["a.pem", "keep.txt"]
    assert (killed / "a.pem").read_text() == "old a"
    assert _names(node) == ["a.pem", "b.pem", "keep.txt"]  # the real set committed


@pytest.mark.parametrize("stop", [KeyboardInterrupt, OSError])
def test_a_stop_between_the_two_renames_of_a_forced_commit_puts_the_old_kit_back(
    tmp_path, monkeypatch, stop
):
    # helper-28: a SIGTERM there left no kit (the old one moved to a backup, the new one
    # removed). The signal is raised where it lands: in the rename of the staged folder.
    target = tmp_path / "kit"
    target.mkdir()
    (target / "old").write_text("old")
    real_rename = Path.rename

    def rename(self: Path, to: Path) -> Path:
        if to == target and self.name.startswith(".kit.cfwrap-"):
            raise stop()
        return real_rename(self, to)

    with pytest.raises((stop, FileSystemError)), files.Staging(target, force=True) as staging:
        (staging.path / "new").write_text("new")
        monkeypatch.setattr(Path, "rename", rename)
        staging.commit()
    monkeypatch.undo()
    assert _names(tmp_path) == ["kit"]  # no backup, no staging folder left
    assert _names(target) == ["old"]
