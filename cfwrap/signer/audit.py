"""The signer's audit trail: certdb holds each certificate; ``audit.log`` adds who asked.

multirootca logs one line per issue (``cmd/multirootca/api.go``: ``signature: requester=ADDR,
label=L, profile=P, serialno=N``) and certdb stores the certificate under that serial but not the
requester or profile. cfwrap hands each line of the running signer's log over as it is written
(:func:`cfwrap.runner.start_service`) and appends one JSON line per issue to ``audit.log`` (0600,
append-only, fsynced), joined with certdb's record: time, profile, requester, serial, common
name, DNS names, validity.

A requester chooses its certificate's validity by putting ``NotBefore``/``NotAfter`` in its sign
request: cfssl 1.6.5 honours them over the profile's ``expiry`` (``signer.SignRequest`` has no
JSON tags on them and ``signer.FillTemplate`` takes them first), and multirootca has no setting
that refuses them. Each entry says whether the dates are the signer's (``"validity":
"policy"``) or the requester's (``"requested"``, also logged as a warning).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cfwrap.signer import certdb

log = logging.getLogger(__name__)

# A whole line as cfssl's log package writes it (Go's log: date, time, level), never a part of
# one: multirootca also logs what a refused request said (its profile, its label), as it came.
_ISSUED = re.compile(
    r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d \[INFO\] signature: requester=(?P<requester>\S*), "
    r"label=(?P<label>\S*), profile=(?P<profile>\S*), serialno=(?P<serial>\d+)$",
    re.MULTILINE,
)
#: How much earlier than this run's start a certificate of this run may be stamped in certdb.
_CLOCK_SLACK = timedelta(seconds=5)
# cfssl backdates a certificate by 5 minutes from the minute nearest its issue
# (signer.FillTemplate); certdb's issued_at is a moment later.
_BACKDATE = (timedelta(minutes=4), timedelta(minutes=6))


@dataclass
class AuditLog:
    """Appends each issue the signer logged to the audit log, joined with certdb's record.

    ``lifetime`` is the signer's ``--expiry``: a certificate that does not live exactly that
    long, from the signer's backdated start, had its dates chosen by its requester.
    """

    path: Path
    db_folder: Path
    lifetime: timedelta | None = None
    #: When this run of the signer started: it logs only the certificates it issues.
    started: datetime = field(default_factory=lambda: datetime.now(UTC))
    #: The serials recorded in this run: each is issued, and logged, once.
    seen: set[str] = field(default_factory=set)

    def record(self, log_text: str) -> int:
        """Append an entry for every issue in ``log_text`` (lines of the signer's log).

        Each line is given once: the signer's log is read as it is written. Returns how many
        entries were appended (one fsync for all of them).
        """
        found = [m.groupdict() for m in _ISSUED.finditer(log_text)]
        if not found:
            return 0
        serials = [entry["serial"] for entry in found]
        by_serial = {r.serial: r for r in certdb.records_of(self.db_folder, serials)}
        lines = []
        for entry in found:
            record = by_serial.get(entry["serial"])
            if not self._issued_now(entry["serial"], record):
                continue
            self.seen.add(entry["serial"])
            line: dict[str, Any] = {
                "time": record.issued_at if record else datetime.now(UTC).isoformat(),
                "profile": entry["profile"],
                "requester": entry["requester"],
                "label": entry["label"],
                "serial": entry["serial"],
                "common_name": record.common_name if record else None,
                "dns_names": list(record.sans) if record else None,
                "not_before": record.not_before if record else None,
                "expiry": record.expiry if record else None,
                "validity": self._validity(record) if record else None,
            }
            if line["validity"] == "requested":
                log.warning(
                    "serial %s (profile %s, requester %s) has a validity its requester chose: "
                    "%s to %s (cfssl honours NotBefore/NotAfter in a sign request)",
                    entry["serial"],
                    entry["profile"],
                    entry["requester"],
                    line["not_before"],
                    line["expiry"],
                )
            lines.append(json.dumps(line, sort_keys=True) + "\n")
        _append(self.path, "".join(lines).encode())
        return len(lines)

    def _issued_now(self, serial: str, record: certdb.Record | None) -> bool:
        """Whether a line names a certificate this run has just issued, and names it first.

        multirootca logs the line after certdb has the certificate and before it answers: no
        one can know a new serial before its own line is written. A line naming a serial
        certdb does not hold, one recorded already, or one issued before this run, was not
        written by a signing (a request can put a whole line into multirootca's log, as the
        name of a profile it asks for, before anything checks its key).
        """
        why = None
        if record is None:
            why = "certdb holds no such certificate"
        elif serial in self.seen:
            why = "it is recorded already"
        else:
            try:
                issued = datetime.fromisoformat(record.issued_at)
            except ValueError:
                issued = None
            if issued is not None and issued.tzinfo is None:
                issued = issued.replace(tzinfo=UTC)  # certdb's stamps are UTC
            if issued is None or issued < self.started - _CLOCK_SLACK:
                why = "certdb has it from before this run"
        if why is not None:
            log.warning(
                "the signer's log names serial %s, but %s: not recorded (a line a request "
                "wrote into the log?)",
                serial[:40],
                why,
            )
        return why is None

    def _validity(self, record: certdb.Record) -> str | None:
        """``policy`` for the signer's own dates, ``requested`` for others, None if unknown."""
        if self.lifetime is None:
            return None
        try:
            issued = datetime.fromisoformat(record.issued_at)
            start = datetime.fromisoformat(record.not_before)
            end = datetime.fromisoformat(record.expiry)
        except ValueError:
            return None
        backdated = issued - start
        if end - start == self.lifetime and _BACKDATE[0] <= backdated <= _BACKDATE[1]:
            return "policy"
        return "requested"


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
