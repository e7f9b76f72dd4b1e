"""Issuing through a central signer: the key is made here, only the CSR leaves the node.

The signer (``cfwrap signer``, cfssl's multirootca) is reached over TLS checked against the
kit's CA, with the role's auth key (:class:`cfwrap.issuer.RemoteSigner`). What comes back is held
to the same checks as a local issue (names, usages, chain, Go's and Nomad's rules, and that it is
for this key) and lands in the folder as a local ``cfwrap cert`` lands it
(:func:`cfwrap.kit.issue_into_folder`). Many certificates go through one
:class:`~cfwrap.issuer.RemoteSigner` (:func:`issue_all`, :func:`signer_from_info`).
"""

from __future__ import annotations

import collections
import ssl
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cfwrap import cfssl, files, issuer, keys, kit, parsers
from cfwrap.errors import CfwrapError, InputError, ToolFailedError
from cfwrap.specs import CertSpec

if TYPE_CHECKING:
    from cfwrap.signer.info import SignerInfo

#: Seconds to wait for the signer to answer one request.
TIMEOUT = 30.0


def tls_context(ca_pem: bytes) -> ssl.SSLContext:
    """TLS that trusts only ``ca_pem`` (the signer's CA), checks the signer's name, TLS 1.2+."""
    context = ssl.create_default_context(cadata=ca_pem.decode("ascii"))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


#: OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH: the certificate verified but names another host.
_HOSTNAME_MISMATCH = 62


class SignerFailedError(ToolFailedError):
    """A signer could not be reached, or refused or botched a request: named by its address."""

    def __init__(self, url: str, why: str, *, fix: str = "") -> None:
        """Name the signer by its address (it is not a local cfssl that failed)."""
        super().__init__("signer", why, fix=fix)
        CfwrapError.__init__(self, f"the signer at {url}: {why}", fix=fix)
        self.url = url


class NamedSigner(issuer.RemoteSigner):
    """A :class:`~cfwrap.issuer.RemoteSigner` whose failures name the signer and the CA given.

    Its failures are :class:`SignerFailedError`: "the signer at URL", not "cfssl"; a TLS
    certificate that does not verify against the CA given says so, and what to give instead.
    """

    def __init__(
        self,
        url: str,
        *,
        ca_name: str,
        auth_keys: dict[str, str],
        ssl_context: ssl.SSLContext,
        workers: int = 1,
        timeout: float = TIMEOUT,
    ) -> None:
        """As :class:`~cfwrap.issuer.RemoteSigner`; ``ca_name`` says where its CA came from."""
        super().__init__(
            url, auth_keys=auth_keys, ssl_context=ssl_context, workers=workers, timeout=timeout
        )
        self.ca_name = ca_name

    def sign(self, request: issuer.SignRequest) -> bytes:
        """As :meth:`cfwrap.issuer.RemoteSigner.sign`, its failures named (SignerFailedError)."""
        try:
            return super().sign(request)
        except ToolFailedError as e:
            raise self._named(e) from e

    def _named(self, error: ToolFailedError) -> SignerFailedError:
        cause = error.__cause__
        if isinstance(cause, ssl.SSLCertVerificationError):
            reason = f"{cause.reason}: {cause.verify_message}"
            if cause.verify_code == _HOSTNAME_MISMATCH:
                return SignerFailedError(
                    self.url,
                    f"its TLS certificate does not name the address asked ({reason})",
                    fix="give the address it listens on, or start it with --tls-name for this one",
                )
            return SignerFailedError(
                self.url,
                f"its TLS certificate did not verify against {self.ca_name} ({reason})",
                fix="give the CA the signer was made from (ca.pem in its CA_DIR), "
                "or the address of this CA's signer",
            )
        why = error.message.removeprefix(f"{error.tool} failed: ").removesuffix(f" at {self.url}")
        return SignerFailedError(self.url, why, fix=error.fix)


@dataclass(frozen=True)
class Remote:
    """A signer to ask: its address, the role's auth key, and the CA that vouches for both."""

    url: str
    auth_key: str = field(repr=False)
    ca_pem: bytes
    ca_name: str

    def context(self) -> ssl.SSLContext:
        """TLS that trusts only the kit's CA and checks the signer's name."""
        return tls_context(self.ca_pem)

    def signer(self, *, profiles: Iterable[str], workers: int = 1) -> issuer.RemoteSigner:
        """A :class:`~cfwrap.issuer.RemoteSigner` that asks for ``profiles`` with this key.

        Raises:
            InputError: see :class:`~cfwrap.issuer.RemoteSigner`.
        """
        return NamedSigner(
            self.url,
            ca_name=f"--ca {self.ca_name}",
            auth_keys=dict.fromkeys(profiles, self.auth_key),
            ssl_context=self.context(),
            workers=workers,
        )


def address(text: str) -> str:
    """The signer's URL from ``HOST:PORT`` or ``https://HOST:PORT``; plain http is refused.

    Raises:
        InputError: not such an address.
    """
    from cfwrap.signer.setup import parse_listen

    rest = text.removeprefix("https://")
    if rest != text:
        rest = rest.removesuffix("/")  # https://HOST:PORT/, as a browser writes it
    if rest.startswith("http://") or "/" in rest:
        raise InputError(
            f"--remote {text!r}",
            "not HOST:PORT of a signer (it is reached over TLS only, at no path)"
            if not rest.startswith("http://")
            else "plain http: a signer is reached over TLS only",
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
    return Remote(url=url, auth_key=key, ca_pem=read_ca(ca_file), ca_name=str(ca_file))


def read_ca(ca_file: Path) -> bytes:
    """The CA certificate given with ``--ca`` (what the signer's TLS and leaves must chain to).

    Raises:
        InputError: unreadable, not a certificate, or not a CA.
    """
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
    blocks = ca_pem.count(b"-----BEGIN ")
    if blocks != 1 or not ca_pem.strip().startswith(b"-----BEGIN CERTIFICATE-----"):
        # Its bytes become every member's bundle: another CA after it would be trusted
        # everywhere, and a key after it would be handed to every node.
        raise InputError(
            f"--ca {ca_file}",
            f"holds {blocks} PEM blocks, or text besides its certificate; it is copied into "
            "every bundle as it is",
            fix="give the signer's CA certificate alone (ca.pem in its CA_DIR)",
        )
    return ca_pem


def issue(remote: Remote, spec: CertSpec, *, key_pem: bytes | None = None) -> cfssl.Issued:
    """Make a key (or use ``key_pem``), have the signer sign its CSR, and check the result.

    Raises:
        InputError: ``key_pem`` is not a key cfwrap can use.
        ToolFailedError: the signer refused (its reason), could not be reached, or answered
            with something other than one certificate for this key.
        VerificationError: the certificate is not what ``spec`` asked for, or Go would refuse it.
    """
    with remote.signer(profiles=[spec.role]) as signer:
        return issue_with(
            signer.sign, spec, ca_pem=remote.ca_pem, key_pem=key_pem, source=remote.url
        )


def issue_with(
    sign: Callable[[issuer.SignRequest], bytes],
    spec: CertSpec,
    *,
    ca_pem: bytes,
    key_pem: bytes | None = None,
    source: str | None = None,
) -> cfssl.Issued:
    """Make a key (or use ``key_pem``) and its CSR here, have ``sign`` sign it, check the result.

    ``source``: the signer's URL when ``sign`` is a remote signer's (named if it is refused).

    ``sign`` is any issuer: a :class:`cfwrap.issuer.RemoteSigner`'s, or a loopback
    :class:`cfwrap.issuer.LocalSigner`'s. The key never reaches it.

    Raises:
        InputError: ``key_pem`` is not a key cfwrap can use.
        ToolFailedError: ``sign`` failed.
        VerificationError: the certificate is not what ``spec`` asked for, or Go would refuse it.
    """
    request, key_pem = _request(spec, key_pem)
    return _checked(spec, request, sign(request), key_pem=key_pem, ca_pem=ca_pem, source=source)


def issue_all(
    signer: issuer.RemoteSigner, specs: Iterable[CertSpec], *, ca_pem: bytes
) -> Iterator[cfssl.Issued]:
    """Issue a certificate for each spec through an open signer, in order, each checked.

    Keys and CSRs are made here as the signer's workers take requests (a bounded number ahead),
    and every certificate is held to :func:`issue_with`'s checks as it comes back.

    Raises:
        ToolFailedError: the signer failed on one (the first, in order); the rest are dropped.
        VerificationError: a certificate is not what its spec asked for.
    """
    made: collections.deque[tuple[CertSpec, bytes]] = collections.deque()

    def requests() -> Iterator[issuer.SignRequest]:
        for spec in specs:
            request, key_pem = _request(spec, None)
            made.append((spec, key_pem))
            yield request

    for request, cert in signer.sign_all(requests()):
        spec, key_pem = made.popleft()  # sign_all keeps the order requests came in
        yield _checked(spec, request, cert, key_pem=key_pem, ca_pem=ca_pem, source=signer.url)


def _request(spec: CertSpec, key_pem: bytes | None) -> tuple[issuer.SignRequest, bytes]:
    """The sign request for ``spec`` with a new key (or ``key_pem``), and that key's PEM."""
    if key_pem is None:
        key = keys.new_private_key(spec.key)
        key_pem = keys.private_key_pem(key)
    else:
        key = _load_key(key_pem)
    request = issuer.SignRequest(
        csr_pem=keys.csr_pem(key, spec.csr()),
        profile=spec.role,
        hosts=spec.hosts(),
        label=f"the {spec.role} certificate",
    )
    return request, key_pem


def _checked(
    spec: CertSpec,
    request: issuer.SignRequest,
    cert: bytes,
    *,
    key_pem: bytes,
    ca_pem: bytes,
    source: str | None,
) -> cfssl.Issued:
    issued = cfssl.Issued(cert=cert, key=key_pem, csr=request.csr_pem)
    kit.check_issued(spec, issued, ca_pem, signer=source)
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


def ca_pem(info_file: Path) -> bytes:
    """The signer's CA certificate, from its ``signer.json``.

    Raises:
        InputError: the file is not a signer.json, or its CA is not a CA certificate.
    """
    from cfwrap.signer import info

    return _info_ca(info.load(info_file), info_file)


def _info_ca(described: SignerInfo, info_file: Path) -> bytes:
    pem = described.ca_pem.encode("ascii", "replace")
    try:
        facts = parsers.read_certificate(pem)
    except parsers.ParseError as e:
        raise InputError(
            f"{info_file}: ca_pem", str(e), fix="give the signer's signer.json"
        ) from None
    if not facts.is_ca:
        raise InputError(f"{info_file}: ca_pem", "not a CA certificate")
    return pem


def signer_from_info(
    info_file: Path, *, auth_dir: Path, roles: Iterable[str], workers: int
) -> issuer.RemoteSigner:
    """A :class:`~cfwrap.issuer.RemoteSigner` for the signer a ``signer.json`` describes.

    Each role is asked for under its profile with its own key (``auth_dir/<role>.key``, as the
    file names it); TLS trusts only the signer's CA.

    Raises:
        InputError: the file is not a signer.json, a role is not one it serves, or a key file
            is missing, open to others or not a key.
    """
    from cfwrap.signer import authkeys, info

    described = info.load(info_file)
    url = address(described.address)
    served = {str(name): access for name, access in described.roles.items()}
    keys: dict[str, str] = {}
    for role in roles:
        access = served.get(role)
        if access is None:
            raise InputError(
                f"role {role!r}",
                f"not served by the signer in {info_file}",
                fix=f"use one of: {', '.join(sorted(described.roles))}",
            )
        name = access.auth_key_file
        if not name or Path(name).name != name or name in (".", ".."):
            raise InputError(
                f"{info_file}: the {role} key file {name!r}", "not a file name in the auth folder"
            )
        keys[access.profile] = authkeys.read_key(auth_dir / name)
    return NamedSigner(
        url,
        ca_name=f"the CA in {info_file}",
        auth_keys=keys,
        ssl_context=tls_context(_info_ca(described, info_file)),
        workers=workers,
    )
