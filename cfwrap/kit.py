"""Making kits: a CA, role certificates, a gossip key and agent configuration, in that order.

Each function checks its inputs before any tool runs, runs cfssl, writes what cfssl returned
through ``files``, checks what was written against what was asked for, and writes the manifest
last, from the files on disk.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cfwrap import cfssl, files, gossip, manifest, nomad, parsers, runner
from cfwrap.errors import InputError, VerificationError
from cfwrap.models import SigningConfig, parse_duration, to_cfssl_json
from cfwrap.nomad import CASpec, CertSpec
from cfwrap.tools import Tool

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


def _write_issued(folder: Path, stem: str, issued: cfssl.Issued, *, replace: bool) -> list[str]:
    """Write a certificate, key and CSR as cfssljson -bare would name them, but safely."""
    write = files.write_replace if replace else files.write_new
    outputs = [
        (f"{stem}.pem", issued.cert, files.PUBLIC_MODE),
        (f"{stem}-key.pem", issued.key, files.SECRET_MODE),
        (f"{stem}.csr", issued.csr, files.PUBLIC_MODE),
    ]
    for name, data, mode in outputs:
        write(folder / name, data, mode=mode)
    return [name for name, _, _ in outputs]


def _check_issued(spec: CertSpec, issued: cfssl.Issued, ca_cert: bytes) -> None:
    """Parse what cfssl issued and refuse it unless it is exactly what ``spec`` asked for."""
    cert = parsers.load_certificate(issued.cert)
    facts = parsers.certificate_facts(cert)
    problems = nomad.certificate_problems(spec, facts)
    if not parsers.is_issued_by(cert, parsers.load_certificate(ca_cert)):
        problems.append("it is not signed by the CA")
    if parsers.read_private_key(issued.key).public_key_sha256 != facts.key.public_key_sha256:
        problems.append("its key does not match it")
    csr = parsers.read_csr(issued.csr)
    if not csr.signature_valid or csr.key.public_key_sha256 != facts.key.public_key_sha256:
        problems.append("its CSR is not signed by the same key")
    if problems:
        raise VerificationError(
            f"the {spec.role} certificate cfssl issued",
            "; ".join(problems),
            fix="check that cfssl is 1.6.5 (cfwrap --version) and report this",
        )


def check_lifetimes(ca_expiry: str, specs: Sequence[CertSpec]) -> None:
    """Refuse leaves that would outlive a new CA of lifetime ``ca_expiry``.

    Raises:
        InputError: the first such leaf.
    """
    ca_life = parse_duration(ca_expiry)
    for spec in specs:
        if parse_duration(spec.expiry) > ca_life:
            raise InputError(
                f"--expiry {spec.expiry}",
                f"the {spec.role} certificate would outlive its CA ({ca_expiry})",
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
    ca_pem = ca_cert.read_bytes()
    issued = [cfssl.parse_issued(result) for result in results]
    for spec, one in zip(specs, issued, strict=True):
        _check_issued(spec, one, ca_pem)
    return issued


def _write_specs(
    folder: Path, specs: Sequence[CertSpec], issued: Sequence[cfssl.Issued], *, replace: bool
) -> list[str]:
    """Write each spec's CSR JSON, certificate, key and CSR."""
    write = files.write_replace if replace else files.write_new
    written: list[str] = []
    for spec, one in zip(specs, issued, strict=True):
        write(folder / f"{spec.stem}-csr.json", to_cfssl_json(spec.csr()), mode=files.PUBLIC_MODE)
        written += [
            f"{spec.stem}-csr.json",
            *_write_issued(folder, spec.stem, one, replace=replace),
        ]
    return written


def _make_ca(cfssl_tool: Tool, folder: Path, spec: CASpec) -> list[str]:
    csr = spec.csr()
    issued = cfssl.parse_issued(runner.run(cfssl.initca(cfssl_tool, csr)))
    facts = parsers.read_certificate(issued.cert)
    if not facts.is_ca or "key_cert_sign" not in facts.key_usage:
        raise VerificationError("the CA cfssl made", "it is not a CA with keyCertSign")
    files.write_new(folder / f"{CA_STEM}-csr.json", to_cfssl_json(csr), mode=files.PUBLIC_MODE)
    return [f"{CA_STEM}-csr.json", *_write_issued(folder, CA_STEM, issued, replace=False)]


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
    config = nomad.signing_config(specs)
    final_dir = (tls_dir or out).absolute()
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
        written += _write_specs(folder, specs, issued, replace=False)
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


def _check_kit(kit: manifest.Manifest) -> None:
    """Refuse a kit in which a certificate fails its chain or key pairing."""
    for artifact in kit.artifacts:
        cert = artifact.certificate
        if cert is not None and not (cert.chain_verified and cert.key_pair_verified):
            raise VerificationError(
                artifact.path, "its chain to the CA or its key pairing did not verify"
            )


def load_ca(cert_path: Path, key_path: Path) -> CA:
    """Load a user's CA and check that it can sign: a CA, in date, with its own key.

    Raises:
        InputError: unreadable, not a CA, expired, or the key does not match.
    """
    try:
        cert_data = cert_path.read_bytes()
        key_data = key_path.read_bytes()
    except OSError as e:
        missing = cert_path if not cert_path.is_file() else key_path
        raise InputError(
            str(missing), e.strerror or str(e), fix="give the CA's files with --ca and --ca-key"
        ) from None
    try:
        facts = parsers.read_certificate(cert_data)
    except parsers.ParseError as e:
        raise InputError(str(cert_path), str(e), fix="give the CA certificate (ca.pem)") from None
    try:
        key = parsers.read_private_key(key_data)
    except parsers.ParseError as e:
        raise InputError(
            str(key_path), str(e), fix="give the CA's private key (ca-key.pem)"
        ) from None
    if not facts.is_ca or "key_cert_sign" not in facts.key_usage:
        raise InputError(
            str(cert_path),
            f"{facts.subject} is not a CA certificate (no CA:TRUE with keyCertSign)",
            fix="give the CA certificate, not a leaf",
        )
    now = datetime.now(UTC)
    if facts.not_after <= now:
        raise InputError(
            str(cert_path),
            f"the CA expired on {facts.not_after:%Y-%m-%d}",
            fix="make a new CA with `cfwrap ca`",
        )
    if key.public_key_sha256 != facts.key.public_key_sha256:
        raise InputError(
            str(key_path), f"this key does not belong to {cert_path}", fix="give the CA's own key"
        )
    return CA(cert_path, key_path, facts)


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
    """Issue one role certificate from an existing CA into the folder ``out``.

    The files are checked absent (unless ``force``) before cfssl runs; the CA certificate is
    copied in as ``ca.pem`` when the folder has none; the folder's manifest is rebuilt afterwards
    from what is on disk.

    Raises:
        InputError: the certificate would outlive the CA.
        ConflictError: an output exists (without ``force``), or the folder is locked.
        ToolFailedError: cfssl failed or returned something unusable.
        VerificationError: what cfssl issued is not what was asked for.
    """
    life = parse_duration(spec.expiry)
    if datetime.now(UTC) + life > ca.facts.not_after:
        left = ca.facts.not_after - datetime.now(UTC)
        raise InputError(
            f"--expiry {spec.expiry}",
            f"the certificate would outlive its CA, which expires on {ca.facts.not_after:%Y-%m-%d}",
            fix=f"use at most {int(left / timedelta(hours=1))}h, or make a new CA",
        )
    config_name = f"{spec.stem}-{CONFIG_FILE}"
    names = [f"{spec.stem}{s}" for s in ("-csr.json", ".pem", "-key.pem", ".csr")] + [config_name]
    config = nomad.signing_config([spec])
    config_json = to_cfssl_json(config)
    files.check_target_folder(out, force=True)
    created = not out.exists()
    if created:
        try:
            out.mkdir(mode=files.DIR_MODE)
        except OSError as e:
            raise InputError(str(out), e.strerror or str(e), fix="choose another --out") from None
    ca_copy = out / f"{CA_STEM}.pem"
    ca_pem = ca.cert_path.read_bytes()
    try:
        with (
            files.FolderLock(out, wait=wait),
            tempfile.TemporaryDirectory(prefix="cfwrap-") as scratch,
        ):
            if not force:
                files.check_absent([out / n for n in names])
            if ca_copy.exists() and ca_copy.read_bytes() != ca_pem:
                raise InputError(
                    str(ca_copy),
                    f"holds another CA than {ca.cert_path}",
                    fix="issue into a folder of this CA's kit, or a new folder",
                )
            # cfssl reads -config from a file; it reaches the kit only once the certificate is good.
            files.write_new(Path(scratch) / CONFIG_FILE, config_json, mode=files.PUBLIC_MODE)
            issued = _issue_all(
                cfssl_tool,
                ca_cert=ca.cert_path.absolute(),
                ca_key=ca.key_path.absolute(),
                config_file=Path(scratch) / CONFIG_FILE,
                config=config,
                specs=[spec],
            )
            write = files.write_replace if force else files.write_new
            write(out / config_name, config_json, mode=files.PUBLIC_MODE)
            written = [config_name, *_write_specs(out, [spec], issued, replace=force)]
            if not ca_copy.exists():
                # The folder then holds what an agent needs (ca_file) and its chain verifies.
                files.write_new(ca_copy, ca_pem, mode=files.PUBLIC_MODE)
                written.append(ca_copy.name)
            tools = [manifest.tool_record(cfssl_tool)]
            if (out / manifest.FILE_NAME).exists():
                old = manifest.load(out)
                tools = list({t.sha256 + t.path: t for t in [*old.tools, *tools]}.values())
            manifest.write(out, manifest.build(out, tools))
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    return KitResult(out, (*written, manifest.FILE_NAME))
