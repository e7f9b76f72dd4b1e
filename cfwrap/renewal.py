"""Renewing a folder's role certificates: one shot, idempotent, fit for a timer.

A certificate is due when less than the window is left of it. Each due certificate gets a new
key made here (or keeps its key), a CSR for the names it carries now, and is signed by a signer
(one :class:`cfwrap.issuer.RemoteSigner`, its connection kept for the run) or by the CA given
locally (a loopback
:class:`cfwrap.issuer.LocalSigner`); it is checked as every issue is, and lands with the
folder's manifest all or nothing (:func:`cfwrap.kit.issue_into_folder`). One run at a time per
folder (a lock beside it); every certificate is tried, and the run reports what it renewed,
what was not due and what failed.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from cfwrap import cfssl, files, issuer, kit, parsers, remote, runner
from cfwrap.errors import (
    CfwrapError,
    ConflictError,
    InputError,
    ToolMissingError,
    VerificationError,
)
from cfwrap.models import parse_duration
from cfwrap.nomad import parse_file_stem, role_name
from cfwrap.specs import CertSpec

if TYPE_CHECKING:
    from cfwrap.tools import Tool

log = logging.getLogger(__name__)

_DAYS = re.compile(r"([0-9]+)d")


def parse_window(text: str) -> timedelta:
    """A renewal window: days (``30d``) or a Go duration (``720h``).

    Raises:
        InputError: neither, or outside 1h to 30 years.
    """
    try:
        match = _DAYS.fullmatch(text)
        return parse_duration(f"{int(match.group(1)) * 24}h" if match else text)
    except ValueError as e:
        raise InputError(f"--within {text!r}", str(e).replace("8760h", "30d or 720h")) from None


@dataclass(frozen=True)
class Held:
    """A role certificate found in the folder, and what a renewal of it asks for."""

    path: Path
    spec: CertSpec
    not_after: datetime
    lifetime: timedelta

    @property
    def key_path(self) -> Path:
        """Its key file, beside it."""
        return self.path.with_name(f"{self.spec.stem}-key.pem")


@dataclass
class Outcome:
    """What a run did: renewed, not due (with their end dates), failed (with the error)."""

    renewed: list[Path] = field(default_factory=list)
    not_due: list[tuple[Path, datetime]] = field(default_factory=list)
    failed: list[tuple[Path, CfwrapError]] = field(default_factory=list)


def _spec_of(path: Path, facts: parsers.CertFacts, *, expiry: str) -> CertSpec | None:
    """The spec that reissues a role certificate with the names it carries now."""
    parsed = parse_file_stem(path.name.removesuffix(".pem"))
    if parsed is None or not path.name.endswith("-nomad.pem"):
        return None
    role, region = parsed
    if facts.common_name != role_name(role, region) or facts.is_ca:
        return None
    dns = [n for n in facts.dns_names if n not in (role_name(role, region), "localhost")]
    ips = [ip for ip in facts.ip_addresses if ip != "127.0.0.1"]
    from cfwrap.models import parse_model

    return parse_model(
        CertSpec,
        {
            "role": role,
            "region": region,
            "dns_names": dns if role != "cli" else [],
            "ip_addresses": ips if role != "cli" else [],
            "expiry": expiry,
            "key": {"algo": facts.key.algorithm, "size": facts.key.size},
        },
        what=path.name,
    )


def held(folder: Path, damaged: list[tuple[Path, CfwrapError]] | None = None) -> list[Held]:
    """The role certificates in ``folder`` (``<region>-<role>-nomad.pem``), read from disk.

    ``damaged``: where a certificate file that cannot be read or parsed goes (with why), so
    the others are still renewed; without it, such a file raises.

    Raises:
        InputError: the folder cannot be read, or (without ``damaged``) a certificate there
            cannot be parsed.
    """
    found = []
    try:
        names = sorted(p for p in folder.iterdir() if p.name.endswith("-nomad.pem"))
    except OSError as e:
        raise InputError(
            str(folder), e.strerror or str(e), fix="give a folder of certificates"
        ) from None
    for path in names:
        if path.name.endswith("-key.pem") or not files.is_regular(path):
            continue
        try:
            facts = parsers.read_certificate(files.read_input(path))
        except (OSError, parsers.ParseError) as e:
            if damaged is None:
                raise InputError(str(path), str(e), fix="replace or remove the file") from None
            damaged.append((path, InputError("not renewed", str(e), fix="replace or remove it")))
            continue
        lifetime = facts.not_after - facts.not_before
        hours = max(1, round(lifetime / timedelta(hours=1)))
        spec = _spec_of(path, facts, expiry=f"{hours}h")
        if spec is not None:
            found.append(Held(path, spec, facts.not_after, lifetime))
    return found


@contextlib.contextmanager
def renew_lock(folder: Path, *, wait: float) -> Iterator[None]:
    """One renew run per folder: a lock of its own, so each certificate can lock the folder.

    Raises:
        ConflictError: another renew run holds it (after ``wait`` seconds).
    """
    try:
        with files.FolderLock(folder.with_name(f"{folder.name}.renew"), wait=wait):
            yield
    except ConflictError:
        raise ConflictError(
            folder,
            "another cfwrap renew is running for this folder",
            fix="let it finish, or pass --wait SECONDS",
        ) from None


Sign = Callable[[issuer.SignRequest], bytes]


def renew(
    folder: Path,
    *,
    sign_for: Callable[[Sequence[CertSpec]], contextlib.AbstractContextManager[Sign]],
    ca_pem: bytes,
    within: timedelta,
    keep_key: bool = False,
    force: bool = False,
    same_lifetime: bool = True,
    now: datetime | None = None,
    wait: float = 0.0,
    source: str | None = None,
) -> Outcome:
    """Renew every role certificate in ``folder`` with less than ``within`` left.

    ``source``: the signer's address, when ``sign_for`` asks one (named if it answers wrong).

    ``sign_for`` opens an issuer for the due specs (a remote signer, or a local CA). Every
    certificate is tried; one that fails is reported and the others go on. ``same_lifetime``:
    renewals live as long as the certificates they replace (a local CA), so a window that is not
    shorter is refused up front; a signer sets its own lifetime, so a renewal that is due at
    once is reported as failed instead (every run would renew it).

    Raises:
        InputError: no role certificate in the folder, or a window not shorter than a
            certificate's lifetime (it would renew on every run).
        ConflictError: another renew run holds the folder.
    """
    now = now or datetime.now(UTC)
    outcome = Outcome()
    with renew_lock(folder, wait=wait):
        certs = held(folder, outcome.failed)  # a damaged one fails alone: the rest go on
        if not certs and not outcome.failed:
            raise InputError(
                str(folder),
                "holds no role certificate (<region>-<role>-nomad.pem)",
                fix="give the folder cfwrap cert or quickstart wrote",
            )
        for cert in certs if same_lifetime else ():
            if within >= cert.lifetime - BACKDATE:  # what a renewal has left when made
                left = cert.lifetime - BACKDATE
                raise InputError(
                    f"--within {_hours(within)}",
                    f"not shorter than what a renewal of {cert.path.name} has left when made "
                    f"({_hours(left)}: its lifetime, {_hours(cert.lifetime)}, less cfssl's "
                    "5-minute backdate): every run would renew it",
                    fix="give a window shorter than the lifetime, e.g. a third of it",
                )
        due = [c for c in certs if force or c.not_after - now <= within]
        outcome.not_due = [(c.path, c.not_after) for c in certs if c not in due]
        if not due:
            return outcome
        with sign_for([c.spec for c in due]) as sign:
            for cert in due:
                try:
                    _renew_one(
                        folder, cert, sign=sign, ca_pem=ca_pem, keep_key=keep_key, source=source
                    )
                except (CfwrapError, ValueError) as e:
                    error = e if isinstance(e, CfwrapError) else InputError(cert.path.name, str(e))
                    log.debug("renewing %s failed: %s", cert.path, error)
                    outcome.failed.append((cert.path, error))
                else:
                    outcome.renewed.append(cert.path)
                    problem = _due_at_once(cert.path, within)
                    if problem is not None:
                        outcome.failed.append((cert.path, problem))
    return outcome


def _due_at_once(path: Path, within: timedelta) -> InputError | None:
    """An error when the certificate just renewed is itself inside the window."""
    facts = parsers.read_certificate(files.read_input(path))
    lifetime = facts.not_after - facts.not_before
    if facts.not_after - datetime.now(UTC) > within:
        return None
    return InputError(
        f"--within {_hours(within)}",
        f"not shorter than the lifetime the signer gives ({_hours(lifetime)}): every run renews it",
        fix="give a window shorter than the lifetime, e.g. a third of it",
    )


#: cfssl starts a certificate 5 minutes before it is made (signer.FillTemplate's backdate): a
#: fresh renewal has that much less than its lifetime left.
BACKDATE = timedelta(minutes=5)


def _hours(value: timedelta) -> str:
    """A duration as Go writes one, to the minute: ``720h``, ``2h55m``."""
    minutes = int(value / timedelta(minutes=1))
    hours, rest = divmod(minutes, 60)
    return f"{hours}h" + (f"{rest}m" if rest else "")


def _renew_one(
    folder: Path, cert: Held, *, sign: Sign, ca_pem: bytes, keep_key: bool, source: str | None
) -> None:
    key_pem = None
    if keep_key:
        try:
            key_pem = files.read_input(cert.key_path)
        except OSError as e:
            raise InputError(
                str(cert.key_path), e.strerror or str(e), fix="renew without --keep-key"
            ) from None
        runner.remember_private_keys(key_pem)

    def issue() -> cfssl.Issued:
        issued = remote.issue_with(sign, cert.spec, ca_pem=ca_pem, key_pem=key_pem, source=source)
        ends = parsers.read_certificate(issued.cert).not_after
        if ends < cert.not_after:  # checked before anything lands: the old one stays
            raise VerificationError(
                "the signer's renewal",
                f"it ends {ends:%Y-%m-%d %H:%M}, before the certificate it would replace "
                f"({cert.not_after:%Y-%m-%d %H:%M} UTC); the folder is left as it was",
                fix="check the signer's --expiry (or the CA's end) against --within",
            )
        return issued

    kit.issue_into_folder(
        folder,
        ca_pem=ca_pem,
        ca_name=str(folder / f"{kit.CA_STEM}.pem"),
        spec=cert.spec,
        issue=issue,
        tools=[],
        force=True,
    )


@contextlib.contextmanager
def through_signer(signer: remote.Remote) -> Iterator[Sign]:
    """An issuer that asks a remote signer, over one kept-alive connection (for :func:`renew`).

    The one ``--auth-key`` is offered for every role's profile: the signer refuses it for a
    role it is not the key of, and that certificate is reported as failed.
    """
    from cfwrap.nomad import ROLES

    with signer.signer(profiles=ROLES) as asking:
        yield asking.sign


@contextlib.contextmanager
def through_local_ca(cfssl_tool: Tool, ca: kit.CA, specs: Sequence[CertSpec]) -> Iterator[Sign]:
    """An issuer that signs with the CA here, by a loopback ``cfssl serve`` (for :func:`renew`).

    Raises:
        InputError: a renewal would outlive the CA, or two certificates of one role need
            different lifetimes.
    """
    from cfwrap.specs import signing_config

    left = ca.facts.not_after - datetime.now(UTC)
    for spec in specs:
        if parse_duration(spec.expiry) > left:
            raise InputError(
                f"{spec.stem}.pem",
                f"a renewal for {spec.expiry} would outlive the CA ({ca.facts.not_after:%Y-%m-%d})",
                fix="renew the CA first (cfwrap ca), or issue shorter certificates",
            )
    try:
        config = signing_config(specs)
    except ValueError as e:
        raise InputError("the folder's certificates", str(e)) from None
    with issuer.LocalSigner(
        cfssl_tool, ca_cert_pem=ca.cert_pem, ca_key_pem=ca.key_pem, config=config
    ) as local:
        yield local.sign


def run_exec(command: str, *, folder: Path | None = None) -> None:
    """Run the --exec command (split as a shell would, run without one) through the runner.

    ``folder``: the renewed folder; its gossip key (``gossip.key``, a server config's
    ``encrypt``) is a secret from then on, kept out of what the command prints as any key is.

    Raises:
        InputError: the command is empty or cannot be split.
        ToolMissingError: its program does not exist.
        ToolFailedError: it failed.
    """
    import shlex

    try:
        argv = shlex.split(command)
    except ValueError as e:
        raise InputError(f"--exec {command!r}", str(e)) from None
    if not argv:
        raise InputError("--exec", "empty command", fix="e.g. --exec 'systemctl reload nomad'")
    if folder is not None:
        remember_gossip_keys(folder)
    try:
        runner.run(runner.Call.of(argv, timeout=300.0))
    except ToolMissingError as e:  # the runner's own fix is about cfssl
        raise ToolMissingError(
            argv[0],
            "the --exec command was not found (not on PATH, or not executable)",
            fix="give a command that exists on this machine, or its full path",
        ) from e


def remember_gossip_keys(folder: Path) -> None:
    """Treat the secrets in the folder's files as such.

    Its gossip key (``gossip.key``, a server config's ``encrypt``) and its private keys.
    """
    for path in sorted(folder.iterdir()):
        try:
            data = files.read_input(path, limit=_SECRET_SCAN_LIMIT)
        except OSError:
            continue  # not a regular file, too large, or unreadable: nothing cfwrap wrote
        runner.remember_secrets_in(data)


#: The most read of one file of the folder when looking for its secrets.
_SECRET_SCAN_LIMIT = 1024 * 1024
