"""The plan file: a Pydantic model of a whole cluster's PKI, read from TOML.

TOML, not HCL: Python reads it with the standard library (``tomllib``), its types are exact
(an integer count is never a string), it reports errors with line and column, and it is the
format of the guides users already keep. HCL would tie the plan to python-hcl2, which parses
HCL2 while Nomad's own agent files are HCL1.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

from cfwrap.errors import InputError
from cfwrap.models import LIFETIME_MARGIN, Duration, KeySpec, Text, parse_duration
from cfwrap.nomad import Role, check_config_text, check_label
from cfwrap.specs import DnsName, IPAddress, Region

PLAN_SCHEMA_FILE = "plan.schema.json"
#: More nodes than this in one plan is a typo, not a cluster.
MAX_NODES = 100_000
MAX_PLAN_SIZE = 16 * 1024 * 1024

_FROZEN = ConfigDict(frozen=True, extra="forbid")
_ADDRESS = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(?P<port>[0-9]{1,5})")
_HOST_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def _check_node_name(text: str) -> str:
    """A node's name is one lowercase DNS label: it names a folder and is safe in a path."""
    return check_label(text, what="node name")


def _check_address(text: str) -> str:
    """``host:port`` (IPv6 in brackets), the address ``status --connect`` dials."""
    import ipaddress

    match = _ADDRESS.fullmatch(text)
    if match is None or not 0 < int(match["port"]) < 65536:
        raise ValueError(f"address {text!r} is not host:port (IPv6 as [addr]:port)")
    host = match["host"]
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"address {text!r}: {host} is not an IPv6 address") from None
    elif not all(_HOST_LABEL.fullmatch(label) for label in host.split(".")):
        raise ValueError(f"address {text!r}: {host!r} is neither a host name nor an address")
    return text


def _check_tls_dir(text: str) -> str:
    """The folder the node's files will have on the node: absolute, one line, no templates."""
    check_config_text(text, what="node_tls_dir")
    if not text.startswith("/"):
        raise ValueError(f"node_tls_dir {text!r} must be an absolute path on the node")
    return text.rstrip("/") or "/"


NodeName = Annotated[str, AfterValidator(_check_node_name)]
Address = Annotated[str, AfterValidator(_check_address)]
TlsDir = Annotated[str, AfterValidator(_check_tls_dir)]


class Node(BaseModel):
    """A named node: extra DNS names and IP addresses for its certificate, and where it listens."""

    model_config = _FROZEN

    name: NodeName
    dns: tuple[DnsName, ...] = ()
    ip: tuple[IPAddress, ...] = ()
    address: Address | None = Field(
        default=None, description="host:port of its HTTPS API, dialled by `status --connect`"
    )


NodeList = int | tuple[Node, ...]
_NODES: TypeAdapter[tuple[Node, ...]] = TypeAdapter(tuple[Node, ...])


class RegionPlan(BaseModel):
    """One region: its servers and clients, each a count or a list of named nodes."""

    model_config = _FROZEN

    servers: NodeList = Field(default=1, description="a count, or a list of named nodes")
    clients: NodeList = Field(default=0, description="a count, or a list of named nodes")

    @field_validator("servers", "clients", mode="wrap")
    @classmethod
    def _by_kind(cls, value: object, handler: ValidatorFunctionWrapHandler) -> NodeList:
        """A list is named nodes, anything else a count: errors then name the right field.

        Left to pydantic, a bad name inside a list would be reported against the count.
        """
        if isinstance(value, list | tuple):
            nodes: tuple[Node, ...] = _NODES.validate_python(value)
            return nodes
        if isinstance(value, bool):  # TOML's true would pass as 1
            raise ValueError("a count must be a whole number, not true or false")
        if not isinstance(value, int):  # the plan is read exactly: "3" and 3.0 are no counts
            raise ValueError("a count must be a whole number, or a list of named nodes")
        count: NodeList = handler(value)
        return count

    @field_validator("servers", "clients")
    @classmethod
    def _count_in_range(cls, value: NodeList) -> NodeList:
        if isinstance(value, int) and not 0 <= value <= MAX_NODES:
            raise ValueError(f"a count must be 0 to {MAX_NODES}, not {value}")
        return value

    @model_validator(mode="after")
    def _names_unique(self) -> RegionPlan:
        seen: set[str] = set()
        for role in ("server", "client"):
            for node in self.nodes(role):
                if node.name in seen:
                    raise ValueError(f"node name {node.name!r} is used twice in this region")
                seen.add(node.name)
        return self

    def nodes(self, role: Literal["server", "client"]) -> tuple[Node, ...]:
        """The nodes of ``role``; a count becomes ``<role>-1`` ... ``<role>-N``."""
        value = self.servers if role == "server" else self.clients
        if isinstance(value, int):
            return tuple(Node(name=f"{role}-{i}") for i in range(1, value + 1))
        return value


class Operator(BaseModel):
    """A person who runs the ``nomad`` CLI: they get a cli certificate."""

    model_config = _FROZEN

    name: NodeName
    region: Region | None = Field(
        default=None, description="the region named in the certificate; the first one if unset"
    )


class CAPlan(BaseModel):
    """The certificate authority: one CA, or an offline root with one intermediate per region."""

    model_config = _FROZEN

    common_name: Text = Field(default="Nomad Agent CA", min_length=1, max_length=50)
    expiry: Duration = "43800h"
    intermediates: bool = Field(
        default=False,
        description="true: the root only signs one intermediate CA per region, which signs "
        "that region's certificates; the root's key can then be kept offline",
    )
    intermediate_expiry: Duration = "26280h"


class Plan(BaseModel):
    """A whole cluster: the CA, the regions and their nodes, the operators, keys and lifetimes."""

    model_config = _FROZEN

    version: Literal[1] = 1
    out: str = Field(
        default="nomad-cluster", min_length=1, description="output root, relative to the plan"
    )
    node_tls_dir: TlsDir = Field(
        default="/etc/nomad.d/tls", description="where each node keeps its files, on the node"
    )
    gossip: bool = Field(default=True, description="servers get a shared gossip key")
    key: KeySpec = KeySpec()
    leaf_expiry: Duration = "8760h"
    ca: CAPlan = CAPlan()
    regions: dict[Region, RegionPlan] = Field(min_length=1)
    operators: tuple[Operator, ...] = ()

    @field_validator("version", mode="before")
    @classmethod
    def _version_is_the_integer_one(cls, value: object) -> object:
        """``version = 1`` exactly: Python takes true and 1.0 for 1."""
        if type(value) is not int:
            raise ValueError("version must be the integer 1")
        return value

    @field_validator("out")
    @classmethod
    def _out_is_a_path(cls, value: str) -> str:
        check_config_text(value, what="out")
        return value

    @field_validator("operators", mode="before")
    @classmethod
    def _names_as_operators(cls, value: object) -> object:
        """``operators = ["alice", "bob"]`` is short for tables with a name each."""
        if isinstance(value, list | tuple):
            return tuple({"name": v} if isinstance(v, str) else v for v in value)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Plan:
        if self.key.algo not in ("ecdsa", "rsa"):
            raise ValueError(f"key.algo {self.key.algo!r}: Nomad agents use ecdsa or rsa keys")
        ca_life = parse_duration(self.ca.expiry)
        signer_life = ca_life
        if self.ca.intermediates:
            signer_life = parse_duration(self.ca.intermediate_expiry)
            if signer_life > ca_life - LIFETIME_MARGIN:
                raise ValueError(
                    f"ca.intermediate_expiry {self.ca.intermediate_expiry} outlives the root "
                    f"(ca.expiry {self.ca.expiry}), or ends with it: it must end at least 1h "
                    "before"
                )
        if parse_duration(self.leaf_expiry) > signer_life - LIFETIME_MARGIN:
            raise ValueError(
                f"leaf_expiry {self.leaf_expiry} outlives the CA that signs it "
                f"({self.ca.intermediate_expiry if self.ca.intermediates else self.ca.expiry}), "
                "or ends with it: it must end at least 1h before"
            )
        folded: dict[str, str] = {}
        for region in self.regions:
            other = folded.setdefault(region.lower(), region)
            if other != region:
                # Go matches names without regard to case: a server of one would be accepted
                # as server.<region>.nomad of the other, under the root both trust.
                raise ValueError(
                    f"regions {other!r} and {region!r} differ only in case; Go's name checks "
                    "ignore case, so each one's servers would pass as the other's"
                )
        names = [o.name for o in self.operators]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"operator {name!r} is listed twice")
        for operator in self.operators:
            if operator.region is not None and operator.region not in self.regions:
                raise ValueError(
                    f"operator {operator.name!r}: region {operator.region!r} is not in regions"
                )
        total = sum(
            len(r.nodes("server")) + len(r.nodes("client")) for r in self.regions.values()
        ) + len(self.operators)
        if total > MAX_NODES:
            raise ValueError(f"the plan has {total} certificates; at most {MAX_NODES}")
        return self

    def members(self) -> Iterator[Member]:
        """Every certificate holder, in order: by region as written, servers, clients; operators."""
        for region, plan in self.regions.items():
            for role in ("server", "client"):
                for node in plan.nodes(role):
                    yield Member(role, region, node)
        first = next(iter(self.regions))
        for operator in self.operators:
            yield Member("cli", operator.region or first, Node(name=operator.name))


@dataclass(frozen=True)
class Member:
    """One holder of a certificate: a server, a client agent or an operator."""

    role: Role
    region: str
    node: Node

    @property
    def folder(self) -> str:
        """Its folder, relative to the output root."""
        if self.role == "cli":
            return f"operators/{self.node.name}"
        return f"nodes/{self.region}/{self.node.name}"

    @property
    def label(self) -> str:
        """How messages and the action list name it."""
        return self.folder.removeprefix("nodes/")


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the plan file, as checked in under ``schemas/``.

    The model turns an operator given by name alone into a table before validating it; the
    schema says so, so that an editor accepts ``operators = ["alice"]`` as cfwrap does.
    """
    schema = Plan.model_json_schema()
    operators = schema["properties"]["operators"]
    operators["items"] = {
        "anyOf": [operators["items"], {"type": "string", "description": "an operator's name"}]
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://cfwrap.invalid/schemas/plan.schema.json",
        **schema,
    }


def load(path: Path) -> Plan:
    """Read and check a plan file.

    Raises:
        InputError: unreadable, not TOML, or a field is wrong (named by its path in the plan).
    """
    import tomllib

    from cfwrap import files
    from cfwrap.models import parse_model

    try:
        text = files.read_input_text(path, limit=MAX_PLAN_SIZE)
    except OSError as e:
        raise InputError(
            str(path), e.strerror or str(e), fix="give a plan file (`cfwrap plan init > plan.toml`)"
        ) from None
    except UnicodeDecodeError:
        raise InputError(str(path), "not UTF-8 text", fix="save the plan as UTF-8") from None
    if text.startswith("\ufeff"):
        raise InputError(
            str(path),
            "starts with a byte order mark (BOM)",
            fix="save the plan as UTF-8 without one",
        )
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise InputError(str(path), f"not valid TOML: {e}", fix="fix the line it names") from None
    except RecursionError:
        raise InputError(
            str(path), "not valid TOML (nested too deeply)", fix="write a plan as plan init does"
        ) from None
    return parse_model(Plan, data, what=str(path), exact=True)
