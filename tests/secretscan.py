"""A scan of everything a test run wrote or printed, for private key and gossip key material.

Secrets are gathered from the files that hold them by design (``*-key.pem``, ``gossip.key``, and
0600 files such as the server HCL with its gossip key); every other file and every captured
output must not contain any of them, nor a PEM private key header.
"""

from __future__ import annotations

import re
import stat
from pathlib import Path

_PEM_KEY = re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----\n(.*?)\n-----END", re.S)
_GOSSIP = re.compile(r'encrypt\s*=\s*"([A-Za-z0-9+/=]{20,})"')


def is_secret_file(path: Path) -> bool:
    """Files whose job is to hold a secret."""
    if path.name.endswith("-key.pem") or path.name == "gossip.key":
        return True
    try:
        return stat.S_IMODE(path.stat().st_mode) == 0o600
    except OSError:
        return False


def secrets_in(root: Path) -> set[str]:
    """Every private key line and gossip key found in the secret files below ``root``."""
    found: set[str] = set()
    for path in root.rglob("*"):
        if not path.is_file() or path.is_symlink() or not is_secret_file(path):
            continue
        try:
            text = path.read_text(errors="replace")
        except OSError:
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
        if not path.is_file() or path.is_symlink() or is_secret_file(path):
            continue
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        if any(secret in text for secret in secrets):
            problems.append(f"secret material in {path}")
    for number, text in enumerate(outputs):
        if "PRIVATE KEY-----" in text or any(secret in text for secret in secrets):
            problems.append(f"secret material in captured output #{number}: {text[:80]!r}")
    return problems
