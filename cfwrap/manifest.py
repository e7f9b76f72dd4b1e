"""The kit's manifest: one entry per file, derived from what is on disk, validated, written last.

The manifest is built from what is on disk, not from what cfwrap meant to write: :func:`scan`
reads the folder back (parsing every certificate, pairing keys with certificates, checking each
chain to the kit's CA), so ``cfwrap manifest DIR`` can rebuild it and report any disagreement.
One exception, for speed at fleet scale: :func:`describe` takes the bytes of a plan's member
folder that cfwrap has just staged whole, which are what the disk holds.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import stat
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cfwrap import parsers, schema_files
from cfwrap.errors import VerificationError
from cfwrap.nomad import parse_file_stem, role_of

if TYPE_CHECKING:
    from cryptography import x509

    from cfwrap.files import FileSet, StagedFolder
    from cfwrap.tools import Tool

SCHEMA_VERSION: Literal[1] = 1
FILE_NAME = "manifest.json"
SCHEMA_FILE = "manifest.schema.json"

ArtifactKind = Literal[
    "ca-cert", "ca-key", "cert", "key", "csr", "csr-json", "config", "gossip-key", "hcl", "env",
    "other",
]  # fmt: skip
ArtifactRole = Literal["ca", "server", "client", "cli"]

_FROZEN = ConfigDict(frozen=True, extra="forbid")


class ToolRecord(BaseModel):
    """A binary that made the kit: where it was, which package and build."""

    model_config = _FROZEN

    name: str
    path: str
    package: str | None
    version: str | None
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class CertificateInfo(BaseModel):
    """What a certificate in the kit says, and what cfwrap verified about it."""

    model_config = _FROZEN

    subject: str
    issuer: str
    serial: str
    not_before: datetime
    not_after: datetime
    dns_names: list[str]
    ip_addresses: list[str]
    key_algorithm: str
    key_size: int
    key_usage: list[str]
    extended_key_usage: list[str]
    is_ca: bool
    fingerprint_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    chain_verified: bool = Field(description="signed by a CA certificate in the same kit")
    key_pair_verified: bool | None = Field(
        description="the kit's key file matches it; null when the kit holds no key for it"
    )


class Artifact(BaseModel):
    """One file of the kit."""

    model_config = _FROZEN

    path: str = Field(description="relative to the manifest")
    kind: ArtifactKind
    role: ArtifactRole | None
    region: str | None
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    mode: str = Field(pattern=r"^0[0-7]{3}$")
    certificate: CertificateInfo | None = None


class Manifest(BaseModel):
    """Everything in a kit, and the tools that made it. Holds no secret values."""

    model_config = _FROZEN

    schema_version: Literal[1] = SCHEMA_VERSION
    created_at: datetime
    tools: list[ToolRecord]
    artifacts: list[Artifact]


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the manifest, as checked in under ``schemas/``."""
    schema = Manifest.model_json_schema()
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://cfwrap.invalid/schemas/manifest.schema.json",
        **schema,
    }


def tool_record(tool: Tool) -> ToolRecord:
    """Describe a located binary for the manifest."""
    return ToolRecord(
        name=tool.name,
        path=str(tool.path),
        package=tool.package,
        version=tool.version,
        sha256=tool.sha256,
    )


def _pair_stem(name: str) -> str:
    for suffix in ("-key.pem", "-csr.json", ".csr", ".pem"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


_Parsed = tuple["x509.Certificate", parsers.CertFacts, tuple["x509.Certificate", ...]]


@functools.lru_cache(maxsize=32)
def _parse_certificates(data: bytes) -> _Parsed:
    """The first certificate, its facts, and the ones after it.

    Cached by content: a plan's thousands of folders hold the same CA bundle.

    Raises:
        ParseError: a damaged certificate.
    """
    cert = parsers.load_certificate(data)
    facts = parsers.certificate_facts(cert)
    more: tuple[x509.Certificate, ...] = ()
    if data.count(b"-----BEGIN CERTIFICATE-----") > 1:
        more = tuple(parsers.load_certificates(data)[1:])
    return cert, facts, more


class _Read:
    """One file's bytes and what parsing them found."""

    def __init__(self, name: str, data: bytes, mode: int) -> None:
        """Parse ``data``, the content of the file ``name`` (whose mode is ``mode``)."""
        self.name = name
        self.data = data
        self.mode = mode
        suffix = os.path.splitext(name)[1]  # noqa: PTH122 (Path.suffix, without a Path each)
        self.pem = parsers.pem_kind(self.data) if suffix in (".pem", ".csr") else None
        self.cert: x509.Certificate | None = None
        self.facts: parsers.CertFacts | None = None
        #: The certificates after the first: a CA bundle's other CAs (during a CA rotation), or
        #: a leaf's intermediates (Nomad's cert_file may hold the chain).
        self.more: tuple[x509.Certificate, ...] = ()
        if self.pem == "certificate":
            try:
                self.cert, self.facts, self.more = _parse_certificates(self.data)
            except parsers.ParseError:
                self.pem = None

    @classmethod
    def from_disk(cls, path: Path) -> _Read:
        """Read ``path``."""
        from cfwrap.files import read_input

        return cls(path.name, read_input(path), stat.S_IMODE(path.stat().st_mode))

    def private_key_hash(self) -> str | None:
        """The SHA-256 of the public half of the private key this file holds; None if none.

        Only a private key counts: a ``-key.pem`` that holds a certificate pairs with nothing.
        """
        if self.pem != "private-key":
            return None
        try:
            return parsers.read_private_key(self.data).public_key_sha256
        except parsers.ParseError:
            return None


def _role_of(facts: parsers.CertFacts) -> tuple[ArtifactRole | None, str | None]:
    if facts.is_ca:
        return "ca", None
    return role_of(facts) or (None, None)


def check_names(folder: Path) -> None:
    """Refuse a folder that holds a file whose name is not UTF-8: a manifest records names as text.

    Raises:
        InputError: such a file, named with its undecodable bytes escaped.
        OSError: the folder cannot be listed.
    """
    from cfwrap.errors import InputError
    from cfwrap.text import printable

    for entry in folder.iterdir():
        name = entry.name
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            shown = os.fsencode(name).decode("utf-8", "backslashreplace")
            raise InputError(
                str(folder),
                f"holds a file whose name is not UTF-8 ({printable(shown)}), which a manifest "
                "cannot record",
                fix="rename that file, or move it out of the folder",
            ) from None


def scan(folder: Path) -> list[Artifact]:
    """Read every regular file of a kit folder (except the manifest) into artifacts.

    Raises:
        InputError: see :func:`check_names`.
        OSError: the folder or a file cannot be read.
    """
    check_names(folder)
    reads = {
        p.name: _Read.from_disk(p)
        for p in sorted(folder.iterdir())
        if p.is_file() and not p.is_symlink() and p.name != FILE_NAME and not p.name.startswith(".")
    }
    return _artifacts(reads)


def describe(entries: Mapping[str, tuple[bytes, int]]) -> list[Artifact]:
    """The artifacts :func:`scan` finds in a folder that holds exactly ``entries``.

    Only for a folder cfwrap has just written whole into a private stage (a plan's thousands of
    member folders): the bytes and modes are those written, every byte of them, and reading
    them back cost a tenth of a fleet's issuance. Every other manifest is built by :func:`scan`.
    """
    return _artifacts(
        {name: _Read(name, data, mode) for name, (data, mode) in sorted(entries.items())}
    )


def _artifacts(reads: dict[str, _Read]) -> list[Artifact]:
    cas = [
        cert
        for r in reads.values()
        if r.cert is not None and r.facts and r.facts.is_ca
        for cert in (r.cert, *r.more)
    ]
    certs = {_pair_stem(n): r for n, r in reads.items() if r.facts is not None}
    artifacts = []
    for name, read in reads.items():
        pair = certs.get(_pair_stem(name))
        role, region = _role_of(pair.facts) if pair and pair.facts else (None, None)
        kind: ArtifactKind = "other"
        info = None
        if read.facts is not None and read.cert is not None:
            kind = "ca-cert" if read.facts.is_ca else "cert"
            info = _certificate_info(read, reads, cas)
        elif read.pem == "private-key":
            kind = "ca-key" if role == "ca" else "key"
        elif read.pem == "csr":
            kind = "csr"
        elif name.endswith("cfssl.json"):
            kind = "config"
        elif name.endswith("-csr.json"):
            kind = "csr-json"
        elif name == "gossip.key":
            kind = "gossip-key"
        elif name.endswith((".hcl", ".env")):
            kind = "hcl" if name.endswith(".hcl") else "env"
            role, region = parse_file_stem(Path(name).stem) or (None, None)
        artifacts.append(
            Artifact(
                path=name,
                kind=kind,
                role=role,
                region=region,
                sha256=hashlib.sha256(read.data).hexdigest(),
                mode=f"0{read.mode:03o}",
                certificate=info,
            )
        )
    return artifacts


def _certificate_info(
    read: _Read, reads: dict[str, _Read], cas: list[x509.Certificate]
) -> CertificateInfo:
    assert read.facts is not None and read.cert is not None  # noqa: S101 (caller checked)
    facts = read.facts
    key = reads.get(f"{_pair_stem(read.name)}-key.pem")
    key_hash = key.private_key_hash() if key is not None else None
    return CertificateInfo(
        subject=facts.subject,
        issuer=facts.issuer,
        serial=facts.serial,
        not_before=facts.not_before,
        not_after=facts.not_after,
        dns_names=list(facts.dns_names),
        ip_addresses=list(facts.ip_addresses),
        key_algorithm=facts.key.algorithm,
        key_size=facts.key.size,
        key_usage=list(facts.key_usage),
        extended_key_usage=list(facts.extended_key_usage),
        is_ca=facts.is_ca,
        fingerprint_sha256=facts.fingerprint_sha256,
        chain_verified=_chain_verified(read, cas),
        key_pair_verified=None if key is None else key_hash == facts.key.public_key_sha256,
    )


def _chain_verified(read: _Read, cas: list[x509.Certificate]) -> bool:
    """Signed by a CA of the folder, directly or through the intermediates in its own file."""
    assert read.cert is not None and read.facts is not None  # noqa: S101 (caller checked)
    chain = [read.cert] if read.facts.is_ca else [read.cert, *read.more]
    for child, parent in itertools.pairwise(chain):
        if not parsers.is_issued_by(child, parent):
            return False
    return any(parsers.is_issued_by(chain[-1], ca) for ca in cas)


def build(folder: Path, tools: list[ToolRecord]) -> Manifest:
    """Build the manifest of ``folder`` from what is on disk now."""
    return Manifest(created_at=datetime.now(UTC), tools=tools, artifacts=scan(folder))


def build_written(entries: Mapping[str, tuple[bytes, int]], tools: list[ToolRecord]) -> Manifest:
    """Build the manifest of a folder cfwrap has just staged with exactly ``entries``."""
    return Manifest(created_at=datetime.now(UTC), tools=tools, artifacts=describe(entries))


def to_json(manifest: Manifest, *, check_schema: bool = True) -> bytes:
    """Serialise a manifest and validate it against the checked-in schema.

    ``check_schema=False`` skips the schema for a manifest of the same shape as one already
    checked in this run (a plan's thousands of node folders); the model still validated it.

    Raises:
        VerificationError: the manifest does not satisfy ``schemas/manifest.schema.json``.
    """
    if not check_schema:
        # The same JSON, written by pydantic directly (non-ASCII characters as themselves).
        return (manifest.model_dump_json(indent=2) + "\n").encode()
    data = json.loads(manifest.model_dump_json())
    errors = []
    if not schema_files.surely_valid(SCHEMA_FILE, data):
        errors = sorted(schema_files.validator(SCHEMA_FILE).iter_errors(data), key=str)
    if errors:
        where = "/".join(str(p) for p in errors[0].absolute_path) or "(top)"
        raise VerificationError(
            FILE_NAME,
            f"does not match {SCHEMA_FILE} at {where}: {errors[0].message}",
            fix="this is a cfwrap bug; please report it with the command you ran",
        )
    return (json.dumps(data, indent=2) + "\n").encode()


def load(folder: Path) -> Manifest:
    """Read and validate ``folder``'s manifest.

    Raises:
        VerificationError: missing, not JSON, or not a valid manifest.
    """
    from cfwrap.files import read_input

    path = folder / FILE_NAME
    repair = "`cfwrap manifest --write DIR` rebuilds it from the files on disk"
    try:
        data = json.loads(read_input(path))
    except FileNotFoundError:
        raise VerificationError(
            str(path), "no manifest here", fix="run `cfwrap manifest --write DIR` to make one"
        ) from None
    except RecursionError:
        raise VerificationError(str(path), "nested too deeply", fix=repair) from None
    except ValueError as e:
        raise VerificationError(str(path), f"not valid JSON ({e})", fix=repair) from None
    if schema_files.surely_valid(SCHEMA_FILE, data):
        return Manifest.model_validate(data)
    import jsonschema

    try:
        schema_files.validator(SCHEMA_FILE).validate(data)
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(top)"
        raise VerificationError(
            str(path), f"invalid at {where}: {e.message[:200]}", fix=repair
        ) from None
    return Manifest.model_validate(data)


def differences(recorded: Manifest, actual: list[Artifact]) -> list[str]:
    """Say, one line each, where a recorded manifest and the files on disk disagree."""
    before = {a.path: a for a in recorded.artifacts}
    now = {a.path: a for a in actual}
    lines = [f"{p}: in the manifest but not on disk" for p in sorted(before.keys() - now.keys())]
    lines += [f"{p}: on disk but not in the manifest" for p in sorted(now.keys() - before.keys())]
    for path in sorted(before.keys() & now.keys()):
        old, new = before[path], now[path]
        if old.sha256 != new.sha256:
            lines.append(
                f"{path}: content changed (sha256 {new.sha256[:12]}..., manifest says "
                f"{old.sha256[:12]}...)"
            )
        if old.mode != new.mode:
            lines.append(f"{path}: mode {new.mode}, manifest says {old.mode}")
        if old.sha256 == new.sha256 and old.model_copy(update={"mode": new.mode}) != new:
            lines.append(f"{path}: facts differ from the manifest (kind, role, or verification)")
    return lines


def write(
    folder: Path,
    manifest: Manifest,
    *,
    into: FileSet | StagedFolder | None = None,
    check_schema: bool = True,
) -> Path:
    """Validate and write ``folder``'s manifest atomically; the only place that writes one.

    ``into``: a :class:`files.FileSet` that holds the manifest as one of its ``later`` files, so
    it lands (or is undone) with the files it describes; or a :class:`files.StagedFolder` of a
    plan's tree, placed whole later.

    Raises:
        VerificationError: the manifest does not satisfy the schema.
        FileSystemError: the write failed.
    """
    from cfwrap.files import PUBLIC_MODE, write_replace

    path = folder / FILE_NAME
    data = to_json(manifest, check_schema=check_schema)
    if into is not None:
        into.place_later(FILE_NAME, data, mode=PUBLIC_MODE)
    else:
        write_replace(path, data, mode=PUBLIC_MODE)
    return path
