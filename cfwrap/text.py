"""Characters that must never reach a subject name, a configuration file or a terminal raw.

C0 and C1 controls (a newline ends an HCL string or an env line, escape sequences rewrite the
terminal), line and paragraph separators, and the bidi controls that make text display otherwise
than it reads (a command that looks harmless on screen but runs something else).
"""

from __future__ import annotations

import re

UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def first_unsafe(text: str) -> str | None:
    """The first unsafe character in ``text``, escaped for a message; None if there is none."""
    found = UNSAFE.search(text)
    return ascii(found.group())[1:-1] if found else None


def printable(text: str) -> str:
    """``text`` with every unsafe character escaped as Python writes it, so it stays one line."""
    return UNSAFE.sub(lambda m: ascii(m.group())[1:-1], text)
