"""Everything the signer reads, made or refreshed under its auth folder before it starts.

Made once and kept: the role keys, the TLS certificate and key, the certdb. Written on every
start from the flags: the signing config (``cfssl.json``) and multirootca's roots file. No file
holds a key value except the key files themselves (0600); the config names keys as ``file:``
paths, so no key is ever in an argv.

All of it happens under :func:`signer_lock`, held for the signer's whole life: one signer per
auth folder. What nodes read is published only once the signer answers (:func:`publish`): a
TLS certificate that must be remade (another CA, a name missing, near its end) is issued to
``tls.next.pem`` and served from there, and only a running signer moves it into place, the old
one kept as ``tls.replaced-<UTC time>.pem``; ``signer.json`` is written then too. A run that
fails leaves both as they were (:func:`discard`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cfwrap import files, parsers, runner
from cfwrap.errors import ConflictError, FileSystemError, InputError
from cfwrap.kit import CA
from cfwrap.nomad import ROLES, Role
from cfwrap.signer import authkeys, certdb, info, policy
from cfwrap.signer.info import SignerInfo
from cfwrap.tools import Tool

log = logging.getLogger(__name__)

CONFIG_FILE = "cfssl.json"
ROOTS_FILE = "multirootca.ini"
TLS_CERT = "tls.pem"
TLS_KEY = "tls-key.pem"
#: Where a remade TLS certificate and key wait until the signer that serves them answers.
TLS_NEXT_CERT = "tls.next.pem"
TLS_NEXT_KEY = "tls-key.next.pem"
AUDIT_LOG = "audit.log"
#: The signer's own TLS certificate is renewed on start when less than this is left.
TLS_RENEW_WITHIN = timedelta(days=30)
TLS_LIFETIME = timedelta(days=365)


@dataclass(frozen=True)
class Listen:
    """Where the signer listens: a host (name or address) and a port."""

    host: str
    port: int

    @property
    def address(self) -> str:
        """``host:port`` as multirootca's ``-a`` and a URL take it (IPv6 in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def wildcard(self) -> bool:
        """Whether it listens on every interface (then the TLS names come from --tls-name)."""
        return self.host in ("", "0.0.0.0", "::")  # noqa: S104 (naming it, not binding it)


def parse_listen(text: str, *, flag: str = "--listen") -> Listen:
    """Parse ``HOST:PORT`` (``[::1]:PORT`` for IPv6).

    Raises:
        InputError: no port, a port out of range, or an empty host.
    """
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise InputError(f"{flag} {text!r}", "not HOST:PORT", fix="e.g. 127.0.0.1:8888")
    if any(c.isspace() or c in "/?#@" for c in host):
        raise InputError(f"{flag} {text!r}", "not a host name or address", fix="e.g. 10.0.0.2:8888")
    return Listen(host, int(port))


@dataclass(frozen=True)
class Prepared:
    """The files a signer run uses, all absolute, and what it publishes once it answers."""

    auth_dir: Path
    roots: Path
    config: Path
    tls_cert: Path  # what multirootca serves: tls.pem, or tls.next.pem when remade
    tls_key: Path
    info: Path
    audit_log: Path
    made: tuple[str, ...]
    signer_info: SignerInfo
    expiry: str = "2160h"  # the lifetime the signer gives (its --expiry)

    @property
    def tls_remade(self) -> bool:
        """Whether this run serves a new TLS certificate, to be moved into place once up."""
        return self.tls_cert.name == TLS_NEXT_CERT


def _tls_names(listen: Listen, names: Sequence[str]) -> tuple[str, ...]:
    hosts = [*names]
    if not listen.wildcard:
        hosts.insert(0, listen.host)
    hosts += ["localhost", "127.0.0.1"]
    return tuple(dict.fromkeys(hosts))


def _tls_usable(cert_path: Path, key_path: Path, ca: CA, hosts: Sequence[str]) -> bool:
    """Whether the signer's TLS certificate can be kept: from this CA, in date, every name."""
    try:
        cert = parsers.load_certificate(files.read_input(cert_path))
        facts = parsers.certificate_facts(cert)
        key = parsers.read_private_key(files.read_input(key_path))
    except (OSError, parsers.ParseError):
        return False
    if not parsers.is_issued_by(cert, parsers.load_certificate(ca.cert_pem)):
        return False
    if facts.not_after - datetime.now(UTC) < TLS_RENEW_WITHIN:
        return False
    present = {*facts.dns_names, *facts.ip_addresses}
    wanted = {_normal(h) for h in hosts}
    return wanted <= present and key.public_key_sha256 == facts.key.public_key_sha256


def _normal(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host.lower()


def _make_tls(cfssl_tool: Tool, ca: CA, auth_dir: Path, hosts: Sequence[str]) -> None:
    """Issue the signer's own serverAuth certificate from the CA into ``tls.next.pem``."""
    from cfwrap import cfssl
    from cfwrap.models import CSR, Signing, SigningConfig, SigningProfile, to_cfssl_json

    left = ca.facts.not_after - datetime.now(UTC) - timedelta(hours=1)
    hours = int(min(TLS_LIFETIME, left) / timedelta(hours=1))
    if hours < 1:
        raise InputError(str(ca.cert_path), "the CA expires within the hour", fix="renew the CA")
    profile = SigningProfile(usages=("digital signature", "server auth"), expiry=f"{hours}h")
    config = SigningConfig(signing=Signing(default=profile, profiles={"signer-tls": profile}))
    with files.scratch() as scratch:
        config_file = Path(scratch) / "cfssl.json"
        files.write_new(config_file, to_cfssl_json(config), mode=files.PUBLIC_MODE)
        call = cfssl.gencert(
            cfssl_tool,
            ca_cert=ca.cert_path.absolute(),
            ca_key=ca.key_path.absolute(),
            config_file=config_file,
            config=config,
            profile="signer-tls",
            csr=CSR(CN="cfwrap signer", hosts=tuple(hosts)),
        )
        issued = cfssl.parse_issued(runner.run(call))
    files.write_replace(auth_dir / TLS_NEXT_KEY, issued.key, mode=files.SECRET_MODE)
    files.write_replace(auth_dir / TLS_NEXT_CERT, issued.cert, mode=files.PUBLIC_MODE)


def rotating_roles(auth_dir: Path) -> list[Role]:
    """The roles whose previous key is still accepted (a rotation in its overlap)."""
    return [r for r in ROLES if authkeys.prev_path(auth_dir, r).exists()]


def prepare(
    *,
    ca: CA,
    auth_dir: Path,
    cfssl_tool: Tool,
    listen: Listen,
    regions: Sequence[str],
    domains: Sequence[str] = (),
    tls_names: Sequence[str] = (),
    expiry: str = "2160h",
) -> Prepared:
    """Make what is missing and write this run's config and roots file (call under the lock).

    A TLS certificate that cannot be kept is remade into ``tls.next.pem``; ``tls.pem`` and
    ``signer.json`` are left alone until :func:`publish`.

    Raises:
        InputError: an existing key file is damaged or open to others; the CA is near its end.
        ToolFailedError: cfssl could not issue the signer's TLS certificate.
    """
    auth_dir = auth_dir.absolute()
    made = authkeys.ensure_keys(auth_dir)
    for role in rotating_roles(auth_dir):
        authkeys.read_key(authkeys.prev_path(auth_dir, role))
    hosts = _tls_names(listen, tls_names)
    tls_cert, tls_key = auth_dir / TLS_CERT, auth_dir / TLS_KEY
    if not _tls_usable(tls_cert, tls_key, ca, hosts):
        _make_tls(cfssl_tool, ca, auth_dir, hosts)
        tls_cert, tls_key = auth_dir / TLS_NEXT_CERT, auth_dir / TLS_NEXT_KEY
    db_config = certdb.ensure(auth_dir)
    config = policy.signing_config(
        auth_dir,
        regions=regions,
        domains=domains,
        expiry=expiry,
        rotating=rotating_roles(auth_dir),
    )
    config_path = auth_dir / CONFIG_FILE
    files.write_replace(config_path, policy.to_json(config), mode=files.PUBLIC_MODE)
    roots = auth_dir / ROOTS_FILE
    roots_text = (
        f"[{info.LABEL}]\n"
        f"private = {ca.key_path.absolute().as_uri()}\n"
        f"certificate = {ca.cert_path.absolute()}\n"
        f"config = {config_path}\n"
        f"dbconfig = {db_config}\n"
    )
    files.write_replace(roots, roots_text.encode(), mode=files.SECRET_MODE)
    shown_host = hosts[0]
    address = f"https://{Listen(shown_host, listen.port).address}"
    signer_info = info.SignerInfo(
        address=address,
        ca_file=str(ca.cert_path.absolute()),
        ca_pem=ca.cert_pem.decode(),
        regions=tuple(regions),
        allowed_domains=tuple(domains),
        expiry=expiry,
        roles={
            role: info.RoleAccess(
                profile=role, auth_key_file=authkeys.key_path(auth_dir, role).name
            )
            for role in ROLES
        },
    )
    return Prepared(
        auth_dir=auth_dir,
        roots=roots,
        config=config_path,
        tls_cert=tls_cert,
        tls_key=tls_key,
        info=auth_dir / info.FILE_NAME,
        audit_log=auth_dir / AUDIT_LOG,
        made=tuple(made),
        signer_info=signer_info,
        expiry=expiry,
    )


def publish(prepared: Prepared) -> list[Path]:
    """Once the signer answers: move a remade TLS certificate into place, write ``signer.json``.

    Returns the new names of the TLS files replaced (kept, dated; empty if none were).

    Raises:
        ConflictError: ``tls.pem`` or ``signer.json`` is a symlink or a folder.
        FileSystemError: the folder refused a rename or write.
    """
    kept: list[Path] = []
    if prepared.tls_remade:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        for new, name in ((prepared.tls_key, TLS_KEY), (prepared.tls_cert, TLS_CERT)):
            kept += _replace_keeping(new, prepared.auth_dir / name, stamp=stamp)
    files.write_replace(prepared.info, info.to_json(prepared.signer_info), mode=files.PUBLIC_MODE)
    return kept


def _replace_keeping(new: Path, path: Path, *, stamp: str) -> list[Path]:
    """Rename ``new`` to ``path``; what was there is first renamed to a dated name beside it."""
    if path.is_symlink() or path.is_dir():
        raise ConflictError(path, "is a symlink or a folder", fix="remove it, then start again")
    kept = []
    try:
        if path.exists():
            stem, dot, suffix = path.name.partition(".")
            backup = path.with_name(f"{stem}.replaced-{stamp}{dot}{suffix}")
            for n in range(1, 100):
                if not backup.exists() and not backup.is_symlink():
                    break
                backup = path.with_name(f"{stem}.replaced-{stamp}-{n}{dot}{suffix}")
            path.rename(backup)  # the old one keeps its inode and mode (0600 for the key)
            kept.append(backup)
        new.rename(path)
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise FileSystemError(path, e) from e
    return kept


def discard(prepared: Prepared) -> None:
    """After a run that never answered: remove the TLS certificate it remade (never used)."""
    if prepared.tls_remade:
        for path in (prepared.tls_cert, prepared.tls_key):
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def signer_lock(auth_dir: Path) -> Iterator[None]:
    """One signer (or key change) at a time per auth folder, held for the signer's whole life.

    The lock is flock(2) on a file beside the folder (:class:`cfwrap.files.FolderLock`), so it
    dies with the process that holds it.

    Raises:
        ConflictError: another ``cfwrap signer`` holds it.
        FileSystemError: the lock file cannot be made (the folder's parent is missing).
    """
    lock = files.FolderLock(auth_dir)
    stack = contextlib.ExitStack()
    try:
        stack.enter_context(lock)
    except ConflictError:
        raise ConflictError(
            auth_dir,
            "another cfwrap signer runs for this CA",
            fix="stop it first (SIGTERM), or give this one another --auth-dir",
        ) from None
    with stack:
        yield
