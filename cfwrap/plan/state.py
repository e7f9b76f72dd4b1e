"""The plan's manifest: one file at the top of the tree that indexes every certificate in it.

Each member's folder has its own ``manifest.json`` (the kit manifest, so ``cfwrap manifest
--check`` and ``cfwrap doctor`` work on a node's folder alone); this file adds what only the
whole tree knows: the CA generations, the rotation phase, and every member's certificate. It
holds no timestamp of its own, so an apply that changes nothing writes nothing.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cfwrap import schema_files
from cfwrap.errors import ConflictError, VerificationError

if TYPE_CHECKING:
    from pydantic import ValidationError
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
    entry of an index. The file is in the temporary folder, never in the tree (a dry run
    writes nothing there, and a file system without ``O_TMPFILE`` would show a name), and has
    no name (it goes with the process). When the temporary folder refuses it (full, read-only,
    a file size limit), the records are kept in memory instead: slower to grow, never an error.
    """

    def __init__(self) -> None:
        """No records yet; the file is made with the first."""
        self._file: IO[bytes] | None = None
        self._at: dict[str, int] = {}  # folder -> offset << 24 | length, in the file
        self._memory: dict[str, bytes] | None = None  # the fallback
        self._end = 0

    def put(self, folder: str, line: bytes) -> None:
        """Keep ``line`` as the record of ``folder`` (replacing an earlier one)."""
        if len(line) >= 1 << 24:  # pragma: no cover (a record is a few hundred bytes)
            raise ValueError(f"the record of {folder} is too large")
        if self._memory is None:
            try:
                if self._file is None:
                    self._file = tempfile.TemporaryFile(prefix="cfwrap-records-")  # noqa: SIM115
                if os.pwrite(self._file.fileno(), line, self._end) != len(line):
                    raise OSError(errno.ENOSPC, "a short write")  # a file system filling up
            except OSError:
                self._to_memory()
            else:
                self._at[folder] = self._end << 24 | len(line)
                self._end += len(line)
                return
        assert self._memory is not None  # noqa: S101 (set just above)
        self._memory[folder] = line

    def _to_memory(self) -> None:
        """Move what the file holds into memory, and keep every record there from now on."""
        self._memory = {folder: self[folder] for folder in self._at}
        self._at.clear()
        self.close()

    def __getitem__(self, folder: str) -> bytes:
        """The record of ``folder``.

        Raises:
            KeyError: none was put.
        """
        if self._memory is not None:
            return self._memory[folder]
        at = self._at[folder]
        assert self._file is not None  # noqa: S101 (an index entry means a put)
        return os.pread(self._file.fileno(), at & 0xFFFFFF, at >> 24)

    def __contains__(self, folder: object) -> bool:
        """Whether ``folder`` has a record."""
        return folder in (self._memory if self._memory is not None else self._at)

    def items(self) -> Iterator[tuple[str, bytes]]:
        """Every folder and its record, in the order they were first put."""
        for folder in self._memory if self._memory is not None else self._at:
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
    if schema_files.surely_valid(SCHEMA_FILE, sample):
        return
    errors = sorted(schema_files.validator(SCHEMA_FILE).iter_errors(sample), key=str)
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
    them. The members are read a line at a time, as :func:`write` lays them out, and each is
    validated and let go: memory does not grow with the fleet (see :func:`_read`).

    Raises:
        VerificationError: it exists but is damaged.
        ConflictError: it is a symlink (an apply would refuse to write through it, so every
            reader refuses it alike, dangling or not).
    """
    from pydantic import ValidationError

    path = root / FILE_NAME
    fix = "restore it, or move it away"
    if path.is_symlink():
        raise ConflictError(
            path,
            "is a symlink; cfwrap never reads or writes the plan manifest through one",
            fix="replace it with the file itself, or move it away",
        )
    try:
        data, late = _read(path)
    except FileNotFoundError:
        return None
    except (ValueError, RecursionError, MemoryError) as e:
        raise VerificationError(
            str(path), f"not valid JSON ({e})", fix="restore it from a backup, or move it away"
        ) from None
    sample = _sample(data) if isinstance(data, dict) else data
    if not schema_files.surely_valid(SCHEMA_FILE, sample):
        import jsonschema

        try:
            schema_files.validator(SCHEMA_FILE).validate(sample)
        except jsonschema.ValidationError as e:
            where = "/".join(str(p) for p in e.absolute_path) or "(top)"
            raise VerificationError(
                str(path), f"invalid at {where}: {e.message[:200]}", fix=fix
            ) from None
    try:
        members = data.pop("members")  # the schema made it a list
        head = PlanManifest.model_validate({**data, "members": []})
        for n in range(len(members)):
            MemberRecord.model_validate(members[n])
            members[n] = None  # let each member's dicts go as soon as it is checked
        if late is not None:
            n, error = late
            raise error
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


@dataclass(frozen=True)
class Recorded:
    """What the plan manifest records of a member's folder."""

    fingerprint_sha256: str
    #: Each file's SHA-256, by name (the folder's manifest left out).
    files: dict[str, str]


def _recorded(member: dict[str, Any]) -> Recorded:
    hashes = member["files"]
    if not isinstance(hashes, dict):
        raise TypeError("files is not an object")
    return Recorded(member["fingerprint_sha256"], hashes)


def recorded_members(root: Path) -> dict[str, Recorded]:
    """Each member's certificate fingerprint and file hashes as the plan manifest records them.

    Read a line at a time, as :func:`write` lays the members out (a file laid out otherwise is
    read whole, within the usual 16 MiB). Call :func:`load` first: it checks the file.

    Raises:
        FileNotFoundError: there is no plan manifest.
        OSError: it cannot be read.
        ValueError: it is not JSON.
    """
    from cfwrap import files

    found: dict[str, Recorded] = {}
    with files.open_input(root / FILE_NAME, limit=MAX_FILE) as f:
        inside = False
        for line in f:
            if not inside:
                inside = line == _OPEN
            elif line.startswith(_CLOSE):
                return found
            else:
                try:  # one member a line, as write() lays them out
                    member = json.loads(line.rstrip(b"\n").removesuffix(b","))
                    found[member["folder"]] = _recorded(member)
                except (ValueError, TypeError, KeyError):
                    break  # laid out otherwise (reformatted by hand)
        # Not laid out as write() does it: load() read it whole, within 16 MiB, and so do we.
        f.seek(0)
        data = json.loads(f.read(files.MAX_INPUT + 1))
    return {m["folder"]: _recorded(m) for m in data["members"]}


#: How :func:`write` lays the members out: the list opens on a line of its own, each member
#: is one line, and the list closes on a line of its own.
_OPEN = b'  "members": [\n'
_MEMBER = b"    {"
_CLOSE = b"  ]"


class _Members:
    """The members of a plan manifest as :func:`_read` meets them, one line each."""

    def __init__(self) -> None:
        """None met yet."""
        self.sample: list[Any] = []
        self.count = 0
        self.comma = False  # the last member's line ended with a comma: another must follow
        #: The first member past the sample that fails validation, and its index.
        self.late: tuple[int, ValidationError] | None = None

    def take(self, line: bytes) -> bool:
        """Read one member's line; False when it is not one (the layout is not cfwrap's)."""
        from pydantic import ValidationError

        if not line.startswith(_MEMBER) or (self.count and not self.comma):
            return False  # not a member's line, or the one before it ended the list
        text = line.rstrip(b"\n")
        self.comma = text.endswith(b",")
        try:
            member = json.loads(text.removesuffix(b","), object_pairs_hook=_unique)
        except ValueError:
            return False
        if self.count < _SAMPLE:
            self.sample.append(member)
        elif self.late is None:
            try:
                MemberRecord.model_validate(member)
            except ValidationError as e:
                self.late = (self.count, e)
        self.count += 1
        return True


def _read(path: Path) -> tuple[Any, tuple[int, ValidationError] | None]:
    """The plan manifest's JSON, with only the first :data:`_SAMPLE` members if it has more.

    Members past the sample are read and validated one line at a time as :func:`write` laid
    them out; the first one that fails is returned with its index (it is raised after the
    sample is checked, so errors come in the document's order). A file not laid out that way
    (edited by hand) is parsed whole when it is no larger than any other input cfwrap reads
    (16 MiB), and refused when larger: parsing it whole could take gigabytes.

    Raises:
        FileNotFoundError: there is none.
        ValueError: not valid JSON.
        VerificationError: too large, or larger than 16 MiB and not laid out as cfwrap writes.
        OSError: it cannot be read.
    """
    from cfwrap import files

    members = _Members()
    with files.open_input(path, limit=MAX_FILE) as f:
        size = os.fstat(f.fileno()).st_size
        head: list[bytes] = []
        held = 0  # bytes of head: bounded, so a member list that is not laid out stays small
        read = 0
        part = "head"
        while part != "other" and (line := f.readline(files.MAX_INPUT + 1)):
            read += len(line)
            if read > size:
                raise ValueError("it grew while being read")
            if held + len(line) > files.MAX_INPUT:
                part = "other"
            elif part == "members" and line.startswith(_CLOSE) and not members.comma:
                head.append(b'  "members": []' + line[len(_CLOSE) :])
                part = "tail"
            elif part == "members":
                part = "members" if members.take(line) else "other"
            elif part == "head" and line == _OPEN:
                part = "members"
            else:
                head.append(line)
                held += len(line)
        if part in ("head", "tail"):
            data = json.loads(b"".join(head), object_pairs_hook=_unique)
            if part == "tail" and isinstance(data, dict):
                data["members"] = members.sample
            return data, members.late
        if part == "members":
            raise ValueError("the members' list is cut short")
        if size > files.MAX_INPUT:
            raise VerificationError(
                str(path),
                "is larger than 16 MiB and not laid out as cfwrap writes it (one member a line)",
                fix="restore it from a backup, or move it away",
            )
        f.seek(0)
        whole = f.read(files.MAX_INPUT + 1)
        if len(whole) > files.MAX_INPUT:  # pragma: no cover (it grew since it was measured)
            raise ValueError("it grew while being read")
        return json.loads(whole, object_pairs_hook=_unique), None


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are all different (cfwrap never writes one twice).

    Raises:
        ValueError: a key twice. JSON readers disagree on which one counts, and the reader
            of the streamed members puts its own ``members`` in place of the list: a second
            ``members`` key would otherwise go unchecked.
    """
    data = dict(pairs)
    if len(data) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"the key {key!r} appears twice in one object")
            seen.add(key)
    return data


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
