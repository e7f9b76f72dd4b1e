"""What doctor reports: findings with a severity, Nomad's own error text, and the fix."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

Severity = Literal["error", "warning", "info"]
SEVERITY_ORDER: dict[Severity, int] = {"error": 0, "warning": 1, "info": 2}


@dataclass(frozen=True)
class Finding:
    """One thing doctor found about one file (or one live peer)."""

    severity: Severity
    path: str
    check: str
    message: str
    nomad_error: str = ""
    fix: str = ""

    def to_json(self) -> dict[str, Any]:
        """A plain dict for ``--json``."""
        return asdict(self)


def sort_findings(findings: list[Finding]) -> list[Finding]:
    """Group by file, errors first within each file."""
    return sorted(findings, key=lambda f: (f.path, SEVERITY_ORDER[f.severity], f.check))
