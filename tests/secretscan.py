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


#: Every secret is base64 of at least 24 characters, the last two of which may be padding: its
#: first ``_WINDOW`` characters are base64 digits, which index it.
_WINDOW = 20
_RUN = re.compile(rf"[A-Za-z0-9+/]{{{_WINDOW},}}")


class _Finder:
    """Finds any of many secrets in a text in one pass over its base64 runs.

    Testing each secret with ``in`` costs secrets x text: thousands of keys (a plan's tests)
    against files of many MiB took minutes. A secret lies whole inside one run of base64 digits,
    so each window of a run is looked up among the secrets' first characters.
    """

    def __init__(self, secrets: set[str]) -> None:
        self.by_start: dict[str, list[str]] = {}
        #: Secrets that do not start with a window of base64 digits (a hand-written key file):
        #: few, searched for as they are.
        self.plain: list[str] = []
        for secret in secrets:
            if _RUN.match(secret):
                self.by_start.setdefault(secret[:_WINDOW], []).append(secret)
            elif secret:
                self.plain.append(secret)

    def found_in(self, text: str) -> bool:
        if any(secret in text for secret in self.plain):
            return True
        for run in _RUN.finditer(text):
            start, end = run.span()
            for i in range(start, end - _WINDOW + 1):
                candidates = self.by_start.get(text[i : i + _WINDOW])
                if candidates and any(text.startswith(c, i) for c in candidates):
                    return True
        return False


def leaks(root: Path, outputs: list[str]) -> list[str]:
    """Where secret material shows up: non-secret files below ``root``, and captured outputs."""
    finder = _Finder(secrets_in(root))
    problems = []
    for path in root.rglob("*"):
        if is_secret_file(path):
            continue
        text = _text(path)
        if text is None:
            continue
        if finder.found_in(text):
            problems.append(f"secret material in {path}")
    for number, text in enumerate(outputs):
        if "PRIVATE KEY-----" in text or finder.found_in(text):
            problems.append(f"secret material in captured output #{number}: {text[:80]!r}")
    return problems
