"""Nomad gossip encryption keys: standard base64 of 16, 24 or 32 random bytes (memberlist AES)."""

from __future__ import annotations

import base64
import binascii
import secrets

KEY_SIZES = (16, 24, 32)
#: What current Nomad generates (``nomad operator gossip keyring generate``, since 1.0).
DEFAULT_SIZE = 32


def generate(size: int = DEFAULT_SIZE) -> str:
    """Return a new gossip key of ``size`` random bytes, base64-encoded.

    A key that starts with ``/`` is drawn again: such a key is valid, but reads like a file path
    (the old guide describes ``encrypt`` as naming a file), which invites a wrong "fix" by hand.

    Raises:
        ValueError: ``size`` is not 16, 24 or 32.
    """
    if size not in KEY_SIZES:
        raise ValueError(f"gossip key size must be 16, 24 or 32 bytes, not {size}")
    while True:
        key = base64.b64encode(secrets.token_bytes(size)).decode("ascii")
        if not key.startswith("/"):
            return key


def check(key: str) -> int:
    """Check a gossip key and return its size in bytes.

    Raises:
        ValueError: the reason the key is unusable; the message never contains the key.
    """
    text = key.strip()
    if not text:
        raise ValueError("the gossip key is empty")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        if text.startswith("/"):
            raise ValueError(
                "the gossip key looks like a file path; Nomad's `encrypt` takes the base64 key "
                "itself, not a file name"
            ) from None
        raise ValueError("the gossip key is not standard base64") from None
    if len(raw) not in KEY_SIZES:
        raise ValueError(
            f"the gossip key decodes to {len(raw)} bytes; Nomad needs 16, 24 or 32 (32 is current)"
        )
    return len(raw)
