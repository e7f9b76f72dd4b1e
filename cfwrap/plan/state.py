"""The plan's manifest: one file at the top of the tree that indexes every certificate in it.

Each member's folder has its own ``manifest.json`` (the kit manifest, so ``cfwrap manifest
--check`` and ``cfwrap doctor`` work on a node's folder alone); this file adds what only the
whole tree knows: the CA generations, the rotation phase, and every member's certificate. It
holds no timestamp of its own, so an apply that changes nothing writes nothing.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cfwrap.errors import VerificationError

if TYPE_CHECKING:
    import jsonschema
from cfwrap.manifest import ToolRecord
from cfwrap.nomad import Role

FILE_NAME = "plan-manifest.json"
SCHEMA_FILE = "plan-manifest.schema.json"
SCHEMA_VERSION: Literal[1] = 1

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


def _validator() -> jsonschema.Draft202012Validator:
    import jsonschema

    from cfwrap import schema_files

    return jsonschema.Draft202012Validator(schema_files.load(SCHEMA_FILE))


def _sample(data: dict[str, Any]) -> dict[str, Any]:
    """The document with its first few members only, for the schema check.

    The schema check of 10,000 members would cost seconds; every member has the same shape, and
    the model validates each one of them in any case.
    """
    members = data.get("members")
    return {**data, "members": members[:_SAMPLE]} if isinstance(members, list) else data


_SAMPLE = 8


def record_json(record: MemberRecord) -> bytes:
    """A member's record as the plan manifest holds it: one line of JSON.

    A plan keeps its members' records in this form, not as models: a tenth of the memory.
    """
    return record.model_dump_json().encode()


def to_json(manifest: PlanManifest, members: list[bytes] | None = None) -> bytes:
    """Serialise and check against the checked-in schema, one member per line.

    ``members``: the members' records as :func:`record_json` made them, in place of
    ``manifest.members`` (which is then empty).

    Raises:
        VerificationError: it does not satisfy the schema (a cfwrap bug).
    """
    lines = members if members is not None else [record_json(m) for m in manifest.members]
    head = manifest.model_copy(update={"members": []})
    # The schema sees the document with a sample of its members; the model made every member.
    sample = json.loads(head.model_dump_json())
    sample["members"] = [json.loads(line) for line in lines[:_SAMPLE]]
    errors = sorted(_validator().iter_errors(sample), key=str)
    if errors:
        raise VerificationError(
            FILE_NAME,
            f"does not match {SCHEMA_FILE}: {errors[0].message[:200]}",
            fix="this is a cfwrap bug; please report it with the plan you applied",
        )
    text = head.model_dump_json(indent=2).encode()
    listed = b"[\n    " + b",\n    ".join(lines) + b"\n  ]" if lines else b"[]"
    marker = b'"members": []'
    if text.count(marker) != 1:  # pragma: no cover (the model has one members field)
        raise VerificationError(FILE_NAME, "cannot place the members", fix="report this")
    return text.replace(marker, b'"members": ' + listed) + b"\n"


def load(root: Path) -> PlanManifest | None:
    """Read the tree's plan manifest; None when there is none yet.

    Raises:
        VerificationError: it exists but is damaged.
    """
    import jsonschema

    from cfwrap.files import read_input

    path = root / FILE_NAME
    try:
        data = json.loads(read_input(path))
    except FileNotFoundError:
        return None
    except (ValueError, RecursionError) as e:
        raise VerificationError(
            str(path), f"not valid JSON ({e})", fix="restore it from a backup, or move it away"
        ) from None
    from pydantic import ValidationError

    fix = "restore it, or move it away"
    try:
        _validator().validate(_sample(data) if isinstance(data, dict) else data)
        return PlanManifest.model_validate(data)
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(top)"
        raise VerificationError(
            str(path), f"invalid at {where}: {e.message[:200]}", fix=fix
        ) from None
    except ValidationError as e:
        first = e.errors()[0]
        where = "/".join(str(p) for p in first["loc"]) or "(top)"
        raise VerificationError(
            str(path), f"invalid at {where}: {first['msg'][:200]}", fix=fix
        ) from None


def write(root: Path, manifest: PlanManifest, members: list[bytes] | None = None) -> bool:
    """Write the plan manifest atomically, only when its bytes change; True when written.

    ``members``: see :func:`to_json`.

    Raises:
        VerificationError: it does not satisfy the schema.
        FileSystemError: the write failed.
    """
    from cfwrap import files

    data = to_json(manifest, members)
    path = root / FILE_NAME
    try:
        if files.read_input(path) == data:
            return False
    except FileNotFoundError:
        pass
    files.write_replace(path, data, mode=files.PUBLIC_MODE)
    return True
