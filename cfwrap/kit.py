"""Making kits: a CA, role certificates, a gossip key and agent configuration, in that order.

Each function checks its inputs before any tool runs, runs cfssl, writes what cfssl returned
through ``files``, checks what was written against what was asked for, and writes the manifest
last, from the files on disk.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from cfwrap import cfssl, files, gossip, manifest, nomad, parsers, runner, verify
from cfwrap.errors import InputError, VerificationError
from cfwrap.models import LIFETIME_MARGIN, SigningConfig, parse_duration, to_cfssl_json
from cfwrap.specs import CASpec, CertSpec, signing_config
from cfwrap.tools import Tool

if TYPE_CHECKING:
    from cryptography import x509

log = logging.getLogger(__name__)

CA_STEM = "ca"
CONFIG_FILE = "cfssl.json"
GOSSIP_FILE = "gossip.key"
DEFAULT_ADDRESS = "https://127.0.0.1:4646"


@dataclass(frozen=True)
class KitResult:
    """What a command wrote: the folder, its files (relative), and any backup of an old folder."""

    folder: Path
    files: tuple[str, ...]
    backup: Path | None = None


@dataclass(frozen=True)
class CA:
    """An existing CA given by the user: its files, loaded and checked."""

    cert_path: Path
    key_path: Path
    facts: parsers.CertFacts
    cert_pem: bytes
    key_pem: bytes = field(repr=False)


def _issued_files(stem: str, issued: cfssl.Issued) -> list[tuple[str, bytes, int]]:
    """A certificate, key and CSR as cfssljson -bare would name them, with their modes."""
    return [
        (f"{stem}.pem", issued.cert, files.PUBLIC_MODE),
        (f"{stem}-key.pem", issued.key, files.SECRET_MODE),
        (f"{stem}.csr", issued.csr, files.PUBLIC_MODE),
    ]


def _write_issued(folder: Path, stem: str, issued: cfssl.Issued) -> list[str]:
    """Write a certificate, key and CSR into a new (staging) folder."""
    outputs = _issued_files(stem, issued)
    for name, data, mode in outputs:
        files.write_new(folder / name, data, mode=mode)
    return [name for name, _, _ in outputs]


_LOCAL = ("cfssl", "check that cfssl is 1.6.5 (cfwrap --version) and report this")


def _check_issued(
    spec: CertSpec,
    issued: cfssl.Issued,
    ca_cert: bytes,
    *,
    source: tuple[str, str] = _LOCAL,
) -> None:
    """Parse what cfssl issued and refuse it unless it is exactly what ``spec`` asked for.

    ``source``: who issued it, and the fix to suggest when it is wrong.
    """
    cert = parsers.load_certificate(issued.cert)
    facts = parsers.certificate_facts(cert)
    problems = nomad.certificate_problems(spec, facts)
    ca = parsers.load_certificate(ca_cert)
    if not parsers.is_issued_by(cert, ca):
        problems.append("it is not signed by the CA")
    if (outlives := outlives_ca(facts, parsers.certificate_facts(ca))) is not None:
        problems.append(outlives)
    if parsers.read_private_key(issued.key).public_key_sha256 != facts.key.public_key_sha256:
        problems.append("its key does not match it")
    csr = parsers.read_csr(issued.csr)
    if not csr.signature_valid or csr.key.public_key_sha256 != facts.key.public_key_sha256:
        problems.append("its CSR is not signed by the same key")
    who, fix = source
    if not problems:
        _check_as_go_would(spec, cert, ca_cert, who=who)
    if problems:
        raise VerificationError(
            f"the {spec.role} certificate {who} issued", "; ".join(problems), fix=fix
        )


def outlives_ca(leaf: parsers.CertFacts, ca: parsers.CertFacts) -> str | None:
    """Say so when a leaf ends after its CA (a signer's choice, or its requester's).

    No chain verifies past the CA's end: the agent would refuse it then, while its own date,
    which renewal reads, says it has time left.
    """
    if leaf.not_after <= ca.not_after:
        return None
    return (
        f"it outlives its CA (it ends {leaf.not_after:%Y-%m-%d %H:%M}, the CA "
        f"{ca.not_after:%Y-%m-%d %H:%M} UTC)"
    )


def check_issued(
    spec: CertSpec, issued: cfssl.Issued, ca_cert: bytes, *, signer: str | None = None
) -> None:
    """Refuse a certificate from any signer unless it is exactly what ``spec`` asked for.

    ``signer``: the remote signer that issued it (named in the message), or None for cfssl here.

    Raises:
        VerificationError: names, usages, chain, key pairing, or Go's and Nomad's checks.
    """
    source = _LOCAL
    if signer is not None:
        source = (
            f"the signer at {signer}",
            "check the signer's profiles (cfwrap signer sets them), or report this",
        )
    _check_issued(spec, issued, ca_cert, source=source)


def _check_as_go_would(
    spec: CertSpec, cert: x509.Certificate, ca_cert: bytes, *, who: str = "cfssl"
) -> None:
    """Refuse a certificate a Nomad agent would refuse in its role (``verify``, Go's rules)."""
    try:
        verify.check_issued(
            cert,
            roots=verify.load_pem_certificates(ca_cert),
            role=spec.role,
            region=spec.region,
            now=datetime.now(UTC),
        )
    except verify.VerifyError as e:
        raise VerificationError(
            f"the {spec.role} certificate {who} issued",
            f"Go would refuse it ({e.rule}): {e.message} [{e.go_error}]; nothing was written",
            fix="use a CA that Nomad accepts for this name and role (cfwrap ca makes one)",
        ) from None


def check_lifetimes(ca_expiry: str, specs: Sequence[CertSpec]) -> None:
    """Refuse leaves that would outlive a new CA of lifetime ``ca_expiry``.

    Raises:
        InputError: the first such leaf.
    """
    ca_life = parse_duration(ca_expiry)
    for spec in specs:
        if parse_duration(spec.expiry) > ca_life - LIFETIME_MARGIN:
            raise InputError(
                f"--expiry {spec.expiry}",
                f"the {spec.role} certificate would outlive its CA ({ca_expiry}), or end with "
                "it: a leaf must end at least 1h before its CA",
                fix="shorten --expiry or lengthen --ca-expiry",
            )


def _issue_all(
    cfssl_tool: Tool,
    *,
    ca_cert: Path,
    ca_key: Path,
    config_file: Path,
    config: SigningConfig,
    specs: Sequence[CertSpec],
) -> list[cfssl.Issued]:
    """Issue every spec concurrently (one cfssl each) and check each result; writes nothing."""
    calls = [
        cfssl.gencert(
            cfssl_tool,
            ca_cert=ca_cert,
            ca_key=ca_key,
            config_file=config_file,
            config=config,
            profile=spec.role,
            csr=spec.csr(),
        )
        for spec in specs
    ]
    results = runner.run_all(calls)
    ca_pem = files.read_input(ca_cert)
    issued = [cfssl.parse_issued(result) for result in results]
    for spec, one in zip(specs, issued, strict=True):
        _check_issued(spec, one, ca_pem)
    return issued


def _write_specs(
    folder: Path, specs: Sequence[CertSpec], issued: Sequence[cfssl.Issued]
) -> list[str]:
    """Write each spec's CSR JSON, certificate, key and CSR into a new (staging) folder."""
    written: list[str] = []
    for spec, one in zip(specs, issued, strict=True):
        files.write_new(
            folder / f"{spec.stem}-csr.json", to_cfssl_json(spec.csr()), mode=files.PUBLIC_MODE
        )
        written += [f"{spec.stem}-csr.json", *_write_issued(folder, spec.stem, one)]
    return written


def _make_ca(cfssl_tool: Tool, folder: Path, spec: CASpec) -> list[str]:
    csr = spec.csr()
    issued = cfssl.parse_issued(runner.run(cfssl.initca(cfssl_tool, csr)))
    facts = parsers.read_certificate(issued.cert)
    if not facts.is_ca or "key_cert_sign" not in facts.key_usage:
        raise VerificationError("the CA cfssl made", "it is not a CA with keyCertSign")
    files.write_new(folder / f"{CA_STEM}-csr.json", to_cfssl_json(csr), mode=files.PUBLIC_MODE)
    return [f"{CA_STEM}-csr.json", *_write_issued(folder, CA_STEM, issued)]


def quickstart(
    *,
    out: Path,
    cfssl_tool: Tool,
    ca: CASpec,
    specs: Sequence[CertSpec],
    gossip_bytes: int = gossip.DEFAULT_SIZE,
    tls_dir: Path | None = None,
    force: bool = False,
    wait: float = 0.0,
) -> KitResult:
    """Make a complete kit for one region in ``out``: CA, role certificates, gossip key, configs.

    The kit is built in a staging folder beside ``out`` and moved into place whole; an old
    ``out`` is kept as a dated backup (only with ``force``).

    Raises:
        InputError: leaves that outlive the CA, or specs from more than one region.
        ConflictError: ``out`` exists and is not empty (without ``force``), or is locked.
        ToolFailedError: cfssl failed or returned something unusable.
        VerificationError: what cfssl issued is not what was asked for.
    """
    check_lifetimes(ca.expiry, specs)
    regions = {s.region for s in specs}
    if len(regions) != 1:
        raise InputError("regions", f"a quickstart kit is for one region, not {sorted(regions)}")
    region = regions.pop()
    config = signing_config(specs)
    final_dir = (tls_dir or out).absolute()
    try:
        nomad.check_config_text(str(final_dir), what="--tls-dir" if tls_dir else "--out")
    except ValueError as e:
        raise InputError(str(e).partition(" ")[0], str(e).partition(" ")[2]) from None
    with files.Staging(out, force=force, wait=wait) as staging:
        folder = staging.path
        written = _make_ca(cfssl_tool, folder, ca)
        files.write_new(folder / CONFIG_FILE, to_cfssl_json(config), mode=files.PUBLIC_MODE)
        written.append(CONFIG_FILE)
        issued = _issue_all(
            cfssl_tool,
            ca_cert=folder / f"{CA_STEM}.pem",
            ca_key=folder / f"{CA_STEM}-key.pem",
            config_file=folder / CONFIG_FILE,
            config=config,
            specs=specs,
        )
        written += _write_specs(folder, specs, issued)
        written += _write_agent_files(folder, final_dir, region, specs, gossip_bytes)
        kit_manifest = manifest.build(folder, [manifest.tool_record(cfssl_tool)])
        _check_kit(kit_manifest)
        manifest.write(folder, kit_manifest)
        staging.commit()
    log.info("wrote %d files to %s", len(written) + 1, out)
    return KitResult(out, (*written, manifest.FILE_NAME), staging.backup)


def _write_agent_files(
    folder: Path, final_dir: Path, region: str, specs: Sequence[CertSpec], gossip_bytes: int
) -> list[str]:
    """Write the gossip key, each agent's HCL and the CLI's environment file."""
    key = gossip.generate(gossip_bytes)
    files.write_new(folder / GOSSIP_FILE, key.encode() + b"\n", mode=files.SECRET_MODE)
    written = [GOSSIP_FILE]
    ca_file = str(final_dir / f"{CA_STEM}.pem")
    for spec in specs:
        cert_file = str(final_dir / f"{spec.stem}.pem")
        key_file = str(final_dir / f"{spec.stem}-key.pem")
        if spec.role == "cli":
            name = f"{region}-cli.env"
            text = nomad.cli_env(
                address=DEFAULT_ADDRESS, ca_file=ca_file, cert_file=cert_file, key_file=key_file
            )
            files.write_new(folder / name, text.encode(), mode=files.PUBLIC_MODE)
        else:
            name = f"{region}-{spec.role}.hcl"
            text = nomad.agent_hcl(
                spec.role,
                region=region,
                ca_file=ca_file,
                cert_file=cert_file,
                key_file=key_file,
                gossip_key=key if spec.role == "server" else None,
            )
            # The server's file holds the gossip key: a secret.
            mode = files.SECRET_MODE if spec.role == "server" else files.PUBLIC_MODE
            files.write_new(folder / name, text.encode(), mode=mode)
        written.append(name)
    return written


def _check_kit(kit: manifest.Manifest, *, only: Sequence[str] | None = None) -> None:
    """Refuse a kit in which a certificate (of ``only``, if given) fails its chain or key pairing.

    A certificate without its key in the folder (a copied ``ca.pem``) is judged by its chain.
    """
    for artifact in kit.artifacts:
        cert = artifact.certificate
        if only is not None and artifact.path not in only:
            continue
        if cert is not None and (not cert.chain_verified or cert.key_pair_verified is False):
            raise VerificationError(
                artifact.path, "its chain to the CA or its key pairing did not verify"
            )


def load_ca(cert_path: Path, key_path: Path, *, key_offline: bool = False) -> CA:
    """Load a user's CA and check that it can sign: a CA, in date, with its own key.

    ``key_offline``: the key is kept elsewhere (a plan's root, which only signs intermediates):
    the certificate alone is loaded and checked, and the CA's ``key_pem`` is empty.

    Raises:
        InputError: unreadable, not a CA, expired, or the key does not match.
    """
    try:
        cert_data = files.read_input(cert_path)
        key_data = b"" if key_offline else files.read_input(key_path)
    except OSError as e:
        raise InputError(
            e.filename or str(cert_path),
            e.strerror or str(e),
            fix="give the CA's files with --ca and --ca-key",
        ) from None
    try:
        facts = parsers.read_certificate(cert_data)
    except parsers.ParseError as e:
        raise InputError(str(cert_path), str(e), fix="give the CA certificate (ca.pem)") from None
    try:
        key = None if key_offline else parsers.read_private_key(key_data)
    except parsers.ParseError as e:
        raise InputError(
            str(key_path), str(e), fix="give the CA's private key (ca-key.pem)"
        ) from None
    # Go's CheckSignatureFrom: CA:TRUE, and keyCertSign only when key usages are listed at all
    # (openssl req -x509 makes a CA with none).
    if not facts.is_ca or (facts.key_usage and "key_cert_sign" not in facts.key_usage):
        raise InputError(
            str(cert_path),
            f"{facts.subject} is not a CA certificate (it needs CA:TRUE, and keyCertSign "
            "among its key usages if it lists any)",
            fix="give the CA certificate, not a leaf",
        )
    now = datetime.now(UTC)
    if facts.not_after <= now:
        raise InputError(
            str(cert_path),
            f"the CA expired on {facts.not_after:%Y-%m-%d}",
            fix="make a new CA with `cfwrap ca`",
        )
    if facts.not_before > now:
        raise InputError(
            str(cert_path),
            f"the CA is not valid before {facts.not_before:%Y-%m-%d %H:%M} UTC; nothing it signs "
            "verifies until then",
            fix="check this machine's clock, or wait until then",
        )
    if key is not None and key.public_key_sha256 != facts.key.public_key_sha256:
        raise InputError(
            str(key_path), f"this key does not belong to {cert_path}", fix="give the CA's own key"
        )
    return CA(cert_path, key_path, facts, cert_data, key_data)


def check_lone_root(ca: CA) -> None:
    """Refuse a ``--ca`` file a kit cannot take as its ``ca.pem``, before cfssl runs.

    It must hold the CA's certificate alone (cfssl reads one PEM object; a key after it would
    land in every kit), and the CA must be a root: a kit's ca.pem is its trust anchor, and its
    manifest verifies that anchor by its own signature.

    Raises:
        InputError: more than one PEM block, or a CA its own key did not sign.
    """
    blocks = list(parsers.go_pem_blocks(ca.cert_pem))
    # cfssl takes one PEM object and refuses anything but blanks after it.
    after = ca.cert_pem[blocks[0].end :].strip() if blocks else b""
    if len(blocks) != 1 or after:
        types = ", ".join(b.type.decode("ascii", "replace") for b in blocks)
        held = f"{len(blocks)} PEM blocks ({types})" if len(blocks) != 1 else "text after it"
        raise InputError(
            str(ca.cert_path),
            f"holds {held}, not the CA certificate alone",
            fix="give a file with the CA certificate only (keep its key in --ca-key)",
        )
    cert = parsers.load_certificate(ca.cert_pem)
    if not parsers.is_issued_by(cert, cert):
        raise InputError(
            str(ca.cert_path),
            f"{ca.facts.subject} is an intermediate CA (signed by {ca.facts.issuer}), not a root",
            fix="issue from the root CA, or use a plan with ca.intermediates = true "
            "(cfwrap apply), which gives each region its own",
        )


def make_ca(
    *, out: Path, cfssl_tool: Tool, spec: CASpec, force: bool = False, wait: float = 0.0
) -> KitResult:
    """Make a new CA in its own folder ``out`` (``ca.pem``, ``ca-key.pem``, CSR and manifest).

    Raises:
        ConflictError: ``out`` exists and is not empty (without ``force``), or is locked.
        ToolFailedError: cfssl failed or returned something unusable.
    """
    with files.Staging(out, force=force, wait=wait) as staging:
        written = _make_ca(cfssl_tool, staging.path, spec)
        manifest.write(
            staging.path, manifest.build(staging.path, [manifest.tool_record(cfssl_tool)])
        )
        staging.commit()
    return KitResult(out, (*written, manifest.FILE_NAME), staging.backup)


def issue_cert(
    *,
    out: Path,
    cfssl_tool: Tool,
    ca: CA,
    spec: CertSpec,
    force: bool = False,
    wait: float = 0.0,
) -> KitResult:
    """Issue one role certificate from an existing CA into the folder ``out``, all or nothing.

    A new folder is built beside its place and moved there whole, as a kit is. Into an existing
    folder the files land together (:class:`files.FileSet`): every target and the folder's
    manifest are checked before cfssl runs, and a failure at any later point leaves the folder
    as it was. The CA certificate is copied in as ``ca.pem`` when the folder has none; the
    folder's manifest is rebuilt last from what is on disk.

    Raises:
        InputError: the certificate would outlive the CA, or the folder holds another CA.
        ConflictError: an output exists (without ``force``), or the folder is locked.
        ToolFailedError: cfssl failed or returned something unusable.
        VerificationError: what cfssl issued is not what was asked for, or the folder's
            manifest is damaged.
    """
    life = parse_duration(spec.expiry)
    if datetime.now(UTC) + life > ca.facts.not_after:
        left = ca.facts.not_after - datetime.now(UTC)
        raise InputError(
            f"--expiry {spec.expiry}",
            f"the certificate would outlive its CA, which expires on {ca.facts.not_after:%Y-%m-%d}",
            fix=f"use at most {int(left / timedelta(hours=1))}h, or make a new CA",
        )
    config = signing_config([spec])
    config_json = to_cfssl_json(config)

    def issue() -> cfssl.Issued:
        with files.scratch() as scratch:
            # cfssl reads -config and -ca from files; they reach the folder only with the rest.
            # The CA's key too: cfssl then signs with exactly the bytes cfwrap checked, whatever
            # the path given now holds (a file swapped for a FIFO would hang cfssl).
            scratch_config = Path(scratch) / CONFIG_FILE
            scratch_ca = Path(scratch) / f"{CA_STEM}.pem"
            scratch_key = Path(scratch) / f"{CA_STEM}-key.pem"
            files.write_new(scratch_config, config_json, mode=files.PUBLIC_MODE)
            files.write_new(scratch_ca, ca.cert_pem, mode=files.PUBLIC_MODE)
            files.write_new(scratch_key, ca.key_pem, mode=files.SECRET_MODE)
            (issued,) = _issue_all(
                cfssl_tool,
                ca_cert=scratch_ca,
                ca_key=scratch_key,
                config_file=scratch_config,
                config=config,
                specs=[spec],
            )
        return issued

    extra = (
        (f"{spec.stem}-{CONFIG_FILE}", config_json),
        (f"{spec.stem}-csr.json", to_cfssl_json(spec.csr())),
    )
    return issue_into_folder(
        out,
        ca_pem=ca.cert_pem,
        ca_name=str(ca.cert_path),
        spec=spec,
        issue=issue,
        tools=[manifest.tool_record(cfssl_tool)],
        extra=extra,
        force=force,
        wait=wait,
    )


def issue_into_folder(
    out: Path,
    *,
    ca_pem: bytes,
    ca_name: str,
    spec: CertSpec,
    issue: Callable[[], cfssl.Issued],
    tools: Sequence[manifest.ToolRecord],
    extra: Sequence[tuple[str, bytes]] = (),
    force: bool = False,
    wait: float = 0.0,
) -> KitResult:
    """Land one checked certificate (from ``issue``) and its key in ``out``, all or nothing.

    Used by :func:`issue_cert` (cfssl here) and by remote issuance (a signer elsewhere):
    every target and the folder's manifest are checked before ``issue`` runs; ``extra`` public
    files land with the certificate; the manifest is rebuilt last from what is on disk.

    Raises:
        InputError: the folder holds another CA.
        ConflictError: an output exists (without ``force``), or the folder is locked.
        VerificationError: the folder's manifest is damaged, or a written file fails its chain.
    """
    files.check_target_folder(out, force=True)

    def into(folder: Path, *, replace: bool) -> list[str]:
        return _issue_into(
            folder,
            ca_pem=ca_pem,
            ca_name=ca_name,
            spec=spec,
            issue=issue,
            tools=tools,
            extra=extra,
            force=replace,
        )

    if not out.exists():
        with files.Staging(out, force=False, wait=wait) as staging:
            written = into(staging.path, replace=False)
            staging.commit()
        return KitResult(out, (*written, manifest.FILE_NAME))
    with files.FolderLock(out, wait=wait):
        written = into(out, replace=force)
    return KitResult(out, (*written, manifest.FILE_NAME))


def _same_certificate(held: bytes, given: bytes) -> bool:
    """The same certificate, however its PEM is spelled (CRLF, text around it)."""
    try:
        return parsers.load_certificate(held) == parsers.load_certificate(given)
    except parsers.ParseError:
        return False


def _issue_into(
    folder: Path,
    *,
    ca_pem: bytes,
    ca_name: str,
    spec: CertSpec,
    issue: Callable[[], cfssl.Issued],
    tools: Sequence[manifest.ToolRecord],
    extra: Sequence[tuple[str, bytes]],
    force: bool = False,
) -> list[str]:
    """Issue ``spec`` and land its files and the folder's new manifest together."""
    known = list(tools)
    manifest.check_names(folder)  # its manifest is rebuilt: before anything is issued
    if (folder / manifest.FILE_NAME).exists() or (folder / manifest.FILE_NAME).is_symlink():
        old = manifest.load(folder)  # a damaged manifest stops us here, before anything is issued
        known = list({t.sha256 + t.path: t for t in [*old.tools, *known]}.values())
    ca_copy = folder / f"{CA_STEM}.pem"
    if ca_copy.exists() and not _same_certificate(files.read_input(ca_copy), ca_pem):
        raise InputError(
            str(ca_copy),
            f"holds another CA than {ca_name}",
            fix="issue into a folder of this CA's kit, or a new folder",
        )
    batch = files.FileSet(folder, replace=force, later=(manifest.FILE_NAME,))
    for name, data in extra:
        batch.add(name, data, mode=files.PUBLIC_MODE)
    for name, _, mode in _issued_files(spec.stem, cfssl.Issued(b"", b"", b"")):
        batch.add(name, b"", mode=mode)  # checked now; the real bytes come after issuing
    batch.check()  # before anything is issued: a refusal costs nothing
    issued = issue()
    for name, data, mode in _issued_files(spec.stem, issued):
        batch.add(name, data, mode=mode)
    if not ca_copy.exists():
        # The folder then holds what an agent needs (ca_file) and its chain verifies.
        batch.add(ca_copy.name, ca_pem, mode=files.PUBLIC_MODE)
    with batch:
        batch.apply()
        folder_manifest = manifest.build(folder, known)
        _check_kit(folder_manifest, only=batch.names)
        manifest.write(folder, folder_manifest, into=batch)
    return batch.names
