"""The signer's HMAC auth keys: one per role, hex in ``<role>.key`` (0600), never overwritten.

cfssl's authsign token is HMAC-SHA256 over the request with the hex-decoded key
(``auth/auth.go``). A rotation keeps the old key as ``<role>.prev.key``, which the role's
profile accepts as ``prev_auth_key`` until the overlap is ended.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
from pathlib import Path

from cfwrap import files
from cfwrap.errors import ConflictError, InputError
from cfwrap.nomad import ROLES, Role
from cfwrap.runner import remember_secret

#: Bytes of an auth key (HMAC-SHA256 takes 32 bytes without hashing the key first).
KEY_BYTES = 32
#: The key no node is given: it locks the default profile (cfssl#581: set one everywhere).
LOCKED = "default"
_HEX = re.compile(r"[0-9a-f]{64}")


def key_path(auth_dir: Path, role: str) -> Path:
    """Where a role's current key lives."""
    return auth_dir / f"{role}.key"


def prev_path(auth_dir: Path, role: str) -> Path:
    """Where a role's previous key lives during a rotation's overlap."""
    return auth_dir / f"{role}.prev.key"


def read_key(path: Path, *, what: str | None = None) -> str:
    """Read an auth key file: 64 lowercase hex digits, readable by its owner only.

    Raises:
        InputError: missing, unreadable, open to others, or not a 32-byte hex key.
    """
    shown = what or str(path)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        text = files.read_input(path, limit=1024).decode("ascii").strip().lower()
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or "is not a hex key"
        raise InputError(shown, str(reason), fix="give the role's auth key file") from None
    if mode & 0o077:
        raise InputError(
            shown, f"mode {mode:04o} lets others read an auth key", fix=f"chmod 600 {path}"
        )
    if not _HEX.fullmatch(text):
        raise InputError(
            shown, f"not an auth key ({KEY_BYTES} bytes as hex)", fix="give a <role>.key file"
        )
    remember_secret(text)
    return text


def _new_key(path: Path) -> None:
    value = secrets.token_hex(KEY_BYTES)
    remember_secret(value)
    files.write_new(path, (value + "\n").encode(), mode=files.SECRET_MODE)


def ensure_keys(auth_dir: Path) -> list[str]:
    """Make the auth folder (0700) and each role's key plus the locked default's, if missing.

    Returns the names of the key files made now. Existing keys are checked, never replaced.

    Raises:
        InputError: an existing key file is not a key, is open to others or owned by another
            user; the folder is another user's or open to their writes.
    """
    auth_dir.mkdir(mode=files.DIR_MODE, parents=True, exist_ok=True)
    check_trusted(auth_dir)
    made = []
    for name in (*ROLES, LOCKED):
        path = key_path(auth_dir, name)
        if not path.exists() and not path.is_symlink():
            _new_key(path)
            made.append(path.name)
        read_key(path)
    return made


def check_trusted(auth_dir: Path) -> None:
    """Refuse an auth folder, or a key in it, that another user could have chosen.

    Raises:
        InputError: see :func:`_check_own`.
    """
    if not auth_dir.exists():
        return
    _check_own(auth_dir, "the auth folder", writable_by_others=True)
    for name in (*ROLES, LOCKED):
        for path in (key_path(auth_dir, name), prev_path(auth_dir, name)):
            if path.exists() or path.is_symlink():
                _check_own(path, "an auth key")


def _check_own(path: Path, what: str, *, writable_by_others: bool = False) -> None:
    """Refuse what the signer would trust from another user.

    A key they wrote, or a folder they can write into (and so swap a key in): the signer then
    signs for whoever holds their key.

    Raises:
        InputError: owned by another user, or (``writable_by_others``) open to their writes.
    """
    try:
        info = path.stat()  # what a link names: its owner and mode are what count
    except OSError as e:  # a link to nothing, say
        raise InputError(
            str(path), f"{what} cannot be read ({e.strerror or e})", fix="move it away"
        ) from None
    mode = stat.S_IMODE(info.st_mode)
    if info.st_uid != os.geteuid():
        raise InputError(
            str(path),
            f"{what} owned by uid {info.st_uid}, not by the user running the signer "
            f"({os.geteuid()}): whoever owns it chooses the keys it signs for",
            fix=f"move it away, or chown it to uid {os.geteuid()} if it is yours",
        )
    if writable_by_others and mode & 0o022:
        raise InputError(
            str(path),
            f"{what} has mode {mode:04o}: other users may write into it and swap a key",
            fix=f"chmod 700 {path}",
        )


def rotate(auth_dir: Path, role: Role) -> Path:
    """Start a rotation: the current key becomes the previous one, a new key becomes current.

    Raises:
        ConflictError: an overlap is already running (end it first).
        InputError: the role has no key yet.
    """
    current, prev = key_path(auth_dir, role), prev_path(auth_dir, role)
    if prev.exists():
        raise ConflictError(
            prev,
            f"a rotation of the {role} key is still in its overlap",
            fix=f"end it first with `cfwrap signer CA_DIR --end-overlap {role}`",
        )
    read_key(current)
    os.link(current, prev)  # the old key under its second name first: never lost
    current.unlink()
    _new_key(current)
    return current


def end_overlap(auth_dir: Path, role: Role) -> Path:
    """End a rotation's overlap: the previous key is removed, and refused from the next start.

    Raises:
        InputError: no rotation of this role is in its overlap.
    """
    prev = prev_path(auth_dir, role)
    if not prev.exists():
        raise InputError(
            f"--end-overlap {role}",
            "no rotation of this key is in its overlap",
            fix=f"start one with --rotate-key {role}",
        )
    prev.unlink()
    return prev
