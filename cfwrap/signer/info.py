"""What a node needs to reach the signer, written beside the auth keys as ``signer.json``.

It names the address, the CA (path and PEM: the node checks the signer's TLS and what it
issues against it), the label, the regions, and which auth key file goes with which role. It
holds no key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from cfwrap.nomad import Role

FILE_NAME = "signer.json"
#: The roots-file section (multirootca's label) the signer serves.
LABEL = "nomad"


class RoleAccess(BaseModel):
    """Which profile a role asks for, and the key file (relative to this file) that goes with it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    profile: str
    auth_key_file: str


class SignerInfo(BaseModel):
    """How to reach a signer; give a node this file, the CA, and its role's key file only."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = 1
    address: str
    label: str = LABEL
    ca_file: str
    ca_pem: str
    regions: tuple[str, ...]
    allowed_domains: tuple[str, ...] = ()
    expiry: str
    roles: dict[Role, RoleAccess]


def load(path: Path) -> SignerInfo:
    """Read a ``signer.json``.

    Raises:
        InputError: unreadable or not a signer info file.
    """
    from cfwrap import files
    from cfwrap.errors import InputError
    from cfwrap.models import parse_model

    try:
        text = files.read_input_text(path, limit=1024 * 1024)
    except OSError as e:
        raise InputError(
            str(path), e.strerror or str(e), fix="give the signer's signer.json"
        ) from None
    import json

    try:
        data = json.loads(text)
    except ValueError:
        raise InputError(str(path), "not JSON", fix="give the signer's signer.json") from None
    return parse_model(SignerInfo, data, what=str(path))


def to_json(info: SignerInfo) -> bytes:
    """The file's bytes."""
    return (info.model_dump_json(indent=2) + "\n").encode()
