"""CA generations in a plan's tree: ``ca/gen-<N>/``, one root each.

With intermediates, ``ca/gen-<N>/<region>/`` holds one intermediate CA per region.

Every leaf of a region is signed by that region's signer: the root itself, or the region's
intermediate. Every member trusts the roots of the trusted generations (one, or two during a
rotation), so servers of every region trust the same root and can federate.
"""

from __future__ import annotations

import functools
import os
import re
import stat
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from cfwrap import cfssl, files, kit, manifest, parsers, runner
from cfwrap.errors import InputError, VerificationError
from cfwrap.models import CSR, CAConstraint, Signing, SigningConfig, SigningProfile, to_cfssl_json
from cfwrap.plan.model import Plan
from cfwrap.specs import CASpec
from cfwrap.tools import Tool

if TYPE_CHECKING:
    from cryptography import x509

    from cfwrap.plan import state

CA_ROOT = "ca"
#: ``ca/signer/ca.pem``: the CA of a central signer that issues the tree (``apply --remote``);
#: cfwrap holds no key for it. It counts as generation 0.
SIGNER_FOLDER = "signer"
SIGNER_GENERATION = 0
_GENERATION = re.compile(r"gen-([1-9][0-9]{0,5})")
#: A generation's root key; with intermediates it may be kept offline (the file absent).
ROOT_KEY = "ca-key.pem"
_ROOT_KEY_AWAY = f"{ROOT_KEY}: in the manifest but not on disk"
_INTERMEDIATE_PROFILE = "intermediate"


@dataclass(frozen=True)
class Signer:
    """A CA that signs leaves: its certificate and key, and the chain a leaf file carries."""

    cert_pem: bytes
    key_pem: bytes = field(repr=False)
    #: What follows a leaf in its certificate file: the intermediate, or nothing.
    chain_pem: bytes
    facts: parsers.CertFacts

    @functools.cached_property
    def cert(self) -> x509.Certificate:
        """The CA certificate, parsed once."""
        return parsers.load_certificate(self.cert_pem)


@dataclass(frozen=True)
class Generation:
    """One CA generation on disk."""

    number: int
    folder: Path
    root: kit.CA
    intermediates: dict[str, kit.CA]
    _signers: dict[str, Signer] = field(default_factory=dict, repr=False, compare=False)

    @property
    def relative(self) -> str:
        """Its folder, relative to the tree's root."""
        if self.number == SIGNER_GENERATION:
            return f"{CA_ROOT}/{SIGNER_FOLDER}"
        return f"{CA_ROOT}/gen-{self.number}"

    def signer(self, region: str) -> Signer:
        """The CA that signs ``region``'s leaves.

        Raises:
            VerificationError: the plan wants intermediates but this generation has none for
                ``region`` (it was made before the region was added).
        """
        key = region if self.intermediates else ""
        if key not in self._signers:
            if not self.intermediates:
                signer = Signer(self.root.cert_pem, self.root.key_pem, b"", self.root.facts)
            elif (ca := self.intermediates.get(region)) is None:
                raise VerificationError(
                    str(self.folder), f"has no intermediate CA for region {region!r}"
                )
            else:
                signer = Signer(ca.cert_pem, ca.key_pem, ca.cert_pem, ca.facts)
            self._signers[key] = signer
        return self._signers[key]


@dataclass(frozen=True)
class RemoteCA:
    """A central signer (``cfwrap signer``) that signs a plan's leaves instead of its own CA."""

    url: str
    ca_pem: bytes
    auth_keys: dict[str, str] = field(repr=False)

    def generation(self, root: Path) -> Generation:
        """The signer's CA as the tree's only generation (0, without a key)."""
        folder = root / CA_ROOT / SIGNER_FOLDER
        facts = parsers.read_certificate(self.ca_pem)
        ca = kit.CA(folder / "ca.pem", folder / "ca-key.pem", facts, self.ca_pem, b"")
        return Generation(SIGNER_GENERATION, folder, ca, {})


def signer_generation(root: Path) -> Generation | None:
    """The CA of the central signer that issued the tree, if one did.

    Raises:
        VerificationError: the file is damaged.
    """
    path = root / CA_ROOT / SIGNER_FOLDER / "ca.pem"
    if not path.is_file():
        return None
    try:
        pem = files.read_input(path)
        parsers.read_certificate(pem)
    except (OSError, parsers.ParseError) as e:
        raise VerificationError(
            str(path),
            f"not the signer's CA certificate ({e})",
            fix="run apply with --remote, which writes it again from --ca",
        ) from None
    return RemoteCA("", pem, {}).generation(root)


def is_generation(name: str) -> bool:
    """``gen-N``: a CA generation's folder name."""
    return _GENERATION.fullmatch(name) is not None


def find(root: Path) -> list[Generation]:
    """The CA generations present under ``root/ca``, oldest first, each loaded and checked.

    Raises:
        InputError: a generation's CA cannot sign (expired, not a CA, key mismatch).
    """
    folder = root / CA_ROOT
    if not folder.is_dir():
        return []
    numbers = sorted(
        int(m[1]) for p in folder.iterdir() if (m := _GENERATION.fullmatch(p.name)) and p.is_dir()
    )
    generations = []
    for n in numbers:
        try:
            generations.append(_load(folder / f"gen-{n}", n))
        except InputError as e:  # kit.load_ca speaks to a user's --ca; here the tree is damaged
            gen = folder / f"gen-{n}"
            inside = Path(e.what).is_relative_to(gen) and Path(e.what) != gen
            raise VerificationError(
                str(gen),
                f"{Path(e.what).relative_to(gen)}: {e.why}" if inside else e.why,
                fix="restore the CA folder from a backup, or move it away",
            ) from None
    return generations


def _load(folder: Path, number: int) -> Generation:
    """Load a generation; a root with intermediates may have its key kept offline (absent)."""
    intermediates = {
        p.name: kit.load_ca(p / "ca.pem", p / "ca-key.pem")
        for p in sorted(folder.iterdir())
        if p.is_dir() and (p / "ca.pem").exists()
    }
    offline = not os.path.lexists(folder / ROOT_KEY) and (
        bool(intermediates) or _signs_intermediates(folder / "ca.pem")
    )
    root = kit.load_ca(folder / "ca.pem", folder / ROOT_KEY, key_offline=offline)
    for region, ca in intermediates.items():
        cert = parsers.load_certificate(ca.cert_pem)
        if not parsers.is_issued_by(cert, parsers.load_certificate(root.cert_pem)):
            raise VerificationError(
                str(ca.cert_path), f"the intermediate of {region} is not signed by {folder}'s root"
            )
    return Generation(number, folder, root, intermediates)


def _signs_intermediates(cert_path: Path) -> bool:
    """The root was made to sign intermediates (path length 1), even with none left on disk."""
    try:
        return parsers.read_certificate(files.read_input(cert_path)).path_length == 1
    except (OSError, parsers.ParseError):
        return False  # kit.load_ca says what is wrong with it


def _root_spec(plan: Plan, number: int) -> CASpec:
    return CASpec(
        common_name=f"{plan.ca.common_name} {number}",
        expiry=plan.ca.expiry,
        key=plan.key,
        # With intermediates the root signs CAs one level down; without, it signs leaves only.
        path_length=1 if plan.ca.intermediates else 0,
    )


def _intermediate_config(plan: Plan) -> SigningConfig:
    profile = SigningProfile(
        usages=("cert sign", "crl sign"),
        expiry=plan.ca.intermediate_expiry,
        ca_constraint=CAConstraint(is_ca=True, max_path_len=0, max_path_len_zero=True),
    )
    return SigningConfig(
        signing=Signing(default=profile, profiles={_INTERMEDIATE_PROFILE: profile})
    )


def make(plan: Plan, *, stage: files.TreeStaging, number: int, cfssl_tool: Tool) -> str:
    """Make generation ``number`` (root, and intermediates per region) inside ``stage``.

    Returns the generation's folder relative to the tree's root, ready to be placed.

    Raises:
        ToolFailedError: cfssl failed.
        VerificationError: what cfssl made is not a CA.
    """
    relative = f"{CA_ROOT}/gen-{number}"
    spec = _root_spec(plan, number)
    csr = spec.csr()
    issued = cfssl.parse_issued(runner.run(cfssl.initca(cfssl_tool, csr)))
    _check_ca(issued.cert, "the root CA cfssl made")
    stage.write(f"{relative}/ca-csr.json", to_cfssl_json(csr), mode=files.PUBLIC_MODE)
    stage.write(f"{relative}/ca.pem", issued.cert, mode=files.PUBLIC_MODE)
    stage.write(f"{relative}/ca-key.pem", issued.key, mode=files.SECRET_MODE)
    if plan.ca.intermediates:
        _make_intermediates(plan, stage, relative, issued, list(plan.regions), cfssl_tool, number)
    folder = files.StagedFolder(stage, relative)
    manifest.write(
        folder.path, manifest.build(folder.path, [manifest.tool_record(cfssl_tool)]), into=folder
    )
    return relative


def changed_on_disk(generation: Generation, recorded: state.PlanManifest | None) -> dict[str, str]:
    """What changed in a generation's folder since cfwrap wrote it, by region ("-": the root).

    The root's files are checked against the folder's manifest (content and mode); each
    intermediate's key must still be 0600 and its ``ca.pem`` one certificate; and each
    certificate must be the one the plan manifest records, when it records one (a run cut
    short may have added an intermediate it had no time to record).
    """
    if generation.number == SIGNER_GENERATION:  # one file, as the signer gave it
        return _signer_changes(generation, recorded)
    changed: dict[str, str] = {}
    lines = _root_changes(generation)
    if lines:
        changed["-"] = lines[0]
    for region, ca in generation.intermediates.items():
        mode = stat.S_IMODE(ca.key_path.stat().st_mode)
        if mode != files.SECRET_MODE:
            changed[region] = f"{region}/ca-key.pem has mode 0{mode:03o}, cfwrap wrote it 0600"
        elif ca.cert_pem.count(b"-----BEGIN") != 1:
            changed[region] = f"{region}/ca.pem holds more than its one certificate"
        elif ca.key_pem.count(b"-----BEGIN") != 1:
            changed[region] = f"{region}/ca-key.pem holds more than its one key"
    record = None
    if recorded is not None:
        record = next((c for c in recorded.cas if c.generation == generation.number), None)
    if record is not None:
        if (
            "-" not in changed
            and generation.root.facts.fingerprint_sha256 != record.fingerprint_sha256
        ):
            changed["-"] = "its certificate is not the one the plan manifest records"
        for region, ca in generation.intermediates.items():
            known = record.intermediates.get(region)
            if region not in changed and known not in (None, ca.facts.fingerprint_sha256):
                changed[region] = "its certificate is not the one the plan manifest records"
    return changed


def _signer_changes(generation: Generation, recorded: state.PlanManifest | None) -> dict[str, str]:
    """The signer's CA the tree keeps: one certificate, the one the plan manifest records."""
    cas = recorded.cas if recorded is not None else []
    kept = next((c for c in cas if c.generation == SIGNER_GENERATION), None)
    if kept is None or (
        kept.fingerprint_sha256 == generation.root.facts.fingerprint_sha256
        and generation.root.cert_pem.count(b"-----BEGIN") == 1
    ):
        return {}
    return {"-": "not the signer's CA the plan manifest records: run apply with --remote"}


def _root_changes(generation: Generation) -> list[str]:
    """Where the root's folder differs from its manifest; a root key kept offline is no change."""
    links = sorted(p.name for p in generation.folder.iterdir() if p.is_symlink())
    if links:  # a manifest never lists one, so it would read as "not on disk"
        return [f"{links[0]} is a symlink (cfwrap never reads a CA's files through one)"]
    try:
        written = manifest.load(generation.folder)
        found = manifest.scan(generation.folder)
        if not generation.root.key_pem:
            found = _as_if_key_here(found, written)
        lines = manifest.differences(written, found)
    except VerificationError as e:
        return [str(e)]
    return [line for line in lines if generation.root.key_pem or line != _ROOT_KEY_AWAY]


def _as_if_key_here(
    found: list[manifest.Artifact], written: manifest.Manifest
) -> list[manifest.Artifact]:
    """The root's ``ca.pem`` as its manifest saw it with its key: paired, as recorded then."""
    was = {a.path: a.certificate for a in written.artifacts}.get("ca.pem")
    out = []
    for artifact in found:
        cert = artifact.certificate
        if artifact.path == "ca.pem" and cert and was and cert.key_pair_verified is None:
            paired = cert.model_copy(update={"key_pair_verified": was.key_pair_verified})
            out.append(artifact.model_copy(update={"certificate": paired}))
        else:
            out.append(artifact)
    return out


def check_root_key(generation: Generation, regions: list[str]) -> None:
    """Refuse to add intermediates for ``regions`` while the root's key is kept offline.

    Raises:
        InputError: the root has no key here.
    """
    if regions and not generation.root.key_pem:  # only a root kept offline has none
        raise InputError(
            f"{generation.relative}/{ROOT_KEY}",
            f"is offline, and the root must sign the intermediate of {', '.join(regions)}",
            fix="put the root's key back for this apply, then take it offline again",
        )


def missing_intermediates(plan: Plan, generation: Generation) -> list[str]:
    """The plan's regions that ``generation`` has no intermediate for (regions added since).

    It follows the generation, not the plan's ``ca.intermediates`` (which the next rotation's
    CA follows): one made with intermediates needs one for every region it signs, and one made
    without them signs every region with its root.
    """
    if not generation.intermediates:
        return []
    return [r for r in plan.regions if r not in generation.intermediates]


def add_intermediates(
    plan: Plan,
    *,
    stage: files.TreeStaging,
    generation: Generation,
    regions: list[str],
    cfssl_tool: Tool,
) -> list[str]:
    """Make intermediates for ``regions`` under ``generation``'s root, inside ``stage``.

    Returns each one's folder relative to the tree's root (``ca/gen-N/<region>``), ready to be
    placed into the generation's folder.

    Raises:
        ToolFailedError: cfssl failed.
        VerificationError: what cfssl made is not a CA signed by the root.
    """
    check_root_key(generation, regions)
    issued = cfssl.Issued(cert=generation.root.cert_pem, key=generation.root.key_pem, csr=b"")
    _make_intermediates(
        plan, stage, generation.relative, issued, regions, cfssl_tool, generation.number
    )
    return [f"{generation.relative}/{region}" for region in regions]


def _make_intermediates(  # noqa: PLR0917 (private helper of make and add_intermediates)
    plan: Plan,
    stage: files.TreeStaging,
    relative: str,
    root: cfssl.Issued,
    regions: list[str],
    cfssl_tool: Tool,
    number: int,
) -> None:
    from cfwrap import keys

    config = _intermediate_config(plan)
    root_cert = parsers.load_certificate(root.cert)
    with files.scratch() as scratch:
        ca_file, key_file = Path(scratch) / "ca.pem", Path(scratch) / "ca-key.pem"
        config_file = Path(scratch) / "cfssl.json"
        files.write_new(ca_file, root.cert, mode=files.PUBLIC_MODE)
        files.write_new(key_file, root.key, mode=files.SECRET_MODE)
        files.write_new(config_file, to_cfssl_json(config), mode=files.PUBLIC_MODE)
        for region in regions:
            csr = CSR(CN=f"{plan.ca.common_name} {number} {region}"[:64], key=plan.key)
            key = keys.new_private_key(plan.key)
            request = keys.csr_pem(key, csr)
            call = cfssl.sign(
                cfssl_tool,
                ca_cert=ca_file,
                ca_key=key_file,
                config_file=config_file,
                config=config,
                profile=_INTERMEDIATE_PROFILE,
                csr_pem=request,
            )
            cert = cfssl.parse_signed(runner.run(call))
            facts = _check_ca(cert, f"the intermediate CA of {region} cfssl made")
            if facts.path_length != 0 or not parsers.is_issued_by(
                parsers.load_certificate(cert), root_cert
            ):
                raise VerificationError(
                    f"the intermediate CA of {region}",
                    "it is not signed by the root, or may sign further CAs",
                )
            stage.write(
                f"{relative}/{region}/ca-csr.json", to_cfssl_json(csr), mode=files.PUBLIC_MODE
            )
            stage.write(f"{relative}/{region}/ca.csr", request, mode=files.PUBLIC_MODE)
            stage.write(f"{relative}/{region}/ca.pem", cert, mode=files.PUBLIC_MODE)
            stage.write(
                f"{relative}/{region}/ca-key.pem", keys.private_key_pem(key), mode=files.SECRET_MODE
            )


def _check_ca(cert: bytes, what: str) -> parsers.CertFacts:
    facts = parsers.read_certificate(cert)
    if not facts.is_ca or "key_cert_sign" not in facts.key_usage:
        raise VerificationError(what, "it is not a CA with keyCertSign")
    if facts.not_after <= datetime.now(UTC):
        raise VerificationError(what, "it has already expired")
    return facts


def bundle(generations: list[Generation], trusted: list[int]) -> bytes:
    """The CA bundle every member holds as ``ca.pem``: the trusted roots, oldest first."""
    by_number = {g.number: g for g in generations}
    return b"".join(by_number[n].root.cert_pem for n in trusted)
