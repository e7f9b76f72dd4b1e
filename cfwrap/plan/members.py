"""A member's folder: what it should hold (from the plan) and what it holds now (from disk).

A member is a server, a client agent or an operator. Its folder holds exactly what it needs:
the CA bundle (``ca.pem``), its certificate (followed by its intermediate, when the plan has
intermediates) and key, its agent HCL (servers and clients, with the paths the files will have
on the node; the gossip key for servers only) or the CLI's environment file (operators), and a
kit manifest of the folder.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from cfwrap import files, manifest, nomad, parsers
from cfwrap.errors import InputError
from cfwrap.models import parse_duration
from cfwrap.plan import state
from cfwrap.plan.model import Member, Plan
from cfwrap.specs import CertSpec

if TYPE_CHECKING:
    from cryptography import x509

BUNDLE = "ca.pem"
#: Why a folder whose update was cut short (its journal is there) is not compared yet.
CUT_SHORT = "an update was cut short; `cfwrap apply` puts it back first"
DEFAULT_ADDRESS = "https://127.0.0.1:4646"
#: cfssl backdates every certificate by five minutes; lifetimes are compared with this slack.
_LIFETIME_SLACK = timedelta(hours=1)
_BACKDATE = timedelta(minutes=5)


@dataclass(frozen=True)
class Names:
    """The file names in a member's folder."""

    cert: str
    key: str
    config: str

    @classmethod
    def of(cls, spec: CertSpec) -> Names:
        """Names as ``nomad tls cert create`` and ``cfwrap quickstart`` use them."""
        config = (
            f"{spec.region}-cli.env" if spec.role == "cli" else f"{spec.region}-{spec.role}.hcl"
        )
        return cls(f"{spec.stem}.pem", f"{spec.stem}-key.pem", config)


def spec_for(plan: Plan, member: Member) -> CertSpec:
    """The certificate the plan wants for ``member``.

    Raises:
        InputError: a name the certificate cannot carry (named by the member's folder).
    """
    from pydantic import ValidationError

    try:
        return CertSpec(
            role=member.role,
            region=member.region,
            dns_names=member.node.dns,
            ip_addresses=member.node.ip,
            expiry=plan.leaf_expiry,
            key=plan.key,
        )
    except ValidationError as e:
        message = str(e.errors()[0]["msg"]).removeprefix("Value error, ")
        raise InputError(member.label, message) from None


class Configs:
    """Renders each member's HCL or environment file.

    Agent files are the same for every node of one role in one region, so each is rendered
    (and read back) once.
    """

    def __init__(self, plan: Plan, *, root: Path, gossip_key: str | None) -> None:
        """Render for ``plan``, whose tree is at ``root`` (absolute), with the gossip key."""
        self.plan = plan
        self.root = root
        self.gossip_key = gossip_key
        self._agents: dict[tuple[str, str], bytes] = {}
        self._addresses = {
            region: next((n.address for n in rp.nodes("server") if n.address is not None), None)
            for region, rp in plan.regions.items()
        }

    def text(self, member: Member, spec: CertSpec) -> bytes:
        """The member's configuration file's content."""
        names = Names.of(spec)
        if member.role == "cli":
            folder = self.root / member.folder
            address = self._addresses.get(member.region)
            return nomad.cli_env(
                address=f"https://{address}" if address else DEFAULT_ADDRESS,
                ca_file=str(folder / BUNDLE),
                cert_file=str(folder / names.cert),
                key_file=str(folder / names.key),
            ).encode()
        key = (member.role, member.region)
        if key not in self._agents:
            tls_dir = self.plan.node_tls_dir.rstrip("/")
            role: Literal["server", "client"] = "server" if member.role == "server" else "client"
            self._agents[key] = nomad.agent_hcl(
                role,
                region=member.region,
                ca_file=f"{tls_dir}/{BUNDLE}",
                cert_file=f"{tls_dir}/{names.cert}",
                key_file=f"{tls_dir}/{names.key}",
                gossip_key=self.gossip_key if member.role == "server" else None,
            ).encode()
        return self._agents[key]

    @staticmethod
    def mode(member: Member) -> int:
        """A server's HCL holds the gossip key: a secret."""
        return files.SECRET_MODE if member.role == "server" else files.PUBLIC_MODE


@dataclass
class Current:
    """What a member's folder holds now."""

    folder: Path
    cert_pem: bytes | None = None
    key_pem: bytes | None = field(default=None, repr=False)
    bundle: bytes | None = None
    config: bytes | None = None
    cert: x509.Certificate | None = None
    facts: parsers.CertFacts | None = None
    #: Where the files disagree with the folder's own manifest (changed on disk).
    changed: list[str] = field(default_factory=list)
    hashes: dict[str, str] = field(default_factory=dict)
    #: The certificate file an intact folder holds under another name: the plan moved the
    #: member to another region or role (an operator's folder keeps its name), so it is issued
    #: anew. None otherwise.
    renamed: str | None = None


def _read(path: Path, problems: list[str] | None = None) -> bytes | None:
    """The file's bytes; None if there is none (or, with ``problems``, one that cannot be read).

    With ``problems``, a path that is not a regular file (a FIFO, a folder) or cannot be read
    adds a line to it instead of raising.
    """
    try:
        return files.read_input(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        if problems is None:
            raise
        why = files.why_not_regular(path).partition(";")[0]  # "is a FIFO, not a regular file"
        if why == "is a regular file":
            why = f"cannot be read ({e.strerror or e})"
        problems.append(f"{path.name} {why}")
        return None


def recover(folder: Path) -> None:
    """Undo an update of a member's folder that was cut short (its journal), under its lock."""
    if (folder / files.JOURNAL).exists() and not folder.is_symlink():
        with files.FolderLock(folder):
            files.recover(folder)


def recorded_files(folder: Path) -> dict[str, tuple[str, str]] | None:
    """Each file's hash and mode ("0600") as the folder's manifest records them.

    None when the folder has no readable manifest.
    """
    recorded = _recorded(folder)
    return None if recorded is None else {a.path: (a.sha256, a.mode) for a in recorded.artifacts}


def _recorded(folder: Path) -> manifest.Manifest | None:
    try:
        data = _read(folder / manifest.FILE_NAME)
    except OSError:
        return None
    if data is None:
        return None
    try:
        return manifest.Manifest.model_validate_json(data)
    except ValueError:
        return None


def read_current(folder: Path, spec: CertSpec) -> Current:
    """Read a member's folder and compare it with its manifest; it changes nothing.

    A folder whose update was cut short (its journal is there) counts as changed: only
    ``apply``, holding the locks, puts it back (:func:`recover`).
    """
    names = Names.of(spec)
    current = Current(folder)
    if folder.is_symlink():
        current.changed.append("the folder is a symlink (cfwrap never writes through one)")
        return current
    if (folder / files.JOURNAL).exists():
        current.changed.append(CUT_SHORT)
    current.cert_pem = _read(folder / names.cert, current.changed)
    current.key_pem = _read(folder / names.key, current.changed)
    current.bundle = _read(folder / BUNDLE, current.changed)
    current.config = _read(folder / names.config, current.changed)
    kept = _recorded(folder)
    if kept is None:
        current.changed.append(f"{manifest.FILE_NAME} is missing or damaged")
    recorded = {a.path: (a.sha256, a.mode) for a in kept.artifacts} if kept else {}
    entries = sorted(folder.iterdir())
    links = [p.name for p in entries if p.is_symlink()]
    if links:
        current.changed.append(f"{links[0]} is a symlink (cfwrap never writes through one)")
        return current
    current.changed += _against_manifest(entries, recorded, current.hashes)
    if current.cert_pem is not None:
        try:
            current.cert = parsers.load_certificate(current.cert_pem)
            current.facts = parsers.certificate_facts(current.cert)
        except parsers.ParseError as e:
            current.changed.append(f"{names.cert}: {e}")
    elif other := _other_certificate(kept, names, intact=not current.changed):
        current.renamed = other
    elif not os.path.lexists(folder / names.cert):  # else _read said what is in its place
        current.changed.append(f"{names.cert} is gone")
    if current.facts is not None and current.key_pem is not None and not current.changed:
        _check_pair(current, names)
    return current


def _against_manifest(
    entries: list[Path], recorded: dict[str, tuple[str, str]], hashes: dict[str, str]
) -> list[str]:
    """How the folder's files differ from its manifest; fills ``hashes`` with what is there."""
    listed = [
        p
        for p in entries
        if p.is_file() and not p.name.startswith(".") and p.name != manifest.FILE_NAME
    ]
    hashes.update({p.name: hashlib.sha256(files.read_input(p)).hexdigest() for p in listed})
    modes = {p.name: f"0{stat.S_IMODE(p.stat().st_mode):03o}" for p in listed}
    # A folder, FIFO or socket of its own: cfwrap writes none into a member's folder (the
    # files it reads in its place are named by _read).
    changed = [
        f"{p.name} {files.why_not_regular(p).partition(';')[0]}: cfwrap wrote no such thing here"
        for p in entries
        if not p.is_file() and not p.name.startswith(".") and p.name not in recorded
    ]
    for name in sorted(recorded.keys() | hashes.keys()):
        if name not in hashes:
            changed.append(f"{name} is gone")
        elif name not in recorded:
            changed.append(f"{name} is not in its manifest")
        elif hashes[name] != recorded[name][0]:
            changed.append(f"{name} changed")
        elif modes[name] != recorded[name][1]:
            changed.append(f"{name} has mode {modes[name]}, its manifest says {recorded[name][1]}")
    return changed


def _other_certificate(kept: manifest.Manifest | None, names: Names, *, intact: bool) -> str | None:
    """The certificate an intact folder's manifest records under a name the plan no longer gives.

    A member moved to another region or role keeps its folder (an operator's is named after
    the operator alone; a named node may change role), while its files are named after the
    region and role: the folder holds what cfwrap wrote, for another certificate.
    """
    if not intact or kept is None or any(a.path == names.cert for a in kept.artifacts):
        return None
    return next((a.path for a in kept.artifacts if a.kind == "cert"), None)


def _check_pair(current: Current, names: Names) -> None:
    """Flag a key that does not belong to the certificate (a manifest rewritten over a swap).

    Only the public halves are compared: an RSA key's private parts are not validated here,
    which cost a whole fleet's status and no-op apply seconds per thousand members (and a
    third of a second a key for RSA 4096). A second key in the file is refused: Nomad reads the
    first, and the second is another node's secret.
    """
    assert current.facts is not None and current.key_pem is not None  # noqa: S101
    if current.key_pem.count(b"-----BEGIN ") > 1:
        current.changed.append(f"{names.key} holds more than one PEM block")
        return
    try:
        pairs = (
            parsers.read_private_key(current.key_pem, validate=False).public_key_sha256
            == current.facts.key.public_key_sha256
        )
    except parsers.ParseError as e:
        current.changed.append(f"{names.key}: {e}")
        return
    if not pairs:
        current.changed.append(f"{names.key} does not belong to {names.cert}")


def why_reissue(
    spec: CertSpec,
    current: Current,
    *,
    signer: x509.Certificate,
    signer_name: str,
    lifetime: bool = True,
) -> str | None:
    """Why the member's certificate no longer fits the plan (None when it does)."""
    facts, cert = current.facts, current.cert
    assert facts is not None and cert is not None  # noqa: S101 (caller checked)
    if not parsers.is_issued_by(cert, signer):
        return f"signed by {facts.issuer}, the plan signs with {signer_name}"
    if facts.common_name != spec.common_name:
        return f"its name is {facts.common_name}, the plan says {spec.common_name}"
    have = sorted([*facts.dns_names, *facts.ip_addresses])
    want = sorted(str(h) for h in spec.hosts())
    if have != want:
        added = sorted(set(want) - set(have))
        dropped = sorted(set(have) - set(want))
        parts = ([f"+{', +'.join(added)}"] if added else []) + (
            [f"-{', -'.join(dropped)}"] if dropped else []
        )
        return f"names changed ({'; '.join(parts)})"
    if (facts.key.algorithm, facts.key.size) != (spec.key.algo, spec.key.size):
        have_key = f"{facts.key.algorithm} {facts.key.size}"
        return f"key is {have_key}, the plan says {spec.key.algo} {spec.key.size}"
    life = facts.not_after - facts.not_before - _BACKDATE
    if lifetime and abs(life - parse_duration(spec.expiry)) > _LIFETIME_SLACK:
        return f"lifetime changed (the plan says {spec.expiry})"
    return None


def days_left(facts: parsers.CertFacts, now: datetime | None = None) -> float:
    """Days until the certificate expires (negative once it has)."""
    return (facts.not_after - (now or datetime.now(UTC))) / timedelta(days=1)


def pem_hash(data: bytes) -> str:
    """SHA-256 of a file's bytes, as the manifests record it."""
    return hashlib.sha256(data).hexdigest()


def record(
    member: Member, facts: parsers.CertFacts, hashes: dict[str, str], *, generation: int
) -> state.MemberRecord:
    """A member's line in the plan manifest."""
    return state.MemberRecord(
        folder=member.folder,
        role=member.role,
        region=member.region,
        name=member.node.name,
        address=member.node.address,
        serial=facts.serial,
        fingerprint_sha256=facts.fingerprint_sha256,
        not_before=facts.not_before,
        not_after=facts.not_after,
        ca_generation=generation,
        files=hashes,
    )
