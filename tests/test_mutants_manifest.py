"""Tests that kill mutmut's survivors in cfwrap/manifest.py (scripts/mutation manifest).

Every fact the manifest records is checked against what cryptography, hashlib and os.stat say
about the file on disk, and every expected kind, role and message is written out here.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from cfwrap import manifest
from cfwrap.errors import VerificationError

# What the README's table says each file of a kit is (region ``global``).
KINDS = {
    "ca-csr.json": ("csr-json", "ca", None),
    "ca-key.pem": ("ca-key", "ca", None),
    "ca.csr": ("csr", "ca", None),
    "ca.pem": ("ca-cert", "ca", None),
    "cfssl.json": ("config", None, None),
    "gossip.key": ("gossip-key", None, None),
    "global-server.hcl": ("hcl", "server", "global"),
    "global-client.hcl": ("hcl", "client", "global"),
    "global-cli.env": ("env", "cli", "global"),
    **{
        f"global-{role}-nomad{suffix}": (kind, role, "global")
        for role in ("server", "client", "cli")
        for suffix, kind in (
            ("-csr.json", "csr-json"),
            ("-key.pem", "key"),
            (".csr", "csr"),
            (".pem", "cert"),
        )
    },
}
EKU = {ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth", ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth"}
KU = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
      "key_agreement", "key_cert_sign", "crl_sign")  # fmt: skip


def _spki(public: object) -> bytes:
    return public.public_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _copy(kit: Path, folder: Path, *names: str) -> Path:
    folder.mkdir()
    for name in names:
        shutil.copy2(kit / name, folder / name)
    return folder


def test_every_recorded_fact_is_what_the_file_says(kits):
    kit = kits["global"]
    artifacts = {a.path: a for a in manifest.scan(kit)}
    assert set(artifacts) == set(KINDS) | {"global-cli.env"}
    ca = x509.load_pem_x509_certificate((kit / "ca.pem").read_bytes())
    for name, artifact in artifacts.items():
        data = (kit / name).read_bytes()
        assert (artifact.kind, artifact.role, artifact.region) == KINDS[name], name
        assert artifact.sha256 == hashlib.sha256(data).hexdigest()
        assert artifact.mode == f"0{stat.S_IMODE((kit / name).stat().st_mode):03o}"
        if artifact.kind not in ("cert", "ca-cert"):
            assert artifact.certificate is None
            continue
        info = artifact.certificate
        assert info is not None
        cert = x509.load_pem_x509_certificate(data)
        ext = cert.extensions
        sans = (
            ext.get_extension_for_class(x509.SubjectAlternativeName).value
            if not (info.is_ca)
            else None
        )
        key = serialization.load_pem_private_key(
            (kit / name.replace(".pem", "-key.pem")).read_bytes(), password=None
        )
        assert info.subject == cert.subject.rfc4514_string()
        assert info.issuer == cert.issuer.rfc4514_string() == ca.subject.rfc4514_string()
        assert int(info.serial, 16) == cert.serial_number
        assert (info.not_before, info.not_after) == (
            cert.not_valid_before_utc,
            cert.not_valid_after_utc,
        )
        assert info.dns_names == (sans.get_values_for_type(x509.DNSName) if sans else [])
        assert info.ip_addresses == (
            [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] if sans else []
        )
        assert (info.key_algorithm, info.key_size) == ("ecdsa", cert.public_key().key_size)  # type: ignore[union-attr]
        usage = ext.get_extension_for_class(x509.KeyUsage).value
        assert info.key_usage == [f for f in KU if getattr(usage, f)]
        ekus = [] if info.is_ca else list(ext.get_extension_for_class(x509.ExtendedKeyUsage).value)
        assert info.extended_key_usage == [EKU[o] for o in ekus]
        assert info.is_ca is ext.get_extension_for_class(x509.BasicConstraints).value.ca
        assert info.is_ca is (name == "ca.pem")
        assert info.fingerprint_sha256 == cert.fingerprint(hashes.SHA256()).hex()
        assert info.chain_verified is _signed_by(cert, ca) is True
        assert info.key_pair_verified is (_spki(key.public_key()) == _spki(cert.public_key()))
        assert info.key_pair_verified is True


def test_a_foreign_chain_a_wrong_key_and_a_missing_key_are_recorded_as_such(
    kits, other_kit, tmp_path
):
    kit = kits["global"]
    folder = _copy(kit, tmp_path / "mixed", "ca.pem", "global-client-nomad.pem")
    shutil.copy2(other_kit / "global-server-nomad.pem", folder / "global-server-nomad.pem")
    shutil.copy2(kit / "global-server-nomad-key.pem", folder / "global-server-nomad-key.pem")
    (folder / "global-cli-nomad.pem").write_bytes((other_kit / "global-cli-nomad.pem").read_bytes())
    (folder / "global-cli-nomad-key.pem").write_bytes(
        b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n"
    )
    ca = x509.load_pem_x509_certificate((kit / "ca.pem").read_bytes())
    server = x509.load_pem_x509_certificate((folder / "global-server-nomad.pem").read_bytes())
    assert not _signed_by(server, ca)
    found = {a.path: a for a in manifest.scan(folder)}
    verdicts = {
        name: (a.kind, a.role, a.certificate.chain_verified, a.certificate.key_pair_verified)
        for name, a in found.items()
        if a.certificate is not None
    }
    assert verdicts == {
        "ca.pem": ("ca-cert", "ca", True, None),
        "global-client-nomad.pem": ("cert", "client", True, None),
        "global-server-nomad.pem": ("cert", "server", False, False),
        "global-cli-nomad.pem": ("cert", "cli", False, False),
    }
    assert (found["global-server-nomad-key.pem"].kind, found["global-cli-nomad-key.pem"].kind) == (
        "key",
        "key",
    )


def test_a_kit_without_its_ca_verifies_no_chain_and_a_ca_without_key_is_no_ca_key(kits, tmp_path):
    kit = kits["global"]
    folder = _copy(kit, tmp_path / "noca", "global-server-nomad.pem", "global-server-nomad-key.pem")
    shutil.copy2(kit / "ca-key.pem", folder / "ca-key.pem")
    found = {a.path: a for a in manifest.scan(folder)}
    server = found["global-server-nomad.pem"].certificate
    assert server is not None
    assert (server.chain_verified, server.key_pair_verified) == (False, True)
    # No ca.pem to pair it with: the CA's key is a key of no known role.
    assert (found["ca-key.pem"].kind, found["ca-key.pem"].role) == ("key", None)


def test_scan_skips_the_manifest_hidden_files_links_and_folders_and_reads_others(kits, tmp_path):
    kit = kits["global"]
    folder = _copy(kit, tmp_path / "k", "ca.pem", "manifest.json")
    (folder / ".hidden").write_text("x")
    (folder / "sub").mkdir()
    (folder / "link.pem").symlink_to(folder / "ca.pem")
    (folder / "notes.txt").write_text("hello")
    (folder / "broken.pem").write_text(
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    )
    (folder / "x-csr.json").write_text("{}")
    found = {a.path: a for a in manifest.scan(folder)}
    assert sorted(found) == ["broken.pem", "ca.pem", "notes.txt", "x-csr.json"]
    assert [(found[n].kind, found[n].role) for n in ("broken.pem", "notes.txt", "x-csr.json")] == [
        ("other", None),
        ("other", None),
        ("csr-json", None),
    ]
    assert found["notes.txt"].sha256 == hashlib.sha256(b"hello").hexdigest()


def test_differences_name_each_disagreement_in_one_exact_line(kits, tmp_path):
    kit = kits["global"]
    folder = tmp_path / "k"
    shutil.copytree(kit, folder)
    recorded = manifest.load(folder)
    assert manifest.differences(recorded, manifest.scan(folder)) == []
    old_ca = hashlib.sha256((folder / "ca.csr").read_bytes()).hexdigest()
    (folder / "ca.csr").write_bytes(b"changed")
    (folder / "gossip.key").chmod(0o644)
    (folder / "cfssl.json").unlink()
    (folder / "extra.txt").write_text("x")
    # Same bytes, but the manifest now claims another role for a file.
    tampered = recorded.model_copy(
        update={
            "artifacts": [
                a.model_copy(update={"role": "client"}) if a.path == "global-server.hcl" else a
                for a in recorded.artifacts
            ]
        }
    )
    new_ca = hashlib.sha256(b"changed").hexdigest()
    assert manifest.differences(tampered, manifest.scan(folder)) == [
        "cfssl.json: in the manifest but not on disk",
        "extra.txt: on disk but not in the manifest",
        f"ca.csr: content changed (sha256 {new_ca[:12]}..., manifest says {old_ca[:12]}...)",
        "global-server.hcl: facts differ from the manifest (kind, role, or verification)",
        "gossip.key: mode 0644, manifest says 0600",
    ]


def test_write_is_0644_whatever_was_there_and_load_reads_it_back(kits, tmp_path):
    folder = _copy(kits["global"], tmp_path / "k", "ca.pem")
    (folder / "manifest.json").write_text("old")
    (folder / "manifest.json").chmod(0o600)
    built = manifest.build(folder, [])
    assert manifest.write(folder, built) == folder / "manifest.json"
    assert stat.S_IMODE((folder / "manifest.json").stat().st_mode) == 0o644
    data = json.loads((folder / "manifest.json").read_text())
    assert data["schema_version"] == 1
    assert [a["path"] for a in data["artifacts"]] == ["ca.pem"]
    assert (folder / "manifest.json").read_text() == json.dumps(data, indent=2) + "\n"
    assert manifest.load(folder) == built


def test_a_manifest_that_breaks_the_schema_is_not_written(tmp_path):
    artifact = manifest.Artifact.model_construct(
        path="x", kind="other", role=None, region=None, sha256="nothex", mode="0644"
    )
    bad = manifest.Manifest(created_at=datetime.now(UTC), tools=[], artifacts=[artifact])
    with pytest.raises(VerificationError) as caught:
        manifest.to_json(bad)
    assert str(caught.value).startswith(
        "manifest.json: does not match manifest.schema.json at artifacts/0/sha256: "
    )
    assert caught.value.fix == "this is a cfwrap bug; please report it with the command you ran"


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (None, "no manifest here; run `cfwrap manifest --write DIR` to make one"),
        (b"{not json", "not valid JSON (Expecting property name enclosed in double quotes: "
         "line 1 column 2 (char 1)); `cfwrap manifest --write DIR` rebuilds it from the files on "
         "disk"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply; `cfwrap manifest --write DIR` "
         "rebuilds it from the files on disk"),
        (b'{"schema_version": 2}', "invalid at schema_version: 1 was expected; `cfwrap manifest "
         "--write DIR` rebuilds it from the files on disk"),
        (b"[]", "invalid at (top): [] is not of type 'object'; `cfwrap manifest --write DIR` "
         "rebuilds it from the files on disk"),
    ],
)  # fmt: skip
def test_load_refuses_a_bad_manifest_in_one_exact_line(tmp_path, content, why):
    if content is not None:
        (tmp_path / "manifest.json").write_bytes(content)
    with pytest.raises(VerificationError) as caught:
        manifest.load(tmp_path)
    assert str(caught.value) == f"{tmp_path / 'manifest.json'}: {why}"


def test_the_schema_is_the_checked_in_one(tmp_path):
    root = Path(__file__).resolve().parent.parent
    checked_in = json.loads((root / "schemas" / "manifest.schema.json").read_text())
    assert manifest.json_schema() == checked_in


def test_the_tool_record_and_the_time_are_what_made_the_kit(kits, tmp_path):
    from cfwrap import tools
    from tests.conftest import CFSSL_DIR

    binary = CFSSL_DIR / "cfssl"
    meta = json.loads((CFSSL_DIR.parent / "package.json").read_text())
    folder = _copy(kits["global"], tmp_path / "k", "ca.pem")
    before = datetime.now(UTC)
    built = manifest.build(folder, [manifest.tool_record(tools.find("cfssl", directory=CFSSL_DIR))])
    assert before <= built.created_at <= datetime.now(UTC)
    record = built.tools[0]
    assert (record.name, record.path, record.package, record.version) == (
        "cfssl",
        str(binary),
        meta["package"],
        meta["version"],
    )
    assert record.sha256 == hashlib.sha256(binary.read_bytes()).hexdigest()


# Second round: what the first run of scripts/mutation manifest left alive.


def _self_signed_leaf(folder: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "server.global.nomad")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    (folder / "global-server-nomad.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    assert _signed_by(cert, cert)  # it signed itself, but it is no CA


def test_a_self_signed_leaf_has_no_verified_chain(tmp_path):
    _self_signed_leaf(tmp_path)
    (found,) = manifest.scan(tmp_path)
    assert found.certificate is not None
    assert (found.kind, found.certificate.chain_verified) == ("cert", False)


def test_only_pem_and_csr_files_are_parsed_and_a_key_file_of_text_pairs_with_nothing(
    kits, tmp_path
):
    kit = kits["global"]
    folder = _copy(kit, tmp_path / "k", "ca.pem", "global-server-nomad.pem")
    (folder / "ca-copy.txt").write_bytes((kit / "ca.pem").read_bytes())
    (folder / "global-server-nomad-key.pem").write_text("not a key at all\n")
    found = {a.path: a for a in manifest.scan(folder)}
    assert (found["ca-copy.txt"].kind, found["ca-copy.txt"].certificate) == ("other", None)
    server = found["global-server-nomad.pem"].certificate
    assert server is not None
    assert server.key_pair_verified is False


def test_a_key_file_that_holds_the_certificate_is_no_key_pair(kits, tmp_path):
    kit = kits["global"]
    folder = _copy(kit, tmp_path / "k", "ca.pem", "global-server-nomad.pem")
    shutil.copy2(kit / "global-server-nomad.pem", folder / "global-server-nomad-key.pem")
    found = {a.path: a for a in manifest.scan(folder)}
    server = found["global-server-nomad.pem"].certificate
    assert server is not None
    assert server.key_pair_verified is False


def _bad_artifact(sha256: str) -> manifest.Artifact:
    return manifest.Artifact.model_construct(
        path="x", kind="other", role=None, region=None, sha256=sha256, mode="0644"
    )


def test_the_first_of_several_schema_errors_is_named(tmp_path):
    bad = manifest.Manifest(
        created_at=datetime.now(UTC), tools=[], artifacts=[_bad_artifact("b"), _bad_artifact("a")]
    )
    with pytest.raises(VerificationError) as caught:
        manifest.to_json(bad)
    # Sorted by message: 'a' comes first, though it is the second artifact.
    assert str(caught.value).startswith(
        "manifest.json: does not match manifest.schema.json at artifacts/1/sha256: 'a' does not "
    )


def test_load_names_a_deep_place_and_cuts_a_long_message(kits, tmp_path):
    data = json.loads((kits["global"] / "manifest.json").read_text())
    data["artifacts"][2]["sha256"] = "nothex"
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(VerificationError) as caught:
        manifest.load(tmp_path)
    assert str(caught.value).startswith(
        f"{tmp_path / 'manifest.json'}: invalid at artifacts/2/sha256: 'nothex' does not match "
    )
    data = json.loads((kits["global"] / "manifest.json").read_text())
    data["tools"] = "t" * 300
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(VerificationError) as long:
        manifest.load(tmp_path)
    message = ("'" + "t" * 300 + "' is not of type 'array'")[:200]
    assert str(long.value) == (
        f"{tmp_path / 'manifest.json'}: invalid at tools: {message}; "
        "`cfwrap manifest --write DIR` rebuilds it from the files on disk"
    )
