"""The signer's audit trail: certdb holds each certificate; ``audit.log`` adds who asked.

multirootca logs one line per issue (``cmd/multirootca/api.go``: ``signature: requester=ADDR,
label=L, profile=P, serialno=N``) and certdb stores the certificate under that serial but not the
requester or profile. cfwrap reads those lines from the running signer and appends one JSON
line per issue to ``audit.log`` (0600, append-only, fsynced), joined with certdb's record: time,
profile, requester, serial, common name, DNS names, expiry.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cfwrap.signer import certdb

_ISSUED = re.compile(
    r"signature: requester=(?P<requester>\S*), label=(?P<label>\S*), "
    r"profile=(?P<profile>\S*), serialno=(?P<serial>\d+)"
)


@dataclass
class AuditLog:
    """Appends each issue the signer logged, once, to the audit log."""

    path: Path
    db_folder: Path
    seen: set[str] = field(default_factory=set)

    def record(self, log_text: str) -> int:
        """Append an entry for every issue in ``log_text`` not recorded yet; returns how many."""
        found = [m.groupdict() for m in _ISSUED.finditer(log_text)]
        new = [f for f in found if f["serial"] not in self.seen]
        if not new:
            return 0
        by_serial = {r.serial: r for r in certdb.records(self.db_folder)}
        lines = []
        for entry in new:
            self.seen.add(entry["serial"])
            record = by_serial.get(entry["serial"])
            line: dict[str, Any] = {
                "time": record.issued_at if record else datetime.now(UTC).isoformat(),
                "profile": entry["profile"],
                "requester": entry["requester"],
                "label": entry["label"],
                "serial": entry["serial"],
                "common_name": record.common_name if record else None,
                "dns_names": list(record.sans) if record else None,
                "expiry": record.expiry if record else None,
            }
            lines.append(json.dumps(line, sort_keys=True) + "\n")
        _append(self.path, "".join(lines).encode())
        return len(new)


def _append(path: Path, data: bytes) -> None:
    """Append to a log file (0600 when made), fsynced; an audit trail is only ever appended to."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def entries(path: Path) -> list[dict[str, Any]]:
    """The audit log's entries, oldest first (none when there is no log yet)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]
