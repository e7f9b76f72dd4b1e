"""Replaying published guides: ``guide`` (the format), ``run`` (running one), ``transcript``.

This module only knows where the shipped guides are, so ``cfwrap replay --list`` loads nothing
else (tests/test_cold_start.py).
"""

from __future__ import annotations

from pathlib import Path

#: The guides cfwrap ships, one TOML file each.
GUIDES = Path(__file__).resolve().parent / "guides"


def shipped() -> list[str]:
    """Names of the guides that ship with cfwrap."""
    return sorted(p.stem for p in GUIDES.glob("*.toml"))
