"""Pydantic models of what cfssl reads: the CSR JSON and the signing configuration.

The models refuse what cfssl would silently ignore or misread (unknown keys, unknown usages,
durations it cannot parse, key sizes it calls too weak), so a wrong input fails here, before cfssl
runs. Serialised with :func:`to_cfssl_json`, they are exactly the files a person can hand to cfssl.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from datetime import timedelta
from typing import Annotated, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    model_validator,
)

# Go's time.ParseDuration units that make sense for certificate lifetimes. cfssl rejects "1y"/"1d".
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(h|m|s)")
_DURATION_WHOLE = re.compile(r"(?:[0-9]+(?:\.[0-9]+)?(?:h|m|s))+")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0}

#: The most intermediate CAs cfwrap lets a CA allow below it; anything larger is a typo (cfssl
#: fails on numbers past Go's int).
MAX_PATH_LENGTH = 16

#: The shortest and longest lifetime cfwrap issues. Shorter than an hour cannot survive cfssl's
#: five-minute backdating and clock skew; longer than 30 years is a typo, not a policy.
MIN_LIFETIME = timedelta(hours=1)
MAX_LIFETIME = timedelta(days=365 * 30)


#: How much sooner than its CA a certificate must end: cfssl starts each certificate at the
#: minute nearest its own call, so one as long as its CA, made seconds later, may end after it.
LIFETIME_MARGIN = timedelta(hours=1)


@functools.lru_cache(maxsize=256)  # a plan's thousands of certificates share a few lifetimes
def parse_duration(text: str) -> timedelta:
    """Parse a positive Go duration such as ``8760h`` or ``1h30m`` into a timedelta.

    Raises:
        ValueError: not a Go duration in h/m/s, or outside cfwrap's lifetime bounds.
    """
    if text.startswith("-"):
        raise ValueError(f"{text!r} is negative; a lifetime must be positive, like 8760h")
    if not _DURATION_WHOLE.fullmatch(text):
        raise ValueError(
            f"{text!r} is not a duration like 8760h (Go units h, m, s; cfssl refuses y and d)"
        )
    seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(text))
    shown = text if len(text) <= 24 else f"{text[:20]}..."
    # Compared as seconds first: a huge number would overflow timedelta.
    if seconds > MAX_LIFETIME.total_seconds():
        raise ValueError(f"{shown!r} is longer than the maximum lifetime of 30 years (262800h)")
    value = timedelta(seconds=seconds)
    if value < MIN_LIFETIME:
        raise ValueError(f"{shown!r} is shorter than the minimum lifetime of 1h")
    return value


def _check_duration(text: str) -> str:
    parse_duration(text)
    return text


#: A lifetime as cfssl writes it: a Go duration string, checked on the way in.
Duration = Annotated[str, AfterValidator(_check_duration)]

KeyAlgo = Literal["ecdsa", "rsa"]

#: Key usages cfssl knows (config.KeyUsage and config.ExtKeyUsage in cfssl's signer). Anything
#: else is dropped by cfssl without a word, so the model refuses it.
Usage = Literal[
    "signing",
    "digital signature",
    "content commitment",
    "key encipherment",
    "key agreement",
    "data encipherment",
    "cert sign",
    "crl sign",
    "encipher only",
    "decipher only",
    "any",
    "server auth",
    "client auth",
    "code signing",
    "email protection",
    "s/mime",
    "ipsec end system",
    "ipsec tunnel",
    "ipsec user",
    "timestamping",
    "ocsp signing",
    "microsoft sgc",
    "netscape sgc",
]

M = TypeVar("M", bound=BaseModel)


def _check_text(text: str) -> str:
    """Refuse control characters (NUL, newline, escapes, bidi) in a name for a subject."""
    from cfwrap.text import first_unsafe

    found = first_unsafe(text)
    if found:
        raise ValueError(f"contains the control character '{found}'; names are one line of text")
    return text


#: A line of text for a certificate's subject: no NUL, newline or other control character.
Text = Annotated[str, AfterValidator(_check_text)]

_FROZEN = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class KeySpec(BaseModel):
    """The ``key`` object of a CSR: algorithm and size."""

    model_config = _FROZEN

    algo: KeyAlgo = "ecdsa"
    size: int = 256

    @model_validator(mode="after")
    def _size_fits_algo(self) -> KeySpec:
        if self.algo == "ecdsa" and self.size not in (256, 384, 521):
            raise ValueError(f"ecdsa key size must be 256, 384 or 521, not {self.size}")
        if self.algo == "rsa" and not (2048 <= self.size <= 8192 and self.size % 8 == 0):
            raise ValueError(f"rsa key size must be 2048 to 8192 bits, not {self.size}")
        return self


class SubjectName(BaseModel):
    """One entry of a CSR's ``names``: the subject's country, state, locality, org and unit."""

    model_config = _FROZEN

    C: Annotated[Text, Field(pattern=r"^[A-Za-z]{2}$")] | None = None  # ISO 3166: two letters
    ST: Text | None = None
    L: Text | None = None
    O: Text | None = None  # noqa: E741 (cfssl's own field name)
    OU: Text | None = None


class CAOptions(BaseModel):
    """The ``ca`` object of a CSR, read by ``cfssl gencert -initca``."""

    model_config = _FROZEN

    expiry: Duration = "43800h"
    pathlen: int | None = Field(default=None, ge=0, le=MAX_PATH_LENGTH)
    pathlenzero: bool | None = None


class CSR(BaseModel):
    """cfssl's certificate request JSON (the guide's ``nomad-csr.json``)."""

    model_config = _FROZEN

    CN: Text = Field(min_length=1, max_length=64)
    hosts: tuple[str, ...] = ()
    key: KeySpec = KeySpec()
    names: tuple[SubjectName, ...] = ()
    ca: CAOptions | None = None


class CAConstraint(BaseModel):
    """A profile's ``ca_constraint``: it signs a CA (an intermediate), with this path length."""

    model_config = _FROZEN

    is_ca: bool
    max_path_len: int = Field(default=0, ge=0, le=MAX_PATH_LENGTH)
    max_path_len_zero: bool = False


class SigningProfile(BaseModel):
    """One signing profile: what a certificate may be used for, and for how long."""

    model_config = _FROZEN

    usages: tuple[Usage, ...] = Field(min_length=1)
    expiry: Duration
    ca_constraint: CAConstraint | None = None


class Signing(BaseModel):
    """The ``signing`` object: a default profile and named ones."""

    model_config = _FROZEN

    default: SigningProfile
    profiles: dict[str, SigningProfile] = Field(default_factory=dict)


class SigningConfig(BaseModel):
    """cfssl's ``-config`` file (the later guides' ``cfssl.json``)."""

    model_config = _FROZEN

    signing: Signing

    def profile(self, name: str) -> SigningProfile:
        """Return a named profile, refusing names cfssl would silently replace with the default.

        Raises:
            KeyError: no such profile.
        """
        return self.signing.profiles[name]


def to_cfssl_json(model: BaseModel) -> bytes:
    """Serialise a model as the JSON cfssl reads (no nulls, stable key order, newline at end)."""
    return (model.model_dump_json(exclude_none=True, indent=2) + "\n").encode()


def _first_untyped(data: object, where: str = "") -> tuple[str, object]:
    """The path and value of the first value in ``data`` that JSON has no type for."""
    if isinstance(data, dict):
        items: Iterable[tuple[object, object]] = data.items()
    elif isinstance(data, list | tuple):
        items = enumerate(data)
    elif data is None or isinstance(data, str | int | float | bool):
        return "", None
    else:
        return where, data
    for key, value in items:
        found = _first_untyped(value, f"{where}.{key}" if where else str(key))
        if found[0]:
            return found
    return "", None


def parse_model(
    cls: type[M],
    data: object,
    *,
    what: str,
    flags: Mapping[str, str] | None = None,
    exact: bool = False,
) -> M:
    """Validate ``data`` as ``cls``, turning pydantic's report into one line that names the field.

    ``flags`` maps field names to the command-line flags they came from, so the line names what
    the user typed (``--region``) rather than the model's field. ``exact``: for data from a
    typed format (TOML): a value of the wrong type is refused, never converted (pydantic would
    read ``"3"`` as 3 and ``"no"`` or ``0`` as false). It is checked as JSON, whose types TOML's
    map onto; a TOML date or time, which no field takes, is refused first.

    Raises:
        InputError: the first problem pydantic found, with the path of the offending field.
    """
    import json

    from pydantic import ValidationError

    from cfwrap.errors import InputError

    try:
        if exact:
            try:
                text = json.dumps(data)
            except TypeError:  # a date or a time: JSON has none
                where, value = _first_untyped(data)
                raise InputError(
                    f"{what}: {where or '(top)'}",
                    f"a {type(value).__name__}, which no field takes",
                    fix="write it as a string",
                ) from None
            return cls.model_validate_json(text, strict=True)
        return cls.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        # A union's branch names its validator ("lax-or-strict[...]"), not a field: dropped.
        loc = [str(p) for p in first["loc"] if "[" not in str(p)]
        message = str(first["msg"]).removeprefix("Value error, ")
        if first["type"] in ("ip_v4_address", "ip_v6_address"):  # both branches failed
            message = "not an IPv4 or IPv6 address"
        if flags and loc and loc[0] in flags:
            where = flags[loc[0]]
        else:
            where = f"{what}: {'.'.join(loc) or '(top)'}"
        value = first.get("input")
        # Show the value unless the message quotes it already, or it would swamp the line.
        if isinstance(value, str) and repr(value) not in message and len(value) <= 40:
            where += f" {value!r}"
        raise InputError(where, message) from None
