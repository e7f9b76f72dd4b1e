"""A scan of everything a test run wrote or printed, for private key and gossip key material.

Secrets are gathered from the files that hold them by design: private key files
(``*-key.pem``), ``gossip.key`` and a server's agent configuration (``*-server.hcl``, which
holds the gossip key). Every other file, whatever its mode, and every captured output (of
in-process runs and of subprocesses alike) must not contain any of them, nor a PEM private key
header.
"""

from __future__ import annotations

import re
import stat
from pathlib import Path

_PEM_KEY = re.compile(r"-----BEGIN [A-Za-z0-9 ]*PRIVATE KEY-----\n(.*?)\n-----END", re.S)
_GOSSIP = re.compile(r'encrypt\s*=\s*"([A-Za-z0-9+/=]{20,})"')
#: The most read of one file: the suite makes sparse files of many MiB to test size limits.
_READ_LIMIT = 64 * 1024 * 1024


def is_secret_file(path: Path) -> bool:
    """Files whose job is to hold a secret (by name: a mode proves nothing)."""
    return (
        path.name.endswith("-key.pem")
        or path.name == "gossip.key"
        or path.name.endswith("-server.hcl")
    )


def _text(path: Path) -> str | None:
    """A regular file's text (never a FIFO or device), at most ``_READ_LIMIT`` bytes of it."""
    try:
        if not stat.S_ISREG(path.lstat().st_mode):
            return None
        with path.open("rb") as f:
            return f.read(_READ_LIMIT).decode("utf-8", "replace")
    except OSError:
        return None


def secrets_in(root: Path) -> set[str]:
    """Every private key line and gossip key found in the secret files below ``root``."""
    found: set[str] = set()
    for path in root.rglob("*"):
        if not is_secret_file(path):
            continue
        text = _text(path)
        if text is None:
            continue
        for body in _PEM_KEY.findall(text):
            found.update(line for line in body.splitlines() if len(line) >= 40)
        found.update(_GOSSIP.findall(text))
        if path.name == "gossip.key" and text.strip():
            found.add(text.strip())
    return found


def leaks(root: Path, outputs: list[str]) -> list[str]:
    """Where secret material shows up: non-secret files below ``root``, and captured outputs."""
    secrets = secrets_in(root)
    problems = []
    for path in root.rglob("*"):
        if is_secret_file(path):
            continue
        text = _text(path)
        if text is None:
            continue
        if any(secret in text for secret in secrets):
            problems.append(f"secret material in {path}")
    for number, text in enumerate(outputs):
        if "PRIVATE KEY-----" in text or any(secret in text for secret in secrets):
            problems.append(f"secret material in captured output #{number}: {text[:80]!r}")
    return problems
