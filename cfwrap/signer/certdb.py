"""The signer's audit database: cfssl's certdb on SQLite, which multirootca fills on every issue.

The schema is cfssl's own (``certdb/sqlite/migrations/001_CreateCertificates.sql`` and
``002_AddMetadataToCertificates.sql`` in v1.6.5, the ``Up`` sections in order), so ``cfssl
revoke``, ``crl`` and ``ocsprefresh`` can read it. Each row holds the serial, the CA's key id,
the label, issue time, validity, common name, SANs and the PEM; who asked (the peer address) and
under which profile comes from multirootca's log line, kept in ``audit.log`` beside it.

multirootca opens it in WAL mode (``_journal_mode=WAL`` in the data source, read by the
mattn/go-sqlite3 driver cfssl uses): a commit is one fsync of the log instead of the rollback
journal's several, as durable (synchronous stays FULL), and readers (the audit) never block the
signer's writes. It doubled the signer's throughput here (about 100 to 200 certificates a
second on two cores).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

FILE_NAME = "certdb.sqlite"
CONFIG_NAME = "certdb.json"

# cfssl v1.6.5 certdb/sqlite/migrations, 001 then 002 (Up sections only).
SCHEMA = """
CREATE TABLE certificates (
  serial_number            blob NOT NULL,
  authority_key_identifier blob NOT NULL,
  ca_label                 blob,
  status                   blob NOT NULL,
  reason                   int,
  expiry                   timestamp,
  revoked_at               timestamp,
  pem                      blob NOT NULL,
  PRIMARY KEY(serial_number, authority_key_identifier)
);
CREATE TABLE ocsp_responses (
  serial_number            blob NOT NULL,
  authority_key_identifier blob NOT NULL,
  body                     blob NOT NULL,
  expiry                   timestamp,
  PRIMARY KEY(serial_number, authority_key_identifier),
  FOREIGN KEY(serial_number, authority_key_identifier)
    REFERENCES certificates(serial_number, authority_key_identifier)
);
ALTER TABLE certificates ADD COLUMN "issued_at" timestamp;
ALTER TABLE certificates ADD COLUMN "not_before" timestamp;
ALTER TABLE certificates ADD COLUMN "metadata" text;
ALTER TABLE certificates ADD COLUMN "sans" text;
ALTER TABLE certificates ADD COLUMN "common_name" text;
"""


@dataclass(frozen=True)
class Record:
    """One issued certificate as certdb holds it."""

    serial: str
    common_name: str
    sans: tuple[str, ...]
    issued_at: str
    expiry: str
    status: str
    not_before: str = ""


def data_source(database: Path) -> str:
    """The ``-db-config`` data source: a ``file:`` URI (any path, escaped) in WAL mode."""
    return database.absolute().as_uri() + "?_journal_mode=WAL"


def ensure(folder: Path) -> Path:
    """Make the database with cfssl's schema if it is missing, and its ``-db-config`` file.

    Returns the db-config file's path.
    """
    from cfwrap import files

    database = folder / FILE_NAME
    if not database.exists():
        temp = folder / f".{FILE_NAME}.new"
        temp.unlink(missing_ok=True)
        with sqlite3.connect(temp) as connection:
            connection.executescript(SCHEMA)
        connection.close()
        temp.chmod(files.SECRET_MODE)
        temp.rename(database)
    config = folder / CONFIG_NAME
    text = json.dumps({"driver": "sqlite3", "data_source": data_source(database)}) + "\n"
    if not config.exists() or config.read_text() != text:
        files.write_replace(config, text.encode(), mode=files.SECRET_MODE)
    return config


_COLUMNS = "serial_number, common_name, sans, issued_at, expiry, status, not_before"
# Serials looked up per query (SQLite allows 32,766 parameters; older builds 999).
_BATCH = 500


def records(folder: Path) -> list[Record]:
    """Every certificate the signer issued, oldest first."""
    query = f"SELECT {_COLUMNS} FROM certificates ORDER BY issued_at"  # noqa: S608 (constants)
    return _select(folder, query, ())


def records_of(folder: Path, serials: Sequence[str]) -> list[Record]:
    """The certificates with these serials (decimal, as multirootca logs them), by the index."""
    found: list[Record] = []
    for start in range(0, len(serials), _BATCH):
        batch = tuple(serials[start : start + _BATCH])
        where = f"serial_number IN ({', '.join('?' * len(batch))})"
        query = f"SELECT {_COLUMNS} FROM certificates WHERE {where}"  # noqa: S608 (? marks only)
        found += _select(folder, query, batch)
    return found


def _select(folder: Path, query: str, parameters: tuple[str, ...]) -> list[Record]:
    uri = (folder / FILE_NAME).absolute().as_uri() + "?mode=ro"
    with sqlite3.connect(uri, uri=True) as connection:
        rows = connection.execute(query, parameters).fetchall()
    connection.close()
    return [
        Record(
            serial=_text(serial),
            common_name=_text(cn),
            sans=tuple(json.loads(_text(sans) or "[]") or ()),
            issued_at=_text(issued),
            expiry=_text(expiry),
            status=_text(status),
            not_before=_text(not_before),
        )
        for serial, cn, sans, issued, expiry, status, not_before in rows
    ]


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)
