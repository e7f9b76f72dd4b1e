"""The plan's manifest: one file at the top of the tree that indexes every certificate in it.

Each member's folder has its own ``manifest.json`` (the kit manifest, so ``cfwrap manifest
--check`` and ``cfwrap doctor`` work on a node's folder alone); this file adds what only the
whole tree knows: the CA generations, the rotation phase, and every member's certificate. It
holds no timestamp of its own, so an apply that changes nothing writes nothing.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cfwrap.errors import VerificationError

if TYPE_CHECKING:
    import jsonschema
from cfwrap.manifest import ToolRecord
from cfwrap.nomad import Role

FILE_NAME = "plan-manifest.json"
SCHEMA_FILE = "plan-manifest.schema.json"
SCHEMA_VERSION: Literal[1] = 1
#: The largest plan manifest read: ~700 bytes a member, room for a fleet of ~350,000 (the
#: limit for other inputs, 16 MiB, would refuse one of ~23,000).
MAX_FILE = 256 * 1024 * 1024

_FROZEN = ConfigDict(frozen=True, extra="forbid")

#: ``steady``: one CA. ``trust-both``: rotation phase 1 done (every bundle holds both CAs,
#: leaves still from the old one). ``new-leaves``: phase 2 done (leaves from the new CA).
Phase = Literal["steady", "trust-both", "new-leaves"]


class CARecord(BaseModel):
    """One CA generation: its root, and its intermediates by region when the plan has them."""

    model_config = _FROZEN

    generation: int = Field(ge=0, description="0: a central signer's CA (no key here)")
    folder: str
    subject: str
    serial: str
    fingerprint_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    not_after: datetime
    intermediates: dict[str, str] = Field(
        default_factory=dict, description="region -> the intermediate's SHA-256 fingerprint"
    )


class MemberRecord(BaseModel):
    """One member's certificate and the files of its folder."""

    model_config = _FROZEN

    folder: str
    role: Role
    region: str
    name: str
    address: str | None
    serial: str
    fingerprint_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    not_before: datetime
    not_after: datetime
    ca_generation: int = Field(ge=0)
    files: dict[str, str] = Field(description="file name -> SHA-256 of its content")


class PlanManifest(BaseModel):
    """The whole tree: CA generations, rotation phase, members. Holds no secret values."""

    model_config = _FROZEN

    schema_version: Literal[1] = SCHEMA_VERSION
    plan_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    phase: Phase
    signer: str | None = Field(
        default=None, description="the central signer that issues the tree (apply --remote)"
    )
    signing_generation: int = Field(ge=0)
    trusted_generations: list[int] = Field(min_length=1)
    cas: list[CARecord]
    members: list[MemberRecord]
    retired: list[str] = Field(default_factory=list, description="folders moved under retired/")
    tools: list[ToolRecord]


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the plan manifest, as checked in under ``schemas/``."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://cfwrap.invalid/schemas/plan-manifest.schema.json",
        **PlanManifest.model_json_schema(),
    }


@functools.cache
def _validator() -> jsonschema.Draft202012Validator:
    import jsonschema

    return jsonschema.Draft202012Validator(_schema())


def _surely_valid(data: object) -> bool:
    """True if ``data`` surely satisfies the schema, found without importing jsonschema.

    (~50 ms of every apply and status.) jsonschema decides, and words, every doubt.
    """
    from cfwrap import schema_files

    return schema_files.conforms(_schema(), data)


@functools.cache
def _schema() -> dict[str, Any]:
    from cfwrap import schema_files

    return schema_files.load(SCHEMA_FILE)


def _sample(data: dict[str, Any]) -> dict[str, Any]:
    """The document with its first few members only, for the schema check.

    The schema check of 10,000 members would cost seconds; every member has the same shape, and
    the model validates each one of them in any case.
    """
    members = data.get("members")
    return {**data, "members": members[:_SAMPLE]} if isinstance(members, list) else data


_SAMPLE = 8


def record_json(record: MemberRecord) -> bytes:
    """A member's record as the plan manifest holds it: one line of JSON."""
    return record.model_dump_json().encode()


class Records:
    """Members' records (:func:`record_json`) by folder, kept in an unlinked file, not in memory.

    A fleet of 10,000 members has ~7 MB of records; held in memory, they and the holes they
    leave in the heap made an apply's peak memory grow with the plan. Here each costs one
    entry of an index. The file has no name (it goes when the process does), in the tree's
    root when it exists, else in the temporary folder.
    """

    def __init__(self, folder: Path | None = None) -> None:
        """Keep records in a file under ``folder`` (once it exists), else the temporary folder."""
        self._folder = folder
        self._file: IO[bytes] | None = None
        self._at: dict[str, int] = {}  # folder -> offset << 24 | length
        self._end = 0

    def put(self, folder: str, line: bytes) -> None:
        """Keep ``line`` as the record of ``folder`` (replacing an earlier one)."""
        if len(line) >= 1 << 24:  # pragma: no cover (a record is a few hundred bytes)
            raise ValueError(f"the record of {folder} is too large")
        if self._file is None:
            self._file = self._open()
        os.pwrite(self._file.fileno(), line, self._end)
        self._at[folder] = self._end << 24 | len(line)
        self._end += len(line)

    def _open(self) -> IO[bytes]:
        """The records' file: in the tree, or where a reader who may not write there can."""
        if self._folder is not None and self._folder.is_dir():
            try:  # a dry run or a reader without write access to the tree: the fallback
                return tempfile.TemporaryFile(prefix="cfwrap-records-", dir=self._folder)
            except OSError:
                pass
        return tempfile.TemporaryFile(prefix="cfwrap-records-")

    def __getitem__(self, folder: str) -> bytes:
        """The record of ``folder``.

        Raises:
            KeyError: none was put.
        """
        at = self._at[folder]
        assert self._file is not None  # noqa: S101 (an index entry means a put)
        return os.pread(self._file.fileno(), at & 0xFFFFFF, at >> 24)

    def items(self) -> Iterator[tuple[str, bytes]]:
        """Every folder and its record, in the order they were first put."""
        for folder in self._at:
            yield folder, self[folder]

    def close(self) -> None:
        """Let the file go."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __del__(self) -> None:
        """Close the file when the records go (a diff that raised, a dry run)."""
        self.close()


def _check_sample(manifest: PlanManifest, lines: list[bytes]) -> None:
    """Check the document against the checked-in schema with the first few of its members.

    Every member has the same shape, and the model made each one; the schema check of
    10,000 would cost seconds.

    Raises:
        VerificationError: it does not satisfy the schema (a cfwrap bug).
    """
    sample = json.loads(manifest.model_copy(update={"members": []}).model_dump_json())
    sample["members"] = [json.loads(line) for line in lines]
    if _surely_valid(sample):
        return
    errors = sorted(_validator().iter_errors(sample), key=str)
    if errors:
        raise VerificationError(
            FILE_NAME,
            f"does not match {SCHEMA_FILE}: {errors[0].message[:200]}",
            fix="this is a cfwrap bug; please report it with the plan you applied",
        )


def _document(manifest: PlanManifest, lines: Iterable[bytes]) -> Iterator[bytes]:
    """The plan manifest's bytes, in pieces: its head, then one member per line."""
    text = manifest.model_copy(update={"members": []}).model_dump_json(indent=2).encode()
    marker = b'"members": []'
    if text.count(marker) != 1:  # pragma: no cover (the model has one members field)
        raise VerificationError(FILE_NAME, "cannot place the members", fix="report this")
    before, _, after = text.partition(marker)
    yield before + b'"members": ['
    any_line = False
    for line in lines:
        yield b",\n    " if any_line else b"\n    "
        yield line
        any_line = True
    yield b"\n  ]" if any_line else b"]"
    yield after + b"\n"


def to_json(manifest: PlanManifest) -> bytes:
    """Serialise and check against the checked-in schema, one member per line.

    Raises:
        VerificationError: it does not satisfy the schema (a cfwrap bug).
    """
    lines = [record_json(m) for m in manifest.members]
    _check_sample(manifest, lines[:_SAMPLE])
    return b"".join(_document(manifest, lines))


def load(root: Path) -> PlanManifest | None:
    """Read and check the tree's plan manifest; None when there is none yet.

    What is returned holds no members (``members`` is empty): nothing that reads it needs
    them, and 10,000 member models would cost more memory than the rest of an apply. Every
    member is still validated, one at a time.

    Raises:
        VerificationError: it exists but is damaged.
    """
    from cfwrap.files import read_input

    path = root / FILE_NAME
    try:
        data = json.loads(read_input(path, limit=MAX_FILE))
    except FileNotFoundError:
        return None
    except (ValueError, RecursionError) as e:
        raise VerificationError(
            str(path), f"not valid JSON ({e})", fix="restore it from a backup, or move it away"
        ) from None
    fix = "restore it, or move it away"
    sample = _sample(data) if isinstance(data, dict) else data
    if not _surely_valid(sample):
        import jsonschema

        try:
            _validator().validate(sample)
        except jsonschema.ValidationError as e:
            where = "/".join(str(p) for p in e.absolute_path) or "(top)"
            raise VerificationError(
                str(path), f"invalid at {where}: {e.message[:200]}", fix=fix
            ) from None
    from pydantic import ValidationError

    try:
        members = data.pop("members")  # the schema made it a list
        head = PlanManifest.model_validate({**data, "members": []})
        for n in range(len(members)):
            MemberRecord.model_validate(members[n])
            members[n] = None  # let each member's dicts go as soon as it is checked
    except ValidationError as e:
        first = e.errors()[0]
        loc = list(first["loc"])
        if e.title == MemberRecord.__name__:
            loc = ["members", n, *loc]
        where = "/".join(str(p) for p in loc) or "(top)"
        raise VerificationError(
            str(path), f"invalid at {where}: {first['msg'][:200]}", fix=fix
        ) from None
    return head


def write(
    root: Path, manifest: PlanManifest, members: Callable[[], Iterable[bytes]] | None = None
) -> bool:
    """Write the plan manifest atomically, only when its bytes change; True when written.

    ``members``: gives the members' records as :func:`record_json` made them, in order, each
    time it is called, in place of ``manifest.members`` (which is then empty). The document is
    compared with the file and written a piece at a time: never whole in memory.

    Raises:
        VerificationError: it does not satisfy the schema.
        FileSystemError: the write failed.
    """
    from cfwrap import files

    if members is None:
        records = [record_json(m) for m in manifest.members]
        members = lambda: records  # noqa: E731
    _check_sample(manifest, list(itertools.islice(members(), _SAMPLE)))
    path = root / FILE_NAME
    try:
        if files.holds(path, _document(manifest, members())):
            return False
    except FileNotFoundError:
        pass
    files.write_replace(path, _document(manifest, members()), mode=files.PUBLIC_MODE)
    return True
