"""Issuing through a central signer: the key is made here, only the CSR leaves the node.

The signer (``cfwrap signer``, cfssl's multirootca) is reached over TLS checked against the
kit's CA, with the role's auth key (:func:`cfwrap.issuer.authsign`). What comes back is held to
the same checks as a local issue (names, usages, chain, Go's and Nomad's rules, and that it is
for this key) and lands in the folder as a local ``cfwrap cert`` lands it
(:func:`cfwrap.kit.issue_into_folder`).
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cfwrap import cfssl, files, issuer, keys, kit, parsers
from cfwrap.errors import InputError
from cfwrap.nomad import CertSpec

#: Seconds to wait for the signer to answer one request.
TIMEOUT = 30.0


@dataclass(frozen=True)
class Remote:
    """A signer to ask: its address, the role's auth key, and the CA that vouches for both."""

    url: str
    auth_key: str = field(repr=False)
    ca_pem: bytes
    ca_name: str

    def context(self) -> ssl.SSLContext:
        """TLS that trusts only the kit's CA and checks the signer's name."""
        context = ssl.create_default_context(cadata=self.ca_pem.decode("ascii"))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context


def address(text: str) -> str:
    """The signer's URL from ``HOST:PORT`` or ``https://HOST:PORT``; plain http is refused.

    Raises:
        InputError: not such an address.
    """
    from cfwrap.signer.setup import parse_listen

    rest = text.removeprefix("https://")
    if rest.startswith("http://") or "/" in rest:
        raise InputError(
            f"--remote {text!r}",
            "not HOST:PORT of a signer (it is reached over TLS only)",
            fix="give it as cfwrap signer prints it, e.g. ca.example.com:8888",
        )
    listen = parse_listen(rest, flag="--remote")
    return f"https://{listen.address}"


def load(*, url: str, auth_key_file: Path, ca_file: Path) -> Remote:
    """Read the auth key and the CA certificate a node needs.

    Raises:
        InputError: the key file is not a key (or open to others); the CA is not a CA.
    """
    from cfwrap.signer.authkeys import read_key

    key = read_key(auth_key_file, what=f"--auth-key {auth_key_file}")
    try:
        ca_pem = files.read_input(ca_file)
        facts = parsers.read_certificate(ca_pem)
    except (OSError, parsers.ParseError) as e:
        why = getattr(e, "strerror", None) or str(e)
        raise InputError(
            f"--ca {ca_file}", why, fix="give the kit's CA certificate (ca.pem)"
        ) from None
    if not facts.is_ca:
        raise InputError(f"--ca {ca_file}", "not a CA certificate", fix="give ca.pem")
    return Remote(url=url, auth_key=key, ca_pem=ca_pem, ca_name=str(ca_file))


def issue(remote: Remote, spec: CertSpec, *, key_pem: bytes | None = None) -> cfssl.Issued:
    """Make a key (or use ``key_pem``), have the signer sign its CSR, and check the result.

    Raises:
        InputError: ``key_pem`` is not a key cfwrap can use.
        ToolFailedError: the signer refused (its reason), could not be reached, or answered
            with something other than one certificate for this key.
        VerificationError: the certificate is not what ``spec`` asked for, or Go would refuse it.
    """

    def sign(request: issuer.SignRequest) -> bytes:
        return issuer.authsign(
            remote.url, remote.auth_key, request, ssl_context=remote.context(), timeout=TIMEOUT
        )

    return issue_with(sign, spec, ca_pem=remote.ca_pem, key_pem=key_pem)


def issue_with(
    sign: Callable[[issuer.SignRequest], bytes],
    spec: CertSpec,
    *,
    ca_pem: bytes,
    key_pem: bytes | None = None,
) -> cfssl.Issued:
    """Make a key (or use ``key_pem``) and its CSR here, have ``sign`` sign it, check the result.

    ``sign`` is any issuer: :func:`cfwrap.issuer.authsign` to a signer, or a loopback
    :class:`cfwrap.issuer.LocalSigner`. The key never reaches it.

    Raises:
        InputError: ``key_pem`` is not a key cfwrap can use.
        ToolFailedError: ``sign`` failed.
        VerificationError: the certificate is not what ``spec`` asked for, or Go would refuse it.
    """
    if key_pem is None:
        key = keys.new_private_key(spec.key)
        key_pem = keys.private_key_pem(key)
    else:
        key = _load_key(key_pem)
    csr_pem = keys.csr_pem(key, spec.csr())
    request = issuer.SignRequest(
        csr_pem=csr_pem,
        profile=spec.role,
        hosts=spec.hosts(),
        label=f"the {spec.role} certificate",
    )
    issued = cfssl.Issued(cert=sign(request), key=key_pem, csr=csr_pem)
    kit.check_issued(spec, issued, ca_pem)
    return issued


def _load_key(key_pem: bytes) -> keys.PrivateKey:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    try:
        key = parsers.load_private_key(key_pem)
    except parsers.ParseError as e:
        raise InputError("the kept key", str(e), fix="renew without --keep-key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise InputError("the kept key", "not an ECDSA or RSA key", fix="renew without --keep-key")
    return key


def issue_cert(
    *,
    out: Path,
    remote: Remote,
    spec: CertSpec,
    key_pem: bytes | None = None,
    force: bool = False,
    wait: float = 0.0,
) -> kit.KitResult:
    """Issue one role certificate through the signer into ``out``, all or nothing.

    Raises:
        InputError: see :func:`issue`; or the folder holds another CA.
        ConflictError: an output exists (without ``force``), or the folder is locked.
        ToolFailedError: see :func:`issue`.
        VerificationError: see :func:`issue`; or the folder's manifest is damaged.
    """
    return kit.issue_into_folder(
        out,
        ca_pem=remote.ca_pem,
        ca_name=remote.ca_name,
        spec=spec,
        issue=lambda: issue(remote, spec, key_pem=key_pem),
        tools=[],
        force=force,
        wait=wait,
    )
