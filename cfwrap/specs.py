"""What to issue: the CA and each Nomad role certificate, as models with safe defaults.

A spec knows its role's names (``server.<region>.nomad`` and the rest, :mod:`cfwrap.nomad`), its
usages and lifetime, and builds the CSR JSON and signing profile cfssl reads (:mod:`cfwrap.models`).
Kept apart from Nomad's naming rules so that what only reads certificates (``doctor``) does not
load pydantic.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Sequence
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from cfwrap.models import (
    CSR,
    MAX_PATH_LENGTH,
    CAOptions,
    Duration,
    KeySpec,
    SigningConfig,
    SigningProfile,
    SubjectName,
    Text,
    Usage,
    parse_duration,
)
from cfwrap.nomad import (
    DEFAULT_REGION,
    MAX_COMMON_NAME,
    Role,
    check_dns_name,
    check_region,
    parse_role_name,
    role_name,
)

Region = Annotated[str, AfterValidator(check_region)]
DnsName = Annotated[str, AfterValidator(check_dns_name)]


def _check_ip(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> object:
    """Refuse addresses cfssl does not put into a certificate as written.

    A zone (``fe80::1%eth0``) cannot be in an X.509 IP SAN, and cfssl writes an IPv4-mapped IPv6
    address (``::ffff:10.0.0.5``) as the IPv4 one, so the certificate would not say what was asked.
    """
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id:
            raise ValueError(f"{address} has a zone (%{address.scope_id}); certificates hold none")
        if address.ipv4_mapped is not None:
            raise ValueError(
                f"{address} is an IPv4 address in IPv6 form; give {address.ipv4_mapped}"
            )
    return address


IPAddress = Annotated[ipaddress.IPv4Address | ipaddress.IPv6Address, AfterValidator(_check_ip)]


def usages_for(role: Role, key: KeySpec) -> tuple[Usage, ...]:
    """Key usages for a role's certificate.

    Servers dial each other and client agents serve HTTPS, so both need serverAuth and
    clientAuth; the CLI only dials. keyEncipherment only for RSA: an EC key cannot encrypt
    (RFC 5480 section 3), although the old guide's profile asks for it.
    """
    usages: list[Usage] = ["digital signature"]
    if key.algo == "rsa":
        usages.append("key encipherment")
    if role != "cli":
        usages.append("server auth")
    usages.append("client auth")
    return tuple(usages)


class CASpec(BaseModel):
    """What the kit's certificate authority should be."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    common_name: Text = Field(default="Nomad Agent CA", min_length=1, max_length=MAX_COMMON_NAME)
    names: tuple[SubjectName, ...] = ()
    expiry: Duration = "43800h"
    key: KeySpec = KeySpec()
    #: 0: the CA signs leaves only (Go's MaxPathLenZero); more allows intermediates below it.
    path_length: int = Field(default=0, ge=0, le=MAX_PATH_LENGTH)

    @staticmethod
    def from_csr(csr: CSR) -> dict[str, object]:
        """The fields of a CA spec that keeps everything a user's CA CSR JSON says."""
        options = csr.ca or CAOptions()
        return {
            "common_name": csr.CN,
            "names": [n.model_dump() for n in csr.names],
            "expiry": options.expiry,
            "key": csr.key.model_dump(),
            "path_length": options.pathlen or 0,
        }

    def csr(self) -> CSR:
        """Build the CSR for ``cfssl gencert -initca``, with the path length stated exactly.

        cfssl reads ``pathlen: 0`` without ``pathlenzero`` as "no limit" (Go's x509 does), so a
        zero is always sent with ``pathlenzero``.
        """
        return CSR(
            CN=self.common_name,
            key=self.key,
            names=self.names,
            ca=CAOptions(
                expiry=self.expiry,
                pathlen=self.path_length,
                pathlenzero=self.path_length == 0,
            ),
        )


class CertSpec(BaseModel):
    """One Nomad role certificate: role, region, extra names, lifetime and key."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    role: Role
    region: Region = DEFAULT_REGION
    dns_names: tuple[DnsName, ...] = ()
    ip_addresses: tuple[IPAddress, ...] = ()
    expiry: Duration = "8760h"
    key: KeySpec = KeySpec()

    @field_validator("dns_names")
    @classmethod
    def _own_role_name_only(cls, names: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        """Refuse ``<role>.<region>.nomad`` names other than the certificate's own.

        Another role's name voids Nomad's role check; another region's name makes one server
        certificate a server of several regions, which Go's checks then accept.
        """
        role, region = info.data.get("role"), info.data.get("region")
        own = role_name(role, region) if role and region else None
        for name in names:
            if parse_role_name(name) is not None and name != own:
                raise ValueError(
                    f"{name!r} is a Nomad role name other than this certificate's own "
                    f"({own}); one certificate carries one role in one region"
                )
        return names

    @property
    def common_name(self) -> str:
        """The CN, which is also the first SAN: ``<role>.<region>.nomad``."""
        return role_name(self.role, self.region)

    @property
    def stem(self) -> str:
        """File name stem, as ``nomad tls cert create`` names its files: ``global-server-nomad``."""
        return f"{self.region}-{self.role}-nomad"

    def hosts(self) -> tuple[str, ...]:
        """All SANs in order: the role name, extra DNS names, then localhost and addresses."""
        hosts: list[str] = [self.common_name, *self.dns_names]
        if self.role != "cli":
            hosts += ["localhost", "127.0.0.1"]
        hosts += [str(ip) for ip in self.ip_addresses]
        return tuple(dict.fromkeys(hosts))

    def csr(self) -> CSR:
        """Build the CSR JSON that cfssl reads for this certificate."""
        return CSR(CN=self.common_name, hosts=self.hosts(), key=self.key)

    def profile(self) -> SigningProfile:
        """The signing profile for this certificate's role."""
        return _profile(self.role, self.key, self.expiry)


@functools.lru_cache(maxsize=64)  # frozen, and the same for a plan's thousands of nodes
def _profile(role: Role, key: KeySpec, expiry: str) -> SigningProfile:
    return SigningProfile(usages=usages_for(role, key), expiry=expiry)


def signing_config(specs: Sequence[CertSpec]) -> SigningConfig:
    """Build the signing configuration with one profile per role in ``specs``.

    The default profile is the narrowest (client auth only): cfssl falls back to it silently when
    a profile name is wrong, so a typo by hand never yields a server certificate.

    Raises:
        ValueError: two specs of one role disagree on their profile.
    """
    from cfwrap.models import Signing

    profiles: dict[str, SigningProfile] = {}
    for spec in specs:
        profile = spec.profile()
        if profiles.setdefault(spec.role, profile) != profile:
            raise ValueError(f"two {spec.role} certificates need different profiles")
    shortest = min((s.expiry for s in specs), key=parse_duration, default="8760h")
    default = SigningProfile(usages=("digital signature", "client auth"), expiry=shortest)
    return SigningConfig(signing=Signing(default=default, profiles=profiles))
